"""The MoE families served, and how a family's spec is read off transformers' own model.

The router keeps transformers' MoE block of every family, so its own router module picks the
experts (whatever its rule: groups, biases, hash routing by token id, softmax over the top-k, ...)
and its own forward combines the shared experts; only the block's `experts` module goes to the
workers. (The first five families once had a hand-written gate; it measured no faster than their
own routers, docs/performance.md "Gate", and was retired.) Adding a family is one `BlockFamily`
entry below plus its tiny test config:
what the spec needs (which layers are MoE, expert count and sizes, the activation, biases, shared
experts) is read from the model transformers builds on the meta device, so it is exactly what the
reference computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.expert_layout import SHARED_NAMES
from moe_models.spec import (
    BUILTIN_FAMILIES,
    ConfigError,
    ExpertFn,
    GatingSpec,
    ModelSpec,
)


@dataclass(frozen=True)
class BlockFamily:
    """What cannot be read off the model: how the experts' tensors are laid out and called."""

    # gate_up_proj stored [E, H, 2I] and down_proj [E, I, H] (x @ W) instead of [E, 2I, H] / [E, H, I]
    transposed: bool = False
    # gate and up interleaved column by column in gate_up_proj (gpt-oss) instead of gate then up
    interleaved: bool = False
    style: str = "glu"  # ExpertFn.style
    # The block calls its experts on input scaled by the gate weights (Llama 4), see ExpertFn.
    scale_input: bool = False
    block_forward: str = "own"  # ModelSpec.block_forward
    # The block scales the routed experts' sum before adding the shared experts (Laguna, MiniMax-M3:
    # x routed_scaling_factor), so the shared experts stay in the router's block.
    shared_on_router: bool = False
    examples: str = ""  # published checkpoints, for docs/models.md


BLOCK_FAMILIES: dict[str, BlockFamily] = {
    "deepseek_v32": BlockFamily(examples="deepseek-ai/DeepSeek-V3.2-Exp"),
    "deepseek_v4": BlockFamily(examples="deepseek-ai/DeepSeek-V4"),
    "glm4_moe": BlockFamily(examples="zai-org/GLM-4.5, GLM-4.6, GLM-4.7"),
    "glm4_moe_lite": BlockFamily(examples="zai-org/GLM-4.7-Flash"),
    "qwen3_next": BlockFamily(examples="Qwen/Qwen3-Next-80B-A3B-Instruct"),
    "qwen3_5_moe_text": BlockFamily(examples="Qwen/Qwen3.5-MoE (text part)"),
    "gpt_oss": BlockFamily(
        transposed=True, interleaved=True, style="gpt_oss", examples="openai/gpt-oss-20b, 120b"
    ),
    "minimax_m2": BlockFamily(examples="MiniMaxAI/MiniMax-M2"),
    "llama4_text": BlockFamily(
        transposed=True, scale_input=True, block_forward="llama4", examples="meta-llama/Llama-4-Scout (text)"
    ),
    "ernie4_5_moe": BlockFamily(examples="baidu/ERNIE-4.5-21B-A3B-PT"),
    "hunyuan_v1_moe": BlockFamily(examples="tencent/Hunyuan-A13B-Instruct"),
    "dots1": BlockFamily(examples="rednote-hilab/dots.llm1.inst"),
    "longcat_flash": BlockFamily(examples="meituan-longcat/LongCat-Flash-Chat"),
    "olmoe": BlockFamily(examples="allenai/OLMoE-1B-7B-0924"),
    "flex_olmo": BlockFamily(examples="allenai/FlexOlmo-7x7B-1T"),
    "granitemoe": BlockFamily(examples="ibm-granite/granite-3.1-3b-a800m-instruct"),
    "granitemoeshared": BlockFamily(examples="ibm-research/moe-7b-1b-active-shared-experts"),
    "phimoe": BlockFamily(examples="microsoft/Phi-3.5-MoE-instruct"),
    "solar_open": BlockFamily(examples="upstage/Solar-Open"),
    "exaone_moe": BlockFamily(examples="LGAI-EXAONE/K-EXAONE"),
    "lfm2_moe": BlockFamily(examples="LiquidAI/LFM2-8B-A1B"),
    "cohere2_moe": BlockFamily(examples="CohereLabs/command-a-moe"),
    "afmoe": BlockFamily(examples="arcee-ai/Trinity-Mini"),
    "axk1": BlockFamily(examples="skt/A.X-K1"),
    "axk2": BlockFamily(examples="skt/A.X-K2"),
    "beam": BlockFamily(examples="reflection/Beam-1.0-501B-A23B"),
    "dots3_note_text": BlockFamily(examples="dots-studio/dots3-note-prev (text part)"),
    "flint": BlockFamily(examples="RecursiveSI/flint"),
    "glm_moe_dsa": BlockFamily(examples="zai-org/GLM-5"),
    "granitemoe_swa": BlockFamily(examples="IBM Granite MoE with sliding-window attention"),
    "granitemoehybrid": BlockFamily(examples="ibm-granite/granite-4.0-h-tiny"),
    "hy_v3": BlockFamily(examples="tencent/Hy3-preview"),
    "hy_v4": BlockFamily(examples="tencent/Hy4-preview"),
    "inkling_text": BlockFamily(examples="thinkingmachines/Inkling (text part)"),
    "jamba": BlockFamily(examples="ai21labs/Jamba-v0.1"),
    "kolibri1": BlockFamily(examples="Aleph-Alpha/Kolibri-1"),
    "laguna": BlockFamily(shared_on_router=True, examples="poolside/laguna-XS.2"),
    "mellum": BlockFamily(examples="JetBrains/Mellum2-12B-A2.5B-Base"),
    "mimo_v2_flash": BlockFamily(examples="XiaomiMiMo/MiMo-V2-Flash"),
    "minimax_m3_vl_text": BlockFamily(
        style="gpt_oss", shared_on_router=True, examples="MiniMax-M3-VL (text part)"
    ),
    "qwen4_exp_text": BlockFamily(examples="Qwen/Qwen4-Exp (text part)"),
    "zaya": BlockFamily(examples="Zyphra/ZAYA1-8B"),
}

