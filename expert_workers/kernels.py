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
  UPCAST_TILE_BYTES at a time (cache resident) and multiplied there by oneDNN's fp32 linear, for
  CPUs whose bf16 matmul is emulated (AVX2-only: ~1 GFLOP/s against ~180 in fp32). At most one tile
  per call is ever in fp32, so memory stays at the bf16 size.

`moe_experts` / `shared_experts` run the worker's whole expert step (gather the rows, the FFN, scale
by the gate weight, add into the fp32 output) a chunk of CHUNK_BYTES at a time on CPU, so that no
intermediate is large enough to come back from the allocator as fresh, page-faulting memory.

Never a per-token loop. `select_kernel` picks the path from the device, the dtype, the expert size
and the CPU's flags by the measured table AUTO_KERNEL; the measurements are in docs/performance.md.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moe_models.spec import ExpertFn

KERNELS = ("grouped_mm", "loop", "onednn", "upcast")
PLAIN = ExpertFn()  # down(silu(gate(x)) * up(x))
KERNEL_ENV = "MOE_EXPERT_KERNEL"  # overrides "auto" when set (the explicit argument wins)
# upcast converts a weight to fp32 a tile of rows at a time: 8 MiB tiles (2048 rows at H = 1024,
# 1024 at H = 2048) stay in the L3 between the convert and the mm. Measured (2-core EPYC, 32 MiB L3,
# 64 experts top-6, routed part): at H=1024 I=512 T=1/16/128 1.56/16.5/35.9 ms with 4-8 MiB tiles
# against 3.04/28.6/50.4 ms with the former 256-row (1 MiB) tiles; at H=2048 I=1408 6.9/71.8/151 ms
# with 8 MiB against 10.9/107/190 ms with 2 MiB and 9.0/94/185 ms with 32 MiB. Smaller tiles pay
# oneDNN's per-call fixed cost (the plain fp32 tile is re-laid out inside each call) more often.
UPCAST_TILE_BYTES = 8 * 2**20
UPCAST_TILE_ROWS: int | None = None  # fixed rows per tile instead of UPCAST_TILE_BYTES (tests)
# From this many rows of x, convert the whole weight at once instead (None: never). It beat 256-row
# tiles by ~8% at 384 rows; against 8 MiB tiles, which hold any weight up to 8 MiB whole anyway, it
# tied below that size and lost above it (H=2048 I=2048 T=4096, routed: 3626 ms against 3242).
UPCAST_WHOLE_MIN_ROWS: int | None = None
# CPU chunks of moe_experts / shared_experts: a chunk's fp32 [rows, H] result is at most 4 MiB (1024
# rows at H = 1024, 512 at H = 2048). Measured on the 2-core EPYC, 64 experts top-6: routed part,
# 256 to 2048 rows per chunk within ~5% of each other at T = 128-4096 in bf16 and fp32, one
# whole-batch chunk 15-25% slower at T >= 1024 (H=2048 I=1408 bf16 T=4096: 1100 ms at 512 rows,
# 1294 ms whole); shared experts (one FFN over all rows), 512-1024 rows 3-5% faster than 256 and
# than whole (H=1024 I_s=1024 bf16 T=4096: 65 ms at 1024 rows, 69 at 256, 72 whole). Fewer rows
# split the experts of T >= 1024 into smaller GEMMs.
CHUNK_BYTES = 4 * 2**20
CHUNK_MIN_ROWS = 256


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


# The automatic kernel, as data: (device type, compute class) -> ((largest expert size, kernel), ...),
# the first row whose bound holds for the layer's H * I (None: any size) wins; the compute class is
# the storage dtype, bf16 split by whether the CPU has native bf16. Measured with `python -m
# bench.moe_layer --kernels auto,loop,grouped_mm` on the 2-core EPYC with AVX512-BF16 (whole MoE
# layer, see docs/performance.md, "Fine-grained expert kernels (issue 11)"):
# - H * I <= 32768 (the built-in model's 128 x 96, the tiny preset's 256 x 128; 16 experts top-4):
#   grouped_mm, one ATen call per projection with a C++ loop over the experts, beat onednn's Python
#   loop of ~6 ops per expert: 128 x 96 fp32 T=1/16/128 0.92/1.61/2.36 ms against 1.29/2.24/2.95,
#   bf16 1.10/1.77/2.71 against 1.19/2.12/2.95 (1.05-1.4x); 256 x 128 fp32 1.03/2.36/3.34 against
#   1.31/2.52/3.84, bf16 tied.
# - From 256 x 256 to 512 x 128 (65536 elements) the two tie within ~10% either way (grouped_mm
#   ahead at T=1, onednn at T=1024); from 512 x 256 up onednn wins or ties every row (768 x 384
#   fp32 T=16: 5.56 against 8.27 ms; H=2048 I=2048 T=128 fp32 181 against 426 ms, bf16 94 against
#   142) and "loop" never beat both.
# What changes with T inside a kernel is in CHUNK_BYTES and UPCAST_TILE_BYTES. bf16 without native
# bf16 (AVX2-only, or AVX-512 without BF16) is not measured here: "upcast" is picked because there
# oneDNN's bf16 is emulated or absent and aten's bf16 GEMM falls back to ~1 GFLOP/s.
AUTO_KERNEL: dict[tuple[str, str], tuple[tuple[int | None, str], ...]] = {
    ("cpu", "float32"): ((32768, "grouped_mm"), (None, "onednn")),
    ("cpu", "bfloat16"): ((32768, "grouped_mm"), (None, "onednn")),
    ("cpu", "bfloat16-emulated"): ((None, "upcast"),),
    ("cpu", "float16"): ((None, "upcast"),),
}
GPU_GROUPED_MM_MIN_CAPABILITY = (9, 0)  # torch._grouped_mm's CUDA kernel (sm90+); else a loop of mm


