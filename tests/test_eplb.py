"""EPLB: replication, balanced packing, the rebalanced layout, load scores and worker matching."""

import pytest
import torch

from router_service.stages import eplb
from router_service.stages.eplb import (
    balanced_packing,
    balancedness,
    imbalance,
    match_workers,
    rebalance_experts,
    replicate_experts,
    slot_offsets,
    worker_capacities,
    worker_loads,
)


def test_worker_capacities_and_slot_offsets():
    assert worker_capacities(10, 4) == [3, 3, 2, 2]
    assert worker_capacities(8, 4) == [2, 2, 2, 2]
    assert worker_capacities(3, 1) == [3]
    assert slot_offsets([3, 3, 2, 2]) == (0, 3, 6, 8, 10)
    assert slot_offsets([5]) == (0, 5)
    with pytest.raises(ValueError, match="num_workers >= 1"):
        worker_capacities(4, 0)


def test_replicate_experts_by_hand():
    # layer 0: loads per replica 10,4,6 -> copy 0 (5,4,6) -> copy 2 (5,4,3)
    # layer 1: 6,6,1 tie -> copy 0, the lower id (3,6,1) -> copy 1 (3,3,1)
    weight = torch.tensor([[10.0, 4.0, 6.0], [6.0, 6.0, 1.0]])
    phy2log, phy_rank, logcnt = replicate_experts(weight, 5)
    assert phy2log.tolist() == [[0, 1, 2, 0, 2], [0, 1, 2, 0, 1]]
    assert phy_rank.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    assert logcnt.tolist() == [[2, 1, 2], [2, 2, 1]]
    assert phy2log.dtype == phy_rank.dtype == logcnt.dtype == torch.int64


def test_replicate_experts_third_copy_rank_and_no_redundancy():
    phy2log, phy_rank, logcnt = replicate_experts(torch.tensor([[9.0, 1.0]]), 4)
    assert phy2log.tolist() == [[0, 1, 0, 0]]
    assert phy_rank.tolist() == [[0, 0, 1, 2]]
    assert logcnt.tolist() == [[3, 1]]
    phy2log, phy_rank, logcnt = replicate_experts(torch.tensor([[9.0, 1.0]]), 2)
    assert phy2log.tolist() == [[0, 1]] and logcnt.tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="num_phy=1"):
        replicate_experts(torch.tensor([[9.0, 1.0]]), 1)


def test_balanced_packing_by_hand():
    # heaviest first: 5->p0, 4->p1, 3->p1 (7), 3->p0 (8), 2->p1 (9, full), 1->p0 (9)
    pack, rank = balanced_packing(torch.tensor([[5.0, 4.0, 3.0, 3.0, 2.0, 1.0]]), [3, 3])
    assert pack.tolist() == [[0, 1, 1, 0, 1, 0]]
    assert rank.tolist() == [[0, 0, 1, 1, 2, 2]]


def test_balanced_packing_ties_and_unequal_capacities():
    # equal weights: items in index order, load ties to the lower pack; pack 1 is full after two items
    pack, rank = balanced_packing(torch.ones(1, 5), [3, 2])
    assert pack.tolist() == [[0, 1, 0, 1, 0]]
    assert rank.tolist() == [[0, 0, 1, 1, 2]]


def test_balanced_packing_keeps_groups_apart():
    weight = torch.tensor([[10.0, 1.0, 1.0, 0.5, 0.5]])
    # Without groups the two 0.5 items end in pack 0 (pack 1 fills up with the two 1.0 items).
    pack, rank = balanced_packing(weight, [3, 2])
    assert pack.tolist() == [[0, 1, 1, 0, 0]]
    assert rank.tolist() == [[0, 0, 1, 1, 2]]
    # Items 3 and 4 share a group: the greedy still has to put both in pack 0 (the only one with room),
    # then the repair swaps item 3 with item 1 (equal weight gap to items 1 and 2; lower index wins).
    pack, rank = balanced_packing(weight, [3, 2], groups=torch.tensor([[0, 1, 2, 3, 3]]))
    assert pack.tolist() == [[0, 0, 1, 1, 0]]
    assert rank.tolist() == [[0, 1, 1, 0, 2]]