# MoE families of transformers we know of and refuse, with the reason (shown before any weight is
# read). Filled as families are tried and found wanting; see docs/models.md.
_MULTIMODAL = "multimodal checkpoint (vision/audio encoders + text): only text-only checkpoints are served"
_NO_CAUSAL_LM = "transformers has no text-only causal LM class for it (multimodal model)"
_SOFTCAP = "experts use a softcapped SwiGLU (softcap(gate) * sigmoid(gate) * softcap(up)), not computed by the workers"
_CONCAT = (
    "its checkpoint stores tensors that transformers concatenates or splits on load (linear attention's "
    "q/k/v conv1d, in_proj); the router loads tensors as stored or renamed only (not yet)"
)
UNSUPPORTED_FAMILIES: dict[str, str] = {
    # Text families of transformers, not served (yet).
    "nemotron_h": "experts are non-gated ReLU^2 MLPs (up/down only, optional latent projection) in a Mamba-2 "
    "hybrid; the workers compute gated (SwiGLU-like) experts only",
    "jetmoe": "mixture of attention heads (MoA) next to MoE MLPs with an output bias: attention experts cannot go "
    "to FFN expert workers",
    "dbrx": "its layers are transformer.blocks and its experts flat [E*I, H] w1/v1/w2 tensors under "
    "ffn.experts.mlp, a layout the router and workers do not read (not yet)",
    "gemma4_text": "the experts sit in the decoder layer itself next to a dense MLP, with their own norms, "
    "not in a MoE block (not yet)",
    "gemma4": "multimodal checkpoint; its text model (gemma4_text) is not served either: experts in the decoder "
    "layer itself (not yet)",
    "aria_text": "experts stored as fc1 / fc2 [E, H, 2I] / [E, I, H] tensors, a layout the workers do not read "
    "(not yet)",
    "aria": "multimodal checkpoint; its text model (aria_text) is not served either: fc1 / fc2 expert layout",
    "kimi_linear": _CONCAT,
    "bailing_hybrid": _CONCAT,
    "lara_mini": _CONCAT,
    "inkling2_text": _SOFTCAP,
    "inkling2_loop_text": _SOFTCAP,
    "inkling2": f"{_MULTIMODAL}; its text model (inkling2_text) is not served either: {_SOFTCAP}",
    "inkling2_loop": f"{_MULTIMODAL}; its text model (inkling2_loop_text) is not served either: {_SOFTCAP}",
    "minimax": "its lightning-attention layers need their own cache class (MiniMaxCache), which the "
    "continuous batcher does not build (not yet)",
    "muse_spark_text": "experts apply a post-expert RMSNorm before the gate weight, not computed by the workers",
    # Multimodal checkpoints whose text model is served: serve a text-only export of it.
    "dots3_note": f"{_MULTIMODAL}; its text model (dots3_note_text) is served",
    "qwen4_exp": f"{_MULTIMODAL}; its text model (qwen4_exp_text) is served",
    "minimax_m3_vl": f"{_MULTIMODAL}; its text model (minimax_m3_vl_text) is served",
    "inkling_mm_model": f"{_MULTIMODAL}; its text model (inkling_text) is served",
    "qwen3_vl_moe": f"{_MULTIMODAL}; its text model is the Qwen3-MoE block family (qwen3_vl_moe_text, not yet)",
    "qwen3_omni_moe": f"{_MULTIMODAL} (thinker-talker speech model)",
    "glm4v_moe": f"{_MULTIMODAL}; its text model (glm4v_moe_text) has no causal LM class in transformers",
    "ernie4_5_vl_moe": f"{_MULTIMODAL}; its text model (ernie4_5_vl_moe_text) has no causal LM class in transformers",
    "hy_v4_vl": _MULTIMODAL,
    "deepseek_ocr2": _MULTIMODAL,
    "unlimited_ocr": _MULTIMODAL,
    "glm5_next": _NO_CAUSAL_LM,
    "mistral4": _NO_CAUSAL_LM,
    "mistral_large4": _NO_CAUSAL_LM,
    "muse_spark": _NO_CAUSAL_LM,
    "step3p5": _NO_CAUSAL_LM,
    "step3p7": _NO_CAUSAL_LM,
    # Not decoder-only language models.
    "nllb-moe": "encoder-decoder model: only decoder-only causal LMs are served",
    "switch_transformers": "encoder-decoder model: only decoder-only causal LMs are served",
    "diffusion_gemma": "diffusion (non-autoregressive) language model: only causal LMs are served",
    "openai_privacy_filter": "token classifier, not a causal LM",
}

