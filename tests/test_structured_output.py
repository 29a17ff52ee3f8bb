"""Constrained decoding and the sampling options beyond temperature and top-p, without Ray:
top-k, min-p, logit_bias and allowed_token_ids on fixed logits; llguidance grammars (JSON schema,
JSON object, regex, choice, Lark and GBNF) compiled, masked and decoded on the built-in model
through the continuous batch; request parsing of OpenAI's response_format and vLLM's
structured_outputs / guided_* fields."""

from __future__ import annotations

import json
import re

import pytest
import torch

from moe_serving.errors import ServingError
from moe_serving.types import StructuredOutput
from router_service import Engine
from router_service.default_model import default_model_dir, make_tokenizer
from router_service.generation.constraints import (
    GrammarMasks,
    GrammarState,
    check_grammar,
    compile_grammar,
    hf_grammar_tokenizer,
)
from router_service.generation.decoding import (
    DecodeBatch,
    SamplingParams,
    Sequence,
    process_logits,
    sample_rows,
)
from router_service.serving import openai_api
from router_service.serving.tools import ToolStream

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer):
    return hf_grammar_tokenizer(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 300) -> set[int]:
    seen = set()
    for seed in range(n):
        p = SamplingParams(**{**params.__dict__, "seed": seed})
        seq = Sequence([1], p)
        seen.add(sample_rows(process_logits(logits[None], [seq], set()), [seq])[0])
    return seen


# ---- sampling options ---------------------------------------------------------------------------


def test_top_k_and_min_p_keep_only_the_likely_tokens():
    logits = torch.tensor([4.0, 3.0, 2.9, 0.0, -1.0, -5.0])
    assert draws(logits, SamplingParams(4, temperature=1.0, top_k=2)) == {0, 1}
    # min_p 0.3: tokens under 0.3 x p(most likely) are out; e^-1.0 and e^-1.1 of the top stay
    assert draws(logits, SamplingParams(4, temperature=1.0, min_p=0.3)) == {0, 1, 2}
    assert draws(logits, SamplingParams(4, temperature=1.0), n=400) >= {0, 1, 2, 3}
    greedy = Sequence([1], SamplingParams(4, top_k=3, min_p=0.5))
    assert sample_rows(logits[None], [greedy]) == [0]
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(4, top_k=-1)


def test_settings_that_overflow_the_logits_still_sample():
    """Found by schemathesis: repetition_penalty 5e-324 (or temperature 1e-300) made the scaled
    logits inf, softmax NaN, and multinomial fail the whole batch (a 500 for every request in it)."""
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    for params in (
        SamplingParams(4, temperature=1.0, seed=1, repetition_penalty=5e-324),
        SamplingParams(4, temperature=1e-300, seed=1),
    ):
        seq = Sequence([0, 1], params)
        (token,) = sample_rows(process_logits(logits, [seq], set()), [seq])
        assert 0 <= token < 4


def test_logit_bias_and_allowed_token_ids():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    biased = Sequence([1], SamplingParams(4, logit_bias=((3, 100.0), (0, -100.0))))
    assert sample_rows(process_logits(logits, [biased], set()), [biased]) == [3]
    allowed = Sequence([1], SamplingParams(4, allowed_token_ids=(1, 2)))
    out = process_logits(logits, [allowed], set())
    assert out[0, 1] == 3.0 and out[0, 2] == 0.0 and torch.isinf(out[0, [0, 3]]).all()
    assert torch.equal(logits, torch.tensor([[4.0, 3.0, 0.0, -1.0]])), "the caller's logits are not touched"


def test_constraints_that_leave_nothing_end_the_sequence_on_eos(ll_tokenizer, tokenizer):
    """allowed_token_ids outside what the grammar allows: no token is possible; the sequence stops
    rather than sampling from nothing (which would fail the whole batch)."""
    eos = tokenizer.eos_token_id
    batch = DecodeBatch(None, {eos}, torch.device("cpu"))
    grammar = compile_grammar(StructuredOutput("regex", "a+"))
    seq = Sequence(
        [1], SamplingParams(4, allowed_token_ids=(tokenizer.encode("b", add_special_tokens=False)[0],))
    )
    seq.grammar = GrammarState(ll_tokenizer, grammar, [])
    ok = Sequence([1], SamplingParams(4))
    tokens, _ = batch._sample(torch.randn(2, len(tokenizer)), [seq, ok])
    assert tokens[0] == eos and seq.finish_reason == "stop" and ok.finish_reason is None


# ---- grammars -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "so",
    [
        StructuredOutput("json", SCHEMA),
        StructuredOutput("json", json.dumps(SCHEMA)),
        StructuredOutput("json_object"),
        StructuredOutput("regex", r"\d{3}-[a-z]{2,4}"),
        StructuredOutput("choice", ("yes", "no", 'say "hi"')),
        StructuredOutput("grammar", 'start: "a" ("," "b")*'),
        StructuredOutput("grammar", 'root ::= "x" | "y" "z"'),
    ],
    ids=["schema", "schema-text", "json-object", "regex", "choice", "lark", "gbnf"],
)
def test_grammars_compile_and_check(so, ll_tokenizer):
    check_grammar(compile_grammar(so), ll_tokenizer)


