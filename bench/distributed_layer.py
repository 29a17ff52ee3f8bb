"""One DeepSeek-V2-Lite-shaped MoE layer over 2 expert workers on each transport, against transformers.

The layer and its cached random checkpoint are bench.moe_layer's (hidden 2048, expert inter 1408, 64
routed experts, top-6, 2 fused shared experts; fp32). In one run this times:

- transformers' `model.model.layers[0].mlp` in this process ("eager" and "grouped_mm"; the best of
  the two is the baseline), with torch's default threads;
- `Engine.moe_forward(0, x)` with `num_workers=2` on each transport. "local" runs both workers in this
  process with the default threads (the single-process figure of docs/performance.md); "ray" and
  "compiled" run a Router actor and 2 ExpertWorker actors with `num_threads=1` and
  `worker_resources={"num_cpus": 1}`: one thread per worker process, one worker per core;
- inside the Router actor (via `__ray_call__`): the layer as a `forward` pass runs it (the MoE block,
  no driver round trip), split into route + plan, `transport.run_layer` and combine;
- the workers' own compute on the same batches, measured inside each worker process (both workers at
  once, as in a layer), so that round-trip overhead = run_layer - max over workers of compute;
- a whole `Engine.forward` of the built-in default model (tiny DeepSeek-V3) per transport, batch 1 and
  8 x 32 tokens, next to transformers' own forward.

A transport whose construction raises NotImplementedError is skipped and reported. Times are the
minimum over repeats after a warm-up; nothing asserts on time.

    python -m bench.distributed_layer --tokens 8,128,1024,4096 --transports local,ray,compiled
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import ray
import torch
from ray import cloudpickle

from bench.moe_layer import CACHE, Shape, build_checkpoint, cpu_info, reps_for
from router_service import Engine
from router_service.default_model import default_model_dir
from router_service.stages.gating import Routing
from router_service.stages.moe_layer import shared_scale
from router_service.stages.plan import combine, plan

# One DeepSeek-V2-Lite MoE layer: hidden 2048, 64 experts of 1408, top-6, 2 shared experts.
SHAPE = Shape(hidden=2048, inter=1408, experts=64, topk=6, shared=2)
H = SHAPE.hidden


def time_ms(fn, reps: int) -> float:
    """Minimum wall time of `reps` calls after one warm-up call, in ms."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


LAYER = 0


# ---- functions run inside the Router actor / worker actors (pickled by value) -------------------


def _worker_compute(worker, layer, batch, reps):
    """Inside an ExpertWorker: min ms of its own forward on this batch, and its torch threads."""
    import time as _time

    import torch as _torch

    with _torch.inference_mode():
        worker.forward(layer, batch)
        best = float("inf")
        for _ in range(reps):
            t0 = _time.perf_counter()
            worker.forward(layer, batch)
            best = min(best, _time.perf_counter() - t0)
    return best * 1e3, _torch.get_num_threads()


