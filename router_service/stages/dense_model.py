"""The router's half of the model: the `transformers` model minus its routed and shared experts.

The model is built on the `meta` device (no memory), every MoE block is swapped for a
`DistributedMoE`, and only then is storage allocated and filled, tensor by tensor, from the
checkpoint's non-expert keys. Attention, RoPE, masks and the KV cache stay `transformers`' own, so
they stay as correct as the reference.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from moe_models.checkpoint import Checkpoint, CheckpointError
from moe_models.spec import ModelSpec
from router_service.stages.moe_layer import DistributedMoE, ExpertDispatcher

log = logging.getLogger(__name__)


def _checkpoint_key(spec: ModelSpec, key: str) -> str:
    """Model state-dict key -> checkpoint key (mixtral keeps its MoE block as `block_sparse_moe`)."""
    if spec.names.moe_module != "mlp" and ".mlp." in key:
        return key.replace(".mlp.", f".{spec.names.moe_module}.", 1)
    return key


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
    layers = model.model.layers
    for layer in spec.moe_layers:
        layers[layer].mlp = DistributedMoE(layer, layers[layer].mlp, dispatcher)
    model.to_empty(device=device)

    ckpt = Checkpoint(model_dir)
    state = model.state_dict(keep_vars=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if hf_config.tie_word_embeddings else set()
    wanted = {key: _checkpoint_key(spec, key) for key in state}
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
