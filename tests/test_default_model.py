"""The built-in default model: deterministic, V3-shaped as issue 3 asks, byte-exact tokenizer, cached."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from moe_models import spec_from_pretrained
from router_service import Engine
from router_service import default_model as dm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return dm.make_default_model(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_build_is_deterministic(model_dir, tmp_path):
    before = torch.random.get_rng_state()
    again = dm.make_default_model(tmp_path / "again")
    assert torch.equal(torch.random.get_rng_state(), before), "building must not move the global RNG"
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    for name in names:
        assert (model_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_config_has_the_v3_features_issue_3_asks_for(model_dir, tokenizer):
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


def test_checkpoint_has_a_nonzero_correction_bias_in_every_moe_layer(model_dir):
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        biases = {k: f.get_tensor(k) for k in f.keys() if k.endswith("e_score_correction_bias")}
    assert len(biases) == dm.default_config().num_hidden_layers - 1
    for key, bias in biases.items():
        assert bias.abs().min() > 0, key
        assert bias.std() > 0.01, key


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
    # The greedy continuation is visible ASCII (see make_default_model), so the demo prints text.
    text = tokenizer.decode(got[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.isascii() and text.isprintable() and len(text) == 12


def _fake_build(calls: list):
    def build(outdir, preset="tiny"):
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
    medium = dm.default_model_dir("medium")
    assert medium.name == dm.DEFAULT_MODEL_NAME.replace("tiny", "medium") and calls[-1][1] == "medium"
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
    def crash(outdir, preset="tiny"):
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