def _router_spans(router, layer, x, reps, with_workers=True):
    """Inside the Router (actor or local object): the MoE block's time and its parts, in ms (min of reps).

    layer_ms: the block as the model runs it (its own router, then RemoteExperts: plan, dispatch,
    combine);
    route_plan_ms / run_layer_ms / combine_ms: the same steps timed one by one;
    worker_ms: each worker's own forward on its batch, measured in its own process (all at once).
    """
    import time as _time

    import torch as _torch

    d = router.dispatcher
    block = router.model.model.layers[layer].mlp
    tr = d.transport

    def with_layouts(batches):  # the transport's work items: (the worker's layout key, its batch)
        return {w: (d.placement.layout_of(w), b) for w, b in batches.items()}

    out = {"router_threads": _torch.get_num_threads()}
    with _torch.inference_mode():
        x = x.to(router.device, router.dtype)

        def steps():
            t0 = _time.perf_counter()
            _, weights, ids = block.gate(x)  # the family's own router (DeepSeek-V2's here)
            routing = Routing(ids.to(_torch.int32), weights.float())
            sw = shared_scale(block, x)
            work = plan(routing, d.placement, layer, x, d.spec.shared_intermediate_size > 0, sw)
            batches = {w: b for w, (_, b) in work.items()}
            t1 = _time.perf_counter()
            partials = tr.run_layer(layer, with_layouts(batches)).partials
            t2 = _time.perf_counter()
            combine(x, [(rows, partials[w]) for w, (rows, _) in sorted(work.items())])
            t3 = _time.perf_counter()
            return (t1 - t0, t2 - t1, t3 - t2), batches

        block(x)
        best = float("inf")
        for _ in range(reps):
            t0 = _time.perf_counter()
            block(x)
            best = min(best, _time.perf_counter() - t0)
        out["layer_ms"] = best * 1e3
        _, batches = steps()
        parts = [float("inf")] * 3
        for _ in range(reps):
            s, batches = steps()
            parts = [min(a, b) for a, b in zip(parts, s, strict=True)]
        out["route_plan_ms"], out["run_layer_ms"], out["combine_ms"] = (p * 1e3 for p in parts)
        out["rows"] = {w: int(b.x.shape[0]) for w, b in batches.items()}
        # The same rows with no work: no pairs, no shared rows. The worker only allocates a zero
        # [N, H] partial, so this run_layer is the transport's round trip with the real payload.
        empty = {
            w: type(b)(
                x=b.x,
                pair_rows=b.pair_rows[:0],
                pair_weights=b.pair_weights[:0],
                expert_counts=_torch.zeros_like(b.expert_counts),
            )
            for w, b in batches.items()
        }
        empty = with_layouts(empty)
        tr.run_layer(layer, empty)
        best = float("inf")
        for _ in range(max(reps, 20) if x.shape[0] <= 128 else reps):
            t0 = _time.perf_counter()
            tr.run_layer(layer, empty)
            best = min(best, _time.perf_counter() - t0)
        out["empty_rt_ms"] = best * 1e3
        if not with_workers:
            return out
        if hasattr(tr, "workers"):  # local: the workers are objects in this process, run one by one
            res = {w: _worker_compute(tr.workers[w], layer, b, reps) for w, b in batches.items()}
        else:
            refs = {
                w: tr._actors[w].__ray_call__.remote(_worker_compute, layer, b, reps)
                for w, b in batches.items()
            }
            res = {w: ray.get(r, timeout=600) for w, r in refs.items()}
        out["worker_ms"] = {w: r[0] for w, r in res.items()}
        out["worker_threads"] = {w: r[1] for w, r in res.items()}
    return out


def _run_block(router, layer, x, reps):
    """Inside the Router: `reps` calls of the MoE block; (start, end) in epoch microseconds."""
    import time as _time

    import torch as _torch

    block = router.model.model.layers[layer].mlp
    with _torch.inference_mode():
        x = x.to(router.device, router.dtype)
        block(x)
        t0 = _time.time()
        for _ in range(reps):
            block(x)
        return t0 * 1e6, _time.time() * 1e6


def timeline_breakdown(engine, x, reps: int) -> dict[str, float]:
    """Ray transport: median ms per layer of each task phase Ray records (ray.timeline()).

    submit_task: in the router, per worker call (argument serialisation + submission);
    task:deserialize_arguments / task:execute / task:store_outputs: in each worker, per call.
    """
    import statistics

    t0, t1 = call_in_router(engine, _run_block, LAYER, x, reps)
    time.sleep(3)  # workers report their task events about once a second
    events = [e for e in ray.timeline() if t0 <= e.get("ts", 0) <= t1 and e.get("ph") == "X"]
    wtids = {e["tid"] for e in events if "ExpertWorker.forward" in str(e.get("cat"))}
    out = {}
    for cat in ("task:deserialize_arguments", "task:execute", "task:store_outputs"):
        d = [e["dur"] / 1e3 for e in events if e.get("cat") == cat and e["tid"] in wtids]
        out[cat] = statistics.median(d) if d else float("nan")
    d = [e["dur"] / 1e3 for e in events if e.get("cat") == "submit_task" and e["tid"] not in wtids]
    out["submit_task (router)"] = statistics.median(d) if d else float("nan")
    out["layer (wall)"] = (t1 - t0) / 1e3 / reps
    return out


def _profile_router(router, layer, x, reps, sort="tottime", limit=25):
    """Inside the Router actor: cProfile of `reps` MoE-block calls; the top of the table as text."""
    import cProfile
    import io
    import pstats

    import torch as _torch

    block = router.model.model.layers[layer].mlp
    with _torch.inference_mode():
        x = x.to(router.device, router.dtype)
        block(x)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(reps):
            block(x)
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(sort).print_stats(limit)
    return s.getvalue()


# ---- driver ----------------------------------------------------------------------------------------


def call_in_router(engine, fn, *args):
    """Run fn(router, *args) where the Router lives (this process for "local", its actor otherwise)."""
    if engine.is_local:
        return fn(engine.router, *args)
    return ray.get(engine._router.__ray_call__.remote(fn, *args))


