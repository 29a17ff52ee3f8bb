"""The whole server under concurrent load: streamed completions and /v1/forward over HTTP, against
transformers' `generate` on the same model in one process.

In one run this:

1. times transformers' `generate` on the model (fp32, greedy, batch 16 x 64 prompt ids,
   `min_new_tokens = max_new_tokens = --long-tokens`, so every row generates them all; one warm-up,
   then the minimum of `--hf-repeats`) on this process's torch thread count (all cores: its best;
   `--hf-threads` changes it). It runs before the server starts, so the two do not compete for the
   cores. The server's router and workers use the server's default (`--threads` changes it);
2. starts the server (`start_server`, free ports, progress off), or uses `--url`;
3. for each concurrency N and each kind (short: 8 prompt ids, `--short-tokens` new; long: 64 prompt
   ids, `--long-tokens` new), runs N asyncio clients (one httpx.AsyncClient, loopback) that each send
   streamed completions back to back for `--duration` seconds (temperature 0; prompts are printable
   byte ids, never the EOS id). A request started before the deadline runs to its end, so a run
   lasts a little longer than `--duration` and its rates are over the whole span. Per request it
   records latency, time to first token and tokens received; a non-200 answer, an error event in
   the stream, a missing `[DONE]` or a token count that disagrees with the request (fewer than
   max_tokens without finish_reason "stop", or with the usage chunk) is a failure. The decode batch
   sizes the router formed are the difference of `/v1/cluster`'s `generation.steps_by_batch_size`
   before and after the run;
4. runs `--forward-clients` clients posting `/v1/forward` with [1, 32] ids for `--forward-duration`
   seconds (logits asked as msgpack to keep the answer small) and reads the ingress batch sizes from
   the `moe_ingress_batch_requests` histogram of `/metrics` (difference before/after);
5. prints a markdown table, the ratio served / transformers tokens/s for the long kind at N = 16,
   and anything that went wrong. Nothing asserts on time.

    python -m bench.serve_load --concurrency 1,4,16 --duration 20 --transport ray
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from router_service.config import EngineConfig
from router_service.default_model import default_model_dir
from router_service.serving.launch import ServerOptions, start_server


def server_default(name: str):
    """start_server's default for `name`: a started server runs as `moe-serve serve` would."""
    import inspect

    return inspect.signature(start_server).parameters[name].default


PRINTABLE = range(0x20, 0x7F)  # byte ids " " .. "~": never a special token of the byte tokenizer


# ---- helpers -------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation; nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def eos_ids(model_dir: str) -> set[int]:
    """EOS ids from generation_config.json, else config.json."""
    out: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        f = Path(model_dir) / name
        if not f.is_file():
            continue
        eos = json.loads(f.read_text()).get("eos_token_id")
        if eos is None:
            continue
        out |= {int(e) for e in (eos if isinstance(eos, list) else [eos])}
        if out:
            break
    return out


