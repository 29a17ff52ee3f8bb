"""OpenAI's completions and chat completions formats: request bodies -> GenerateParams, and
GenerateChunks -> answers, streamed (server-sent events) or whole. Pure functions, no Ray.

Every field of a request is either used or refused with a 400 that names it: an option this server
does not implement (suffix, ...) is never silently ignored. Without max_tokens a
completion makes 16 tokens (OpenAI's completions default) and a chat runs up to the model's context
(OpenAI's and vLLM's chat default). Usage counts each
prompt once and every choice's completion tokens (so n > 1 adds up the n completions), as OpenAI
and vLLM do.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field

from moe_serving.errors import ServingError, invalid
from moe_serving.types import STRUCTURED_KINDS, GenerateChunk, GenerateParams, StructuredOutput, TokenLogprob
from router_service.serving.schemas import ChatCompletionRequest, CompletionRequest, fields_of
from router_service.serving.tools import ToolChoice, ToolStream, parse_tools

# Fields both endpoints take (beyond their prompt) and the GenerateParams field each one sets.
_SAMPLING = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "n": "n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_tokens",
    "ignore_eos": "ignore_eos",
    "top_k": "top_k",
    "min_p": "min_p",
}
# vLLM's older top-level names of the structured outputs
_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# The fields each endpoint accepts are its request model's (`schemas.py`): documented = accepted.
COMPLETION_FIELDS = fields_of(CompletionRequest)
CHAT_FIELDS = fields_of(ChatCompletionRequest)


@dataclass
class OpenAIRequest:
    """A parsed request: one GenerateParams per prompt (n choices each), and how to answer."""

    params: list[GenerateParams]
    stream: bool
    include_usage: bool
    chat: bool
    echo: bool = False  # completions: the prompt's text (and its logprobs) before each choice's
    generate: bool = True  # False for max_tokens 0 (only with echo): the prompt alone
    tools: ToolChoice | None = None  # chat: the tools and tool_choice (`tools.py`)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    @property
    def n(self) -> int:
        return self.params[0].n


def _refuse_unknown(body: dict, allowed: set[str], endpoint: str) -> None:
    unknown = sorted(k for k, v in body.items() if k not in allowed and v is not None)
    if unknown:
        raise invalid(f"{endpoint} on this server does not support: {', '.join(unknown)}")


def _check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ServingError(
            "not_found",
            f"model {model!r} is not served here; this server serves {served!r}",
            reason="model_not_found",
        )


def _sampling(body: dict) -> dict:
    """GenerateParams fields of the sampling options present (absent or null: the defaults)."""
    given = {dst: body[src] for src, dst in _SAMPLING.items() if body.get(src) is not None}
    stop = body.get("stop")
    if stop is not None:
        given["stop"] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    ids = body.get("stop_token_ids")
    if ids is not None:
        given["stop_token_ids"] = tuple(ids) if isinstance(ids, list) else ids
    ids = body.get("allowed_token_ids")
    if ids is not None:
        given["allowed_token_ids"] = tuple(ids) if isinstance(ids, list) else ids
    bias = body.get("logit_bias")
    if bias is not None:
        given["logit_bias"] = _logit_bias(bias)
    structured = _structured(body)
    if structured is not None:
        given["structured"] = structured
    return given


def _logit_bias(bias) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (JSON object keys, so strings) -> bias."""
    if not isinstance(bias, dict):
        raise invalid(f"logit_bias must be an object of token id -> bias, got {bias!r}")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid(f"logit_bias keys must be token ids, got {key!r}") from None
        out[token] = value
    return out


