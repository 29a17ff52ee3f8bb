"""Expert-parallel load balancing (EPLB): where each MoE layer's experts and their replicas should live.

DeepSeek's "global" policy, written from its description: give the most loaded experts extra replicas
until every physical slot is used (`replicate_experts`), then pack the replicas onto the workers so the
per-worker loads are as even as possible (`balanced_packing`); `rebalance_experts` runs both and lays
the slots out worker by worker, in the `phy2log` / `log2phy` / `logcnt` vocabulary of `Placement`.
`worker_loads`, `balancedness` and `imbalance` score a layout against measured expert loads, and
`match_workers` maps a new layout's workers onto the current ones so a rebalance or a scale moves as
few expert weights as possible. Everything here is a pure function on CPU tensors (placement maps live
on the CPU); loads are computed in float64 so that ties, and hence layouts, are reproducible.

Vocabulary: L = MoE layers, E = logical experts per layer, P = physical expert slots (P >= E, P - E
redundant), W = workers, R = most replicas of one expert. Worker w owns the slot range
[slot_offsets[w], slot_offsets[w + 1]) in every layer.
"""

from __future__ import annotations

import heapq

import torch


def worker_capacities(num_slots: int, num_workers: int) -> list[int]:
    """Slots per worker: as even as possible, the first num_slots % num_workers workers one more.

    Parameters:
        num_slots: P, the number of physical expert slots per layer
        num_workers: W
    Returns:
        capacities: W ints summing to P, differing by at most one
    """
    if num_workers < 1 or num_slots < 0:
        raise ValueError(f"need num_workers >= 1 and num_slots >= 0, got {num_workers} and {num_slots}")
    base, extra = divmod(num_slots, num_workers)
    return [base + (1 if w < extra else 0) for w in range(num_workers)]


def slot_offsets(capacities: list[int]) -> tuple[int, ...]:
    """Start of each worker's slot range, plus the end: (0, c0, c0 + c1, ..., P), W + 1 ints."""
    offsets = [0]
    for c in capacities:
        offsets.append(offsets[-1] + c)
    return tuple(offsets)


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight as a float64 CPU tensor, after checking it is a 2-D tensor of finite, non-negative loads."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, experts], got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("weight holds NaN or infinite loads")
    if (w < 0).any():
        layer, expert = (w < 0).nonzero()[0].tolist()
        raise ValueError(f"weight must be non-negative, got {w[layer, expert].item()} at [{layer}, {expert}]")
    return w


