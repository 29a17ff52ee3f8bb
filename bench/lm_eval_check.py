"""lm-evaluation-harness against the server, checked against transformers on the same checkpoint.

Needs the `eval` extra (`pip install -e '.[eval]'`: lm-eval 0.4 with its `api` and `hf` extras).
In one run:

1. lm-eval's own `hf` backend on the checkpoint (fp32, CPU, in this process, before the server
   starts so the two do not compete for the cores) on the shipped tasks of bench/lm_eval_tasks/:
   `moe_tiny_mc` (30 multiple-choice items: loglikelihood), `moe_tiny_ppl` (5 texts:
   loglikelihood_rolling; one of 3098 tokens makes two windows, the first 2047 tokens long, which
   with the one token lm-eval asks to generate fills the model's 2048 positions) and `moe_tiny_gen`
   (6 prompts: greedy generate_until), twice: as lm-eval runs it by default (the tokenizer's own
   special tokens: this checkpoint's BOS first) and with `add_bos_token=False` (what lm-eval's API
   backends send by default); then `moe_tiny_gen` with `apply_chat_template` (the reference of the
   chat run);
2. starts the server (`start_server`, what `moe-serve serve` runs; free ports), or uses `--url`;
3. lm-eval's `local-completions` on /v1/completions, three ways:
   - `hf-tokenizer, add_bos_token`: lm-eval tokenizes with the checkpoint's own tokenizer
     (`tokenizer=<dir>`, `add_bos_token=True`) and sends token ids, 8 prompts per request (batched
     prompts); against the default hf run;
   - `server-tokenizer`: `tokenizer_backend=auto`, which probes /tokenizer_info and /tokenize and
     uses the server's tokenizer (checked: the backend must come out "remote"); token ids without
     BOS (the remote tokenizer adds no special tokens), one prompt per request, 4 concurrent requests
     (lm-eval's aiohttp path); against the `add_bos_token=False` hf run;
   - `text-prompts` (`tokenized_requests=False`): the prompts go as text. Not compared: the server
     tokenizes a text prompt as vLLM does, with the tokenizer's special tokens (BOS), while lm-eval
     counts the context's tokens without them, so its slice of the echoed logprobs is one token
     off; and a rolling window that fills the context is one token too long (400), so this run
     leaves `moe_tiny_ppl` out. Its figures are printed for information (docs/evaluation.md);
   and `local-chat-completions` on /v1/chat/completions (`moe_tiny_gen`, the chat template);
4. compares every run with its hf reference, per request (log_samples): each loglikelihood within
   `--tol` (1e-4) per token scored (|diff| <= tol * tokens), the same is_greedy, the same
   generated text; the same counted scores (acc, acc_norm, exact_match), and perplexities within
   a relative `--tol`;
5. a third check without lm-eval in the middle: for the first `--direct` multiple-choice items it
   posts the body lm-eval sends (token ids, `echo`, `logprobs: 1`, `max_tokens: 1`) and compares
   every echoed prompt token's logprob with transformers' own log_softmax (per token, `--tol`),
   and lm-eval's sum of the continuation with the hf backend's (`add_bos_token=False`).

It prints the tables and exits 1 on any mismatch. `--capture FILE` puts a logging proxy between
lm-eval and the server and writes the first request bodies of each kind to FILE (how
tests/test_lm_eval_requests.py got its bodies).

    python -m bench.lm_eval_check
    python -m bench.lm_eval_check --url http://127.0.0.1:8000 --capture /tmp/lm_eval_requests.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import torch
import yaml

from bench.serve_load import cpu_model, server_default
from router_service.default_model import default_model_dir
from router_service.serving.launch import ServerOptions, start_server

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
MC, PPL, GEN = "moe_tiny_mc", "moe_tiny_ppl", "moe_tiny_gen"
LOGLIKELIHOOD_TASKS = (MC, PPL)
API_MAX_LENGTH = 2048  # lm-eval's default for its API backends, = the built-in model's positions


def task_config(name: str) -> dict:
    """The shipped YAML with its data file as an absolute path (the YAML's own path is relative to
    the repository root, for the lm_eval CLI run from there)."""
    cfg = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"]["test"] = str(TASK_DIR / f"{name}.jsonl")
    return cfg


# ---- a logging proxy (--capture) -------------------------------------------------------------------


class CaptureProxy:
    """http://127.0.0.1:<port> forwarding every request to `upstream`, keeping the first `keep`
    JSON bodies per (method, path, kind); kind tells lm-eval's request shapes apart."""

    def __init__(self, upstream: str, keep: int = 3):
        self.upstream, self.keep, self.seen = upstream.rstrip("/"), keep, {}
        self.lock = threading.Lock()
        self.client = httpx.Client(timeout=300)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _forward(self, method: str):
                n = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(n) if n else b""
                r = proxy.client.request(
                    method,
                    proxy.upstream + self.path,
                    content=raw,
                    headers={"content-type": "application/json"},
                )
                proxy.record(method, self.path, raw, r)
                self.send_response(r.status_code)
                self.send_header("content-type", r.headers.get("content-type", "application/json"))
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def record(self, method: str, path: str, raw: bytes, r: httpx.Response) -> None:
        body = json.loads(raw) if raw else None
        kind = ""
        if isinstance(body, dict) and path.startswith("/v1/"):
            kind = "echo" if body.get("echo") else ("messages" if "messages" in body else "generate")
            if path == "/v1/completions":
                p = body.get("prompt")
                kind += "/ids" if isinstance(p, list) and p and isinstance(p[0], list) else "/text"
        key = f"{method} {path} {kind}".strip()
        with self.lock:
            got = self.seen.setdefault(key, [])
            if len(got) < self.keep:
                got.append({"request": body, "status": r.status_code, "response": r.json()})

    def close(self) -> None:
        self.httpd.shutdown()
        self.client.close()


