"""Elastic expert parallelism under load: scale steps, a worker kill and an EPLB rebalance, while
N clients stream completions; one command, one table.

In one run this:

1. computes the reference completions: the clients' fixed prompts (half greedy, half seeded
   sampling) streamed together through an undisturbed in-process engine (same thread count);
2. starts the server (`start_server`, ray transport, `--workers` workers) and N asyncio clients
   that stream completions back to back (`--tokens` each) for the whole run, recording every
   token's arrival time; every finished completion is checked against the reference;
3. scales through `--steps` (default 4,1,3) with `POST /v1/cluster/scale`, `--window` seconds of
   load between steps: per step the seconds from the call to the answer (the answer comes once the
   new placement serves), and p50 / p99 per-token latency (gaps between a stream's tokens) in the
   window before the call, during it, and in the window after;
4. SIGKILLs one expert worker's process: seconds until the cluster is back at its target count with
   the dead worker replaced, and the latency before / during / after;
5. measures the load rate of a worker (bytes of expert weights it loads per second, in this
   process) and the start time of a bare worker actor, and from them what a scale step would take
   with DeepSeek-V2-Lite-sized experts (26 MoE layers x 64 experts x 3 x 2048 x 1408, bf16);
6. unless `--no-rebalance`: on the "-skewed" variant of the model (a few hot experts per layer, all
   on worker 0 under contiguous placement), with `--rebalance-workers` workers and
   `--redundant-experts` extra slots: the balancedness per layer (mean / max worker load) and the
   tokens each worker actually received, one MoE layer's time (`moe_forward` of `--layer-tokens`
   hidden states through the Router actor with no other load, median of 9) and the decode tokens/s
   of the clients, before and after `POST /v1/cluster/rebalance`;
7. times transformers' `generate` at batch N on the model (the reference for decode tokens/s).

Nothing asserts on time; failed or mismatching completions are counted and printed.

    python -m bench.elastic                      # default model, 16 clients
    python -m bench.elastic --preset medium      # DeepSeek-V2-Lite expert shapes (6.6 GB, cached)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from bench.serve_load import cpu_model, pct
from expert_workers.worker import ExpertWorker
from moe_models.loading import spec_from_pretrained
from moe_serving.http_client import AsyncHTTPClient
from router_service import Engine
from router_service.default_model import default_model_dir
from router_service.runtime.router_actor import call_actor
from router_service.runtime.worker_actor import WORKER_ACTOR
from router_service.serving.launch import ServerOptions, start_server

V2_LITE_EXPERT_BYTES = 26 * 64 * 3 * 2048 * 1408 * 2  # routed experts of DeepSeek-V2-Lite in bf16


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def prompts(n: int) -> list[list[int]]:
    return [[33 + (7 * i) % 90, 34 + i % 50, 60, 61 + i % 40] for i in range(n)]


def sampling(i: int) -> dict:
    return {"temperature": 0.8, "top_p": 0.9, "seed": 1000 + i} if i % 2 else {"temperature": 0.0}


def reference(model_dir: str, n: int, tokens: int, threads: int) -> list[list[int]]:
    out: list = [None] * n
    ps = prompts(n)
    with Engine.from_pretrained(model_dir, num_workers=2, num_threads=threads) as local:

        def run(i):
            s = sampling(i)
            chunks = local.generate_stream(
                ps[i], tokens, s["temperature"], s.get("top_p", 1.0), s.get("seed")
            )
            out[i] = [t for c in chunks for t in c["token_ids"]]

        threads_ = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
    return out


# ---- the load --------------------------------------------------------------------------------------


@dataclass
class Load:
    """N clients streaming back to back; token arrival gaps with their times; failures; mismatches."""

    url: str
    n: int
    tokens: int
    want: list[list[int]] | None
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (arrival time, gap to previous)
    tokens_at: list[float] = field(default_factory=list)  # arrival time of every token
    completions: int = 0
    failures: list[str] = field(default_factory=list)
    mismatches: int = 0
    stop: asyncio.Event | None = None

    async def run(self) -> None:
        self.stop = asyncio.Event()
        ps = prompts(self.n)
        async with AsyncHTTPClient(self.url, timeout=600) as client:

            async def loop(i):
                while not self.stop.is_set():
                    got, last = [], None
                    try:
                        async for chunk in client.stream(ps[i], max_tokens=self.tokens, **sampling(i)):
                            now = time.perf_counter()
                            for _ in chunk.token_ids:
                                self.tokens_at.append(now)
                            if last is not None and chunk.token_ids:
                                self.gaps.append((now, (now - last) / len(chunk.token_ids)))
                            last = now
                            got += chunk.token_ids
                    except Exception as e:  # counted, never fatal: the point is to count them
                        self.failures.append(f"{type(e).__name__}: {e}")
                        continue
                    self.completions += 1
                    if self.want is not None and got != self.want[i]:
                        self.mismatches += 1

            await asyncio.gather(*(loop(i) for i in range(self.n)))

    def latency(self, t0: float, t1: float) -> tuple[float, float]:
        """p50, p99 per-token latency (ms) of the tokens that arrived in [t0, t1)."""
        xs = [g for t, g in self.gaps if t0 <= t < t1]
        return pct(xs, 0.5) * 1e3, pct(xs, 0.99) * 1e3

    def rate(self, t0: float, t1: float) -> float:
        return sum(t0 <= t < t1 for t in self.tokens_at) / max(t1 - t0, 1e-9)


# ---- the phases --------------------------------------------------------------------------------------


async def post(url: str, path: str, body: dict | None = None) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        r = await http.post(path, json=body) if body is not None else await http.post(path)
        if r.status_code != 200:
            raise RuntimeError(f"POST {path} {body}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()


async def get(url: str, path: str) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        return (await http.get(path)).json()


def worker_pid(router_actor, worker: int) -> int:
    def pid(router, w):
        return ray.get(router.dispatcher.transport._actors[w].__ray_call__.remote(lambda _: os.getpid()))

    return ray.get(router_actor.__ray_call__.remote(pid, worker))


async def scale_and_kill(args, server, load: Load) -> list[dict]:
    url, rows = server.http_url, []
    await asyncio.sleep(args.window)  # warm: the "before" window of the first step
    for n in [int(x) for x in args.steps.split(",")]:
        t0 = time.perf_counter()
        state = await post(url, "/v1/cluster/scale", {"num_workers": n})
        t1 = time.perf_counter()
        await asyncio.sleep(args.window)
        rows.append(
            {"what": f"scale {n}", "seconds": t1 - t0, "t0": t0, "t1": t1, "workers": state["num_workers"]}
        )
        log(f"  scale to {n}: {t1 - t0:.2f} s")
    state = await get(url, "/v1/cluster")
    target = state["elastic"]["target_workers"]
    victim = state["workers"][0]["worker_id"]
    t0 = time.perf_counter()
    os.kill(worker_pid(server.router, victim), signal.SIGKILL)
    while True:
        state = await get(url, "/v1/cluster")
        ids = [w["worker_id"] for w in state["workers"]]
        if len(ids) == target and victim not in ids:
            break
        await asyncio.sleep(0.05)
    t1 = time.perf_counter()
    log(f"  worker {victim} killed: back at {target} workers after {t1 - t0:.2f} s")
    await asyncio.sleep(args.window)
    rows.append(
        {"what": f"SIGKILL worker {victim}", "seconds": t1 - t0, "t0": t0, "t1": t1, "workers": target}
    )
    return rows


async def with_load(url: str, args, want, phase) -> tuple[Load, object]:
    load = Load(url, args.clients, args.tokens, want)
    task = asyncio.create_task(load.run())
    while not load.completions and not load.failures:
        await asyncio.sleep(0.05)
    try:
        value = await phase(load)
    finally:
        load.stop.set()
    await task
    return load, value


def moe_layer_ms(router_actor, layer: int, tokens: int, hidden: int) -> float:
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0))
    call_actor(router_actor, "moe_forward", layer, x)
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        call_actor(router_actor, "moe_forward", layer, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def worker_tokens(state: dict) -> dict[int, int]:
    return {w["worker_id"]: w.get("tokens", 0) for w in state["workers"]}


async def rebalance_phase(args, server, load: Load) -> dict:
    url, out = server.http_url, {}
    for when in ("before", "after"):
        if when == "after":
            t0 = time.perf_counter()
            out["result"] = await post(url, "/v1/cluster/rebalance")
            out["seconds"] = time.perf_counter() - t0
            await asyncio.sleep(1.0)
        s0 = await get(url, "/v1/cluster")
        t0 = time.perf_counter()
        await asyncio.sleep(args.window)
        t1 = time.perf_counter()
        s1 = await get(url, "/v1/cluster")
        got = worker_tokens(s1)
        delta = [got[w] - worker_tokens(s0).get(w, 0) for w in got]
        out[when] = {
            "balancedness": s1["balance"]["balancedness"],
            "received_balance": statistics.mean(delta) / max(delta) if max(delta) else 1.0,
            "tok_s": load.rate(t0, t1),
            "version": s1["placement_version"],
        }
        log(f"  {when}: {out[when]}")
    return out


def load_rate(model_dir: str) -> dict:
    """Bytes of expert weights one worker loads per second (all experts, this process), and a bare
    worker actor's start time."""
    spec = spec_from_pretrained(model_dir)
    everything = {layer: list(range(spec.num_experts)) for layer in spec.moe_layers}
    worker = ExpertWorker(0, model_dir, None, spec=spec)
    t0 = time.perf_counter()
    worker.load_layout(0, everything)
    seconds = time.perf_counter() - t0
    nbytes = worker.nbytes
    del worker
    t0 = time.perf_counter()
    actor = WORKER_ACTOR.options(num_cpus=0).remote(
        99, model_dir, None, spec=spec, num_threads=1, progress="off"
    )
    ray.get(actor.ping.remote())
    start = time.perf_counter() - t0
    ray.kill(actor)
    return {"bytes": nbytes, "seconds": seconds, "rate": nbytes / seconds, "actor_start_s": start}