@pytest.mark.parametrize(
    "so, needle",
    [
        (StructuredOutput("regex", "(("), "unclosed group"),
        (StructuredOutput("grammar", "start: foo"), "unknown name"),
        (StructuredOutput("json", {"type": "objec"}), "objec"),
        (StructuredOutput("json", "{not json"), "not valid JSON"),
        (StructuredOutput("choice", ()), "non-empty list"),
        (StructuredOutput("grammar", "root ::= (("), "GBNF"),
        (StructuredOutput("xml"), "unknown structured output kind"),
    ],
)
def test_bad_grammars_say_what_is_wrong(so, needle, ll_tokenizer):
    with pytest.raises(ValueError, match=re.escape(needle)):
        check_grammar(compile_grammar(so), ll_tokenizer)


def test_masks_of_many_rows_equal_one_row_at_a_time(ll_tokenizer, tokenizer):
    grammars = [
        compile_grammar(StructuredOutput("regex", r"[0-9]+")),
        compile_grammar(StructuredOutput("json_object")),
    ]
    states = [GrammarState(ll_tokenizer, g, []) for g in grammars]
    logits = torch.randn(3, len(tokenizer))
    masks = GrammarMasks()
    both = masks.apply(logits, [0, 2], states)
    assert torch.equal(both[1], logits[1]), "an unconstrained row is left alone"
    assert torch.equal(both[0], masks.apply(logits[:1], [0], states[:1])[0])
    allowed = {tokenizer.decode([t]) for t in torch.isfinite(both[0]).nonzero().flatten().tolist()}
    assert allowed == set("0123456789")
    assert {tokenizer.decode([t]) for t in torch.isfinite(both[2]).nonzero().flatten().tolist()} == {"{"}


@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained(default_model_dir(), num_workers=2) as e:
        yield e


def generate(engine, tokenizer, prompt: str, so: StructuredOutput, **kw) -> tuple[str, str]:
    ids = tokenizer.encode(prompt)
    tokens, finish = [], None
    for chunk in engine.generate_stream(ids, kw.pop("max_new_tokens", 96), grammar=compile_grammar(so), **kw):
        tokens += chunk["token_ids"]
        finish = chunk["finish_reason"] or finish
    eos = tokenizer.eos_token_id
    return tokenizer.decode([t for t in tokens if t != eos]), finish


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 5}], ids=["greedy", "sampled"])
def test_the_built_in_model_follows_every_kind_of_grammar(engine, tokenizer, sampling):
    """A 2.3M-parameter model trained on plain text never writes JSON by itself; constrained, it
    does, and stops when the grammar is complete."""
    text, finish = generate(engine, tokenizer, "The person is", StructuredOutput("json", SCHEMA), **sampling)
    obj = json.loads(text)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int) and len(obj["name"]) <= 12
    assert finish == "stop"
    # Any object at all: the model may go on adding keys until max_tokens (it does): what it wrote
    # is then an object the grammar could still close
    text, finish = generate(
        engine, tokenizer, "Any", StructuredOutput("json_object"), max_new_tokens=60, **sampling
    )
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))
    text, finish = generate(
        engine, tokenizer, "Code:", StructuredOutput("regex", r"\d{3}-[a-z]{2,4}"), **sampling
    )
    assert re.fullmatch(r"\d{3}-[a-z]{2,4}", text) and finish == "stop"
    text, finish = generate(
        engine, tokenizer, "Yes or no?", StructuredOutput("choice", ("yes", "no")), **sampling
    )
    assert text in ("yes", "no") and finish == "stop"
    gbnf = 'root ::= ("yes" | "no") "," [0-9] [0-9]?'
    text, finish = generate(engine, tokenizer, "Answer:", StructuredOutput("grammar", gbnf), **sampling)
    assert re.fullmatch(r"(yes|no),[0-9][0-9]?", text) and finish == "stop"


def test_a_resumed_stream_continues_its_grammar(engine, tokenizer):
    """A stream moved to another router is re-submitted with its tokens so far as prompt
    (`resume_at`): the matcher consumes them first and the rest equals the unbroken stream."""
    so = StructuredOutput("json", SCHEMA)
    grammar = compile_grammar(so)
    prompt = tokenizer.encode("The person is")
    whole = [t for c in engine.generate_stream(prompt, 96, grammar=grammar) for t in c["token_ids"]]
    cut = 6
    rest = [
        t
        for c in engine.generate_stream(prompt + whole[:cut], 96 - cut, grammar=grammar, resume_at=cut)
        for t in c["token_ids"]
    ]
    assert whole[:cut] + rest == whole


# ---- parsing ------------------------------------------------------------------------------------