def make_engine(model_dir, transport: str, threads: int | None, **kw):
    if transport == "local":
        return Engine.from_pretrained(model_dir, num_workers=2, transport="local", device="cpu", **kw)
    return Engine.from_pretrained(
        model_dir,
        num_workers=2,
        transport=transport,
        device="cpu",
        num_threads=threads,
        worker_resources={"num_cpus": 1},
        **kw,
    )


def bench_layer(args, ckpt: Path, tokens: list[int], transports: list[str]) -> tuple[list[dict], dict]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    inputs = {t: torch.randn(t, H) for t in tokens}
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, experts_implementation="eager")
    mlp = hf.model.layers[0].mlp.eval()
    hf_best: dict[int, float] = {}
    refs: dict[int, torch.Tensor] = {}
    for impl in ("eager", "grouped_mm"):
        hf.set_experts_implementation(impl)
        for t in tokens:
            with torch.inference_mode():
                ms = time_ms(lambda x=inputs[t], m=mlp: m(x), reps_for(t, args.quick))
                if impl == "eager":
                    refs[t] = mlp(inputs[t])
            hf_best[t] = min(hf_best.get(t, float("inf")), ms)
            print(f"  transformers {impl:10s} T={t:5d}: {ms:9.2f} ms", flush=True)
    del hf, mlp
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for tr in transports:
        t0 = time.perf_counter()
        try:
            engine = make_engine(ckpt, tr, args.threads)
        except NotImplementedError as e:
            skipped[tr] = f"NotImplementedError: {e}"
            print(f"  {tr}: skipped ({skipped[tr]})", flush=True)
            continue
        print(f"  {tr}: loaded in {time.perf_counter() - t0:.1f}s", flush=True)
        try:
            for t in tokens:
                x = inputs[t]
                reps = reps_for(t, args.quick)
                with torch.inference_mode():
                    ms = time_ms(lambda x=x, e=engine: e.moe_forward(LAYER, x), reps)
                    out = engine.moe_forward(LAYER, x)
                rel = ((out - refs[t]).abs().max() / refs[t].abs().max()).item()
                sp = call_in_router(engine, _router_spans, LAYER, x, reps)
                wmax = max(sp["worker_ms"].values())
                row = dict(
                    transport=tr,
                    tokens=t,
                    moe_forward_ms=ms,
                    hf_ms=hf_best[t],
                    rel_err=rel,
                    worker_max_ms=wmax,
                    overhead_ms=sp["run_layer_ms"]
                    - (wmax if tr != "local" else sum(sp["worker_ms"].values())),
                    **sp,
                )
                rows.append(row)
                print(
                    f"  {tr:8s} T={t:5d}: moe_forward {ms:9.2f} ms, in router {sp['layer_ms']:9.2f} ms "
                    f"(route+plan {sp['route_plan_ms']:.2f}, run_layer {sp['run_layer_ms']:.2f}, combine "
                    f"{sp['combine_ms']:.2f}), empty round trip {sp['empty_rt_ms']:.2f} ms, workers {[round(v, 2) for v in sp['worker_ms'].values()]} ms "
                    f"threads router {sp['router_threads']} workers {list(sp['worker_threads'].values())}, "
                    f"rows {list(sp['rows'].values())}, rel err {rel:.1e}",
                    flush=True,
                )
            if args.profile and tr == "ray":
                for t in (8, 1024):
                    if t in inputs:
                        reps = 20 if t <= 8 else 3
                        tl = timeline_breakdown(engine, inputs[t], reps)
                        print(f"\n---- ray.timeline(), ray transport, T={t}, median ms per worker call ----")
                        for k, v in tl.items():
                            print(f"  {k:30s} {v:9.3f}")
                        txt = call_in_router(engine, _profile_router, LAYER, inputs[t], reps)
                        print(f"\n---- cProfile inside the Router actor, ray transport, T={t} ----\n{txt}")
        finally:
            engine.shutdown()
    return rows, skipped


