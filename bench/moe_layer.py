"""One DeepSeek-V2-Lite-shaped MoE layer: `Engine.moe_forward` against transformers' own MoE block.

Shape: hidden 2048, expert inter 1408, 64 routed experts, top-6 greedy softmax gating, 2 shared
experts (fused, inter 2816); random weights built locally once and cached as a checkpoint. The same
weights are timed through our engine (the automatic expert kernel plus any forced with --kernels)
and through `model.model.layers[0].mlp` with `experts_implementation` "eager" and "grouped_mm", in
one run, and checked for numerical agreement. Achieved GFLOP/s (FLOPs of the experts the tokens
hit) and GB/s (distinct expert bytes touched) are printed next to a matmul and a copy probe measured
in the same run. Times are the minimum over repeats (this machine may be shared); nothing asserts.

    python -m bench.moe_layer --tokens 1,8,128,1024,4096 --dtypes float32,bfloat16 --kernels auto,upcast
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

H, INTER, E, K, N_SHARED = 2048, 1408, 64, 6, 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CACHE = Path.home() / ".cache" / "moe-serving" / "bench" / "deepseek-v2-lite-layer"


@dataclass
class Row:
    tokens: int
    dtype: str
    kernel: str
    ours_ms: float
    eager_ms: float
    grouped_ms: float
    fp32_best_ms: float | None
    gflops: float
    gbps: float
    rel_err: float


def build_checkpoint(path: Path) -> Path:
    """A one-layer DeepSeek-V2-Lite-shaped model with random weights, saved once (fp32)."""
    if (path / "config.json").exists():
        return path
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    cfg = DeepseekV2Config(
        vocab_size=256,
        hidden_size=H,
        intermediate_size=4 * H,
        moe_intermediate_size=INTER,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_shared_experts=N_SHARED,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        num_hidden_layers=1,
        first_k_dense_replace=0,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # the HF init leaves the gate at zero: every score tied
            p.normal_(0.0, 0.02)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


def time_ms(fn, reps: int) -> float:
    """Minimum wall time of `reps` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def probes(quick: bool) -> dict[str, float]:
    """Measured peaks on this machine: large fp32/bf16 matmul GFLOP/s and large-copy GB/s."""
    out = {}
    n = 2048
    for name, dt in DTYPES.items():
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        out[f"matmul_{name}_gflops"] = 2 * n**3 / time_ms(lambda a=a, b=b: a @ b, 3 if quick else 5) / 1e6
    src = torch.ones(256 * 2**20 // 4)  # 256 MiB, far above the caches
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 3 if quick else 5)
    out["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6  # read + write
    return out


def cpu_info() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    keep = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")
    return model, " ".join(f for f in flags.split() if f in keep)


def reps_for(tokens: int, quick: bool) -> int:
    if tokens >= 1024:
        return 1 if quick else 2
    return 3 if quick else (10 if tokens <= 8 else 5)


def expert_stats(gate_w: torch.Tensor, x: torch.Tensor, elsize: int) -> tuple[float, float]:
    """(FLOPs, bytes of expert weights touched) of one layer call on x: [T, H]."""
    topk_ids = (x.float() @ gate_w.float().t()).topk(K, dim=-1).indices  # [T, K]
    hit = topk_ids.unique().numel()
    t = x.shape[0]
    flops = t * K * 3 * 2 * H * INTER + t * 3 * 2 * H * INTER * N_SHARED
    nbytes = (hit * 3 * H * INTER + 3 * H * INTER * N_SHARED) * elsize
    return flops, nbytes


def run(args) -> tuple[list[Row], dict[str, float]]:
    from transformers import AutoModelForCausalLM

    from router_service import Engine

    ckpt = build_checkpoint(Path(args.cache_dir))
    tokens = [int(t) for t in args.tokens.split(",")]
    dtypes = args.dtypes.split(",")
    kernels = args.kernels.split(",")
    peaks = probes(args.quick)
    torch.manual_seed(1)
    inputs = {t: torch.randn(t, H) for t in tokens}
    rows: list[Row] = []
    fp32_best: dict[int, float] = {}
    # fp32 first: its transformers times are the baseline for the bf16-storage rows.
    for name in sorted(dtypes, key=lambda d: d != "float32"):
        dt = DTYPES[name]
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dt, experts_implementation="eager")
        mlp = hf.model.layers[0].mlp.eval()
        gate_w = mlp.gate.weight.detach()
        hf_times: dict[tuple[int, str], float] = {}
        refs: dict[int, torch.Tensor] = {}
        for impl in ("eager", "grouped_mm"):
            hf.set_experts_implementation(impl)
            for t in tokens:
                x = inputs[t].to(dt)
                with torch.inference_mode():
                    hf_times[t, impl] = time_ms(lambda x=x, mlp=mlp: mlp(x), reps_for(t, args.quick))
                    if impl == "eager":
                        refs[t] = mlp(x).float()
                print(
                    f"  transformers {impl:10s} {name:8s} T={t:5d}: {hf_times[t, impl]:9.2f} ms", flush=True
                )
        del hf, mlp
        if name == "float32":
            fp32_best = {t: min(hf_times[t, "eager"], hf_times[t, "grouped_mm"]) for t in tokens}
        for kernel in kernels:
            if kernel == "upcast" and name == "float32":
                continue  # fp32 storage has nothing to upcast: that is the plain loop
            engine = Engine.from_pretrained(
                ckpt, num_workers=args.workers, dtype=name, device="cpu", expert_kernel=kernel
            )
            chosen = engine.cluster_state()["workers"][0].get("kernel", kernel)
            for t in tokens:
                x = inputs[t].to(dt)
                with torch.inference_mode():
                    ms = time_ms(lambda x=x, engine=engine: engine.moe_forward(0, x), reps_for(t, args.quick))
                    out = engine.moe_forward(0, x).float()
                ref = refs[t]
                rel = ((out - ref).abs().max() / ref.abs().max()).item()
                flops, nbytes = expert_stats(gate_w, x, dt.itemsize)
                rows.append(
                    Row(
                        t,
                        name,
                        chosen if kernel == "auto" else kernel,
                        ms,
                        hf_times[t, "eager"],
                        hf_times[t, "grouped_mm"],
                        fp32_best.get(t) if name != "float32" else None,
                        flops / ms / 1e6,
                        nbytes / ms / 1e6,
                        rel,
                    )
                )
                print(f"  ours {rows[-1].kernel:10s} {name:8s} T={t:5d}: {ms:9.2f} ms", flush=True)
            engine.shutdown()
    return rows, peaks