def auto_kernel(
    device_type: str,
    dtype: torch.dtype,
    hidden: int | None = None,
    inter: int | None = None,
    *,
    native_bf16: bool = False,
    onednn: bool = False,
    grouped_mm: bool = False,
    cuda_capability: tuple[int, int] | None = None,
) -> str:
    """The automatic kernel for `hidden` x `inter` experts stored in `dtype`, given the machine's
    facts (a pure function of its arguments; select_kernel reads them from this machine). An unknown
    shape (None) takes the unbounded row; a kernel this machine lacks falls back to "loop", as does
    anything AUTO_KERNEL does not name."""
    if device_type == "cuda":
        ok = grouped_mm and cuda_capability is not None and cuda_capability >= GPU_GROUPED_MM_MIN_CAPABILITY
        return "grouped_mm" if ok else "loop"
    compute = str(dtype).removeprefix("torch.")
    if compute == "bfloat16" and not native_bf16:
        compute = "bfloat16-emulated"
    size = None if hidden is None or inter is None else hidden * inter
    for bound, kernel in AUTO_KERNEL.get((device_type, compute), ((None, "loop"),)):
        if bound is None or (size is not None and size <= bound):
            if (kernel == "onednn" and not onednn) or (kernel == "grouped_mm" and not grouped_mm):
                return "loop"
            return kernel
    return "loop"


def select_kernel(
    device: torch.device,
    dtype: torch.dtype,
    override: str | None = None,
    hidden: int | None = None,
    inter: int | None = None,
) -> str:
    """The compute path for `hidden` x `inter` experts (None: not known) stored in `dtype` on `device`.

    `override` (one of KERNELS) wins; None or "auto" reads $MOE_EXPERT_KERNEL, then follows
    AUTO_KERNEL for this machine: CUDA -> grouped_mm (sm90+, else loop); CPU fp32 and native bf16 ->
    grouped_mm for experts of H * I <= 32768, else onednn; CPU bf16 without native bf16, and fp16 ->
    upcast; anything else -> loop.
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
        capability = torch.cuda.get_device_capability(device)
        return auto_kernel("cuda", dtype, grouped_mm=has_grouped_mm(), cuda_capability=capability)
    if device.type != "cpu":
        return auto_kernel(device.type, dtype)
    native = dtype == torch.bfloat16 and cpu_has_native_bf16()
    return auto_kernel(
        "cpu", dtype, hidden, inter, native_bf16=native, onednn=has_onednn(), grouped_mm=has_grouped_mm()
    )


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


def chunk_rows(kernel: str, x: torch.Tensor) -> int:
    """Pairs per chunk of moe_experts / shared_experts for x: [*, H] (see CHUNK_BYTES)."""
    if x.device.type != "cpu" or kernel == "grouped_mm":
        return 1 << 62  # one chunk: a GPU allocator keeps its blocks, and grouped_mm wants them all
    return max(CHUNK_MIN_ROWS, CHUNK_BYTES // (4 * x.shape[1]))


# ---- compute --------------------------------------------------------------------------------------


def _grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w_t, offs=offs)


def upcast_tile_rows(cols: int) -> int:
    """Rows of a [rows, cols] fp32 tile of UPCAST_TILE_BYTES (UPCAST_TILE_ROWS when set)."""
    return UPCAST_TILE_ROWS or max(1, UPCAST_TILE_BYTES // (4 * cols))


def upcast_buffer(device, *weights: torch.Tensor) -> torch.Tensor:
    """Scratch for _linear_upcast's tiles of 2-D weights shaped like `weights`, allocated once per
    call of moe_experts / shared_experts and reused by every expert rather than one per product (a
    fresh multi-MB buffer may come back from the allocator as new pages, a fault per 4 KiB; measured
    in isolation the two tie: H=1024 I=512 routed T=1/16/128 2.31/17.3/34.4 ms against
    2.42/17.3/35.1)."""
    numel = max(w.numel() for w in weights)
    return torch.empty(min(numel, UPCAST_TILE_BYTES // 4), dtype=torch.float32, device=device)


def _linear_upcast(
    x: torch.Tensor, w: torch.Tensor, tile_rows: int | None = None, buf: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ w.T in fp32 with w in low precision, converted a tile of rows at a time.

    x: [n, K] fp32, w: [N, K] bf16/fp16 -> [n, N] fp32. `tile_rows` None: upcast_tile_rows(K) (or
    the whole weight from UPCAST_WHOLE_MIN_ROWS rows of x, when set). `buf`: fp32 scratch for a tile
    (upcast_buffer), allocated here when None or too small.
    """
    rows, cols = w.shape
    if tile_rows is None:
        whole = UPCAST_WHOLE_MIN_ROWS is not None and x.shape[0] >= UPCAST_WHOLE_MIN_ROWS
        tile_rows = rows if whole else upcast_tile_rows(cols)
    if buf is None or buf.numel() < min(tile_rows, rows) * cols:
        buf = torch.empty(min(tile_rows, rows) * cols, dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape[0], rows, dtype=torch.float32, device=x.device)
    # The tiles go through oneDNN's fp32 linear where there is one: MKL's sgemm alternating with
    # aten's parallel copy was bimodal here (13 or 65 ms for the T = 1 bench layer, thread pools
    # fighting over 2 cores) and 1.4x slower at T = 128; oneDNN runs on aten's own OpenMP pool.
    onednn = x.device.type == "cpu" and has_onednn()
    for r in range(0, rows, tile_rows):
        r2 = min(r + tile_rows, rows)
        tile = buf[: (r2 - r) * cols].view(r2 - r, cols)
        tile.copy_(w[r:r2])
        if onednn:
            out[:, r:r2] = torch.ops.mkldnn._linear_pointwise(x, tile, None, "none", [], "")
        else:
            torch.mm(x, tile.t(), out=out[:, r:r2])
    return out


