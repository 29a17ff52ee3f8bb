"""The clients people point at an OpenAI-compatible server, run against a real `moe-serve serve`:
litellm and langchain-openai calls, a guidellm sweep, and `bench.serve_load`'s own load generator
at the same sizes, so that their figures sit side by side (issue 17).

In one run this:

1. starts the server on the built-in default model (`start_server`, free ports, progress off: as
   `moe-serve serve` runs it), or uses `--url`;
2. litellm (`litellm.completion(model="openai/<served name>", api_base=..., api_key="unused")`):
   a plain chat with no `max_tokens` (it must run to the end of its sequence or to the context, not
   stop at the completions default of 16), a streamed one with the usage chunk, a prompt past the
   context (must raise `litellm.ContextWindowExceededError`, which is what makes litellm's
   fallbacks fire) and `response_format` with a JSON schema (the answer must parse and validate);
3. langchain-openai (`ChatOpenAI(base_url=..., api_key="unused", model=...)`): `invoke`, `stream`
   (with `stream_usage`), `with_structured_output(<pydantic model with bounded fields>)` by
   `json_schema` and by `function_calling`, and `bind_tools([...], tool_choice="required")` whose
   call must validate against the tool's schema (`parallel_tool_calls=False`: allowed several,
   the built-in model repeats its call until max_tokens). The 2.3M-parameter built-in model writes valid
   JSON only when constrained, and closes an object only when the schema forbids extra keys: the
   models here say `extra="forbid"` (`additionalProperties: false`), as strict OpenAI tools do;
4. a guidellm sweep over `--concurrency` (its CLI, `guidellm run`, profile `concurrent`, one
   benchmark per concurrency of `--duration` s, synthetic prompts of `--prompt-tokens` tokens with
   `--output-tokens` new, streamed chat completions, the model's own tokenizer), parsed from its
   JSON report: requests/s and output tokens/s (its "server throughput"), TTFT and ITL p50 / p99
   over the successful requests, and its errored requests, and the CPU its processes used (on a
   small machine the load client competes with the server for the cores). Requests cut off by the end of a
   benchmark ("incomplete") are not errors;
5. `bench.serve_load`'s load generator (its `completion_run`: streamed completions of
   `--prompt-tokens` printable ids, `--output-tokens` new, greedy) at the same concurrencies and
   duration, against the same server; its ITL is the same per-request figure guidellm reports,
   (latency - TTFT) / (tokens - 1);
6. prints the SDK checks and one table of the load figures, the load average at the start and the
   end (the machine may be shared), and exits 1 when any check failed or any request errored.

    python -m bench.client_tools --concurrency 1,4,16 --duration 15

Needs the `clients` extra: `pip install -e '.[clients]'` (guidellm, litellm, langchain-openai).
`--skip guidellm,serve_load,litellm,langchain` leaves parts out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from pydantic import BaseModel, ConfigDict, Field

from bench.serve_load import completion_run, cpu_model, eos_ids, pct, server_default
from router_service.default_model import default_model_dir
from router_service.serving.launch import ServerOptions, start_server

# litellm fetches a price list from the network at import unless told to use its packaged copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

PROMPT = "Tell me about a mixture of experts."
PARTS = ("litellm", "langchain", "guidellm", "serve_load")


class Person(BaseModel):
    """A person: bounded fields, no other keys (what lets a small model close the object)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)


class GetWeather(BaseModel):
    """The weather in a city, over the next days."""

    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)


@dataclass
class Check:
    client: str
    call: str
    ok: bool
    seconds: float
    detail: str


def run_check(out: list[Check], client: str, call: str, fn: Callable[[], str]) -> None:
    """fn returns a detail on success and raises (AssertionError or the SDK's error) on failure."""
    t0 = time.perf_counter()
    try:
        detail, ok = fn(), True
    except Exception as e:  # a failed check is reported, not fatal: the others still run
        detail, ok = f"{type(e).__name__}: {str(e)[:300]}", False
    out.append(Check(client, call, ok, time.perf_counter() - t0, detail.replace("\n", " ").replace("|", "/")))
    print(f"  {client} {call}: {'ok' if ok else 'FAILED'} ({detail[:160]})", file=sys.stderr, flush=True)


def over_context(max_model_len: int) -> list[dict]:
    """One user message past the context (the byte-level tokenizer: one token a byte)."""
    return [{"role": "user", "content": "x" * (max_model_len + 100)}]


