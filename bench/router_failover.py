"""A router process SIGKILLed under load: how long do its streams stall, and do they come out right?

One command, one process:

1. starts a server with `--routers` routers (2 by default; `start_server`, free ports, progress
   off, the server's default transport and workers);
2. warms it up (the streams below, `--warmup-tokens` each), then runs the reference: S concurrent
   greedy streams (`--streams`, default 16; each its own prompt of `--prompt-len` printable byte
   ids, `--tokens` new tokens, temperature 0) through `POST /v1/completions` over loopback HTTP,
   undisturbed; it records their tokens and the arrival time of every streamed chunk;
3. `--repeats` times (default 3): the same streams again; once every stream has `--kill-after`
   tokens it reads `GET /v1/cluster`, takes the router with the most sequences (running + waiting;
   ties: router `repeat mod routers`, or `--kill-router`) and SIGKILLs its process
   (`os.kill(pid, SIGKILL)`, the pid `/v1/cluster` lists). Then:
   - every stream must finish with exactly the reference's tokens;
   - the killed router held K = its running + waiting streams (read just before the kill). Those
     stall until the ingress moves them to another router. A stream's stall is its longest gap
     between two chunks that ends after the kill (its last chunk may come a little after the
     kill: events already on their way); the K streams with the longest stalls are the moved
     ones. The table gives the longest gap of a moved stream and of the others (each over the
     whole stream), the time from the kill to a moved stream's first chunk after its stall, and
     the K-th longest stall against the (K+1)-th (how clearly the two sets separate);
   - the time until the surviving routers' sequences rose by K above the fewest they held since
     the kill (the moved streams were re-submitted to them; each router's `describe` through Ray
     every 0.05 s), which splits a moved stream's stall into detection + move, and the survivor's
     prefill of it and its next step;
   - the time until the killed router is a process again (Ray restarts it: its actor answers with
     a new pid; polled through Ray, which does not touch the ingress while the streams run) and
     until `GET /v1/cluster` lists `--routers` live routers again (polled every 0.25 s after that);
   - a warm-up run, so the restarted router is warm for the next repeat;
4. prints a markdown table and the exact command.

Nothing asserts on time; a stream that fails or differs is reported.

    python -m bench.router_failover [--preset trained|tiny|medium] [--streams 16] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from bench.serve_load import cpu_model, eos_ids, pct, prompt_ids, server_default
from router_service.default_model import default_model_dir
from router_service.runtime.cluster import router_handle
from router_service.serving.launch import ServerOptions, start_server


@dataclass
class Stream:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    chunks: list[float] = field(default_factory=list)  # arrival time of each chunk with tokens
    error: str = ""
    finish: str | None = None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]

    def stall_after(self, t: float) -> tuple[float, float]:
        """(length, end) of the longest gap between two chunks that ends after `t` ((nan, nan): none)."""
        best = (float("nan"), float("nan"))
        for a, b in zip(self.chunks, self.chunks[1:], strict=False):
            if b > t and not b - a <= best[0]:
                best = (b - a, b)
        return best


async def run_stream(client, url: str, s: Stream, max_tokens: int) -> None:
    import httpx

    body = {"prompt": s.prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line[6:] == "[DONE]":
                    return
                obj = json.loads(line[6:])
                if "error" in obj:
                    s.error = f"error event: {obj['error']}"
                    return
                for ch in obj.get("choices", []):
                    ids = ch.get("token_ids") or []
                    if ids:
                        s.chunks.append(time.perf_counter())
                        s.tokens.extend(ids)
                    if ch.get("finish_reason") is not None:
                        s.finish = ch["finish_reason"]
            s.error = "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        s.error = f"{type(e).__name__}: {e}"


async def get_json(client, url: str) -> dict:
    r = await client.get(url)
    r.raise_for_status()
    return r.json()


def live(cluster: dict) -> list[dict]:
    return [
        r
        for r in cluster.get("routers") or []
        if r.get("alive", True) and not r.get("draining") and "state" not in r
    ]


async def wait_routers(client, url: str, n: int, timeout_s: float, exclude_pid: int | None = None) -> float:
    """Seconds until `/v1/cluster` lists `n` live routers (none with `exclude_pid`); polled every
    0.25 s."""
    t0 = time.perf_counter()
    while True:
        try:
            routers = live(await get_json(client, f"{url}/v1/cluster"))
            if len(routers) == n and all(r.get("pid") != exclude_pid for r in routers):
                return time.perf_counter() - t0
        except Exception:  # noqa: BLE001 - the ingress answers 503 while its routers are away
            pass
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"/v1/cluster did not list {n} live routers within {timeout_s:g} s")
        await asyncio.sleep(0.25)


async def wait_process(cluster_name: str, router_id: str, old_pid: int, timeout_s: float) -> float:
    """Seconds until router `router_id`'s actor answers from a process other than `old_pid` (Ray
    restarted it and its constructor rebuilt the router); asked through Ray every 0.1 s."""
    t0 = time.perf_counter()
    handle = router_handle(cluster_name, router_id)
    while time.perf_counter() - t0 < timeout_s:
        try:
            pid = await asyncio.wait_for(handle.pid.remote(), timeout=1.0)
            if pid != old_pid:
                return time.perf_counter() - t0
        except Exception:  # noqa: BLE001 - dead, restarting or slow: ask again
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"router {router_id} was not back within {timeout_s:g} s")


async def wait_moved(cluster_name: str, survivors: list[str], moving: int, timeout_s: float) -> float:
    """Seconds until the surviving routers' sequences (running + waiting, summed) rise by `moving`
    above the fewest they held since the kill: the moved streams have been re-submitted to them
    (their own streams only end meanwhile). Asked through Ray (each router's `describe`) every
    0.05 s; nan when it did not happen within `timeout_s`."""
    t0 = time.perf_counter()
    handles = [router_handle(cluster_name, rid) for rid in survivors]
    low = None
    while time.perf_counter() - t0 < timeout_s:
        try:
            held = 0
            for h in handles:
                d = await h.describe.remote()
                held += int(d["running"]) + int(d["waiting"])
            low = held if low is None else min(low, held)
            if held >= low + moving:
                return time.perf_counter() - t0
        except Exception:  # noqa: BLE001 - a survivor busy or gone: ask again
            pass
        await asyncio.sleep(0.05)
    return float("nan")


def make_streams(n: int, prompt_len: int, avoid: set[int]) -> list[Stream]:
    return [Stream(prompt_ids(random.Random(5000 + i), prompt_len, avoid)) for i in range(n)]


async def load(client, url: str, streams: list[Stream], max_tokens: int) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*(run_stream(client, url, s, max_tokens) for s in streams))
    return time.perf_counter() - t0


@dataclass
class Repeat:
    victim: str = ""
    pid: int = 0
    held: int = 0  # running + waiting on the victim just before the kill
    counts: str = ""  # every router's running + waiting then
    t_kill: float = 0.0
    streams: list[Stream] = field(default_factory=list)
    moved_s: float = float("nan")  # kill -> the survivors hold the moved sequences
    process_back_s: float = float("nan")
    listed_back_s: float = float("nan")
    wall_s: float = 0.0


async def disturbed(args, client, url: str, cluster_name: str, rep: int, avoid: set[int]) -> Repeat:
    out = Repeat(streams=make_streams(args.streams, args.prompt_len, avoid))
    t0 = time.perf_counter()
    task = asyncio.ensure_future(load(client, url, out.streams, args.tokens))
    while min(len(s.tokens) for s in out.streams) < args.kill_after:
        if task.done():
            raise RuntimeError("the streams ended before every one had --kill-after tokens")
        await asyncio.sleep(0.002)
    routers = live(await get_json(client, f"{url}/v1/cluster"))
    load_of = {str(r["router_id"]): int(r["running"]) + int(r["waiting"]) for r in routers}
    out.counts = " ".join(f"{rid}:{c}" for rid, c in sorted(load_of.items()))
    if args.kill_router is not None:
        victim = next(r for r in routers if str(r["router_id"]) == args.kill_router)
    else:
        ids = sorted(load_of, key=int)
        most = max(load_of.values())
        tied = [rid for rid in ids if load_of[rid] == most]
        pick = tied[rep % len(tied)]
        victim = next(r for r in routers if str(r["router_id"]) == pick)
    out.victim, out.pid = str(victim["router_id"]), int(victim["pid"])
    out.held = load_of[out.victim]
    survivors = [rid for rid in load_of if rid != out.victim]
    os.kill(out.pid, signal.SIGKILL)
    out.t_kill = time.perf_counter()
    moved = asyncio.ensure_future(wait_moved(cluster_name, survivors, out.held, args.move_timeout))
    print(
        f"  repeat {rep + 1}: killed router {out.victim} (pid {out.pid}, {out.held} sequences; "
        f"routers {out.counts}) at {out.t_kill - t0:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    out.process_back_s = await wait_process(cluster_name, out.victim, out.pid, args.timeout)
    out.moved_s = await moved
    out.listed_back_s = (time.perf_counter() - out.t_kill) + await wait_routers(
        client, url, args.routers, args.timeout, exclude_pid=out.pid
    )
    await task
    out.wall_s = time.perf_counter() - t0
    return out


def analyse(rep: Repeat, reference: list[Stream]) -> dict:
    streams = rep.streams
    stalls = [s.stall_after(rep.t_kill) for s in streams]
    order = sorted(range(len(streams)), key=lambda i: -stalls[i][0] if stalls[i][0] == stalls[i][0] else 0.0)
    moved = set(order[: rep.held])
    ranked = [stalls[i][0] for i in order]
    others = [i for i in range(len(streams)) if i not in moved]
    bad = {}
    for i, (s, ref) in enumerate(zip(streams, reference, strict=True)):
        if s.error:
            bad[i] = s.error
        elif s.tokens != ref.tokens:
            at = next((k for k, (a, b) in enumerate(zip(s.tokens, ref.tokens, strict=False)) if a != b), None)
            bad[i] = f"{len(s.tokens)} tokens, first difference at {at if at is not None else 'the end'}"
    longest = [max(s.gaps(), default=float("nan")) for s in streams]
    all_gaps = [g for s in streams for g in s.gaps()]
    return {
        "equal": len(streams) - len(bad),
        "bad": bad,
        "moved": len(moved),
        "moved_gap": max((longest[i] for i in moved), default=float("nan")),
        "other_gap": max((longest[i] for i in others), default=float("nan")),
        "kth_stall": ranked[rep.held - 1] if 0 < rep.held <= len(ranked) else float("nan"),
        "next_stall": ranked[rep.held] if rep.held < len(ranked) else float("nan"),
        "kill_to_next": max((stalls[i][1] - rep.t_kill for i in moved), default=float("nan")),
        "p50_gap": pct(all_gaps, 0.5),
    }


async def run(args, url: str, cluster_name: str, avoid: set[int]) -> tuple[list[Stream], float, list[dict]]:
    import httpx

    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout + 60.0), limits=limits) as client:
        await wait_routers(client, url, args.routers, args.timeout)
        await load(client, url, make_streams(args.streams, args.prompt_len, avoid), args.warmup_tokens)
        reference = make_streams(args.streams, args.prompt_len, avoid)
        ref_wall = await load(client, url, reference, args.tokens)
        for i, s in enumerate(reference):
            if s.error or len(s.tokens) != args.tokens:
                raise RuntimeError(f"reference stream {i}: {s.error or f'{len(s.tokens)} tokens'}")
        rows = []
        for rep in range(args.repeats):
            r = await disturbed(args, client, url, cluster_name, rep, avoid)
            row = {**analyse(r, reference), "repeat": rep + 1, "victim": r.victim, "held": r.held}
            row.update(counts=r.counts, process_back_s=r.process_back_s, listed_back_s=r.listed_back_s)
            row.update(moved_s=r.moved_s, wall_s=r.wall_s)
            rows.append(row)
            print(
                f"    {row['equal']}/{args.streams} equal, moved {row['moved']}: longest gap "
                f"{row['moved_gap']:.3f} s (others {row['other_gap']:.3f} s); held by the others after "
                f"{r.moved_s:.2f} s; process back {r.process_back_s:.1f} s, listed back {r.listed_back_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            # warm the restarted router before the next repeat (its first steps are slow)
            await load(client, url, make_streams(args.streams, args.prompt_len, avoid), args.warmup_tokens)
        return reference, ref_wall, rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the built-in model of --preset)")
    p.add_argument("--preset", default="trained", choices=("trained", "tiny", "medium"))
    p.add_argument("--routers", type=int, default=2, help="router replicas of the server (>= 2)")
    p.add_argument("--workers", type=int, default=server_default("num_workers"))
    p.add_argument(
        "--transport", default=server_default("transport"), choices=("ray", "socket"), help="of the server"
    )
    p.add_argument("--streams", type=int, default=16, help="concurrent greedy streams")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt ids per stream")
    p.add_argument("--kill-after", type=int, default=4, help="kill once every stream has this many tokens")
    p.add_argument("--kill-router", default=None, help="router id to kill (default: the busiest)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens per stream of each warm-up run")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a router to come back")
    p.add_argument(
        "--move-timeout",
        type=float,
        default=30.0,
        help="seconds to watch the survivors for the moved streams",
    )
    args = p.parse_args(argv)
    if args.routers < 2:
        raise SystemExit("--routers must be >= 2: the streams of the killed router move to another one")

    model_dir = str(args.model or default_model_dir(args.preset))
    avoid = eos_ids(model_dir)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    print(f"model {model_dir}; starting the server ({args.routers} routers) ...", file=sys.stderr, flush=True)
    server = start_server(
        model_dir,
        num_workers=args.workers,
        transport=args.transport,
        options=ServerOptions(http_port=0, grpc_port=0),
        progress="off",
        num_routers=args.routers,
    )
    try:
        reference, ref_wall, rows = asyncio.run(
            run(args, server.http_url.rstrip("/"), server.config.cluster_name, avoid)
        )
    finally:
        server.shutdown()
    wall = time.perf_counter() - t_start

    ref_gaps = [max(s.gaps()) for s in reference]
    print()
    print(
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}. Server: "
        f"{args.transport} transport, {args.workers} workers, {args.routers} routers, fp32. "
        f"Load average (1, 5, 15 min) at the start {' '.join(f'{x:.2f}' for x in load_before)}, at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}. Wall time {wall:.0f} s."
    )
    print()
    print("```")
    print(" ".join(["python -m bench.router_failover", *(sys.argv[1:] if argv is None else argv)]))
    print("```")
    print()
    print(
        f"Undisturbed reference: {args.streams} streams x {args.tokens} tokens in {ref_wall:.2f} s; "
        f"longest gap between two chunks of a stream {max(ref_gaps):.3f} s, p50 gap "
        f"{pct([g for s in reference for g in s.gaps()], 0.5) * 1e3:.1f} ms."
    )
    print()
    print(
        "| repeat | killed router (sequences; all routers) | streams equal to the reference | moved streams "
        "| longest gap, moved s | longest gap, others s | kill -> next token, moved (max) s "
        "| kill -> moved streams held by the others s "
        "| stall after the kill: K-th / (K+1)-th longest s | p50 gap ms | process back s | listed back s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['repeat']} | {r['victim']} ({r['held']}; {r['counts']}) | {r['equal']}/{args.streams} "
            f"| {r['moved']} | {r['moved_gap']:.3f} | {r['other_gap']:.3f} | {r['kill_to_next']:.3f} "
            f"| {r['moved_s']:.3f} | {r['kth_stall']:.3f} / {r['next_stall']:.3f} | {r['p50_gap'] * 1e3:.1f} "
            f"| {r['process_back_s']:.1f} | {r['listed_back_s']:.1f} |"
        )
    problems = [f"repeat {r['repeat']}: stream {i}: {why}" for r in rows for i, why in r["bad"].items()]
    print()
    print("Problems: " + ("none" if not problems else ""))
    for line in problems:
        print(f"- {line}")


if __name__ == "__main__":
    main()
