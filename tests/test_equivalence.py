"""The served model equals transformers: forward, moe_forward and greedy generate, every family."""

import pytest
import torch
from conftest import rel_err
from tiny_models import FAMILIES, VOCAB
from transformers import AutoModelForCausalLM

from router_service import Engine

FP32_TOL = 1e-5
BF16_TOL = 2e-2


def reference(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def moe_block(model, spec, layer):
    return getattr(model.model.layers[layer], spec.moe_module_path)


def ref_moe(ref, layer, h, spec):
    """transformers' MoE block on [T, H] or [B, S, H] (blocks want 3-D input; some return a tuple)."""
    out = moe_block(ref, spec, layer)(h.reshape(1, -1, h.shape[-1]))
    return (out[0] if isinstance(out, tuple) else out).reshape(h.shape)


def chosen_experts(block, x: torch.Tensor) -> torch.Tensor:
    """The reference block's expert choice for tokens x [T, H]: sorted ids [T, K], read where the
    block hands them to its experts (Llama 4: from its router's top-k)."""
    captured = {}
    if type(block).__name__ == "Llama4TextMoe":
        hook = block.router.register_forward_hook(
            lambda mod, inp, out: captured.__setitem__("ids", out[1].topk(mod.top_k, dim=1).indices)
        )
    else:
        hook = block.experts.register_forward_pre_hook(lambda mod, args: captured.__setitem__("ids", args[1]))
    with torch.no_grad():
        block(x.reshape(1, -1, x.shape[-1]))
    hook.remove()
    return captured["ids"].reshape(x.shape[0], -1).sort(-1).values


def padded_batch():
    """Left-padded batch of three prompts of lengths 7, 4 and 1 (pad id 0)."""
    ids = torch.randint(3, VOCAB, (3, 7))
    mask = torch.ones_like(ids)
    for row, length in enumerate((7, 4, 1)):
        ids[row, : 7 - length] = 0
        mask[row, : 7 - length] = 0
    return ids, mask


@pytest.mark.parametrize("num_workers", [1, 2, 3, 5])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_fp32(family, num_workers, tiny_model_dir):
    d = tiny_model_dir(family)
    ref = reference(d)
    ids = torch.randint(3, VOCAB, (2, 9))
    pids, mask = padded_batch()
    with Engine.from_pretrained(d, num_workers=num_workers) as engine, torch.no_grad():
        assert rel_err(engine.forward(ids), ref(ids).logits) < FP32_TOL
        out = engine.forward(pids, attention_mask=mask)
        exp = ref(pids, attention_mask=mask).logits
        assert out.dtype == torch.float32 and out.shape == exp.shape
        assert rel_err(out, exp) < FP32_TOL
        for layer in engine.spec.moe_layers:
            if getattr(moe_block(ref, engine.spec, layer), "is_hash", False):  # DeepSeek-V4
                with pytest.raises(ValueError, match="routes by token id"):
                    engine.moe_forward(layer, torch.randn(3, 32))
                continue
            for shape in [(1, 32), (13, 32), (2, 5, 32)]:
                h = torch.randn(shape)
                assert rel_err(engine.moe_forward(layer, h), ref_moe(ref, layer, h, engine.spec)) < FP32_TOL


def routing_margin_ok(ref, spec, ids, mask, trials=6, noise=8e-3) -> bool:
    """True when no real token's expert choice flips under noise at any MoE layer input.

    bf16 serving and the bf16 reference round differently (we accumulate experts in fp32), so a token
    whose top-k sits within rounding of a tie may pick another expert in either; comparing logits is
    only meaningful on inputs away from such ties.
    """
    captured = {}
    hooks = [
        moe_block(ref, spec, layer).register_forward_hook(
            lambda mod, inp, out, layer=layer: captured.__setitem__(
                layer, inp[0].reshape(-1, inp[0].shape[-1])
            )
        )
        for layer in spec.moe_layers
    ]
    with torch.no_grad():
        ref(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    real = mask.reshape(-1).bool()
    gen = torch.Generator().manual_seed(1)
    for layer, x in captured.items():
        block = moe_block(ref, spec, layer)
        if getattr(block, "is_hash", False):  # experts chosen by token id: no tie to fall into
            continue
        base = chosen_experts(block, x)[real]
        for _ in range(trials):
            xn = x.float() * (1 + noise * torch.randn(x.shape, generator=gen))
            if not torch.equal(chosen_experts(block, xn.to(x.dtype))[real], base):
                return False
    return True


def routing_agrees(engine, ref, spec, ids, mask) -> bool:
    """True when the (local) engine picks, at every MoE layer, the experts the reference picks for
    every real token. Noise around the reference's inputs cannot stand for all the ways the two
    bf16 computations round apart (gpt-oss, LongCat and the linear-attention Qwens had near-ties it
    missed), so this looks at both choices themselves; a bug in a gate disagrees on every batch."""
    ours, theirs = {}, {}
    dispatcher = engine.router.dispatcher
    dispatch = dispatcher.dispatch

    def recording(layer, x, routing, *args):
        ours[layer] = routing.ids.long().sort(-1).values
        return dispatch(layer, x, routing, *args)

    hooks = []
    for layer in spec.moe_layers:
        block = moe_block(ref, spec, layer)
        if type(block).__name__ == "Llama4TextMoe":
            hooks.append(
                block.router.register_forward_hook(
                    lambda mod, inp, out, layer=layer: theirs.__setitem__(
                        layer, out[1].topk(mod.top_k, dim=1).indices
                    )
                )
            )
        else:
            hooks.append(
                block.experts.register_forward_pre_hook(
                    lambda mod, args, layer=layer: theirs.__setitem__(layer, args[1])
                )
            )
    dispatcher.dispatch = recording
    try:
        with torch.no_grad():
            engine.forward(ids, attention_mask=mask)
            ref(ids, attention_mask=mask)
    finally:
        del dispatcher.dispatch
        for h in hooks:
            h.remove()
    real = mask.reshape(-1).bool()
    return all(
        torch.equal(ours[layer][real], theirs[layer].reshape(real.shape[0], -1).long().sort(-1).values[real])
        for layer in spec.moe_layers
    )


def tie_free_batch(ref, spec, padded: bool, engine=None):
    """The first seeded batch whose routing is not within bf16 rounding of a tie (and, with a local
    `engine`, on which it routes every token as the reference does)."""
    for _ in range(20):
        if padded:
            ids, mask = padded_batch()
        else:
            ids = torch.randint(3, VOCAB, (2, 6))
            mask = torch.ones_like(ids)
        if routing_margin_ok(ref, spec, ids, mask) and (
            engine is None or routing_agrees(engine, ref, spec, ids, mask)
        ):
            return ids, mask
    pytest.fail("no tie-free input batch found in 20 tries")


def tie_free_hidden(block, shape, trials=6, noise=8e-3) -> torch.Tensor:
    """Random bf16 hidden states whose expert choice in the bf16 `block` does not flip under noise
    far above what another summation order (thread count, kernel) changes in its router."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        x = torch.randn(shape).bfloat16()
        base = chosen_experts(block, x)
        noisy = (x.float() * (1 + noise * torch.randn(shape, generator=gen)) for _ in range(trials))
        if all(torch.equal(chosen_experts(block, xn.bfloat16()), base) for xn in noisy):
            return x
    pytest.fail("no tie-free hidden states found in 20 tries")


@pytest.mark.parametrize("num_workers", [1, 2, 3, 5])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_bf16(family, num_workers, tiny_model_dir):
    d = tiny_model_dir(family)
    ref = reference(d, torch.bfloat16)
    with Engine.from_pretrained(d, num_workers=num_workers, dtype="bfloat16") as engine, torch.no_grad():
        for padded in (False, True):
            # ties judged on the bf16 reference: its hidden states are what our router's gates see,
            # up to the last bits of the experts' sums (we accumulate them in fp32)
            ids, mask = tie_free_batch(ref, engine.spec, padded, engine)
            out = engine.forward(ids, attention_mask=mask if padded else None)
            assert out.dtype == torch.float32
            real = mask.bool()  # logits at padding positions mean nothing
            exp = ref(ids, attention_mask=mask if padded else None).logits.float()
            assert rel_err(out[real], exp[real]) < BF16_TOL
        layer = engine.spec.moe_layers[-1]
        h = tie_free_hidden(moe_block(ref, engine.spec, layer), (11, 32))
        got = engine.moe_forward(layer, h)
        assert got.dtype == torch.bfloat16
        assert rel_err(got, ref_moe(ref, layer, h, engine.spec)) < BF16_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers(family, tiny_model_dir):
    d = tiny_model_dir(family)
    ref = reference(d)
    pids, mask = padded_batch()
    with Engine.from_pretrained(d, num_workers=3) as engine:
        got = engine.generate(pids, max_new_tokens=6, attention_mask=mask)
        exp = ref.generate(pids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, exp)
        one = torch.randint(3, VOCAB, (1, 5))
        exp1 = ref.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=5, do_sample=False)
        assert torch.equal(engine.generate(one, max_new_tokens=5), exp1)


def test_sampling_is_seeded(tiny_model_dir):
    d = tiny_model_dir("deepseek_v3")
    ids = torch.randint(3, VOCAB, (2, 4))
    with Engine.from_pretrained(d, num_workers=2) as engine:
        a = engine.generate(ids, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
        b = engine.generate(ids, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
        assert torch.equal(a, b)
        assert a.shape[1] <= ids.shape[1] + 8 and torch.equal(a[:, :4], ids)


def test_sharded_checkpoint_equals_single_file(tiny_model_dir, tmp_path):
    from tiny_models import make_tiny_model

    sharded = make_tiny_model("qwen2_moe", tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = torch.randint(3, VOCAB, (2, 6))
    with (
        Engine.from_pretrained(sharded, num_workers=2) as a,
        Engine.from_pretrained(tiny_model_dir("qwen2_moe"), num_workers=2) as b,
    ):
        assert torch.equal(a.forward(ids), b.forward(ids))


@pytest.mark.parametrize(
    "kernel, dtype",
    [
        ("loop", "float32"),
        ("grouped_mm", "float32"),
        ("onednn", "float32"),
        ("onednn", "bfloat16"),
        ("upcast", "bfloat16"),
    ],
)
def test_every_expert_kernel_serves_the_same_model(kernel, dtype, tiny_model_dir):
    """Each compute path, forced through the Engine, still equals transformers."""
    d = tiny_model_dir("qwen2_moe")
    torch_dtype = getattr(torch, dtype)
    ref = reference(d, torch_dtype)
    ids = torch.randint(3, VOCAB, (2, 6))
    with (
        Engine.from_pretrained(d, num_workers=3, dtype=dtype, expert_kernel=kernel) as engine,
        torch.no_grad(),
    ):
        assert {w["kernel"] for w in engine.cluster_state()["workers"]} == {kernel}
        layer = engine.spec.moe_layers[0]
        h = torch.randn(9, 32).to(torch_dtype)
        tol = FP32_TOL if dtype == "float32" else BF16_TOL
        assert rel_err(engine.moe_forward(layer, h), ref_moe(ref, layer, h, engine.spec)) < tol
        if dtype == "float32":
            assert rel_err(engine.forward(ids), ref(ids).logits) < FP32_TOL
