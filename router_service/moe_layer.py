"""The distributed MoE layer: Route -> Plan -> Dispatch -> Combine, in place of transformers' block.

`DistributedMoE` is the `nn.Module` that replaces each MoE block inside the `transformers` model; it
keeps the block's own gate parameters (so their names, dtypes and loading are transformers') and
hands the math to `ExpertDispatcher`, which owns the placement and the transport. The dispatcher's
`moe` is the router's hot path: a handful of tensor ops and one call per worker with work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.spec import ModelSpec
from router_service.gating import route
from router_service.load_stats import ExpertLoad
from router_service.placement import Placement
from router_service.plan import combine, plan
from router_service.transport import Transport


class ExpertDispatcher:
    """Runs the routed part of every MoE layer over the workers of the current placement."""

    def __init__(self, spec: ModelSpec, placement: Placement, transport: Transport, load_window: int = 256):
        self.spec = spec
        self.placement = placement
        self.transport = transport
        self.load = ExpertLoad(spec.moe_layers, spec.num_experts, load_window)

    def moe(self, layer: int, x: torch.Tensor, block: DistributedMoE) -> torch.Tensor:
        """x: [T, H] -> [T, H], the MoE block's output (routed + shared experts)."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        placement = self.placement  # pinned for the whole layer
        routing = route(
            self.spec.gating, x, block.gate.weight, getattr(block.gate, "e_score_correction_bias", None)
        )
        self.load.record(layer, routing.ids)
        shared_weights = None
        if block.shared_expert_gate is not None:
            # qwen2_moe: sigmoid(shared_expert_gate(x)) scales the shared expert, computed as transformers does.
            shared_weights = F.sigmoid(block.shared_expert_gate(x)).squeeze(-1).float()  # [T]
        with_shared = self.spec.shared_intermediate_size > 0
        work = plan(routing, placement, layer, x, with_shared, shared_weights)
        partials = self.transport.run_layer(layer, {w: batch for w, (_, batch) in work.items()})
        return combine(x, [(rows, partials[w]) for w, (rows, _) in sorted(work.items())])


class DistributedMoE(nn.Module):
    """Drop-in for a transformers MoE block; holds only the gate (and qwen2's shared-expert gate)."""

    def __init__(self, layer: int, original: nn.Module, dispatcher: ExpertDispatcher):
        super().__init__()
        self.layer = layer
        self.gate = original.gate
        self.shared_expert_gate = getattr(original, "shared_expert_gate", None)
        self._dispatcher = dispatcher  # plain attribute: not a submodule, not in the state dict

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        return self._dispatcher.moe(self.layer, x, self).view(shape)
