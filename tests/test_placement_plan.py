"""Placement maps, Plan (a token goes to a worker once; shared experts run once) and Combine."""

import pytest
import torch
from conftest import rel_err

from expert_workers.kernels import swiglu_dense
from router_service.gating import Routing
from router_service.placement import Placement, contiguous_placement
from router_service.plan import combine, plan


@pytest.mark.parametrize("num_workers", [1, 2, 3, 5, 7, 16])
def test_contiguous_placement_covers_every_expert_once(num_workers):
    p = contiguous_placement((1, 2), 16, num_workers)
    assert p.num_workers == num_workers and p.version == 0
    for layer in (1, 2):
        held = [e for w in range(num_workers) for e in p.worker_experts(w, layer)]
        assert sorted(held) == list(range(16))
        sizes = [len(p.worker_experts(w, layer)) for w in range(num_workers)]
        assert max(sizes) - min(sizes) <= 1
    assert torch.equal(p.logcnt, torch.ones(2, 16, dtype=torch.int64))


def test_placement_rejects_bad_input():
    with pytest.raises(ValueError, match="num_workers"):
        contiguous_placement((0,), 4, 5)
    with pytest.raises(ValueError, match="has no slot"):
        Placement(0, (0,), 4, (0, 2, 4), torch.tensor([[0, 1, 2, 2]]))
    with pytest.raises(ValueError, match="slot_offsets"):
        Placement(0, (0,), 4, (0, 3, 2), torch.tensor([[0, 1, 2, 3]]))


def random_routing(t, k, e, gen):
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).int()
    return Routing(ids=ids, weights=torch.rand(t, k, generator=gen))


def reference_moe(x, routing, w13, w2, shared=None, shared_weights=None):
    """Per-token, per-choice loop: the slow, obviously right answer."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(routing.ids.shape[1]):
            e = int(routing.ids[t, j])
            out[t] += routing.weights[t, j] * swiglu_dense(x[t : t + 1], w13[e], w2[e])[0]
        if shared is not None:
            s = swiglu_dense(x[t : t + 1], *shared)[0]
            out[t] += s * (1.0 if shared_weights is None else shared_weights[t])
    return out


def run_plan(x, routing, placement, w13, w2, shared, shared_weights):
    """Plan, then compute each worker's batch the way an ExpertWorker does, then Combine."""
    from expert_workers.worker import ExpertWorker, LayerExperts

    work = plan(routing, placement, 0, x, shared is not None, shared_weights)
    partials = []
    for w, (rows, batch) in sorted(work.items()):
        ids = placement.worker_experts(w, 0)
        worker = ExpertWorker.__new__(ExpertWorker)  # weights set directly, no checkpoint needed
        worker.device, worker.dtype, worker.kernel = torch.device("cpu"), x.dtype, "loop"
        worker.layers = {0: LayerExperts(ids, w13[ids], w2[ids], *(shared or (None, None)))}
        partials.append((rows, worker.forward(0, batch)))
    return work, combine(x, partials)


@pytest.mark.parametrize("tokens", [1, 5, 33])
@pytest.mark.parametrize("num_workers", [1, 2, 3, 8])
@pytest.mark.parametrize("with_shared", [False, True])
def test_plan_combine_equals_reference(tokens, num_workers, with_shared):
    gen = torch.Generator().manual_seed(tokens * 100 + num_workers)
    e, k, h, i = 8, 3, 16, 8
    x = torch.randn(tokens, h, generator=gen)
    w13, w2 = torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen)
    shared = (torch.randn(2 * i, h, generator=gen), torch.randn(h, i, generator=gen)) if with_shared else None
    shared_weights = torch.rand(tokens, generator=gen) if with_shared else None
    routing = random_routing(tokens, k, e, gen)
    placement = contiguous_placement((0,), e, num_workers)
    work, out = run_plan(x, routing, placement, w13, w2, shared, shared_weights)
    assert rel_err(out, reference_moe(x, routing, w13, w2, shared, shared_weights)) < 1e-5

    visits = torch.zeros(tokens, dtype=torch.long)
    shared_runs = torch.zeros(tokens, dtype=torch.long)
    for rows, batch in work.values():
        assert rows.unique().numel() == rows.numel(), "a token went to a worker twice"
        assert batch.x.shape == (rows.numel(), h)
        assert int(batch.expert_counts.sum()) == batch.pair_rows.numel()
        local = torch.repeat_interleave(torch.arange(batch.expert_counts.numel()), batch.expert_counts)
        assert torch.equal(local, local.sort().values), "pairs not sorted by local expert"
        visits[rows] += 1
        if batch.shared_rows is not None:
            shared_runs[rows[batch.shared_rows]] += 1
    workers_hit = [
        len({int(placement.phy2worker[int(placement.log2phy[0, int(ex), 0])]) for ex in routing.ids[t]})
        for t in range(tokens)
    ]
    assert visits.tolist() == workers_hit
    if with_shared:
        assert shared_runs.tolist() == [1] * tokens, "shared experts must run exactly once per token"


def test_replicated_expert_splits_tokens_across_replicas():
    # 4 experts, expert 0 has two replicas (slot 0 on worker 0 and slot 4 on worker 1)
    p = Placement(3, (0,), 4, (0, 3, 5), torch.tensor([[0, 1, 2, 3, 0]]))
    assert p.logcnt[0].tolist() == [2, 1, 1, 1]
    assert p.worker_experts(1, 0) == [3, 0]
    gen = torch.Generator().manual_seed(0)
    t, h, i = 10, 8, 4
    x = torch.randn(t, h, generator=gen)
    routing = Routing(ids=torch.zeros(t, 1, dtype=torch.int32), weights=torch.ones(t, 1))
    w13, w2 = torch.randn(4, 2 * i, h, generator=gen), torch.randn(4, h, i, generator=gen)
    work, out = run_plan(x, routing, p, w13, w2, None, None)
    assert sorted(work) == [0, 1]
    assert work[0][0].numel() == 5 and work[1][0].numel() == 5
    assert rel_err(out, reference_moe(x, routing, w13, w2)) < 1e-5
