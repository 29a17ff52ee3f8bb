"""Where a served decode step goes: a trace of the router and the expert workers on one clock, the
per-step breakdown it gives, and every process's CPU per generated token.

It starts the server (free ports, progress off), keeps `--concurrency` streamed completions running
back to back over HTTP (the load of `bench.serve_load`'s long kind), and, after `--warmup` seconds,
records `--seconds` of spans with the router's `start_trace` / `stop_trace` while sampling each
process's CPU time from /proc. It writes the trace (`--out`, open it in ui.perfetto.dev or
chrome://tracing) and prints:

- the decode step's breakdown (mean ms per step over the traced steps): the router's dense work
  (decoder layers minus their MoE blocks), the gate, plan, submit, waiting on the workers, combine,
  the rest of the MoE block, embedding / mask / LM head, sampling, and the time between steps;
- per MoE layer: the round trip (submit + wait), the workers' call and expert compute, and the
  transport's own share (wait minus the slowest worker call);
- the overlap: the fraction of worker expert time during which the router was not waiting;
- CPU seconds per 1000 generated tokens of each process (router, workers, Serve ingress replica,
  Serve proxy, the load generator, Ray's own), from /proc over the traced window.

    python -m bench.decode_profile --concurrency 16 --seconds 2 --out docs/traces/decode-default.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import os
import random
import sys
import time
from pathlib import Path

from bench.serve_load import cpu_model, eos_ids, one_completion, prompt_ids, server_default
from router_service.default_model import default_model_dir
from router_service.serving.launch import ServerOptions, start_server

ROUTER_SPANS = ("gate", "plan", "submit", "wait", "combine")


# ---- CPU per process -----------------------------------------------------------------------------


def _role(cmd: str) -> str | None:
    for key, role in (
        ("RouterActor", "router"),
        ("RayExpertWorker", "expert workers"),
        ("MoEIngress", "Serve ingress replica"),
        ("ProxyActor", "Serve HTTP proxy"),
        ("bench.decode_profile", "load generator (this process)"),
        ("GrpcIngress", "gRPC ingress"),
    ):
        if key in cmd:
            return role
    if "ray" in cmd:
        return "Ray (GCS, raylet, controller, dashboard)"
    return None


def cpu_snapshot() -> dict[int, tuple[float, str]]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick, cmd)
    return out


def cpu_by_role(before: dict, after: dict) -> dict[str, float]:
    roles: collections.Counter = collections.Counter()
    for pid, (t, cmd) in after.items():
        role = _role(cmd)
        if role is not None:
            roles[role] += t - before.get(pid, (t, cmd))[0]
    return dict(roles)


# ---- the trace's breakdown -------------------------------------------------------------------------


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two lists of intervals (each list non-overlapping)."""
    a, b = sorted(a), sorted(b)
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def breakdown(events: list[dict]) -> dict:
    """Mean per-step figures (ms) from a trace of `Router.stop_trace`."""
    names = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"
    }
    spans = [e for e in events if e.get("ph") == "X"]
    router = [e for e in spans if names.get(e["pid"]) == "router"]
    workers = [e for e in spans if names.get(e["pid"], "").startswith("expert worker")]
    steps = sorted((e for e in router if e["name"] == "decode step"), key=lambda e: e["ts"])
    if not steps:
        return {"steps": 0}

    def within(evs, name, s):
        lo, hi = s["ts"], s["ts"] + s["dur"]
        return [e for e in evs if e["name"] == name and lo <= e["ts"] and e["ts"] + e["dur"] <= hi + 1]

    rows = collections.defaultdict(float)
    layer_rt, worker_call, worker_experts, transport_own = [], [], [], []
    hidden = exposed = 0.0
    for s in steps:
        total = lambda name, s=s: sum(e["dur"] for e in within(router, name, s))  # noqa: E731
        decoder, moe, model = total("decoder layer"), total("moe block"), total("model")
        parts = {k: total(k) for k in ROUTER_SPANS}
        rows["step"] += s["dur"]
        rows["dense layers (attention, norms, dense MLP)"] += decoder - moe
        for k in ROUTER_SPANS:
            rows[k] += parts[k]
        rows["rest of the MoE block"] += moe - sum(parts.values())
        rows["embedding, mask, final norm, LM head"] += model - decoder
        rows["sample"] += total("sample")
        rows["step, outside the model"] += s["dur"] - model - total("sample")
        # per layer: round trip, worker time, transport's own share
        waits = within(router, "wait", s)
        for w in waits:
            sub = [e for e in within(router, "submit", s) if e["ts"] <= w["ts"] and e["args"] == w["args"]]
            calls = [
                e
                for e in workers
                if e["name"] == "worker call"
                and e["args"].get("layer") == w["args"]["layer"]
                and w["ts"] - 5e3 <= e["ts"] <= w["ts"] + w["dur"]
            ]
            exps = [
                e
                for e in workers
                if e["name"] == "experts" and any(c["ts"] <= e["ts"] <= c["ts"] + c["dur"] for c in calls)
            ]
            layer_rt.append(w["dur"] + (sub[-1]["dur"] if sub else 0.0))
            worker_call.append(max((c["dur"] for c in calls), default=0.0))
            worker_experts.append(max((c["dur"] for c in exps), default=0.0))
            transport_own.append(w["dur"] - worker_call[-1])
        # overlap: worker expert time while the router was not waiting on workers
        busy = [(e["ts"], e["ts"] + e["dur"]) for e in workers if e["name"] == "experts"]
        busy = [
            (max(a, s["ts"]), min(b, s["ts"] + s["dur"]))
            for a, b in busy
            if b > s["ts"] and a < s["ts"] + s["dur"]
        ]
        wait_iv = [(e["ts"], e["ts"] + e["dur"]) for e in waits]
        total_busy = sum(b - a for a, b in busy)
        in_wait = sum(_overlap([iv], wait_iv) for iv in busy)
        hidden += total_busy - in_wait
        exposed += in_wait
    n = len(steps)
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(steps, steps[1:], strict=False)]
    out = {k: v / n / 1e3 for k, v in rows.items()}
    out["between steps"] = (sum(gaps) / len(gaps) / 1e3) if gaps else 0.0
    mean = lambda xs: sum(xs) / len(xs) / 1e3 if xs else float("nan")  # noqa: E731
    return {
        "steps": n,
        "mean_batch": sum(s["args"]["sequences"] for s in steps) / n,
        "per_step_ms": out,
        "per_layer_ms": {
            "round trip (submit + wait)": mean(layer_rt),
            "slowest worker's call": mean(worker_call),
            "of which expert compute": mean(worker_experts),
            "transport's own (wait - worker call)": mean(transport_own),
        },
        "layers_per_step": len(layer_rt) / n,
        "overlap": hidden / (hidden + exposed) if hidden + exposed else float("nan"),
    }


