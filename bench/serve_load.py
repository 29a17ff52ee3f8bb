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

Many routers (`--routers 1,2,3`): the server starts with the first count and changes it at run time
(`POST /v1/cluster/routers`) before each further group, waits until `/v1/cluster` lists that many
live routers, and runs a warm-up of `--router-warmup` s at the largest concurrency (each kind, not
counted) before every group, the first included, so that every router has served and every group
starts alike. Step 3 runs per group. A count may repeat (`1,2,3,1`): the last group then shows how
far the machine drifted during the run. On top of the table above (one row per group, concurrency
and kind; decode batches summed over the routers, read from each router actor when this process
started the server, else from the router that answers `/v1/cluster`) it prints, per (routers,
concurrency, kind): tokens/s, p50 / p99 per-token latency, rows and frames per worker GEMM call
(the workers' `data_plane` counters summed over the workers, difference over the run:
delta(rows) / delta(calls), delta(frames) / delta(calls); > 1 frame per call is frames of several
routers or lanes merged into one grouped FFN), tokens/s over the 1-router group's at the same
concurrency and kind (the mean of the 1-router groups when there are several), the ratio to
transformers at N = `--hf-batch`, each router's decode steps and mean batch, and the CPU the
server's processes used during the run (from /proc: cores = CPU seconds / wall seconds, per kind of
process, and the whole machine's busy cores, so other load on a shared machine shows). With
`--router-sample S` it also samples each router's running and waiting sequences every S seconds
(its actor's `describe`, not through the ingress), which shows how evenly the ingress spreads them.

    python -m bench.serve_load --concurrency 16,32,64 --kinds long --routers 1,2,3 --forward-duration 0 --no-hf
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from router_service.runtime.cluster import router_handle
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
    routers: int = 1
    # per router id: its decode steps by batch size over the run (empty: not known)
    router_steps: dict[str, dict[int, int]] = field(default_factory=dict)
    data_plane: dict[str, int] = field(default_factory=dict)  # summed over the workers, difference
    cpu: dict[str, float] = field(default_factory=dict)  # cores used over the run, per process kind
    router_load: dict[str, tuple[float, float]] = field(default_factory=dict)  # sampled running, waiting


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


DATA_PLANE_KEYS = ("calls", "frames", "rows", "merged_calls")


def data_plane_totals(cluster: dict) -> dict[str, int] | None:
    """The workers' data-plane counters summed over the workers; None when no worker has one (the
    "ray" transport)."""
    planes = [w["data_plane"] for w in cluster.get("workers") or [] if w.get("data_plane")]
    if not planes:
        return None
    return {k: sum(int(p.get(k, 0)) for p in planes) for k in DATA_PLANE_KEYS}


# ---- CPU per process, from /proc ------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds) of every process this user can read."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()  # fields from 3 (state) on
        out[int(d)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals) - idle) / CLK_TCK, sum(vals) / CLK_TCK


def cpu_snapshot(router_pids: dict[int, str]) -> dict:
    """CPU seconds so far of this process and its descendants (the local Ray instance it started:
    routers, workers, the Serve proxy and replica, ...), each with its kind, and of the machine."""
    if not Path("/proc/stat").is_file():
        return {}
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    me = os.getpid()
    procs, todo = {}, [me]
    while todo:
        pid = todo.pop()
        if pid in table:
            procs[pid] = table[pid][1]
        todo.extend(children.get(pid, ()))
    kinds = {}
    for pid in procs:
        kinds[pid] = "client" if pid == me else process_kind(pid, _cmdline(pid), router_pids)
    return {"procs": procs, "kinds": kinds, "machine": _machine_busy(), "t": time.perf_counter()}


def process_kind(pid: int, cmd: str, router_pids: dict[int, str]) -> str:
    if pid in router_pids or "RouterActor" in cmd:
        return "routers"
    if "RayExpertWorker" in cmd:
        return "workers"
    if any(k in cmd for k in ("ServeReplica", "ProxyActor", "GrpcIngress")):
        return "ingress"
    return "other"


CPU_KINDS = ("routers", "workers", "ingress", "client", "other")


def cpu_used(before: dict, after: dict) -> dict[str, float]:
    """Cores used between two snapshots per process kind (CPU s / wall s), "ours" in all, and
    "machine": the busy cores of the whole machine (others' processes included)."""
    if not before or not after:
        return {}
    wall = after["t"] - before["t"]
    out = dict.fromkeys(CPU_KINDS, 0.0)
    for pid, secs in after["procs"].items():
        out[after["kinds"][pid]] += (secs - before["procs"].get(pid, 0.0)) / wall
    out["ours"] = sum(out[k] for k in CPU_KINDS)
    (b0, t0), (b1, t1) = before["machine"], after["machine"]
    out["machine"] = (b1 - b0) / (t1 - t0) * (os.cpu_count() or 1) if t1 > t0 else float("nan")
    return out