def _linear(kernel: str, x: torch.Tensor, w, b: torch.Tensor | None = None, buf=None) -> torch.Tensor:
    """x @ w.T (+ b) for one expert's 2-D weight w in `kernel`'s layout; x: [n, K] -> [n, N].
    `buf`: upcast's tile scratch (upcast_buffer) or None."""
    if kernel == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    if kernel == "upcast" and w.dtype != torch.float32:
        out = _linear_upcast(x, w, buf=buf)
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
    buf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert FFN of every row of x, rows sorted by expert.

    # S = routed rows, E = local experts, H = hidden, I = expert inter dim
    x: [S, H], counts: E ints summing to S, w13: [E, 2I, H] (gate rows then up rows), w2: [E, H, I]
    (for "onednn": lists of E packed [2I, H] / [H, I] weights); biases b13 [E, 2I], b2 [E, H] or
    None; buf: upcast's tile scratch (upcast_buffer; None: one for this call). Returns [S, H] in x's
    dtype, except "upcast", which computes and returns fp32.
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
        if buf is None and any(counts):
            buf = upcast_buffer(x.device, w13[0], w2[0])
    if len(counts) == 1 and counts[0]:  # one expert (a chunk of moe_experts): no copy into a stacked result
        h = _linear(kernel, x, w13[0], None if b13 is None else b13[0], buf)  # [S, 2I]
        return _linear(kernel, glu(h, fn), w2[0], None if b2 is None else b2[0], buf)  # [S, H]
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        h = _linear(kernel, x[start : start + n], w13[e], None if b13 is None else b13[e], buf)  # [n, 2I]
        out[start : start + n] = _linear(kernel, glu(h, fn), w2[e], None if b2 is None else b2[e], buf)
        start += n
    return out