# ---- the run ---------------------------------------------------------------------------------------


async def run(args, server, avoid: set[int]) -> dict:
    import httpx

    url = server.http_url.rstrip("/")
    router = server.router
    stop = asyncio.Event()
    tokens = [0]
    limits = httpx.Limits(
        max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4
    )
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker(i: int) -> None:
            rng = random.Random(1000 + i)
            while not stop.is_set():
                res = await one_completion(client, url, prompt_ids(rng, 64, avoid), args.tokens, i)
                if not res.ok:
                    raise RuntimeError(res.error)
                tokens[0] += res.tokens

        tasks = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        await router.start_trace.remote()
        t0, cpu0, tok0 = time.perf_counter(), cpu_snapshot(), tokens[0]
        await asyncio.sleep(args.seconds)
        cpu1, t1 = cpu_snapshot(), time.perf_counter()
        trace = await router.stop_trace.remote()
        stop.set()
        await asyncio.gather(*tasks)
    cluster = {}
    return {
        "trace": trace,
        "cpu": cpu_by_role(cpu0, cpu1),
        "elapsed": t1 - t0,
        "tokens": tokens[0] - tok0,
        "cluster": cluster,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="trained", help="built-in model preset (trained, tiny, medium, ...)")
    p.add_argument("--model", default=None, help="checkpoint dir (overrides --preset)")
    p.add_argument(
        "--transport",
        default=server_default("transport"),
        choices=("ray", "compiled", "socket"),
        help="of the started server (default: the server's own)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128, help="max_tokens per request (64 prompt ids)")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds of load before tracing")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds traced")
    p.add_argument("--out", default="decode-trace.json", help="trace file (.json or .json.gz)")
    args = p.parse_args(argv)

    model_dir = str(args.model or default_model_dir(args.preset))
    avoid = eos_ids(model_dir)
    server = start_server(
        model_dir,
        num_workers=args.workers,
        transport=args.transport,
        options=ServerOptions(http_port=0, grpc_port=0),
        progress="off",
    )
    try:
        res = asyncio.run(run(args, server, avoid))
    finally:
        server.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(res["trace"]).encode()
    out.write_bytes(gzip.compress(data) if out.suffix == ".gz" else data)
    b = breakdown(res["trace"]["traceEvents"])

    print(
        f"\nMachine: {cpu_model()}, {os.cpu_count()} logical CPUs. Model {Path(model_dir).name}, "
        f"{args.transport} transport, {args.workers} workers, {args.concurrency} streams x {args.tokens} tokens."
    )
    print(
        "\n```\npython -m bench.decode_profile "
        + " ".join(sys.argv[1:] if argv is None else argv)
        + "\n```\n"
    )
    # tokens made in the window: the traced steps' batch sizes (completions end in bursts, so counting
    # the tokens of the requests that finished in the window would not do)
    made = sum(
        e["args"]["sequences"] for e in res["trace"]["traceEvents"] if e["name"] in ("decode step", "prefill")
    )
    res["tokens"] = made
    rate = made / res["elapsed"]
    print(
        f"{made} tokens made in the {res['elapsed']:.2f} s traced: {rate:.0f} tok/s; "
        f"{b['steps']} decode steps traced, mean batch {b.get('mean_batch', float('nan')):.1f}; trace: {out}\n"
    )
    if b["steps"]:
        print("| decode step, mean per step | ms |\n|---|---|")
        for k, v in b["per_step_ms"].items():
            print(f"| {k} | {v:.2f} |")
        print(f"\n| per MoE layer ({b['layers_per_step']:.1f} per step) | ms |\n|---|---|")
        for k, v in b["per_layer_ms"].items():
            print(f"| {k} | {v:.2f} |")
        print(f"\nworker expert time hidden under router work (overlap): {100 * b['overlap']:.0f}%")
    print("\n| process | CPU s per 1000 tokens | share of the machine |\n|---|---|---|")
    cores = os.cpu_count() or 1
    for role, secs in sorted(res["cpu"].items(), key=lambda kv: -kv[1]):
        print(
            f"| {role} | {1000 * secs / max(res['tokens'], 1):.3f} | {100 * secs / res['elapsed'] / cores:.0f}% |"
        )


if __name__ == "__main__":
    main()
