"""The OpenAI options without Ray: penalties and min_tokens against transformers' own logits
processors and greedy `generate`, token for token; logprobs; the streaming detokenizer on multi-byte
text; stop strings that span chunks; chat templates; request parsing that refuses what it does not
support."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from moe_serving.errors import ServingError
from router_service.default_model import make_tokenizer
from router_service.generation.decoding import (
    DecodeBatch,
    SamplingParams,
    Sequence,
    process_logits,
    sample_rows,
    token_logprobs,
)
from router_service.serving import openai_api
from router_service.serving.chat import DEFAULT_CHAT_TEMPLATE, chat_prompt_ids
from router_service.serving.detokenize import CompletionText, StopStrings, TextStream
from router_service.serving.prompt_logprobs import echo_token_logprobs, prompt_logprobs

TEXT = "naïve café: 世界 🎉 — ok"  # 1-, 2-, 3- and 4-byte characters


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()  # byte-level: one token per UTF-8 byte


# ---- penalties, min_tokens, logprobs ----------------------------------------------------------------


def test_repetition_penalty_equals_transformers_processor():
    logits = torch.randn(2, 40)
    prompt, made = [3, 5, 5, 9], [9, 11, 30]
    seq = Sequence(prompt, SamplingParams(8, repetition_penalty=1.7))
    seq.generated = list(made)
    plain = Sequence([1], SamplingParams(8))
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + made]), logits[:1].clone())
    got = process_logits(logits, [seq, plain], eos=set())
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert torch.equal(got[1], logits[1])  # rows without options are left alone


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.randn(1, 20)
    seq = Sequence([4, 4, 4], SamplingParams(8, presence_penalty=0.5, frequency_penalty=0.25))
    seq.generated = [7, 7, 2]  # the prompt's tokens do not count
    want = logits[0].clone()
    want[7] -= 0.25 * 2 + 0.5
    want[2] -= 0.25 * 1 + 0.5
    torch.testing.assert_close(process_logits(logits, [seq], eos=set())[0], want)


def test_min_tokens_masks_eos_and_stop_tokens_like_transformers():
    logits = torch.randn(1, 20)
    seq = Sequence([1, 2], SamplingParams(8, min_tokens=2, stop_token_ids=(5,)))
    want = MinNewTokensLengthLogitsProcessor(2, 2, eos_token_id=[3, 5])(
        torch.tensor([[1, 2]]), logits.clone()
    )
    torch.testing.assert_close(process_logits(logits, [seq], eos={3}), want)
    seq.generated = [8, 9]
    assert torch.equal(process_logits(logits, [seq], eos={3}), logits)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_greedy_with_penalties_equals_transformers_generate(tiny_model_dir, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family)).eval()
    prompt = [5, 6, 7, 5, 6]
    eos = hf(model, prompt, 1)[0]  # what greedy says first becomes the end-of-sequence token
    want = hf(model, prompt, 12, repetition_penalty=1.6, min_new_tokens=4, eos_token_id=eos)
    batch = DecodeBatch(model, {eos}, torch.device("cpu"))
    seq = Sequence(prompt, SamplingParams(12, repetition_penalty=1.6, min_tokens=4))
    other = Sequence([9, 10, 11], SamplingParams(6))  # batch company changes nothing
    batch.add([seq, other])
    while seq.finish_reason is None:
        batch.step()
    assert seq.generated == want
    assert eos not in seq.generated[:4]


def hf(model, prompt, n, **kw):
    kw.setdefault("eos_token_id", None)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt) :].tolist()


def test_seeded_sampling_with_penalties_does_not_depend_on_company():
    logits = torch.randn(3, 50)
    params = SamplingParams(4, temperature=0.8, seed=7, frequency_penalty=1.0, repetition_penalty=1.2)

    def pick(rows, i):
        return sample_rows(process_logits(logits[rows], [s for s in seqs(rows)], set()), seqs(rows))[i]

    def seqs(rows):
        out = []
        for r in rows:
            s = Sequence([1, 2, 3], params if r == 1 else SamplingParams(4, 0.5, seed=r))
            s.generated = [4, 4]
            out.append(s)
        return out

    assert pick([1], 0) == pick([0, 1, 2], 1)


def test_token_logprobs_are_the_raw_log_softmax():
    logits = torch.randn(2, 30)
    seqs = [Sequence([1], SamplingParams(4, logprobs=3)), Sequence([1], SamplingParams(4))]
    out = token_logprobs(logits, seqs, [7, 8])
    lp = torch.log_softmax(logits[0], -1)
    assert out[1] is None
    assert out[0][0] == pytest.approx(lp[7].item(), abs=1e-6)
    assert [t for t, _ in out[0][1]] == lp.topk(3).indices.tolist()


def test_stop_token_ids_and_ignore_eos_end_a_sequence_as_asked():
    batch = DecodeBatch(None, {3}, torch.device("cpu"))
    a = Sequence([1], SamplingParams(5, stop_token_ids=(9,)))
    b = Sequence([1], SamplingParams(5, ignore_eos=True))
    out = batch._record([a, b], [9, 3], [None, None])
    assert [(s.finish_reason, t) for s, t, _, _ in out] == [("stop", 9), (None, 3)]


# ---- text --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False], ids=["DecodeStream", "prefix-offsets"])
def test_text_stream_never_splits_a_character(tokenizer, streaming):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # multi-byte characters span tokens
    stream = TextStream(tokenizer, tokenizer.encode("say: "), streaming=streaming)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    cut = TextStream(tokenizer, streaming=streaming)  # ends inside a character: released as U+FFFD
    assert "".join([cut.push(t) for t in ids[:-4]] + [cut.flush()]).endswith("🎉 \ufffd")


def test_text_stream_uses_the_streaming_decoder(tokenizer):
    stream = TextStream(tokenizer)
    assert stream._fast is not None  # DecodeStream, not re-decoding the sequence


@pytest.mark.parametrize("cuts", [[1], [2, 3], [1, 1, 1, 1, 1, 1, 1, 1]])
def test_stop_strings_cut_before_the_stop_also_across_chunks(cuts):
    text, stops = "abc<END>def", ["<END>", "zz"]
    chunks, i = [], 0
    for n in cuts * 20:
        chunks.append(text[i : i + n])
        i += n
    s, sent, hit = StopStrings(stops), [], False
    for c in chunks:
        out, hit = s.push(c)
        sent.append(out)
        if hit:
            break
    assert hit and "".join(sent) == "abc"
    assert all("<" not in x for x in sent)  # a possible stop prefix is held back, never sent
    s = StopStrings(["<END>"])
    assert s.push("ab<E") == ("ab", False) and s.push("x") == ("<Ex", False)
    assert s.push("<") == ("", False) and s.flush() == "<"


def test_completion_text_stop_string_in_multibyte_text_and_logprob_offsets(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    text = CompletionText(tokenizer, [], stop=["世界"], logprobs=True)
    lps = [(-0.5, [(t, -0.5)]) for t in ids]
    kept, out, got_lps, finish = text.feed(ids, None, lps)
    assert out == TEXT[: TEXT.index("世界")] and finish == "stop"
    assert kept == ids[: len(TEXT[: TEXT.index("世界") + 2].encode())]  # up to the stop's last byte
    assert b"".join(bytes(lp.bytes) for lp in got_lps) == bytes(kept)
    assert got_lps[1].text_offset == 1 and got_lps[-1].text_offset == len(out) + 1  # in 界, after 世


def test_completion_text_leaves_out_a_stop_tokens_text(tokenizer):
    ids = tokenizer.encode("ab!", add_special_tokens=False)
    text = CompletionText(tokenizer, [], stop_token_ids=[ids[-1]])
    assert text.feed(ids[:2], None, None)[1] == "ab"
    assert text.feed(ids[2:], "stop", None)[1:] == ("", None, "stop")


# ---- chat and request parsing ------------------------------------------------------------------------


def test_chat_template_renders_and_its_absence_is_a_clear_400(tokenizer):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # the built-in model ships one
    ids = chat_prompt_ids(tokenizer, messages)
    assert tokenizer.decode(ids) == "<bos>user: Hi\nassistant:"
    with pytest.raises(ServingError, match="only text parts"):
        chat_prompt_ids(tokenizer, [{"role": "user", "content": [{"type": "image_url"}]}])
    tokenizer.chat_template = None  # a checkpoint without a template
    try:
        with pytest.raises(ServingError) as e:
            chat_prompt_ids(tokenizer, messages)
        assert e.value.http_status == 400 and "chat template" in e.value.message
    finally:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def test_parsing_maps_options_and_refuses_unsupported_ones_by_name():
    req = openai_api.parse_chat(
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 5,
            "logprobs": True,
            "top_logprobs": 2,
            "stop": "\n",
            "n": 2,
            "seed": 3,
        },
        "m",
    )
    p = req.params[0]
    assert (p.max_tokens, p.logprobs, p.stop, p.n, p.seed, req.chat) == (5, 2, ("\n",), 2, 3, True)
    req = openai_api.parse_completion({"prompt": ["a", [1, 2]], "logprobs": 0, "stop_token_ids": [4]}, "m")
    assert [p.prompt_token_ids for p in req.params] == [None, [1, 2]] and req.params[0].logprobs == 0
    # Without max_tokens: a completion makes OpenAI's 16, a chat runs up to the context (None)
    assert req.params[0].max_tokens == 16
    chat = {"messages": [{"role": "user", "content": "x"}]}
    assert openai_api.parse_chat(chat, "m").params[0].max_tokens is None
    assert openai_api.parse_chat({**chat, "max_tokens": None}, "m").params[0].max_tokens is None
    assert openai_api.parse_chat({**chat, "max_tokens": 7}, "m").params[0].max_tokens == 7
    for body, needle in [
        ({"prompt": "a", "suffix": "b", "functions": [1]}, "functions"),
        ({"prompt": "a", "echo": True, "stream": True}, "echo"),
        ({"prompt": "a", "echo": 1}, "echo"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens=0"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
    ]:
        with pytest.raises(ServingError, match=needle):
            openai_api.parse_completion(body, "m")
    with pytest.raises(ServingError, match="response_format"):
        openai_api.parse_chat({"messages": [], "response_format": {"type": "yaml"}}, "m")


def test_echo_parsing_and_max_tokens_zero():
    req = openai_api.parse_completion(
        {"prompt": ["a", [1, 2]], "echo": True, "max_tokens": 0, "logprobs": 1}, "m"
    )
    assert req.echo and not req.generate and [p.max_tokens for p in req.params] == [None, None]
    req = openai_api.parse_completion({"prompt": "a", "echo": True, "max_tokens": 1}, "m")
    assert req.echo and req.generate and req.params[0].max_tokens == 1


@pytest.mark.parametrize("top", [0, 3])
def test_prompt_logprobs_equal_transformers_log_softmax(tiny_model_dir, tokenizer, top):
    """The echoed prompt's logprobs: null first, then log_softmax (fp32) of the previous position's
    logits at each token, as transformers computes them."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("deepseek_v3")).eval()
    ids = [1, 17, 5, 40, 9, 33, 2, 11]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    ref = torch.log_softmax(logits.float(), dim=-1)
    lps = echo_token_logprobs(tokenizer, ids, prompt_logprobs(logits, ids, top))
    assert [lp.token_id for lp in lps] == ids
    assert lps[0].logprob is None and lps[0].top_logprobs is None
    expected = [ref[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
    torch.testing.assert_close(
        torch.tensor([lp.logprob for lp in lps[1:]]), torch.tensor(expected), atol=1e-5, rtol=0
    )
    for i, lp in enumerate(lps[1:], start=1):
        assert len(lp.top_logprobs) == top
        if top:
            assert [a.token_id for a in lp.top_logprobs] == ref[i - 1].topk(top).indices.tolist()
    formatted = openai_api.completion_logprobs(lps)
    assert formatted["token_logprobs"][0] is None and formatted["top_logprobs"][0] is None
    assert formatted["text_offset"] == sorted(formatted["text_offset"])
