"""Planning transitions between placements: pure functions of the spec, the running workers and the
expert load, with no transport, router or thread in sight (the controller applies what they plan).

- `packs`: what each of n workers should hold: contiguous blocks, or DeepSeek's EPLB over the load
  when there are redundant slots or a rebalance asks for it;
- `plan_change`: the `Change` from the running workers to those packs, matched so that as few
  weights move as possible (a worker whose experts do not change keeps its layout key);
- `adopt`: the placement a set of running workers already serves (a restarted controller's start);
- `balance`: how evenly a placement spreads the load (vLLM's balancedness, TensorRT-LLM's imbalance).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_models.spec import ModelSpec
from router_service.runtime.transport import LayoutSpec
from router_service.stages.eplb import (
    balancedness,
    imbalance,
    match_workers,
    rebalance_experts,
    slot_offsets,
    worker_capacities,
    worker_loads,
)
from router_service.stages.placement import Placement, contiguous_blocks, placement_from_assignments

Running = dict[int, tuple[int, dict[int, list[int]]]]  # worker id -> (layout key, assignment)


@dataclass
class Change:
    """A planned transition: the placement to publish and what it takes to get there."""

    placement: Placement
    starts: dict[int, LayoutSpec] = field(default_factory=dict)  # new workers
    loads: dict[int, LayoutSpec] = field(default_factory=dict)  # running workers, new layouts
    retire: set[int] = field(default_factory=set)  # workers the new placement does not use
    drops: dict[int, int] = field(default_factory=dict)  # old layout keys to free after publishing


def packs(
    spec: ModelSpec, n: int, num_slots: int, balanced: bool, redundant: int, load: torch.Tensor
) -> list[dict[int, list[int]]]:
    """Per new worker, MoE layer -> its experts: EPLB over `load` ([L, E] token counts) when asked
    or when there are redundant slots, else contiguous blocks."""
    layers = spec.moe_layers
    if not balanced and redundant == 0:
        return [{layer: block for layer in layers} for block in contiguous_blocks(spec.num_experts, n)]
    phy2log, _, _ = rebalance_experts(load.double(), num_slots, n)
    offs = slot_offsets(worker_capacities(num_slots, n))
    return [
        {layer: phy2log[li, offs[j] : offs[j + 1]].tolist() for li, layer in enumerate(layers)}
        for j in range(n)
    ]


def running_of(base: Placement | None, dead: set[int]) -> Running:
    """The live workers of `base`: id -> (layout key, assignment)."""
    if base is None:
        return {}
    return {w: (base.layout_of(w), base.worker_assignment(w)) for w in base.worker_ids if w not in dead}


def plan_change(
    spec: ModelSpec, running: Running, targets: list[dict[int, list[int]]], version: int, new_ids
) -> Change:
    """The change from the `running` workers to workers holding `targets` (one pack each), as
    placement `version`; `new_ids(k)` names k fresh workers."""
    layers = spec.moe_layers
    held = {w: a for w, (_, a) in running.items()}
    running_ids = list(running)
    match = match_workers(
        [[set(p[layer]) for layer in layers] for p in targets],
        [[set(held[w][layer]) for layer in layers] for w in running_ids],
    )
    change = Change(placement=None)  # type: ignore[arg-type]
    ids, keys, assignments = [], [], []
    fresh = iter(new_ids(sum(1 for m in match if m < 0)))
    for pack, m in zip(targets, match, strict=True):
        if m < 0:
            w = next(fresh)
            change.starts[w] = (version, pack)
            key = version
        else:
            w = running_ids[m]
            if all(sorted(pack[layer]) == sorted(held[w][layer]) for layer in layers):
                pack, key = held[w], running[w][0]  # the same experts: nothing to load
            else:
                change.loads[w] = (version, pack)
                change.drops[w] = running[w][0]
                key = version
        ids.append(w)
        keys.append(key)
        assignments.append(pack)
    change.retire = set(running) - set(ids)
    change.placement = placement_from_assignments(
        version, layers, spec.num_experts, tuple(ids), assignments, tuple(keys)
    )
    return change


def adopt(spec: ModelSpec, found: dict[int, dict], version: int) -> Placement:
    """The placement, as `version`, that the running workers `found` (id -> describe()) serve, each
    with its latest layout. Raises ValueError (or KeyError, TypeError) when they do not form one.

    Slot order is not stored anywhere; ordering by the experts held restores the contiguous order
    (and with it the combine order) of placements the controller made."""
    first_layer = str(spec.moe_layers[0])
    ids = sorted(found, key=lambda w: (min(experts_of(found[w], first_layer), default=0), w))
    return placement_from_assignments(
        version,
        spec.moe_layers,
        spec.num_experts,
        tuple(ids),
        [assignment_of(found[w]) for w in ids],
        tuple(int(found[w]["layout"]) for w in ids),
    )


def balance(placement: Placement, load: torch.Tensor) -> dict:
    """Per layer, from `load` ([L, E]): balancedness (mean / max worker load, vLLM's definition),
    imbalance ((max - mean) / mean, TensorRT-LLM's) and each worker's expected load."""
    p = placement
    loads = worker_loads(load.double(), p.phy2log, p.slot_offsets)  # [L, W]
    bal, imb = balancedness(loads), imbalance(loads)
    return {
        "balancedness": {layer: round(float(bal[i]), 4) for i, layer in enumerate(p.moe_layers)},
        "imbalance": {layer: round(float(imb[i]), 4) for i, layer in enumerate(p.moe_layers)},
        "worker_load": {
            layer: dict(zip(p.worker_ids, loads[i].tolist(), strict=True))
            for i, layer in enumerate(p.moe_layers)
        },
    }


def assignment_of(info: dict) -> dict[int, list[int]]:
    """A described worker's latest layout: MoE layer -> expert of each slot."""
    return {int(layer): [int(e) for e in ids] for layer, ids in (info.get("experts") or {}).items()}


def experts_of(info: dict, layer: str) -> list[int]:
    experts = info.get("experts") or {}
    return experts.get(layer, experts.get(int(layer), []))
