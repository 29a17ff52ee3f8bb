"""The HTTP API's request and answer bodies as pydantic models: what `/openapi.json` and `/docs`
show, field by field, and the one list of the fields each OpenAI endpoint accepts
(`openai_api.COMPLETION_FIELDS` / `CHAT_FIELDS` are read from these models, so a field is
documented exactly when it is accepted). The checks themselves, with messages that name the
field, are `openai_api.parse_*` and `core.check_generate_params`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moe_serving.errors import invalid


class _Body(BaseModel):
    # strict: JSON's types as written (no 0 for false, no "5" or true for 5); an int is a float
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


# ---- errors -----------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str = Field(description="What went wrong, naming the field or limit")
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error")
    param: str | None = None
    code: str | None = Field(
        None, description="e.g. context_length_exceeded, invalid_api_key, model_not_found"
    )


class ErrorResponse(BaseModel):
    """Every 4xx / 5xx answer, in OpenAI's error shape."""

    error: ErrorBody


# ---- OpenAI requests ----------------------------------------------------------------------------------


class StreamOptions(_Body):
    include_usage: bool | None = Field(None, description="a last event with the request's usage")


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema", description="the JSON schema")
    strict: bool | None = Field(None, description="accepted either way: the schema always constrains")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's structured outputs: exactly one of json, regex, choice, grammar, json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="Lark (llguidance) or GBNF")
    json_object: bool | None = None
    disable_any_whitespace: bool | None = Field(None, description="default true: compact JSON")


class _Generation(_Body):
    model: str | None = Field(None, description="the served model's name (optional)")
    max_tokens: int | None = Field(
        None, ge=0, description="completions: default 16 (0 only with echo); chat: default up to the context"
    )
    temperature: float | None = Field(None, ge=0, le=100, description="default 1.0; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: all tokens")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, description="choice i samples with seed + i")
    n: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = Field(None, description="up to 16 strings")
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    allowed_token_ids: list[int] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = Field(
        None, description="vLLM's older name of structured_outputs.json"
    )
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Generation):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str | list[int]] = Field(
        description="text, token ids, or a list of either (one answer per prompt)"
    )
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = Field(None, description="the prompt (and its logprobs) before each choice")
    best_of: int | None = Field(None, description="only equal to n")
    suffix: None = Field(None, description="not supported: any value is refused")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, description="a tool turn's call")


class FunctionSpec(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="the arguments' JSON schema")
    strict: bool | None = None


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


def validated(model: type[BaseModel], body: dict, endpoint: str) -> dict:
    """`body` checked against `model` (types, ranges, no unknown fields) and given back as plain
    JSON values (an integral 5.0 becomes 5): the one check of the body's shape, at the edge; a 400
    naming each field that is wrong."""
    try:
        return model.model_validate(body).model_dump(by_alias=True, exclude_unset=True)
    except ValidationError as e:
        unknown = [".".join(map(str, err["loc"])) for err in e.errors() if err["type"] == "extra_forbidden"]
        if unknown:
            raise invalid(
                f"{endpoint} on this server does not support: {', '.join(sorted(unknown))}"
            ) from None
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise invalid(f"{endpoint}: {problems}") from None


def fields_of(model: type[BaseModel]) -> set[str]:
    """The JSON names of a model's fields (aliases where set)."""
    return {f.alias or name for name, f in model.model_fields.items()}


# ---- OpenAI answers -----------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["length", "stop"] | None


class CompletionResponse(BaseModel):
    """A completion; streamed, each server-sent event holds one of these with `object`
    text_completion and a choice's new text."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["length", "stop", "tool_calls"] | None
    token_ids: list[int]


class ChatCompletionResponse(BaseModel):
    """A chat completion; streamed, server-sent events of `chat.completion.chunk` objects whose
    choices carry a `delta` (role, content, tool_calls) instead of the message."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# ---- the other routes ------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeRequest(_Body):
    """Exactly one of prompt and messages (rendered with the chat template, and `tools`)."""

    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = Field(None, description="messages: default true, as a chat")
    tools: list[ToolSpec] | None = None
    model: str | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None


class DetokenizeRequest(_Body):
    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


TensorBody = list[Any] | dict[str, Any]  # nested lists, or {"dtype", "shape", "data": base64}


class ForwardRequest(_Body):
    input_ids: TensorBody = Field(description="[B, S] token ids")
    attention_mask: TensorBody | None = None


class ForwardResponse(BaseModel):
    logits: TensorBody = Field(description="[B, S, V] float32")


class MoERequest(_Body):
    hidden_states: TensorBody = Field(description="[T, H] or [B, S, H]")


class MoEResponse(BaseModel):
    hidden_states: TensorBody


class ScaleRequest(_Body):
    # the range is the controller's to say (its message names the expert slots)
    num_workers: int = Field(description="1 to the number of expert slots")


class ScaleRoutersRequest(_Body):
    num_routers: int = Field(description="1 to 64")


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "unavailable"]
    serving: bool | None = None
    reason: str | None = None


# ---- the OpenAPI document -------------------------------------------------------------------------

_ERRORS = {
    400: "a request this server refuses: the message names the field (OpenAI's invalid_request_error)",
    401: "no or a wrong API key (when keys are set)",
    403: "an API key on a route that needs the admin key",
    404: "an unknown path, or a model that is not served",
    405: "a method the path does not take (the Allow header lists those it does)",
    409: "another membership change is running (cluster routes)",
    413: "a request over the server's size limits",
    429: "too many requests are waiting",
    500: "an internal error (named, never a traceback)",
    503: "the server cannot serve now (no expert worker, the router restarting)",
}


def responses(
    model: type[BaseModel] | None = None,
    description: str = "the answer",
    media_type: str | None = None,
    streams: bool = False,
) -> dict:
    """FastAPI's `responses=` for a route: its answer model (when it has one; or its media type;
    `streams`: also server-sent events) and every error status, each in OpenAI's error shape."""
    out: dict = {code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()}
    if model is not None:
        out[200] = {"model": model, "description": description}
        if streams:
            # each event's data: a chunk (the answer with `delta`s for chat), or [DONE]
            out[200]["content"] = {"text/event-stream": {"schema": {}}}
    elif media_type is not None:
        out[200] = {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}
    return out


# (path, method) -> the request body's model; the routes read their bodies themselves (JSON or
# msgpack), so the document gets them here rather than from the handlers' signatures.
REQUEST_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/completions", "post"): CompletionRequest,
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/tokenize", "post"): TokenizeRequest,
    ("/detokenize", "post"): DetokenizeRequest,
    ("/v1/forward", "post"): ForwardRequest,
    ("/v1/layers/{layer}/moe", "post"): MoERequest,
    ("/v1/cluster/scale", "post"): ScaleRequest,
    ("/v1/cluster/routers", "post"): ScaleRoutersRequest,
}
OPEN_PATHS = ("/healthz", "/health", "/metrics")  # no key needed (/metrics unless --protect-metrics)


def document(spec: dict) -> dict:
    """FastAPI's OpenAPI document with the request bodies and the optional bearer key added."""
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for (path, method), model in REQUEST_BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas[model.__name__] = body
        ref = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
        operation = spec["paths"][path][method]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": ref, "application/msgpack": ref},
        }
    components["securitySchemes"] = {
        "apiKey": {"type": "http", "scheme": "bearer", "description": "--api-key / --admin-key, when set"}
    }
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)  # FastAPI's for path parameters: refusals are 400
            if path not in OPEN_PATHS:
                operation["security"] = [{}, {"apiKey": []}]  # optional: keys are off by default
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return spec
