"""Step traces in one process: spans nest as the code runs, tracing off records nothing, and the
result is a Chrome trace (the Ray transports' traces are tested in test_socket_transport.py)."""

import json

import torch
from tiny_models import VOCAB

from moe_serving import tracing
from router_service import Engine


def test_tracing_off_records_nothing():
    tracing.enable(False)
    with tracing.span("x", {"a": 1}):
        pass
    tracing.record("y", 0.0, 1.0)
    assert [e for e in tracing.take() if e["ph"] == "X"] == []


def test_local_trace_nests_the_step(tiny_model_dir):
    with Engine.from_pretrained(tiny_model_dir("deepseek_v3"), num_workers=2, num_threads=1) as engine:
        ids = torch.randint(3, VOCAB, (7,)).tolist()
        engine.start_trace()
        list(engine.generate_stream(ids, 4))
        trace = engine.stop_trace()
        json.dumps(trace)  # what a file holds
        spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert {e["pid"] for e in spans} == {spans[0]["pid"]}  # workers share the router's process here

        def inside(inner, outer):
            return outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + 1

        def parents(name, parent):
            kids = [e for e in spans if e["name"] == name]
            assert kids, name
            return all(any(inside(k, p) for p in spans if p["name"] == parent) for k in kids)

        for name, parent in (
            ("sample", "decode step"),
            ("decoder layer", "model"),
            ("moe block", "decoder layer"),
            ("gate", "moe block"),
            ("plan", "moe block"),
            ("experts", "moe block"),
            ("combine", "moe block"),
        ):
            assert parents(name, parent), (name, parent)
        assert all(
            any(inside(m, p) for p in spans if p["name"] in ("decode step", "prefill"))
            for m in spans
            if m["name"] == "model"
        )
        steps = [e for e in spans if e["name"] == "decode step"]
        assert len(steps) == 3 and all(e["args"]["sequences"] == 1 for e in steps)
        # no hooks are left behind once the trace stops
        assert not any(m._forward_hooks for m in engine.router.model.modules())