def _structured(body: dict) -> StructuredOutput | None:
    """The one structured output a request asks for: OpenAI's response_format, vLLM's
    structured_outputs, or its older guided_* fields; None for plain text. More than one is a 400."""
    found: list[StructuredOutput] = []
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            found.append(StructuredOutput("json_object"))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
                raise invalid(
                    "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}"
                )
            # strict or not, the schema constrains the output (OpenAI's strict: false is best effort)
            found.append(StructuredOutput("json", spec.get("schema", {})))
        elif kind != "text":
            raise invalid(
                f"response_format must be {{'type': 'text' | 'json_object' | 'json_schema'}}, got {fmt!r}"
            )
    options = body.get("structured_outputs")
    compact = True
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("structured_outputs must be an object")
        unknown = sorted(
            k
            for k, v in options.items()
            if v is not None and k not in (*STRUCTURED_KINDS, "disable_any_whitespace")
        )
        if unknown:
            raise invalid(f"structured_outputs on this server does not support: {', '.join(unknown)}")
        flag = options.get("disable_any_whitespace")
        if flag is not None and not isinstance(flag, bool):
            raise invalid(f"structured_outputs.disable_any_whitespace must be true or false, got {flag!r}")
        compact = flag is not False
        for kind in STRUCTURED_KINDS:
            value = options.get(kind)
            if kind == "json_object":
                if value not in (None, False, True):
                    raise invalid(f"structured_outputs.json_object must be true or false, got {value!r}")
                if value:
                    found.append(StructuredOutput("json_object"))
            elif value is not None:
                found.append(StructuredOutput(kind, value))
    found += [
        StructuredOutput(kind, body[name]) for name, kind in _GUIDED.items() if body.get(name) is not None
    ]
    if len(found) > 1:
        raise invalid(
            "give one structured output (response_format, structured_outputs or guided_*), not several"
        )
    if not found:
        return None
    so = found[0]
    if so.kind == "choice" and not isinstance(so.value, list | tuple):
        raise invalid(f"choice must be a list of strings, got {so.value!r}")
    if so.kind == "choice":
        so = StructuredOutput("choice", tuple(so.value))
    return dataclasses.replace(so, compact_json=compact)


def _streaming(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid(f"stream must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object")
    return stream, bool(options.get("include_usage"))


def parse_completion(body: dict, served: str) -> OpenAIRequest:
    """POST /v1/completions: text or token-id prompts (one or a list), n choices each."""
    _refuse_unknown(body, COMPLETION_FIELDS, "/v1/completions")
    _check_model(body, served)
    if "prompt" not in body:
        raise invalid("missing field 'prompt'")
    n = body.get("n") or 1
    for key, ok in (("best_of", (None, 1, n)), ("suffix", (None,))):
        if body.get(key) not in ok:
            raise invalid(f"{key}={body.get(key)!r} is not supported by this server")
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise invalid(f"echo must be true or false, got {echo!r}")
    stream, include_usage = _streaming(body)
    if echo and stream:
        raise invalid("echo=True with stream=True is not supported by this server; use stream=False")
    # max_tokens 0 (lm-eval's loglikelihood): the prompt's logprobs alone, nothing generated
    generate = not (body.get("max_tokens") == 0 and not isinstance(body.get("max_tokens"), bool))
    if not generate and not echo:
        raise invalid("max_tokens=0 is supported only with echo=True (the prompt's logprobs alone)")
    prompt = body["prompt"]
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
    ):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        prompts = prompt
    else:
        raise invalid("prompt must be a string, a list of token ids, or a list of either")
    given = _sampling(body)
    if not generate:
        given["max_tokens"] = None  # checked as a prompt that must fit the context
    if body.get("logprobs") is not None:
        given["logprobs"] = body["logprobs"]
    params = [
        GenerateParams(
            prompt=p if isinstance(p, str) else None,
            prompt_token_ids=None if isinstance(p, str) else p,
            **given,
        )
        for p in prompts
    ]
    return OpenAIRequest(params, stream, include_usage, chat=False, echo=echo, generate=generate)


def parse_chat(body: dict, served: str) -> OpenAIRequest:
    """POST /v1/chat/completions: one conversation, n choices."""
    _refuse_unknown(body, CHAT_FIELDS, "/v1/chat/completions")
    _check_model(body, served)
    if "messages" not in body:
        raise invalid("missing field 'messages'")
    given = _sampling(body)
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") not in (None, body["max_completion_tokens"]):
            raise invalid("give max_completion_tokens or max_tokens (deprecated), not both")
        given["max_tokens"] = body["max_completion_tokens"]
    given.setdefault("max_tokens", None)  # none given: up to the context, as OpenAI and vLLM do
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise invalid(
            f"logprobs must be true or false for chat (top_logprobs says how many), got {logprobs!r}"
        )
    if top is not None and not logprobs:
        raise invalid("top_logprobs needs logprobs: true")
    if logprobs:
        given["logprobs"] = 0 if top is None else top
    tools = parse_tools(body)
    if tools is not None:
        given = tools.apply(given)
    params = GenerateParams(messages=body["messages"], **given)
    return OpenAIRequest([params], *_streaming(body), chat=True, tools=tools)


# ---- answers --------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(lps: list[TokenLogprob]) -> dict:
    """The completions API's logprobs object (legacy format) for these tokens; text_offset counts
    characters from the start of the choice's text."""
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [
            None if lp.top_logprobs is None else {alt.token: alt.logprob for alt in lp.top_logprobs}
            for lp in lps
        ],
        "text_offset": [lp.text_offset for lp in lps],
    }


