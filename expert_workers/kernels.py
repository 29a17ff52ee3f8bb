"""Grouped SwiGLU over all of a worker's local experts (stage 4's arithmetic).

Rows arrive sorted by local expert with `counts[e]` rows for expert e; one call computes
`down(silu(gate(x)) * up(x))` for every row with its own expert's weights. The storage dtype (what
the weights are kept in) and the compute path are separate choices; the paths are:

- "grouped_mm": one `torch._grouped_mm` per projection over all experts (one kernel launch; the
  CUDA path; on CPU ATen loops over the groups itself);
- "loop": one `torch.mm` per expert that received rows, over a contiguous slice of x;
- "onednn": the same loop, but each expert's weights are reordered once at load into oneDNN's
  blocked layout (`mkldnn._reorder_linear_weight`, what torch inductor does for CPU linears) and run
  with `mkldnn._linear_pointwise`, so no call pays for a weight reorder; fp32, and bf16 on CPUs with
  native bf16 (AVX512-BF16 / AMX);
- "upcast": bf16 (or fp16) storage, fp32 compute: each weight is converted to fp32 one tile of
  256 rows at a time (cache resident) and multiplied there by oneDNN's fp32 linear, for CPUs whose
  bf16 matmul is emulated (AVX2-only: ~1 GFLOP/s against ~180 in fp32). At most one tile (one
  expert's projection when an expert has >= 256 rows) is ever in fp32, so memory stays at the bf16
  size.

Never a per-token loop. `select_kernel` picks the path from the device, the dtype and the CPU's
flags; the measurements behind the rule are in docs/performance.md.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moe_models.spec import ExpertFn

KERNELS = ("grouped_mm", "loop", "onednn", "upcast")
PLAIN = ExpertFn()  # down(silu(gate(x)) * up(x))
KERNEL_ENV = "MOE_EXPERT_KERNEL"  # overrides "auto" when set (the explicit argument wins)
UPCAST_TILE_ROWS = 256  # [256, 2048] fp32 = 2 MiB: stays in L2/L3 between the convert and the mm
UPCAST_WHOLE_MIN_ROWS = 256  # from this many rows one full-size product beats tiles (~8% at 384 rows)


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm") or hasattr(F, "grouped_mm")


def has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls in hardware (AVX512-BF16 or AMX) and oneDNN uses it."""
    cpu = torch.cpu
    native = any(
        getattr(cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return native and has_onednn() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def check_kernel_name(name: str | None) -> None:
    """Refuse an expert kernel name that is neither "auto" (or None) nor one of KERNELS."""
    if name not in (None, "auto") and name not in KERNELS:
        raise ValueError(f"unknown expert kernel {name!r}; choose one of {KERNELS} or 'auto'")


def select_kernel(device: torch.device, dtype: torch.dtype, override: str | None = None) -> str:
    """The compute path for weights stored in `dtype` on `device`.

    `override` (one of KERNELS) wins; None or "auto" reads $MOE_EXPERT_KERNEL, then picks:
    CUDA -> grouped_mm (sm90+, else loop); CPU fp32 -> onednn; CPU bf16 -> onednn with native bf16,
    else upcast; anything else -> loop (upcast for CPU fp16).
    """
    device = torch.device(device)
    if override in (None, "auto"):
        override = os.environ.get(KERNEL_ENV) or "auto"
    check_kernel_name(override)
    if override != "auto":
        if override == "grouped_mm" and not has_grouped_mm():
            raise ValueError("expert kernel 'grouped_mm' needs torch._grouped_mm, which this torch lacks")
        if override == "onednn" and (device.type != "cpu" or not has_onednn()):
            raise ValueError(f"expert kernel 'onednn' needs a CPU device with oneDNN, got {device}")
        if override == "onednn" and dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"expert kernel 'onednn' supports float32 and bfloat16, got {dtype}")
        return override
    if device.type == "cuda":
        if has_grouped_mm() and torch.cuda.get_device_capability(device) >= (9, 0):
            return "grouped_mm"
        return "loop"
    if device.type != "cpu":
        return "loop"
    if dtype == torch.float32:
        return "onednn" if has_onednn() else "loop"
    if dtype == torch.bfloat16:
        return "onednn" if cpu_has_native_bf16() else "upcast"
    if dtype == torch.float16:
        return "upcast"
    return "loop"


# ---- weight preparation (once, at load) ---------------------------------------------------------


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)


