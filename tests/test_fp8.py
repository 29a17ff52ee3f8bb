"""FP8 block-quantized checkpoints (DeepSeek-V3 / Kimi-K2 layout) are served exactly.

The tests build a tiny deepseek_v3 model whose hidden size (160) and several projection sizes exceed
one 128-wide block, so whole, partial-row, partial-column and partial-corner blocks all occur; they
quantize its linear weights to float8_e4m3fn with 128x128 block scales the way DeepSeek does
(scale = amax / 448, stored as `weight_scale_inv`), and write a second, plain fp32 checkpoint with the
same weights dequantized (by a block loop independent of the code under test). transformers runs the
plain one; the engine serves the FP8 one.
"""

import json
import math
import shutil

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file
from test_equivalence import tie_free_batch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM, DeepseekV3Config

from expert_workers.worker import ExpertWorker
from moe_models.checkpoint import Checkpoint, CheckpointError
from moe_models.expert_layout import ExpertLayout, find_expert_layout, shared_keys
from moe_models.loading import spec_from_pretrained
from moe_models.quantization import dequantize_fp8_blocks, quantize_fp8_blocks
from moe_models.spec import ConfigError
from router_service import Engine

FP32_TOL = 1e-5
BF16_TOL = 2e-2
HIDDEN = 160  # > 128: every projection of H has a full and a partial block
QUANT = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
SCALES_FILE = "model-00002-of-00002.safetensors"


def tiny_config() -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        q_lora_rank=136,  # q_a_proj [136, 160]: partial blocks in both dims
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        intermediate_size=200,  # the dense layer's MLP
        # one whole block of rows: per-expert gate/up scales stack into fused gate_up scales exactly
        moe_intermediate_size=128,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )


def is_quantized_in_published_checkpoints(key: str, t: torch.Tensor) -> bool:
    """DeepSeek-V3's layout: every linear weight is FP8; embeddings, norms, the gate and lm_head not."""
    return (
        t.dim() == 2
        and key.endswith(".weight")
        and "embed_tokens" not in key
        and not key.startswith("lm_head")
        and not key.endswith(".mlp.gate.weight")
    )


def loop_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """Reference dequantization, one block at a time."""
    out = q.float().clone()
    br, bc = block
    for i in range(scale_inv.shape[-2]):
        for j in range(scale_inv.shape[-1]):
            out[..., i * br : (i + 1) * br, j * bc : (j + 1) * bc] *= scale_inv[..., i, j, None, None]
    return out


