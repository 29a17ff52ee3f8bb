"""Expert load: tokens routed to each (MoE layer, expert) over a sliding window of batches.

The router records every layer's top-k ids (one bincount on the hot path); rebalancing (EPLB, a
later issue) reads the window's totals to decide which experts to replicate.
"""

from __future__ import annotations

import torch


class ExpertLoad:
    """Per layer, a ring of the last `window` batches' token counts per expert."""

    def __init__(self, moe_layers: tuple[int, ...], num_experts: int, window: int):
        self.moe_layers = moe_layers
        self.window = window
        self._row = {layer: i for i, layer in enumerate(moe_layers)}
        self._ring = torch.zeros(len(moe_layers), window, num_experts, dtype=torch.int64)  # [L, W, E]
        self._cursor = [0] * len(moe_layers)
        self._batches = [0] * len(moe_layers)

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """topk_ids: [T, K] global expert ids routed in one batch of `layer`."""
        i = self._row[layer]
        counts = torch.bincount(topk_ids.reshape(-1).long().cpu(), minlength=self._ring.shape[2])
        self._ring[i, self._cursor[i]] = counts
        self._cursor[i] = (self._cursor[i] + 1) % self.window
        self._batches[i] += 1

    def totals(self) -> torch.Tensor:
        """int64 [L, E]: tokens per expert over the window, rows in `moe_layers` order."""
        return self._ring.sum(dim=1)

    def snapshot(self) -> dict:
        totals = self.totals()
        return {
            "window_batches": self.window,
            "batches_seen": {layer: self._batches[i] for layer, i in self._row.items()},
            "tokens": {layer: totals[i].tolist() for layer, i in self._row.items()},
        }
