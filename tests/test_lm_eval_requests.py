"""lm-evaluation-harness 0.4's requests against a real server, without lm-eval installed.

The bodies below are the ones lm-eval 0.4.13's `local-completions` and `local-chat-completions` sent
to the server during `python -m bench.lm_eval_check --capture` (its `_create_payload`, field for
field): loglikelihood as token ids (batched, 8 prompts a request with batch_size=8, or one),
loglikelihood as text (`tokenized_requests=False`), generate_until as ids and as chat messages, and
the tokenizer probe (`tokenizer_backend=auto`: /tokenizer_info, /tokenize, /detokenize). The answers
are parsed as lm-eval parses them (`parse_logprobs`, re-implemented in a few lines; lm-eval's own when
it is installed) and compared with transformers on the same checkpoint: every loglikelihood within
1e-4 per token (fp32), the same is_greedy, the same greedy text.
"""

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.lm_eval_check import MC, TASK_DIR, encode_pair
from router_service.default_model import default_model_dir
from router_service.serving.launch import ServerOptions, start_server

TOL = 1e-4  # per token, fp32
SEED = 1234  # lm-eval's default seed, sent in every body


@pytest.fixture(scope="module")
def model_dir():
    return default_model_dir()  # ships its tokenizer and chat template


@pytest.fixture(scope="module")
def server(model_dir):
    with start_server(
        model_dir, num_workers=2, options=ServerOptions(http_port=0, grpc_port=0), progress="off"
    ) as s:
        yield s


@pytest.fixture(scope="module")
def served(server):
    return httpx.get(f"{server.http_url}/v1/models", timeout=30).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pairs(tokenizer):
    """(context ids, continuation ids) of the first multiple-choice items, as lm-eval splits them."""
    docs = [json.loads(line) for line in (TASK_DIR / f"{MC}.jsonl").read_text().splitlines()[:3]]
    return [encode_pair(tokenizer, d["question"], c) for d in docs for c in d["choices"]]


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.http_url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def loglikelihood_body(served: str, prompt) -> dict:
    """LocalCompletionsAPI._create_payload(generate=False)."""
    return {
        "model": served,
        "prompt": prompt,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": SEED,
        "echo": True,
    }


def parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool, list[float]]]:
    """lm-eval's LocalCompletionsAPI.parse_logprobs: per choice (by index), the echoed logprobs
    after the context, less the generated token at the end; greedy when each is its position's top.
    (Also returns the per-token list, which lm-eval sums.)"""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens, strict=True):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        greedy = all(lp == max(top.values()) for lp, top in zip(lps, tops, strict=True))
        res.append((sum(lps), greedy, lps))
    return res


def hf_continuation(reference, ids: list[int], ctxlen: int) -> tuple[list[float], bool]:
    """transformers: each continuation token's logprob given what precedes it, and whether each is
    the argmax."""
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), -1)
    rows = logp[ctxlen - 1 : len(ids) - 1]
    nxt = torch.tensor(ids[ctxlen:])
    return rows.gather(1, nxt[:, None])[:, 0].tolist(), bool((rows.argmax(-1) == nxt).all())


def assert_matches(parsed, reference, ids: list[int], ctxlen: int) -> None:
    total, greedy, lps = parsed
    want, want_greedy = hf_continuation(reference, ids, ctxlen)
    assert len(lps) == len(want)
    assert max(abs(a - b) for a, b in zip(lps, want, strict=True)) <= TOL
    assert abs(total - sum(want)) <= TOL * len(want)
    assert greedy == want_greedy


def hf_greedy_text(reference, tokenizer, ids: list[int], n: int, stop: str) -> str:
    out = reference.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    text = tokenizer.decode(out[0, len(ids) :].tolist())
    return text.split(tokenizer.eos_token)[0].split(stop)[0]  # the server stops at EOS too


# ---- loglikelihood ---------------------------------------------------------------------------------


def test_batched_token_id_loglikelihood_equals_transformers(server, served, reference, tokenizer, pairs):
    """batch_size > 1: several token-id prompts in one request (add_bos_token=True's shape: BOS
    first, counted in the context)."""
    bos = tokenizer.bos_token_id
    inputs = [[bos, *ctx, *cont] for ctx, cont in pairs]
    ctxlens = [1 + len(ctx) for ctx, _ in pairs]
    out = post(server, "/v1/completions", loglikelihood_body(served, inputs))
    assert len(out["choices"]) == len(inputs)
    for ids, ctxlen, parsed in zip(inputs, ctxlens, parse_logprobs(out, ctxlens), strict=True):
        assert_matches(parsed, reference, ids, ctxlen)


def test_single_token_id_loglikelihood_equals_transformers(server, served, reference, pairs):
    """batch_size 1 (and the aiohttp path of num_concurrent > 1): one prompt, still a list of lists;
    no special tokens (the API backends' default)."""
    for ctx, cont in pairs[:3]:
        out = post(server, "/v1/completions", loglikelihood_body(served, [ctx + cont]))
        choice = out["choices"][0]
        lp = choice["logprobs"]
        n = len(ctx) + len(cont)
        # the echoed prompt then the generated token: lm-eval drops the last one ([ctxlen:-1])
        assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["tokens"]) == n + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
        (parsed,) = parse_logprobs(out, [len(ctx)])
        assert_matches(parsed, reference, ctx + cont, len(ctx))


