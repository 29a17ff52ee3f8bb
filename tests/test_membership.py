"""Membership without Ray: scale and recovery on in-process workers, the worker's layouts, and the
autoscaling policy on a fake clock."""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import rel_err
from tiny_models import VOCAB

from moe_models.loading import spec_from_pretrained
from router_service import Engine
from router_service.config import (
    ROUTER_ALL_CORES_MIN_HIDDEN,
    AutoscalingConfig,
    EngineConfig,
    router_threads_for,
)
from router_service.errors import NoCapacityError
from router_service.runtime.autoscaler import Autoscaler


@pytest.mark.parametrize("kernel", ["onednn", "loop"])
def test_worker_layouts_reuse_the_weights_they_hold(tiny_model_dir, kernel):
    from expert_workers.worker import ExpertBatch, ExpertWorker

    d = tiny_model_dir("deepseek_v3")
    spec = spec_from_pretrained(d)
    layers = spec.moe_layers
    w = ExpertWorker(0, str(d), {layer: [0, 1, 2] for layer in layers}, spec=spec, kernel=kernel)
    read = len(w.checkpoint.keys_read)
    stats = w.load_layout(1, {layer: [2, 1, 5, 5] for layer in layers})  # reorder, one new, a twin
    assert stats["experts_reused"] == 3 * len(layers) and stats["experts_read"] == len(layers)
    assert len(w.checkpoint.keys_read) - read == 3 * len(layers), "only expert 5 is read"
    old, new = w.layouts[0][layers[0]], w.layouts[1][layers[0]]
    if kernel == "onednn":  # per-expert packed weights: shared, not copied
        assert new.w13[0] is old.w13[2] and new.w13[3] is new.w13[2]
    else:  # stacked weights: copied into the new stack
        assert torch.equal(new.w13[0], old.w13[2]) and torch.equal(new.w2[1], old.w2[1])
    # expert 2 is slot 0 of layout 1 and slot 2 of layout 0: the same rows through either, the same bits
    x = torch.randn(3, spec.hidden_size)
    one = ExpertBatch(x, torch.tensor([0, 1, 2]), torch.ones(3), torch.tensor([3, 0, 0, 0]))
    via_old = ExpertBatch(x, torch.tensor([0, 1, 2]), torch.ones(3), torch.tensor([0, 0, 3]))
    assert torch.equal(w.forward(layers[0], one, 1), w.forward(layers[0], via_old, 0))
    both = w.nbytes
    w.drop_layout(0)
    assert w.nbytes < both and sorted(w.layouts) == [1] and w.describe()["layout"] == 1


def test_local_scale_and_lost_workers_keep_the_outputs(tiny_model_dir):
    d = tiny_model_dir("qwen2_moe")  # shared expert behind a gate: the shared rows must run once
    ids = torch.randint(3, VOCAB, (3, 7))
    with Engine.from_pretrained(d, num_workers=2, elastic={"restore_interval_s": 0.2}) as engine:
        want = engine.forward(ids)
        for n in (3, 1, 4):
            state = engine.scale(n)
            assert state["num_workers"] == n
            assert rel_err(engine.forward(ids), want) < 1e-5
        router = engine.router
        transport = router.dispatcher.transport
        real = transport.run_layer

        def losing(layer, work, **kw):  # two workers vanish in the middle of a pass
            result = real(layer, work, **kw)
            for w in list(result.partials)[:2]:
                del result.partials[w]
                result.lost[w] = "test"
                transport.workers.pop(w)
            transport.run_layer = real
            return result

        transport.run_layer = losing
        assert rel_err(engine.forward(ids), want) < 1e-5
        deadline = time.monotonic() + 60
        while engine.cluster_state()["num_workers"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        events = engine.cluster_state()["elastic"]["events"]
        assert events["workers_lost"] == 2 and events["failover"] == 1 and events["restore"] == 1
        assert rel_err(engine.forward(ids), want) < 1e-5

        def all_lost(layer, work, **kw):
            result = real(layer, work, **kw)
            result.lost = {w: "test" for w in result.partials}
            result.partials = {}
            return result

        transport.run_layer = all_lost  # and every replacement is lost too: bounded, then a clear error
        with pytest.raises(NoCapacityError, match="could not be re-placed after 3 attempts"):
            engine.forward(ids)
        transport.run_layer = real
        assert rel_err(engine.forward(ids), want) < 1e-5


def test_a_pass_on_an_out_of_date_placement_takes_the_current_one(tiny_model_dir, caplog):
    """A router that missed a change (it restarted while the change ran: CI saw 'worker 2 holds no
    layout 2') finds the workers without its layouts: it takes the controller's placement and sends
    those rows again, and the output does not change."""
    d = tiny_model_dir("deepseek_v3")
    ids = torch.randint(3, VOCAB, (2, 9))
    with Engine.from_pretrained(d, num_workers=2) as engine:
        want = engine.forward(ids)
        router = engine.router
        old = router.dispatcher.placement
        engine.scale(3)
        new = router.dispatcher.placement
        workers = router.dispatcher.transport.workers
        dropped = [w for w in old.worker_ids if w in workers and old.layout_of(w) not in workers[w].layouts]
        assert dropped, "the scale must have dropped a layout the old placement names"
        router.dispatcher.placement = old  # what a router that missed the install still holds
        with caplog.at_level("WARNING", logger="router_service.router"):
            assert rel_err(engine.forward(ids), want) < 1e-5
        assert router.dispatcher.placement.version == new.version
        assert f"placement {old.version} is out of date" in caplog.text


def test_autoscaler_waits_out_its_delays():
    cfg = AutoscalingConfig(
        min_workers=1,
        max_workers=4,
        target_tokens_per_worker=8,
        upscale_delay_s=2,
        downscale_delay_s=5,
        look_back_period_s=1,
        metrics_interval_s=0.5,
    )
    a = Autoscaler(cfg, max_slots=3)
    assert a.max_workers == 3, "capped by the expert slots"
    assert a.desired(0) == 1 and a.desired(17) == 3 and a.desired(100) == 3
    assert a.observe(0.0, 20, current=1) is None  # wants 3, not for long enough yet
    assert a.observe(1.0, 20, current=1) is None
    assert a.observe(2.0, 20, current=1) == 3
    assert a.observe(3.0, 20, current=3) is None
    assert a.observe(4.0, 0, current=3) is None  # the average over 1 s still holds the burst
    for t in (4.5, 5.0, 6.0, 8.0):
        assert a.observe(t, 0, current=3) is None
    assert a.observe(10.0, 0, current=3) == 1
    with pytest.raises(ValueError, match="min_workers <= max_workers"):
        AutoscalingConfig(min_workers=3, max_workers=2)


def test_routers_on_one_node_share_its_cores():
    """A router that computes on every core (hidden >= ROUTER_ALL_CORES_MIN_HIDDEN) divides them
    with the other routers of its node; a configured or small-model count stays as it is."""
    cores = len(os.sched_getaffinity(0))
    config = EngineConfig(model_dir="unused")
    big = ROUTER_ALL_CORES_MIN_HIDDEN
    assert router_threads_for(config, big) == cores
    assert router_threads_for(config, big, routers_on_node=2) == max(1, cores // 2)
    assert router_threads_for(config, big, routers_on_node=cores * 4) == 1
    small = router_threads_for(config, big // 2)  # the workers' count
    assert router_threads_for(config, big // 2, routers_on_node=2) == small
    pinned = EngineConfig(model_dir="unused", router_threads=3)
    assert router_threads_for(pinned, big, routers_on_node=2) == 3