class RouterProbe:
    """Each router's own generation statistics, straight from its actor (this process started the
    server, so it is a Ray driver of that cluster); `/v1/cluster`'s "generation" is one router's."""

    def __init__(self, cluster_name: str | None, sample_s: float = 0.0):
        self.cluster_name = cluster_name
        self.sample_s = sample_s  # > 0: sample each router's running / waiting this often

    def _handle(self, rid: str):
        return router_handle(self.cluster_name, rid)

    async def steps(self, router_ids: list[str]) -> dict[str, dict] | None:
        if self.cluster_name is None:
            return None
        out = {}
        for rid in router_ids:
            try:
                out[rid] = (await self._handle(rid).cluster_state.remote()).get("generation") or {}
            except Exception:  # noqa: BLE001 - gone or restarting: left out
                return None
        return out

    async def sample(self, router_ids: list[str], stop: asyncio.Event) -> dict[str, tuple[float, float]]:
        """Until `stop`: each router's (mean running, mean waiting) over samples every `sample_s`
        (its actor's `describe`, a cheap call that does not pass through the ingress)."""
        handles = {rid: self._handle(rid) for rid in router_ids}
        got: dict[str, list[tuple[int, int]]] = {rid: [] for rid in router_ids}
        while not stop.is_set():
            for rid, h in handles.items():
                with contextlib.suppress(Exception):
                    d = await h.describe.remote()
                    got[rid].append((int(d["running"]), int(d["waiting"])))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.sample_s)
        return {
            rid: (sum(r for r, _ in v) / len(v), sum(w for _, w in v) / len(v)) for rid, v in got.items() if v
        }


def live_routers(cluster: dict) -> list[dict]:
    return [
        r
        for r in cluster.get("routers") or []
        if r.get("alive", True) and not r.get("draining") and "state" not in r
    ]


async def completion_run(
    client,
    url: str,
    n: int,
    prompt_len: int,
    max_tokens: int,
    duration: float,
    avoid: set[int],
    seed: int,
    probe: RouterProbe | None = None,
) -> RunStats:
    cluster0 = await get_json(client, f"{url}/v1/cluster")
    before = cluster0.get("generation") or {}
    routers0 = live_routers(cluster0)
    ids = [str(r["router_id"]) for r in routers0]
    per_router0 = await probe.steps(ids) if probe is not None else None
    pids = {int(r["pid"]): str(r["router_id"]) for r in routers0 if r.get("pid")}
    cpu0 = cpu_snapshot(pids)
    stats = RunStats(routers=max(1, len(routers0)))
    stop = asyncio.Event()
    sampler = (
        asyncio.ensure_future(probe.sample(ids, stop))
        if probe is not None and probe.cluster_name is not None and probe.sample_s > 0
        else None
    )
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < deadline:
            res = await one_completion(client, url, prompt_ids(rng, prompt_len, avoid), max_tokens, i)
            stats.results.append(res)

    await asyncio.gather(*(worker(i) for i in range(n)))
    stats.elapsed = time.perf_counter() - t0
    stats.cpu = cpu_used(cpu0, cpu_snapshot(pids))
    if sampler is not None:
        stop.set()
        stats.router_load = await sampler
    cluster1 = await get_json(client, f"{url}/v1/cluster")
    after = cluster1.get("generation") or {}
    per_router1 = await probe.steps(ids) if per_router0 is not None else None
    if per_router0 is not None and per_router1 is not None:
        # every router's batches, summed (/v1/cluster's "generation" is one router's)
        for rid in ids:
            diff = counter_of(per_router1[rid].get("steps_by_batch_size")) - counter_of(
                per_router0[rid].get("steps_by_batch_size")
            )
            stats.router_steps[rid] = dict(diff)
        for key, attr in (("steps_by_batch_size", "steps"), ("prefills_by_batch_size", "prefills")):
            total = Counter()
            for rid in ids:
                total += counter_of(per_router1[rid].get(key)) - counter_of(per_router0[rid].get(key))
            setattr(stats, attr, dict(total))
    else:
        for key, attr in (("steps_by_batch_size", "steps"), ("prefills_by_batch_size", "prefills")):
            diff = counter_of(after.get(key)) - counter_of(before.get(key))
            setattr(stats, attr, dict(diff))
    dp0, dp1 = data_plane_totals(cluster0), data_plane_totals(cluster1)
    if dp0 is not None and dp1 is not None:
        stats.data_plane = {k: dp1[k] - dp0[k] for k in DATA_PLANE_KEYS}
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
        "routers": st.routers,
        "router_steps": st.router_steps,
        "router_load": st.router_load,
        "data_plane": st.data_plane,
        "cpu": st.cpu,
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


