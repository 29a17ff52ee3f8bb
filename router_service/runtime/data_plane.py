"""How tensors cross between a router and its expert workers, on both sides of the wire.

- Ray actor calls (the "ray" and "compiled" transports) carry tensors as raw bytes in numpy arrays
  (`pack` / `unpack`), not as pickled torch tensors.
- The "socket" transport's data plane: frames on a TCP connection (`send_frame` / `recv_frame`) and
  the worker's server (`DataPlaneServer`), a thread in the worker actor.

Framing: a 4-byte little-endian header length, the msgpack header, then the bytes of each tensor the
header lists (dtype name, shape), back to back. A request carries the layer, the layout and the
`ExpertBatch` fields; a reply carries the partial, or the worker's error message. The first frame of
a connection is the worker's random token (which the worker hands any caller of its actor): the port
answers nobody else.

Imports no transport and no actor: the worker actor and the transports both build on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import socket
import struct
import threading

import msgpack
import torch

from expert_workers.batching import merge_batches, split_output
from expert_workers.worker import ExpertBatch, MissingLayout
from moe_serving import tracing
from moe_serving.tensors import from_raw, to_raw
from router_service.errors import worker_error

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
BATCH_FIELDS = [f.name for f in dataclasses.fields(ExpertBatch)]

# ---- tensors on the wire -------------------------------------------------------------------------
# Tensors cross Ray as raw bytes in numpy arrays (`moe_serving.tensors.to_raw`), not as pickled torch
# tensors: Ray reads numpy zero-copy from shared memory, while a pickled tensor is copied through
# torch's serialiser. Measured on a 2-core machine, two workers, T=8 x H=2048 fp32: 2.1 ms -> 0.7 ms
# per round trip; T=4096 (32 MB each way per worker): 330 ms -> 32 ms. Bytes are bytes, so bf16
# arrives bit-exact.


def pack(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else to_raw(t)


def unpack(p: tuple | None) -> torch.Tensor | None:
    """The tensor over the received bytes, without a copy (read-only memory: never written to)."""
    return None if p is None else from_raw(*p, copy=False)


def pack_batch(batch: ExpertBatch | None) -> tuple | None:
    if batch is None:
        return None
    return tuple(pack(getattr(batch, f.name)) for f in dataclasses.fields(ExpertBatch))


def unpack_batch(packed: tuple | None) -> ExpertBatch | None:
    return None if packed is None else ExpertBatch(*(unpack(p) for p in packed))


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


def accept_forever(sock: socket.socket, on_connection) -> None:
    """Hand each connection `sock` accepts to `on_connection`, until the socket is closed."""
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:  # closed
            return
        on_connection(conn)


def close_listener(sock: socket.socket) -> None:
    """Stop a listening socket that a thread may be blocked in accept() on. close() alone leaves it
    listening (the kernel keeps it for that call), and new peers would still connect; shutdown()
    wakes the accept() up first."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


# ---- the worker side ---------------------------------------------------------------------------------


MERGE_MAX_ROWS = 8192  # rows of one merged call at most (the first frame is taken whatever its size)


@dataclasses.dataclass
class _Work:
    """One frame's work, queued by its connection's thread until a call computes it."""

    layer: int
    layout: int | None
    batch: ExpertBatch
    done: bool = False
    out: torch.Tensor | None = None
    error: str | None = None
    stale: bool = False  # the error is a layout this worker does not hold (`StaleLayout`)

    @property
    def key(self) -> tuple:
        """What frames must share to run as one call: layer, layout, and x's dtype and width."""
        x = self.batch.x
        return (self.layer, self.layout, x.dtype, tuple(x.shape[1:]))


