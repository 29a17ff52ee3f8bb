"""A worker's data plane merges frames of one layer that wait together into one grouped FFN.

Without Ray: `merge_batches` / `split_output` on random batches against each part's own forward
(tiny transformers models), and `DataPlaneServer` over real loopback sockets (frames queued behind a
slow call are merged, each client gets its own rows, errors reach every client of the call, the
setting turns it off, a wrong token is refused). With Ray, one test: two router processes that
share one worker actor, each connecting with the token the worker hands out."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from conftest import kernel_available

from expert_workers.batching import merge_batches, split_output
from expert_workers.kernels import KERNELS, swiglu_dense, swiglu_experts
from expert_workers.worker import ExpertBatch, ExpertWorker
from moe_models.loading import spec_from_pretrained
from router_service.runtime.data_plane import BATCH_FIELDS, DataPlaneServer, recv_frame, send_frame

TOKEN = b"0123456789abcdef"


def random_batch(
    rows: int, hidden: int, experts: int, topk: int, shared: str = "weighted", dtype=torch.float32
) -> ExpertBatch:
    """`rows` rows, each routed to min(topk, experts) distinct local experts with random weights,
    pairs sorted by expert; shared: "weighted" (every other row, with weights), "ones" (every other
    row, weights None) or "none" (shared_rows None)."""
    k = min(topk, experts)
    x = torch.randn(rows, hidden).to(dtype)
    ids = torch.rand(rows, experts).argsort(1)[:, :k]
    order = ids.flatten().argsort(stable=True)
    pair_rows = torch.arange(rows).repeat_interleave(k)[order]
    weights = torch.rand(rows * k)[order]
    counts = torch.bincount(ids.flatten(), minlength=experts)
    shared_rows = shared_weights = None
    if shared != "none":
        shared_rows = torch.arange(0, rows, 2)
        shared_weights = torch.rand(shared_rows.numel()) if shared == "weighted" else None
    return ExpertBatch(x, pair_rows, weights, counts, shared_rows, shared_weights)


def pairs_by_expert(b: ExpertBatch) -> list[list[tuple[int, float]]]:
    """For each expert, its (row, weight) pairs in order."""
    out, start = [], 0
    for n in b.expert_counts.tolist():
        rows, weights = b.pair_rows[start : start + n].tolist(), b.pair_weights[start : start + n].tolist()
        out.append(list(zip(rows, weights, strict=True)))
        start += n
    return out


# ---- merge and split ----------------------------------------------------------------------------------


def test_merged_batch_keeps_the_contract():
    """Pairs grouped by expert, part 0's pairs of an expert before part 1's, rows offset; counts
    summed; shared rows offset, weights 1.0 for a part that had none; empty parts and parts
    without shared rows; one part comes back as it is."""
    parts = [
        random_batch(3, 8, 5, 2),
        random_batch(0, 8, 5, 2),
        random_batch(4, 8, 5, 2, shared="ones"),
        random_batch(2, 8, 5, 2, shared="none"),
        random_batch(5, 8, 5, 2),
    ]
    merged, sizes = merge_batches(parts)
    assert sizes == [3, 0, 4, 2, 5]
    assert torch.equal(merged.x, torch.cat([p.x for p in parts]))
    assert torch.equal(merged.expert_counts, sum(p.expert_counts for p in parts))
    offsets = [0, 3, 3, 7, 9]
    want = [[] for _ in range(5)]
    for p, off in zip(parts, offsets, strict=True):
        for e, pairs in enumerate(pairs_by_expert(p)):
            want[e] += [(r + off, w) for r, w in pairs]
    assert pairs_by_expert(merged) == want
    with_shared = [(p, off) for p, off in zip(parts, offsets, strict=True) if p.shared_rows is not None]
    assert torch.equal(merged.shared_rows, torch.cat([p.shared_rows + off for p, off in with_shared]))
    ones = [
        torch.ones(p.shared_rows.numel()) if p.shared_weights is None else p.shared_weights
        for p, _ in with_shared
    ]
    assert torch.equal(merged.shared_weights, torch.cat(ones))
    out = torch.randn(sum(sizes), 8)
    assert [o.shape[0] for o in split_output(out, sizes)] == sizes
    assert torch.equal(torch.cat(split_output(out, sizes)), out)

    none = merge_batches([random_batch(2, 8, 5, 2, shared="ones"), random_batch(3, 8, 5, 2, shared="ones")])[
        0
    ]
    assert none.shared_weights is None and none.shared_rows.tolist() == [0, 2, 4]
    absent = merge_batches(
        [random_batch(2, 8, 5, 2, shared="none"), random_batch(1, 8, 5, 2, shared="none")]
    )[0]
    assert absent.shared_rows is None and absent.shared_weights is None
    alone = random_batch(3, 8, 5, 2)
    same, sizes = merge_batches([alone])
    assert same is alone and sizes == [3]
    with pytest.raises(ValueError, match="local experts"):
        merge_batches([random_batch(2, 8, 5, 2), random_batch(2, 8, 4, 2)])


def gemm_batch_invariant(worker: ExpertWorker, layer: int) -> bool:
    """Whether this worker's GEMMs give a row the same bits alone and among other rows, on its own
    routed and shared weights (bench/batch_dependence.py measures the whole forward per kernel:
    fp32 "onednn" is invariant on the machine measured, the torch.mm-based kernels are not)."""
    lx = worker.layers[layer]
    shared_w13, shared_w2 = worker.shared[layer]
    fn, kernel = worker.spec.expert_fn, worker.kernel
    x = torch.randn(300, worker.spec.hidden_size).to(worker.dtype)

    def rows(n: int) -> list[torch.Tensor]:
        out = [swiglu_experts(kernel, x[:n], [n], lx.w13[:1], lx.w2[:1], fn)[:3]]
        if shared_w13 is not None:
            out.append(swiglu_dense(x[:n], shared_w13, shared_w2, kernel, fn)[:3])
        return out

    alone = rows(3)
    return all(torch.equal(a, b) for n in (4, 17, 64, 300) for a, b in zip(rows(n), alone, strict=True))


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])  # shared expert plain / behind a gate
@pytest.mark.parametrize("kernel", KERNELS)
def test_merged_forward_gives_each_part_its_own_forward(family, kernel, tiny_model_dir):
    if not kernel_available(kernel, torch.float32):
        pytest.skip(f"{kernel} does not run here")
    d = tiny_model_dir(family)
    spec = spec_from_pretrained(d)
    layer = spec.moe_layers[-1]
    experts = list(range(1, spec.num_experts, 2))  # a worker's slice: every other expert
    worker = ExpertWorker(0, str(d), {layer: experts}, spec=spec, kernel=kernel, num_threads=1)
    h, e, k = spec.hidden_size, len(experts), spec.top_k
    for shapes in ([5, 0, 3, 1], [1, 1], [40, 7, 0, 200], [0, 0]):
        kinds = ["weighted", "ones", "none"]
        parts = [random_batch(n, h, e, k, shared=kinds[i % 3]) for i, n in enumerate(shapes)]
        merged, sizes = merge_batches(parts)
        got = split_output(worker.forward(layer, merged), sizes)
        for part, out in zip(parts, got, strict=True):
            want = worker.forward(layer, part)
            torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    if kernel == "onednn" and gemm_batch_invariant(worker, layer):  # then merging changes no bit
        for part, out in zip(parts, got, strict=True):
            assert torch.equal(out, worker.forward(layer, part))
        parts = [random_batch(n, h, e, k, shared=kinds[i % 3]) for i, n in enumerate([3, 50, 1, 120])]
        merged, sizes = merge_batches(parts)
        for part, out in zip(parts, split_output(worker.forward(layer, merged), sizes), strict=True):
            assert torch.equal(out, worker.forward(layer, part))


# ---- the data-plane server over loopback sockets -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_worker(tiny_model_dir):
    d = tiny_model_dir("deepseek_v3")
    spec = spec_from_pretrained(d)
    kernel = "onednn" if kernel_available("onednn", torch.float32) else "loop"
    layers = {layer: list(range(spec.num_experts)) for layer in spec.moe_layers}
    return ExpertWorker(3, str(d), layers, spec=spec, kernel=kernel, num_threads=1)


class HeldForward:
    """The worker's forward, whose first call waits until `release` (the frames behind it queue up)."""

    def __init__(self, forward, fail_layer: int | None = None):
        self.forward, self.fail_layer = forward, fail_layer
        self.entered, self.release = threading.Event(), threading.Event()
        self.rows: list[int] = []  # rows of each call

    def __call__(self, layer, batch, layout):
        self.rows.append(batch.x.shape[0])
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30)
        if layer == self.fail_layer:
            raise KeyError("no such layer")
        return self.forward(layer, batch, layout)


