"""The built-in models: the trained default (committed, readable, better than a unigram on held-out
text, with a chat template) and the random presets (deterministic, V3-shaped as issue 3 asks);
byte-exact tokenizer; cached."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from moe_models import spec_from_pretrained
from router_service import Engine
from router_service import default_model as dm
from router_service import train_default_model as train
from router_service.serving.chat import chat_prompt_ids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The default model: the committed trained checkpoint."""
    return dm.make_default_model(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return dm.make_default_model(tmp_path_factory.mktemp("random"), preset="tiny")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("preset", [dm.TRAINED, "tiny"])
def test_build_is_deterministic(model_dir, random_dir, preset, tmp_path):
    first = model_dir if preset == dm.TRAINED else random_dir
    before = torch.random.get_rng_state()
    again = dm.make_default_model(tmp_path / "again", preset=preset)
    assert torch.equal(torch.random.get_rng_state(), before), "building must not move the global RNG"
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


@pytest.mark.parametrize("preset", [dm.TRAINED, "tiny"])
def test_config_has_the_v3_features_issue_3_asks_for(model_dir, random_dir, preset, tokenizer):
    model_dir = model_dir if preset == dm.TRAINED else random_dir
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3"
    assert cfg["first_k_dense_replace"] == 1 and cfg["num_hidden_layers"] > 1
    assert cfg["n_routed_experts"] >= 16
    assert cfg["num_experts_per_tok"] >= 4
    assert cfg["n_shared_experts"] == 1
    assert 1 < cfg["topk_group"] < cfg["n_group"]
    assert cfg["norm_topk_prob"] is True and cfg["routed_scaling_factor"] == 2.5
    assert cfg["vocab_size"] >= len(tokenizer)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    spec = spec_from_pretrained(model_dir)  # the engine serves it
    assert list(spec.moe_layers) == list(range(1, cfg["num_hidden_layers"]))


@pytest.mark.parametrize("preset", [dm.TRAINED, "tiny"])
def test_checkpoint_has_a_nonzero_correction_bias_in_every_moe_layer(model_dir, random_dir, preset):
    model_dir = model_dir if preset == dm.TRAINED else random_dir
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        biases = {k: f.get_tensor(k) for k in f.keys() if k.endswith("e_score_correction_bias")}
    assert len(biases) == dm.default_config(preset).num_hidden_layers - 1
    for key, bias in biases.items():
        assert bias.dtype == torch.float32, key  # kept in fp32, as V3 does
        if preset == dm.TRAINED:  # learnt by the balancing rule: +-gamma steps, some may sum to 0
            assert bias.std() > 0 and (bias != 0).sum() > len(bias) // 2, key
        else:
            assert bias.abs().min() > 0 and bias.std() > 0.01, key


def test_trained_model_is_small_bf16_and_computes_in_fp32(model_dir):
    assert (model_dir / "model.safetensors").stat().st_size < 8 * 2**20
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if not k.endswith("e_score_correction_bias")} == {"BF16"}
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "float32"


def test_trained_model_beats_a_unigram_on_held_out_stdlib_text(model_dir):
    # Held-out files of this Python's standard library (none of them seen in training when this is
    # the Python the model was trained with). The unigram is fitted on the evaluated bytes themselves,
    # so it is the best any byte-unigram model can do on them: a strict baseline.
    _, held = train.split_corpus()
    windows = train.eval_windows(train.token_stream(held), seq_len=256, n=8)  # [8, 257]
    targets = windows[:, 1:].flatten()
    freq = torch.bincount(targets, minlength=dm.VOCAB_SIZE).double() / targets.numel()
    unigram_ppl = math.exp(-freq[targets].log().mean().item())
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, load = train.evaluate(model, windows)
    assert math.exp(nll) < 0.5 * unigram_ppl, (math.exp(nll), unigram_ppl)
    # A trained router: no expert starves, yet the load is far from uniform.
    skew = train.load_skew(load)
    assert all(share > 0.3 for share in skew["busiest_quarter_share"]), skew


