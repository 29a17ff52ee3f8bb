"""Tiny random checkpoints of every served family, built with transformers itself (no download).

Each variant exercises one gating rule or layer-layout rule of the DESIGN table. Gate weights get a
larger spread than transformers' init so that routing decisions are not near-ties (a near-tie could
flip in bf16 between two equally valid summation orders).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
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


FAMILIES = tuple(_configs())


def make_tiny_model(
    variant: str, outdir: str | Path, seed: int = 0, max_shard_size: str | None = None
) -> Path:
    """Build, perturb and save one tiny checkpoint; returns its directory."""
    cfg = _configs()[variant]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.1, 0.1)
    outdir = Path(outdir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(outdir, **kwargs)
    return outdir
