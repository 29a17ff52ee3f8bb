"""The built-in default model: a small DeepSeek-V3-architecture checkpoint, no download.

The default ("trained") is a 2.3M-parameter V3 model (MLA, a dense first layer, then MoE layers of
16 routed experts, top-4 within 2 of 4 groups, one shared expert, sigmoid gate with
`e_score_correction_bias`) trained on the Python standard library's own sources by
`python -m router_service.train_default_model`. Its weights are committed in
`router_service/builtin_model/` (4.6 MB in bf16) rather than rebuilt on first use: training is
deterministic but takes minutes on a 2-core CPU, and a first `moe-serve generate` should take
seconds. It writes Python-looking text, answers through the chat template in
`router_service.serving.chat`, and its router has a trained model's skewed expert load. See
docs/models.md, "The built-in default model", for the figures.

The random presets ("tiny", "medium" and their "-skewed" variants) are built on first use from a
seed (the same bytes every time): they exercise every part of the V3 MoE path the engine serves at
fixed shapes for tests and benchmarks: a dense first layer, 32 routed experts in 4 groups of which
a token may use 2, top-4 with a non-zero `e_score_correction_bias`, one shared expert,
`norm_topk_prob` and `routed_scaling_factor` 2.5; their text is gibberish.

`default_model_dir(preset)` puts a preset into the cache (`$MOE_SERVING_CACHE`, else
~/.cache/moe-serving): for "trained" a copy of the committed files, so every node of a cluster finds
the model at the same cache path whatever its install path.

The tokenizer is byte-level (GPT-2's ByteLevel pre-tokenizer and decoder, no merges): one token per
UTF-8 byte, id = byte value, plus `<pad>`, `<bos>` and `<eos>`, so any text round-trips exactly.
Every built-in model ships `DEFAULT_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from router_service.serving.chat import DEFAULT_CHAT_TEMPLATE

FORMAT_VERSION = 2
"""Bump when the architecture, weights or tokenizer change (the committed trained weights included),
so caches built by older code are not reused."""
CACHE_ENV = "MOE_SERVING_CACHE"
SEED = 0
TRAINED = "trained"  # the default preset: the committed trained checkpoint
BUILTIN_MODEL_DIR = Path(__file__).parent / "builtin_model"

NUM_BYTES = 256
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 256, 257, 258: after the bytes, so id == byte value
VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)
PRINTABLE = range(0x20, 0x7F)  # the bytes the random model is made to emit, " " .. "~"


# The default model: V3's routing rules (groups, bias, normalised top-k, scaling) at a toy size.
TINY_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=512,  # the dense first layer's MLP
    moe_intermediate_size=128,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    n_routed_experts=32,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    # MLA at a toy size (V3: 128 heads, q_lora 1536, kv_lora 512, rope 64, nope 128, v 128).
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    pad_token_id=NUM_BYTES + SPECIAL_TOKENS.index(PAD),
    bos_token_id=NUM_BYTES + SPECIAL_TOKENS.index(BOS),
    eos_token_id=NUM_BYTES + SPECIAL_TOKENS.index(EOS),
)

# Bigger shapes of the same architecture, for benchmarks where expert compute should dominate
# ("medium": DeepSeek-V2-Lite's expert shape, hidden 2048, 64 experts of 1408, top-6, at 4 layers).
PRESETS = {
    "tiny": {},
    "medium": {
        "hidden_size": 2048,
        "intermediate_size": 4096,
        "moe_intermediate_size": 1408,
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "n_group": 8,
        "topk_group": 3,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": 512,
        "kv_lora_rank": 256,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
    },
}


# "-skewed" variants: the same weights, except that V3's load-balancing bias
# (`e_score_correction_bias`, which moves selection but not the gate weights) favours a few "hot"
# experts per layer, drawn from the first quarter of the expert ids. Contiguous placement puts them
# all on worker 0, as a real model's hot experts can land on one rank: the workload EPLB fixes.
SKEWED = "-skewed"
HOT_EXPERTS_PER_LAYER = 6
HOT_BIAS = 0.5


def preset_names() -> list[str]:
    return sorted([TRAINED, *PRESETS, *(p + SKEWED for p in PRESETS)])


def model_name(preset: str = TRAINED) -> str:
    """The cache entry's name of a preset, e.g. "default-deepseek-v3-trained-v2"."""
    if preset not in preset_names():
        raise ValueError(f"unknown model preset {preset!r}; choose one of {preset_names()}")
    return f"default-deepseek-v3-{preset}-v{FORMAT_VERSION}"


DEFAULT_MODEL_NAME = model_name()