CHAT = {"messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    "body, want",
    [
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutput("json", SCHEMA),
        ),
        ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutput("choice", ("a", "b"))),
        ({"structured_outputs": {"regex": "a+"}}, StructuredOutput("regex", "a+")),
        (
            {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": False}},
            StructuredOutput("json", SCHEMA, False),
        ),
        ({"structured_outputs": {"grammar": "start: a"}}, StructuredOutput("grammar", "start: a")),
        ({"guided_choice": ["a"]}, StructuredOutput("choice", ("a",))),
        ({"guided_json": SCHEMA}, StructuredOutput("json", SCHEMA)),
        ({"response_format": {"type": "text"}}, None),
    ],
)
def test_parsing_structured_outputs(body, want):
    assert openai_api.parse_chat({**CHAT, **body}, "m").params[0].structured == want
    assert openai_api.parse_completion({"prompt": "a", **body}, "m").params[0].structured == want


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "not several"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "not several"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structural_tag"),
        ({"structured_outputs": "json"}, "must be an object"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"guided_choice": "a"}, "list of strings"),
        ({"logit_bias": {"x": 1}}, "token ids"),
    ],
)
def test_parsing_refuses_bad_structured_outputs(body, needle):
    with pytest.raises(ServingError, match=re.escape(needle)):
        openai_api.parse_chat({**CHAT, **body}, "m")


def test_parsing_sampling_options():
    p = openai_api.parse_completion(
        {
            "prompt": "a",
            "top_k": 5,
            "min_p": 0.1,
            "logit_bias": {"12": -3, "7": 2.5},
            "allowed_token_ids": [1, 2],
        },
        "m",
    ).params[0]
    assert (p.top_k, p.min_p, p.logit_bias, p.allowed_token_ids) == (5, 0.1, {12: -3, 7: 2.5}, (1, 2))


# ---- tools ----------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def test_tool_choice_parsing():
    base = {**CHAT, "tools": [WEATHER, TIME]}
    req = openai_api.parse_chat(base, "m")
    assert req.tools.choice == "auto" and req.params[0].structured is None
    assert [t["function"]["name"] for t in req.params[0].tools] == ["get_weather", "get_time"]
    req = openai_api.parse_chat({**base, "tool_choice": "none"}, "m")
    assert req.params[0].tools is None, "with tool_choice none the template does not see the tools"
    req = openai_api.parse_chat({**base, "tool_choice": "required", "parallel_tool_calls": False}, "m")
    schema = req.params[0].structured.value
    assert schema["type"] == "array" and schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    named = {"type": "function", "function": {"name": "get_weather"}}
    req = openai_api.parse_chat({**base, "tool_choice": named}, "m")
    assert req.params[0].structured == StructuredOutput("json", WEATHER["function"]["parameters"])
    for body, needle in [
        ({**CHAT, "tool_choice": "required"}, "needs tools"),
        ({**base, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({**base, "tool_choice": "sometimes"}, "tool_choice"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "name"),
        ({**CHAT, "tools": [WEATHER, WEATHER]}, "unique"),
        ({**base, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot also"),
        ({**base, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ]:
        with pytest.raises(ServingError, match=re.escape(needle)):
            openai_api.parse_chat(body, "m")


def test_tool_answers_in_openais_shape():
    tools = openai_api.parse_chat({**CHAT, "tools": [WEATHER, TIME], "tool_choice": "required"}, "m").tools
    content, calls, finish = tools.answer('[{"name":"get_weather","parameters":{"city":"Oslo"}}]', "stop")
    assert content is None and finish == "tool_calls"
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert tools.answer('[{"name":"get_wea', "length") == ('[{"name":"get_wea', [], "length")
    # cut short after complete calls (parallel calls on, the model repeats itself): those calls
    content, calls, finish = tools.answer('[{"name":"get_time","parameters":{}},{"name":"get_wea', "length")
    assert content is None and finish == "length" and [c["function"]["name"] for c in calls] == ["get_time"]
    # an open object schema is closed for constrained calls (else a small model adds keys forever);
    # a free-form object stays open
    schema = tools.structured().value["items"]["anyOf"][0]["properties"]["parameters"]
    assert schema["additionalProperties"] is False
    free = openai_api.parse_chat(
        {
            **CHAT,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        },
        "m",
    ).tools
    assert free.schemas()["f"] == {"type": "object"}
    auto = openai_api.parse_chat({**CHAT, "tools": [WEATHER]}, "m").tools
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls, finish = auto.answer(text, "stop")
    assert content == "Let me look." and finish == "tool_calls"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert auto.answer("just text", "stop") == ("just text", [], "stop")
    assert auto.answer("<tool_call>not json</tool_call>", "stop")[1] == []


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_a_streamed_auto_answer_holds_back_only_what_may_be_a_call(cut):
    auto = openai_api.parse_chat({**CHAT, "tools": [WEATHER]}, "m").tools
    text = 'Sure <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    stream = ToolStream(auto)
    sent = "".join(stream.feed(text[i : i + cut]) for i in range(0, len(text), cut))
    rest, calls, finish = stream.finish("stop")
    assert sent + rest == "Sure " and finish == "tool_calls" and calls[0]["function"]["name"] == "get_weather"
    plain = ToolStream(auto)
    sent = "".join(plain.feed(t) for t in ["a <", "b", " <tool", "x"])
    assert sent + plain.finish("stop")[0] == "a <b <toolx"
