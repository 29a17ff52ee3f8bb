"""One DeepSeekMoE-shaped layer: `Engine.moe_forward` against transformers' own MoE block, over shapes.

Default: the DeepSeek-V2-Lite layer (hidden 2048, expert inter 1408, 64 routed experts, top-6 greedy
softmax gating, 2 shared experts fused to inter 2816). `--shape sweep` runs the fine-grained expert
sizes of issue 11 (I = 256, 512, 768, 1408, 2048 with H = 1024, 2048) at the same expert count and
top-k (`--experts`, `--topk`, `--shared` change them); `--shape 1024x512,2048x1408` picks shapes.
Random weights are built locally once per shape and cached as a checkpoint (bf16 on disk, so the
sweep's ten shapes take ~6 GB; fp32 runs load them widened, which changes no timing).

For every shape, dtype and token count T the same weights and inputs go through our engine (the
automatic expert kernel plus any forced with --kernels) and through `model.model.layers[0].mlp`
with every experts implementation transformers registers that runs here (`eager` plus
`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`: grouped_mm, batched_mm; the CUDA-only ones
are reported as skipped), in one run; "hf best" is the fastest of them. Each row prints GFLOP/s (of
the experts the tokens hit) and GB/s (distinct expert weight bytes touched per call) against a
matmul peak probe and a memory read probe measured in the same run, and the resource that bounds
it. Times are the minimum over repeats (this machine may be shared), the implementations taking turns
within each round of repeats, with a 128 MiB buffer written between timed calls so that no call finds
its weights in cache from the one before; nothing asserts. On a CPU without native bf16 (AVX2-only,
or AVX-512 without BF16) transformers' bf16 is not timed (its GEMM runs at ~1 GFLOP/s there) and
the bf16 rows compare with its fp32; this machine can play such a CPU with
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`.

    python -m bench.moe_layer --tokens 1,8,128,1024,4096 --dtypes float32,bfloat16 --kernels auto,upcast
    python -m bench.moe_layer --shape sweep
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expert_workers.kernels import cpu_has_native_bf16, has_onednn
from router_service import Engine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CACHE = Path.home() / ".cache" / "moe-serving" / "bench"
SWEEP = [(h, i) for h in (1024, 2048) for i in (256, 512, 768, 1408, 2048)]  # issue 11's expert sizes
DEFAULT_SHAPE = "2048x1408"  # DeepSeek-V2-Lite
BATCHED_MM_MAX_BYTES = 2**30  # batched_mm gathers each pair's weights: [T*K, 3*H*I]; above 1 GiB skip it
INPUTS = 3  # distinct input batches per T (at most one per repeat), rotated between repeats
FLUSH_BYTES = 128 * 2**20  # written between timed calls: 4x this machine's 32 MiB L3


@dataclass(frozen=True)
class Shape:
    """One MoE layer: hidden H, expert inter I, routed experts, top-k, shared experts (each of size I)."""

    hidden: int
    inter: int
    experts: int
    topk: int
    shared: int

    @property
    def name(self) -> str:
        return f"{self.hidden}x{self.inter}"

    def cache_name(self) -> str:
        return f"moe-layer-h{self.hidden}-i{self.inter}-e{self.experts}-k{self.topk}-s{self.shared}"


@dataclass
class Row:
    shape: Shape
    tokens: int
    dtype: str
    kernel: str
    ours_ms: float
    hf_ms: dict[str, float | None]  # implementation -> ms (None: skipped at this T)
    fp32_best_ms: float | None  # transformers' best fp32 at this T (bf16 rows only)
    flops: float
    nbytes: float
    rel_err: float
    compute_dtype: str = field(default="")

    @property
    def hf_best(self) -> tuple[str, float]:
        """transformers' fastest implementation here, ("-", nan) when none was timed."""
        return best_of(self.hf_ms)

    @property
    def gflops(self) -> float:
        return self.flops / self.ours_ms / 1e6

    @property
    def gbps(self) -> float:
        return self.nbytes / self.ours_ms / 1e6


def best_of(ms: dict[str, float | None]) -> tuple[str, float]:
    timed = [(k, v) for k, v in ms.items() if v is not None]
    return min(timed, key=lambda kv: kv[1]) if timed else ("-", float("nan"))


def parse_shapes(text: str, experts: int, topk: int, shared: int) -> list[Shape]:
    pairs = SWEEP if text == "sweep" else []
    if text != "sweep":
        for part in text.split(","):
            h, _, i = part.strip().partition("x")
            if not (h.isdigit() and i.isdigit()):
                raise ValueError(f"shape {part!r} is not HxI (e.g. 1024x512) or 'sweep'")
            pairs.append((int(h), int(i)))
    return [Shape(h, i, experts, topk, shared) for h, i in pairs]