SUPPORTED_FAMILIES = (*BUILTIN_FAMILIES, *BLOCK_FAMILIES)


def _act_name(act) -> str:
    """ExpertFn.act of an experts module's `act_fn` (a transformers activation module or function)."""
    from transformers import activations as A  # not at module load: see spec_from_block_model

    if act is None or act is F.silu or isinstance(act, (A.SiLUActivation, nn.SiLU)):
        return "silu"
    if isinstance(act, (A.GELUTanh, A.NewGELUActivation)):
        return "gelu_tanh"
    if isinstance(act, A.GELUActivation) and not getattr(act, "use_gelu_python", False):
        return "gelu"
    if isinstance(act, nn.ReLU):
        return "relu"
    raise ConfigError(f"expert activation {act!r} is not supported (silu, gelu, gelu_tanh, relu are)")


def _swiglu_params(module) -> tuple[float | None, float]:
    """(clamp limit or None, gpt-oss alpha or 1.0) of an experts or MLP module: `limit` / `alpha`
    (DeepSeek-V4, gpt-oss) or `swiglu_limit` / `swiglu_alpha` (Hunyuan-V4, MiniMax-M3)."""
    limit = next((v for n in ("limit", "swiglu_limit") if (v := getattr(module, n, None)) is not None), None)
    alpha = next((v for n in ("alpha", "swiglu_alpha") if (v := getattr(module, n, None)) is not None), 1.0)
    return limit, alpha


def _shared_on_workers(shared, fn: ExpertFn) -> int:
    """The fused width of a block's shared experts when the workers can compute them with the routed
    experts' function `fn` (a SwiGLU FFN of 2-D weights: gate/up/down, input/output_linear, no
    biases, the same activation and clamp), else 0: they then stay in the router's
    block, loaded with the dense weights, and run as transformers runs them (Hunyuan-V4's unclamped
    shared expert next to clamped routed ones, Inkling's shared experts gated per token)."""
    params = {n: tuple(p.shape) for n, p in shared.named_parameters()}
    if any(len(shape) != 2 for shape in params.values()):
        return 0
    if set(params) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}:
        inter = params["gate_proj.weight"][0]
    elif set(params) in (
        {"input_linear.weight", "output_linear.weight"},
        {"gate_up_proj.weight", "down_proj.weight"},
    ):
        inter = (
            params["input_linear.weight" if "input_linear.weight" in params else "gate_up_proj.weight"][0]
            // 2
        )
    else:
        return 0
    if fn.style == "gpt_oss":
        act = "silu" if hasattr(shared, "swiglu_alpha") or hasattr(shared, "alpha") else None
    else:
        try:
            act = _act_name(getattr(shared, "act_fn", getattr(shared, "activation", None)))
        except ConfigError:
            return 0
    limit, alpha = _swiglu_params(shared)
    same_limit = (limit is None) == (fn.limit is None) and (limit is None or float(limit) == fn.limit)
    if act != fn.act or not same_limit or float(alpha) != fn.alpha:
        return 0
    return inter