def bench_forward(args, transports: list[str]) -> tuple[list[dict], dict]:
    from transformers import AutoModelForCausalLM

    model_dir = default_model_dir("tiny")  # the figures in docs/performance.md are the random tiny preset's
    torch.manual_seed(2)
    shapes = [(1, 16), (8, 32)]
    ids = {s: torch.randint(0, 256, s) for s in shapes}
    reps = 5 if args.quick else 20
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    res: dict[tuple, float] = {}
    for s in shapes:
        with torch.inference_mode():
            res["transformers", s] = time_ms(lambda i=ids[s], m=hf: m(input_ids=i, use_cache=False), reps)
    del hf
    skipped = {}
    for tr in transports:
        try:
            engine = make_engine(model_dir, tr, args.threads)
        except NotImplementedError as e:
            skipped[tr] = f"NotImplementedError: {e}"
            continue
        try:
            for s in shapes:
                res[tr, s] = time_ms(lambda i=ids[s], e=engine: e.forward(i), reps)
        finally:
            engine.shutdown()
    out = []
    for s in shapes:
        out.append({"shape": s, **{k[0]: v for k, v in res.items() if k[1] == s}})
        print(
            f"  forward {s}: " + ", ".join(f"{k[0]} {v:.2f} ms" for k, v in res.items() if k[1] == s),
            flush=True,
        )
    return out, skipped


def print_report(rows, skipped, fwd, fwd_skipped, transports, args) -> None:
    model, flags = cpu_info()
    print()
    print("command: python -m bench.distributed_layer " + " ".join(sys.argv[1:]))
    print(
        f"cpu: {model} ({os.cpu_count()} logical cpus; this process's torch threads {torch.get_num_threads()})"
    )
    print(f"flags: {flags}")
    import transformers

    print(f"torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}")
    print(
        f"ray/compiled: num_threads={args.threads}, worker_resources={{'num_cpus': 1}}; local: default threads"
    )
    for tr, why in {**skipped, **fwd_skipped}.items():
        print(f"skipped {tr}: {why}")
    print()
    head = (
        "| T | transport | moe_forward ms | in router ms | route+plan ms | run_layer ms | combine ms "
        "| worker compute ms (max) | overhead ms | empty round trip ms | hf best ms | hf / moe_forward | hf / in router | max rel err |"
    )
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in sorted(rows, key=lambda r: (r["tokens"], transports.index(r["transport"]))):
        print(
            f"| {r['tokens']} | {r['transport']} | {r['moe_forward_ms']:.2f} | {r['layer_ms']:.2f} "
            f"| {r['route_plan_ms']:.2f} | {r['run_layer_ms']:.2f} | {r['combine_ms']:.2f} "
            f"| {r['worker_max_ms']:.2f} | {r['overhead_ms']:.2f} | {r['empty_rt_ms']:.2f} | {r['hf_ms']:.2f} "
            f"| {r['hf_ms'] / r['moe_forward_ms']:.2f} | {r['hf_ms'] / r['layer_ms']:.2f} | {r['rel_err']:.1e} |"
        )
    if fwd:
        print()
        cols = ["transformers"] + [t for t in transports if t not in fwd_skipped]
        print("| input ids | " + " | ".join(f"{c} ms" for c in cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for f in fwd:
            b, s = f["shape"]
            print(f"| {b} x {s} | " + " | ".join(f"{f[c]:.2f}" if c in f else "-" for c in cols) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="8,128,1024,4096", help="comma-separated T values")
    p.add_argument("--transports", default="local,ray,compiled", help="comma-separated: local,ray,compiled")
    p.add_argument(
        "--threads", type=int, default=1, help="num_threads of router and workers for ray/compiled"
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--no-forward", action="store_true", help="skip the default model's whole forward")
    p.add_argument("--profile", action="store_true", help="cProfile the ray transport's router at T=8, 1024")
    p.add_argument("--cache-dir", default=str(CACHE), help="where the random checkpoint is kept")
    args = p.parse_args(argv)
    transports = args.transports.split(",")
    for tr in transports:
        if tr not in ("local", "ray", "compiled"):
            p.error(f"unknown transport {tr!r}")
    # The functions run in the actors travel by value: `bench` is not installed in the actors' path.
    if __name__ != "__main__":
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ckpt = build_checkpoint(SHAPE, Path(args.cache_dir))
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"load average at the start (1, 5, 15 min): {os.getloadavg()}", flush=True)
    try:
        if any(t != "local" for t in transports):  # one Ray instance for every engine of the run
            ray.init(
                address="local",  # a fresh instance even when another `ray start` cluster runs here
                num_cpus=max(os.cpu_count() or 1, 3),
                include_dashboard=False,
                logging_level="WARNING",
            )
        rows, skipped = bench_layer(args, ckpt, tokens, transports)
        fwd, fwd_skipped = ([], {}) if args.no_forward else bench_forward(args, transports)
    finally:
        ray.shutdown()
    print_report(rows, skipped, fwd, fwd_skipped, transports, args)


if __name__ == "__main__":
    main()