def connect(server: DataPlaneServer, token: bytes = TOKEN) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=30)
    send_frame(sock, {"token": token})
    return sock


def send(sock: socket.socket, layer: int, batch: ExpertBatch, layout: int = 0) -> None:
    send_frame(sock, {"layer": layer, "layout": layout}, [getattr(batch, f) for f in BATCH_FIELDS])


def receive(sock: socket.socket) -> torch.Tensor | str:
    header, tensors = recv_frame(sock)
    return header["error"] if "error" in header else tensors[0]


def wait_queued(server: DataPlaneServer, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(server._queue) < n:
        assert time.monotonic() < deadline, f"{len(server._queue)} of {n} frames queued"
        time.sleep(0.005)


def run_held(server, held, first, frames):
    """`first` = (layer, batch) runs (held) on its own connection; then each of `frames` (layer,
    batch) is sent on a connection of its own, in order, and queues; then the call is released.
    Returns the replies: first's, then the frames' in order."""
    socks = [connect(server) for _ in range(1 + len(frames))]
    send(socks[0], *first)
    assert held.entered.wait(30)
    for i, (layer, batch) in enumerate(frames):
        send(socks[1 + i], layer, batch)
        wait_queued(server, i + 1)
    held.release.set()
    replies = [receive(s) for s in socks]
    return socks, replies


def expect_own_rows(worker, layer, batch, out):
    want = worker.forward(layer, batch)
    assert isinstance(out, torch.Tensor) and out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    if worker.kernel == "onednn":  # batch-invariant in fp32 (bench/batch_dependence.py)
        assert torch.equal(out, want)


@pytest.mark.parametrize("merge", [True, False])
def test_frames_waiting_together_run_as_one_call(tiny_worker, merge):
    w, spec = tiny_worker, tiny_worker.spec
    layer = spec.moe_layers[0]
    held = HeldForward(w.forward)
    server = DataPlaneServer(held, w.worker_id, TOKEN, "127.0.0.1", merge_frames=merge)
    first = (layer, random_batch(2, spec.hidden_size, spec.num_experts, spec.top_k))
    frames = [(layer, random_batch(n, spec.hidden_size, spec.num_experts, spec.top_k)) for n in (5, 3)]
    socks, replies = run_held(server, held, first, frames)
    for (lay, batch), out in zip([first, *frames], replies, strict=True):
        expect_own_rows(w, lay, batch, out)
    if merge:
        assert held.rows == [2, 8]
        assert server.stats() == {"calls": 2, "frames": 3, "rows": 10, "merged_calls": 1}
    else:
        assert held.rows == [2, 5, 3]
        assert server.stats() == {"calls": 3, "frames": 3, "rows": 10, "merged_calls": 0}
    batch = random_batch(4, spec.hidden_size, spec.num_experts, spec.top_k)  # idle: runs at once, alone
    send(socks[1], layer, batch)
    expect_own_rows(w, layer, batch, receive(socks[1]))
    assert server.stats()["calls"] == (3 if merge else 4)
    for s in socks:
        s.close()
    server.close()


def test_merging_takes_the_oldest_frames_layer_and_caps_rows(tiny_worker):
    """Queued: layer A (4 rows), layer B, layer A (3 rows), layer A (6 rows); with a cap of 8 rows
    the first call after the held one merges A's 4 + 3 rows, then B alone, then A's 6 rows."""
    w, spec = tiny_worker, tiny_worker.spec
    a, b = spec.moe_layers
    held = HeldForward(w.forward)
    server = DataPlaneServer(held, w.worker_id, TOKEN, "127.0.0.1", max_rows=8)
    h, e, k = spec.hidden_size, spec.num_experts, spec.top_k
    frames = [(a, random_batch(4, h, e, k)), (b, random_batch(2, h, e, k))]
    frames += [(a, random_batch(3, h, e, k)), (a, random_batch(6, h, e, k, shared="none"))]
    socks, replies = run_held(server, held, (b, random_batch(1, h, e, k)), frames)
    assert held.rows == [1, 7, 2, 6]
    for (layer, batch), out in zip(frames, replies[1:], strict=True):
        expect_own_rows(w, layer, batch, out)
    assert server.stats() == {"calls": 4, "frames": 5, "rows": 16, "merged_calls": 1}
    for s in socks:
        s.close()
    server.close()


def test_an_error_reaches_every_frame_of_the_call_and_connections_keep_working(tiny_worker):
    w, spec = tiny_worker, tiny_worker.spec
    layer = spec.moe_layers[0]
    held = HeldForward(w.forward, fail_layer=9)
    server = DataPlaneServer(held, w.worker_id, TOKEN, "127.0.0.1")
    h, e, k = spec.hidden_size, spec.num_experts, spec.top_k
    first = (layer, random_batch(2, h, e, k))
    frames = [(9, random_batch(3, h, e, k)), (9, random_batch(2, h, e, k))]
    socks, replies = run_held(server, held, first, frames)
    expect_own_rows(w, layer, first[1], replies[0])
    for reply in replies[1:]:
        assert isinstance(reply, str) and "expert worker 3 failed in MoE layer 9: KeyError" in reply
    assert held.rows == [2, 5]  # the failing frames ran as one call
    for sock in socks[1:]:  # both connections still serve
        batch = random_batch(3, h, e, k)
        send(sock, layer, batch)
        expect_own_rows(w, layer, batch, receive(sock))
    for s in socks:
        s.close()
    server.close()


def test_a_wrong_token_is_refused(tiny_worker):
    w, spec = tiny_worker, tiny_worker.spec
    server = DataPlaneServer(w.forward, w.worker_id, TOKEN, "127.0.0.1")
    stranger = connect(server, b"not the token")
    batch = random_batch(2, spec.hidden_size, spec.num_experts, spec.top_k)
    with pytest.raises(ConnectionError):  # closed without an answer
        send(stranger, spec.moe_layers[0], batch)
        receive(stranger)
    friend = connect(server)
    send(friend, spec.moe_layers[0], batch)
    expect_own_rows(w, spec.moe_layers[0], batch, receive(friend))
    assert server.stats()["frames"] == 1
    friend.close()
    server.close()


# ---- real processes: two routers, one worker actor -----------------------------------------------------


def _routers():
    """Functions that run in other processes; nested, so that Ray ships them by value."""

    def hold_first_call(worker, queued: int):
        """Wrap the actor's forward (before its data plane exists) so that its first data-plane
        call waits until `queued` frames queue up behind it."""
        real = worker.forward
        state = {"first": True}

        def held(layer, batch, layout=None):
            if state["first"]:
                state["first"] = False
                deadline = time.monotonic() + 60
                while len(worker._data_plane._queue) < queued and time.monotonic() < deadline:
                    time.sleep(0.005)
            return real(layer, batch, layout)

        worker.forward = held

    def router(actor, layer: int, batches: list[ExpertBatch]):
        """A router process: asks the worker for its data plane and sends one frame per lane (a
        connection each) before reading any reply."""
        import ray

        host, port, token = ray.get(actor.open_data_plane.remote())
        socks = []
        for batch in batches:
            sock = socket.create_connection((host, port), timeout=60)
            send_frame(sock, {"token": token})
            send_frame(sock, {"layer": layer, "layout": 0}, [getattr(batch, f) for f in BATCH_FIELDS])
            socks.append(sock)
        replies = []
        for sock in socks:
            header, tensors = recv_frame(sock)
            replies.append(header.get("error") or tensors[0].clone())
            sock.close()
        return (host, port, token), replies

    return hold_first_call, router


def test_two_router_processes_share_one_worker(tiny_model_dir):
    ray = pytest.importorskip("ray")
    from router_service.runtime.local_ray import start_local_ray
    from router_service.runtime.transport import WorkerSetup
    from router_service.runtime.worker_actor import WORKER_ACTOR

    hold_first_call, router = _routers()
    d = tiny_model_dir("deepseek_v3")
    spec = spec_from_pretrained(d)
    layer = spec.moe_layers[0]
    kernel = "onednn" if kernel_available("onednn", torch.float32) else "loop"
    setup = WorkerSetup(str(d), spec, torch.float32, "cpu", kernel, 1)
    local = setup.build(0)
    local.load_layout(0, {layer: list(range(spec.num_experts))})
    start_local_ray(num_cpus=4, include_dashboard=False)
    try:
        actor = setup.build(0, cls=WORKER_ACTOR.options(num_cpus=1).remote, progress="off")
        ray.get(actor.load_layout.remote(0, {layer: list(range(spec.num_experts))}))
        ray.get(actor.__ray_call__.remote(hold_first_call, 3))
        h, e, k = spec.hidden_size, spec.num_experts, spec.top_k
        work = {
            name: [random_batch(n, h, e, k) for n in sizes] for name, sizes in (("a", (3, 5)), ("b", (2, 7)))
        }
        task = ray.remote(num_cpus=0)(router)
        refs = {name: task.remote(actor, layer, batches) for name, batches in work.items()}
        results = {name: ray.get(ref, timeout=120) for name, ref in refs.items()}
        assert results["a"][0] == results["b"][0]  # one server, one token, for both routers
        for name, (_, replies) in results.items():
            for batch, out in zip(work[name], replies, strict=True):
                expect_own_rows(local, layer, batch, out)
        stats = ray.get(actor.describe.remote())["data_plane"]
        assert stats == {"calls": 2, "frames": 4, "rows": 17, "merged_calls": 1}
        ray.kill(actor)
    finally:
        ray.shutdown()
