"""FP8 checkpoints on a CPU worker: dequantize at load, or keep FP8 and dequantize per tile?

One worker's slice of a MoE layer: E local experts of DeepSeek-V2-Lite's shape (hidden 2048, expert
inter 1408), weights block-quantized to float8_e4m3fn with 128x128 scales as DeepSeek-V3 publishes
them; every expert gets `n` rows (`--rows`, the per-expert batch: 1-8 at decode). The same FP8
weights are computed by each storage choice, in one run:

- `fp32 at load`: dequantized once to fp32, the engine's fp32 kernel (oneDNN-packed on CPU);
- `bf16 at load`: dequantized once to bf16, the engine's bf16 kernel for this CPU (oneDNN native bf16
  where the CPU has it) and the forced `upcast` path (bf16 storage, fp32 compute a tile at a time:
  what CPUs without native bf16, e.g. AVX2-only EPYC, get);
- `fp8 tiles`: FP8 kept in memory; each projection converted to fp32 a tile of 256 rows at a time,
  multiplied by its block scales and fed to oneDNN's fp32 linear, with torch's own float8 -> fp32
  conversion (`torch`) and with a bit trick that moves the e4m3 bits into a bf16 (`bits`: sign,
  exponent and mantissa shifted in int16, the missing 2^120 folded into the scales; exact,
  subnormals included).

Each row prints ms per call, its ratio to `fp32 at load`, the bytes the weights take and the max
relative error against an fp64 product of the dequantized weights. Times are the minimum over
repeats, the paths taking turns call by call (the machine may be shared); nothing asserts.

    python -m bench.fp8_experts --rows 1,8,64,256 --experts 8 [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from bench.moe_layer import cpu_info, time_ms
from expert_workers.kernels import has_onednn, prepack_experts, select_kernel, swiglu_experts
from moe_models.quantization import dequantize_fp8_blocks, quantize_fp8_blocks

H, INTER = 2048, 1408
BLOCK = 128
TILE_ROWS = 256  # as the upcast kernel: a [256, 2048] fp32 tile (2 MiB) stays in cache


# ---- the FP8-storage candidate ------------------------------------------------------------------


def convert_torch(dst: torch.Tensor, q: torch.Tensor, scratch: torch.Tensor) -> None:
    dst.copy_(q)


def convert_bits(dst: torch.Tensor, q: torch.Tensor, scratch: torch.Tensor) -> None:
    """e4m3 bits -> a bf16 worth 2^-120 of the value: int8 sign-extended to int16, shifted left by 4
    (mantissa 3 -> 7 bits, exponent field 4 -> 8 bits), sign and the 7 value bits kept (0x87F0)."""
    t = scratch[: q.numel()].view(q.shape)
    t.copy_(q.view(torch.int8))
    t.bitwise_left_shift_(4).bitwise_and_(0x87F0 - 0x10000)  # 0x87F0 as a signed int16
    dst.copy_(t.view(torch.bfloat16))


class Fp8Linear:
    """One [N, K] FP8 weight with [N/128, K/128] scales, computed a tile of rows at a time in fp32
    (N, K whole blocks, as in this bench's shapes)."""

    def __init__(self, q: torch.Tensor, scale_inv: torch.Tensor, convert):
        self.q, self.convert = q, convert
        # the bit trick's bf16 is 2^-120 of the value: fold 2^120 into the scales once
        self.scale = scale_inv * (2.0**120 if convert is convert_bits else 1.0)

    def __call__(self, x: torch.Tensor, buf: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        rows, cols = self.q.shape
        out = torch.empty(x.shape[0], rows)
        for r in range(0, rows, TILE_ROWS):
            r2 = min(r + TILE_ROWS, rows)
            tile = buf[: (r2 - r) * cols].view(r2 - r, cols)
            self.convert(tile, self.q[r:r2], scratch)
            blocks = tile.view((r2 - r) // BLOCK, BLOCK, cols // BLOCK, BLOCK)
            blocks.mul_(self.scale[r // BLOCK : r2 // BLOCK, None, :, None])
            out[:, r:r2] = torch.ops.mkldnn._linear_pointwise(x, tile, None, "none", [], "")
        return out


def swiglu_fp8(x: torch.Tensor, counts: list[int], experts, buf, scratch) -> torch.Tensor:
    """Same contract as kernels.swiglu_experts, FP8 storage: experts = [(w13, w2) Fp8Linear]."""
    out = torch.empty_like(x)
    start = 0
    for (w13, w2), n in zip(experts, counts, strict=True):
        if n == 0:
            continue
        h = w13(x[start : start + n], buf, scratch)  # [n, 2I]
        h = F.silu(h[:, :INTER]) * h[:, INTER:]  # [n, I]
        out[start : start + n] = w2(h, buf, scratch)  # [n, H]
        start += n
    return out


# ---- bench ---------------------------------------------------------------------------------------


def build(num_experts: int):
    """FP8 (q, scale_inv) of each expert's w13 [2I, H] and w2 [H, I]."""
    torch.manual_seed(0)
    experts = []
    for _ in range(num_experts):
        w13, w2 = torch.randn(2 * INTER, H) * 0.02, torch.randn(H, INTER) * 0.02
        experts.append((quantize_fp8_blocks(w13), quantize_fp8_blocks(w2)))
    return experts


def run(args) -> list[tuple]:
    if not has_onednn():
        sys.exit("this bench times oneDNN's fp32 linear; this torch has no oneDNN")
    experts = build(args.experts)
    rows_list = [int(r) for r in args.rows.split(",")]
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    deq = [tuple(dequantize_fp8_blocks(q, s) for q, s in pair) for pair in experts]
    load_s = (time.perf_counter() - t0) / args.experts
    w13_32 = torch.stack([a for a, _ in deq])
    w2_32 = torch.stack([b for _, b in deq])
    del deq
    paths = {}
    k32 = select_kernel(cpu, torch.float32)
    paths["fp32 at load"] = (k32, torch.float32, prepack_experts(k32, w13_32, w2_32))
    kb = select_kernel(cpu, torch.bfloat16)
    w13_b, w2_b = w13_32.bfloat16(), w2_32.bfloat16()
    paths["bf16 at load"] = (kb, torch.bfloat16, prepack_experts(kb, w13_b, w2_b))
    if kb != "upcast":
        paths["bf16 at load "] = ("upcast", torch.bfloat16, (w13_b, w2_b))
    buf = torch.empty(TILE_ROWS * max(H, INTER))
    scratch = torch.empty(TILE_ROWS * max(H, INTER), dtype=torch.int16)
    for name, convert in (("torch", convert_torch), ("bits", convert_bits)):
        fp8 = [(Fp8Linear(*a, convert), Fp8Linear(*b, convert)) for a, b in experts]
        paths[f"fp8 tiles ({name})"] = (name, torch.float8_e4m3fn, fp8)
    fp8_bytes = sum(q.numel() + s.numel() * 4 for pair in experts for q, s in pair)

    results = []
    for n in rows_list:
        counts = [n] * args.experts
        x = torch.randn(n * args.experts, H)
        exact = torch.cat(
            [
                (lambda h: (F.silu(h[:, :INTER]) * h[:, INTER:]) @ w2_32[e].double().t())(
                    x[e * n : (e + 1) * n].double() @ w13_32[e].double().t()
                )
                for e in range(args.experts)
            ]
        )
        calls = {}
        for label, (kernel, dtype, weights) in paths.items():
            if dtype == torch.float8_e4m3fn:
                fn = lambda x=x, c=counts, w=weights: swiglu_fp8(x, c, w, buf, scratch)  # noqa: E731
                nbytes = fp8_bytes
            else:
                xs = x.to(dtype)
                fn = lambda xs=xs, c=counts, k=kernel, w=weights: swiglu_experts(k, xs, c, *w)  # noqa: E731
                nbytes = (w13_32.numel() + w2_32.numel()) * dtype.itemsize
            calls[label] = (kernel, fn, nbytes)
        # Paths take turns, one call each per round, so a burst of load elsewhere on a shared machine
        # hits them all alike; the minimum per path is kept.
        best = dict.fromkeys(calls, float("inf"))
        with torch.inference_mode():
            for fn in (c[1] for c in calls.values()):
                fn()  # warm-up
            for _ in range(args.reps):
                for label, (_, fn, _) in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    best[label] = min(best[label], (time.perf_counter() - t0) * 1e3)
        base = best["fp32 at load"]
        for label, (kernel, fn, nbytes) in calls.items():
            with torch.inference_mode():
                got = fn().double()
            err = ((got - exact).abs().max() / exact.abs().max()).item()
            results.append((n, label.strip(), kernel, best[label], base / best[label], nbytes / 1e6, err))
            print(f"  n={n:4d} {label.strip():18s} {kernel:8s} {best[label]:8.2f} ms", flush=True)
    return results, load_s


def probes() -> dict[str, float]:
    """Conversion throughput to fp32, in G elements/s, of one [256, 2048] tile."""
    q = torch.randn(TILE_ROWS, H).to(torch.float8_e4m3fn)
    dst = torch.empty(TILE_ROWS, H)
    scratch = torch.empty(TILE_ROWS * H, dtype=torch.int16)
    bf = q.float().bfloat16()
    out = {}
    for name, fn in (
        ("fp8 (torch)", lambda: convert_torch(dst, q, scratch)),
        ("fp8 (bits)", lambda: convert_bits(dst, q, scratch)),
        ("bf16", lambda: dst.copy_(bf)),
    ):
        out[name] = q.numel() / time_ms(fn, 20) / 1e6
    convert_bits(dst, q, scratch)
    assert torch.equal(dst * 2.0**120, q.float()), "bit trick is not exact"
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,64,256", help="comma-separated rows per expert")
    p.add_argument("--experts", type=int, default=8, help="local experts in the slice")
    p.add_argument("--reps", type=int, default=10, help="timed repeats (the minimum is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    conv = probes()
    results, load_s = run(args)
    model, flags = cpu_info()
    print()
    print("command: python -m bench.fp8_experts " + " ".join(sys.argv[1:]))
    print(f"cpu: {model} ({os.cpu_count()} logical cpus, torch threads {torch.get_num_threads()})")
    print(f"flags: {flags}")
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print("to fp32, G elements/s: " + ", ".join(f"{k} {v:.2f}" for k, v in conv.items()))
    print(f"dequantize at load (fp8 -> fp32, whole tensors): {load_s * 1e3:.0f} ms per expert")
    print()
    head = "| rows/expert | storage | kernel | ms | x vs fp32 at load | weights MB | max rel err |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for n, label, kernel, ms, ratio, mb, err in results:
        print(f"| {n} | {label} | {kernel} | {ms:.2f} | {ratio:.2f} | {mb:.0f} | {err:.1e} |")


if __name__ == "__main__":
    main()
