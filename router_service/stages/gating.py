"""Stage 1, Route: what a MoE layer's gate decided for a batch of tokens.

The gate itself is the family's own `transformers` router module, run by its own MoE block in the
router model (moe_layer.py), so the chosen ids are the reference's by construction; this is the
form the later stages take them in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """ids: int32 [T, K] global expert ids; weights: float32 [T, K] their gate weights."""

    ids: torch.Tensor
    weights: torch.Tensor
