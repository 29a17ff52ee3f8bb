"""The "socket" transport: Ray for the control plane, one TCP connection per worker for the layers.

Everything but the hot path is the "ray" transport's: the same detached worker actors, placed,
loaded, health-checked, retired and rediscovered through Ray. Only `run_layer` changes: a Ray actor
call costs the router ~0.7 ms to submit and the pair of processes ~2 ms more of Ray's own work per
round trip on a loaded 2-core machine (bench.decode_profile: 3.6 ms of a 6.5 ms layer), and a
decode step makes one per MoE layer. Here each worker serves its `forward` on a socket of its own
(`DataPlaneServer`, a thread in the actor, started by `open_data_plane`), and the router writes one
frame per worker and reads one back: a small msgpack header and the tensors' raw bytes, no pickling
and no object store.

Framing: a 4-byte little-endian header length, the msgpack header, then the bytes of each tensor the
header lists (dtype name, shape), back to back. A request carries the layer, the layout and the
`ExpertBatch` fields; a reply carries the partial, or the worker's error message.

Faults keep the "ray" transport's meaning. A worker whose connection breaks (its process died: the
kernel closes its sockets) is lost, and its rows go elsewhere; a worker that hangs is found by the
same watchdog, which kills its actor, which closes the connection. An exception in worker code comes
back as an error frame and is raised as `WorkerError`, after every other worker's reply of that
layer has been read, so the connections stay in step. The first frame of a connection is a per-
transport random token: the port answers nobody else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import secrets
import socket
import struct
import threading

import msgpack
import ray
import torch

from expert_workers.worker import ExpertBatch
from moe_serving import tracing
from moe_serving.tensors import from_raw, to_raw
from router_service.runtime.ray_transport import DESCRIBE_TIMEOUT_S, RayTransport, kill_actor
from router_service.runtime.transport import LANES, LayerResult, WorkerError, worker_error

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
CONNECT_TIMEOUT_S = 10.0
_FIELDS = [f.name for f in dataclasses.fields(ExpertBatch)]


# ---- frames ----------------------------------------------------------------------------------------


def send_frame(sock: socket.socket, header: dict, tensors: list[torch.Tensor | None] = ()) -> None:
    """One frame: header (plus each tensor's dtype and shape) and the tensors' bytes, sent without
    joining them into one buffer."""
    metas, bufs = [], []
    for t in tensors:
        if t is None:
            metas.append(None)
            continue
        dtype, shape, data = to_raw(t)
        metas.append([dtype, shape])
        bufs.append(memoryview(data).cast("B"))
    head = msgpack.packb({**header, "tensors": metas})
    _sendall(sock, [memoryview(_LEN.pack(len(head))), memoryview(head), *bufs])


def _sendall(sock: socket.socket, bufs: list[memoryview]) -> None:
    bufs = [b for b in bufs if len(b)]
    while bufs:
        sent = sock.sendmsg(bufs)
        while sent and bufs:  # drop what went, keep the rest of a partly sent buffer
            if sent >= len(bufs[0]):
                sent -= len(bufs[0])
                bufs.pop(0)
            else:
                bufs[0] = bufs[0][sent:]
                sent = 0


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed by the peer")
        got += k
    return buf


def recv_frame(sock: socket.socket) -> tuple[dict, list[torch.Tensor | None]]:
    """(header, tensors) of the next frame; ConnectionError when the peer is gone."""
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    header = msgpack.unpackb(_recv_exact(sock, n))
    tensors: list[torch.Tensor | None] = []
    for meta in header.pop("tensors", []):
        if meta is None:
            tensors.append(None)
            continue
        dtype, shape = meta
        nbytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        for d in shape:
            nbytes *= d
        tensors.append(from_raw(dtype, shape, _recv_exact(sock, nbytes), copy=False))
    return header, tensors


# ---- the worker side ---------------------------------------------------------------------------------


class DataPlaneServer:
    """Serves `forward(layer, batch, layout) -> partial` on a TCP port, one thread per connection.

    `host`: the address to listen on (the node's); `token`: what a connection must send first.
    """

    def __init__(self, forward, worker_id: int, token: bytes, host: str):
        self._forward = forward
        self._compute = threading.Lock()  # one layer at a time, as the actor's own calls run
        self.worker_id = worker_id
        self.token = token
        self._sock = socket.create_server((host, 0))
        self.address = (host, self._sock.getsockname()[1])
        threading.Thread(target=self._accept, name="data-plane-accept", daemon=True).start()

    def close(self) -> None:
        """Stop accepting (connections already open end when their router closes them)."""
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), name="data-plane", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            hello, _ = recv_frame(conn)
            if not hmac.compare_digest(bytes(hello.get("token", b"")), self.token):
                log.warning("expert worker %d: a data-plane connection sent a wrong token", self.worker_id)
                return
            while True:
                header, tensors = recv_frame(conn)
                layer = header["layer"]
                try:
                    with self._compute, tracing.span("worker call", {"layer": layer}):
                        out = self._forward(layer, ExpertBatch(*tensors), header["layout"])
                except Exception as e:  # sent back, named; the connection stays usable
                    send_frame(conn, {"error": str(worker_error(self.worker_id, layer, e))})
                    continue
                send_frame(conn, {}, [out])
        except (ConnectionError, OSError):
            pass  # the router went away (or was replaced): it reconnects if it needs us
        finally:
            conn.close()


# ---- the router side ---------------------------------------------------------------------------------


class SocketTransport(RayTransport):
    """The "ray" transport's workers, each layer sent over one TCP connection per worker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._token = secrets.token_bytes(16)
        # One connection per worker and micro-batch lane: two lanes in flight never share a socket,
        # so each reads its own replies.
        self._conns: dict[int, list[socket.socket]] = {}

    # ---- connections ----

    def _connect(self, workers) -> None:
        """Open a connection to each worker; one that cannot be reached keeps plain actor calls."""
        refs = {w: self._actors[w].open_data_plane.remote(self._token) for w in workers if w in self._actors}
        for w, ref in refs.items():
            socks = []
            try:
                host, port = ray.get(ref, timeout=DESCRIBE_TIMEOUT_S)
                for _ in range(LANES):
                    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
                    socks.append(sock)
                    sock.settimeout(None)  # a hung worker is the watchdog's to find
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    send_frame(sock, {"token": self._token})
            except Exception as e:  # noqa: BLE001 - any failure leaves this worker on actor calls
                log.warning("expert worker %d: no data-plane connection (%s); using actor calls", w, e)
                for sock in socks:
                    sock.close()
                continue
            self._disconnect([w])
            self._conns[w] = socks

    def _disconnect(self, workers) -> None:
        for w in workers:
            for sock in self._conns.pop(w, ()):
                sock.close()

    def start_workers(self, specs):
        errors = super().start_workers(specs)
        self._connect([w for w in specs if w not in errors])
        return errors

    def discover(self) -> dict[int, dict]:
        infos = super().discover()
        self._connect(list(infos))
        return infos

    def retire(self, workers: set[int]) -> None:
        self._disconnect(workers)
        super().retire(workers)

    def check(self, workers: tuple[int, ...], timeout_s: float) -> dict[int, str]:
        lost = super().check(workers, timeout_s)
        self._disconnect(lost)
        return lost

    def close(self) -> None:
        self._disconnect(list(self._conns))
        super().close()

    # ---- the hot path ----

    def run_layer(self, layer: int, work: dict, lane: int = 0, waiting=None) -> LayerResult:
        direct = {w: item for w, item in work.items() if w in self._conns}
        rest = {w: item for w, item in work.items() if w not in direct}
        result = super().run_layer(layer, rest, lane, waiting) if rest else LayerResult()
        t0 = tracing.now_us()
        sent = []
        for w, (layout, batch) in direct.items():
            try:
                send_frame(
                    self._conns[w][lane],
                    {"layer": layer, "layout": layout},
                    [getattr(batch, f) for f in _FIELDS],
                )
                sent.append(w)
            except OSError as e:
                result.lost[w] = self._broken(w, e)
        t1 = tracing.now_us()
        tracing.record("submit", t0, t1, {"layer": layer})
        error = None
        self._watch.begin(sent)
        with waiting() if waiting is not None else contextlib.nullcontext():
            error = self._collect_frames(layer, work, sent, lane, result, t1)
        if error is not None:
            raise error
        return result

    def _collect_frames(self, layer, work, sent, lane, result: LayerResult, t1: float) -> WorkerError | None:
        """Read every sent worker's reply (all of them, even after an error: the connections stay
        in step); the first worker error, if any."""
        error = None
        try:
            for w in sent:
                try:
                    header, tensors = recv_frame(self._conns[w][lane])
                except (ConnectionError, OSError) as e:
                    result.lost[w] = self._broken(w, e)
                    continue
                if "error" in header:
                    error = error or WorkerError(header["error"])
                    continue
                result.partials[w] = tensors[0].to(work[w][1].x.device)  # owns its buffer
        finally:
            self._watch.end()
            tracing.record("wait", t1, tracing.now_us(), {"layer": layer})
        return error

    def _broken(self, worker: int, e: BaseException) -> str:
        """A worker whose connection broke: gone for good (its actor is killed if it still runs)."""
        self._disconnect([worker])
        kill_actor(self._actors.get(worker))
        return self._lost(worker, e)
