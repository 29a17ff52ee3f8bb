"""The Ray runtime: the Router actor, the ExpertWorker actors and the "ray" transport.

The Engine starts (or joins) a Ray cluster and one Router actor; the Router actor creates the
ExpertWorker actors through its transport, in a placement group (SPREAD across nodes by default),
and loads them in parallel. `RayTransport.run_layer` sends each worker its ExpertBatch as one actor
call and gathers the partials; the calls run concurrently on the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from expert_workers.worker import ExpertBatch, ExpertWorker
from router_service.config import EngineConfig, WorkerResources
from router_service.placement import Placement
from router_service.router import Router
from router_service.transport import WorkerError, WorkerSetup, worker_error

log = logging.getLogger(__name__)

# ---- tensors on the wire -------------------------------------------------------------------------
# Tensors cross Ray as raw bytes in numpy arrays ("packed"), not as pickled torch tensors: Ray reads
# numpy zero-copy from shared memory, while a pickled tensor is copied through torch's serialiser.
# Measured on this 2-core machine, two workers, T=8 x H=2048 fp32: 2.1 ms -> 0.7 ms per round trip;
# T=4096 (32 MB each way per worker): 330 ms -> 32 ms. Bytes are bytes, so bf16 arrives bit-exact.

Packed = tuple  # (uint8 numpy array of the bytes, torch dtype, shape)


def pack(t: torch.Tensor | None) -> Packed | None:
    if t is None:
        return None
    return t.detach().cpu().contiguous().view(torch.uint8).numpy(), t.dtype, tuple(t.shape)


def unpack(p: Packed | None) -> torch.Tensor | None:
    """The tensor over the received bytes, without a copy (read-only memory: never written to)."""
    if p is None:
        return None
    data, dtype, shape = p
    with warnings.catch_warnings():  # torch warns that the shared-memory array is read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data).view(dtype).view(shape)


def pack_batch(batch: ExpertBatch | None) -> tuple | None:
    if batch is None:
        return None
    return tuple(pack(getattr(batch, f.name)) for f in dataclasses.fields(ExpertBatch))


def unpack_batch(packed: tuple | None) -> ExpertBatch | None:
    return None if packed is None else ExpertBatch(*(unpack(p) for p in packed))


# ---- the driver side ---------------------------------------------------------------------------


def ensure_ray(address: str | None, min_cpus: int) -> bool:
    """Connect to Ray; True when this call started a local instance (which the Engine then owns)."""
    if ray.is_initialized():
        return False
    with _keeping_sigterm_handler():
        return _init_ray(address, min_cpus)


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """ray.init replaces the process's SIGTERM handler (in the end with its core worker's failure
    handler, which dumps a stack and aborts); a caller that installed its own, like `moe-serve
    serve` to shut down cleanly on SIGTERM, gets it back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(previous):
            signal.signal(signal.SIGTERM, previous)


