"""Placement: which worker hosts which expert, per MoE layer, as versioned data.

Physical expert slots are numbered 0..num_phy-1 and the worker at position w of `worker_ids` owns
the contiguous slot range [slot_offsets[w], slot_offsets[w+1]) in every layer; `phy2log[l, p]` says
which logical expert slot p holds in MoE layer l. Replicas are simply several slots holding the same
logical expert, and the derived `log2phy` / `logcnt` maps (EPLB's vocabulary) let the planner split
a replicated expert's tokens across its copies.

Workers are named by stable ids (never reused), not by their position: adding, retiring or
replacing a worker publishes a new `Placement` with a higher `version` that names the workers it
uses. `layouts[w]` is the key under which worker `worker_ids[w]` holds its slots of this placement;
a worker whose slots did not change keeps its key, so a new version costs it nothing. A forward pass
pins one `Placement` object from start to end; nothing mutates one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Placement:
    """phy2log: int64 [L, num_phy] logical expert of each physical slot, per MoE layer."""

    version: int
    moe_layers: tuple[int, ...]
    num_experts: int
    slot_offsets: tuple[int, ...]  # W + 1 ascending ints, slot_offsets[0] == 0
    phy2log: torch.Tensor
    worker_ids: tuple[int, ...] = ()  # W stable ids in slot order (default 0..W-1)
    layouts: tuple[int, ...] = ()  # W layout keys (default: `version` for every worker)
    # derived in __post_init__
    log2phy: torch.Tensor = field(init=False, repr=False)  # int64 [L, E, R], -1 padded
    logcnt: torch.Tensor = field(init=False, repr=False)  # int64 [L, E] replicas per expert
    phy2worker: torch.Tensor = field(init=False, repr=False)  # int64 [num_phy] position in worker_ids
    phy2local: torch.Tensor = field(init=False, repr=False)  # int64 [num_phy] slot index on its worker
    layer_index: dict[int, int] = field(init=False, repr=False)  # MoE layer id -> row of phy2log
    worker_index: dict[int, int] = field(init=False, repr=False)  # worker id -> position

    def __post_init__(self):
        num_layers, num_phy = self.phy2log.shape
        offs = tuple(int(o) for o in self.slot_offsets)
        object.__setattr__(self, "slot_offsets", offs)
        if len(self.moe_layers) != num_layers:
            raise ValueError(f"phy2log has {num_layers} rows for {len(self.moe_layers)} MoE layers")
        if len(offs) < 2:
            raise ValueError("a placement needs at least one worker")
        if offs[0] != 0 or offs[-1] != num_phy or any(b <= a for a, b in zip(offs, offs[1:], strict=False)):
            raise ValueError(
                f"slot_offsets {offs} must rise from 0 to num_phy={num_phy}, at least one slot per worker"
            )
        num_workers = len(offs) - 1
        ids = tuple(int(w) for w in self.worker_ids) or tuple(range(num_workers))
        layouts = tuple(int(k) for k in self.layouts) or (self.version,) * num_workers
        if len(ids) != num_workers or len(set(ids)) != num_workers:
            raise ValueError(f"worker_ids {ids} must be {num_workers} distinct ids")
        if len(layouts) != num_workers:
            raise ValueError(f"layouts {layouts} must have one key per worker ({num_workers})")
        object.__setattr__(self, "worker_ids", ids)
        object.__setattr__(self, "layouts", layouts)
        if num_phy and (self.phy2log.min() < 0 or self.phy2log.max() >= self.num_experts):
            raise ValueError(f"phy2log holds ids outside [0, {self.num_experts})")
        logcnt = torch.zeros(num_layers, self.num_experts, dtype=torch.int64)
        logcnt.scatter_add_(1, self.phy2log, torch.ones_like(self.phy2log))
        if (logcnt == 0).any():
            layer, expert = (logcnt == 0).nonzero()[0].tolist()
            raise ValueError(f"expert {expert} of MoE layer {self.moe_layers[layer]} has no slot")
        max_rep = int(logcnt.max())
        log2phy = torch.full((num_layers, self.num_experts, max_rep), -1, dtype=torch.int64)
        seen = torch.zeros(num_layers, self.num_experts, dtype=torch.int64)
        for li in range(num_layers):  # off the hot path: a few thousand slots at most
            for p, e in enumerate(self.phy2log[li].tolist()):
                log2phy[li, e, seen[li, e]] = p
                seen[li, e] += 1
        sizes = torch.tensor([b - a for a, b in zip(offs, offs[1:], strict=False)])
        phy2worker = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        phy2local = torch.arange(num_phy) - torch.tensor(offs[:-1])[phy2worker]
        object.__setattr__(self, "log2phy", log2phy)
        object.__setattr__(self, "logcnt", logcnt)
        object.__setattr__(self, "phy2worker", phy2worker)
        object.__setattr__(self, "phy2local", phy2local)
        object.__setattr__(self, "layer_index", {layer: i for i, layer in enumerate(self.moe_layers)})
        object.__setattr__(self, "worker_index", {w: i for i, w in enumerate(ids)})

    @property
    def num_workers(self) -> int:
        return len(self.slot_offsets) - 1

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    def layout_of(self, worker: int) -> int:
        return self.layouts[self.worker_index[worker]]

    def worker_experts(self, worker: int, layer: int) -> list[int]:
        """Logical expert ids in the slots of worker id `worker` in `layer`, in slot order."""
        w = self.worker_index[worker]
        a, b = self.slot_offsets[w], self.slot_offsets[w + 1]
        return self.phy2log[self.layer_index[layer], a:b].tolist()

    def worker_assignment(self, worker: int) -> dict[int, list[int]]:
        """MoE layer -> the worker's expert of each slot (what it loads as its layout)."""
        return {layer: self.worker_experts(worker, layer) for layer in self.moe_layers}

    def to_dict(self) -> dict:
        """JSON-able: version, worker ids, slot offsets and phy2log per layer."""
        return {
            "version": self.version,
            "worker_ids": list(self.worker_ids),
            "layouts": list(self.layouts),
            "slot_offsets": list(self.slot_offsets),
            "phy2log": {layer: self.phy2log[i].tolist() for layer, i in self.layer_index.items()},
        }


