"""Workers read only their own expert tensors; the router reads none; loading keeps one copy."""

import subprocess
import sys
import textwrap

import pytest
import torch

from expert_workers.kernels import has_onednn
from expert_workers.worker import ExpertWorker
from moe_models.checkpoint import Checkpoint
from moe_models.loading import spec_from_pretrained
from router_service import Engine


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "mixtral"])
@pytest.mark.parametrize("sharded", [False, True])
def test_worker_reads_exactly_its_experts(family, sharded, tiny_model_dir, tmp_path):
    from tiny_models import make_tiny_model

    d = make_tiny_model(family, tmp_path / "m", max_shard_size="20KB") if sharded else tiny_model_dir(family)
    from moe_models.expert_layout import find_expert_layout, shared_keys

    spec = spec_from_pretrained(d)
    mine = {layer: [1, 4, 5] for layer in spec.moe_layers}
    worker = ExpertWorker(0, str(d), mine, spec=spec, kernel="loop")  # plain stacks, inspectable
    ck = Checkpoint(d)
    expected = {
        k
        for layer, ids in mine.items()
        for e in ids
        for k in find_expert_layout(ck, spec, layer).expert_keys(e)
    }
    if spec.shared_intermediate_size:
        expected |= {k for layer in spec.moe_layers for k in shared_keys(ck, spec, layer)}
    assert sorted(worker.checkpoint.keys_read) == sorted(expected)
    # and what it holds is exactly those tensors, stacked as w13 = [gate; up], w2 = down
    layer = spec.moe_layers[0]
    gate_k, up_k, down_k = find_expert_layout(ck, spec, layer).expert_keys(4)
    ref = dict(Checkpoint(d).iter_tensors([gate_k, up_k, down_k]))
    lx = worker.layers[layer]
    inter = spec.moe_intermediate_size
    assert torch.equal(lx.w13[1, :inter], ref[gate_k]) and torch.equal(lx.w13[1, inter:], ref[up_k])
    assert torch.equal(lx.w2[1], ref[down_k])


@pytest.mark.parametrize(
    "family, kind",
    [
        ("olmoe", "per_expert"),  # gate_proj / up_proj / down_proj
        ("deepseek_v4", "per_expert"),  # w1 / w3 / w2 under `ffn`, shared experts too
        ("gpt_oss", "fused"),  # [E, H, 2I] interleaved, with biases
        ("llama4_text", "fused"),  # [E, H, 2I] under `feed_forward`, shared expert
        ("granitemoe", "linear_io"),  # input_linear / output_linear under `block_sparse_moe`
    ],
)
@pytest.mark.parametrize("sharded", [False, True])
def test_block_family_worker_reads_exactly_its_experts(family, kind, sharded, tiny_model_dir, tmp_path):
    """Each published layout: a worker reads its own experts' tensors (fused ones row by row) and the
    shared experts, nothing else; the router reads no expert tensor."""
    from tiny_models import make_tiny_model

    from moe_models.expert_layout import find_expert_layout, shared_keys

    d = make_tiny_model(family, tmp_path / "m", max_shard_size="20KB") if sharded else tiny_model_dir(family)
    spec = spec_from_pretrained(d)
    mine = {layer: [1, 4, 5] for layer in spec.moe_layers}
    worker = ExpertWorker(0, str(d), mine, spec=spec, kernel="loop")
    ck = Checkpoint(d)
    expected = set()
    for layer, ids in mine.items():
        lay = find_expert_layout(ck, spec, layer)
        assert lay.kind == kind
        for e in ids:
            keys = lay.expert_keys(e)
            if kind != "per_expert":
                keys = [f"{k}[{e}]" for k in keys]
                if spec.expert_fn.bias:
                    keys += [f"{k.removesuffix(f'[{e}]')}_bias[{e}]" for k in keys]
            expected |= set(keys)
        if spec.shared_intermediate_size:
            expected |= set(shared_keys(ck, spec, layer))
    assert sorted(worker.checkpoint.keys_read) == sorted(expected)
    with Engine.from_pretrained(d, num_workers=2) as engine:
        names = engine.router.model.state_dict()
        assert not any(".experts." in n or n.endswith(("gate_up_proj", "down_proj")) for n in names)
        assert not any(n.split(".")[-2] in ("input_linear", "output_linear") for n in names)
        if spec.shared_module_path:
            assert not any(f".{spec.shared_module_path}." in n for n in names)


