"""Request and result types of text generation, shared by the HTTP and gRPC front ends and clients."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerateParams:
    """One generation request. Exactly one of `prompt` (text), `prompt_token_ids` and `messages`
    (a chat: [{"role": ..., "content": ...}], rendered with the model's chat template) is set.

    Sampling: `temperature` 0 is greedy; `seed` makes sampling repeatable (choice i of `n` uses
    seed + i). `stop`: strings that end the text (cut before the string); `stop_token_ids`: tokens
    that end it. `logprobs`: None, or report each token's log-probability and that many most likely
    alternatives. Penalties as in OpenAI's API (presence, frequency) and transformers'
    (repetition). `min_tokens`: no end-of-sequence or stop token before that many tokens;
    `ignore_eos`: the end-of-sequence token does not stop the text. `max_tokens` None: up to the
    model's context (what OpenAI and vLLM do for chat without max_tokens); past the context,
    prompt + max_tokens is refused (400 context_length_exceeded).
    """

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    top_k: int = 0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    structured: StructuredOutput | None = None
    tools: tuple[dict, ...] | None = None  # a chat's tools, for its chat template to render


# The kinds a StructuredOutput may have (vLLM's `structured_outputs` names; `json_object` also
# covers OpenAI's response_format {"type": "json_object"}).
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match (vLLM's `structured_outputs`, OpenAI's `response_format`):
    kind "json" (value: a JSON schema, as an object or a string), "json_object" (any JSON object),
    "regex" (a regular expression), "choice" (value: a list of strings, one of which is the
    output) or "grammar" (Lark, llguidance's syntax, or GBNF). `compact_json`: JSON without free
    whitespace (the default: small models loop on whitespace otherwise)."""

    kind: str
    value: object = None
    compact_json: bool = True


@dataclass
class TokenLogprob:
    """A token's log-probability: its id, text, UTF-8 bytes, and (for a chosen token) the most
    likely tokens at its position, each a TokenLogprob without alternatives. `text_offset`: where
    the token's text starts in the choice's text. An echoed prompt's first token has no context:
    its logprob and top_logprobs are None (OpenAI's null)."""

    token_id: int
    token: str
    logprob: float | None
    bytes: list[int] = field(default_factory=list)
    top_logprobs: list[TokenLogprob] | None = field(default_factory=list)
    text_offset: int = 0


@dataclass
class GenerateChunk:
    """Tokens generated since the previous chunk of choice `index`; a choice's last chunk has
    `finish_reason` set ("length": max_tokens reached, "stop": end-of-sequence token, a stop token
    or a stop string). Token counts are the choice's; with n > 1 the completion tokens of all
    choices add up to the request's. `logprobs`: one per token when the request asked for them."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    # gRPC chat with tools, on a choice's last chunk: the calls, OpenAI's {"id", "type", "function":
    # {"name", "arguments"}} objects
    tool_calls: list[dict] | None = None
