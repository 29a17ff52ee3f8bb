"""The "socket" transport (Ray actors, layers over one TCP connection per worker and lane): bit-
identical to "local", worker errors named, a killed worker's rows re-sent, a refused stranger; and,
over it, micro-batch overlap (equal tokens) and step traces with the workers on the router's clock."""

import socket
import threading
import time

import pytest
import ray
import torch
from conftest import probe_batches, transport_probe_outputs
from tiny_models import VOCAB

from expert_workers.worker import MissingLayout
from router_service import Engine
from router_service.errors import WorkerError
from router_service.runtime.data_plane import DataPlaneServer, recv_frame, send_frame
from router_service.runtime.local_ray import start_local_ray

THREADS = 1  # transports agree bit for bit at equal thread counts


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    start_local_ray(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def in_router(engine, fn, *args):
    return ray.get(engine._router.__ray_call__.remote(fn, *args))


def _probes():
    """Functions run inside the Router actor; nested, so that Ray ships them by value (the actor
    cannot import this test module)."""

    def connections(router) -> int:  # open data-plane connections, over all workers and lanes
        return sum(len(c) for c in router.dispatcher.transport._conns.values())

    return connections


connections = _probes()


# ---- frames and the data-plane server, in this process ----------------------------------------


def test_frames_carry_tensors_exactly():
    a, b = socket.socketpair()
    tensors = [
        torch.randn(3, 5),
        None,
        torch.randn(4, 7).to(torch.bfloat16),
        torch.arange(6),
        torch.empty(0, 8),
        torch.randn(512, 1024),  # 2 MiB: more than one send
    ]
    got = []
    reader = threading.Thread(target=lambda: got.extend(recv_frame(b)))  # the socket buffer is smaller
    reader.start()
    send_frame(a, {"layer": 3, "layout": 7}, tensors)
    reader.join(timeout=30)
    header, got = got
    assert header == {"layer": 3, "layout": 7}
    for g, t in zip(got, tensors, strict=True):
        assert (g is None) if t is None else (g.dtype == t.dtype and torch.equal(g, t))
    a.close()
    with pytest.raises(ConnectionError):
        recv_frame(b)


def test_data_plane_refuses_a_wrong_token_and_names_worker_errors():
    def forward(layer, batch, layout):
        if layer == 9:
            raise KeyError("no such layer")
        if layout == 4:
            raise MissingLayout("holds no layout 4")
        return batch.x * 2

    server = DataPlaneServer(forward, 5, b"right", "127.0.0.1")
    stranger = socket.create_connection(server.address)
    send_frame(stranger, {"token": b"wrong"})
    with pytest.raises(ConnectionError):  # closed without an answer
        send_frame(stranger, {"layer": 1, "layout": 0}, [torch.ones(1, 2)] + [None] * 5)
        recv_frame(stranger)
    conn = socket.create_connection(server.address)
    send_frame(conn, {"token": b"right"})
    x = torch.randn(2, 3)
    batch = [
        x,
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0),
        torch.zeros(1, dtype=torch.long),
        None,
        None,
    ]
    send_frame(conn, {"layer": 9, "layout": 0}, batch)
    header, _ = recv_frame(conn)
    assert "expert worker 5 failed in MoE layer 9: KeyError" in header["error"]
    assert not header["stale"]
    send_frame(conn, {"layer": 1, "layout": 4}, batch)  # an out-of-date placement: told apart
    header, _ = recv_frame(conn)
    assert header["stale"] and "holds no layout 4" in header["error"]
    send_frame(conn, {"layer": 1, "layout": 0}, batch)  # the connection still serves
    _, (out,) = recv_frame(conn)
    assert torch.equal(out, x * 2)
    server.close()


# ---- the transport, end to end ----------------------------------------------------------------------


@pytest.mark.parametrize("family, num_workers", [("deepseek_v3", 2), ("qwen2_moe", 3), ("gpt_oss", 3)])
def test_identical_to_local(family, num_workers, tiny_model_dir):
    d = tiny_model_dir(family)
    ids = torch.randint(3, VOCAB, (2, 9))
    hs = probe_batches()

    def run(engine):
        return transport_probe_outputs(engine, ids, hs)

    with Engine.from_pretrained(d, num_workers=num_workers, num_threads=THREADS) as local:
        exp = run(local)
    with Engine.from_pretrained(
        d, num_workers=num_workers, transport="socket", num_threads=THREADS
    ) as engine:
        assert in_router(engine, connections) == 2 * num_workers  # one per worker and lane
        got = run(engine)
    for g, e in zip(got, exp, strict=True):
        assert torch.equal(g, e)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    d = tiny_model_dir("deepseek_v3")
    with (
        Engine.from_pretrained(d, num_workers=2, num_threads=THREADS) as local,
        Engine.from_pretrained(d, num_workers=2, transport="socket", num_threads=THREADS) as sock,
    ):
        yield local, sock