def test_longest_request_fills_the_context(server, served, reference, tokenizer):
    """lm-eval's API backends (default max_length 2048) send at most max_length - 1 tokens and ask for
    one more: the model's whole context (2048 positions), which must be served, and scored exactly.
    One token more is refused with OpenAI's context_length_exceeded."""
    context = reference.config.max_position_embeddings
    g = torch.Generator().manual_seed(0)
    ids = [tokenizer.bos_token_id, *torch.randint(32, 127, (context - 2,), generator=g).tolist()]
    ctxlen = context - 1 - 8  # the last 8 tokens scored
    out = post(server, "/v1/completions", loglikelihood_body(served, [ids]))
    (parsed,) = parse_logprobs(out, [ctxlen])
    assert_matches(parsed, reference, ids, ctxlen)
    r = httpx.post(
        f"{server.http_url}/v1/completions", json=loglikelihood_body(served, [[*ids, 32]]), timeout=120
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # max_tokens 0 (echo alone) needs no room for a completion: a prompt of the whole context scores
    whole = {**loglikelihood_body(served, [[*ids, 32]]), "max_tokens": 0}
    out = post(server, "/v1/completions", whole)
    assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == context
    r = httpx.post(
        f"{server.http_url}/v1/completions", json={**whole, "prompt": [[*ids, 32, 33]]}, timeout=120
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_text_prompt_loglikelihood_has_bos_as_vllm(server, served, reference, tokenizer, pairs):
    """tokenized_requests=False: the prompt goes as text, which the server tokenizes with the
    tokenizer's special tokens (BOS here), as vLLM does; the echo covers the BOS, so a client that
    counts the context without it slices one token early (docs/evaluation.md)."""
    ctx, cont = pairs[0]
    text = tokenizer.decode(ctx + cont)
    out = post(server, "/v1/completions", loglikelihood_body(served, text))
    lp = out["choices"][0]["logprobs"]
    ids = [tokenizer.bos_token_id, *ctx, *cont]
    assert lp["tokens"][0] == tokenizer.bos_token and len(lp["token_logprobs"]) == len(ids) + 1
    (parsed,) = parse_logprobs(out, [1 + len(ctx)])  # the context counted with its BOS: exact
    assert_matches(parsed, reference, ids, 1 + len(ctx))


def test_lm_evals_own_parser_agrees(server, served, reference, pairs):
    lm_eval_api = pytest.importorskip("lm_eval.models.openai_completions")
    inputs = [ctx + cont for ctx, cont in pairs[:4]]
    ctxlens = [len(ctx) for ctx, _ in pairs[:4]]
    out = post(server, "/v1/completions", loglikelihood_body(served, inputs))
    theirs = lm_eval_api.LocalCompletionsAPI.parse_logprobs(out, tokens=inputs, ctxlens=ctxlens)
    ours = parse_logprobs(out, ctxlens)
    assert [(t, g) for t, g, _ in ours] == [tuple(x) for x in theirs]
    for ids, ctxlen, parsed in zip(inputs, ctxlens, ours, strict=True):
        assert_matches(parsed, reference, ids, ctxlen)


# ---- generate_until ----------------------------------------------------------------------------------


def test_generate_until_token_ids_equals_transformers_greedy(server, served, reference, tokenizer):
    prompts = ["def __init__(self", "for i in range("]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    body = {
        "prompt": ids,
        "model": served,
        "max_tokens": 16,
        "temperature": 0.0,
        "stop": ["\n", tokenizer.eos_token],
        "seed": SEED,
    }
    out = post(server, "/v1/completions", body)
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]  # parse_generations
    assert texts == [hf_greedy_text(reference, tokenizer, i, 16, "\n") for i in ids]


def test_chat_generate_until_equals_transformers_greedy(server, served, reference, tokenizer):
    messages = [{"role": "user", "content": "import "}]
    body = {
        "messages": messages,
        "model": served,
        "max_tokens": 16,
        "temperature": 0.0,
        "stop": ["\n"],
        "seed": SEED,
    }
    out = post(server, "/v1/chat/completions", body)
    # as lm-eval's hf backend renders it: the template's text (which writes the BOS), then its tokens
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert out["choices"][0]["message"]["content"] == hf_greedy_text(reference, tokenizer, ids, 16, "\n")


# ---- the tokenizer probe (tokenizer_backend=auto / remote) -------------------------------------------


def test_remote_tokenizer_probe(server, tokenizer):
    base = server.http_url
    info = httpx.get(f"{base}/tokenizer_info", timeout=30).json()
    # check_remote_tokenizer_support: a dict with eos_token, and /tokenize answering a list
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template  # RemoteTokenizer.apply_chat_template
    probe = post(server, "/tokenize", {"prompt": "test", "add_special_tokens": False})
    assert probe["tokens"] == tokenizer.encode("test", add_special_tokens=False)
    # RemoteTokenizer.eos_token_id / bos_token_id: encode(the token's text)[0]
    for name in ("eos", "bos"):
        text = getattr(tokenizer, f"{name}_token")
        got = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]
        assert got[0] == getattr(tokenizer, f"{name}_token_id")
    ids = tokenizer.encode("    def __repr__(self):\n        return", add_special_tokens=False)
    assert post(server, "/detokenize", {"tokens": ids})["prompt"] == tokenizer.decode(ids)