def transformers_tok_s(model_dir: str, batch: int, tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([p for p in prompts(batch)])
    kw = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kw)
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        seconds = time.perf_counter() - t0
    return batch * tokens / seconds


# ---- main --------------------------------------------------------------------------------------------


def start(model_dir: str, args, workers: int, **elastic):
    return start_server(
        model_dir,
        num_workers=workers,
        transport=args.transport,
        options=ServerOptions(http_port=0, grpc_port=0),
        progress="off",
        num_threads=args.threads,
        elastic={"worker_timeout_s": 2.0, "restore_interval_s": 0.5, **elastic},
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=("tiny", "medium"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each completion")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", default="4,1,3", help="worker counts to scale through")
    p.add_argument("--window", type=float, default=4.0, help="seconds of load before and after each event")
    p.add_argument("--transport", default="ray", choices=("ray", "compiled"))
    p.add_argument("--threads", type=int, default=1, help="torch threads of the router and each worker")
    p.add_argument("--no-rebalance", action="store_true")
    p.add_argument("--rebalance-workers", type=int, default=4)
    p.add_argument("--redundant-experts", type=int, default=8)
    p.add_argument("--layer-tokens", type=int, default=512, help="tokens of the timed MoE layer")
    p.add_argument("--json-out", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)

    model_dir = str(default_model_dir(args.preset))
    t_start = time.perf_counter()
    log(f"model {model_dir}; reference completions ...")
    want = reference(model_dir, args.clients, args.tokens, args.threads)
    log("transformers reference ...")
    hf_tok_s = transformers_tok_s(model_dir, args.clients, args.tokens)

    log(f"server: {args.workers} workers ...")
    server = start(model_dir, args, args.workers)
    try:
        load, events = asyncio.run(
            with_load(server.http_url, args, want, lambda ld: scale_and_kill(args, server, ld))
        )
        rate = load_rate(model_dir)
    finally:
        server.shutdown()

    reb = None
    if not args.no_rebalance:
        skewed = str(default_model_dir(args.preset + "-skewed"))
        log(f"server on {skewed}: {args.rebalance_workers} workers, {args.redundant_experts} redundant ...")
        server = start(skewed, args, args.rebalance_workers, redundant_experts=args.redundant_experts)
        try:
            # One MoE layer timed with no other load, before and after the rebalance.
            spec = server.spec
            layer = spec.moe_layers[len(spec.moe_layers) // 2]
            ms_before = moe_layer_ms(server.router, layer, args.layer_tokens, spec.hidden_size)
            reb_load, reb = asyncio.run(
                with_load(server.http_url, args, None, lambda ld: rebalance_phase(args, server, ld))
            )
            reb["before"]["moe_ms"] = ms_before
            reb["after"]["moe_ms"] = moe_layer_ms(server.router, layer, args.layer_tokens, spec.hidden_size)
            reb["layer"], reb["failures"] = layer, len(reb_load.failures)
        finally:
            server.shutdown()
    wall = time.perf_counter() - t_start

    # ---- report ----
    print()
    print(
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; model "
        f"{Path(model_dir).name}, fp32, {args.transport} transport, {args.threads} torch thread(s) per "
        f"process; {args.clients} clients x {args.tokens} tokens (half greedy, half seeded sampling). "
        f"Wall time {wall:.0f} s."
    )
    print()
    print("```")
    print(" ".join(["python -m bench.elastic", *(sys.argv[1:] if argv is None else argv)]))
    print("```")
    print()
    print("| event | seconds to serving | p50 / p99 ms before | during | after | tok/s before | after |")
    print("|---|---|---|---|---|---|---|")
    for e in events:
        w = args.window
        before, during, after = (e["t0"] - w, e["t0"]), (e["t0"], e["t1"]), (e["t1"], e["t1"] + w)
        cells = [f"{a:.0f} / {b:.0f}" for a, b in (load.latency(*x) for x in (before, during, after))]
        print(
            f"| {e['what']} -> {e['workers']} workers | {e['seconds']:.2f} | {' | '.join(cells)} "
            f"| {load.rate(*before):.0f} | {load.rate(*after):.0f} |"
        )
    print()
    print(
        f"Completions: {load.completions}, failed: {len(load.failures)}, different from the undisturbed "
        f"engine: {load.mismatches}. transformers generate at batch {args.clients}: {hf_tok_s:.0f} tok/s."
    )
    for f in sorted(set(load.failures))[:5]:
        print(f"- failure: {f}")
    v2 = V2_LITE_EXPERT_BYTES
    print()
    print(
        f"Load rate: one worker read and prepared {rate['bytes'] / 1e6:.0f} MB of experts in "
        f"{rate['seconds']:.2f} s = {rate['rate'] / 1e9:.2f} GB/s (page cache); a bare worker actor "
        f"started in {rate['actor_start_s']:.2f} s. DeepSeek-V2-Lite-sized experts ({v2 / 1e9:.1f} GB "
        f"bf16): a 2 -> 4 step loads a quarter on each new worker, about "
        f"{rate['actor_start_s'] + v2 / 4 / rate['rate']:.1f} s at this rate; 4 -> 1 loads three "
        f"quarters onto the survivor, about {v2 * 3 / 4 / rate['rate']:.1f} s (requests keep being served "
        "meanwhile)."
    )
    if reb is not None:
        b, a = reb["before"], reb["after"]
        print()
        print(
            f"Rebalance on the skewed model ({args.rebalance_workers} workers, {args.redundant_experts} "
            f"redundant slots; the call took {reb['seconds']:.2f} s; failed requests {reb['failures']}):"
        )
        print()
        print(
            "| | balancedness per layer (window) | received (mean / max worker tokens) | MoE layer ms | decode tok/s |"
        )
        print("|---|---|---|---|---|")
        for name, x in (("before", b), ("after", a)):
            bal = " ".join(f"L{k}:{v:.2f}" for k, v in x["balancedness"].items())
            print(
                f"| {name} (v{x['version']}) | {bal} | {x['received_balance']:.2f} "
                f"| {x['moe_ms']:.1f} (layer {reb['layer']}, T={args.layer_tokens}) | {x['tok_s']:.0f} |"
            )
        print()
        print(
            f"MoE layer {b['moe_ms'] / a['moe_ms']:.2f}x faster, decode {a['tok_s'] / b['tok_s']:.2f}x "
            "the tokens/s after rebalancing."
        )
    if args.json_out:
        raw = {
            "events": events,
            "rate": rate,
            "rebalance": reb,
            "hf_tok_s": hf_tok_s,
            "failures": load.failures,
        }
        args.json_out.write_text(json.dumps(raw, indent=2, default=str))


if __name__ == "__main__":
    main()
