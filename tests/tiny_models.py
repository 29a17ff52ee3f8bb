"""Tiny random checkpoints of every served family, built with transformers itself (no download).

Each variant exercises one gating rule or layer-layout rule of the DESIGN table. Gate weights get a
larger spread than transformers' init so that routing decisions are not near-ties (a near-tie could
flip in bf16 between two equally valid summation orders).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

VOCAB = 96
HIDDEN = 32
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def _configs() -> dict:
    return {
        # V3: sigmoid + correction bias + groups ranked by top-2 sum + norm_topk_prob + scaling.
        "deepseek_v3": DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},
            **MLA,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        # V2 greedy softmax, 2 shared experts, no dense layer.
        "deepseek_v2": DeepseekV2Config(
            **{**COMMON, "num_key_value_heads": 4},
            **{**MLA, "q_lora_rank": None},
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            first_k_dense_replace=0,
            n_routed_experts=12,
            num_experts_per_tok=3,
            n_shared_experts=2,
            topk_method="greedy",
            routed_scaling_factor=1.5,
        ),
        # V2 group_limited_greedy (groups ranked by their max score).
        "deepseek_v2_grouped": DeepseekV2Config(
            **{**COMMON, "num_key_value_heads": 4},
            **MLA,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.0,
        ),
        # Qwen2: shared expert behind a sigmoid gate; every second layer sparse (decoder_sparse_step).
        "qwen2_moe": Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=4,
            decoder_sparse_step=2,
            num_experts=10,
            num_experts_per_tok=4,
            norm_topk_prob=False,
        ),
        # Qwen3: no shared expert, normalised top-k, layer 0 dense via mlp_only_layers.
        "qwen3_moe": Qwen3MoeConfig(
            **COMMON,
            head_dim=8,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            mlp_only_layers=[0],
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
        # Mixtral: softmax over the top-k, checkpoint names block_sparse_moe / w1 w2 w3, tied embeddings.
        "mixtral": MixtralConfig(
            **COMMON,
            intermediate_size=24,
            num_hidden_layers=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            tie_word_embeddings=True,
        ),
    }


def _block_configs() -> dict:
    """The block families (moe_models/families.py): transformers' own MoE block runs in the router.

    Small enough to be quick, big enough that every family's features take part: groups, shared
    experts and their gates, dense first layers, hash routing (DeepSeek-V4's first layer), zero
    experts (LongCat), biases and clamped SwiGLU (gpt-oss), router-scaled input (Llama 4), hybrid
    linear-attention / conv layers (Qwen3-Next, Qwen3.5, LFM2).
    """
    moe = dict(intermediate_size=64, moe_intermediate_size=16)
    linear = dict(
        layer_types=["linear_attention", "full_attention"],
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    )
    mla = {**MLA, "num_key_value_heads": 4}
    grouped = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)
    two = dict(num_hidden_layers=2)
    dense_sparse = dict(mlp_layer_types=["dense", "sparse"])  # layer 0 dense, layer 1 MoE
    indexed = dict(  # DeepSeek-V3.2-style sparse attention indexer
        index_head_dim=16, index_topk=4, index_n_heads=2, layer_types=["indexed_attention"] * 2
    )
    kw = {
        "deepseek_v32": dict(**mla, **moe, **grouped, num_hidden_layers=3, n_group=2, topk_group=1),
        "deepseek_v4": dict(
            intermediate_size=16,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            head_dim=16,
            mlp_layer_types=["hash_moe", "moe", "moe"],
        ),
        "glm4_moe": dict(**moe, **grouped, num_hidden_layers=3, n_group=2, topk_group=1, head_dim=8),
        "glm4_moe_lite": dict(**mla, **moe, **grouped, num_hidden_layers=3, n_group=2, topk_group=1),
        "qwen3_next": dict(
            **moe,
            **linear,
            num_hidden_layers=2,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
        ),
        "qwen3_5_moe_text": dict(
            **linear,
            num_hidden_layers=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
        ),
        "gpt_oss": dict(
            num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8
        ),
        "minimax_m2": dict(
            num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8
        ),
        "llama4_text": dict(
            num_hidden_layers=2,
            intermediate_size=16,
            intermediate_size_mlp=32,
            num_local_experts=8,
            num_experts_per_tok=1,
            head_dim=8,
        ),
        "ernie4_5_moe": dict(
            **moe, num_hidden_layers=3, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1
        ),
        "hunyuan_v1_moe": dict(
            num_hidden_layers=2,
            intermediate_size=16,
            num_experts=8,
            moe_topk=2,
            num_shared_expert=1,
            head_dim=8,
        ),
        "dots1": dict(**moe, **grouped, num_hidden_layers=3, head_dim=8),
        "longcat_flash": dict(
            **mla,
            num_layers=2,
            ffn_hidden_size=64,
            expert_ffn_hidden_size=16,
            n_routed_experts=8,
            zero_expert_num=2,
            moe_topk=2,
            head_dim=8,
        ),
        "olmoe": dict(num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
        "flex_olmo": dict(num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
        "granitemoe": dict(
            num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2
        ),
        "granitemoeshared": dict(
            num_hidden_layers=2,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            shared_intermediate_size=24,
        ),
        "phimoe": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
        "solar_open": dict(
            **moe,
            num_hidden_layers=2,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            head_dim=8,
        ),
        "exaone_moe": dict(
            **moe, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, head_dim=8
        ),
        "lfm2_moe": dict(
            **moe,
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=2,
            num_dense_layers=1,
            layer_types=["conv", "full_attention", "conv"],
        ),
        "cohere2_moe": dict(num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
        # Families added with transformers 5.2x: plain SwiGLU experts under each family's own block.
        "afmoe": dict(**moe, **two, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, head_dim=8),
        "axk1": dict(
            **mla,
            **moe,
            **two,
            **dense_sparse,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            head_dim=8,
        ),
        "axk2": dict(
            **mla,
            **moe,
            **two,
            **dense_sparse,
            **indexed,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            head_dim=8,
        ),
        "beam": dict(
            **moe,
            **two,
            **dense_sparse,
            num_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.0,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
        ),
        "dots3_note_text": dict(
            **mla,
            **moe,
            **two,
            **dense_sparse,
            index_head_dim=16,
            index_topk=4,
            index_n_heads=2,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            head_dim=8,
            shared_experts_intermediate_size=24,
            sliding_window=4,
            layer_types=["indexed_attention", "sliding_attention"],
        ),
        "flint": dict(
            **moe,
            **two,
            num_experts=8,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=24,
            mlp_only_layers=[0],
            head_dim=8,
            layer_types=["full_attention", "sliding_attention"],
            sliding_window=4,
        ),
        "glm_moe_dsa": dict(
            **mla,
            **moe,
            **two,
            **dense_sparse,
            **indexed,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            head_dim=8,
        ),
        "granitemoe_swa": dict(**two, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
        # Mamba-2 layers (transformers' torch path on CPU) next to attention.
        "granitemoehybrid": dict(
            **two,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            shared_intermediate_size=24,
            layer_types=["mamba", "attention"],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=8,
            mamba_chunk_size=8,
        ),
        "hy_v3": dict(
            **moe,
            **two,
            **dense_sparse,
            num_experts=8,
            num_experts_per_tok=2,
            num_shared_experts=1,
            head_dim=8,
        ),
        # Clamped SwiGLU (a limit the tiny activations reach); the unclamped shared expert stays in the router.
        "hy_v4": dict(
            **mla,
            **moe,
            **two,
            **dense_sparse,
            **indexed,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            head_dim=8,
            swiglu_limit=0.3,
        ),
        # Shared experts gated per token by the router (they stay in the router's block).
        "inkling_text": dict(
            **moe, **two, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, head_dim=8
        ),
        # Mamba layers, MoE every second layer.
        "jamba": dict(
            **two,
            intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=0,
            mamba_dt_rank=8,
            mamba_d_state=8,
        ),
        "kolibri1": dict(
            **two,
            moe_intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=24,
            head_dim=8,
        ),
        # Routed sum scaled before the shared expert is added: the shared expert stays in the router.
        "laguna": dict(
            **moe,
            **two,
            **dense_sparse,
            num_experts=8,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=24,
            moe_routed_scaling_factor=2.5,
            head_dim=8,
            layer_types=["full_attention"] * 2,
        ),
        "mellum": dict(**moe, **two, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
        "mimo_v2_flash": dict(
            **moe,
            **two,
            **dense_sparse,
            n_routed_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            v_head_dim=8,
            sliding_window=4,
            layer_types=["full_attention", "sliding_attention"],
        ),
        # gpt-oss's clamped gate (not interleaved, no biases); routed sum scaled before the shared experts.
        "minimax_m3_vl_text": dict(
            **two,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            dense_intermediate_size=32,
            shared_intermediate_size=24,
            swiglu_limit=0.3,
            routed_scaling_factor=2.0,
            index_head_dim=8,
            mlp_layer_types=["sparse"] * 2,
            layer_types=["full_attention"] * 2,
        ),
        "qwen4_exp_text": dict(
            **linear,
            **two,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=24,
            head_dim=8,
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=8,
            indexer_budget=4,
            indexer_compress_ratio=2,
        ),
        # Top-1 routing with a router that carries state from layer to layer.
        "zaya": dict(
            **two,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=1,
            head_dim=8,
            router_hidden_size=16,
            layer_types=["hybrid"] * 2,
        ),
    }
    return {t: AutoConfig.for_model(t, **{**COMMON, **k}) for t, k in kw.items()}


BUILTIN_VARIANTS = tuple(_configs())  # the first five families, one variant per gating rule
BLOCK_VARIANTS = tuple(_block_configs())
FAMILIES = BUILTIN_VARIANTS + BLOCK_VARIANTS
# Block families the Ray transports are tested on (every family runs on the local transport, whose
# results the Ray transports reproduce bit for bit): one for each distinct thing a worker or the
# router's block path does, split between the two transports to keep CI short: biases, interleaved
# transposed tensors and clamped SwiGLU (gpt-oss), router-scaled input and the replaced block
# (Llama 4), zero experts (LongCat) over "ray"; hash routing and w1/w2/w3 under `ffn` (DeepSeek-V4),
# input_linear / output_linear (Granite), a gated shared expert next to linear attention
# (Qwen3-Next) over "compiled".
RAY_BLOCK_VARIANTS = ("gpt_oss", "llama4_text", "longcat_flash")
COMPILED_BLOCK_VARIANTS = ("deepseek_v4", "granitemoe", "qwen3_next")
# (variant, workers) pairs for the two Ray transports' tests. The builtin families differ only in
# their gating, which the router computes the same way whatever the transport; the transports see
# expert batches. So each builtin family runs once per transport, at 2 workers on one and 3 on the
# other (every family meets both slicings, every transport both counts); the block families at 3.
# Each case starts a cluster (controller, router and worker processes: ~14 s on 2 cores), so this
# halves the two modules' time against both counts on both transports.
_BUILTIN_CASES = [(f, 2 + i % 2) for i, f in enumerate(BUILTIN_VARIANTS)]
_BUILTIN_CASES_SWAPPED = [(f, 5 - n) for f, n in _BUILTIN_CASES]
RAY_CASES = _BUILTIN_CASES + [(f, 3) for f in RAY_BLOCK_VARIANTS]
COMPILED_CASES = _BUILTIN_CASES_SWAPPED + [(f, 3) for f in COMPILED_BLOCK_VARIANTS]
ROUTER_WEIGHT = re.compile(
    r"\.(mlp|block_sparse_moe|feed_forward)\.(gate|router)(\.layer|\.classifier)?\.weight$"
)


def make_tiny_model(
    variant: str, outdir: str | Path, seed: int = 0, max_shard_size: str | None = None
) -> Path:
    """Build, perturb and save one tiny checkpoint; returns its directory."""
    cfg = {**_configs(), **_block_configs()}[variant]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ROUTER_WEIGHT.search(name):
                param.normal_(0.0, 0.5)
        for name, t in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                t.uniform_(-0.1, 0.1)
            if name.endswith("tid2eid"):  # DeepSeek-V4's hash routing: k distinct experts per token id
                experts = model.config.num_local_experts
                t.copy_(torch.stack([torch.randperm(experts)[: t.shape[1]] for _ in range(t.shape[0])]))
    outdir = Path(outdir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(outdir, **kwargs)
    return outdir