def write_checkpoint(outdir, tensors, config: dict, src, scales_apart: bool = False):
    """Save `tensors` with `config`; with `scales_apart` every *_scale_inv goes to a second shard."""
    outdir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if scales_apart:
        scales = {k: v for k, v in tensors.items() if k.endswith("_scale_inv")}
        weights = {k: v for k, v in tensors.items() if k not in scales}
        first = "model-00001-of-00002.safetensors"
        save_file(weights, str(outdir / first), metadata=meta)
        save_file(scales, str(outdir / SCALES_FILE), metadata=meta)
        index = {
            "metadata": {},
            "weight_map": {**dict.fromkeys(weights, first), **dict.fromkeys(scales, SCALES_FILE)},
        }
        (outdir / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(tensors, str(outdir / "model.safetensors"), metadata=meta)
    (outdir / "config.json").write_text(json.dumps(config, indent=1))
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", outdir / "generation_config.json")
    return outdir


def make_fp8_pair(root, scales_apart: bool = False):
    """(FP8 checkpoint, the same weights dequantized to a plain fp32 checkpoint)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    with torch.no_grad():  # as tiny_models does: gate spread so routing is not near ties
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.1, 0.1)
    src = root / "src"
    model.save_pretrained(src)
    plain = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    fp8, ref = {}, {}
    for key, t in plain.items():
        if is_quantized_in_published_checkpoints(key, t):
            q, scale_inv = quantize_fp8_blocks(t)
            fp8[key], fp8[key + "_scale_inv"] = q, scale_inv
            ref[key] = loop_dequantize(q, scale_inv)
        else:
            fp8[key] = ref[key] = t
    fp8_dir = write_checkpoint(root / "fp8", fp8, {**config, "quantization_config": QUANT}, src, scales_apart)
    ref_dir = write_checkpoint(root / "ref", ref, config, src)
    return fp8_dir, ref_dir


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    return make_fp8_pair(tmp_path_factory.mktemp("fp8"))


def reference(d, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()


# ---- dequantization itself ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(128, 128), (160, 16), (16, 160), (200, 160), (3, 256, 300), (1, 1)])
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_dequantize_equals_a_block_loop(shape, block):
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])  # blocks of very different ranges
    q, scale_inv = quantize_fp8_blocks(w, block)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    grid = (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    assert tuple(scale_inv.shape) == grid
    got = dequantize_fp8_blocks(q, scale_inv, block)
    assert torch.equal(got, loop_dequantize(q, scale_inv, block))
    # e4m3 keeps 3 mantissa bits: each element within 2^-4 of its own magnitude, or of the block's
    # smallest normal where it underflows
    assert ((got - w).abs() <= w.abs() / 16 + scale_inv.max() * 2**-6).all()


def test_power_of_two_scales_stored_as_e8m0_bytes():
    """ue8m0 scale format (DeepSeek-V3.1/V3.2): the same scales as float8_e8m0fnu or raw uint8 bytes."""
    q, _ = quantize_fp8_blocks(torch.randn(200, 160))
    scale = torch.exp2(torch.randint(-10, 3, (2, 2)).float())
    expected = loop_dequantize(q, scale)
    assert torch.equal(dequantize_fp8_blocks(q, scale.to(torch.float8_e8m0fnu)), expected)
    as_bytes = scale.to(torch.float8_e8m0fnu).view(torch.uint8)
    assert torch.equal(dequantize_fp8_blocks(q, as_bytes), expected)


def test_wrong_scale_grid_is_refused():
    q, scale_inv = quantize_fp8_blocks(torch.randn(200, 160))
    with pytest.raises(ValueError, match=r"block scales have shape \(2, 1\), expected \(2, 2\)"):
        dequantize_fp8_blocks(q, scale_inv[:, :1])


# ---- config: what is refused, and when ----------------------------------------------------------


@pytest.mark.parametrize(
    "qc, named",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "'gptq'"),
        ({"quant_method": "awq", "bits": 4}, "'awq'"),
        ({"quant_method": "mxfp4"}, "'mxfp4'"),
        ({"quant_method": "compressed-tensors"}, "'compressed-tensors'"),
        ({**QUANT, "fmt": "e5m2"}, "fmt='e5m2'"),
        ({**QUANT, "weight_block_size": None}, "weight_block_size=None"),
        ({**QUANT, "weight_block_size": [128]}, "weight_block_size=[128]"),
        ({**QUANT, "activation_scheme": "static"}, "activation_scheme='static'"),
        ({**QUANT, "expert_dtype": "fp4"}, "expert_dtype='fp4'"),
    ],
)
def test_unreadable_quantization_is_refused_before_any_weight(qc, named, tmp_path):
    # a config with no weight file at all: the refusal must come from the config, not from reading
    config = tiny_config().to_dict()
    config["quantization_config"] = qc
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("(", r"\(")):
        spec_from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not supported"):
        Engine.from_pretrained(tmp_path, num_workers=1)


def test_fp8_tensor_without_scales_is_refused(fp8_pair, tmp_path):
    """FP8 bytes in a checkpoint whose config declares no quantization must not read as numbers."""
    fp8_dir, _ = fp8_pair
    plain = tmp_path / "noquant"
    shutil.copytree(fp8_dir, plain)
    config = json.loads((plain / "config.json").read_text())
    del config["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))
    key = "model.layers.0.self_attn.o_proj.weight"
    with pytest.raises(
        CheckpointError, match=rf"{key} is stored as torch.float8_e4m3fn without block scales"
    ):
        dict(Checkpoint(plain).iter_tensors([key]))


# ---- serving: equal to transformers on the dequantized checkpoint -------------------------------


def test_checkpoint_reads_dequantized_weights_and_their_scales(fp8_pair):
    fp8_dir, ref_dir = fp8_pair
    ck, ref = Checkpoint(fp8_dir), Checkpoint(ref_dir)
    keys = [
        "model.embed_tokens.weight",  # unquantized: as stored
        "model.layers.0.mlp.gate_proj.weight",  # [200, 160]
        "model.layers.1.mlp.gate.weight",  # the router gate: unquantized
        "model.layers.1.self_attn.q_a_proj.weight",
    ]
    got, exp = dict(ck.iter_tensors(keys)), dict(ref.iter_tensors(keys))
    for k in keys:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], exp[k]), k
    assert ck.keys_read == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.gate_proj.weight_scale_inv",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.self_attn.q_a_proj.weight",
        "model.layers.1.self_attn.q_a_proj.weight_scale_inv",
    ]


def test_fp8_forward_fp32_equals_transformers(fp8_pair):
    fp8_dir, ref_dir = fp8_pair
    ref = reference(ref_dir)
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = mask[2, :6] = 0
    pids = torch.randint(3, VOCAB, (3, 7)) * mask
    with Engine.from_pretrained(fp8_dir, num_workers=2, transport="local") as engine, torch.no_grad():
        assert rel_err(engine.forward(ids), ref(ids).logits) < FP32_TOL
        out, exp = engine.forward(pids, attention_mask=mask), ref(pids, attention_mask=mask).logits
        assert rel_err(out, exp) < FP32_TOL
        for layer in engine.spec.moe_layers:
            h = torch.randn(13, HIDDEN)
            exp_moe = ref.model.layers[layer].mlp(h[None])[0]
            assert rel_err(engine.moe_forward(layer, h), exp_moe) < FP32_TOL


def test_fp8_forward_bf16_equals_transformers(fp8_pair):
    fp8_dir, ref_dir = fp8_pair
    ref, ref32 = reference(ref_dir, torch.bfloat16), reference(ref_dir)
    with Engine.from_pretrained(fp8_dir, num_workers=2, dtype="bfloat16") as engine, torch.no_grad():
        for padded in (False, True):
            ids, mask = tie_free_batch(ref32, engine.spec, padded)
            am = mask if padded else None
            out = engine.forward(ids, attention_mask=am)
            exp = ref(ids, attention_mask=am).logits.float()
            real = mask.bool()
            assert rel_err(out[real], exp[real]) < BF16_TOL


def test_fp8_greedy_generate_token_for_token(fp8_pair):
    fp8_dir, ref_dir = fp8_pair
    ref = reference(ref_dir)
    ids = torch.randint(3, VOCAB, (2, 5))
    with Engine.from_pretrained(fp8_dir, num_workers=2) as engine:
        got = engine.generate(ids, max_new_tokens=6)
    exp = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(got, exp)


# ---- workers read only their own experts (and their scales) -------------------------------------


def test_worker_reads_only_its_experts_and_their_scales(tmp_path):
    """Scales in another shard than their weights, as in the published checkpoints' index."""
    fp8_dir, ref_dir = make_fp8_pair(tmp_path, scales_apart=True)
    assert (fp8_dir / SCALES_FILE).is_file()
    spec = spec_from_pretrained(fp8_dir)
    mine = {layer: [1, 4, 5] for layer in spec.moe_layers}
    worker = ExpertWorker(0, str(fp8_dir), mine, spec=spec, kernel="loop")
    ck = Checkpoint(ref_dir)  # the same names as the FP8 checkpoint, without the scales
    weights = {
        k
        for layer, ids in mine.items()
        for e in ids
        for k in find_expert_layout(ck, spec, layer).expert_keys(e)
    }
    weights |= {k for layer in spec.moe_layers for k in shared_keys(ck, spec, layer)}
    assert sorted(worker.checkpoint.keys_read) == sorted(weights | {k + "_scale_inv" for k in weights})
    assert all(t.dtype == torch.float32 for lx in worker.layers.values() for t in (lx.w13, lx.w2))
    layer, inter = spec.moe_layers[0], spec.moe_intermediate_size
    gate_k, up_k, down_k = find_expert_layout(ck, spec, layer).expert_keys(4)
    ref = dict(Checkpoint(ref_dir).iter_tensors([gate_k, up_k, down_k]))
    lx = worker.layers[layer]
    assert torch.equal(lx.w13[1, :inter], ref[gate_k]) and torch.equal(lx.w13[1, inter:], ref[up_k])
    assert torch.equal(lx.w2[1], ref[down_k])


def test_fused_fp8_expert_tensors_are_read_row_by_row(fp8_pair, tmp_path):
    """[E, 2I, H] FP8 tensors with [E, ceil(2I/128), ceil(H/128)] scales: a worker reads its rows of
    both, dequantized."""
    fp8_dir, ref_dir = fp8_pair
    spec = spec_from_pretrained(fp8_dir)
    tensors = load_file(str(fp8_dir / "model.safetensors"))
    ck = Checkpoint(ref_dir)  # the same names as the FP8 checkpoint, without the scales
    per_expert = {layer: find_expert_layout(ck, spec, layer) for layer in spec.moe_layers}
    for layer in spec.moe_layers:
        trios = [per_expert[layer].expert_keys(e) for e in range(spec.num_experts)]
        fused_gu, fused_down = ExpertLayout("fused", per_expert[layer].prefix).expert_keys(0)
        for fused, parts in (
            (fused_gu, [(g, u) for g, u, _ in trios]),
            (fused_down, [(d,) for _, _, d in trios]),
        ):
            for suffix in ("", "_scale_inv"):
                tensors[fused + suffix] = torch.stack(
                    [torch.cat([tensors.pop(k + suffix) for k in p]) for p in parts]
                )
    assert tensors[f"{fused_gu}_scale_inv"].shape == (16, 2, 2)  # 2I = 256 rows, H = 160 cols
    fused_dir = write_checkpoint(
        tmp_path / "fused", tensors, json.loads((fp8_dir / "config.json").read_text()), fp8_dir
    )

    layer = spec.moe_layers[0]
    worker = ExpertWorker(0, str(fused_dir), {layer: [2, 9]}, spec=spec, kernel="loop")
    gu, dn = ExpertLayout("fused", per_expert[layer].prefix).expert_keys(0)
    routed = sorted(k for k in worker.checkpoint.keys_read if ".experts." in k)
    assert routed == sorted(f"{k}{s}[{e}]" for k in (gu, dn) for s in ("", "_scale_inv") for e in (2, 9))
    gate_k, up_k, down_k = per_expert[layer].expert_keys(9)
    ref = dict(Checkpoint(ref_dir).iter_tensors([gate_k, up_k, down_k]))
    lx = worker.layers[layer]
    assert torch.equal(lx.w13[1], torch.cat([ref[gate_k], ref[up_k]])) and torch.equal(lx.w2[1], ref[down_k])

    ids = torch.randint(3, VOCAB, (2, 7))
    with (
        Engine.from_pretrained(fused_dir, num_workers=3) as a,
        Engine.from_pretrained(fp8_dir, num_workers=3) as b,
    ):
        assert torch.equal(a.forward(ids), b.forward(ids))


def test_fp8_over_ray_equals_local_and_transformers(fp8_pair):
    import ray

    from router_service.runtime.local_ray import start_local_ray

    fp8_dir, ref_dir = fp8_pair
    ids = torch.randint(3, VOCAB, (2, 6))
    with Engine.from_pretrained(fp8_dir, num_workers=2, num_threads=1) as local:
        exp = local.forward(ids)
    start_local_ray(num_cpus=4, include_dashboard=False)
    try:
        with Engine.from_pretrained(fp8_dir, num_workers=2, transport="ray", num_threads=1) as engine:
            got = engine.forward(ids)
    finally:
        ray.shutdown()
    assert torch.equal(got, exp), "ray transport is not bit-identical to local"
    with torch.no_grad():
        assert rel_err(got, reference(ref_dir)(ids).logits) < FP32_TOL