def contiguous_blocks(num_experts: int, num_workers: int) -> list[list[int]]:
    """Worker w's experts: [floor(wE/W), floor((w+1)E/W)) (sizes differ by at most one)."""
    if not 1 <= num_workers <= num_experts:
        raise ValueError(
            f"num_workers must be between 1 and the number of experts ({num_experts}), got {num_workers}"
        )
    offsets = [w * num_experts // num_workers for w in range(num_workers + 1)]
    return [list(range(a, b)) for a, b in zip(offsets, offsets[1:], strict=False)]


def contiguous_placement(
    moe_layers: tuple[int, ...],
    num_experts: int,
    num_workers: int,
    version: int = 0,
    worker_ids: tuple[int, ...] = (),
) -> Placement:
    """Default: worker w holds experts [floor(wE/W), floor((w+1)E/W)) of every layer, no replicas."""
    blocks = contiguous_blocks(num_experts, num_workers)
    per_worker = [{layer: block for layer in moe_layers} for block in blocks]
    return placement_from_assignments(
        version, tuple(moe_layers), num_experts, worker_ids or tuple(range(num_workers)), per_worker
    )


def placement_from_assignments(
    version: int,
    moe_layers: tuple[int, ...],
    num_experts: int,
    worker_ids: tuple[int, ...],
    assignments: list[dict[int, list[int]]],
    layouts: tuple[int, ...] = (),
) -> Placement:
    """The placement whose worker `worker_ids[w]` holds `assignments[w][layer]` (in slot order).

    Every worker must hold the same number of slots in every layer (slot ranges are shared by the
    layers); ValueError otherwise, or when an expert is left without a slot.
    """
    sizes = []
    for wid, a in zip(worker_ids, assignments, strict=True):
        counts = {len(a[layer]) for layer in moe_layers}
        if len(counts) != 1:
            raise ValueError(f"worker {wid} holds different slot counts per layer: {sorted(counts)}")
        sizes.append(counts.pop())
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    phy2log = torch.tensor(
        [[e for a in assignments for e in a[layer]] for layer in moe_layers], dtype=torch.int64
    ).reshape(len(moe_layers), offsets[-1])
    return Placement(
        version, tuple(moe_layers), num_experts, tuple(offsets), phy2log, tuple(worker_ids), tuple(layouts)
    )


def without_workers(placement: Placement, lost: set[int], version: int) -> Placement | None:
    """`placement` minus the slots of the `lost` workers, when every expert keeps a replica on a
    survivor (the survivors' layouts are unchanged); None when some expert would have no slot left."""
    keep = [w for w in placement.worker_ids if w not in lost]
    if not keep:
        return None
    try:
        return placement_from_assignments(
            version,
            placement.moe_layers,
            placement.num_experts,
            tuple(keep),
            [placement.worker_assignment(w) for w in keep],
            tuple(placement.layout_of(w) for w in keep),
        )
    except ValueError:
        return None


def reassign_lost_slots(placement: Placement, lost: set[int], version: int) -> tuple[Placement, set[int]]:
    """A placement over the survivors in which they take over every slot of the `lost` workers.

    Each survivor gets an equal share (differing by one) of the lost slot count, the same in every
    layer. A lost slot whose expert a survivor with room already holds goes there as a second slot of
    that expert (no weights to read); the others go where there is room. Returns the placement and
    the ids of the survivors whose slots changed (they load a layout under key `version`; the others
    keep theirs). Raises ValueError when nobody survives.
    """
    survivors = [w for w in placement.worker_ids if w not in lost]
    if not survivors:
        raise ValueError("no expert worker survives")
    lost_pos = [placement.worker_index[w] for w in placement.worker_ids if w in lost]
    lost_slots = [
        p for w in lost_pos for p in range(placement.slot_offsets[w], placement.slot_offsets[w + 1])
    ]
    n, s = len(lost_slots), len(survivors)
    room = {w: n // s + (1 if i < n % s else 0) for i, w in enumerate(survivors)}
    gains: dict[int, dict[int, list[int]]] = {w: {} for w in survivors}
    for layer in placement.moe_layers:
        li = placement.layer_index[layer]
        left = dict(room)
        holders = {w: set(placement.worker_experts(w, layer)) for w in survivors}
        pending = []
        for p in lost_slots:  # Step 1: a slot whose expert a survivor already holds goes there
            e = int(placement.phy2log[li, p])
            home = next((w for w in survivors if left[w] and e in holders[w]), None)
            if home is None:
                pending.append(e)
            else:
                gains[home].setdefault(layer, []).append(e)
                left[home] -= 1
        for e in pending:  # Step 2: the rest where most room is left (ties: the earlier survivor)
            home = max(survivors, key=lambda w: left[w])
            gains[home].setdefault(layer, []).append(e)
            left[home] -= 1
    assignments, layouts, changed = [], [], set()
    for w in survivors:
        a = placement.worker_assignment(w)
        if any(gains[w].get(layer) for layer in placement.moe_layers):
            a = {layer: a[layer] + gains[w].get(layer, []) for layer in placement.moe_layers}
            changed.add(w)
        assignments.append(a)
        layouts.append(version if w in changed else placement.layout_of(w))
    new = placement_from_assignments(
        version, placement.moe_layers, placement.num_experts, tuple(survivors), assignments, tuple(layouts)
    )
    return new, changed