def build_checkpoint(shape: Shape, root: Path) -> Path:
    """A one-layer DeepSeek-V2-shaped model of `shape` with random weights, saved once (bf16)."""
    path = root / shape.cache_name()
    if (path / "config.json").exists():
        return path
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    h = shape.hidden
    cfg = DeepseekV2Config(
        vocab_size=256,
        hidden_size=h,
        intermediate_size=4 * h,
        moe_intermediate_size=shape.inter,
        n_routed_experts=shape.experts,
        num_experts_per_tok=shape.topk,
        n_shared_experts=shape.shared,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        num_hidden_layers=1,
        first_k_dense_replace=0,
        num_attention_heads=h // 128,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    )
    print(f"building {path} ...", flush=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # (the buffers, rotary frequencies, are not saved: loading rebuilds them)
        for p in model.parameters():  # the HF init would leave the gate at zero: every score tied
            p.normal_(0.0, 0.02)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


def probes(quick: bool) -> dict[str, float]:
    """Measured peaks on this machine: the best of `a @ b` and oneDNN's prepacked linear at 2048^3
    per dtype (GFLOP/s; bf16 at 512^3 without native bf16), a copy (read + write) and a read-only
    pass (sum) over 256 MiB (GB/s)."""
    out = {}
    reps = 3 if quick else 5
    for name, dt in DTYPES.items():
        emulated = dt == torch.bfloat16 and not cpu_has_native_bf16()
        n = 512 if emulated else 2048  # ~1 GFLOP/s: 2048^3 would take a minute
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        best = time_interleaved({0: lambda _, a=a, b=b: a @ b}, [None], reps)[0]
        if not emulated and has_onednn():
            packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
            fn = lambda _, a=a, w=packed: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")  # noqa: E731
            best = min(best, time_interleaved({0: fn}, [None], reps)[0])
        out[f"matmul_{name}_gflops"] = 2 * n**3 / best / 1e6
    src = torch.ones(256 * 2**20 // 4)  # 256 MiB, far above the caches
    dst = torch.empty_like(src)
    ms = time_interleaved({"copy": lambda _: dst.copy_(src), "read": lambda _: src.sum()}, [None], reps)
    out["copy_gbps"] = 2 * src.numel() * 4 / ms["copy"] / 1e6
    out["read_gbps"] = src.numel() * 4 / ms["read"] / 1e6
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
    return 3 if quick else (10 if tokens <= 16 else 5)


def expert_stats(shape: Shape, gate_w: torch.Tensor, x: torch.Tensor, elsize: int) -> tuple[float, float]:
    """(FLOPs, bytes of expert weights touched) of one layer call on x: [T, H]."""
    topk_ids = (x.float() @ gate_w.float().t()).topk(shape.topk, dim=-1).indices  # [T, K]
    hit = topk_ids.unique().numel()
    t, hi = x.shape[0], shape.hidden * shape.inter
    flops = t * (shape.topk + shape.shared) * 3 * 2 * hi
    nbytes = (hit + shape.shared) * 3 * hi * elsize
    return flops, nbytes


def hf_implementations(mlp, x: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    """transformers' experts implementations that run here on x, and why the others do not."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ok, skipped = [], {}
    for impl in ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]:
        mlp.experts.config._experts_implementation = impl
        try:
            with torch.inference_mode():
                mlp(x)
        except (ImportError, ValueError, RuntimeError, NotImplementedError) as e:  # CUDA-only kernels
            skipped[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
            continue
        ok.append(impl)
    mlp.experts.config._experts_implementation = "eager"
    return ok, skipped


def time_interleaved(fns: dict, inputs: list, reps: int, flush: torch.Tensor | None = None) -> dict:
    """Minimum wall time (ms) of each of `fns` over `reps` rounds, the functions taking turns within
    a round (so a disturbance from another job hits them alike) and the inputs rotating between
    rounds, after a warm-up call on every input: oneDNN builds (JIT-compiles) a primitive for every
    new GEMM shape, ~0.3-0.9 ms each here, and each input gives every expert a new row count; a
    server sees the same counts again and again and keeps them in its primitive cache. `flush` is
    written before every timed call, so that no call finds the weights the previous one read
    (transformers' implementations share theirs) in cache, as in a model, where every other layer's
    weights pass through the cache between two calls."""
    for fn in fns.values():
        for x in inputs:
            fn(x)
    best = dict.fromkeys(fns, float("inf"))
    for r in range(reps):
        x = inputs[r % len(inputs)]
        for key, fn in fns.items():
            if flush is not None:
                flush.add_(1)
            t0 = time.perf_counter()
            fn(x)
            best[key] = min(best[key], time.perf_counter() - t0)
    return {key: ms * 1e3 for key, ms in best.items()}


def hf_call(mlp, impl: str):
    """transformers' MoE block with experts implementation `impl`, as a function of x."""

    def call(x):
        mlp.experts.config._experts_implementation = impl
        return mlp(x)

    return call


def run_shape(shape: Shape, args, tokens: list[int], notes: list[str]) -> list[Row]:
    """Every dtype and T of one shape: transformers' implementations and our kernels, interleaved."""
    from transformers import AutoModelForCausalLM

    ckpt = build_checkpoint(shape, Path(args.cache_dir))
    flush = torch.zeros(FLUSH_BYTES // 4)
    torch.manual_seed(1)
    inputs = {
        t: [torch.randn(t, shape.hidden) for _ in range(min(INPUTS, reps_for(t, args.quick)))] for t in tokens
    }
    rows: list[Row] = []
    fp32_best: dict[int, float] = {}
    # transformers' fp32 output on inputs[t][0] rounded to bf16 (what the bf16 rows get), when fp32
    # ran: the reference of bf16 rows where its bf16 is not timed
    fp32_ref: dict[int, torch.Tensor] = {}
    need_fp32_ref = "bfloat16" in args.dtypes.split(",") and not cpu_has_native_bf16()
    # fp32 first: its transformers times are the baseline for the bf16-storage rows.
    for name in sorted(args.dtypes.split(","), key=lambda d: d != "float32"):
        dt = DTYPES[name]
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dt, experts_implementation="eager")
        mlp = hf.model.layers[0].mlp.eval()
        gate_w = mlp.gate.weight.detach().clone()
        impls, skipped = hf_implementations(mlp, inputs[tokens[0]][0].to(dt))
        # Without native bf16 (AVX2-only, or AVX-512 without BF16) aten's bf16 GEMM runs at ~1 GFLOP/s:
        # one T = 4096 call of the V2-Lite layer would take minutes, so transformers' bf16 is not
        # timed and the bf16 rows compare with its fp32.
        if dt == torch.bfloat16 and not cpu_has_native_bf16():
            skipped = {
                impl: "not timed: no native bf16 on this CPU (~1 GFLOP/s); compare with its fp32"
                for impl in impls
            }
            impls = []
        for impl, why in skipped.items():
            if f"transformers {impl} skipped ({name}): {why}" not in notes:
                notes.append(f"transformers {impl} skipped ({name}): {why}")
        kernels = [k for k in args.kernels.split(",") if not (k == "upcast" and name == "float32")]
        engines = {  # (fp32 storage has nothing to upcast: that would be the plain loop)
            k: Engine.from_pretrained(
                ckpt, num_workers=args.workers, dtype=name, device="cpu", expert_kernel=k
            )
            for k in kernels
        }
        chosen = {k: e.cluster_state()["workers"][0].get("kernel", k) for k, e in engines.items()}
        for k in list(engines)[1:]:  # "upcast" twice where auto picks it (no native bf16): time it once
            if chosen[k] in [chosen[j] for j in engines if j != k]:
                engines.pop(k).shutdown()

        for t in tokens:
            xs = [x.to(dt) for x in inputs[t]]
            gathered = t * shape.topk * 3 * shape.hidden * shape.inter * dt.itemsize
            fns = {
                ("hf", impl): hf_call(mlp, impl)
                for impl in impls
                if not (impl == "batched_mm" and gathered > BATCHED_MM_MAX_BYTES)
            }
            fns.update({("ours", k): (lambda x, e=e: e.moe_forward(0, x)) for k, e in engines.items()})
            with torch.inference_mode():
                ms = time_interleaved(fns, xs, reps_for(t, args.quick), flush)
                # the error is against transformers in the same dtype, or its fp32 where bf16 is not run
                ref = hf_call(mlp, "eager")(xs[0]).float() if impls else fp32_ref.get(t)
                hf_ms = {impl: ms.get(("hf", impl)) for impl in impls}
                if name == "float32":
                    fp32_best[t] = best_of(hf_ms)[1]
                    if need_fp32_ref:
                        fp32_ref[t] = hf_call(mlp, "eager")(xs[0].bfloat16().float()).float()
                flops, nbytes = expert_stats(shape, gate_w, xs[0], dt.itemsize)
                for k, engine in engines.items():
                    out = engine.moe_forward(0, xs[0]).float()
                    rel = float("nan") if ref is None else ((out - ref).abs().max() / ref.abs().max()).item()
                    compute = "float32" if chosen[k] == "upcast" else name
                    fp32 = fp32_best.get(t) if name != "float32" else None
                    rows.append(
                        Row(
                            shape, t, name, chosen[k], ms["ours", k], hf_ms, fp32, flops, nbytes, rel, compute
                        )
                    )
            best_impl, best = best_of(hf_ms)
            ours = (
                ", ".join(f"{chosen[k]} {ms['ours', k]:.2f}" for k in engines) or "-"
            )  # fp32 with only upcast
            print(
                f"  {shape.name} {name:8s} T={t:5d}: hf best {best_impl} {best:.2f} ms; ours {ours} ms",
                flush=True,
            )
        for engine in engines.values():
            engine.shutdown()
        del hf, mlp, engines
    return rows


def limit(row: Row, peaks: dict[str, float]) -> str:
    """The resource closest to its probe: compute (GFLOP/s over the matmul peak of the compute dtype)
    or memory (distinct expert bytes per second over the read probe)."""
    compute = row.gflops / peaks[f"matmul_{row.compute_dtype}_gflops"]
    memory = row.gbps / peaks["read_gbps"]
    return f"compute {compute:.0%}" if compute >= memory else f"memory {memory:.0%}"


def loadavg() -> str:
    """The 1-minute load average: about 2 while this bench runs alone on 2 cores; more is another job."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def print_report(
    rows: list[Row], peaks: dict[str, float], notes: list[str], seconds: float, load: tuple[str, str]
) -> None:
    model, flags = cpu_info()
    print()
    print("command: python -m bench.moe_layer " + " ".join(sys.argv[1:]))
    print(f"cpu: {model} ({os.cpu_count()} logical cpus, torch threads {torch.get_num_threads()})")
    print(f"flags: {flags}")
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(
        "probes: matmul fp32 {matmul_float32_gflops:.0f} GFLOP/s, bf16 {matmul_bfloat16_gflops:.0f} GFLOP/s; "
        "read {read_gbps:.1f} GB/s, copy {copy_gbps:.1f} GB/s (read + write)".format(**peaks)
    )
    for note in notes:
        print(note)
    print(f"wall time {seconds:.0f} s; load average (1 min) at start {load[0]}, at the end {load[1]}")
    print()
    impls = list(dict.fromkeys(k for r in rows for k in r.hf_ms))
    head = (
        "| H x I | T | dtype | kernel | ours ms | "
        + " | ".join(f"hf {k} ms" for k in impls)
        + " | x vs hf best | x vs hf fp32 best | GFLOP/s | GB/s | limit | max rel err |"
    )
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        best_impl, best = r.hf_best
        vs32 = f"{r.fp32_best_ms / r.ours_ms:.2f}" if r.fp32_best_ms else "-"
        vs_best = "-" if best != best else f"{best / r.ours_ms:.2f}"  # nan: transformers not timed
        hf = " | ".join("-" if r.hf_ms.get(k) is None else f"{r.hf_ms[k]:.2f}" for k in impls)
        print(
            f"| {r.shape.name} | {r.tokens} | {r.dtype} | {r.kernel} | {r.ours_ms:.2f} | {hf} "
            f"| {vs_best} | {vs32} | {r.gflops:.0f} | {r.gbps:.1f} | {limit(r, peaks)} "
            f"| {r.rel_err:.1e} |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shape",
        default=DEFAULT_SHAPE,
        help=f"'sweep' (H x I in {', '.join(f'{h}x{i}' for h, i in SWEEP)}) or comma-separated HxI "
        f"(hidden x expert inter), default {DEFAULT_SHAPE} (DeepSeek-V2-Lite)",
    )
    p.add_argument("--experts", type=int, default=64, help="routed experts per layer")
    p.add_argument("--topk", type=int, default=6, help="experts per token")
    p.add_argument("--shared", type=int, default=2, help="shared experts (each of size I, fused)")
    p.add_argument(
        "--tokens",
        default=None,
        help="comma-separated T values (default 1,16,128,1024,4096; --quick: 1,16,128,1024)",
    )
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    p.add_argument(
        "--kernels",
        default="auto,upcast",
        help="our expert kernels to time ('auto' = what the engine picks; 'upcast' is the path CPUs "
        "without native bf16 get; fp32 ignores it)",
    )
    p.add_argument("--workers", type=int, default=1, help="expert workers (in-process)")
    p.add_argument("--quick", action="store_true", help="fewer repeats, and T up to 1024 unless --tokens")
    p.add_argument("--cache-dir", default=str(CACHE), help="where the random checkpoints are kept")
    args = p.parse_args(argv)
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {list(DTYPES)}")
    try:
        shapes = parse_shapes(args.shape, args.experts, args.topk, args.shared)
    except ValueError as e:
        p.error(str(e))
    tokens = [
        int(t) for t in (args.tokens or ("1,16,128,1024" if args.quick else "1,16,128,1024,4096")).split(",")
    ]
    t0, load0 = time.perf_counter(), loadavg()
    peaks = probes(args.quick)
    notes: list[str] = []
    rows = [row for shape in shapes for row in run_shape(shape, args, tokens, notes)]
    print_report(rows, peaks, notes, time.perf_counter() - t0, (load0, loadavg()))


if __name__ == "__main__":
    main()
