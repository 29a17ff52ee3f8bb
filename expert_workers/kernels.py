"""Grouped SwiGLU over all of a worker's local experts (stage 4's arithmetic).

Rows arrive sorted by local expert with `counts[e]` rows for expert e; one call computes
`down(silu(gate(x)) * up(x))` for every row with its own expert's weights. Two ways to do it:

- "grouped_mm": one `torch._grouped_mm` per projection over all experts (a single kernel launch;
  on CUDA this is the fastest path, on CPU it loops over groups inside ATen);
- "loop": one `torch.mm` per expert that received rows, over a contiguous slice; never per token.

`select_kernel` picks by device (see docs/performance.md for the measurements behind the choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("grouped_mm", "loop")


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm") or hasattr(F, "grouped_mm")


def select_kernel(device: torch.device, dtype: torch.dtype, override: str | None = None) -> str:
    """The kernel for weights of `dtype` on `device`; `override` (one of KERNELS) wins."""
    if override not in (None, "auto"):
        if override not in KERNELS:
            raise ValueError(f"unknown expert kernel {override!r}; choose one of {KERNELS} or 'auto'")
        if override == "grouped_mm" and not has_grouped_mm():
            raise ValueError("expert kernel 'grouped_mm' needs torch._grouped_mm, which this torch lacks")
        return override
    if device.type == "cuda" and has_grouped_mm() and torch.cuda.get_device_capability(device) >= (9, 0):
        return "grouped_mm"
    return "loop"


def _grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w_t, offs=offs)


def swiglu_experts(
    kernel: str, x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Expert FFN of every row of x, rows sorted by expert.

    # S = routed rows, E = local experts, H = hidden, I = expert inter dim
    x: [S, H], counts: E ints summing to S, w13: [E, 2I, H] (gate rows then up rows), w2: [E, H, I].
    Returns [S, H] in x's dtype.
    """
    inter = w2.shape[-1]
    if kernel == "grouped_mm":
        offs = torch.tensor(counts, device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        h = _grouped_mm(x, w13.transpose(1, 2), offs)  # [S, 2I]
        h = F.silu(h[:, :inter]) * h[:, inter:]  # [S, I]
        return _grouped_mm(h, w2.transpose(1, 2), offs)  # [S, H]
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe = x[start : start + n]
        h = torch.mm(xe, w13[e].t())  # [n, 2I]
        h = F.silu(h[:, :inter]) * h[:, inter:]
        torch.mm(h, w2[e].t(), out=out[start : start + n])
        start += n
    return out


def swiglu_dense(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU FFN (the fused shared experts). x: [N, H], w13: [2I, H], w2: [H, I]."""
    inter = w2.shape[-1]
    h = x @ w13.t()
    return (F.silu(h[:, :inter]) * h[:, inter:]) @ w2.t()
