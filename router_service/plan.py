"""Stages 2 and 5, Plan and Combine: group each token's choices by worker, then sum the partials.

Plan sorts the T*K (token, expert) pairs once by physical slot; since each worker owns a contiguous
slot range, that single sort groups the pairs by worker and, inside a worker, by local expert, which
is the order the grouped FFN wants. A token goes to a worker once however many of its experts live
there (`torch.unique` of its token ids), and its shared experts run on exactly one worker it already
visits, so they add no traffic.
"""

from __future__ import annotations

import torch

from expert_workers.worker import ExpertBatch
from router_service.gating import Routing
from router_service.placement import Placement


def plan(
    routing: Routing,
    placement: Placement,
    layer: int,
    x: torch.Tensor,
    with_shared: bool,
    shared_weights: torch.Tensor | None = None,
) -> dict[int, tuple[torch.Tensor, ExpertBatch]]:
    """Per worker with work: (token ids it serves, its ExpertBatch).

    # T = tokens, K = top-k, W = workers, H = hidden
    routing.ids: [T, K]; x: [T, H]; shared_weights: [T] or None (meaning 1).
    """
    li = placement.layer_index[layer]
    t, k = routing.ids.shape
    # Index bookkeeping runs on the CPU (the placement maps live there); only x[rows] stays on x's device.
    ids = routing.ids.cpu().long()  # [T, K]
    tok = torch.arange(t).unsqueeze(1).expand(t, k)  # [T, K]
    # Step 1: pick a replica per pair; a replicated expert's tokens alternate over its copies.
    replica = tok % placement.logcnt[li][ids]
    phy = placement.log2phy[li][ids, replica]  # [T, K]
    # Step 2: one stable sort by slot groups pairs by worker, then by local expert.
    flat_phy = phy.reshape(-1)
    order = torch.argsort(flat_phy, stable=True)  # [T*K]
    sorted_phy = flat_phy[order]
    pair_tok = order // k
    pair_w = routing.weights.cpu().reshape(-1)[order]
    pair_worker = placement.phy2worker[sorted_phy]
    per_worker = torch.bincount(pair_worker, minlength=placement.num_workers).tolist()
    # Step 3: each token's shared experts go to the worker of one of its own choices (choice t % K),
    # which spreads the shared work over the workers its tokens already visit.
    shared_worker = None
    if with_shared:
        pick = torch.arange(t) % k
        shared_worker = placement.phy2worker[phy[torch.arange(t), pick]]  # [T]
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
            shared_rows = (shared_worker[rows] == w).nonzero().squeeze(1)
            batch.shared_rows = shared_rows
            if shared_weights is not None:
                batch.shared_weights = shared_weights.cpu()[rows[shared_rows]]
        out[w] = (rows, batch)
    return out


def combine(like: torch.Tensor, partials: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum workers' [N_w, H] partials into a tensor shaped, typed and placed like `like` ([T, H]).

    The sum runs in a fixed (worker) order and in fp32, so every transport gives the same bits.
    """
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for rows, partial in partials:
        out.index_add_(0, rows.to(like.device), partial.to(like.device, torch.float32))
    return out.to(like.dtype)
