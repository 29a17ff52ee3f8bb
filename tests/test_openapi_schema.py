"""The documented request models (`serving/schemas.py`, what /openapi.json shows) agree with what
the parsers accept: every body the OpenAI endpoints take validates against its model, a field the
server refuses is not in the model, and the answers the server builds validate against theirs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from moe_serving.types import GenerateChunk
from router_service.serving import openai_api, schemas

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
MESSAGES = [{"role": "user", "content": "x"}]

COMPLETIONS = [
    {"prompt": "a"},
    {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "seed": 1, "n": 2, "stop": ["\n"]},
    {"prompt": ["a", [1, 2]], "echo": True, "logprobs": 1, "max_tokens": 0},
    {"prompt": "a", "top_k": 5, "min_p": 0.1, "logit_bias": {"3": -2}, "allowed_token_ids": [1, 2]},
    {
        "prompt": "a",
        "structured_outputs": {"choice": ["x", "y"]},
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    {"prompt": "a", "guided_regex": "a+", "best_of": 1, "presence_penalty": 0.5, "repetition_penalty": 1.1},
]
CHATS = [
    {"messages": MESSAGES},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "max_completion_tokens": 3},
    {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2, "response_format": {"type": "json_object"}},
    {
        "messages": MESSAGES,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": SCHEMA, "strict": True},
        },
    },
    {"messages": MESSAGES, "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False},
    {"messages": MESSAGES, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
    {
        "messages": [
            *MESSAGES,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c", "content": "1"},
        ]
    },
]


@pytest.mark.parametrize("body", COMPLETIONS)
def test_accepted_completion_bodies_are_documented(body):
    openai_api.parse_completion(body, "m")
    schemas.CompletionRequest.model_validate(body)


@pytest.mark.parametrize("body", CHATS)
def test_accepted_chat_bodies_are_documented(body):
    openai_api.parse_chat(body, "m")
    schemas.ChatCompletionRequest.model_validate(body)


def test_a_field_the_server_refuses_is_not_documented():
    for model, body in (
        (schemas.CompletionRequest, {"prompt": "a"}),
        (schemas.ChatCompletionRequest, {"messages": MESSAGES}),
    ):
        with pytest.raises(ValidationError, match="functions"):
            model.model_validate({**body, "functions": []})
    assert schemas.fields_of(schemas.CompletionRequest) == openai_api.COMPLETION_FIELDS


def test_answers_validate_against_their_models():
    req = openai_api.parse_chat({**CHATS[4]}, "m")
    choice = openai_api.Choice()
    choice.add(
        GenerateChunk(
            token_ids=[1],
            text='[{"name":"f","parameters":{"a":1}}]',
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=1,
        )
    )
    answer = openai_api.whole_answer(req, "m", {0: choice}, 3)
    parsed = schemas.ChatCompletionResponse.model_validate(answer)
    assert parsed.choices[0].message.tool_calls[0].function.name == "f"
    req = openai_api.parse_completion(COMPLETIONS[1], "m")
    choice = openai_api.Choice()
    choice.add(
        GenerateChunk(
            token_ids=[1, 2], text="ab", finish_reason="length", prompt_tokens=3, completion_tokens=2
        )
    )
    schemas.CompletionResponse.model_validate(openai_api.whole_answer(req, "m", {0: choice}, 3))
