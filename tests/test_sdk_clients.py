"""What litellm and langchain-openai depend on, over plain HTTP against a real server (CI installs
only `.[test]`, without them), and the SDKs themselves where they are installed (`.[clients]`).

tests/test_serving.py already checks the context error of a request with max_tokens, chat without
max_tokens (non-streamed) and the official client's chunks. Here, what those SDKs send and parse
that it does not: a conversation that has grown past the context with no max_tokens, streamed or
not (litellm's fallbacks fire only on a 400 `context_length_exceeded`, and a stream must be refused
before it starts, not with an error event), the context's edge, a streamed chat with no max_tokens
(langchain's `.stream()`), and the raw server-sent events the SDKs parse: one id, the role first,
`finish_reason` only on the last choice chunk, a usage chunk with `choices: []` only when asked.
bench/client_tools.py runs the SDKs at length and a guidellm sweep.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

from router_service.default_model import default_model_dir
from router_service.serving.launch import ServerOptions, start_server
from router_service.serving.settings import ServingSettings

# litellm fetches a price list from the network at import unless told to use its packaged copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODEL = "tiny-moe"
CONTEXT = 160  # --max-model-len: small, so that a chat with no max_tokens ends quickly


@pytest.fixture(scope="module")
def server():
    with start_server(
        default_model_dir(),
        num_workers=2,
        options=ServerOptions(http_port=0, grpc_port=0),
        settings=ServingSettings(model_name=MODEL, max_model_len=CONTEXT),
        progress="off",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=120) as c:
        yield c


def prompt_tokens(http, messages) -> int:
    r = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": True})
    assert r.status_code == 200, r.text
    return r.json()["count"]


def user(n_chars: int) -> list[dict]:
    return [{"role": "user", "content": "x" * n_chars}]  # byte-level: one token a character


def events(r: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, checking its framing."""
    assert r.headers["content-type"].startswith("text/event-stream"), r.headers
    out = []
    for block in r.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            out.append(block[len("data: ") :])
    return out


def test_a_conversation_past_the_context_without_max_tokens_is_context_length_exceeded(http):
    """What litellm maps to ContextWindowExceededError (and langchain-openai to its BadRequest):
    400, OpenAI's error shape and code, vLLM's message; a stream is refused the same way, before
    it starts."""
    messages = user(CONTEXT)
    n = prompt_tokens(http, messages)
    for stream in (False, True):
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "stream": stream})
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json")
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
        assert err["message"].startswith(
            f"This model's maximum context length is {CONTEXT} tokens. However, your messages resulted "
            f"in {n} tokens."
        ), err["message"]


def test_the_context_edge_without_max_tokens(http):
    """A prompt one short of the context gets its one token; one that fills it is refused."""
    base = prompt_tokens(http, user(0))
    short = user(CONTEXT - 1 - base)
    assert prompt_tokens(http, short) == CONTEXT - 1
    body = http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": short, "temperature": 0, "ignore_eos": True}
    ).json()
    assert body["usage"] == {"prompt_tokens": CONTEXT - 1, "completion_tokens": 1, "total_tokens": CONTEXT}
    assert body["choices"][0]["finish_reason"] == "length"
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user(CONTEXT - base)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_a_stream_without_max_tokens_runs_to_the_context_in_the_chunks_sdks_parse(http):
    """langchain-openai's `.stream()` and litellm's `stream=True` send no max_tokens: the stream
    runs to the context (not 16 tokens). Its events: one id and model, `chat.completion.chunk`,
    the role in the first delta, `finish_reason` null until the last choice chunk, then the usage
    chunk with no choices (asked for with include_usage), then [DONE]."""
    messages = [{"role": "user", "content": "Tell me about experts."}]
    n = prompt_tokens(http, messages)
    body = {
        "model": MODEL,
        "messages": messages,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = events(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {MODEL} and all(isinstance(c["created"], int) for c in chunks)
    usage, choice_chunks = chunks[-1], chunks[:-1]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": n,
        "completion_tokens": CONTEXT - n,
        "total_tokens": CONTEXT,
    }
    assert all(len(c["choices"]) == 1 and "usage" not in c for c in choice_chunks)
    assert choice_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in choice_chunks)
    assert len(text) > 16
    # without include_usage: no usage chunk (litellm and langchain then count nothing, as with OpenAI)
    r = http.post("/v1/chat/completions", json={**body, "stream_options": None, "max_tokens": 3})
    chunks = [json.loads(d) for d in events(r)[:-1]]
    assert all(c["choices"] and not c.get("usage") for c in chunks)


# ---- the SDKs themselves, where installed (pip install -e '.[clients]') -----------------------------


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)


def test_litellm_context_window_error_and_default_length(server):
    litellm = pytest.importorskip("litellm")
    kw = dict(model=f"openai/{MODEL}", api_base=f"{server.http_url}/v1", api_key="unused", temperature=0)
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(messages=user(CONTEXT), **kw)
    r = litellm.completion(
        messages=[{"role": "user", "content": "Hi"}], extra_body={"ignore_eos": True}, **kw
    )
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT


def test_langchain_structured_output_and_tools(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        base_url=f"{server.http_url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=64
    )
    for method in ("json_schema", "function_calling"):
        assert isinstance(llm.with_structured_output(Person, method=method).invoke("Who?"), Person), method
    m = llm.bind_tools([Person], tool_choice="required", parallel_tool_calls=False).invoke("Who?")
    assert [c["name"] for c in m.tool_calls] == ["Person"]
    Person.model_validate(m.tool_calls[0]["args"])