class DataPlaneServer:
    """Serves `forward(layer, batch, layout) -> partial` on a TCP port to any number of connections.

    `host`: the address to listen on (the node's); `token`: what a connection must send first (the
    worker's own; every router of a pool sends the same one).

    Each connection has a thread that reads its frames, queues each one and waits for its result.
    One call computes at a time (one layer at a time, as the actor's own calls run). With
    `merge_frames`, a call takes the oldest waiting frame plus every other waiting frame of the same
    layer and layout (up to `max_rows` rows in all), runs them as one `forward` over the merged batch
    (`expert_workers.batching`) and hands each connection its own rows. Nothing waits to be merged: a
    frame that arrives while nothing computes runs at once; only frames that queued up behind a
    running call are merged. An exception in `forward` comes back as an error frame, named, to every
    frame of that call; the connections stay usable.

    There is no compute thread of its own: a connection thread that finds no call running runs the
    next one itself (its own frame, or older ones first), and when a call ends one waiting thread
    takes the next. A separate compute thread cost every frame two thread hand-offs: the median round
    trip of an [8, 2048] frame on the loaded 2-core machine was 165 us with one, 125 us this way and
    116 us before merging existed; merging saves nothing when frames do not wait.

    `stats()`: calls run, frames served and rows computed (rows per call is the GEMMs' batch).
    """

    def __init__(
        self,
        forward,
        worker_id: int,
        token: bytes,
        host: str,
        merge_frames: bool = True,
        max_rows: int = MERGE_MAX_ROWS,
    ):
        self._forward = forward
        self.worker_id = worker_id
        self.token = token
        self.merge_frames = merge_frames
        self.max_rows = max_rows
        self._cond = threading.Condition()  # guards everything below
        self._queue: list[_Work] = []  # waiting frames, oldest first
        self._computing = False  # a call runs (in some connection's thread)
        self._stats = {"calls": 0, "frames": 0, "rows": 0, "merged_calls": 0}
        self._sock = socket.create_server((host, 0))
        self.address = (host, self._sock.getsockname()[1])
        threading.Thread(target=self._accept, name="data-plane-accept", daemon=True).start()

    def close(self) -> None:
        """Stop accepting (connections already open end when their router closes them)."""
        close_listener(self._sock)

    def stats(self) -> dict:
        """{"calls", "frames", "rows", "merged_calls"} so far: `forward` calls, frames they served,
        rows they computed, and the calls that merged more than one frame."""
        with self._cond:
            return dict(self._stats)

    def _accept(self) -> None:
        accept_forever(
            self._sock,
            lambda conn: threading.Thread(
                target=self._serve, args=(conn,), name="data-plane", daemon=True
            ).start(),
        )

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            hello, _ = recv_frame(conn)
            if not hmac.compare_digest(bytes(hello.get("token", b"")), self.token):
                log.warning("expert worker %d: a data-plane connection sent a wrong token", self.worker_id)
                return
            while True:
                header, tensors = recv_frame(conn)
                work = _Work(header["layer"], header["layout"], ExpertBatch(*tensors))
                self._compute(work)
                if work.error is not None:  # sent back, named; the connection stays usable
                    send_frame(conn, {"error": work.error, "stale": work.stale})
                else:
                    send_frame(conn, {}, [work.out])
                work.out = None
        except (ConnectionError, OSError):
            pass  # the router went away: it reconnects if it needs us
        finally:
            conn.close()

    def _compute(self, work: _Work) -> None:
        """Queue `work`; return once a call has computed it (this thread's or another's)."""
        with self._cond:
            self._queue.append(work)
        while True:
            with self._cond:
                while self._computing and not work.done:
                    self._cond.wait()
                if work.done:
                    return
                # No call runs and ours waits (only a call takes frames off the queue): run the next.
                self._computing = True
                group = self._take()
            try:
                rows = self._call(group)
            finally:
                with self._cond:
                    self._computing = False
                    for w in group:
                        w.done = True
                        if w.out is None and w.error is None:
                            w.error = f"expert worker {self.worker_id}: the data-plane call did not finish"
                    self._stats["calls"] += 1
                    self._stats["frames"] += len(group)
                    self._stats["rows"] += rows
                    self._stats["merged_calls"] += len(group) > 1
                    self._cond.notify_all()

    def _take(self) -> list[_Work]:
        """Off the queue (under the lock): the oldest frame and, when merging, every waiting frame of
        its layer and layout that fits under max_rows."""
        first = self._queue.pop(0)
        group = [first]
        if self.merge_frames and self._queue:
            rows, rest = first.batch.x.shape[0], []
            for work in self._queue:
                n = work.batch.x.shape[0]
                if work.key == first.key and rows + n <= self.max_rows:
                    group.append(work)
                    rows += n
                else:
                    rest.append(work)
            self._queue = rest
        return group

    def _call(self, group: list[_Work]) -> int:
        """One `forward` over the group's frames merged; each frame gets its rows or the error.
        Returns the rows computed."""
        layer, layout = group[0].layer, group[0].layout
        try:
            merged, sizes = merge_batches([w.batch for w in group])
            rows = sum(sizes)
            with tracing.span("worker call", {"layer": layer, "frames": len(group), "rows": rows}):
                out = self._forward(layer, merged, layout)
            if len(group) == 1:
                group[0].out = out
            else:
                for work, part in zip(group, split_output(out.to("cpu"), sizes), strict=True):
                    work.out = part
            return rows
        except Exception as e:  # every frame of the call gets the error, named
            stale = isinstance(e, MissingLayout)
            message = str(worker_error(self.worker_id, layer, e, stale))
            for work in group:
                work.out, work.error, work.stale = None, message, stale
            return 0