@pytest.mark.parametrize(
    "num_items,capacities", [(12, [3, 3, 3, 3]), (11, [3, 3, 3, 2]), (7, [7]), (50, [13] * 2 + [12] * 2)]
)
def test_balanced_packing_fills_each_pack_to_capacity(num_items, capacities):
    weight = torch.rand(3, num_items)
    groups = torch.randint(0, max(1, num_items // 2), (3, num_items))
    for g in (None, groups):
        pack, rank = balanced_packing(weight, capacities, groups=g)
        for layer in range(3):
            assert torch.bincount(pack[layer], minlength=len(capacities)).tolist() == capacities
            for i, cap in enumerate(capacities):
                assert sorted(rank[layer][pack[layer] == i].tolist()) == list(range(cap))


def test_balanced_packing_rejects_bad_capacities():
    with pytest.raises(ValueError, match=r"capacities \[2, 2\] must be non-negative and sum to 5"):
        balanced_packing(torch.ones(1, 5), [2, 2])
    with pytest.raises(ValueError, match="groups has shape"):
        balanced_packing(torch.ones(1, 4), [2, 2], groups=torch.zeros(1, 3, dtype=torch.int64))


def test_rebalance_experts_by_hand():
    # replicas (expert: load) 0:5 0:5 1:4 2:3 2:3 3:2 on 2 workers of 3 slots, no expert twice on a worker:
    # 0->w0, 0->w1, 1->w0, 2->w1, 2->w0 (w1 holds 2), 3->w1; loads 12 and 10
    weight = torch.tensor([[10.0, 4.0, 6.0, 2.0]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 6, 2)
    assert phy2log.tolist() == [[0, 1, 2, 0, 2, 3]]
    assert log2phy.tolist() == [[[0, 3], [1, -1], [2, 4], [5, -1]]]
    assert logcnt.tolist() == [[2, 1, 2, 1]]
    assert worker_loads(weight, phy2log, (0, 3, 6)).tolist() == [[12.0, 10.0]]


def test_rebalance_experts_without_redundancy_spreads_experts():
    # 4 experts, 4 slots, 2 workers: 8+1 and 5+4 is the greedy's answer (9 / 9 on average)
    weight = torch.tensor([[8.0, 5.0, 4.0, 1.0]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 4, 2)
    assert phy2log.tolist() == [[0, 3, 1, 2]]
    assert log2phy.tolist() == [[[0], [2], [3], [1]]]
    assert logcnt.tolist() == [[1, 1, 1, 1]]


def check_maps(phy2log, log2phy, logcnt, num_slots):
    num_layers, num_experts = logcnt.shape
    assert phy2log.shape == (num_layers, num_slots)
    assert log2phy.shape == (num_layers, num_experts, int(logcnt.max()))
    assert (logcnt >= 1).all()
    assert (logcnt.sum(dim=-1) == num_slots).all()
    for layer in range(num_layers):
        counted = torch.bincount(phy2log[layer], minlength=num_experts)
        assert torch.equal(counted, logcnt[layer])
        for e in range(num_experts):
            n = int(logcnt[layer, e])
            slots = log2phy[layer, e, :n]
            assert (phy2log[layer, slots] == e).all()
            assert (slots[1:] > slots[:-1]).all()  # increasing slot order
            assert (log2phy[layer, e, n:] == -1).all()


@pytest.mark.parametrize(
    "num_layers,num_experts,num_slots,num_workers",
    [
        (3, 8, 8, 2),
        (2, 16, 20, 4),
        (4, 32, 40, 4),
        (2, 10, 13, 3),
        (2, 7, 7, 7),
        (1, 64, 72, 8),
        (2, 5, 9, 9),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rebalance_experts_properties(num_layers, num_experts, num_slots, num_workers, seed):
    torch.manual_seed(seed)
    weight = torch.rand(num_layers, num_experts) ** 3 * 100
    if seed == 2:  # small integer loads: many ties
        weight = torch.randint(0, 4, (num_layers, num_experts)).float()
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_slots, num_workers)
    check_maps(phy2log, log2phy, logcnt, num_slots)
    assert torch.equal(logcnt, replicate_experts(weight, num_slots)[2])
    offsets = slot_offsets(worker_capacities(num_slots, num_workers))
    for layer in range(num_layers):
        for a, b in zip(offsets, offsets[1:], strict=False):
            held = phy2log[layer, a:b]
            assert (held[1:] >= held[:-1]).all()  # sorted by expert id inside a worker
            if int(logcnt[layer].max()) <= num_workers:  # then a duplicate-free layout exists
                assert len(set(held.tolist())) == b - a
    # The layout's total load is the experts' total load, whatever the split.
    loads = worker_loads(weight, phy2log, offsets)
    torch.testing.assert_close(loads.sum(dim=-1), weight.double().sum(dim=-1), rtol=1e-12, atol=1e-9)


def test_rebalance_experts_avoids_duplicates_where_greedy_alone_would_not(monkeypatch):
    # Small integer loads with many ties: the greedy pass alone puts two replicas of an expert on one
    # worker in some layers (checked below with the repair switched off); the full layout has none.
    torch.manual_seed(3)
    weight = torch.randint(1, 6, (200, 12)).float()

    def duplicated_layers():
        phy2log, _, logcnt = rebalance_experts(weight, 30, 6)
        assert int(logcnt.max()) <= 6  # so a duplicate-free layout exists in every layer
        held = phy2log.view(200, 6, 5)  # [L, W, slots per worker], sorted inside a worker
        return int((held[:, :, 1:] == held[:, :, :-1]).any(dim=-1).any(dim=-1).sum())

    assert duplicated_layers() == 0
    monkeypatch.setattr(eplb, "_remove_duplicates", lambda *args: None)
    assert duplicated_layers() > 0


def test_rebalance_experts_skewed_load_beats_contiguous():
    # Zipf-like loads over 32 experts, hottest first; 4 workers, 8 redundant slots.
    weight = (1.0 / torch.arange(1, 33, dtype=torch.float64)).unsqueeze(0)
    contiguous = torch.arange(32).unsqueeze(0)
    before = balancedness(worker_loads(weight, contiguous, (0, 8, 16, 24, 32)))
    phy2log, _, _ = rebalance_experts(weight, 40, 4)
    after = balancedness(worker_loads(weight, phy2log, slot_offsets(worker_capacities(40, 4))))
    assert before.item() < 0.5
    assert after.item() >= 0.9


@pytest.mark.parametrize(
    "weight,num_slots,num_workers,message",
    [
        (torch.ones(2, 4), 3, 1, r"num_slots \(3\) must be at least the number of experts \(4\)"),
        (torch.ones(2, 4), 4, 0, r"num_workers must be between 1 and num_slots \(4\), got 0"),
        (torch.ones(2, 4), 4, 5, r"num_workers must be between 1 and num_slots \(4\), got 5"),
        (torch.ones(4), 4, 2, r"weight must be \[layers, experts\], got shape \(4,\)"),
        (torch.tensor([[1.0, -2.0]]), 2, 1, r"non-negative, got -2.0 at \[0, 1\]"),
        (torch.tensor([[1.0, float("nan")]]), 2, 1, "NaN"),
    ],
)
def test_rebalance_experts_rejects_bad_input(weight, num_slots, num_workers, message):
    with pytest.raises(ValueError, match=message):
        rebalance_experts(weight, num_slots, num_workers)


def test_worker_loads_splits_replicated_load():
    # expert 0 (load 8) has two slots of 4 each: w0 = 4 + 2, w1 = 4 + 4
    weight = torch.tensor([[8.0, 2.0, 4.0]])
    loads = worker_loads(weight, torch.tensor([[0, 1, 0, 2]]), (0, 2, 4))
    assert loads.dtype == torch.float64
    assert loads.tolist() == [[6.0, 8.0]]
    assert worker_loads(weight, torch.tensor([[0, 1, 0, 2]]), (0, 1, 4)).tolist() == [[4.0, 10.0]]
    with pytest.raises(ValueError, match="slot_offsets"):
        worker_loads(weight, torch.tensor([[0, 1, 0, 2]]), (0, 2, 3))


def test_balancedness_and_imbalance_by_hand():
    loads = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 4.0]])
    torch.testing.assert_close(
        balancedness(loads), torch.tensor([2 / 3, 1.0, 1.0, 1 / 3], dtype=torch.float64)
    )
    torch.testing.assert_close(imbalance(loads), torch.tensor([0.5, 0.0, 0.0, 2.0], dtype=torch.float64))


def as_sets(layout):
    """[[experts of layer 0, experts of layer 1, ...] per worker] -> the same with sets."""
    return [[set(layer) for layer in worker] for worker in layout]


def test_match_workers_identity_and_permutation():
    held = as_sets([[[0, 1], [2, 3]], [[2, 3], [0, 1]], [[4, 5], [4, 5]]])
    assert match_workers(held, held) == [0, 1, 2]
    assert match_workers([held[2], held[0], held[1]], held) == [2, 0, 1]


def test_match_workers_scale_up_sums_layers():
    held = as_sets([[[0, 1, 2, 3], [0, 1, 2, 3]], [[4, 5, 6, 7], [4, 5, 6, 7]]])
    new = as_sets([[[0, 1, 2], [1, 2]], [[3, 4, 5], [0, 3, 7]], [[6, 7], [4, 5, 6]]])
    # overlaps (pack, worker): (0,0)=5 (0,1)=0 (1,0)=3 (1,1)=3 (2,0)=0 (2,1)=5; layer 0 alone would give
    # pack 1 worker 1 (2 vs pack 2's 2, lower pack index), but over both layers pack 2 keeps more.
    assert match_workers(new, held) == [0, -1, 1]
    assert match_workers([pack[:1] for pack in new], [worker[:1] for worker in held]) == [0, 1, -1]


def test_match_workers_scale_down_and_no_overlap():
    held = as_sets([[[0, 1]], [[2, 3]], [[4, 5]]])
    new = as_sets([[[2, 3, 4]], [[0, 1, 5]]])
    assert match_workers(new, held) == [1, 0]  # worker 2 (least overlap) gets nothing
    assert match_workers(as_sets([[[6]], [[7]]]), held) == [0, 1]  # all ties: lowest indices
    assert match_workers(new, []) == [-1, -1]
    with pytest.raises(ValueError, match="same number of layers"):
        match_workers(as_sets([[[0], [1]]]), held)