def replicate_experts(
    weight: torch.Tensor, num_phy: int, max_replicas: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give the experts num_phy - E extra replicas, each to the expert with the highest load per replica.

    With `max_replicas`, an expert that has that many replicas gets no more while another can (more
    replicas of an expert than there are workers only fill slots: two copies on one worker spread no
    load).

    Parameters:
        weight: [L, E], load of each logical expert
        num_phy: P >= E, physical slots per layer
        max_replicas: optional cap on the replicas of one expert (ignored when P > E * cap)
    Returns:
        phy2log: [L, P] int64, logical expert of each slot; slots 0..E-1 hold experts 0..E-1, the
            redundant slots follow in the order they were added
        phy_rank: [L, P] int64, replica rank of each slot (0 for an expert's first copy)
        logcnt: [L, E] int64, replicas per logical expert
    """
    w = _check_weight(weight)
    num_layers, num_log = w.shape
    if num_log < 1 or num_phy < num_log:
        raise ValueError(f"need 1 <= experts <= num_phy, got {num_log} experts and num_phy={num_phy}")
    rows = torch.arange(num_layers)
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(num_layers, 1)
    phy_rank = torch.zeros(num_layers, num_phy, dtype=torch.int64)
    logcnt = torch.ones(num_layers, num_log, dtype=torch.int64)
    # All layers at once; argmax returns the first maximum, so ties go to the lowest expert id.
    cap = max_replicas if max_replicas is not None and num_phy <= num_log * max_replicas else None
    for p in range(num_log, num_phy):
        per_replica = w / logcnt  # [L, E]
        if cap is not None:
            per_replica = per_replica.masked_fill(logcnt >= cap, -1.0)  # loads are >= 0
        chosen = per_replica.argmax(dim=-1)  # [L]
        phy2log[:, p] = chosen
        phy_rank[:, p] = logcnt[rows, chosen]
        logcnt[rows, chosen] += 1
    return phy2log, phy_rank, logcnt


def balanced_packing(
    weight: torch.Tensor, capacities: list[int], groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack N weighted items into packs of exactly capacities[i] items with per-pack sums as even as possible.

    Greedy (longest-processing-time first): items in decreasing weight (ties: lower index first), each
    into the least loaded pack that still has room (ties: lower pack index). With `groups`, items of one
    group (the replicas of one expert) are kept in different packs: a pack that already holds the item's
    group is skipped unless no other pack has room, and a repair pass then swaps items between packs
    while that removes a duplicate. When the capacities differ by at most one and no group has more items
    than there are packs, the result has no duplicates at all: a pack A holding group g twice always
    has a swap partner in a pack B without g: an item of B whose group A lacks, or a duplicate in B
    (B's items cannot all be distinct members of A's other groups, for B has at least cap(A) - 1 items
    and A at most cap(A) - 2 other groups).

    Parameters:
        weight: [L, N], weight of each item
        capacities: number of items each pack takes, summing to N
        groups: [L, N] int, optional group id of each item
    Returns:
        pack_index: [L, N] int64, the pack of each item
        rank_in_pack: [L, N] int64, position of the item in its pack, in order of assignment
    """
    w = _check_weight(weight)
    num_layers, num_items = w.shape
    if not capacities or min(capacities) < 0 or sum(capacities) != num_items:
        raise ValueError(f"capacities {capacities} must be non-negative and sum to {num_items} items")
    if groups is not None and tuple(groups.shape) != tuple(w.shape):
        raise ValueError(f"groups has shape {tuple(groups.shape)}, weight {tuple(w.shape)}")
    pack_index = torch.empty(num_layers, num_items, dtype=torch.int64)
    rank_in_pack = torch.empty(num_layers, num_items, dtype=torch.int64)
    order = torch.argsort(-w, dim=-1, stable=True)  # [L, N] heaviest first, ties by lower index
    for layer in range(num_layers):  # a Python loop per layer: N is at most a few thousand
        loads = w[layer].tolist()
        group = groups[layer].tolist() if groups is not None else list(range(num_items))
        pack = [0] * num_items
        rank = [0] * num_items
        # Step 1: greedy over items; a heap of (load, pack) over the packs with room.
        heap = [(0.0, i) for i, c in enumerate(capacities) if c > 0]
        filled = [0] * len(capacities)
        held: list[dict[int, int]] = [{} for _ in capacities]  # pack -> {group: items of it}
        for item in order[layer].tolist():
            g = group[item]
            skipped = []
            while heap and groups is not None and g in held[heap[0][1]]:
                skipped.append(heapq.heappop(heap))
            load, i = heapq.heappop(heap) if heap else skipped.pop(0)  # no other room: allow a duplicate
            for entry in skipped:
                heapq.heappush(heap, entry)
            pack[item], rank[item] = i, filled[i]
            filled[i] += 1
            held[i][g] = held[i].get(g, 0) + 1
            if filled[i] < capacities[i]:
                heapq.heappush(heap, (load + loads[item], i))
        # Step 2: swap items while that removes a duplicate group from a pack.
        if groups is not None:
            _remove_duplicates(loads, group, pack, rank, held)
        pack_index[layer] = torch.tensor(pack)
        rank_in_pack[layer] = torch.tensor(rank)
    return pack_index, rank_in_pack


def _remove_duplicates(
    loads: list[float], group: list[int], pack: list[int], rank: list[int], held: list[dict[int, int]]
) -> None:
    """In place: swap pairs of items between packs while a swap lowers the number of duplicated items.

    Each swap takes one copy of a duplicated group g out of pack A and an item of group f out of a pack
    B, and is taken only if it lowers sum over packs of (count - 1) for every group held, so the loop
    ends. Of the improving swaps the one with the closest item weights goes first (it moves the pack
    loads least); ties by lower item indices. Items alike in (pack, group, weight) are interchangeable,
    so only the lowest index of each such class is tried: that keeps the loop fast when many copies of a
    group must share packs (an expert with more replicas than there are workers).
    """
    while True:
        classes: dict[tuple[int, int, float], int] = {}
        for item, i in enumerate(pack):
            classes.setdefault((i, group[item], loads[item]), item)
        best = None
        for (a, g, _), a_item in classes.items():
            if held[a][g] < 2:
                continue
            for (b, f, _), b_item in classes.items():
                if b == a or f == g:
                    continue
                # duplicates: A loses a copy of g (-1), gains f; B gains g, loses a copy of f
                delta = -1 + (held[a].get(f, 0) >= 1) + (held[b].get(g, 0) >= 1) - (held[b][f] >= 2)
                if delta < 0:
                    key = (abs(loads[a_item] - loads[b_item]), a_item, b_item)
                    best = key if best is None or key < best else best
        if best is None:
            return
        _, a_item, b_item = best
        a, b, g, f = pack[a_item], pack[b_item], group[a_item], group[b_item]
        pack[a_item], pack[b_item] = b, a
        rank[a_item], rank[b_item] = rank[b_item], rank[a_item]
        for i, gone, came in ((a, g, f), (b, f, g)):
            held[i][gone] -= 1
            if held[i][gone] == 0:
                del held[i][gone]
            held[i][came] = held[i].get(came, 0) + 1


def rebalance_experts(
    weight: torch.Tensor, num_slots: int, num_workers: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry point: a balanced placement of E experts on num_slots slots over num_workers workers.

    Worker w gets worker_capacities(num_slots, num_workers)[w] slots. A worker holds at most one
    replica of an expert whenever no expert has more replicas than there are workers (see
    `balanced_packing`); inside a worker the slots are sorted by logical expert id, so the layout is
    deterministic and easy to read.

    Parameters:
        weight: [L, E], load statistics of the logical experts (e.g. tokens routed per expert)
        num_slots: P >= E, physical expert slots per layer
        num_workers: W, 1 <= W <= P
    Returns:
        phy2log: [L, P] int64, logical expert of each physical slot
        log2phy: [L, E, R] int64, physical slots of each logical expert in increasing order, -1 padded
        logcnt: [L, E] int64, replicas per logical expert
    """
    # L = MoE layers, E = logical experts, P = physical slots, W = workers, R = most replicas
    w = _check_weight(weight)
    num_layers, num_log = w.shape
    if num_slots < num_log:
        raise ValueError(f"num_slots ({num_slots}) must be at least the number of experts ({num_log})")
    if not 1 <= num_workers <= num_slots:
        raise ValueError(f"num_workers must be between 1 and num_slots ({num_slots}), got {num_workers}")
    # Step 1: replicate the hot experts until all P slots are used.
    rep2log, _, logcnt = replicate_experts(w, num_slots, max_replicas=num_workers)  # [L, P], [L, E]
    # Step 2: pack the replicas onto the workers; a replica carries an even share of its expert's load.
    rep_load = w.gather(1, rep2log) / logcnt.gather(1, rep2log)  # [L, P]
    capacities = worker_capacities(num_slots, num_workers)
    rep2worker, _ = balanced_packing(rep_load, capacities, groups=rep2log)  # [L, P]
    # Step 3: slots worker by worker (each worker gets exactly its capacity), by expert id inside one.
    order = torch.argsort(rep2worker * num_log + rep2log, dim=-1, stable=True)  # [L, P]
    phy2log = rep2log.gather(1, order)  # [L, P]
    # Step 4: invert: the r-th slot (in slot order) of expert e goes to log2phy[l, e, r].
    num_rep = int(logcnt.max())
    # by_expert: [L, P] the slots ordered by (expert, slot)
    by_expert = torch.argsort(phy2log * num_slots + torch.arange(num_slots), dim=-1)
    first = torch.cumsum(logcnt, dim=-1) - logcnt  # [L, E] position of each expert's first slot
    experts = phy2log.gather(1, by_expert)  # [L, P] ascending
    replica = torch.arange(num_slots) - first.gather(1, experts)  # [L, P]
    log2phy = torch.full((num_layers, num_log * num_rep), -1, dtype=torch.int64)
    log2phy.scatter_(1, experts * num_rep + replica, by_expert)
    return phy2log, log2phy.view(num_layers, num_log, num_rep), logcnt


def worker_loads(weight: torch.Tensor, phy2log: torch.Tensor, slot_offsets: tuple[int, ...]) -> torch.Tensor:
    """Expected load of each worker when an expert's load is split evenly over its replicas.

    Parameters:
        weight: [L, E], load of each logical expert
        phy2log: [L, P], logical expert of each physical slot
        slot_offsets: W + 1 ints, worker w owns slots [slot_offsets[w], slot_offsets[w + 1])
    Returns:
        loads: [L, W] float64
    """
    w = _check_weight(weight)
    num_layers, num_log = w.shape
    if phy2log.dim() != 2 or phy2log.shape[0] != num_layers:
        raise ValueError(f"phy2log has shape {tuple(phy2log.shape)} for weight {tuple(w.shape)}")
    num_phy = phy2log.shape[1]
    if len(slot_offsets) < 2 or slot_offsets[0] != 0 or slot_offsets[-1] != num_phy:
        raise ValueError(f"slot_offsets {slot_offsets} must rise from 0 to num_phy={num_phy}")
    phy2log = phy2log.cpu().long()
    logcnt = torch.zeros(num_layers, num_log, dtype=torch.int64)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    slot_load = w.gather(1, phy2log) / logcnt.gather(1, phy2log)  # [L, P]
    sizes = torch.tensor([b - a for a, b in zip(slot_offsets, slot_offsets[1:], strict=False)])
    phy2worker = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # [P]
    loads = torch.zeros(num_layers, len(sizes), dtype=torch.float64)
    return loads.index_add_(1, phy2worker, slot_load)


def balancedness(loads: torch.Tensor) -> torch.Tensor:
    """vLLM's score: mean / max of the worker loads per layer, 1.0 for perfect balance (or no load).

    Parameters:
        loads: [L, W], non-negative load per worker
    Returns:
        [L] float64 in [0, 1]
    """
    loads = loads.to(torch.float64)
    peak = loads.max(dim=-1).values
    return torch.where(peak > 0, loads.mean(dim=-1) / peak, 1.0)  # 0 / 0 is replaced, not reported


def imbalance(loads: torch.Tensor) -> torch.Tensor:
    """TensorRT-LLM's score: (max - mean) / mean of the worker loads per layer, 0.0 for perfect balance.

    Parameters:
        loads: [L, W], non-negative load per worker
    Returns:
        [L] float64 >= 0
    """
    loads = loads.to(torch.float64)
    mean = loads.mean(dim=-1)
    excess = loads.max(dim=-1).values - mean
    return torch.where(mean > 0, excess / mean, 0.0)


def match_workers(new_sets: list[list[set[int]]], held: list[list[set[int]]]) -> list[int]:
    """Which existing worker takes each new pack, so that as many experts as possible stay in place.

    Greedy on overlap (experts a pack and a worker share, summed over layers): pairs in decreasing
    overlap, ties by lower pack index then lower worker index, each pack and each worker used once.
    Greedy rather than an optimal assignment: it is simple, deterministic and, for the usual case of a
    new layout that moves a few replicas, already the optimum.

    Parameters:
        new_sets: new_sets[j][l], the logical experts new pack j holds in layer l (J packs, L layers)
        held: held[i][l], the logical experts existing worker i holds in layer l (I workers)
    Returns:
        J ints: the existing worker for each pack, or -1 for a new worker (the least overlapping packs
        when J > I); when J < I, the least overlapping workers get no pack
    """
    layer_counts = {len(sets) for sets in new_sets} | {len(sets) for sets in held}
    if len(layer_counts) > 1:
        raise ValueError(
            f"every pack and worker must list the same number of layers, got {sorted(layer_counts)}"
        )
    pairs = sorted(
        (-sum(len(n & h) for n, h in zip(pack, worker, strict=True)), j, i)
        for j, pack in enumerate(new_sets)
        for i, worker in enumerate(held)
    )
    owner = [-1] * len(new_sets)
    taken = set()
    for _, j, i in pairs:
        if owner[j] == -1 and i not in taken:
            owner[j] = i
            taken.add(i)
    return owner
