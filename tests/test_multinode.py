"""A real multi-node Ray cluster on loopback: head + worker nodes, expert workers spread over them;
a node removed under load changes no output and its workers are replaced on the nodes left."""

import threading
import time

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from tiny_models import VOCAB

from router_service import Engine
from router_service.default_model import default_model_dir

# Transports agree bit for bit at equal torch thread counts; their defaults differ (Ray
# transports divide the cores among the workers), so the comparisons fix it.
THREADS = 1


def start_cluster(attempts: int = 3):
    """A head and two worker nodes. Ray waits only 30 s (hard-coded) for a new raylet to register,
    which a loaded 2-core machine once missed ("The current node timed out during startup"): that
    one error is retried on a fresh cluster."""
    for attempt in range(attempts):
        c = Cluster()
        try:
            c.add_node(num_cpus=1, resources={"head": 1})
            nodes = [c.add_node(num_cpus=1, resources={"expert_node": 1}) for _ in range(2)]
            c.wait_for_nodes()
            return c, nodes
        except Exception as e:
            c.shutdown()
            if attempt == attempts - 1 or "timed out during startup" not in str(e):
                raise


@pytest.fixture(scope="module")
def cluster():
    c, nodes = start_cluster()
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_workers_on_different_nodes_give_the_same_logits(cluster, tiny_model_dir):
    c, nodes = cluster
    d = tiny_model_dir("deepseek_v3")
    ids = torch.randint(3, VOCAB, (2, 8))
    with Engine.from_pretrained(d, num_workers=2, num_threads=THREADS) as local:
        expected = local.forward(ids)
    resources = {"num_cpus": 1, "resources": {"expert_node": 1}, "strategy": "STRICT_SPREAD"}
    with Engine.from_pretrained(
        d,
        num_workers=2,
        transport="ray",
        ray_address=c.address,
        worker_resources=resources,
        num_threads=THREADS,
    ) as engine:
        workers = engine.cluster_state()["workers"]
        assert torch.equal(engine.forward(ids), expected)
    placed = {w["node_id"] for w in workers}
    assert placed == {n.node_id for n in nodes}, "each worker must run on its own worker node"
    assert ray.is_initialized(), "an Engine that joined a cluster must not shut it down"


def test_node_removed_under_load_changes_no_token(cluster):
    c, _ = cluster
    extra = [c.add_node(num_cpus=2, resources={"spare_node": 1}) for _ in range(2)]
    c.wait_for_nodes()
    d = default_model_dir()
    prompts = [[40 + i, 41, 42 + i] for i in range(6)]

    started = threading.Event()

    def run(engine, out, errors):
        def go(i):
            try:
                tokens = []
                for ch in engine.generate_stream(prompts[i], 160):
                    tokens += ch["token_ids"]
                    started.set()
                out[i] = tokens
            except Exception as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        return threads

    want: list = [None] * len(prompts)
    with Engine.from_pretrained(d, num_workers=2, num_threads=THREADS) as local:
        for t in run(local, want, []):
            t.join()
    resources = {"num_cpus": 1, "resources": {"spare_node": 0.5}, "strategy": "SPREAD"}
    with Engine.from_pretrained(
        d,
        num_workers=2,
        transport="ray",
        ray_address=c.address,
        worker_resources=resources,
        num_threads=THREADS,
        progress="off",
        elastic={"restore_interval_s": 0.5},
        router_resources={"head": 0.01},  # the router stays on the head, whatever node goes away
    ) as engine:
        nodes = {w["node_id"] for w in engine.cluster_state()["workers"]}
        assert nodes == {n.node_id for n in extra}, "SPREAD puts the two workers on different nodes"
        got, errors = [None] * len(prompts), []
        started.clear()
        threads = run(engine, got, errors)
        assert started.wait(120)
        c.remove_node(extra[0])  # the node and its expert worker go away mid-stream
        assert any(t.is_alive() for t in threads), "the streams ended before the node went away"
        for t in threads:
            t.join(120)
        assert not errors and got == want
        deadline = time.monotonic() + 120
        while (state := engine.cluster_state())["num_workers"] < 2:
            assert time.monotonic() < deadline, "the lost worker was not replaced"
            time.sleep(0.2)
        assert {w["node_id"] for w in state["workers"]} == {extra[1].node_id}
        assert state["elastic"]["events"]["workers_lost"] == 1
