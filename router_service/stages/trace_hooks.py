"""Trace spans for the router model's own modules (decoder layers, attention, MoE blocks, LM head),
by forward hooks installed only while a trace records, so an untraced pass runs no hook at all.

The MoE block's pre-hook also leaves its start time on the block: `RemoteExperts` records the span
from there to its own call as "gate" (the block's router, whatever the family computes there).
"""

from __future__ import annotations

from torch import nn

from moe_serving import tracing

ATTENTION_NAMES = ("self_attn", "linear_attn", "mamba", "mixer", "attention")


def _hooks(module: nn.Module, name: str, args: dict | None, handles: list) -> None:
    def pre(mod, _inputs):
        mod.__dict__["_trace_t0"] = tracing.now_us()

    def post(mod, _inputs, _output):
        tracing.record(name, mod.__dict__.get("_trace_t0", tracing.now_us()), tracing.now_us(), args)

    handles.append(module.register_forward_pre_hook(pre))
    handles.append(module.register_forward_hook(post))


def install(model: nn.Module, moe_module_path: str, moe_layers) -> list:
    """Hook the model's modules; returns the handles, for `remove`."""
    handles: list = []
    for i, layer in enumerate(model.model.layers):
        _hooks(layer, "decoder layer", {"layer": i}, handles)
        for attr in ATTENTION_NAMES:
            sub = getattr(layer, attr, None)
            if isinstance(sub, nn.Module):
                _hooks(sub, "attention", {"layer": i}, handles)
                break
        if i in moe_layers:
            _hooks(getattr(layer, moe_module_path), "moe block", {"layer": i}, handles)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        _hooks(head, "lm head", None, handles)
    return handles


def remove(handles: list) -> None:
    for h in handles:
        h.remove()