# ---- litellm ---------------------------------------------------------------------------------


def litellm_checks(base: str, model: str, max_model_len: int) -> list[Check]:
    import litellm

    kw = dict(model=f"openai/{model}", api_base=base, api_key="unused", temperature=0)
    msgs = [{"role": "user", "content": PROMPT}]
    out: list[Check] = []

    def plain() -> str:
        r = litellm.completion(messages=msgs, **kw)  # no max_tokens: up to the context
        u, finish = r.usage, r.choices[0].finish_reason
        to_context = u.prompt_tokens + u.completion_tokens == max_model_len
        assert finish == "stop" or (finish == "length" and to_context), (
            f"finish_reason {finish} after {u.completion_tokens} tokens (prompt {u.prompt_tokens}, "
            f"context {max_model_len})"
        )
        return f"{u.completion_tokens} tokens, finish {finish}, prompt + completion = {u.prompt_tokens + u.completion_tokens}"

    def stream() -> str:
        chunks = list(
            litellm.completion(
                messages=msgs, max_tokens=32, stream=True, stream_options={"include_usage": True}, **kw
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = [c.usage for c in chunks if getattr(c, "usage", None)]
        assert usage and usage[-1].completion_tokens == 32, f"usage {usage[-1:]}"
        assert text, "no content"
        return f"{len(chunks)} chunks, {usage[-1].completion_tokens} tokens, {len(text)} chars"

    def context() -> str:
        try:
            litellm.completion(messages=over_context(max_model_len), **kw)
        except litellm.ContextWindowExceededError as e:
            return f"ContextWindowExceededError: {str(e).split(' - ', 1)[-1][:140]}"
        raise AssertionError("a prompt past the context was served")

    def json_schema() -> str:
        schema = {"name": "person", "schema": Person.model_json_schema(), "strict": True}
        r = litellm.completion(
            messages=msgs, max_tokens=64, response_format={"type": "json_schema", "json_schema": schema}, **kw
        )
        p = Person.model_validate_json(r.choices[0].message.content)
        return f"{p!r}, finish {r.choices[0].finish_reason}"

    run_check(out, "litellm", "completion, no max_tokens", plain)
    run_check(out, "litellm", "completion, stream + usage", stream)
    run_check(out, "litellm", "prompt past the context", context)
    run_check(out, "litellm", "response_format json_schema", json_schema)
    return out


# ---- langchain-openai ------------------------------------------------------------------------


def langchain_checks(base: str, model: str) -> list[Check]:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base, api_key="unused", model=model, temperature=0, max_tokens=32)
    # room for a whole object or call: one cut by max_tokens is no call at all
    roomy = ChatOpenAI(base_url=base, api_key="unused", model=model, temperature=0, max_tokens=128)
    out: list[Check] = []

    def invoke() -> str:
        m = llm.invoke(PROMPT)
        u = m.usage_metadata
        assert m.content and u["output_tokens"] == 32, f"{m.content!r} {u}"
        return f"{u['output_tokens']} tokens, finish {m.response_metadata.get('finish_reason')}"

    def stream() -> str:
        chunks = list(llm.stream(PROMPT, stream_usage=True))
        usage = [c.usage_metadata for c in chunks if c.usage_metadata]
        assert usage and usage[-1]["output_tokens"] == 32, f"usage {usage}"
        assert "".join(str(c.content) for c in chunks), "no content"
        return f"{len(chunks)} chunks, {usage[-1]['output_tokens']} tokens"

    def structured(method: str) -> Callable[[], str]:
        def fn() -> str:
            runnable = roomy.with_structured_output(Person, method=method, include_raw=True)
            r = runnable.invoke("Who are you?")
            assert r["parsing_error"] is None, r["parsing_error"]
            assert isinstance(r["parsed"], Person), f"parsed {r['parsed']!r}, raw {r['raw']!r}"
            return repr(r["parsed"])

        return fn

    def tools() -> str:
        # parallel_tool_calls=False: with parallel calls allowed the built-in model repeats the call
        # until max_tokens, and a reply cut there carries no tool_calls
        tools = roomy.bind_tools([GetWeather], tool_choice="required", parallel_tool_calls=False)
        m = tools.invoke("Weather in Paris?")
        assert len(m.tool_calls) >= 1, f"no tool call: {m.content!r} {m.response_metadata}"
        call = m.tool_calls[0]
        assert call["name"] == "GetWeather", call
        GetWeather.model_validate(call["args"])
        return (
            f"{call['name']}({json.dumps(call['args'])}), finish {m.response_metadata.get('finish_reason')}"
        )

    run_check(out, "langchain-openai", "invoke", invoke)
    run_check(out, "langchain-openai", "stream (stream_usage)", stream)
    run_check(out, "langchain-openai", "with_structured_output json_schema", structured("json_schema"))
    run_check(
        out, "langchain-openai", "with_structured_output function_calling", structured("function_calling")
    )
    run_check(out, "langchain-openai", "bind_tools, tool_choice required", tools)
    return out


# ---- guidellm --------------------------------------------------------------------------------


def guidellm_command(args, url: str, model: str, model_dir: str, report: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "guidellm",
        "run",
        "--backend",
        f"kind=openai_http,target={url},model={model}",
        "--profile",
        f"kind=concurrent,streams={args.concurrency[0]}",
        "--override",
        "profile.streams",
        ",".join(map(str, args.concurrency)),
        "--constraint",
        f"kind=max_duration,seconds={args.duration:g}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
        "--tokenizer",
        f"kind=huggingface_auto,model={model_dir}",
        "--output",
        f"kind=json,path={report}",
        "--disable-progress",
    ]


def guidellm_rows(report: dict) -> list[dict]:
    """One row per benchmark of guidellm's JSON report."""
    rows = []
    for b in report["benchmarks"]:
        m = b["metrics"]

        def stat(name: str, key: str, m=m) -> float:
            s = m[name]["successful"]
            return float(s["percentiles"][key]) if s["count"] else float("nan")

        totals = m["request_totals"]
        rows.append(
            {
                "client": "guidellm (chat, stream)",
                "n": b["config"]["strategy"].get("streams") or b["config"]["strategy"].get("max_concurrency"),
                "ok": int(totals["successful"]),
                "errors": int(totals["errored"]),
                "req_s": float(m["requests_per_second"]["successful"]["mean"]),
                "tok_s": float(m["output_tokens_per_second"]["successful"]["mean"]),
                "ttft50": stat("time_to_first_token_ms", "p50"),
                "ttft99": stat("time_to_first_token_ms", "p99"),
                "itl50": stat("inter_token_latency_ms", "p50"),
                "itl99": stat("inter_token_latency_ms", "p99"),
            }
        )
    return rows


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_guidellm(args, url: str, model: str, model_dir: str) -> tuple[list[dict], str, float]:
    """(rows, the command as run, the cores guidellm's processes used over its run: CPU s / wall s);
    raises when guidellm failed."""
    cpu0, t0 = children_cpu(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "guidellm.json")
        cmd = guidellm_command(args, url, model, model_dir, report)
        shown = " ".join(["guidellm", *cmd[3:]]).replace(report, "report.json")
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if r.returncode != 0 or not os.path.isfile(report):
            tail = (r.stdout + r.stderr)[-1500:]
            raise RuntimeError(f"guidellm exited {r.returncode}: {tail}")
        with open(report) as f:
            rows = guidellm_rows(json.load(f))
    return rows, shown, (children_cpu() - cpu0) / (time.perf_counter() - t0)


# ---- bench.serve_load's generator ------------------------------------------------------------


async def serve_load_rows(args, url: str, avoid: set[int]) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        for n in args.concurrency:
            cpu0, t0 = time.process_time(), time.perf_counter()
            st = await completion_run(
                client, url, n, args.prompt_tokens, args.output_tokens, args.duration, avoid, seed=n
            )
            cores = (time.process_time() - cpu0) / (time.perf_counter() - t0)
            ok = [r for r in st.results if r.ok]
            itl = [(r.latency - r.ttft) / (r.tokens - 1) * 1e3 for r in ok if r.tokens > 1]
            rows.append(
                {
                    "client": "bench.serve_load (completions, stream)",
                    "n": n,
                    "ok": len(ok),
                    "errors": len(st.results) - len(ok),
                    "req_s": len(ok) / st.elapsed,
                    "tok_s": sum(r.tokens for r in ok) / st.elapsed,
                    "ttft50": pct([r.ttft * 1e3 for r in ok], 0.5),
                    "ttft99": pct([r.ttft * 1e3 for r in ok], 0.99),
                    "itl50": pct(itl, 0.5),
                    "itl99": pct(itl, 0.99),
                    "error_kinds": sorted({r.error for r in st.results if not r.ok})[:3],
                    "client_cores": cores,
                }
            )
    return rows


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the built-in default model)")
    p.add_argument("--workers", type=int, default=server_default("num_workers"), help="of the started server")
    p.add_argument(
        "--transport",
        default=server_default("transport"),
        choices=("ray", "compiled", "socket"),
        help="ditto",
    )
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrent streams")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency, each load client")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.skip = {x for x in args.skip.split(",") if x}
    if args.skip - set(PARTS):
        p.error(f"--skip takes {', '.join(PARTS)}")
    return args