def prompt_ids(rng: random.Random, n: int, avoid: set[int]) -> list[int]:
    pool = [t for t in PRINTABLE if t not in avoid]
    return [rng.choice(pool) for _ in range(n)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def fmt_dist(c: dict[int, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(c.items(), reverse=True) if v)


# ---- the transformers reference -----------------------------------------------------------------


def transformers_reference(
    model_dir: str, batch: int, prompt_len: int, new_tokens: int, threads: int, repeats: int, avoid: set[int]
) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(1234)
    ids = torch.tensor([prompt_ids(rng, prompt_len, avoid) for _ in range(batch)])
    mask = torch.ones_like(ids)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = next(iter(avoid), 0)
    kw = dict(
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad,
    )
    with torch.inference_mode():
        out = model.generate(ids, **kw)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            best = min(best, time.perf_counter() - t0)
    made = out.shape[1] - prompt_len
    del model
    return {
        "seconds": best,
        "new_tokens": made,
        "tok_s": batch * made / best,
        "threads": torch.get_num_threads(),
    }


# ---- the load generator --------------------------------------------------------------------------


@dataclass
class Result:
    ok: bool
    latency: float
    ttft: float = float("nan")
    tokens: int = 0
    error: str = ""
    eos_early: bool = False


@dataclass
class RunStats:
    results: list[Result] = field(default_factory=list)
    elapsed: float = 0.0
    steps: dict[int, int] = field(default_factory=dict)
    prefills: dict[int, int] = field(default_factory=dict)


async def one_completion(client, url: str, prompt: list[int], max_tokens: int, seed: int) -> Result:
    import httpx

    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens, usage, finish, done = float("nan"), 0, None, None, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                return Result(False, time.perf_counter() - t0, error=f"HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return Result(
                        False, time.perf_counter() - t0, ttft, tokens, f"error event: {obj['error']}"
                    )
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj.get("choices", []):
                    n = len(ch.get("token_ids") or [])
                    if n and tokens == 0:
                        ttft = time.perf_counter() - t0
                    tokens += n
                    if ch.get("finish_reason") is not None:
                        finish = ch["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Result(False, time.perf_counter() - t0, ttft, tokens, f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    if not done:
        return Result(False, latency, ttft, tokens, "stream ended without [DONE]")
    if usage is not None and usage.get("completion_tokens") != tokens:
        return Result(
            False, latency, ttft, tokens, f"usage says {usage.get('completion_tokens')}, got {tokens}"
        )
    if finish == "stop" and tokens <= max_tokens:
        return Result(True, latency, ttft, tokens, eos_early=tokens < max_tokens)
    if finish != "length" or tokens != max_tokens:
        return Result(
            False, latency, ttft, tokens, f"finish_reason {finish!r} with {tokens}/{max_tokens} tokens"
        )
    return Result(True, latency, ttft, tokens)


async def get_json(client, url: str) -> dict:
    r = await client.get(url)
    r.raise_for_status()
    return r.json()


def counter_of(d: dict) -> Counter:
    return Counter({int(k): int(v) for k, v in (d or {}).items()})


async def completion_run(
    client, url: str, n: int, prompt_len: int, max_tokens: int, duration: float, avoid: set[int], seed: int
) -> RunStats:
    before = (await get_json(client, f"{url}/v1/cluster")).get("generation") or {}
    stats = RunStats()
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < deadline:
            res = await one_completion(client, url, prompt_ids(rng, prompt_len, avoid), max_tokens, i)
            stats.results.append(res)

    await asyncio.gather(*(worker(i) for i in range(n)))
    stats.elapsed = time.perf_counter() - t0
    after = (await get_json(client, f"{url}/v1/cluster")).get("generation") or {}
    for key, attr in (("steps_by_batch_size", "steps"), ("prefills_by_batch_size", "prefills")):
        diff = counter_of(after.get(key)) - counter_of(before.get(key))
        setattr(stats, attr, dict(diff))
    return stats


_METRIC = re.compile(r"^moe_ingress_batch_requests_(bucket|sum|count)\{([^}]*)\}\s+(\S+)$")


def ingress_histogram(text: str, endpoint: str) -> dict:
    """{"sum": .., "count": .., "buckets": {le: cumulative}} of moe_ingress_batch_requests{endpoint}."""
    out: dict = {"sum": 0.0, "count": 0.0, "buckets": {}}
    for line in text.splitlines():
        m = _METRIC.match(line.strip())
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("endpoint") != endpoint:
            continue
        value = float(m.group(3))
        if m.group(1) == "bucket":
            out["buckets"][labels["le"]] = value
        else:
            out[m.group(1)] = value
    return out


async def forward_run(
    client, url: str, n: int, seq: int, duration: float, vocab: int, avoid: set[int]
) -> dict:
    import httpx
    import msgpack

    before = ingress_histogram((await client.get(f"{url}/metrics")).text, "forward")
    results: list[Result] = []
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker(i: int) -> None:
        rng = random.Random(99 + i)
        while time.perf_counter() < deadline:
            ids = [prompt_ids(rng, seq, avoid)]
            s = time.perf_counter()
            try:
                r = await client.post(
                    f"{url}/v1/forward", json={"input_ids": ids}, headers={"Accept": "application/msgpack"}
                )
                lat = time.perf_counter() - s
                if r.status_code != 200:
                    results.append(Result(False, lat, error=f"HTTP {r.status_code}: {r.text[:200]}"))
                    continue
                shape = list(msgpack.unpackb(r.content, raw=False)["logits"]["shape"])
                if shape != [1, seq, vocab]:
                    results.append(Result(False, lat, error=f"logits shape {shape}"))
                    continue
                results.append(Result(True, lat))
            except (httpx.HTTPError, KeyError, ValueError) as e:
                results.append(Result(False, time.perf_counter() - s, error=f"{type(e).__name__}: {e}"))

    await asyncio.gather(*(worker(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    after = ingress_histogram((await client.get(f"{url}/metrics")).text, "forward")
    buckets, prev = {}, 0.0
    for le in sorted(after["buckets"], key=lambda s: float(s)):
        cum = after["buckets"][le] - before["buckets"].get(le, 0.0)
        if cum - prev:
            buckets[le] = cum - prev
        prev = cum
    calls = after["count"] - before["count"]
    return {
        "results": results,
        "elapsed": elapsed,
        "router_calls": calls,
        "mean_batch": (after["sum"] - before["sum"]) / calls if calls else float("nan"),
        "buckets": buckets,
    }


# ---- main ----------------------------------------------------------------------------------------


def summarise(kind: str, n: int, st: RunStats) -> dict:
    ok = [r for r in st.results if r.ok]
    steps = st.steps
    total_steps = sum(steps.values())
    return {
        "n": n,
        "kind": kind,
        "requests": len(st.results),
        "failures": len(st.results) - len(ok),
        "eos_early": sum(r.eos_early for r in ok),
        "req_s": len(ok) / st.elapsed,
        "tok_s": sum(r.tokens for r in ok) / st.elapsed,
        "p50": pct([r.latency for r in ok], 0.5),
        "p99": pct([r.latency for r in ok], 0.99),
        "ttft50": pct([r.ttft for r in ok], 0.5),
        # per-token latency of a request: its decode time over the tokens after the first
        "tpot50": pct([(r.latency - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1], 0.5),
        "tpot99": pct([(r.latency - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1], 0.99),
        "elapsed": st.elapsed,
        "mean_batch": sum(k * v for k, v in steps.items()) / total_steps if total_steps else float("nan"),
        "steps": steps,
        "prefills": st.prefills,
        "errors": Counter(r.error for r in st.results if not r.ok),
    }


async def run_load(args, url: str, avoid: set[int], vocab: int) -> tuple[list[dict], dict | None]:
    import httpx

    levels = [int(x) for x in args.concurrency.split(",") if x]
    kinds = [("short", 8, args.short_tokens), ("long", 64, args.long_tokens)]
    kinds = [k for k in kinds if k[0] in args.kinds.split(",")]
    top = max(levels + [args.forward_clients])
    limits = httpx.Limits(max_connections=top + 8, max_keepalive_connections=top + 8)
    rows = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        # Warm-up: one request of each kind, so the first measured run pays no first-call costs.
        for _, plen, mt in kinds:
            await one_completion(client, url, prompt_ids(random.Random(7), plen, avoid), mt, 0)
        for seed, n in enumerate(levels):
            for kind, plen, mt in kinds:
                st = await completion_run(client, url, n, plen, mt, args.duration, avoid, seed + 1)
                row = summarise(kind, n, st)
                rows.append(row)
                print(
                    f"  N={n:>3} {kind:5}: {row['requests']} requests, {row['tok_s']:.1f} tok/s, "
                    f"mean decode batch {row['mean_batch']:.2f}, failures {row['failures']}",
                    file=sys.stderr,
                    flush=True,
                )
        fwd = None
        if args.forward_duration > 0:
            fwd = await forward_run(
                client, url, args.forward_clients, 32, args.forward_duration, vocab, avoid
            )
    return rows, fwd


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the built-in model of --preset)")
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    p.add_argument(
        "--preset",
        default="trained",
        choices=("trained", "tiny", "medium"),
        help="without --model: the built-in default model (trained), the random one of the same "
        "architecture at hidden 256 (tiny) or its DeepSeek-V2-Lite-expert-sized version (medium: "
        "6.6 GB, built and cached on first use)",
    )
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per (concurrency, kind) run")
    p.add_argument(
        "--transport",
        default=server_default("transport"),
        choices=("ray", "compiled", "socket"),
        help="of the started server (default: the server's own)",
    )
    p.add_argument("--workers", type=int, default=2, help="expert workers of the started server")
    p.add_argument(
        "--micro-batch-min-tokens", default="auto", help="the server's setting: auto, off or an int"
    )
    p.add_argument("--short-tokens", type=int, default=16, help="max_tokens of the short kind (8 prompt ids)")
    p.add_argument("--long-tokens", type=int, default=128, help="max_tokens of the long kind (64 prompt ids)")
    p.add_argument("--kinds", default="short,long", help="which request kinds to run (short, long)")
    p.add_argument("--forward-clients", type=int, default=16)
    p.add_argument("--forward-duration", type=float, default=5.0, help="0 skips the /v1/forward run")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the router and each worker (default: the server's own default, "
        "the cores divided by the workers)",
    )
    p.add_argument(
        "--hf-threads",
        type=int,
        default=None,
        help="torch threads of the transformers reference (default: this process's, its best)",
    )
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--hf-repeats", type=int, default=2, help="timed generate calls after the warm-up (min)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    args = p.parse_args(argv)

    model_dir = str(args.model or default_model_dir(args.preset))
    # --threads None: the server's own defaults (workers' threads from EngineConfig, router's by model size)
    worker_threads = args.threads
    if worker_threads is None:
        worker_threads = EngineConfig(
            model_dir, num_workers=args.workers, transport=args.transport
        ).num_threads
    avoid = eos_ids(model_dir)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    t_start = time.perf_counter()
    print(f"model {model_dir}, eos {sorted(avoid)}, threads {worker_threads}", file=sys.stderr, flush=True)

    hf = None
    hf_threads = torch.get_num_threads() if args.hf_threads is None else args.hf_threads
    if not args.no_hf:
        print("transformers reference ...", file=sys.stderr, flush=True)
        hf = transformers_reference(
            model_dir, args.hf_batch, 64, args.long_tokens, hf_threads, args.hf_repeats, avoid
        )
        print(f"  {hf['tok_s']:.1f} tok/s ({hf['seconds']:.2f} s)", file=sys.stderr, flush=True)

    server = None
    url = args.url
    if url is None:
        print(
            f"starting the server ({args.transport}, {args.workers} workers) ...", file=sys.stderr, flush=True
        )
        server = start_server(
            model_dir,
            num_workers=args.workers,
            transport=args.transport,
            options=ServerOptions(http_port=0, grpc_port=0),
            progress="off",
            num_threads=args.threads,
            micro_batch_min_tokens=mb if (mb := args.micro_batch_min_tokens) in ("auto", "off") else int(mb),
        )
        url = server.http_url
    try:
        rows, fwd = asyncio.run(run_load(args, url.rstrip("/"), avoid, vocab))
    finally:
        if server is not None:
            server.shutdown()
    wall = time.perf_counter() - t_start

    # ---- report ----
    print()
    print(
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
        f"torch threads: each worker {worker_threads}, router "
        f"{args.threads or 'by model size (router_threads_for)'}, transformers {hf_threads}. Server: "
        f"{'--url ' + args.url if args.url else f'{args.transport} transport, {args.workers} workers, fp32'}. "
        f"Wall time {wall:.0f} s."
    )
    print()
    print("```")
    print(" ".join(["python -m bench.serve_load", *(sys.argv[1:] if argv is None else argv)]))
    print("```")
    print()
    print(
        "| N | kind | prompt + new | requests | req/s | gen tok/s | p50 latency s | p99 latency s "
        "| p50 TTFT s | p50 / p99 per-token ms | failures | mean decode batch | decode steps by batch size "
        "| prefills by size |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        plen, mt = (8, args.short_tokens) if r["kind"] == "short" else (64, args.long_tokens)
        print(
            f"| {r['n']} | {r['kind']} | {plen} + {mt} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} "
            f"| {r['p50']:.3f} | {r['p99']:.3f} | {r['ttft50']:.3f} | {1e3 * r['tpot50']:.1f} / "
            f"{1e3 * r['tpot99']:.1f} | {r['failures']} "
            f"| {r['mean_batch']:.2f} | {fmt_dist(r['steps'])} | {fmt_dist(r['prefills'])} |"
        )
    if fwd is not None:
        ok = [r for r in fwd["results"] if r.ok]
        print()
        print(
            "| /v1/forward [1, 32] | requests | req/s | p50 latency s | p99 latency s | failures "
            "| router calls | mean requests per router call | calls by histogram bucket (le) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        dist = " ".join(f"<={float(k):g}:{int(v)}" for k, v in fwd["buckets"].items())
        print(
            f"| {args.forward_clients} clients, {args.forward_duration:g} s | {len(fwd['results'])} "
            f"| {len(ok) / fwd['elapsed']:.1f} | {pct([r.latency for r in ok], 0.5):.3f} "
            f"| {pct([r.latency for r in ok], 0.99):.3f} | {len(fwd['results']) - len(ok)} "
            f"| {int(fwd['router_calls'])} | {fwd['mean_batch']:.2f} | {dist} |"
        )
    if hf is not None:
        print()
        print(
            f"transformers generate, batch {args.hf_batch} x 64 prompt ids, {hf['new_tokens']} new tokens, "
            f"fp32, {hf['threads']} threads: {hf['seconds']:.2f} s = {hf['tok_s']:.1f} tok/s"
        )
        top = [r for r in rows if r["kind"] == "long" and r["n"] == args.hf_batch]
        if top:
            print(
                f"served long kind at N={args.hf_batch}: {top[0]['tok_s']:.1f} tok/s -> "
                f"served / transformers = {top[0]['tok_s'] / hf['tok_s']:.2f}x"
            )
    problems = []
    for r in rows:
        if r["eos_early"]:
            problems.append(f"N={r['n']} {r['kind']}: {r['eos_early']} requests ended at EOS early")
        for err, c in r["errors"].items():
            problems.append(f"N={r['n']} {r['kind']}: {c} x {err}")
    if fwd is not None:
        for err, c in Counter(r.error for r in fwd["results"] if not r.ok).items():
            problems.append(f"forward: {c} x {err}")
    print()
    print("Problems: " + ("none" if not problems else ""))
    for line in problems:
        print(f"- {line}")


if __name__ == "__main__":
    main()