def expert_chunks(counts: list[int], max_rows: int) -> list[tuple[int, int, list[int]]]:
    """Cut pairs sorted by expert into chunks of at most `max_rows` pairs: whole experts packed
    together in order, an expert with more pairs than that split into even parts of its own.

    Returns [(first pair, first expert, pairs per expert of the chunk)], the experts of a chunk being
    first expert, first expert + 1, ... (a split expert appears in consecutive chunks); no chunk is
    empty.
    """
    chunks: list[tuple[int, int, list[int]]] = []
    start = e0 = 0
    part: list[int] = []
    rows = 0  # sum(part), kept as it grows: a decode step packs all of 256 experts into one chunk
    for e, n in enumerate(counts):
        if part and rows + n > max_rows:
            if rows:
                chunks.append((start, e0, part))
            start, part, rows = start + rows, [], 0
        if not part:
            e0 = e
        if n > max_rows:  # alone, in even parts
            pieces = -(-n // max_rows)
            for i in range(pieces):
                size = n * (i + 1) // pieces - n * i // pieces
                chunks.append((start, e, [size]))
                start += size
            continue
        part.append(n)
        rows += n
    if rows:
        chunks.append((start, e0, part))
    return chunks


def moe_experts(
    kernel: str,
    x: torch.Tensor,
    pair_rows: torch.Tensor,
    pair_weights: torch.Tensor,
    counts: list[int],
    w13,
    w2,
    out: torch.Tensor,
    fn: ExpertFn = PLAIN,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    max_rows: int | None = None,
) -> None:
    """out[row] += weight * expert(x[row]) for every (row, expert, weight) pair, a chunk of pairs at a time.

    # N = token rows, P = pairs, E = local experts, H = hidden, I = expert inter dim
    x: [N, H] in the weights' dtype; pair_rows: int64 [P] rows of x, pairs sorted by expert;
    pair_weights: fp32 [P]; counts: E ints summing to P; w13/w2/b13/b2 as in swiglu_experts;
    out: fp32 [N, H], accumulated into. With `fn.scale_input` (Llama 4) the weight scales the
    expert's input, in x's dtype, instead of its output.

    Chunks of at most `max_rows` pairs (None: `chunk_rows(kernel, x)`) go through gather ->
    swiglu_experts -> scale -> index_add_, so every intermediate is a few MB that the allocator
    reuses call after call: a whole-batch gather at T = 4096 is [24576, H], and fresh tensors that
    size cost a page fault per 4 KiB page here (~1 us each: 14 ms to fill 48 MB fresh, 1.7 ms
    reused), which made the gather/scatter a quarter of the layer's time.
    """
    if not counts or not sum(counts):
        return
    if max_rows is None:
        max_rows = chunk_rows(kernel, x)
    buf = upcast_buffer(x.device, w13[0], w2[0]) if kernel == "upcast" else None
    for start, e0, part in expert_chunks(counts, max_rows):
        stop, e1 = start + sum(part), e0 + len(part)
        rows = pair_rows[start:stop]
        weights = pair_weights[start:stop, None]  # [n, 1]
        xc = x.index_select(0, rows)  # [n, H]
        if fn.scale_input:
            xc = xc * weights.to(xc.dtype)
        yc = swiglu_experts(
            kernel,
            xc,
            part,
            w13[e0:e1],
            w2[e0:e1],
            fn,
            None if b13 is None else b13[e0:e1],
            None if b2 is None else b2[e0:e1],
            buf,
        )  # [n, H]
        out.index_add_(0, rows, yc.float() if fn.scale_input else yc * weights)  # bf16 * fp32 -> fp32


def shared_experts(
    kernel: str,
    x: torch.Tensor,
    rows: torch.Tensor,
    row_weights: torch.Tensor | None,
    w13,
    w2,
    out: torch.Tensor,
    fn: ExpertFn = PLAIN,
    max_rows: int | None = None,
) -> None:
    """out[rows] += row_weights * ffn(x[rows]) for the fused shared experts, a chunk of rows at a time.

    # N = token rows, NS = rows given the shared experts, H = hidden
    x: [N, H]; rows: int64 [NS]; row_weights: fp32 [NS] or None (1); w13 [2I_s, H], w2 [H, I_s] in
    `kernel`'s layout; out: fp32 [N, H]. Chunked like moe_experts, for the same reason.
    """
    if max_rows is None:
        max_rows = chunk_rows(kernel, x)
    buf = upcast_buffer(x.device, w13, w2) if kernel == "upcast" else None
    for start in range(0, rows.numel(), max_rows):
        rc = rows[start : start + max_rows]
        yc = swiglu_dense(x.index_select(0, rc), w13, w2, kernel, fn, buf)  # [n, H]
        if row_weights is None:
            out.index_add_(0, rc, yc.float())
        else:
            out.index_add_(0, rc, yc * row_weights[start : start + max_rows, None])


def swiglu_dense(
    x: torch.Tensor, w13, w2, kernel: str = "loop", fn: ExpertFn = PLAIN, buf: torch.Tensor | None = None
) -> torch.Tensor:
    """One SwiGLU FFN (the fused shared experts). x: [N, H], w13: [2I, H], w2: [H, I] in `kernel`'s
    layout; buf as in swiglu_experts."""
    if kernel == "upcast":
        x = x.float()
        buf = upcast_buffer(x.device, w13, w2) if buf is None else buf
    return _linear(kernel, glu(_linear(kernel, x, w13, None, buf), fn), w2, None, buf)  # [N, H]