def print_report(rows: list[Row], peaks: dict[str, float]) -> None:
    model, flags = cpu_info()
    print()
    print("command: python -m bench.moe_layer " + " ".join(sys.argv[1:]))
    print(f"cpu: {model} ({os.cpu_count()} logical cpus, torch threads {torch.get_num_threads()})")
    print(f"flags: {flags}")
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(
        "peaks: matmul fp32 {matmul_float32_gflops:.0f} GFLOP/s, bf16 {matmul_bfloat16_gflops:.0f} GFLOP/s, "
        "copy {copy_gbps:.1f} GB/s".format(**peaks)
    )
    print()
    head = "| T | dtype | kernel | ours ms | hf eager ms | hf grouped_mm ms | x vs hf best | x vs hf fp32 best | GFLOP/s | GB/s | max rel err |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        best = min(r.eager_ms, r.grouped_ms)
        vs32 = f"{r.fp32_best_ms / r.ours_ms:.2f}" if r.fp32_best_ms else "-"
        print(
            f"| {r.tokens} | {r.dtype} | {r.kernel} | {r.ours_ms:.2f} | {r.eager_ms:.2f} | {r.grouped_ms:.2f} "
            f"| {best / r.ours_ms:.2f} | {vs32} | {r.gflops:.0f} | {r.gbps:.1f} | {r.rel_err:.1e} |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,128,1024,4096", help="comma-separated T values")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    p.add_argument(
        "--kernels",
        default="auto,upcast",
        help="our expert kernels to time ('auto' = what the engine picks; 'upcast' is the path CPUs "
        "without native bf16 get; fp32 ignores it)",
    )
    p.add_argument("--workers", type=int, default=1, help="expert workers (in-process)")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--cache-dir", default=str(CACHE), help="where the random checkpoint is kept")
    args = p.parse_args(argv)
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {list(DTYPES)}")
    rows, peaks = run(args)
    print_report(rows, peaks)


if __name__ == "__main__":
    main()