# ---- runs and comparisons --------------------------------------------------------------------------


def evaluate(lm_eval, model, tasks: list[str], **kw) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model,
        tasks=[task_config(t) for t in tasks],
        log_samples=True,
        task_manager=lm_eval.tasks.TaskManager(),
        **kw,
    )
    return out, time.perf_counter() - t0


def responses(out: dict, task: str) -> dict[int, list]:
    """doc_id -> the per-request answers (loglikelihood: (ll, is_greedy) per choice; rolling: [ll];
    generate: [text])."""
    return {s["doc_id"]: [r[0] for r in s["resps"]] for s in out["samples"][task]}


def scores(out: dict, task: str) -> dict[str, float]:
    return {
        k.split(",")[0]: v
        for k, v in out["results"][task].items()
        if "," in k and "stderr" not in k and isinstance(v, int | float)
    }


def n_tokens(tokenizer, out: dict, task: str) -> dict[int, list[int]]:
    """doc_id -> tokens scored per request (the continuation's; a rolling text's all)."""
    res = {}
    for s in out["samples"][task]:
        res[s["doc_id"]] = [
            max(1, len(tokenizer.encode(a[-1] if task == MC else a[0], add_special_tokens=False)))
            for a in s["arguments"]
        ]
    return res


def compare(run: dict, ref: dict, tokenizer, tasks: list[str], tol: float) -> dict:
    """Per request against the hf backend: max |Δll|, max |Δll| / token, greedy and text equality,
    scores."""
    cmp = {"requests": 0, "max_abs": 0.0, "max_per_token": 0.0, "bad": [], "scores_equal": True}
    for task in tasks:
        got, want = responses(run, task), responses(ref, task)
        toks = n_tokens(tokenizer, ref, task) if task in LOGLIKELIHOOD_TASKS else None
        if set(got) != set(want):
            cmp["bad"].append(f"{task}: docs {sorted(set(got) ^ set(want))} missing")
        for doc in sorted(set(got) & set(want)):
            for k, (g, w) in enumerate(zip(got[doc], want[doc], strict=True)):
                cmp["requests"] += 1
                if task == GEN:
                    if g != w:
                        cmp["bad"].append(f"{task} doc {doc}: generated {g!r}, hf {w!r}")
                    continue
                g_ll, w_ll = (g[0], w[0]) if task == MC else (g, w)
                diff = abs(g_ll - w_ll)
                cmp["max_abs"] = max(cmp["max_abs"], diff)
                cmp["max_per_token"] = max(cmp["max_per_token"], diff / toks[doc][k])
                if not diff <= tol * toks[doc][k]:
                    cmp["bad"].append(
                        f"{task} doc {doc}.{k}: ll {g_ll:.6f}, hf {w_ll:.6f} (|diff| {diff:.2e})"
                    )
                if task == MC and g[1] != w[1]:
                    cmp["bad"].append(f"{task} doc {doc}.{k}: is_greedy {g[1]}, hf {w[1]}")
        if not scores_equal(scores(run, task), scores(ref, task), tol):
            cmp["scores_equal"] = False
            cmp["bad"].append(f"{task}: scores {scores(run, task)}, hf {scores(ref, task)}")
    return cmp


