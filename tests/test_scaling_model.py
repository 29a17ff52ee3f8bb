"""bench.scaling_model's M routers x W workers model on a synthetic breakdown: no Ray, no trace."""

import dataclasses
import math

import pytest

from bench.scaling_model import (
    Cluster,
    Costs,
    budgets,
    capacity_tok_s,
    grid,
    knee,
    model_table,
    point,
)

COUNTS = [1, 2, 4, 8, 16, 32, 64]
ROUTERS = [1, 2, 4, 8]

# What `bench.decode_profile.breakdown` returns, with the figures of a 2-worker medium-like trace.
BREAKDOWN = {
    "steps": 10,
    "mean_batch": 16.0,
    "layers_per_step": 3.0,
    "per_step_ms": {"step": 350.0, "submit": 3.0, "wait": 240.0},
    "per_layer_ms": {"slowest worker's call": 78.0, "transport's own (wait - worker call)": 0.5},
}
SHAPE = {"hidden": 2048, "top_k": 6, "experts": 64}


def costs(**over) -> Costs:
    return dataclasses.replace(Costs.from_breakdown(BREAKDOWN, traced_workers=2), **over)


def test_one_router_is_the_single_router_model():
    c, cl = costs(), Cluster(**SHAPE)
    rows = model_table(BREAKDOWN, 2, 2048, 6, 16.0, 3.0, COUNTS, cl.gbit_s, cl.latency_us)
    for r in rows:
        for merged in (True, False):
            p = point(c, cl, r["workers"], 1, merged)
            assert p["bound"] == "routers"
            assert p["step_ms"] == pytest.approx(r["step_ms"], rel=1e-12)
            assert p["tok_s"] == pytest.approx(r["tok_s"], rel=1e-12)


@pytest.mark.parametrize("row_share", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("shape", [SHAPE, {"hidden": 128, "top_k": 4, "experts": 16}])
def test_monotone_in_workers_and_merged_at_least_unmerged(row_share, shape):
    c, cl = costs(), Cluster(**shape, row_share=row_share)
    pts = grid(c, cl, COUNTS, ROUTERS)["points"]
    for m in ROUTERS:
        for merged in (True, False):
            # up to one expert per worker: past it a worker's bytes stop falling while the network grows
            rates = [pts[m, w, merged]["tok_s"] for w in COUNTS if w <= cl.experts]
            assert all(b >= a * (1 - 1e-12) for a, b in zip(rates, rates[1:], strict=False)), (
                m,
                merged,
                rates,
            )
        for w in COUNTS:
            assert pts[m, w, True]["tok_s"] >= pts[m, w, False]["tok_s"] * (1 - 1e-12)
    # one router: merging changes nothing; several on one worker: the unmerged pool saturates first
    assert pts[1, 2, True]["tok_s"] == pytest.approx(pts[1, 2, False]["tok_s"])
    assert pts[8, 1, False]["bound"] == "workers"


def test_free_routers_reach_the_workers_capacity():
    cl = Cluster(**SHAPE, gbit_s=math.inf, latency_us=0.0)
    free = costs(router_ms=0.0, submit_ms=0.0, transport_ms=0.0)
    for m in ROUTERS:
        for w in COUNTS:
            for merged in (True, False):
                p = point(free, cl, w, m, merged)
                assert p["tok_s"] == pytest.approx(capacity_tok_s(free, cl, w, m, merged), rel=1e-12)
    # and with the measured router cost, enough routers meet the same bound
    c = costs()
    for w in (1, 8, 64):
        for merged in (True, False):
            p = point(c, Cluster(**SHAPE), w, 4096, merged)
            assert p["bound"] == "workers"
            assert p["tok_s"] == pytest.approx(capacity_tok_s(c, Cluster(**SHAPE), w, 4096, merged))


def test_knee_and_budgets():
    assert knee([(1, 100.0), (2, 200.0), (4, 230.0), (8, 235.0)]) == 4
    assert knee([(1, 100.0), (2, 200.0), (4, 400.0)]) is None
    # a router step long against the experts (as on the default model), so that one router has a knee
    c, cl = costs(router_ms=1500.0), Cluster(**SHAPE)
    g = grid(c, cl, COUNTS, ROUTERS)
    one = g["knees"][1, True]["workers"]
    assert one is not None
    # sharing the pool without merging needs more workers before the knee
    assert g["knees"][8, False]["workers"] is None or g["knees"][8, False]["workers"] >= one
    b = budgets(c, cl, one, 1, True)
    assert b["serial_ms"] > 0 and b["pipelined_ms"] >= c.router_ms / c.layers
    # the serial budget costs exactly the allowed share of tokens/s
    free = point(c, cl, one, 1, True, transport_ms=0.0)["tok_s"]
    spent = point(c, cl, one, 1, True, transport_ms=b["serial_ms"])["tok_s"]
    assert spent == pytest.approx(0.95 * free)