def moe_blocks(model) -> tuple[list[int], str]:
    """(the MoE layers, the decoder layer's attribute holding the block) of a transformers model."""
    layers, path = [], None
    for i, layer in enumerate(model.model.layers):
        for name, child in layer.named_children():
            if isinstance(getattr(child, "experts", None), nn.Module):
                if path not in (None, name):
                    raise ConfigError(f"MoE blocks under two names in one model: {path!r}, {name!r}")
                layers.append(i)
                path = name
    if not layers:
        raise ConfigError("this config has no MoE layer (no block with experts) to serve")
    return layers, path


def spec_from_block_model(cfg) -> ModelSpec:
    """The spec of a block family, read off the model transformers builds for `cfg` (meta device)."""
    # transformers' modeling code is imported where a spec is built, not at module load: this module
    # comes with the package into expert workers, which are given their spec by the router and must
    # not pay for transformers (router_service/__init__.py).
    from transformers import AutoModelForCausalLM

    t = cfg.model_type
    fam = BLOCK_FAMILIES.get(t, BlockFamily())  # the builtin five need no flags
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    moe_layers, path = moe_blocks(model)
    block = getattr(model.model.layers[moe_layers[0]], path)
    experts = block.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if fam.transposed:  # [E, H, 2I], [E, I, H]
        hidden, inter = gate_up.shape[1], down.shape[1]
    else:  # [E, 2I, H], [E, H, I]
        hidden, inter = gate_up.shape[2], down.shape[2]
    num_experts = down.shape[0]  # LongCat's gate_up also has rows for its zero experts
    zero = int(getattr(experts, "zero_expert_num", 0) or 0)
    if hidden != cfg.hidden_size or gate_up.shape[-1 if fam.transposed else 1] != 2 * inter:
        raise ConfigError(
            f"{t}: experts of shapes {tuple(gate_up.shape)} / {tuple(down.shape)} do not fit "
            f"hidden_size {cfg.hidden_size}"
        )
    act = "silu" if fam.style == "gpt_oss" else _act_name(getattr(experts, "act_fn", None))
    limit, alpha = _swiglu_params(experts)
    fn = ExpertFn(
        act=act,
        style=fam.style,
        limit=float(limit) if limit is not None else None,
        alpha=float(alpha),
        bias=hasattr(experts, "gate_up_proj_bias"),
        scale_input=fam.scale_input,
    )
    shared_path = next(
        (n for n in SHARED_NAMES if isinstance(getattr(block, n, None), torch.nn.Module)), None
    )
    shared_inter = (
        _shared_on_workers(getattr(block, shared_path), fn) if shared_path and not fam.shared_on_router else 0
    )
    if not shared_inter:  # none, or computed by the block itself in the router (loaded there)
        shared_path = None
    router = getattr(block, "gate", None) or getattr(block, "router", None)
    top_k = int(getattr(router, "top_k", getattr(cfg, "num_experts_per_tok", 0)) or 0)
    if not 1 <= top_k <= num_experts + zero:
        raise ConfigError(f"{t}: top_k {top_k} must be between 1 and the number of experts ({num_experts})")
    gating = GatingSpec(num_experts=num_experts, top_k=top_k)
    return ModelSpec(
        model_type=t,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        num_hidden_layers=cfg.num_hidden_layers,
        moe_layers=tuple(moe_layers),
        moe_intermediate_size=inter,
        shared_intermediate_size=shared_inter,
        gating=gating,
        expert_fn=fn,
        moe_module_path=path,
        shared_module_path=shared_path,
        num_zero_experts=zero,
        block_forward=fam.block_forward,
        fused_transposed=fam.transposed,
        fused_interleaved=fam.interleaved,
        max_position_embeddings=_positions(cfg),
    )


def _positions(cfg) -> int | None:
    """config.json's max_position_embeddings (of the text model, for a composite config), or None."""
    n = getattr(cfg.get_text_config(), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