def router_counts(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--routers takes positive counts, got {text!r}")
    return counts


async def set_routers(client, url: str, n: int, timeout_s: float = 600.0) -> float:
    """Run `n` routers (`POST /v1/cluster/routers`) and wait until `/v1/cluster` lists exactly `n`
    live ones; the seconds it took."""
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    while True:
        r = await client.post(f"{url}/v1/cluster/routers", json={"num_routers": n})
        if r.status_code == 200:
            break
        if r.status_code != 409 or time.perf_counter() > deadline:  # 409: another change runs
            raise RuntimeError(f"POST /v1/cluster/routers {n}: HTTP {r.status_code}: {r.text[:300]}")
        await asyncio.sleep(1.0)
    while True:
        cluster = await get_json(client, f"{url}/v1/cluster")
        routers = cluster.get("routers") or []
        if len(routers) == n and len(live_routers(cluster)) == n:
            return time.perf_counter() - t0
        if time.perf_counter() > deadline:
            raise RuntimeError(f"/v1/cluster lists {len(routers)} routers, not {n}: {routers}")
        await asyncio.sleep(0.5)


async def run_load(
    args, url: str, avoid: set[int], vocab: int, probe: RouterProbe | None = None
) -> tuple[list[dict], dict | None]:
    import httpx

    levels = [int(x) for x in args.concurrency.split(",") if x]
    kinds = [("short", 8, args.short_tokens), ("long", 64, args.long_tokens)]
    kinds = [k for k in kinds if k[0] in args.kinds.split(",")]
    counts = router_counts(args.routers)
    many = counts != [1]
    top = max(levels + [args.forward_clients])
    limits = httpx.Limits(max_connections=top + 8, max_keepalive_connections=top + 8)
    rows = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        # Warm-up: one request of each kind, so the first measured run pays no first-call costs.
        for _, plen, mt in kinds:
            await one_completion(client, url, prompt_ids(random.Random(7), plen, avoid), mt, 0)
        for g, routers in enumerate(counts):
            if many:
                if g > 0 or args.url is not None:
                    secs = await set_routers(client, url, routers)
                    print(f"routers -> {routers} ({secs:.1f} s)", file=sys.stderr, flush=True)
                # A warm-up at the top concurrency: one request alone would only reach one router
                # (the lowest score, ties to the lowest id), and a new router's first steps are slow.
                for _, plen, mt in kinds:
                    await completion_run(client, url, max(levels), plen, mt, args.router_warmup, avoid, 999)
            for seed, n in enumerate(levels):
                for kind, plen, mt in kinds:
                    st = await completion_run(
                        client, url, n, plen, mt, args.duration, avoid, seed + 1, probe if many else None
                    )
                    row = summarise(kind, n, st)
                    row["group"] = g
                    rows.append(row)
                    print(
                        f"  R={st.routers} N={n:>3} {kind:5}: {row['requests']} requests, "
                        f"{row['tok_s']:.1f} tok/s, mean decode batch {row['mean_batch']:.2f}, "
                        f"failures {row['failures']}",
                        file=sys.stderr,
                        flush=True,
                    )
                    if st.routers != routers:
                        print(f"    (expected {routers} routers)", file=sys.stderr, flush=True)
        fwd = None
        if args.forward_duration > 0:
            fwd = await forward_run(
                client, url, args.forward_clients, 32, args.forward_duration, vocab, avoid
            )
    return rows, fwd


def print_routers_tables(rows: list[dict], hf: dict | None, hf_batch: int) -> None:
    """The many-router tables: per (routers, N, kind) the rates, the workers' GEMM calls and the
    ratio to one router; then the CPU each kind of process used."""

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b and b == b else "-"

    sampling = any(r["router_load"] for r in rows)

    def sampled(load: dict) -> str:
        return " ".join(f"{rid}: {run:.1f} + {wait:.1f}" for rid, (run, wait) in sorted(load.items())) or "-"

    base: dict[tuple, list[float]] = {}
    for r in rows:
        if r["routers"] == 1:
            base.setdefault((r["n"], r["kind"]), []).append(r["tok_s"])
    print()
    print(
        "| routers | N | kind | gen tok/s | / 1 router | / transformers | p50 / p99 per-token ms "
        "| rows per worker call | frames per call | merged calls | decode steps (mean batch) per router |"
        + (" sampled running + waiting per router |" if sampling else "")
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if sampling else ""))
    for r in rows:
        ones = base.get((r["n"], r["kind"]))
        one = sum(ones) / len(ones) if ones else float("nan")
        vs_hf = (
            ratio(r["tok_s"], hf["tok_s"])
            if hf is not None and r["n"] == hf_batch and r["kind"] == "long"
            else "-"
        )
        dp = r["data_plane"]
        if dp and dp.get("calls"):
            rows_call = f"{dp['rows'] / dp['calls']:.1f}"
            frames_call = f"{dp['frames'] / dp['calls']:.2f}"
            merged = f"{100 * dp['merged_calls'] / dp['calls']:.0f}% of {dp['calls']}"
        else:
            rows_call = frames_call = merged = "-"
        per_router = " ".join(
            f"{rid}: {sum(st.values())} ({sum(k * v for k, v in st.items()) / max(1, sum(st.values())):.1f})"
            for rid, st in sorted(r["router_steps"].items())
        )
        print(
            f"| {r['routers']} | {r['n']} | {r['kind']} | {r['tok_s']:.1f} | {ratio(r['tok_s'], one)} | {vs_hf} "
            f"| {1e3 * r['tpot50']:.1f} / {1e3 * r['tpot99']:.1f} | {rows_call} | {frames_call} | {merged} "
            f"| {per_router or '-'} |" + (f" {sampled(r['router_load'])} |" if sampling else "")
        )
    if any(r["cpu"] for r in rows):
        print()
        print(
            "CPU over each run, in cores (CPU seconds / wall seconds; this machine has "
            f"{os.cpu_count()}): the server's processes by kind, all of them, and the whole machine "
            "(others' processes included)"
        )
        print()
        print(
            "| routers | N | kind | routers | workers | ingress (Serve proxy + replica, gRPC) | client | other Ray | ours | machine |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            c = r["cpu"]
            if not c:
                continue
            cells = " | ".join(f"{c[k]:.2f}" for k in (*CPU_KINDS, "ours", "machine"))
            print(f"| {r['routers']} | {r['n']} | {r['kind']} | {cells} |")


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
    p.add_argument(
        "--routers",
        default="1",
        help="comma-separated router counts: the runs are measured at each (the server starts with "
        "the first and changes the count at run time between groups); a count may repeat",
    )
    p.add_argument(
        "--router-warmup",
        type=float,
        default=3.0,
        help="with --routers: seconds of load at the largest concurrency before each group (not counted)",
    )
    p.add_argument(
        "--router-sample",
        type=float,
        default=0.0,
        help="with --routers, when this process starts the server: sample each router's running and "
        "waiting sequences every this many seconds during the runs (its actor's describe; 0: off)",
    )
    args = p.parse_args(argv)
    counts = router_counts(args.routers)

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
            **({"num_routers": counts[0]} if counts != [1] else {}),
        )
        url = server.http_url
    probe = RouterProbe(server.config.cluster_name if server is not None else None, args.router_sample)
    try:
        rows, fwd = asyncio.run(run_load(args, url.rstrip("/"), avoid, vocab, probe))
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
    many = counts != [1]
    print(
        ("| routers " if many else "")
        + "| N | kind | prompt + new | requests | req/s | gen tok/s | p50 latency s | p99 latency s "
        "| p50 TTFT s | p50 / p99 per-token ms | failures | mean decode batch | decode steps by batch size "
        "| prefills by size |"
    )
    print(("|---" if many else "") + "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        plen, mt = (8, args.short_tokens) if r["kind"] == "short" else (64, args.long_tokens)
        print(
            (f"| {r['routers']} " if many else "")
            + f"| {r['n']} | {r['kind']} | {plen} + {mt} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} "
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
        for r in top if many else top[:1]:
            print(
                (f"{r['routers']} router(s), " if many else "")
                + f"served long kind at N={args.hf_batch}: {r['tok_s']:.1f} tok/s -> "
                f"served / transformers = {r['tok_s'] / hf['tok_s']:.2f}x"
            )
    if many:
        print_routers_tables(rows, hf, args.hf_batch)
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