def test_router_holds_no_expert_weight_and_workers_split_them(tiny_model_dir, monkeypatch):
    d = tiny_model_dir("deepseek_v3")
    spec = spec_from_pretrained(d)
    reads: list[str] = []
    original = Checkpoint.iter_tensors

    def recording(self, keys):
        for key, t in original(self, keys):
            reads.append(key)
            yield key, t

    monkeypatch.setattr(Checkpoint, "iter_tensors", recording)
    with Engine.from_pretrained(d, num_workers=3) as engine:
        routed = [k for k in reads if ".experts." in k]
        assert sorted(routed) == sorted(set(routed)), "an expert tensor was read twice"
        assert len(routed) == len(spec.moe_layers) * spec.num_experts * 3
        assert not any(".experts." in name for name in engine.router.model.state_dict())
        assert not any("shared_experts" in name for name in engine.router.model.state_dict())
        state = engine.cluster_state()
        per_worker = [w["param_bytes"] for w in state["workers"]]
        assert len(per_worker) == 3 and min(per_worker) > 0
        held = sorted(e for w in state["workers"] for ids in w["experts"].values() for e in ids)
        assert held == sorted(list(range(spec.num_experts)) * len(spec.moe_layers))


@pytest.mark.parametrize("kernel", ["loop", "onednn"])
def test_peak_memory_while_loading_stays_near_final_size(tmp_path, kernel):
    """Stacking (or packing) experts must not hold a second copy nor leave freed copies scattered in
    the heap (checked in a fresh process via VmHWM)."""
    if kernel == "onednn" and not has_onednn():
        pytest.skip("no oneDNN")
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    cfg = DeepseekV2Config(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=256,
        moe_intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=64,
        num_experts_per_tok=4,
        n_shared_experts=1,
        first_k_dense_replace=0,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    # ru_maxrss is inherited from the parent process, so the child resets its own high-water mark
    # (VmHWM) through /proc/self/clear_refs and reads it back.
    code = textwrap.dedent(
        f"""
        from expert_workers.worker import ExpertWorker
        from moe_models.loading import spec_from_pretrained
        spec = spec_from_pretrained({str(tmp_path)!r})
        status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
        open("/proc/self/clear_refs", "w").write("5")
        base = status("VmRSS")
        w = ExpertWorker(0, {str(tmp_path)!r}, {{0: list(range(64)), 1: list(range(64))}}, spec=spec, kernel={kernel!r})
        print(w.nbytes, status("VmHWM") - base)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    final, peak = map(int, out.split())
    assert final > 200e6
    # oneDNN's runtime takes ~10 MB the first time it packs a weight; mmap reading peaked at 1.5x,
    # packing experts allocated up front 1.25x.
    assert peak < final * 1.1 + (32 << 20), (
        f"peak RSS grew {peak / 1e6:.0f} MB to hold {final / 1e6:.0f} MB of experts"
    )


def test_fused_expert_layout_is_read_row_by_row(tiny_model_dir, tmp_path):
    """Checkpoints saved in transformers' fused layout (experts.gate_up_proj [E, 2I, H]) work too."""
    import shutil

    from safetensors.torch import save_file

    from moe_models.expert_layout import ExpertLayout, find_expert_layout

    src = tiny_model_dir("deepseek_v3")
    spec = spec_from_pretrained(src)
    ck = Checkpoint(src)
    tensors = dict(ck.iter_tensors(list(ck.keys())))
    fused_layouts = {}
    for layer in spec.moe_layers:
        per_expert = find_expert_layout(ck, spec, layer)
        trios = [per_expert.expert_keys(e) for e in range(spec.num_experts)]
        gate_up = torch.stack([torch.cat([tensors.pop(g), tensors.pop(u)]) for g, u, _ in trios])
        down = torch.stack([tensors.pop(d) for _, _, d in trios])
        fused_layouts[layer] = ExpertLayout("fused", per_expert.prefix)
        fused_gu, fused_down = fused_layouts[layer].expert_keys(0)
        tensors[fused_gu], tensors[fused_down] = gate_up.contiguous(), down.contiguous()
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(tensors, str(fused / "model.safetensors"))
    shutil.copy(src / "config.json", fused / "config.json")

    worker = ExpertWorker(0, str(fused), {spec.moe_layers[0]: [2, 9]}, spec=spec)
    gu, dn = fused_layouts[spec.moe_layers[0]].expert_keys(0)
    routed = [k for k in worker.checkpoint.keys_read if ".experts." in k]
    assert sorted(routed) == [f"{dn}[2]", f"{dn}[9]", f"{gu}[2]", f"{gu}[9]"]

    ids = torch.randint(3, 90, (2, 7))
    with Engine.from_pretrained(fused, num_workers=3) as a, Engine.from_pretrained(src, num_workers=3) as b:
        assert torch.equal(a.forward(ids), b.forward(ids))