def direct_check(url: str, served: str, model, tokenizer, ref: dict, items: int, tol: float) -> dict:
    """lm-eval's loglikelihood body posted by hand; every echoed token's logprob against
    transformers' log_softmax, and the continuation's sum against the hf backend's."""
    docs = [json.loads(line) for line in (TASK_DIR / f"{MC}.jsonl").read_text().splitlines()][:items]
    want_ll = responses(ref, MC)
    res = {"requests": 0, "tokens": 0, "max_per_token": 0.0, "max_vs_hf_backend": 0.0, "bad": []}
    with httpx.Client(timeout=60) as client:
        for doc_id, doc in enumerate(docs):
            for k, choice in enumerate(doc["choices"]):
                ctx, cont = encode_pair(tokenizer, doc["question"], choice)
                ids = ctx + cont
                body = {
                    "model": served,
                    "prompt": [ids],
                    "temperature": 0,
                    "max_tokens": 1,
                    "logprobs": 1,
                    "seed": 1234,
                    "echo": True,
                }
                r = client.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
                lp = r.json()["choices"][0]["logprobs"]
                served_lp = lp["token_logprobs"][: len(ids)]  # the prompt's; then the generated token
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0].float()
                hf_lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
                if served_lp[0] is not None or len(lp["token_logprobs"]) != len(ids) + 1:
                    res["bad"].append(
                        f"doc {doc_id}.{k}: echo shape {len(lp['token_logprobs'])} for {len(ids)}"
                    )
                    continue
                diffs = (torch.tensor(served_lp[1:], dtype=torch.float64) - hf_lp.double()).abs()
                res["requests"] += 1
                res["tokens"] += len(diffs)
                res["max_per_token"] = max(res["max_per_token"], float(diffs.max()))
                if float(diffs.max()) > tol:
                    res["bad"].append(f"doc {doc_id}.{k}: per-token |diff| {float(diffs.max()):.2e}")
                parsed = sum(lp["token_logprobs"][len(ctx) : -1])  # lm-eval's parse_logprobs
                d = abs(parsed - want_ll[doc_id][k][0])
                res["max_vs_hf_backend"] = max(res["max_vs_hf_backend"], d)
                if d > tol * len(cont):
                    res["bad"].append(
                        f"doc {doc_id}.{k}: sum {parsed:.6f} vs hf backend {want_ll[doc_id][k][0]:.6f}"
                    )
    return res


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair without special tokens (its API backends' default): the
    context's trailing spaces move to the continuation; the continuation's ids are the whole's after
    the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def scores_equal(got: dict[str, float], want: dict[str, float], tol: float) -> bool:
    """Counted metrics (acc, acc_norm, exact_match) exactly; perplexities and bits per byte, which
    are functions of summed loglikelihoods, to a relative `tol`."""
    if set(got) != set(want):
        return False
    return all(
        math.isclose(got[m], want[m], rel_tol=tol, abs_tol=0.0)
        if "perplexity" in m or m == "bits_per_byte"
        else got[m] == want[m]
        for m in got
    )


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) and abs(v) < 1e5 else f"{v:.4g}"
    return str(v)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the built-in model)")
    p.add_argument(
        "--url", default=None, help="use this running server (serving --model) instead of starting one"
    )
    p.add_argument("--workers", type=int, default=2, help="expert workers of the started server")
    p.add_argument("--transport", default=server_default("transport"), choices=("ray", "compiled", "socket"))
    p.add_argument("--tol", type=float, default=1e-4, help="absolute loglikelihood tolerance per token")
    p.add_argument(
        "--direct", type=int, default=5, help="multiple-choice items of the direct transformers check"
    )
    p.add_argument("--capture", default=None, help="write the request bodies lm-eval sent to this JSON file")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)

    import lm_eval  # the `eval` extra: not a dependency of the package
    import lm_eval.tasks
    from lm_eval.api.registry import get_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    model_dir = str(args.model or default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"model {model_dir}; lm-eval {lm_eval.__version__}; {cpu_model()}", file=sys.stderr, flush=True)
    all_tasks = [MC, PPL, GEN]

    print("lm-eval hf backend ...", file=sys.stderr, flush=True)
    # max_length: the API backends cut rolling (perplexity) texts into windows of max_length - 2
    # tokens (2046 at their default 2048, so that a window plus the one token they ask to generate
    # fits the model's 2048 positions), hf into windows of max_length: the same windows need 2046.
    hf_args = {"pretrained": model_dir, "dtype": "float32", "device": "cpu", "max_length": API_MAX_LENGTH - 2}
    # lm-eval's hf backend encodes with the tokenizer's defaults (this one adds BOS); its API backends
    # send no special tokens unless add_bos_token=True. Both references, each run against its own.
    ref, ref_s = evaluate(lm_eval, "hf", all_tasks, model_args=hf_args, batch_size=8)
    ref_nobos, _ = evaluate(
        lm_eval, "hf", all_tasks, model_args=dict(hf_args, add_bos_token=False), batch_size=8
    )
    ref_chat, ref_chat_s = evaluate(
        lm_eval, "hf", [GEN], model_args=hf_args, batch_size=8, apply_chat_template=True
    )

    failures: list[str] = []
    figures: dict = {
        "lm_eval": lm_eval.__version__,
        "model": model_dir,
        "tol_per_token": args.tol,
        "runs": {},
    }
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            print(
                f"starting the server ({args.transport}, {args.workers} workers) ...",
                file=sys.stderr,
                flush=True,
            )
            t0 = time.perf_counter()
            server = stack.enter_context(
                start_server(
                    model_dir,
                    num_workers=args.workers,
                    transport=args.transport,
                    options=ServerOptions(http_port=0, grpc_port=0),
                    progress="off",
                )
            )
            url = server.http_url
            print(f"  {url} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        served = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        base = url
        proxy = None
        if args.capture:
            proxy = CaptureProxy(url)
            stack.callback(proxy.close)
            base = proxy.url

        completions = {"model": served, "base_url": f"{base}/v1/completions", "max_length": API_MAX_LENGTH}
        runs = {
            "completions, hf-tokenizer, add_bos_token": (
                dict(
                    completions,
                    tokenizer_backend="huggingface",
                    tokenizer=model_dir,
                    add_bos_token=True,
                    batch_size=8,
                ),
                all_tasks,
                {},
                ref,
            ),
            "completions, server-tokenizer": (
                dict(completions, tokenizer_backend="auto", num_concurrent=4),
                all_tasks,
                {},
                ref_nobos,
            ),
            "completions, text-prompts": (
                dict(completions, tokenizer_backend="remote", tokenized_requests=False),
                [MC, GEN],  # moe_tiny_ppl's long text: its first window + BOS + 1 > the context (400)
                {},
                None,  # not compared: see the module's docstring
            ),
            "chat-completions": (
                {"model": served, "base_url": f"{base}/v1/chat/completions"},
                [GEN],
                {"apply_chat_template": True},
                ref_chat,
            ),
        }
        rows = []
        for name, (model_args, tasks, kw, want) in runs.items():
            print(f"lm-eval {name} ...", file=sys.stderr, flush=True)
            kind = "local-chat-completions" if name.startswith("chat") else "local-completions"
            lm = get_model(kind)(**model_args)
            if name == "completions, server-tokenizer" and lm.tokenizer_backend != "remote":
                failures.append(
                    f"{name}: lm-eval did not detect the server's tokenizer ({lm.tokenizer_backend})"
                )
            try:
                out, seconds = evaluate(lm_eval, lm, tasks, **kw)
            except Exception as e:  # a request lm-eval gave up on (after its retries): report, go on
                failures.append(f"{name}: lm-eval raised {type(e).__name__}: {str(e)[:300]}")
                continue
            entry = {"seconds": round(seconds, 1), "scores": {t: scores(out, t) for t in tasks}}
            if want is not None:
                cmp = compare(out, want, tokenizer, tasks, args.tol)
                failures += [f"{name}: {b}" for b in cmp["bad"]]
                entry.update({k: v for k, v in cmp.items() if k != "bad"}, mismatches=len(cmp["bad"]))
            else:
                cmp = compare(out, ref, tokenizer, tasks, math.inf)
                entry.update(max_abs=cmp["max_abs"], requests=cmp["requests"], compared=False)
            figures["runs"][name] = entry
            rows.append((name, entry))

        print("direct transformers check ...", file=sys.stderr, flush=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        direct = direct_check(url, served, model, tokenizer, ref_nobos, args.direct, args.tol)
        failures += [f"direct: {b}" for b in direct["bad"]]
        figures["direct"] = {k: v for k, v in direct.items() if k != "bad"}
        if proxy is not None:
            Path(args.capture).write_text(json.dumps(proxy.seen, indent=1) + "\n")
            print(f"request bodies written to {args.capture}", file=sys.stderr)

    figures["runs"]["hf backend"] = {
        "seconds": round(ref_s, 1),
        "scores": {t: scores(ref, t) for t in all_tasks},
    }
    figures["runs"]["hf backend, chat template"] = {
        "seconds": round(ref_chat_s, 1),
        "scores": {GEN: scores(ref_chat, GEN)},
    }
    figures["wall_s"] = round(time.perf_counter() - t_start, 1)

    print("\n| run | task | metric | served | hf backend |")
    print("|---|---|---|---|---|")
    for name, entry in rows:
        want = runs[name][3] or ref
        for task, sc in entry["scores"].items():
            for metric, v in sc.items():
                print(f"| {name} | {task} | {metric} | {fmt(v)} | {fmt(scores(want, task).get(metric))} |")
    print("\n| run | requests | max abs Δll | max abs Δll / token | scores equal | wall s |")
    print("|---|---|---|---|---|---|")
    for name, e in rows:
        if e.get("compared", True):
            mpt = f"{e['max_per_token']:.2e}"
            eq = "yes" if e["scores_equal"] and not e["mismatches"] else f"NO ({e['mismatches']} mismatches)"
        else:
            mpt, eq = "-", "not compared (BOS, see docs)"
        print(f"| {name} | {e['requests']} | {e['max_abs']:.2e} | {mpt} | {eq} | {e['seconds']} |")
    print(f"| hf backend | | | | | {figures['runs']['hf backend']['seconds']} |")
    print(
        f"\ndirect: {direct['requests']} requests, {direct['tokens']} echoed tokens: max |served - transformers| "
        f"{direct['max_per_token']:.2e} per token; lm-eval's parse vs the hf backend {direct['max_vs_hf_backend']:.2e}"
    )
    print(f"wall {figures['wall_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    if failures:
        print(f"\n{len(failures)} MISMATCHES:", *failures[:50], sep="\n  ")
        sys.exit(1)
    print("all equal")


if __name__ == "__main__":
    main()
