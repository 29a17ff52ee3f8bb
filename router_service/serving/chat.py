"""Chat prompts: OpenAI-style messages rendered with the checkpoint's own chat template.

The template is the tokenizer's (`tokenizer_config.json` / `chat_template.jinja`), applied by
`transformers` (`apply_chat_template(..., add_generation_prompt=True)`) exactly as the model was
trained to read it; the rendered text is tokenized without adding special tokens again (templates
write their own BOS). `DEFAULT_CHAT_TEMPLATE` is the simple template the built-in default model
ships with.
"""

from __future__ import annotations

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
        extra = sorted(k for k, v in m.items() if k not in ("role", "content", "name") and v is not None)
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
        out.append(msg)
    return out


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template, ready for the
    assistant's answer. 400 when the model has no tokenizer or no chat template, or the template
    refuses the conversation (e.g. roles out of order)."""
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
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError) as e:  # raise_exception() in a template
        raise invalid(f"the chat template refused these messages: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)
