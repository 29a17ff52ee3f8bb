"""The router's gate: the builtin hand-written rule (`gating.route`) against the family's own
transformers router module (what block families run), on the same weights and inputs.

Shapes of the published models (hidden size, routed experts, top-k, groups): DeepSeek-V3 (7168,
256, 8, 8 groups keep 4), DeepSeek-V2-Lite (2048, 64, 6, greedy), Qwen3-30B-A3B (2048, 128, 8).
Both paths run in the same process, alternating, and the minimum over repeats is reported (the
machine may be shared); ids are checked equal. Decides whether the builtin path stays (it stays
where it is not slower: docs/performance.md, "Gate").

    python -m bench.gate --tokens 1,16,512 --repeats 30
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from transformers import DeepseekV2Config, DeepseekV3Config, Qwen3MoeConfig

from moe_models.spec import spec_from_hf_config
from router_service.stages.gating import route

TINY_FFN = dict(intermediate_size=8, moe_intermediate_size=8)  # only the gate is timed
SHAPES = {
    "deepseek_v3": lambda: DeepseekV3Config(
        hidden_size=7168,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        **TINY_FFN,
    ),
    "deepseek_v2_lite": lambda: DeepseekV2Config(
        hidden_size=2048,
        n_routed_experts=64,
        num_experts_per_tok=6,
        topk_method="greedy",
        num_hidden_layers=2,
        first_k_dense_replace=1,
        **TINY_FFN,
    ),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        hidden_size=2048,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        num_hidden_layers=1,
        **TINY_FFN,
    ),
}


def gate_module(cfg):
    """The family's transformers router module (returns logits, weights, ids), random weights."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cls = {"deepseek_v3": DeepseekV3TopkRouter, "deepseek_v2": DeepseekV2TopkRouter}.get(
        cfg.model_type, Qwen3MoeTopKRouter
    )
    gate = cls(cfg)
    bias = getattr(gate, "e_score_correction_bias", None)
    with torch.no_grad():
        gate.weight.normal_(0, 0.02)
        if bias is not None:
            bias.uniform_(-0.1, 0.1)
    return gate, gate.weight, bias


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1,16,512")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"{'shape':<18} {'tokens':>6} {'builtin ms':>11} {'module ms':>10} {'builtin/module':>15}")
    for name, make in SHAPES.items():
        cfg = make()
        spec = spec_from_hf_config(cfg)
        gate, weight, bias = gate_module(cfg)
        for t in (int(s) for s in args.tokens.split(",")):
            x = torch.randn(t, cfg.hidden_size)
            with torch.no_grad():
                ours = route(spec.gating, x, weight, bias)
                ids = gate(x)[2]
                assert torch.equal(ours.ids.long().sort(-1).values, ids.long().sort(-1).values), name
                a = b = float("inf")
                for _ in range(3):  # alternate, so both see the same machine load
                    a = min(a, best_ms(partial(route, spec.gating, x, weight, bias), args.repeats // 3))
                    b = min(b, best_ms(partial(gate, x), args.repeats // 3))
            print(f"{name:<18} {t:>6} {a:>11.3f} {b:>10.3f} {a / b:>15.2f}")


if __name__ == "__main__":
    main()