def fmt(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = str(args.model or default_model_dir())
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    server = None
    url = args.url
    if url is None:
        print(f"model {model_dir}; starting the server ...", file=sys.stderr, flush=True)
        server = start_server(
            model_dir,
            num_workers=args.workers,
            transport=args.transport,
            options=ServerOptions(http_port=0, grpc_port=0),
            progress="off",
        )
        url = server.http_url
    url = url.rstrip("/")
    checks: list[Check] = []
    rows: list[dict] = []
    problems: list[str] = []
    guidellm_shown, guidellm_cores = "", float("nan")
    try:
        card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        model, max_model_len = card["id"], int(card["max_model_len"])
        base = f"{url}/v1"
        if "litellm" not in args.skip:
            checks += litellm_checks(base, model, max_model_len)
        if "langchain" not in args.skip:
            checks += langchain_checks(base, model)
        if "guidellm" not in args.skip:
            print("guidellm ...", file=sys.stderr, flush=True)
            try:
                g, guidellm_shown, guidellm_cores = run_guidellm(args, url, model, model_dir)
                rows += g
            except Exception as e:
                problems.append(f"guidellm: {type(e).__name__}: {e}")
        if "serve_load" not in args.skip:
            print("bench.serve_load's generator ...", file=sys.stderr, flush=True)
            rows += asyncio.run(serve_load_rows(args, url, eos_ids(model_dir)))
    finally:
        if server is not None:
            server.shutdown()
    load_after = os.getloadavg()

    print()
    print(
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs. Server: {'started here' if server else url}, "
        f"{args.transport} transport, {args.workers} workers, model {os.path.basename(model_dir)} "
        f"(context {max_model_len}). Load average (1, 5, 15 min) at the start "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, at the end {' '.join(f'{x:.2f}' for x in load_after)}. "
        f"Wall time {time.perf_counter() - t_start:.0f} s."
    )
    print()
    print("```")
    print(" ".join(["python -m bench.client_tools", *(sys.argv[1:] if argv is None else argv)]))
    if guidellm_shown:
        print(guidellm_shown)
    print("```")
    if checks:
        print()
        print("| client | call | result | s | detail |")
        print("|---|---|---|---|---|")
        for c in checks:
            print(f"| {c.client} | {c.call} | {'ok' if c.ok else 'FAILED'} | {c.seconds:.1f} | {c.detail} |")
    if rows:
        print()
        print(
            f"{args.prompt_tokens} prompt tokens, {args.output_tokens} new, {args.duration:g} s per concurrency "
            "(TTFT and ITL over the successful requests; ITL: a request's (latency - TTFT) / (tokens - 1); "
            "guidellm's rates count the requests done within the window, bench.serve_load's let the started "
            "ones finish; client CPU cores: the load client's own CPU seconds over its wall time, guidellm's "
            "over its whole sweep):"
        )
        print()
        print(
            "| client | concurrency | requests ok | errors | requests/s | output tokens/s "
            "| TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | client CPU cores |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            cores = r.get("client_cores", guidellm_cores)
            print(
                f"| {r['client']} | {r['n']} | {r['ok']} | {r['errors']} | {fmt(r['req_s'], 2)} "
                f"| {fmt(r['tok_s'])} | {fmt(r['ttft50'])} | {fmt(r['ttft99'])} | {fmt(r['itl50'])} "
                f"| {fmt(r['itl99'])} | {fmt(cores, 2)}{'' if 'client_cores' in r else ' (sweep)'} |"
            )
            if r["errors"]:
                problems.append(
                    f"{r['client']} at {r['n']}: {r['errors']} errored requests {r.get('error_kinds', '')}"
                )
    problems += [f"{c.client} {c.call}: {c.detail}" for c in checks if not c.ok]
    if problems:
        print()
        print("Problems:")
        for p in problems:
            print(f"- {p}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
