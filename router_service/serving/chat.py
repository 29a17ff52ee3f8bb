"""Chat prompts: OpenAI-style messages rendered with the checkpoint's own chat template.

The template is the tokenizer's (`tokenizer_config.json` / `chat_template.jinja`), applied by
`transformers` (`apply_chat_template(..., add_generation_prompt=True)`) exactly as the model was
trained to read it; the rendered text is tokenized without adding special tokens again (templates
write their own BOS). `DEFAULT_CHAT_TEMPLATE` is the simple template the built-in default model
ships with.
"""

from __future__ import annotations

import json

from jinja2 import TemplateError

from moe_serving.errors import invalid

# Plain-text turns, the way a small model trained on raw text can continue them: one "role: text"
# line per message (an assistant turn closed by EOS), then "assistant:" to answer. The newline is
# an expression: transformers renders with trim_blocks, which eats a newline after a block tag.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

ROLES = ("system", "developer", "user", "assistant", "tool")


def normalize_messages(messages) -> list[dict]:
    """[{"role", "content": str}] of an OpenAI `messages` list; content given as text parts
    ([{"type": "text", "text": ...}]) is joined. Anything else is a 400 naming the message."""
    if not isinstance(messages, list | tuple) or not messages:
        raise invalid("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        known = ("role", "content", "name", "tool_calls", "tool_call_id")
        extra = sorted(k for k, v in m.items() if k not in known and v is not None)
        if extra:
            raise invalid(f"messages[{i}] has fields this server does not support: {', '.join(extra)}")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise invalid(f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string or a list of text parts")
        msg = {"role": role, "content": content}
        if m.get("name") is not None:
            msg["name"] = str(m["name"])
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise invalid(f"messages[{i}]: only assistant messages carry tool_calls")
            msg["tool_calls"] = _template_calls(m["tool_calls"], i)
        if m.get("tool_call_id") is not None:
            msg["tool_call_id"] = str(m["tool_call_id"])
        out.append(msg)
    return out


def _template_calls(calls, i: int) -> list[dict]:
    """An assistant message's tool calls as chat templates read them: OpenAI sends each call's
    arguments as a JSON string, templates (Qwen's, Llama's, ...) expect the object, as vLLM
    gives it to them."""
    if not isinstance(calls, list):
        raise invalid(f"messages[{i}].tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(
                f"messages[{i}].tool_calls[{j}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}"
            )
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                raise invalid(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON") from None
        out.append({**call, "function": {**fn, "arguments": arguments}})
    return out


def chat_prompt_ids(tokenizer, messages, tools=None, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` (and `tools`, where the template renders them) rendered with the
    tokenizer's chat template, ready for the assistant's answer. 400 when the model has no
    tokenizer or no chat template, or the template refuses the conversation (e.g. roles out of
    order)."""
    if tokenizer is None:
        raise invalid("this model has no tokenizer, so it cannot take chat messages; send token ids")
    if not getattr(tokenizer, "chat_template", None):
        raise invalid(
            "this model's tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja), so /v1/chat/completions cannot render messages; use "
            "/v1/completions with a prompt instead"
        )
    msgs = normalize_messages(messages)
    try:
        text = tokenizer.apply_chat_template(
            msgs,
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except (TemplateError, ValueError, TypeError, KeyError) as e:  # raise_exception() in a template
        raise invalid(f"the chat template refused these messages: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)