def _init_ray(address: str | None, min_cpus: int) -> bool:
    if address is None:
        # A local instance: enough logical CPUs for every actor even on a small machine (the
        # actors mostly wait on each other, so oversubscribing cores is harmless).
        ray.init(
            num_cpus=max(os.cpu_count() or 1, min_cpus),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        return True
    ray.init(address=address, logging_level=logging.WARNING)
    return False


def _free_resources() -> dict:
    """Free cluster resources a user can act on (no per-node or placement-group bookkeeping keys)."""
    return {
        k: v
        for k, v in ray.available_resources().items()
        if "bundle_group" not in k and not k.startswith("node:")
    }


def _cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


# Concurrent calls a Router actor takes (Ray starts this many threads up front). A serving front
# end needs a few: its streams share one `generation_events` call. Each `Engine.generate_stream`
# in flight from Python holds one; beyond this many, further calls wait for a free thread.
ROUTER_MAX_CONCURRENCY = 64


class RouterActor(Router):
    """The Router as a Ray actor. It is built in `start()`, not in the actor's constructor, so that a
    load error (a bad checkpoint, an unplaceable worker) reaches the caller as itself: an exception in
    an actor's constructor only comes back as "the actor died" with the cause flattened to text."""

    def __init__(self, config: EngineConfig):  # Router.__init__ runs in start()
        self._config = config
        self._started = False

    def start(self) -> bool:
        super().__init__(self._config)
        self._started = True
        return True

    def generate_stream(self, *args, **kwargs):
        # A generator function, as Ray's streaming calls need (Router's version returns one so
        # that bad arguments raise at the call, in-process).
        yield from super().generate_stream(*args, **kwargs)

    def shutdown(self) -> None:
        if self._started:
            super().shutdown()


def start_router_actor(config: EngineConfig, address: str | None):
    """Start the Router actor (which starts the workers) and wait until the model is loaded."""
    owns = ensure_ray(
        address, min_cpus=config.num_workers * int(max(1, config.worker_resources.num_cpus)) + 1
    )
    wants_gpu = config.device.startswith("cuda") or (config.device == "auto" and _cluster_gpus() > 0)
    # Threaded: generation streams wait in their own threads while the decode loop runs; model calls
    # take turns on the Router's lock.
    actor = (
        ray.remote(RouterActor)
        .options(num_cpus=0, num_gpus=1 if wants_gpu else 0, max_concurrency=ROUTER_MAX_CONCURRENCY)
        .remote(config)
    )
    try:
        call_actor(actor, "start")
    except BaseException:
        stop_router_actor(actor, owns)
        raise
    return actor, owns


@contextlib.contextmanager
def actor_errors():
    """Errors the caller can act on come back from the Router actor as themselves, not wrapped."""
    try:
        yield
    except RayTaskError as e:
        if isinstance(e.cause, ValueError | WorkerError | NotImplementedError | RuntimeError):
            raise e.cause from None
        raise
    except RayActorError as e:
        raise RuntimeError(f"the router actor died: {e}") from None


def call_actor(actor, method: str, *args):
    """One Router call, waited for."""
    with actor_errors():
        return ray.get(getattr(actor, method).remote(*args))


def stream_actor(actor, method: str, *args) -> Iterator:
    """A Router generator method, item by item as the actor yields them (a Ray streaming call)."""
    refs = getattr(actor, method).options(num_returns="streaming").remote(*args)
    with actor_errors():
        for ref in refs:
            yield ray.get(ref)


def stop_router_actor(actor, owns_ray: bool) -> None:
    try:
        ray.get(actor.shutdown.remote(), timeout=30)
    except (RayActorError, RayTaskError, GetTimeoutError) as e:
        log.warning("router shutdown did not finish cleanly: %s", e)
    ray.kill(actor)
    if owns_ray:
        ray.shutdown()


# ---- the worker side ---------------------------------------------------------------------------


class RayExpertWorker(ExpertWorker):
    """ExpertWorker as a Ray actor: the same class, plus load progress and its node id.

    progress: "bar" (a Ray tqdm bar per worker, drawn by the driver's terminal), "log" (one line per
    layer, for logs that are not a terminal) or "off".
    """

    def __init__(self, *args, progress: str = "bar", **kwargs):
        self._progress = progress
        super().__init__(*args, **kwargs)

    def on_layer_loaded(self, layer: int, done: int, total: int) -> None:
        if self._progress == "bar":
            from ray.experimental import tqdm_ray

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

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def forward_packed(self, layer: int, packed: tuple | None) -> Packed | None:
        """`forward` on a packed batch, returning the packed partial; None when there are no rows.

        Errors are named here (worker and layer) because a compiled graph hands the first error of an
        execution to every output, so the router cannot tell which worker raised.
        """
        if packed is None:
            return None
        try:
            return pack(self.forward(layer, unpack_batch(packed)))
        except Exception as e:  # re-raised with the worker and layer named; nothing is swallowed
            raise worker_error(self.worker_id, layer, e) from e


class RayTransport:
    """Workers as Ray actors in a placement group; one actor call per worker per layer."""

    def __init__(
        self, setup: WorkerSetup, placement: Placement, resources: WorkerResources, progress: str = "bar"
    ):
        n = placement.num_workers
        gpus = resources.num_gpus if resources.num_gpus is not None else (1 if _cluster_gpus() >= n else 0)
        bundle = {"CPU": resources.num_cpus, **({"GPU": gpus} if gpus else {}), **resources.resources}
        self.pg = placement_group([bundle] * n, strategy=resources.strategy)
        try:
            ray.get(self.pg.ready(), timeout=resources.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.pg)
            raise ValueError(
                f"the Ray cluster cannot place {n} expert workers of {bundle} each (strategy "
                f"{resources.strategy}) within {resources.placement_timeout_s:.0f}s; free now: {_free_resources()}. "
                f"Use fewer workers, smaller worker_resources, or add nodes."
            ) from None
        actor_cls = ray.remote(RayExpertWorker)

        def start(w: int):
            opts = actor_cls.options(
                num_cpus=resources.num_cpus,
                num_gpus=gpus,
                resources=resources.resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=w),
            )
            return lambda *args, **kwargs: opts.remote(*args, progress=progress, **kwargs)

        self.actors = [setup.build(w, placement.worker_assignment(w), cls=start(w)) for w in range(n)]
        try:  # the workers load in parallel; this waits for all of them
            self.node_ids = ray.get([a.node_id.remote() for a in self.actors])
        except (RayTaskError, RayActorError) as e:
            self.close()
            cause = getattr(e, "cause", None) or e
            raise WorkerError(f"an expert worker failed to load: {type(cause).__name__}: {cause}") from None
        self._node_ip = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}

    def run_layer(self, layer: int, batches: dict[int, ExpertBatch]) -> dict:
        refs = [
            (w, self.actors[w].forward_packed.remote(layer, pack_batch(batch)))
            for w, batch in batches.items()
        ]
        out = {}
        for w, ref in refs:
            try:
                out[w] = unpack(ray.get(ref)).to(batches[w].x.device)
            except RayTaskError as e:
                cause = e.cause
                if isinstance(cause, WorkerError):
                    raise cause from None
                raise worker_error(w, layer, cause) from None
            except RayActorError as e:
                raise WorkerError(f"expert worker {w} died during MoE layer {layer}: {e}") from None
        return out

    def describe_workers(self) -> list[dict]:
        infos = ray.get([a.describe.remote() for a in self.actors])
        for info, node in zip(infos, self.node_ids, strict=True):
            info["node_id"] = node
            info["node_ip"] = self._node_ip.get(node)
        return infos

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            ray.kill(a)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)
            self.pg = None
