"""The router's half of the model: the `transformers` model minus its routed and shared experts.

The model is built on the `meta` device (no memory), every MoE block's experts (and shared experts)
are swapped for their remote stand-ins (moe_layer.py), and only then is storage allocated and
filled, tensor by tensor, from the checkpoint's non-expert keys. Attention, RoPE, masks and the KV
cache stay `transformers`' own, so they stay as correct as the reference.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from moe_models.checkpoint import Checkpoint, CheckpointError
from moe_models.spec import ModelSpec
from router_service.stages.moe_layer import (
    ExpertDispatcher,
    RemoteExperts,
    RemoteLlama4Moe,
    SharedOnWorkers,
)

log = logging.getLogger(__name__)


def _saved_names(model: PreTrainedModel):
    """Model key -> the key `save_pretrained` writes (and published checkpoints use): transformers'
    own renamings for the family, reversed, as its save does (e.g. Granite's `router.weight` is
    `router.layer.weight` on disk, Mixtral's `mlp` is `block_sparse_moe`)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

    conversions = [
        c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)
    ]
    renamings = [
        r for r in (c.reverse_transform() for c in conversions[::-1]) if isinstance(r, WeightRenaming)
    ]
    return lambda key: apply_renamings(key, renamings)


def _checkpoint_key(key: str, ckpt: Checkpoint, saved_name) -> str:
    """The checkpoint's key for model key `key`: as is, or under its saved name."""
    return key if key in ckpt else saved_name(key)


def install_remote_experts(model: PreTrainedModel, spec: ModelSpec, dispatcher: ExpertDispatcher) -> None:
    """Replace what the workers compute in every MoE layer of `model` (built on the meta device)."""
    layers = model.model.layers
    for layer in spec.moe_layers:
        block = getattr(layers[layer], spec.moe_module_path)
        if spec.block_forward == "llama4":
            setattr(layers[layer], spec.moe_module_path, RemoteLlama4Moe(layer, block, dispatcher))
            continue
        block.experts = RemoteExperts(layer, block, dispatcher)
        if spec.shared_module_path:
            setattr(block, spec.shared_module_path, SharedOnWorkers())


@torch.no_grad()
def build_router_model(
    model_dir: str,
    hf_config,
    spec: ModelSpec,
    dtype: torch.dtype,
    device: torch.device,
    dispatcher: ExpertDispatcher,
) -> PreTrainedModel:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    install_remote_experts(model, spec, dispatcher)
    model.to_empty(device=device)

    ckpt = Checkpoint(model_dir)
    state = model.state_dict(keep_vars=True)
    tied = (
        set(getattr(model, "all_tied_weights_keys", {}) or {})
        if getattr(hf_config, "tie_word_embeddings", False)
        else set()
    )
    saved_name = _saved_names(model)
    wanted = {key: _checkpoint_key(key, ckpt, saved_name) for key in state}
    missing = [key for key, ck in wanted.items() if ck not in ckpt and key not in tied]
    if missing:
        raise CheckpointError(f"checkpoint {model_dir} lacks non-expert tensors {missing[:5]}")
    present = {ck: key for key, ck in wanted.items() if ck in ckpt}
    for ck_key, tensor in ckpt.iter_tensors(present):
        dst = state[present[ck_key]]
        if tuple(tensor.shape) != tuple(dst.shape):
            raise CheckpointError(
                f"{ck_key} has shape {tuple(tensor.shape)}, the model expects {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
    if tied:
        model.tie_weights()
    # Non-persistent buffers (RoPE inverse frequencies) are not in any checkpoint: recompute them the
    # way transformers does after its own meta-device load.
    for name, module in model.named_modules():
        own = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None]
        if not own:
            continue
        if "RotaryEmbedding" not in type(module).__name__:
            raise CheckpointError(
                f"don't know how to rebuild buffers {own} of {name} ({type(module).__name__})"
            )
        model._init_weights(module)
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        log.debug("no generation_config.json in %s; using the model config's defaults", model_dir)
    model.eval()
    return model
