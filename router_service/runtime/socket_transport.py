"""The "socket" transport: Ray for the control plane, one TCP connection per worker for the layers.

Everything but the hot path is the "ray" transport's: the same detached worker actors, placed,
loaded, health-checked, retired and rediscovered through Ray. Only `run_layer` changes: a Ray actor
call costs the router ~0.7 ms to submit and the pair of processes ~2 ms more of Ray's own work per
round trip on a loaded 2-core machine (bench.decode_profile: 3.6 ms of a 6.5 ms layer), and a
decode step makes one per MoE layer. Here each worker serves its `forward` on a socket of its own
(`DataPlaneServer`, a thread in the actor, started by `open_data_plane`), and the router writes one
frame per worker and reads one back: a small msgpack header and the tensors' raw bytes, no pickling
and no object store.

Framing and the worker's server are in `data_plane.py`.

Faults keep the "ray" transport's meaning. A worker whose connection breaks (its process died: the
kernel closes its sockets) is lost, and its rows go elsewhere; a worker that hangs is found by the
same watchdog, which kills its actor, which closes the connection. An exception in worker code comes
back as an error frame and is raised as `WorkerError`, after every other worker's reply of that
layer has been read, so the connections stay in step. The first frame of a connection is the
worker's own random token, which `open_data_plane` hands to any caller of the actor (inside the Ray
cluster): the port answers nobody else, and every router of a pool connects to the same port.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import ray

from moe_serving import tracing
from router_service.errors import WorkerError
from router_service.runtime.data_plane import BATCH_FIELDS, recv_frame, send_frame
from router_service.runtime.ray_transport import DESCRIBE_TIMEOUT_S, RayTransport, kill_actor
from router_service.runtime.transport import LANES, LayerResult

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


# ---- the router side ---------------------------------------------------------------------------------


class SocketTransport(RayTransport):
    """The "ray" transport's workers, each layer sent over one TCP connection per worker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # One connection per worker and micro-batch lane: two lanes in flight never share a socket,
        # so each reads its own replies.
        self._conns: dict[int, list[socket.socket]] = {}

    # ---- connections ----

    def _connect(self, workers) -> None:
        """Open a connection to each worker; one that cannot be reached keeps plain actor calls."""
        refs = {w: self._actors[w].open_data_plane.remote() for w in workers if w in self._actors}
        for w, ref in refs.items():
            socks = []
            try:
                host, port, token = ray.get(ref, timeout=DESCRIBE_TIMEOUT_S)
                for _ in range(LANES):
                    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
                    socks.append(sock)
                    sock.settimeout(None)  # a hung worker is the watchdog's to find
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    send_frame(sock, {"token": token})
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

    def use_workers(self, workers: tuple[int, ...]) -> None:
        """At a pass boundary: connect to the placement's new workers, drop the connections to the
        ones it no longer uses."""
        super().use_workers(workers)
        self._disconnect([w for w in self._conns if w not in workers])
        self._connect([w for w in workers if w not in self._conns])

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
                    [getattr(batch, f) for f in BATCH_FIELDS],
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
                if header.get("stale"):  # the placement is out of date: the dispatcher re-sends
                    result.stale[w] = header["error"]
                elif "error" in header:
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
