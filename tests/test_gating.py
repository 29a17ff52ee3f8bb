"""Route equals each family's transformers gate on random inputs: same ids, weights to 1e-6."""

import pytest
import torch
from tiny_models import BUILTIN_VARIANTS
from transformers import AutoModelForCausalLM

from moe_models.spec import spec_from_pretrained
from router_service.stages.gating import route


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("family", BUILTIN_VARIANTS)
def test_route_matches_transformers_gate(family, tokens, dtype, tiny_model_dir):
    d = tiny_model_dir(family)
    spec = spec_from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    for layer in spec.moe_layers:
        gate = model.model.layers[layer].mlp.gate
        x = torch.randn(tokens, spec.hidden_size).to(dtype)
        with torch.no_grad():
            _, ref_w, ref_ids = gate(x)
            got = route(spec.gating, x, gate.weight, getattr(gate, "e_score_correction_bias", None))
        assert got.ids.dtype == torch.int32 and got.weights.dtype == torch.float32
        assert got.ids.shape == (tokens, spec.top_k)
        # transformers asks topk for unsorted output in some families; compare per token, aligned by id.
        ref_sorted, order = ref_ids.long().sort(-1)
        got_sorted, got_order = got.ids.long().sort(-1)
        assert torch.equal(got_sorted, ref_sorted)
        torch.testing.assert_close(
            got.weights.gather(1, got_order), ref_w.float().gather(1, order), rtol=0, atol=1e-6
        )


def test_group_selection_restricts_experts():
    """V3: with topk_group=1 every token's experts come from one group, the one with best top-2 sum."""
    from moe_models.spec import GatingSpec

    g = GatingSpec(
        num_experts=8,
        top_k=2,
        scoring="sigmoid",
        logits_in_fp32=True,
        group_rule="top2_sum",
        n_group=4,
        topk_group=1,
        has_correction_bias=True,
        norm_topk_prob=True,
        routed_scaling_factor=2.0,
    )
    weight = torch.eye(8)
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 4.0], [3.0, 3.0, 0, 0, 0, 0, 0, 6.0]])
    r = route(g, x, weight, torch.zeros(8))
    assert sorted(r.ids[0].tolist()) == [6, 7]
    # token 1: group 0 (3+3 after sigmoid ~ 1.90) beats group 3 (sigmoid(6)+sigmoid(0) ~ 1.50)
    assert sorted(r.ids[1].tolist()) == [0, 1]
    torch.testing.assert_close(r.weights.sum(-1), torch.full((2,), 2.0))
