"""vLLM's tokenizer routes, which lm-evaluation-harness (and other clients) probe to use the server's
own tokenizer: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`. Pure functions of the
request body and the checkpoint's tokenizer, no Ray; bad input is a ServingError (400)."""

from __future__ import annotations

from moe_serving.errors import invalid
from router_service.inputs import check_token_ids
from router_service.serving.chat import chat_prompt_ids


def _need(tokenizer) -> None:
    if tokenizer is None:
        raise invalid("this model ships no tokenizer, so the server cannot tokenize or detokenize")


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{key} must be true or false, got {value!r}")
    return value


def tokenize(tokenizer, body: dict, max_model_len: int | None) -> dict:
    """{"prompt": str} or {"messages": [...]} (rendered with the chat template, as chat does) ->
    {"tokens", "count", "max_model_len"}. add_special_tokens: True for a prompt (what
    /v1/completions does), False for messages (the template writes them), as vLLM's defaults;
    messages render with `tools` and `add_generation_prompt` (default true), as a chat would."""
    _need(tokenizer)
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise invalid("give exactly one of 'prompt' (a string) or 'messages' (a chat)")
    if body.get("prompt") is not None:
        if not isinstance(body["prompt"], str):
            raise invalid(f"prompt must be a string, got {type(body['prompt']).__name__}")
        ids = tokenizer.encode(body["prompt"], add_special_tokens=_flag(body, "add_special_tokens", True))
    else:
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise invalid("tools must be a list of tool objects")
        ids = chat_prompt_ids(tokenizer, body["messages"], tools, _flag(body, "add_generation_prompt", True))
        if _flag(body, "add_special_tokens", False) and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
    return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}


def detokenize(tokenizer, body: dict, vocab_size: int) -> dict:
    """{"tokens": [int, ...]} -> {"prompt": str}."""
    _need(tokenizer)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise invalid("tokens must be a list of integers")
    try:
        if ids:
            check_token_ids([ids], vocab_size, "tokens")
    except ValueError as e:
        raise invalid(str(e)) from None
    return {"prompt": tokenizer.decode(ids)}


def tokenizer_info(tokenizer, max_model_len: int | None) -> dict:
    """The tokenizer's configuration as vLLM's /tokenizer_info serves it (tokenizer_config.json's
    fields, the class and the special tokens resolved)."""
    _need(tokenizer)
    info = {k: v for k, v in tokenizer.init_kwargs.items() if isinstance(v, str | int | float | bool | None)}
    info.update(
        tokenizer_class=type(tokenizer).__name__,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
        model_max_length=tokenizer.model_max_length,
        max_model_len=max_model_len,
        vocab_size=len(tokenizer),
    )
    if getattr(tokenizer, "chat_template", None):
        info["chat_template"] = tokenizer.chat_template
    return info
