"""Checks of what callers send: token ids, attention masks, hidden states.

One set, used at both edges that take these tensors: the Router (the Python API) and the serving
ingress (which checks before merging requests, so one bad request cannot fail a shared batch).
They raise ValueErrors that say what to change; the ingress answers them as invalid_argument.
"""

from __future__ import annotations

import torch

from moe_models.spec import ModelSpec


def check_token_ids(input_ids, vocab_size: int, name: str = "input_ids") -> torch.Tensor:
    """A 2-D, non-empty tensor of ids in [0, vocab_size), as int64 (same device)."""
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name} must be a [batch, seq] tensor of token ids: {e}") from e
    if input_ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:  # before the dtype: an empty list becomes a float tensor
        raise ValueError(f"{name} is empty (shape {tuple(input_ids.shape)}); send at least one token")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return input_ids.long()


def check_attention_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor | None:
    """None, or a mask of input_ids' shape holding only 0 and 1, as int64 on input_ids' device."""
    if attention_mask is None:
        return None
    mask = torch.as_tensor(attention_mask)
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
        )
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    return mask.to(input_ids.device, torch.long)


def check_moe_input(layer: int, hidden, spec: ModelSpec, name: str = "hidden") -> torch.Tensor:
    """`layer` is a MoE layer and `hidden` a non-empty floating [T, H] or [B, S, H] tensor."""
    spec.check_moe_layer(layer)
    hidden = torch.as_tensor(hidden)
    h = spec.hidden_size
    if hidden.dim() not in (2, 3) or hidden.shape[-1] != h:
        raise ValueError(f"{name} must be [T, {h}] or [B, S, {h}], got shape {tuple(hidden.shape)}")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {hidden.dtype}")
    if hidden.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(hidden.shape)})")
    return hidden