def test_worker_error_names_worker_and_layer(engines):
    local, sock = engines

    def _swap(router, worker, layer):  # the worker raises inside forward for `layer`, or stops raising
        def swap(w):
            if hasattr(w, "stash"):
                w.layers[layer] = w.__dict__.pop("stash")
            else:
                w.stash = w.layers.pop(layer)

        ray.get(router.dispatcher.transport._actors[worker].__ray_call__.remote(swap))

    ids = torch.randint(3, VOCAB, (2, 16))
    expected = local.forward(ids)
    for worker in (1, 0):
        in_router(sock, _swap, worker, 2)
        with pytest.raises(WorkerError, match=f"expert worker {worker} failed in MoE layer 2"):
            sock.forward(ids)
        in_router(sock, _swap, worker, 2)
        assert torch.equal(sock.forward(ids), expected)  # the connections stayed in step


def test_micro_batch_overlap_gives_the_same_tokens(tiny_model_dir):
    """16 greedy streams decoded as two overlapped micro-batches per step and as one batch: the same
    tokens (and the overlapped steps did run)."""
    d = tiny_model_dir("deepseek_v3")
    prompts = [torch.randint(3, VOCAB, (int(n),)).tolist() for n in torch.randint(4, 12, (16,))]

    def tokens(engine):
        streams = [engine.generate_stream(p, 12) for p in prompts]
        out = [[] for _ in prompts]
        for i, s in enumerate(streams):
            for chunk in s:
                out[i] += chunk["token_ids"]
        return out

    runs = {}
    for setting in ("off", 2):
        with Engine.from_pretrained(
            d, num_workers=2, transport="socket", num_threads=THREADS, micro_batch_min_tokens=setting
        ) as engine:
            runs[setting] = tokens(engine)
            overlapped = in_router(engine, lambda r: r.scheduler.batch.overlap is not None)
            assert overlapped == (setting != "off")
    assert runs["off"] == runs[2]


def test_trace_puts_workers_on_the_router_clock(engines):
    _, sock = engines
    ids = torch.randint(3, VOCAB, (9,)).tolist()
    list(sock.generate_stream(ids, 3))
    sock.start_trace()
    list(sock.generate_stream(ids, 5))
    trace = sock.stop_trace()
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(names.values()) == ["expert worker 0", "expert worker 1", "router"]
    spans = [e for e in events if e["ph"] == "X"]
    waits = [e for e in spans if e["name"] == "wait" and names[e["pid"]] == "router"]
    calls = [e for e in spans if e["name"] == "worker call"]
    assert waits and calls and {names[e["pid"]] for e in calls} == {"expert worker 0", "expert worker 1"}
    # every worker call ends inside the router's wait on that layer: one clock (a little slack for the
    # reply in flight)
    for c in calls:
        end = c["ts"] + c["dur"]
        assert any(
            w["args"]["layer"] == c["args"]["layer"]
            and w["ts"] - 5e3 <= c["ts"]
            and end <= w["ts"] + w["dur"]
            for w in waits
        ), c
    assert {"decode step", "model", "moe block", "gate", "plan", "combine", "attention"} <= {
        e["name"] for e in spans
    }
    sock.start_trace()  # a second trace starts empty and the engine still serves untraced
    assert len([e for e in sock.stop_trace()["traceEvents"] if e["ph"] == "X"]) == 0
    assert list(sock.generate_stream(ids, 2))


def test_killed_worker_changes_no_output_and_is_replaced(engines):
    """Last: kills a worker of the shared engine between two passes; its connection breaks, its rows
    go to the survivor, and the membership controller starts a replacement (connected too)."""
    local, sock = engines
    ids = torch.randint(3, VOCAB, (2, 5))
    expected = local.forward(ids)

    def kill_worker_1(router):
        actor = router.dispatcher.transport._actors[1]
        ray.kill(actor)
        for _ in range(200):  # ray.kill is asynchronous: wait until the actor is gone
            try:
                ray.get(actor.ping.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                return
            time.sleep(0.05)

    in_router(sock, kill_worker_1)
    torch.testing.assert_close(sock.forward(ids), expected, rtol=1e-5, atol=1e-6)
    assert sock.cluster_state()["elastic"]["events"]["workers_lost"] == 1
    deadline = time.monotonic() + 60
    while sock.cluster_state()["num_workers"] < 2:
        assert time.monotonic() < deadline, "the lost worker was not replaced"
        time.sleep(0.2)
    assert in_router(sock, connections) == 4
    torch.testing.assert_close(sock.forward(ids), expected, rtol=1e-5, atol=1e-6)
