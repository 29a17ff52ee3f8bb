"""The distributed MoE layer: Route -> Plan -> Dispatch -> Combine, in place of transformers' block.

`DistributedMoE` is the `nn.Module` that replaces each MoE block inside the `transformers` model; it
keeps the block's own gate parameters (so their names, dtypes and loading are transformers') and
hands the math to `ExpertDispatcher`, which holds the current placement and the transport. The
dispatcher's `moe` is the router's hot path: a handful of tensor ops and one call per worker with
work. When the transport reports workers lost, it asks for a recovery placement and sends only the
lost workers' pairs (and shared-expert rows) there, so the layer, and the pass, still finish.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.spec import ModelSpec
from router_service.stages.gating import route
from router_service.stages.load_stats import ExpertLoad
from router_service.stages.placement import Placement
from router_service.stages.plan import combine, pairs_on, plan, shared_choice

if TYPE_CHECKING:
    from router_service.runtime.transport import Transport


class ExpertDispatcher:
    """Runs the routed part of every MoE layer over the workers of the current placement.

    `placement` is replaced only at pass boundaries (by the membership controller, under the router's
    model lock), or by `recover` inside a pass that lost workers. `recover(placement, lost)` returns
    the placement to finish on (it is the membership's).
    """

    def __init__(self, spec: ModelSpec, transport: Transport, load_window: int = 256, recover=None):
        self.spec = spec
        self.placement: Placement | None = None
        self.transport = transport
        self.recover = recover
        self.max_attempts = 3
        self.load = ExpertLoad(spec.moe_layers, spec.num_experts, load_window)
        self.passes = 0  # forward passes that reached the first MoE layer
        self.worker_tokens: collections.Counter[int] = collections.Counter()  # token rows sent, by worker
        self._first_layer = spec.moe_layers[0]

    def moe(self, layer: int, x: torch.Tensor, block: DistributedMoE) -> torch.Tensor:
        """x: [T, H] -> [T, H], the MoE block's output (routed + shared experts)."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        if layer == self._first_layer:
            self.passes += 1
        placement = self.placement  # the same for the whole pass unless workers are lost
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
        partials, lost = self._run(layer, placement, work)
        pair_mask = shared_mask = None  # what is still to compute: None = everything
        attempts = 0
        while lost:  # re-send only what the lost workers had, over a placement without them
            attempts += 1
            if attempts > self.max_attempts or self.recover is None:
                from router_service.runtime.membership import NoCapacityError

                raise NoCapacityError(
                    f"MoE layer {layer}: expert workers {sorted(lost)} lost and the layer could not be "
                    f"re-placed after {self.max_attempts} attempts: {lost}"
                )
            on_lost = pairs_on(routing, placement, layer, set(lost))  # [T, K]
            shared_on_lost = on_lost[torch.arange(x.shape[0]), shared_choice(routing)]  # [T]
            pair_mask = on_lost if pair_mask is None else pair_mask & on_lost
            shared_mask = shared_on_lost if shared_mask is None else shared_mask & shared_on_lost
            placement = self.recover(placement, lost)
            work = plan(routing, placement, layer, x, with_shared, shared_weights, pair_mask, shared_mask)
            more, lost = self._run(layer, placement, work)
            partials += more
        return combine(x, partials)

    def _run(self, layer: int, placement: Placement, work: dict) -> tuple[list, dict[int, str]]:
        """Dispatch one plan: the (rows, partial) pairs in worker order, and the workers lost."""
        result = self.transport.run_layer(
            layer, {w: (placement.layout_of(w), b) for w, (_, b) in work.items()}
        )
        ordered = [w for w in placement.worker_ids if w in result.partials]
        for w in ordered:
            self.worker_tokens[w] += work[w][0].numel()
        return [(work[w][0], result.partials[w]) for w in ordered], result.lost


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
