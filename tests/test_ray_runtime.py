"""The "ray" transport: Router and ExpertWorker actors give exactly the local engine's outputs."""

import time

import pytest
import ray
import torch
from conftest import rel_err
from tiny_models import RAY_CASES, VOCAB
from transformers import AutoModelForCausalLM

from moe_models.loading import spec_from_pretrained
from router_service import Engine
from router_service.errors import WorkerError
from router_service.runtime.local_ray import start_local_ray

# Transports agree bit for bit at equal torch thread counts; their defaults differ (Ray
# transports divide the cores among the workers), so the comparisons fix it.
THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    start_local_ray(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def padded_batch():
    ids = torch.randint(3, VOCAB, (3, 6))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family, num_workers", RAY_CASES)
def test_ray_transport_equals_local_and_transformers(family, num_workers, tiny_model_dir):
    d = tiny_model_dir(family)
    ids, mask = padded_batch()
    h = torch.randn(7, 32)
    with Engine.from_pretrained(d, num_workers=num_workers, num_threads=THREADS) as local:
        exp_logits = local.forward(ids, attention_mask=mask)
        layer = local.spec.moe_layers[-1]
        exp_moe = local.moe_forward(layer, h)
        exp_gen = local.generate(ids, max_new_tokens=4, attention_mask=mask)
    with Engine.from_pretrained(d, num_workers=num_workers, transport="ray", num_threads=THREADS) as engine:
        logits = engine.forward(ids, attention_mask=mask)
        assert torch.equal(logits, exp_logits), "ray transport is not bit-identical to local"
        assert torch.equal(engine.moe_forward(layer, h), exp_moe)
        assert torch.equal(engine.generate(ids, max_new_tokens=4, attention_mask=mask), exp_gen)
    ref = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        assert rel_err(logits, ref(ids, attention_mask=mask).logits) < 1e-5


def test_cluster_state_reports_slices_bytes_and_load(tiny_model_dir):
    d = tiny_model_dir("deepseek_v3")
    spec = spec_from_pretrained(d)
    with Engine.from_pretrained(d, num_workers=3, transport="ray") as engine:
        ids = torch.randint(3, VOCAB, (2, 5))
        engine.forward(ids)
        state = engine.cluster_state()
    workers = state["workers"]
    assert [w["worker_id"] for w in workers] == [0, 1, 2]
    assert all(w["node_id"] and w["device"] == "cpu" for w in workers)
    held = sorted(e for w in workers for e in w["experts"][spec.moe_layers[0]])
    assert held == list(range(spec.num_experts))
    # each worker: its share of the routed experts plus one replica of the shared experts
    h, i, si = spec.hidden_size, spec.moe_intermediate_size, spec.shared_intermediate_size
    per_expert, shared = 3 * h * i * 4, 3 * h * si * 4
    for w in workers:
        n_routed = sum(len(ids) for ids in w["experts"].values())
        assert w["param_bytes"] == n_routed * per_expert + len(spec.moe_layers) * shared
    # expert load: every token's k choices counted once per MoE layer
    for layer in spec.moe_layers:
        assert sum(state["expert_load"]["tokens"][layer]) == ids.numel() * spec.top_k
        assert state["expert_load"]["batches_seen"][layer] == 1


def worker_hooks():
    """(on_worker, stash, restore), defined in a function so that Ray pickles them by value (the
    actors cannot import this test module)."""

    def on_worker(router, worker, fn):
        return ray.get(router.dispatcher.transport._actors[worker].__ray_call__.remote(fn))

    def stash(w):  # the worker now raises inside forward for layer 2
        w.stash = w.layers.pop(2)

    def restore(w):
        w.layers[2] = w.stash

    # (w.layers is the latest layout's dict of layers: popping from it changes what forward sees)

    return on_worker, stash, restore


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """One "ray" engine for the tests below that leave it as they found it (each cluster start
    costs ~14 s of process start-up on 2 cores)."""
    with Engine.from_pretrained(tiny_model_dir("deepseek_v3"), num_workers=2, transport="ray") as engine:
        yield engine


def test_worker_error_names_worker_and_layer_and_engine_recovers(engine):
    ids = torch.randint(3, VOCAB, (2, 16))
    expected = engine.forward(ids)
    on_worker, stash, restore = worker_hooks()
    ray.get(engine._router.__ray_call__.remote(on_worker, 1, stash))
    with pytest.raises(WorkerError, match="expert worker 1 failed in MoE layer 2"):
        engine.forward(ids)
    ray.get(engine._router.__ray_call__.remote(on_worker, 1, restore))
    assert torch.equal(engine.forward(ids), expected)


def test_generate_stream_over_ray_streams_cancels_and_reports_worker_errors(engine):
    prompt = [3, 4, 5, 6]
    want = engine.generate(torch.tensor([prompt]), 6)[0, 4:].tolist()
    chunks = list(engine.generate_stream(prompt, 6))
    assert [t for c in chunks for t in c["token_ids"]] == want
    assert chunks[-1]["finish_reason"] == "length"
    assert all(c["finish_reason"] is None for c in chunks[:-1])

    stream = engine.generate_stream(prompt, 300)
    next(stream)
    stream.close()  # the caller leaves: the router drops the sequence
    for _ in range(100):
        if engine.cluster_state()["generation"]["running"] == 0:
            break
        time.sleep(0.1)
    assert engine.cluster_state()["generation"]["running"] == 0

    on_worker, stash, restore = worker_hooks()
    ray.get(engine._router.__ray_call__.remote(on_worker, 1, stash))
    with pytest.raises(WorkerError, match="expert worker 1 failed in MoE layer 2"):
        list(engine.generate_stream(prompt, 4))
    ray.get(engine._router.__ray_call__.remote(on_worker, 1, restore))
    assert [t for c in engine.generate_stream(prompt, 6) for t in c["token_ids"]] == want


def test_bad_input_over_ray_is_a_plain_value_error(engine):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.forward(torch.tensor([[1, VOCAB + 5]]))
    with pytest.raises(ValueError, match="not a MoE layer"):
        engine.moe_forward(0, torch.randn(2, 32))
    assert engine.forward(torch.tensor([[3, 4]])).shape == (1, 2, VOCAB)


@pytest.mark.parametrize(
    "resources, match",
    [
        ({"num_cpus": 64}, r"needing \{'CPU': 64"),
        ({"num_gpus": 1}, r"needing \{'CPU': 1.0, 'GPU': 1\}; the nodes have: [\d.]+: CPU 4"),
        ({"resources": {"expert_node": 1}}, r"needing \{'CPU': 1.0, 'expert_node': 1\}"),
    ],
)
def test_workers_no_node_can_run_fail_fast_naming_what_the_cluster_has(tiny_model_dir, resources, match):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="no node of the Ray cluster can run an expert worker " + match):
        Engine.from_pretrained(
            tiny_model_dir("mixtral"), num_workers=2, transport="ray", worker_resources=resources
        )
    assert time.monotonic() - t0 < 60, "fails fast, not after a placement timeout"