def test_tokenizer_is_byte_level_with_special_tokens(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == dm.VOCAB_SIZE
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == set(dm.SPECIAL_TOKENS)
    assert set(dm.byte_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "", "  leading and trailing  ", "tabs\tand\nnew\r\nlines", "Grüße, café, naïve",
     "日本語のテキスト", "emoji 🙂🚀 and ZWJ 👩‍💻", "\x00\x7f control"],
)  # fmt: skip
def test_tokenizer_round_trips_utf8_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # one token per byte, id = byte value
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer(text)["input_ids"]
    assert with_bos == [tokenizer.bos_token_id, *ids]
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_chat_template_renders_and_the_model_answers(model_dir, tokenizer):
    messages = [{"role": "user", "content": "What does len() return?"}]
    ids = chat_prompt_ids(tokenizer, messages)
    assert tokenizer.decode(ids) == "<bos>user: What does len() return?\nassistant:"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert len(reply) > 0 and reply.isascii(), repr(reply)


def test_tokenizer_decodes_invalid_utf8_locally(tokenizer):
    # A random model may emit any byte: one bad byte must not garble the text around it.
    assert tokenizer.decode([72, 105, 0xFF, 72, 105]) == "Hi\ufffdHi"


@pytest.mark.parametrize("num_workers", [1, 3])
def test_engine_greedy_generate_equals_transformers(model_dir, tokenizer, num_workers):
    enc = tokenizer(["Hello, world", "The capital of France is"], return_tensors="pt", padding=True)
    assert (enc["attention_mask"][0, 0] == 0).item(), "prompts are padded on the left"
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    want = ref.generate(**enc, max_new_tokens=12, do_sample=False)
    with Engine.from_pretrained(model_dir, num_workers=num_workers) as engine:
        got = engine.generate(enc["input_ids"], 12, attention_mask=enc["attention_mask"])
    assert torch.equal(got, want)
    # The greedy continuation is text: ASCII, as the Python sources the model learnt from.
    text = tokenizer.decode(got[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.isascii() and len(text) == 12, repr(text)


def test_random_model_writes_visible_ascii(random_dir):
    tokenizer = AutoTokenizer.from_pretrained(random_dir)
    enc = tokenizer(["Hello, world"], return_tensors="pt")
    out = AutoModelForCausalLM.from_pretrained(random_dir).generate(**enc, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.isascii() and text.isprintable() and len(text) == 12  # see make_default_model


def _fake_build(calls: list):
    def build(outdir, preset=dm.TRAINED):
        calls.append((Path(outdir), preset))
        (Path(outdir) / "config.json").write_text("{}")
        return Path(outdir)

    return build


def test_default_model_dir_builds_once_into_the_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(dm, "make_default_model", _fake_build(calls))
    first = dm.default_model_dir()
    assert first == tmp_path / dm.DEFAULT_MODEL_NAME and (first / "config.json").is_file()
    assert f"v{dm.FORMAT_VERSION}" in first.name
    assert dm.default_model_dir() == first
    assert len(calls) == 1, "a built model is reused, not rebuilt"
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "no temporary directory left behind"
    assert first.name == f"default-deepseek-v3-trained-v{dm.FORMAT_VERSION}" and calls[-1][1] == dm.TRAINED
    medium = dm.default_model_dir("medium")
    assert medium.name == dm.DEFAULT_MODEL_NAME.replace("trained", "medium") and calls[-1][1] == "medium"
    with pytest.raises(ValueError, match="preset"):
        dm.default_model_dir("huge")


def test_medium_preset_is_the_same_architecture_with_lite_sized_experts():
    cfg = dm.default_config("medium")
    tiny = dm.default_config()
    assert (cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok) == (
        2048,
        64,
        1408,
        6,
    )
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.first_k_dense_replace) == (
        tiny.model_type,
        tiny.num_hidden_layers,
        tiny.first_k_dense_replace,
    )


def test_a_crashed_build_leaves_no_half_model(tmp_path, monkeypatch):
    def crash(outdir, preset=dm.TRAINED):
        (Path(outdir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(dm, "make_default_model", crash)
    with pytest.raises(KeyboardInterrupt):
        dm.default_model_dir()
    assert list(tmp_path.iterdir()) == []
    calls = []
    monkeypatch.setattr(dm, "make_default_model", _fake_build(calls))
    assert dm.default_model_dir().is_dir() and len(calls) == 1
