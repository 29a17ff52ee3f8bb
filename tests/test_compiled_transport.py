"""The "compiled" transport (Ray Compiled Graphs) against "local": bit-identical, errors, big batches,
a lost worker."""

import os
import time

import pytest
import ray
import torch
from conftest import probe_batches, transport_probe_outputs
from tiny_models import COMPILED_CASES, VOCAB

from expert_workers.worker import ExpertBatch
from router_service import Engine
from router_service.errors import WorkerError
from router_service.runtime.local_ray import start_local_ray

# Transports agree bit for bit at equal torch thread counts; their defaults differ (Ray
# transports divide the cores among the workers), so the comparisons fix it.
THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # A layer that hangs fails in 90 s, not the default 10 minutes (the actors inherit this).
    os.environ["MOE_COMPILED_GET_TIMEOUT_S"] = "90"
    start_local_ray(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    del os.environ["MOE_COMPILED_GET_TIMEOUT_S"]


@pytest.mark.parametrize("family, num_workers", COMPILED_CASES)
def test_identical_to_local(family, num_workers, tiny_model_dir):
    d = tiny_model_dir(family)
    ids = torch.randint(3, VOCAB, (2, 9))
    # 13 rows, one token (decode) and a big prefill (the channels grow past their initial size)
    hs = probe_batches()

    def run(engine):
        return transport_probe_outputs(engine, ids, hs)

    with Engine.from_pretrained(d, num_workers=num_workers, num_threads=THREADS) as local:
        exp = run(local)
    with Engine.from_pretrained(
        d, num_workers=num_workers, transport="compiled", num_threads=THREADS
    ) as engine:
        assert in_router(engine, wait_graph), "the graph was not compiled"
        before = in_router(engine, graph_layers)
        got = run(engine)
        assert in_router(engine, graph_layers) > before, "layers did not run on the compiled graph"
    for g, e in zip(got, exp, strict=True):
        assert torch.equal(g, e)


def _graph_probes():
    """Functions run inside the Router actor; nested, so that Ray ships them by value (the actor
    cannot import this test module)."""

    def wait_graph(router):  # True once layers run on a compiled graph over the current workers
        return router.dispatcher.transport.wait_compiled(120)

    def graph_layers(router):  # layers run on a compiled graph so far
        return router.dispatcher.transport.graph_layers

    return wait_graph, graph_layers


wait_graph, graph_layers = _graph_probes()


def _batch(n: int, e_local: int, h: int, seed: int) -> ExpertBatch:
    """A synthetic ExpertBatch: n rows, 2 pairs per row spread over the local experts, all shared."""
    g = torch.Generator().manual_seed(seed)
    p = 2 * n
    expert_of_pair = torch.randint(0, e_local, (p,), generator=g).sort().values
    return ExpertBatch(
        x=torch.randn(n, h, generator=g),
        pair_rows=torch.randint(0, n, (p,), generator=g),
        pair_weights=torch.rand(p, generator=g),
        expert_counts=torch.bincount(expert_of_pair, minlength=e_local),
        shared_rows=torch.arange(n),
        shared_weights=torch.rand(n, generator=g),
    )


# The graph's driver is the Router actor; these tests reach into it with __ray_call__ so that no
# compiled graph ever lives in the test process itself (its channels would outlive ray.shutdown()).


def in_router(engine, fn, *args):
    return ray.get(engine._router.__ray_call__.remote(fn, *args))


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """(local, compiled) engines on the same 2-worker placement of the deepseek_v3 model."""
    d = tiny_model_dir("deepseek_v3")
    with (
        Engine.from_pretrained(d, num_workers=2, num_threads=THREADS) as local,
        Engine.from_pretrained(d, num_workers=2, transport="compiled", num_threads=THREADS) as compiled,
    ):
        yield local, compiled


def test_worker_error_names_worker_and_layer(engines):
    local, compiled = engines

    # defined here, not at module level, so that cloudpickle ships them by value to the actor
    def _stash(router, worker, layer):
        def pop(w):
            w.stash = w.layers.pop(layer)

        ray.get(router.dispatcher.transport._actors[worker].__ray_call__.remote(pop))

    def _restore(router, worker, layer):
        def put(w):
            w.layers[layer] = w.stash

        ray.get(router.dispatcher.transport._actors[worker].__ray_call__.remote(put))

    ids = torch.randint(3, VOCAB, (2, 16))
    expected = local.forward(ids)
    for worker in (1, 0):
        assert in_router(compiled, wait_graph)
        in_router(compiled, _stash, worker, 2)  # the worker now raises inside forward for layer 2
        with pytest.raises(WorkerError, match=f"expert worker {worker} failed in MoE layer 2"):
            compiled.forward(ids)
        in_router(compiled, _restore, worker, 2)
        assert torch.equal(compiled.forward(ids), expected)  # the graph survives the error


def test_large_payload_and_idle_worker(engines):
    local, compiled = engines
    layer = compiled.spec.moe_layers[0]
    # 40000 x 32 fp32 = 5 MB per direction: the channels start at 1 MB and must grow; then small again
    for n in (40000, 3):
        h = torch.randn(n, 32)
        assert torch.equal(compiled.moe_forward(layer, h), local.moe_forward(layer, h))
    placement = local.router.dispatcher.placement
    counts = len(placement.worker_experts(1, layer))
    only_one = {1: (placement.layout_of(1), _batch(7, counts, 32, seed=3))}  # worker 0 gets no rows
    assert in_router(compiled, wait_graph)
    got = in_router(compiled, lambda r, b: r.dispatcher.transport.run_layer(layer, b).partials, only_one)
    assert list(got) == [1] and torch.equal(
        got[1], local.router.dispatcher.transport.run_layer(layer, only_one).partials[1]
    )


def test_still_serves_after_errors_and_resizes(engines):
    local, compiled = engines
    ids = torch.randint(3, VOCAB, (2, 5))
    assert torch.equal(compiled.forward(ids), local.forward(ids))


def test_scale_rebuilds_the_graph_off_the_hot_path(engines):
    local, compiled = engines
    ids = torch.randint(3, VOCAB, (2, 7))
    expected = local.forward(ids)
    for n in (3, 2):
        assert compiled.scale(n)["num_workers"] == n
        # layers run at once, on actor calls, while the new graph compiles in the background
        torch.testing.assert_close(compiled.forward(ids), expected, rtol=1e-5, atol=1e-6)
        assert in_router(compiled, wait_graph), f"no graph over the {n} workers"
        before = in_router(compiled, graph_layers)
        torch.testing.assert_close(compiled.forward(ids), expected, rtol=1e-5, atol=1e-6)
        assert in_router(compiled, graph_layers) > before
    assert torch.equal(compiled.forward(ids), expected), "back on 2 workers: bit for bit again"


def test_killed_worker_changes_no_output_and_is_replaced(engines):
    """Last in this module: it kills a worker of the shared compiled engine in the middle of a pass
    (the graph breaks; the layer finishes on actor calls, the lost worker's rows on the survivor)."""
    local, compiled = engines
    ids = torch.randint(3, VOCAB, (2, 5))
    expected = local.forward(ids)
    assert in_router(compiled, wait_graph)

    def kill_during_layer_2(router):
        transport = router.dispatcher.transport
        run = transport.run_layer

        def run_layer(layer, work, **kw):
            if layer == 2 and 1 in transport._actors:
                actor = transport._actors[1]
                ray.kill(actor)
                for _ in range(100):  # ray.kill is asynchronous: wait until the actor is gone
                    try:
                        ray.get(actor.ping.remote(), timeout=10)
                    except ray.exceptions.RayActorError:
                        break
                    time.sleep(0.05)
            return run(layer, work, **kw)

        transport.run_layer = run_layer

    in_router(compiled, kill_during_layer_2)
    torch.testing.assert_close(compiled.forward(ids), expected, rtol=1e-5, atol=1e-6)
    state = compiled.cluster_state()
    assert state["elastic"]["events"]["workers_lost"] == 1
    assert state["elastic"]["events"]["failover"] == 1
    deadline = time.monotonic() + 60
    while compiled.cluster_state()["num_workers"] < 2:
        assert time.monotonic() < deadline, "the lost worker was not replaced"
        time.sleep(0.2)
    assert 1 not in {w["worker_id"] for w in compiled.cluster_state()["workers"]}
    torch.testing.assert_close(compiled.forward(ids), expected, rtol=1e-5, atol=1e-6)
    # and the graphs built after it run: every graph ever compiled was torn down before the next one
    # over the same actors (a leaked one's loops hold them, and the next graph's executions hang)
    assert in_router(compiled, wait_graph)
    before = in_router(compiled, graph_layers)
    torch.testing.assert_close(compiled.forward(ids), expected, rtol=1e-5, atol=1e-6)
    assert in_router(compiled, graph_layers) > before
    assert in_router(compiled, lambda r: r.dispatcher.transport.graph_breaks) == 1, (
        "only the kill broke a graph"
    )
