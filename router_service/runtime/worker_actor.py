"""The expert worker as a Ray actor: `ExpertWorker` plus load progress, pings, packed tensors and
the socket data plane's server. Workers are detached, named actors (`{cluster}:worker-{id}` in the
NAMESPACE namespace), so they outlive the router that started them.

Each worker runs three concurrency groups: the default one computes layers (one at a time),
"control" loads and drops layouts while layers keep running, and "health" answers pings even while a
layer computes, which is how a stopped or hung process is told apart from a slow one.

A worker knows nothing of routers: it owns its data-plane token and serves `forward` to every router
that asked for it (`open_data_plane`), so several routers share one pool of workers.
"""

from __future__ import annotations

import secrets

import ray
from ray.experimental import tqdm_ray

from expert_workers.worker import ExpertWorker, MissingLayout
from moe_serving import tracing
from router_service.default_model import ensure_default_model
from router_service.errors import worker_error
from router_service.runtime.data_plane import DataPlaneServer, pack, unpack_batch

NAMESPACE = "moe-serving"  # the routers and the workers are named actors here


# ---- the worker side ---------------------------------------------------------------------------


class RayExpertWorker(ExpertWorker):
    """ExpertWorker as a Ray actor: the same class, plus load progress, pings and packed tensors.

    progress: "bar" (a Ray tqdm bar per worker, drawn by the driver's terminal), "log" (one line per
    layer, for logs that are not a terminal) or "off". merge_frames: whether the data plane runs
    frames of one layer that wait together as one `forward` (`DataPlaneServer`).
    """

    def __init__(self, *args, progress: str = "bar", merge_frames: bool = True, **kwargs):
        self._progress = progress
        self._bar = None
        self._data_plane = None
        self._merge_frames = merge_frames
        super().__init__(*args, **kwargs)
        tracing.set_process(f"expert worker {self.worker_id}")

    @property
    def checkpoint(self):
        if self._checkpoint is None:  # on a node that has not seen the built-in model yet: build it
            ensure_default_model(self.model_dir)
        return super().checkpoint

    def on_layer_loaded(self, layer: int, done: int, total: int) -> None:
        if self._progress == "bar":
            if done == 1:
                self._bar = tqdm_ray.tqdm(
                    total=total, desc=f"expert worker {self.worker_id}: layers", position=self.worker_id
                )
            self._bar.update(1)
            if done == total:
                self._bar.close()
        elif self._progress == "log":
            print(f"expert worker {self.worker_id}: loaded layer {layer} ({done}/{total})", flush=True)
        super().on_layer_loaded(layer, done, total)

    @ray.method(concurrency_group="health")
    def ping(self) -> str:
        """The node this worker runs on; answered even while a layer computes."""
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="control")
    def load_layout(self, key: int, experts_per_layer: dict[int, list[int]]) -> dict:
        return super().load_layout(key, experts_per_layer)

    @ray.method(concurrency_group="control")
    def drop_layout(self, key: int) -> None:
        super().drop_layout(key)

    @ray.method(concurrency_group="control")
    def describe(self) -> dict:
        """ExpertWorker's description, plus the data plane's counters once it serves ("calls",
        "frames", "rows", "merged_calls": rows / calls is the rows per grouped FFN call)."""
        info = super().describe()
        if self._data_plane is not None:
            info["data_plane"] = self._data_plane.stats()
        return info

    @ray.method(concurrency_group="control")
    def set_labels(self, labels: dict) -> None:
        super().set_labels(labels)

    @ray.method(concurrency_group="control")
    def open_data_plane(self) -> tuple[str, int, bytes]:
        """(host, port, token) of this worker's data plane (the "socket" transport): `forward` on a
        TCP port of this node for any connection that sends the token first.

        The server and its random token are made once, by the first call, and serve every router
        of the pool at once; whoever can call this actor is inside the Ray cluster and gets them. A
        dead router's connections end when its kernel closes them."""
        if self._data_plane is None:
            host = ray.util.get_node_ip_address()
            self._data_plane = DataPlaneServer(
                self.forward, self.worker_id, secrets.token_bytes(16), host, merge_frames=self._merge_frames
            )
        return (*self._data_plane.address, self._data_plane.token)

    @ray.method(concurrency_group="control")
    def set_tracing(self, on: bool) -> None:
        super().set_tracing(on)

    @ray.method(concurrency_group="control")
    def take_trace(self) -> list[dict]:
        return super().take_trace()

    def forward_packed(self, layer: int, item: tuple | None) -> tuple | None:
        """`forward` on a (layout, packed batch) item, returning the packed partial; None when there
        is no work.

        Errors are named here (worker and layer) because a compiled graph hands the first error of an
        execution to every output, so the router cannot tell which worker raised.
        """
        if item is None:
            return None
        layout, packed = item
        try:
            with tracing.span("worker call", {"layer": layer}):
                return pack(self.forward(layer, unpack_batch(packed), layout))
        except Exception as e:  # re-raised with the worker and layer named; nothing is swallowed
            raise worker_error(self.worker_id, layer, e, stale=isinstance(e, MissingLayout)) from e


WORKER_ACTOR = ray.remote(concurrency_groups={"control": 1, "health": 1})(RayExpertWorker)
