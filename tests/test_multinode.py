"""A real multi-node Ray cluster on loopback: head + 2 worker nodes, one expert worker on each."""

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from tiny_models import VOCAB

from router_service import Engine

# Transports agree bit for bit at equal torch thread counts; their defaults differ (Ray
# transports divide the cores among the workers), so the comparisons fix it.
THREADS = 1


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [c.add_node(num_cpus=1, resources={"expert_node": 1}) for _ in range(2)]
    c.wait_for_nodes()
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