def default_config(preset: str = "tiny"):
    """The DeepSeek-V3 config of a preset: the random ones' V3 routing rules at a toy size, or the
    committed trained model's."""
    from transformers import DeepseekV3Config

    model_name(preset)  # validates
    if preset == TRAINED:
        return DeepseekV3Config.from_pretrained(BUILTIN_MODEL_DIR)
    return DeepseekV3Config(**{**TINY_CONFIG, **PRESETS[preset.removesuffix(SKEWED)]})


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table, which the `tokenizers` ByteLevel pre-tokenizer applies.

    `tokenizers` exposes the alphabet only as an unordered set (`ByteLevel.alphabet()`); the order
    is needed here to give byte b the token id b. Visible Latin-1 bytes map to themselves, the other
    68 to chr(256), chr(257), ... in byte order.
    """
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(NUM_BYTES) if b not in visible]
    return {**{b: chr(b) for b in visible}, **{b: chr(0x100 + i) for i, b in enumerate(others)}}


def make_tokenizer():
    """A byte-level `PreTrainedTokenizerFast`: token id = UTF-8 byte value, `<bos>` prepended, with
    the built-in chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    vocab.update({tok: NUM_BYTES + i for i, tok in enumerate(SPECIAL_TOKENS)})
    # No merges: one token per byte. The ByteLevel decoder turns bytes back into text lossily, so
    # an invalid byte the random model emits becomes one U+FFFD and the rest still reads.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",  # decoder-only: prompts end where generation starts
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def make_default_model(outdir: str | Path, seed: int = SEED, preset: str = TRAINED) -> Path:
    """Write a built-in model into `outdir` (created if missing); the same bytes on every call.

    "trained" copies the committed checkpoint (`seed` unused); a random preset is built from `seed`.
    Returns `outdir`. The global torch RNG is left as it was.
    """
    from transformers import AutoModelForCausalLM

    outdir = Path(outdir)
    if preset == TRAINED:
        shutil.copytree(BUILTIN_MODEL_DIR, outdir, dirs_exist_ok=True)
        return outdir
    cfg = default_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                # Gate logits ~ N(0, 1) on unit-RMS inputs: routing scores well spread, no near-ties.
                if name.endswith("mlp.gate.weight"):
                    param.normal_(0.0, cfg.hidden_size**-0.5)
            for name, buf in model.named_buffers():
                # V3's load-balancing bias is zero at init; a random one makes the tests see it.
                if name.endswith("e_score_correction_bias"):
                    buf.uniform_(-0.1, 0.1)
                    if preset.endswith(SKEWED):
                        pool = torch.randperm(max(HOT_EXPERTS_PER_LAYER, buf.numel() // 4))
                        buf[pool[:HOT_EXPERTS_PER_LAYER]] += HOT_BIAS
            # Only printable ASCII gets an output row (logits ~ N(0, 9), the rest exactly 0), so the
            # random model's gibberish prints as visible characters rather than as U+FFFD for
            # invalid UTF-8; every token id still goes in and every byte still round-trips.
            head = model.get_output_embeddings().weight  # [V, H]
            head.normal_(0.0, 3.0 * cfg.hidden_size**-0.5)
            head[: PRINTABLE.start].zero_()
            head[PRINTABLE.stop :].zero_()
    model.save_pretrained(outdir)
    make_tokenizer().save_pretrained(outdir)
    return outdir


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moe-serving")


def default_model_path(preset: str = TRAINED) -> Path:
    """Where the cached default model (or another preset) lives; maybe not built yet."""
    return cache_root() / model_name(preset)


def default_model_dir(preset: str = TRAINED) -> Path:
    """The cached default model (or another preset), put there on first use ("trained": a copy,
    well under a second; "tiny": a few seconds; "medium": a minute, 6.6 GB).

    The model is built in a temporary directory next to the cache entry and renamed into place, so a
    crash never leaves a half-written model and two processes racing to build it both end up using
    one complete copy.
    """
    path = default_model_path(preset)
    if path.is_dir():
        return path
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=root))
    try:
        make_default_model(tmp, preset=preset)
        try:
            tmp.rename(path)
        except OSError:
            if not path.is_dir():  # not lost to a concurrent build: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_default_model(path: str | Path) -> None:
    """Build the default model (or another preset) at `path` if `path` is where it is cached and it is
    not there yet; anything else is left alone. Every process that reads a checkpoint calls this, so
    on a cluster each node builds the built-in model the first time it needs it (the bytes are the
    same everywhere: it is seeded)."""
    path = Path(path)
    if path.is_dir():
        return
    for preset in preset_names():
        if path == default_model_path(preset):
            default_model_dir(preset)
            return
