"""Stages 2 and 5, Plan and Combine: group each token's choices by worker, then sum the partials.

Plan sorts the T*K (token, expert) pairs once by physical slot; since each worker owns a contiguous
slot range, that single sort groups the pairs by worker and, inside a worker, by local slot, which
is the order the grouped FFN wants. A token goes to a worker once however many of its experts live
there (`torch.unique` of its token ids), and its shared experts run on exactly one worker it already
visits, so they add no traffic.

When workers fail in the middle of a layer, the dispatcher plans again with a `pair_mask` (only the
pairs the failed workers had) and a `shared_mask` (only the tokens whose shared experts they were to
run) over the recovery placement, so nothing is computed twice.
"""

from __future__ import annotations

import torch

from expert_workers.worker import ExpertBatch
from router_service.stages.gating import Routing
from router_service.stages.placement import Placement


def pair_slots(routing: Routing, placement: Placement, layer: int) -> torch.Tensor:
    """int64 [T, K]: the physical slot of each (token, choice) pair.

    A replicated expert's tokens alternate over its copies (`token % logcnt`): deterministic, and
    an even split.
    """
    li = placement.layer_index[layer]
    t, k = routing.ids.shape
    ids = routing.ids.cpu().long()  # [T, K]
    tok = torch.arange(t).unsqueeze(1).expand(t, k)  # [T, K]
    replica = tok % placement.logcnt[li][ids]
    return placement.log2phy[li][ids, replica]


def pairs_on(routing: Routing, placement: Placement, layer: int, workers: set[int]) -> torch.Tensor:
    """bool [T, K]: the pairs that `placement` sends to one of `workers` (ids)."""
    on = torch.zeros(placement.num_workers, dtype=torch.bool)
    on[[placement.worker_index[w] for w in workers if w in placement.worker_index]] = True
    return on[placement.phy2worker[pair_slots(routing, placement, layer)]]


def shared_choice(routing: Routing) -> torch.Tensor:
    """int64 [T]: the choice whose worker also runs token t's shared experts (choice t % K), which
    spreads the shared work over the workers a batch already visits."""
    t, k = routing.ids.shape
    return torch.arange(t) % k


def plan(
    routing: Routing,
    placement: Placement,
    layer: int,
    x: torch.Tensor,
    with_shared: bool,
    shared_weights: torch.Tensor | None = None,
    pair_mask: torch.Tensor | None = None,
    shared_mask: torch.Tensor | None = None,
) -> dict[int, tuple[torch.Tensor, ExpertBatch]]:
    """Per worker id with work: (token ids it serves, its ExpertBatch).

    # T = tokens, K = top-k, W = workers, H = hidden
    routing.ids: [T, K]; x: [T, H]; shared_weights: [T] or None (meaning 1);
    pair_mask: bool [T, K], plan only these pairs (None: all); shared_mask: bool [T], run the shared
    experts only for these tokens (None: all).
    """
    t, k = routing.ids.shape
    # Index bookkeeping runs on the CPU (the placement maps live there); only x[rows] stays on x's device.
    phy = pair_slots(routing, placement, layer)  # [T, K]
    flat_phy = phy.reshape(-1)
    weights = routing.weights.cpu().reshape(-1)
    # Step 1: one stable sort by slot groups pairs by worker, then by local slot.
    if pair_mask is None:
        order = torch.argsort(flat_phy, stable=True)  # [T*K]
    else:
        chosen = pair_mask.reshape(-1).nonzero().squeeze(1)
        order = chosen[torch.argsort(flat_phy[chosen], stable=True)]
    sorted_phy = flat_phy[order]
    pair_tok = order // k
    pair_w = weights[order]
    per_worker = torch.bincount(placement.phy2worker[sorted_phy], minlength=placement.num_workers).tolist()
    # Step 2: each token's shared experts go to the worker of one of its own choices.
    shared_worker = None
    if with_shared:
        shared_worker = placement.phy2worker[phy[torch.arange(t), shared_choice(routing)]]  # [T]
    out: dict[int, tuple[torch.Tensor, ExpertBatch]] = {}
    start = 0
    for w, n in enumerate(per_worker):
        if n == 0:
            continue
        sl = slice(start, start + n)
        start += n
        rows, pair_rows = torch.unique(pair_tok[sl], sorted=True, return_inverse=True)  # [N], [P]
        a, b = placement.slot_offsets[w], placement.slot_offsets[w + 1]
        counts = torch.bincount(sorted_phy[sl] - a, minlength=b - a)
        batch = ExpertBatch(
            x=x.index_select(0, rows.to(x.device)),
            pair_rows=pair_rows,
            pair_weights=pair_w[sl],
            expert_counts=counts,
        )
        if shared_worker is not None:
            mine = shared_worker[rows] == w
            if shared_mask is not None:
                mine &= shared_mask[rows]
            shared_rows = mine.nonzero().squeeze(1)
            batch.shared_rows = shared_rows
            if shared_weights is not None:
                batch.shared_weights = shared_weights.cpu()[rows[shared_rows]]
        out[placement.worker_ids[w]] = (rows, batch)
    return out


def combine(like: torch.Tensor, partials: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum workers' [N_w, H] partials into a tensor shaped, typed and placed like `like` ([T, H]).

    The sum runs in the given (fixed) order and in fp32, so every transport gives the same bits.
    """
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for rows, partial in partials:
        out.index_add_(0, rows.to(like.device), partial.to(like.device, torch.float32))
    return out.to(like.dtype)
