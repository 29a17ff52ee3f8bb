"""Function calling on chat: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.

The tools are handed to the checkpoint's chat template (`apply_chat_template(tools=...)`), which
renders them the way the model was trained to read them, where it can. What the model answers
depends on `tool_choice`, as in vLLM:

- "required": the output is constrained (llguidance) to a JSON array of calls,
  `[{"name": <a tool>, "parameters": <its arguments schema>}, ...]` (one call at most without
  parallel tool calls), so every call names a real tool with valid arguments;
- a named function: the output is constrained to that function's arguments schema;
- "auto" (the default with tools): the model writes text, or calls in the Hermes format that
  Qwen, Hermes and many other templates use, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  which are parsed out (unconstrained: the model decides);
- "none": text only, and the template does not see the tools.

Calls come back as `message.tool_calls` (`finish_reason` "tool_calls"; "stop" for a named
function, as OpenAI answers it) and, streamed, as one `delta.tool_calls` per choice once its calls
are complete; text that cannot be the start of a call streams as it comes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from moe_serving.errors import invalid
from moe_serving.types import StructuredOutput

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_HERMES = re.compile(re.escape(_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(_CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolChoice:
    """The tools of a chat request and how the model may use them (validated)."""

    tools: tuple[dict, ...]  # OpenAI's {"type": "function", "function": {...}} objects
    choice: str  # "none" | "auto" | "required" | "function"
    function: str | None = None  # the named function (choice "function")
    parallel: bool = True

    def schemas(self) -> dict[str, dict]:
        """Each tool's arguments schema, closed (see `closed`) for constrained calls."""
        return {
            t["function"]["name"]: closed(
                t["function"].get("parameters") or {"type": "object", "properties": {}}
            )
            for t in self.tools
        }

    def template_tools(self) -> list[dict] | None:
        """What the chat template is given (None: it does not see the tools)."""
        return None if self.choice == "none" else list(self.tools)

    def structured(self) -> StructuredOutput | None:
        """The constraint the output is decoded under: the calls' JSON for "required" and a named
        function; None for "auto" and "none"."""
        schemas = self.schemas()
        if self.choice == "function":
            return StructuredOutput("json", schemas[self.function])
        if self.choice != "required":
            return None
        call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "parameters": schema},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for name, schema in schemas.items()
            ]
        }
        array = {"type": "array", "items": call, "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredOutput("json", array)

    def apply(self, given: dict) -> dict:
        """GenerateParams fields with these tools: the calls' constraint (a 400 beside another
        structured output) and the tools the chat template renders."""
        calls = self.structured()
        if calls is not None and given.get("structured") is not None:
            raise invalid(
                f"tool_choice={self.function or self.choice!r} constrains the output to tool calls; "
                "it cannot also follow response_format / structured_outputs"
            )
        return {**given, "structured": calls or given.get("structured"), "tools": self.template_tools()}

    def answer(self, text: str, finish: str | None) -> tuple[str | None, list[dict], str | None]:
        """(content, tool_calls, finish_reason) of a whole answer's text."""
        if self.choice == "none":
            return text, [], finish
        if self.choice == "function":
            if finish != "stop":  # cut short (length): the arguments are not complete
                return text, [], finish
            return None, [_call(self.function, text)], "stop"
        if self.choice == "required":
            if finish != "stop":  # cut short: the calls that are complete, if any
                done = _complete_items(text)
                if not done:
                    return text, [], finish
                return None, [_call(c["name"], json.dumps(c["parameters"])) for c in done], finish
            calls = [_call(c["name"], json.dumps(c["parameters"])) for c in json.loads(text)]
            return None, calls, "tool_calls"
        return _hermes(text, finish, self.parallel)


def closed(schema):
    """`schema` with every object that does not say otherwise closed to its own properties
    (`additionalProperties: false`), as OpenAI's strict tools require: a constrained model may
    otherwise add keys until max_tokens (the built-in model does, with "": "" pairs)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:  # a free-form object stays open
        out["additionalProperties"] = False
    return out


def _complete_items(text: str) -> list[dict]:
    """The complete calls at the start of a JSON array cut short: '[{...}, {...}, {"na' -> two."""
    decoder, items, at = json.JSONDecoder(), [], text.find("[") + 1
    while at > 0:
        while at < len(text) and text[at] in " \n\t,":
            at += 1
        try:
            item, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            break
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
            break
        items.append(item)
    return items


def _call(name: str, arguments: str) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _hermes(text: str, finish: str | None, parallel: bool) -> tuple[str | None, list[dict], str | None]:
    """Calls written as <tool_call>{json}</tool_call> (auto): parsed out of the text; a block that
    is not a call to a JSON object with a name stays text."""
    start = text.find(_OPEN)
    if start < 0:
        return text, [], finish
    calls = []
    for m in _HERMES.finditer(text, start):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            return text, [], finish
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, [], finish
        arguments = obj.get("arguments", obj.get("parameters", {}))
        calls.append(_call(obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
    if not parallel:
        calls = calls[:1]
    content = text[:start].strip() or None
    return content, calls, "tool_calls" if finish == "stop" else finish


class ToolStream:
    """One streamed choice's text, held back while it may be (or is) a tool call: `feed` returns
    the text that can go out as content now; `finish` the rest, the calls and the finish reason."""

    def __init__(self, tools: ToolChoice):
        self.tools = tools
        self.text = ""
        self.sent = 0  # characters of text already sent as content

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.tools.choice == "none":
            out, self.sent = self.text[self.sent :], len(self.text)
            return out
        if self.tools.choice != "auto":
            return ""  # all of it is the calls' JSON
        # Auto: text before a possible "<tool_call>" goes out; from there on it is held.
        at = self.text.find(_OPEN, self.sent)
        safe = at if at >= 0 else _safe_end(self.text, self.sent)
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

    def finish(self, finish: str | None) -> tuple[str, list[dict], str | None]:
        """(content not yet sent, tool_calls, finish_reason)."""
        _, calls, reason = self.tools.answer(self.text, finish)
        if not calls:
            return self.text[self.sent :], [], reason
        return "", calls, reason  # what was sent is the text before the first call: nothing is owed


def _safe_end(text: str, sent: int) -> int:
    """Where the text that cannot begin "<tool_call>" ends: a tail that is a prefix of it waits."""
    for k in range(min(len(_OPEN) - 1, len(text) - sent), 0, -1):
        if _OPEN.startswith(text[-k:]):
            return len(text) - k
    return len(text)


def parse_tools(body: dict) -> ToolChoice | None:
    """The request's tools and tool_choice, validated (400 naming the fault); None without tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid(f"parallel_tool_calls must be true or false, got {parallel!r}")
    if not tools:
        if choice not in (None, "none"):
            raise invalid(f"tool_choice={choice!r} needs tools")
        return None
    if not isinstance(tools, list):
        raise invalid("tools must be a list of {'type': 'function', 'function': {...}} objects")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise invalid(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}"
            )
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise invalid(f"tools[{i}].function.parameters must be a JSON schema object")
        names.append(name)
    if len(set(names)) != len(names):
        raise invalid(f"tool names must be unique, got {names}")
    function = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        function = fn.get("name") if isinstance(fn, dict) else None
        if function not in names:
            raise invalid(f"tool_choice names function {function!r}, which is not among the tools {names}")
        choice = "function"
    elif choice not in ("none", "auto", "required"):
        raise invalid(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}")
    return ToolChoice(tuple(tools), choice, function, parallel is not False)