class ExpertStackBuilder:
    """Receives a layer's expert weights one expert at a time, in the layout `kernel` reads.

    Plain kernels get stacked `[n, 2I, H]` / `[n, H, I]` tensors and each expert is written straight
    into its row. "onednn" gets per-expert packed weights: every expert is written into one staging
    pair that lives for the whole layer and is packed from there. Allocating all plain tensors up
    front and packing them one by one instead left the freed plain tensors scattered among the
    packed ones in the malloc heap: 25% more RSS than the weights themselves (measured: 258 MB
    resident for 204 MB of experts), never given back.

    Usage: for i in order, either write into `slot(i)` (views `(gate, up, down)`) and call `done(i)`,
    or hand over weights already in this layout with `put(i, w13, w2)`; `finish()` returns
    `(w13, w2)`.
    """

    def __init__(self, kernel: str, n: int, inter: int, h: int, dtype, device):
        self.kernel, self.n, self.inter = kernel, n, inter
        self.packed = kernel == "onednn"
        if self.packed:
            self._stage13 = torch.empty(2 * inter, h, dtype=dtype, device=device)
            self._stage2 = torch.empty(h, inter, dtype=dtype, device=device)
            self._w13: list | torch.Tensor = []
            self._w2: list | torch.Tensor = []
        else:
            self._w13 = torch.empty(n, 2 * inter, h, dtype=dtype, device=device)
            self._w2 = torch.empty(n, h, inter, dtype=dtype, device=device)

    def slot(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Destinations (gate [I, H], up [I, H], down [H, I]) for expert i's weights."""
        if self.packed:
            if i != len(self._w13):
                raise RuntimeError(f"experts must be loaded in order: got {i}, expected {len(self._w13)}")
            w13, w2 = self._stage13, self._stage2
        else:
            w13, w2 = self._w13[i], self._w2[i]
        return w13[: self.inter], w13[self.inter :], w2

    def done(self, i: int) -> None:
        """Expert i's three tensors are written."""
        if self.packed:
            self._w13.append(_pack(self._stage13))
            self._w2.append(_pack(self._stage2))

    def put(self, i: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Expert i's weights, already in this kernel's layout (another layout of the same worker
        holds them): packed weights are shared, not copied; stacked ones are copied into row i."""
        if self.packed:
            if i != len(self._w13):
                raise RuntimeError(f"experts must be loaded in order: got {i}, expected {len(self._w13)}")
            self._w13.append(w13)
            self._w2.append(w2)
        else:
            self._w13[i].copy_(w13)
            self._w2[i].copy_(w2)

    def weights(self, i: int):
        """Expert i's finished (w13, w2) in this kernel's layout (views of the stack, or packed)."""
        return self._w13[i], self._w2[i]

    def finish(self):
        if self.packed and len(self._w13) != self.n:
            raise RuntimeError(f"{len(self._w13)} of {self.n} experts loaded")
        self._stage13 = self._stage2 = None
        return self._w13, self._w2


def prepack_experts(kernel: str, w13, w2):
    """Stacked weights in the layout `kernel` reads: per-expert oneDNN-packed lists for "onednn",
    else as is. For weights already in memory (tests, benchmarks); loading uses ExpertStackBuilder.
    """
    if kernel != "onednn":
        return w13, w2
    if isinstance(w13, torch.Tensor):  # stacked: packed copies of its views (callers drop the stack)
        w13, w2 = list(w13), list(w2)
    for ws in (w13, w2):
        for i in range(len(ws)):
            ws[i] = _pack(ws[i])
    return w13, w2


def prepack_dense(kernel: str, w: torch.Tensor | None) -> torch.Tensor | None:
    """One 2-D weight (a shared-expert projection) in the layout `kernel` reads."""
    if kernel != "onednn" or w is None:
        return w
    return _pack(w)


def weight_nbytes(w) -> int:
    """Bytes held by a weight as stored: a tensor, a list of (packed) tensors, or None."""
    if w is None:
        return 0
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return sum(t.numel() * t.element_size() for t in w)


# ---- compute --------------------------------------------------------------------------------------


def _grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w_t, offs=offs)


def _linear_upcast(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T in fp32 with w in low precision, converted a tile of rows at a time.

    x: [n, K] fp32, w: [N, K] bf16/fp16 -> [n, N] fp32.
    """
    rows, cols = w.shape
    step = rows if x.shape[0] >= UPCAST_WHOLE_MIN_ROWS else UPCAST_TILE_ROWS
    buf = torch.empty(min(step, rows) * cols, dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape[0], rows, dtype=torch.float32, device=x.device)
    # The tiles go through oneDNN's fp32 linear where there is one: MKL's sgemm alternating with
    # aten's parallel copy was bimodal here (13 or 65 ms for the T = 1 bench layer, thread pools
    # fighting over 2 cores) and 1.4x slower at T = 128; oneDNN runs on aten's own OpenMP pool.
    onednn = x.device.type == "cpu" and has_onednn()
    for r in range(0, rows, step):
        r2 = min(r + step, rows)
        tile = buf[: (r2 - r) * cols].view(r2 - r, cols)
        tile.copy_(w[r:r2])
        if onednn:
            out[:, r:r2] = torch.ops.mkldnn._linear_pointwise(x, tile, None, "none", [], "")
        else:
            torch.mm(x, tile.t(), out=out[:, r:r2])
    return out


def _linear(kernel: str, x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) for one expert's 2-D weight w in `kernel`'s layout; x: [n, K] -> [n, N]."""
    if kernel == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    if kernel == "upcast" and w.dtype != torch.float32:
        out = _linear_upcast(x, w)
        return out if b is None else out.add_(b.float())
    if b is not None:
        return torch.addmm(b.to(x.dtype), x, w.t())
    return torch.mm(x, w.t())


_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def glu(h: torch.Tensor, fn: ExpertFn = PLAIN) -> torch.Tensor:
    """The gated unit on [n, 2I] gate-then-up projections -> [n, I], in the family's variant."""
    inter = h.shape[1] // 2
    gate, up = h[:, :inter], h[:, inter:]
    if fn.limit is not None:
        gate = gate.clamp(max=fn.limit)
        up = up.clamp(min=-fn.limit, max=fn.limit)
    if fn.style == "gpt_oss":
        return (up + 1) * (gate * torch.sigmoid(gate * fn.alpha))
    return _ACTS[fn.act](gate) * up


def swiglu_experts(
    kernel: str,
    x: torch.Tensor,
    counts: list[int],
    w13,
    w2,
    fn: ExpertFn = PLAIN,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert FFN of every row of x, rows sorted by expert.

    # S = routed rows, E = local experts, H = hidden, I = expert inter dim
    x: [S, H], counts: E ints summing to S, w13: [E, 2I, H] (gate rows then up rows), w2: [E, H, I]
    (for "onednn": lists of E packed [2I, H] / [H, I] weights); biases b13 [E, 2I], b2 [E, H] or
    None. Returns [S, H] in x's dtype, except "upcast", which computes and returns fp32.
    """
    if kernel == "grouped_mm":
        offs = torch.tensor(counts, device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        h = _grouped_mm(x, w13.transpose(1, 2), offs)  # [S, 2I]
        repeats = torch.tensor(counts, device=x.device)
        if b13 is not None:
            h = h + b13.repeat_interleave(repeats, dim=0)
        out = _grouped_mm(glu(h, fn), w2.transpose(1, 2), offs)  # [S, H]
        return out if b2 is None else out + b2.repeat_interleave(repeats, dim=0)
    if kernel == "upcast":
        x = x.float()
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        h = _linear(kernel, x[start : start + n], w13[e], None if b13 is None else b13[e])  # [n, 2I]
        out[start : start + n] = _linear(kernel, glu(h, fn), w2[e], None if b2 is None else b2[e])  # [n, H]
        start += n
    return out


def swiglu_dense(x: torch.Tensor, w13, w2, kernel: str = "loop", fn: ExpertFn = PLAIN) -> torch.Tensor:
    """One SwiGLU FFN (the fused shared experts). x: [N, H], w13: [2I, H], w2: [H, I] in `kernel`'s layout."""
    if kernel == "upcast":
        x = x.float()
    return _linear(kernel, glu(_linear(kernel, x, w13), fn), w2)  # [N, H]
