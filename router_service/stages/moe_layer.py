"""The distributed MoE layer: Route -> Plan -> Dispatch -> Combine, inside transformers' own block.

Every MoE block of the `transformers` model stays in the router model, with its own router (Route)
and its own forward; `RemoteExperts` takes the place of its `experts` module and hands the chosen
(ids, weights) to `ExpertDispatcher`, which holds the current placement and the transport, and
`SharedOnWorkers` takes the place of its shared experts, which the workers compute in the same round
trip. The dispatcher's `dispatch` is the router's hot path: a handful of tensor ops and one call per
worker with work. When the transport reports workers lost, it asks for a recovery placement and
sends only the lost workers' pairs (and shared-expert rows) there, so the layer, and the pass,
still finish.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.spec import ModelSpec
from moe_serving import tracing
from router_service.errors import NoCapacityError, StaleLayout
from router_service.stages.gating import Routing
from router_service.stages.load_stats import ExpertLoad
from router_service.stages.placement import Placement
from router_service.stages.plan import combine, pairs_on, plan, shared_choice

if TYPE_CHECKING:
    from router_service.runtime.transport import DataPlane


class ExpertDispatcher:
    """Runs the routed part of every MoE layer over the workers of the current placement.

    `placement` is replaced only at pass boundaries (by the membership controller, under the router's
    model lock), or by `recover` inside a pass that lost workers. `recover(placement, lost)` returns
    the placement to finish on (it is the membership's). `refresh(placement)` returns the
    membership's current placement, for a pass whose workers no longer hold the layouts of its own
    (it is older than a change that retired them: a router restarted while the change ran); the
    rows those workers had are sent again over it, as for lost workers.
    """

    def __init__(
        self, spec: ModelSpec, transport: DataPlane, load_window: int = 256, recover=None, refresh=None
    ):
        self.spec = spec
        self.placement: Placement | None = None
        self.transport = transport
        self.recover = recover
        self.refresh = refresh
        self.max_attempts = 3
        self.load = ExpertLoad(spec.moe_layers, spec.num_experts, load_window)
        self.passes = 0  # forward passes that reached the first MoE layer
        self.worker_tokens: collections.Counter[int] = collections.Counter()  # token rows sent, by worker
        self._first_layer = spec.moe_layers[0]
        self._local = threading.local()  # the micro-batch (lane) a thread runs, and its baton

    @contextlib.contextmanager
    def lane(self, index: int, baton):
        """Run this thread's layers as micro-batch `index`, handing `baton` over while waiting on
        the workers (router_service/generation/overlap.py)."""
        self._local.lane, self._local.baton = index, baton
        try:
            yield
        finally:
            self._local.lane, self._local.baton = 0, None

    def dispatch(
        self, layer: int, x: torch.Tensor, routing: Routing, shared_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [T, H] and its routing -> [T, H], the routed experts' weighted sum plus the shared
        experts (scaled by `shared_weights` [T], None meaning 1), computed by the workers."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        if layer == self._first_layer and not getattr(self._local, "lane", 0):
            self.passes += 1
        placement = self.placement  # the same for the whole pass unless workers are lost
        pair_mask = zero_part = None  # pairs still to compute: None = every pair
        if self.spec.num_zero_experts:  # LongCat: ids >= E pass x through, computed here
            real = routing.ids < self.spec.num_experts
            zero_w = torch.where(real, 0.0, routing.weights.float()).sum(-1, keepdim=True)  # [T, 1]
            zero_part = (torch.arange(x.shape[0], device=x.device), zero_w * x.float())
            routing = Routing(torch.where(real, routing.ids, 0), routing.weights)
            pair_mask = real.cpu()
            self.load.record(layer, routing.ids[real])
        else:
            self.load.record(layer, routing.ids)
        with_shared = self.spec.shared_intermediate_size > 0
        with tracing.span("plan", {"layer": layer, "tokens": x.shape[0]}):
            work = plan(routing, placement, layer, x, with_shared, shared_weights, pair_mask)
        partials, lost, stale = self._run(layer, placement, work)
        if zero_part is not None:
            partials.append(zero_part)
        shared_mask = None  # the tokens whose shared experts are still to compute: None = all
        attempts = 0
        # Re-send only what the lost (or stale) workers had, over a placement without them (or the
        # current one).
        while lost or stale:
            attempts += 1
            if attempts > self.max_attempts or (lost and self.recover is None):
                raise NoCapacityError(
                    f"MoE layer {layer}: expert workers {sorted(lost)} lost and the layer could not be "
                    f"re-placed after {self.max_attempts} attempts: {lost}"
                )
            newer = None if lost or self.refresh is None else self.refresh(placement)
            if not lost and (newer is None or newer.version <= placement.version):
                raise StaleLayout(  # no newer placement to finish on: a membership fault
                    f"MoE layer {layer}: placement {placement.version} is the newest the router can get, "
                    f"and its workers do not hold it: {stale}"
                )
            redo = set(lost) | set(stale)
            on_lost = pairs_on(routing, placement, layer, redo)  # [T, K]
            shared_on_lost = on_lost[torch.arange(x.shape[0]), shared_choice(routing)]  # [T]
            pair_mask = on_lost if pair_mask is None else pair_mask & on_lost
            shared_mask = shared_on_lost if shared_mask is None else shared_mask & shared_on_lost
            placement = self.recover(placement, lost) if lost else newer
            work = plan(routing, placement, layer, x, with_shared, shared_weights, pair_mask, shared_mask)
            more, lost, stale = self._run(layer, placement, work)
            partials += more
        with tracing.span("combine", {"layer": layer}):
            return combine(x, partials)

    def _run(self, layer: int, placement: Placement, work: dict) -> tuple[list, dict, dict]:
        """Dispatch one plan: the (rows, partial) pairs in worker order, the workers lost, and the
        workers that do not hold their layout of `placement` (id -> why)."""
        baton = getattr(self._local, "baton", None)
        result = self.transport.run_layer(
            layer,
            {w: (placement.layout_of(w), b) for w, (_, b) in work.items()},
            lane=getattr(self._local, "lane", 0),
            waiting=baton.released if baton is not None else None,
        )
        ordered = [w for w in placement.worker_ids if w in result.partials]
        for w in ordered:
            self.worker_tokens[w] += work[w][0].numel()
        return [(work[w][0], result.partials[w]) for w in ordered], result.lost, result.stale


def shared_scale(block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """[T] scale of the shared experts: sigmoid(shared_expert_gate(x)) where the block has that gate
    (Qwen2/Qwen3-Next/Qwen3.5), computed as transformers does; None (1) otherwise."""
    gate = getattr(block, "shared_expert_gate", None)
    if gate is None:
        return None
    return F.sigmoid(gate(x)).squeeze(-1).float()


class RemoteExperts(nn.Module):
    """Stands in for a transformers MoE block's `experts`: the block runs its own router and calls
    `experts(x, ids, weights)`; the workers compute the routed experts and, in the same round trip,
    the shared experts where they hold them (the block's module is then a `SharedOnWorkers`,
    zeros), so the block's own combination (a sum, Cohere's average, Qwen's sigmoid gate) stays
    exact."""

    def __init__(self, layer: int, block: nn.Module, dispatcher: ExpertDispatcher):
        super().__init__()
        self.layer = layer
        self.__dict__["_block"] = block  # not a submodule: the block holds us
        self._dispatcher = dispatcher

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if tracing.enabled():  # the block's own router ran from its entry to here
            tracing.record("gate", self._block.__dict__.get("_trace_t0", tracing.now_us()), tracing.now_us())
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        routing = Routing(
            top_k_index.reshape(x.shape[0], -1).to(torch.int32), top_k_weights.float().reshape(x.shape[0], -1)
        )
        on_workers = self._dispatcher.spec.shared_intermediate_size > 0  # else the block runs them
        scale = shared_scale(self._block, x) if on_workers else None
        out = self._dispatcher.dispatch(self.layer, x, routing, scale)
        return out.view(hidden_states.shape)


class SharedOnWorkers(nn.Module):
    """The block's shared-experts module on the router: the workers add the shared experts to the
    routed output (RemoteExperts), so here they contribute zeros."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class RemoteLlama4Moe(nn.Module):
    """Llama 4's MoE block: its router gives sigmoid scores of the top-k and the block feeds every
    expert `score * x` (a dense [E * T, H] product); here only the chosen pairs go to the workers,
    which scale the input by the weight (ExpertFn.scale_input) and add the shared expert."""

    def __init__(self, layer: int, block: nn.Module, dispatcher: ExpertDispatcher):
        super().__init__()
        self.layer = layer
        self.router = block.router
        self.hidden_dim = block.hidden_dim
        self._dispatcher = dispatcher

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        with tracing.span("gate"):
            scores, logits = self.router(x)  # [T, E] each
            ids = torch.topk(logits, self.router.top_k, dim=1).indices  # the router's own top-k call
        routing = Routing(ids.to(torch.int32), scores.gather(1, ids).float())
        return self._dispatcher.dispatch(self.layer, x, routing), logits