def chat_logprobs(lps: list[TokenLogprob]) -> dict:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(lp: TokenLogprob) -> dict:
        return {"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes}

    return {"content": [{**entry(lp), "top_logprobs": [entry(a) for a in lp.top_logprobs]} for lp in lps]}


@dataclass
class Echo:
    """A prompt as echoed before its choices: its text, and its tokens' logprobs when asked for."""

    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Choice:
    """One choice gathered from its chunks (non-streamed answers)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, c: GenerateChunk) -> None:
        self.text.append(c.text)
        self.token_ids += c.token_ids
        if c.logprobs is not None:
            self.logprobs = (self.logprobs or []) + c.logprobs
        self.finish_reason = c.finish_reason or self.finish_reason
        self.completion_tokens = c.completion_tokens


def whole_answer(
    req: OpenAIRequest,
    served: str,
    choices: dict[int, Choice],
    prompt_tokens: int,
    echoes: list[Echo] | None = None,
) -> dict:
    """The non-streamed answer of all choices (indexed prompt * n + choice); with `echoes` (one per
    prompt) each completion choice's text and logprobs start with its prompt's."""
    out = []
    for i in sorted(choices):
        c = choices[i]
        text = "".join(c.text)
        if echoes is not None:
            e = echoes[i // req.n]
            if e.logprobs is not None:
                c.logprobs = e.logprobs + [
                    dataclasses.replace(lp, text_offset=lp.text_offset + len(e.text))
                    for lp in c.logprobs or []
                ]
            text = e.text + text
        if req.chat:
            lp = chat_logprobs(c.logprobs) if c.logprobs is not None else None
            message: dict = {"role": "assistant", "content": text}
            finish = c.finish_reason
            if req.tools is not None:
                content, calls, finish = req.tools.answer(text, finish)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
            out.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": lp,
                    "finish_reason": finish,
                    "token_ids": c.token_ids,  # an extension, as in the completions choices
                }
            )
        else:
            lp = completion_logprobs(c.logprobs) if c.logprobs is not None else None
            out.append(
                {
                    "index": i,
                    "text": text,
                    "token_ids": c.token_ids,
                    "logprobs": lp,
                    "finish_reason": c.finish_reason,
                }
            )
    return {
        "id": req.id,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": req.created,
        "model": served,
        "choices": out,
        "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices.values())),
    }


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class StreamAnswer:
    """Server-sent events of a streamed answer: `chunk(index, c)` per GenerateChunk, `end()` last
    (the usage event when asked for, then [DONE])."""

    def __init__(self, req: OpenAIRequest, served: str, prompt_tokens: int):
        self.req = req
        self.base = {
            "id": req.id,
            "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": req.created,
            "model": served,
        }
        self.prompt_tokens = prompt_tokens
        self.completion_tokens: dict[int, int] = {}
        self.tool_streams: dict[int, ToolStream] = {}

    def start(self) -> list[str]:
        """Chat's opening events: each choice's assistant role."""
        if not self.req.chat:
            return []
        return [
            sse(
                {
                    **self.base,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
            for i in range(self.req.n * len(self.req.params))
        ]

    def chunk(self, index: int, c: GenerateChunk) -> str:
        self.completion_tokens[index] = c.completion_tokens
        finish = c.finish_reason
        if self.req.chat:
            lp = chat_logprobs(c.logprobs) if c.logprobs is not None else None
            delta: dict = {"content": c.text} if c.text else {}
            if self.req.tools is not None:
                delta, finish = self._tool_delta(index, c)
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": lp,
                "token_ids": c.token_ids,
            }
        else:
            lp = completion_logprobs(c.logprobs) if c.logprobs is not None else None
            choice = {"index": index, "text": c.text, "token_ids": c.token_ids, "logprobs": lp}
        choice["finish_reason"] = finish
        return sse({**self.base, "choices": [choice]})

    def _tool_delta(self, index: int, c: GenerateChunk) -> tuple[dict, str | None]:
        """A chat choice with tools: the content that can go out now and, on its last chunk, its
        tool calls (whole, one entry each) and finish reason."""
        stream = self.tool_streams.setdefault(index, ToolStream(self.req.tools))
        text = stream.feed(c.text)
        if c.finish_reason is None:
            return ({"content": text} if text else {}), None
        rest, calls, finish = stream.finish(c.finish_reason)
        delta: dict = {"content": text + rest} if text + rest else {}
        if calls:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
        return delta, finish

    def end(self) -> list[str]:
        out = []
        if self.req.include_usage:
            total = usage(self.prompt_tokens, sum(self.completion_tokens.values()))
            out.append(sse({**self.base, "choices": [], "usage": total}))
        return [*out, "data: [DONE]\n\n"]
