"""Stage 1, Route: gate logits -> top-k expert ids and weights, by the family's rule.

Each rule mirrors its `transformers` gate op for op (same dtypes, same reductions, same tie
behaviour) so the chosen ids are identical and the weights equal to rounding; the tests check this
against the `transformers` gate modules on random inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_models.spec import GatingSpec


@dataclass
class Routing:
    """ids: int32 [T, K] global expert ids; weights: float32 [T, K] their gate weights."""

    ids: torch.Tensor
    weights: torch.Tensor


def _group_mask(choice: torch.Tensor, g: GatingSpec) -> torch.Tensor:
    """Bool [T, E]: experts that lie in one of the token's `topk_group` best groups."""
    t = choice.shape[0]
    grouped = choice.view(t, g.n_group, g.num_experts // g.n_group)  # [T, G, E/G]
    if g.group_rule == "top2_sum":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    else:  # "max"
        group_scores = grouped.max(dim=-1).values
    group_idx = torch.topk(group_scores, k=g.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, g.num_experts).bool()


def route(
    g: GatingSpec, x: torch.Tensor, weight: torch.Tensor, correction_bias: torch.Tensor | None = None
) -> Routing:
    """Gate one batch of tokens.

    # T = tokens, H = hidden, E = experts, K = top-k
    x: [T, H] in the serving dtype; weight: [E, H] the gate matrix; correction_bias: [E] (V3 only).
    """
    if g.logits_in_fp32:
        logits = F.linear(x.float(), weight.float())  # [T, E] fp32
    else:
        logits = F.linear(x, weight)  # [T, E] serving dtype
    if g.scoring == "sigmoid":
        scores = logits.sigmoid()
        choice = scores + correction_bias if g.has_correction_bias else scores
        if g.group_rule is not None:
            choice = choice.masked_fill(~_group_mask(choice, g), float("-inf"))
        ids = torch.topk(choice, k=g.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
    else:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        if g.group_rule is not None:
            scores = scores.masked_fill(~_group_mask(scores, g), 0.0)
        # deepseek_v2 asks topk for unsorted results, qwen/mixtral for sorted ones; both give the same
        # set, and keeping the reference's call keeps the order (and so the summation order) too.
        weights, ids = torch.topk(scores, k=g.top_k, dim=-1, sorted=not g.logits_in_fp32)
    if g.norm_topk_prob:
        denominator = weights.sum(dim=-1, keepdim=True)
        weights = weights / (denominator + g.norm_eps)  # + 0.0 is exact: same bits as a plain divide
    if g.routed_scaling_factor != 1.0:
        weights = weights * g.routed_scaling_factor
    if g.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return Routing(ids=ids.to(torch.int32), weights=weights.float())
