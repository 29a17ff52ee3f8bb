"""Placement maps, Plan (a token goes to a worker once; shared experts run once) and Combine."""

import types

import pytest
import torch
from conftest import rel_err

from expert_workers.kernels import swiglu_dense
from router_service.stages.gating import Routing
from router_service.stages.placement import (
    Placement,
    contiguous_placement,
    placement_from_assignments,
    reassign_lost_slots,
    without_workers,
)
from router_service.stages.plan import combine, pairs_on, plan, shared_choice


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
    work = plan(routing, placement, 0, x, shared is not None, shared_weights)
    partials = []
    for w, (rows, batch) in sorted(work.items()):
        ids = placement.worker_experts(w, 0)
        partials.append((rows, bare_worker(ids, w13, w2, shared, x.dtype).forward(0, batch)))
    return work, combine(x, partials)


def bare_worker(ids, w13, w2, shared, dtype):
    """An ExpertWorker holding experts `ids` of layer 0 as layout 0, weights set directly (no checkpoint)."""
    from expert_workers.worker import ExpertWorker, LayerExperts
    from moe_models.spec import ExpertFn

    worker = ExpertWorker.__new__(ExpertWorker)
    worker.device, worker.dtype, worker.kernel, worker.num_threads = torch.device("cpu"), dtype, "loop", None
    worker.worker_id = 0
    worker.spec = types.SimpleNamespace(expert_fn=ExpertFn())  # plain SwiGLU; the rest of a spec is unused
    worker.layouts = {0: {0: LayerExperts(ids, w13[ids], w2[ids])}}
    worker.shared = {0: shared or (None, None)}
    worker._latest = 0
    return worker


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


def test_placement_names_workers_by_stable_ids():
    p = contiguous_placement((1, 3), 8, 3, version=5, worker_ids=(7, 2, 11))
    assert p.worker_ids == (7, 2, 11) and p.layouts == (5, 5, 5)
    assert p.worker_experts(2, 3) == [2, 3, 4]
    assert p.worker_assignment(11) == {1: [5, 6, 7], 3: [5, 6, 7]}
    with pytest.raises(ValueError, match="distinct ids"):
        Placement(0, (0,), 2, (0, 1, 2), torch.tensor([[0, 1]]), worker_ids=(4, 4))
    with pytest.raises(ValueError, match="different slot counts"):
        placement_from_assignments(0, (0, 1), 2, (0,), [{0: [0, 1], 1: [0, 1, 1]}])


def test_lost_worker_with_replicas_everywhere_just_drops_its_slots():
    # experts 0..3; worker 9 holds replicas of 0 and 1 only
    p = placement_from_assignments(
        1, (0,), 4, (3, 9, 4), [{0: [0, 1]}, {0: [0, 1]}, {0: [2, 3]}], layouts=(1, 1, 1)
    )
    q = without_workers(p, {9}, version=2)
    assert q.worker_ids == (3, 4) and q.layouts == (1, 1), "survivors keep their layouts: nothing to load"
    assert q.version == 2 and q.logcnt[0].tolist() == [1, 1, 1, 1]
    assert without_workers(p, {4}, version=2) is None, "experts 2 and 3 would have no slot"


@pytest.mark.parametrize("lost", [{0}, {1}, {0, 2}])
def test_survivors_take_over_every_slot_of_lost_workers(lost):
    p = contiguous_placement((0, 1), 10, 4, version=3)
    q, changed = reassign_lost_slots(p, lost, version=4)
    survivors = [w for w in range(4) if w not in lost]
    assert q.worker_ids == tuple(survivors) and q.num_slots == p.num_slots
    gained = {w: len(q.worker_experts(w, 0)) - len(p.worker_experts(w, 0)) for w in survivors}
    assert changed == {w for w, n in gained.items() if n > 0}
    assert sum(gained.values()) == sum(len(p.worker_experts(w, 0)) for w in lost)
    assert max(gained.values()) - min(gained.values()) <= 1, "the lost slots are shared out evenly"
    for layer in (0, 1):
        held = sorted(e for w in survivors for e in q.worker_experts(w, layer))
        assert held == list(range(10)), "every expert has a slot again"
        for w in survivors:  # old slots first and unchanged: a survivor only adds experts
            assert q.worker_experts(w, layer)[: len(p.worker_experts(w, layer))] == p.worker_experts(w, layer)
    sizes = [len(q.worker_experts(w, 0)) for w in survivors]
    assert max(sizes) - min(sizes) <= 2
    with pytest.raises(ValueError, match="no expert worker survives"):
        reassign_lost_slots(p, {0, 1, 2, 3}, version=5)


def test_lost_slot_goes_to_a_survivor_that_already_holds_its_expert():
    # worker 1 holds expert 0 (replicated on worker 0) and expert 3 (only copy)
    p = placement_from_assignments(0, (0,), 4, (0, 1, 2), [{0: [0, 1]}, {0: [0, 3]}, {0: [2, 0]}])
    q, changed = reassign_lost_slots(p, {1}, version=1)
    assert q.worker_experts(0, 0)[2:] + q.worker_experts(2, 0)[2:] in ([0, 3], [3, 0])
    assert sorted(set(q.worker_experts(0, 0)) | set(q.worker_experts(2, 0))) == [0, 1, 2, 3]
    assert changed == {0, 2}


@pytest.mark.parametrize("with_shared", [False, True])
def test_replanning_only_the_lost_pairs_gives_the_same_output(with_shared):
    """What the dispatcher does when a worker is lost mid-layer: the survivors' partials stand, the
    lost worker's pairs (and the shared rows it was to run) are planned again over the recovery
    placement, and the sum is the undisturbed layer's."""
    gen = torch.Generator().manual_seed(7)
    t, e, k, h, i = 13, 8, 3, 16, 8
    x = torch.randn(t, h, generator=gen)
    w13, w2 = torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen)
    shared = (torch.randn(2 * i, h, generator=gen), torch.randn(h, i, generator=gen)) if with_shared else None
    routing = random_routing(t, k, e, gen)
    p = contiguous_placement((0,), e, 3)
    _, expected = run_plan(x, routing, p, w13, w2, shared, None)

    first = plan(routing, p, 0, x, with_shared)
    parts = [
        (rows, bare_worker(p.worker_experts(w, 0), w13, w2, shared, x.dtype).forward(0, b))
        for w, (rows, b) in sorted(first.items())
        if w != 1
    ]
    pair_mask = pairs_on(routing, p, 0, {1})
    shared_mask = pair_mask[torch.arange(t), shared_choice(routing)]
    q, _ = reassign_lost_slots(p, {1}, version=1)
    redo = plan(routing, q, 0, x, with_shared, None, pair_mask, shared_mask)
    assert sum(int(b.expert_counts.sum()) for _, b in redo.values()) == int(pair_mask.sum())
    for w, (rows, b) in sorted(redo.items()):
        parts.append((rows, bare_worker(q.worker_experts(w, 0), w13, w2, shared, x.dtype).forward(0, b)))
    assert rel_err(combine(x, parts), expected) < 1e-5
