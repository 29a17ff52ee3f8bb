"""Placement: which worker hosts which expert, per MoE layer, as versioned data.

Physical expert slots are numbered 0..num_phy-1 and worker w owns the contiguous slot range
[slot_offsets[w], slot_offsets[w+1]) in every layer; `phy2log[l, p]` says which logical expert slot p
holds in MoE layer l. Replicas are simply several slots holding the same logical expert, and the
derived `log2phy` / `logcnt` maps (EPLB's vocabulary) let the planner split a replicated expert's
tokens across its copies. A forward pass pins one `Placement` object from start to end; rebalancing
and scaling (later issues) publish a new one with a higher `version` instead of mutating this one.
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
    # derived in __post_init__
    log2phy: torch.Tensor = field(init=False, repr=False)  # int64 [L, E, R], -1 padded
    logcnt: torch.Tensor = field(init=False, repr=False)  # int64 [L, E] replicas per expert
    phy2worker: torch.Tensor = field(init=False, repr=False)  # int64 [num_phy]
    phy2local: torch.Tensor = field(init=False, repr=False)  # int64 [num_phy] slot index on its worker
    layer_index: dict[int, int] = field(init=False, repr=False)  # MoE layer id -> row of phy2log

    def __post_init__(self):
        num_layers, num_phy = self.phy2log.shape
        offs = self.slot_offsets
        if len(self.moe_layers) != num_layers:
            raise ValueError(f"phy2log has {num_layers} rows for {len(self.moe_layers)} MoE layers")
        if offs[0] != 0 or offs[-1] != num_phy or any(b < a for a, b in zip(offs, offs[1:], strict=False)):
            raise ValueError(f"slot_offsets {offs} must rise from 0 to num_phy={num_phy}")
        if len(offs) < 2:
            raise ValueError("a placement needs at least one worker")
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
        for li in range(num_layers):  # load time only: a few thousand slots at most
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

    @property
    def num_workers(self) -> int:
        return len(self.slot_offsets) - 1

    def worker_experts(self, worker: int, layer: int) -> list[int]:
        """Logical expert ids in worker's slots of `layer`, in slot order."""
        a, b = self.slot_offsets[worker], self.slot_offsets[worker + 1]
        return self.phy2log[self.layer_index[layer], a:b].tolist()

    def worker_assignment(self, worker: int) -> dict[int, list[int]]:
        return {layer: self.worker_experts(worker, layer) for layer in self.moe_layers}


def contiguous_placement(moe_layers: tuple[int, ...], num_experts: int, num_workers: int, version: int = 0):
    """Default: worker w holds experts [floor(wE/W), floor((w+1)E/W)) of every layer, no replicas."""
    if not 1 <= num_workers <= num_experts:
        raise ValueError(
            f"num_workers must be between 1 and the number of experts ({num_experts}), got {num_workers}"
        )
    offsets = tuple(w * num_experts // num_workers for w in range(num_workers + 1))
    phy2log = torch.arange(num_experts, dtype=torch.int64).repeat(len(moe_layers), 1)
    return Placement(version, tuple(moe_layers), num_experts, offsets, phy2log)
