"""The "ray" transport: expert workers as Ray actors, one actor call per worker per layer.

Workers are the detached, named actors of `worker_actor.py`, so they outlive a Router actor that
crashes and the restarted router finds them again (`discover`).

Where a new worker goes is chosen here, per worker, from the alive nodes that have its resources:
SPREAD prefers the node with the fewest of our workers, PACK the one with the most, STRICT_* make it
a requirement. (A placement group would reserve a fixed set of bundles up front; an elastic worker
set needs one decision per worker.)

A dead actor is reported by Ray at once; a worker that stops answering is found by the watchdog: when
a layer takes longer than `HEARTBEAT_S`, the workers it waits on are pinged, and one that leaves a
ping unanswered for `worker_timeout_s` is killed, which ends its call as lost.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from expert_workers.worker import ExpertBatch
from moe_serving import tracing
from router_service.config import WorkerResources
from router_service.errors import StaleLayout, WorkerError, WorkerStartError, worker_error
from router_service.runtime.data_plane import pack_batch, unpack
from router_service.runtime.transport import LayerResult, LayoutSpec, WorkerSetup
from router_service.runtime.worker_actor import NAMESPACE, WORKER_ACTOR

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # a layer running longer than this gets its workers pinged
DESCRIBE_TIMEOUT_S = 10.0


def free_resources() -> dict:
    """Free cluster resources a user can act on (no per-node or placement-group bookkeeping keys)."""
    return {
        k: v
        for k, v in ray.available_resources().items()
        if "bundle_group" not in k and not k.startswith("node:")
    }


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


# ---- where a new worker goes -----------------------------------------------------------------------


def _fits(node_resources: dict, bundle: dict) -> bool:
    return all(node_resources.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def worker_bundle(resources: WorkerResources, gpus: float) -> dict:
    """The Ray resources one expert worker asks for."""
    return {"CPU": resources.num_cpus, **({"GPU": gpus} if gpus else {}), **resources.resources}


def check_cluster_fits(bundle: dict, what: str = "an expert worker") -> None:
    """Fail fast, naming what the cluster has, when no alive node could ever run `what`, needing
    `bundle` (GPUs on a CPU-only cluster, a custom resource no node was started with)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(_fits(n.get("Resources", {}), bundle) for n in nodes):
        return
    have = [
        f"{n.get('NodeManagerAddress')}: "
        + ", ".join(f"{k} {v:g}" for k, v in sorted(n.get("Resources", {}).items()) if _user_resource(k))
        for n in nodes
    ]
    raise ValueError(
        f"no node of the Ray cluster can run {what} needing {bundle}; the nodes have: "
        + ("; ".join(have) or "none alive")
    )


def _user_resource(name: str) -> bool:
    return (
        not name.startswith("node:")
        and "bundle_group" not in name
        and name
        not in (
            "memory",
            "object_store_memory",
        )
    )


def choose_node(strategy: str, bundle: dict, ours: collections.Counter) -> tuple[str | None, bool]:
    """(node id, soft) for a new worker needing `bundle`, given how many of our workers each node
    runs (`ours`); (None, True) lets Ray decide (no alive node has the resources: the start then
    times out with the reason). STRICT_SPREAD with every fitting node taken raises ValueError."""
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and _fits(n.get("Resources", {}), bundle)]
    if not nodes:
        return None, True
    order = {n: i for i, n in enumerate(sorted(nodes))}
    if strategy in ("SPREAD", "STRICT_SPREAD"):
        best = min(nodes, key=lambda n: (ours[n], order[n]))
        if strategy == "STRICT_SPREAD" and ours[best]:
            raise ValueError(
                f"STRICT_SPREAD: every node with {bundle} already runs an expert worker ({len(nodes)} nodes)"
            )
        return best, strategy == "SPREAD"
    busiest = max(nodes, key=lambda n: (ours[n], -order[n]))
    return busiest, strategy == "PACK"


# ---- the transport --------------------------------------------------------------------------------


class RayTransport:
    """Workers as named, detached Ray actors; one actor call per worker per layer."""

    def __init__(
        self,
        setup: WorkerSetup,
        resources: WorkerResources,
        progress: str = "bar",
        cluster: str = "moe",
        worker_timeout_s: float = 10.0,
        expected_workers: int = 1,
        owns_workers: bool = True,
    ):
        self.setup = setup
        # The controller's pool owns the workers (starts, retires, and on close kills them); a
        # router's data plane only addresses them, by name, and leaves them to the others on close.
        self.owns_workers = owns_workers
        self.resources = resources
        self.progress = progress
        self.cluster = cluster
        self.worker_timeout_s = worker_timeout_s
        gpus = resources.num_gpus
        if gpus is None:  # one GPU per worker when the cluster has one for each, else none
            gpus = 1 if cluster_gpus() >= expected_workers else 0
        self.bundle = worker_bundle(resources, gpus)
        self._gpus = gpus
        check_cluster_fits(self.bundle)
        self._lock = threading.Lock()
        self._actors: dict[int, ray.actor.ActorHandle] = {}
        self._nodes: dict[int, str] = {}
        self._lost_why: dict[int, str] = {}
        self._node_ip = {}
        self._watch = _Watchdog(self)

    def name_of(self, worker: int) -> str:
        return f"{self.cluster}:worker-{worker}"

    # ---- the hot path ------------------------------------------------------------------------------

    overlaps = True  # actor calls from two micro-batch threads are independent

    def run_layer(
        self, layer: int, work: dict[int, tuple[int, ExpertBatch]], lane: int = 0, waiting=None
    ) -> LayerResult:
        result = LayerResult()
        refs = []
        t0 = tracing.now_us()
        for w, (layout, batch) in work.items():
            actor = self._actors.get(w)
            if actor is None:
                result.lost[w] = self._lost_why.get(w, "not running")
                continue
            refs.append((w, actor.forward_packed.remote(layer, (layout, pack_batch(batch)))))
        t1 = tracing.now_us()
        tracing.record("submit", t0, t1, {"layer": layer})
        self._watch.begin([w for w, _ in refs])
        with waiting() if waiting is not None else contextlib.nullcontext():
            self._collect(layer, work, refs, result, t1)
        return result

    def _collect(self, layer, work, refs, result: LayerResult, t1: float) -> None:
        try:
            for w, ref in refs:
                try:
                    partial = ray.get(ref)
                except RayTaskError as e:
                    cause = e.cause
                    if isinstance(cause, StaleLayout):  # out-of-date placement: re-sent by the dispatcher
                        result.stale[w] = str(cause)
                        continue
                    if isinstance(cause, WorkerError):
                        raise cause from None
                    raise worker_error(w, layer, cause) from None
                except RayActorError as e:
                    result.lost[w] = self._lost(w, e)
                    continue
                result.partials[w] = unpack(partial).to(work[w][1].x.device)
        finally:
            self._watch.end()
            tracing.record("wait", t1, tracing.now_us(), {"layer": layer})

    def _lost(self, worker: int, e: BaseException) -> str:
        """Forget a worker that died (or was killed by the watchdog) and say why."""
        with self._lock:
            self._actors.pop(worker, None)
            self._nodes.pop(worker, None)
            why = self._lost_why.setdefault(worker, f"died ({type(e).__name__})")
        return why

    # ---- membership --------------------------------------------------------------------------------

    def start_workers(self, specs: dict[int, LayoutSpec]) -> dict[int, BaseException]:
        errors: dict[int, BaseException] = {}
        created: dict[int, ray.actor.ActorHandle] = {}
        with self._lock:
            ours = collections.Counter(self._nodes.values())
        for w in specs:
            try:
                node, soft = choose_node(self.resources.strategy, self.bundle, ours)
            except ValueError as e:
                errors[w] = e
                continue
            strategy = "DEFAULT" if node is None else NodeAffinitySchedulingStrategy(node, soft=soft)
            if node is not None:
                ours[node] += 1
            opts = WORKER_ACTOR.options(
                name=self.name_of(w),
                namespace=NAMESPACE,
                lifetime="detached",
                num_cpus=self.resources.num_cpus,
                num_gpus=self._gpus,
                resources=self.resources.resources,
                scheduling_strategy=strategy,
                max_restarts=0,
            )
            created[w] = self.setup.build(w, cls=opts.remote, progress=self.progress)
        # Step 1: wait until each is placed and running (a ping answers).
        pings = {w: a.ping.remote() for w, a in created.items()}
        ready, _ = ray.wait(
            list(pings.values()), num_returns=len(pings), timeout=self.resources.placement_timeout_s
        )
        ready = set(ready)
        nodes: dict[int, str] = {}
        for w, ref in pings.items():
            if ref not in ready:
                errors[w] = ValueError(
                    f"the Ray cluster cannot place expert worker {w} ({self.bundle}, strategy "
                    f"{self.resources.strategy}) within {self.resources.placement_timeout_s:.0f}s; free now: "
                    f"{free_resources()}"
                )
                continue
            try:
                nodes[w] = ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                errors[w] = WorkerStartError(f"expert worker {w} did not start: {_cause(e)}")
        # Step 2: load the layouts, all at once.
        loads = {w: created[w].load_layout.remote(*specs[w]) for w in nodes}
        for w, ref in loads.items():
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                errors[w] = WorkerStartError(
                    f"expert worker {w} (node {self._ip_of(nodes[w])}) failed to load its experts: {_cause(e)}"
                )
        for w in errors:
            if w in created:
                kill_actor(created[w])
        with self._lock:
            for w in nodes:
                if w not in errors:
                    self._actors[w], self._nodes[w] = created[w], nodes[w]
        return errors

    def load_layouts(self, specs: dict[int, LayoutSpec]) -> dict[int, BaseException]:
        errors: dict[int, BaseException] = {}
        refs = {}
        for w, (key, assignment) in specs.items():
            actor = self._actors.get(w)
            if actor is None:
                errors[w] = WorkerStartError(f"expert worker {w} is not running")
                continue
            refs[w] = actor.load_layout.remote(key, assignment)
        for w, ref in refs.items():
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                errors[w] = WorkerStartError(f"expert worker {w} failed to load layout: {_cause(e)}")
        return errors

    def drop_layouts(self, keys: dict[int, int]) -> None:
        for w, key in keys.items():
            actor = self._actors.get(w)
            if actor is not None:
                actor.drop_layout.remote(key)

    def label_workers(self, workers: tuple[int, ...], labels: dict) -> None:
        for w in workers:
            actor = self._actors.get(w)
            if actor is not None:
                actor.set_labels.remote(labels)

    def retire(self, workers: set[int]) -> None:
        for w in workers:
            with self._lock:
                actor = self._actors.pop(w, None)
                self._nodes.pop(w, None)
            if actor is not None:
                kill_actor(actor)

    def check(self, workers: tuple[int, ...], timeout_s: float) -> dict[int, str]:
        lost: dict[int, str] = {}
        refs = {}
        for w in workers:
            actor = self._actors.get(w)
            if actor is None:
                lost[w] = self._lost_why.get(w, "not running")
            else:
                refs[w] = actor.ping.remote()
        if not refs:
            return lost
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        ready = set(ready)
        for w, ref in refs.items():
            if ref not in ready:
                self._lost_why[w] = f"answered no health check for {timeout_s:g}s"
                kill_actor(self._actors.get(w))
                lost[w] = self._lost(w, TimeoutError())
                continue
            try:
                ray.get(ref)
            except RayActorError as e:
                lost[w] = self._lost(w, e)
        return lost

    def use_workers(self, workers: tuple[int, ...]) -> None:
        """Handles on the workers a router's passes will address, looked up by name (the
        controller started them); one Ray no longer knows is lost at its first layer."""
        for w in workers:
            if w in self._actors:
                continue
            try:
                actor = ray.get_actor(self.name_of(w), namespace=NAMESPACE)
            except ValueError:
                self._lost_why.setdefault(w, "not running (no actor by its name)")
                continue
            with self._lock:
                self._actors[w] = actor
        keep = set(workers)
        with self._lock:
            for w in [w for w in self._actors if w not in keep and not self.owns_workers]:
                self._actors.pop(w, None)  # another placement's: the controller retires it

    def trace(self, workers: tuple[int, ...], on: bool) -> None:
        ray.get([self._actors[w].set_tracing.remote(on) for w in workers if w in self._actors])

    def take_traces(self, workers: tuple[int, ...]) -> list[dict]:
        refs = [self._actors[w].take_trace.remote() for w in workers if w in self._actors]
        return [ev for events in ray.get(refs, timeout=DESCRIBE_TIMEOUT_S) for ev in events]

    def _named_workers(self) -> dict[int, str]:
        """Worker id -> actor name, of every worker of this cluster Ray knows by name."""
        prefix = f"{self.cluster}:worker-"
        out = {}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry.get("name", "")
            if (
                entry.get("namespace") == NAMESPACE
                and name.startswith(prefix)
                and name[len(prefix) :].isdigit()
            ):
                out[int(name[len(prefix) :])] = name
        return out

    def discover(self) -> dict[int, dict]:
        found: dict[int, ray.actor.ActorHandle] = {}
        for w, name in self._named_workers().items():
            try:
                found[w] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # gone since it was listed
                continue
        infos: dict[int, dict] = {}
        refs = {w: (a.describe.remote(), a.ping.remote()) for w, a in found.items()}
        for w, (describe, ping) in refs.items():
            try:
                info, node = ray.get([describe, ping], timeout=DESCRIBE_TIMEOUT_S)
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                log.warning("expert worker %d does not answer (%s); stopping it", w, type(e).__name__)
                kill_actor(found[w])
                continue
            infos[w] = info
            with self._lock:
                self._actors[w], self._nodes[w] = found[w], node
        return infos

    def _ip_of(self, node: str | None) -> str | None:
        """The address of a node (None: unknown)."""
        if node is not None and node not in self._node_ip:
            self._node_ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return self._node_ip.get(node)

    def describe_workers(self, workers: tuple[int, ...]) -> list[dict]:
        refs = [(w, self._actors[w].describe.remote()) for w in workers if w in self._actors]
        out = []
        for w, ref in refs:
            try:
                info = ray.get(ref, timeout=DESCRIBE_TIMEOUT_S)
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                info = {"worker_id": w, "state": f"unreachable ({type(e).__name__})"}
            node = self._nodes.get(w)
            info["node_id"], info["node_ip"] = node, self._ip_of(node)
            out.append(info)
        return out

    def close(self) -> None:
        self._watch.stop()
        with self._lock:
            actors, self._actors = list(self._actors.values()), {}
        if not self.owns_workers:
            return
        for a in actors:
            kill_actor(a)
        try:
            names = self._named_workers().values()
        except Exception:  # Ray already gone
            return
        for name in names:  # anything of ours the handles above missed
            with contextlib.suppress(ValueError):
                kill_actor(ray.get_actor(name, namespace=NAMESPACE))


def _cause(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = (str(cause).strip().splitlines() or [""])[-1 if isinstance(e, RayTaskError) else 0]
    return f"{type(cause).__name__}: {text}"


def kill_actor(actor) -> None:
    """Kill an actor for good (no restart); already dead or None: nothing."""
    if actor is None:
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception as e:  # already dead, or Ray shutting down
        log.debug("kill: %s", e)


class _Watchdog:
    """Pings the workers of a layer in flight longer than HEARTBEAT_S; a worker that leaves a ping
    unanswered for `worker_timeout_s` is killed (its layer call then ends as lost). One thread per
    transport, polling a few times a second; the hot path only stores what it waits on."""

    def __init__(self, transport: RayTransport):
        self.t = transport
        self._inflight: dict[int, tuple[float, list[int]]] = {}  # by calling thread (micro-batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-watchdog", daemon=True)
        self._thread.start()

    def begin(self, workers: list[int]) -> None:
        self._inflight[threading.get_ident()] = (time.monotonic(), workers)

    def end(self) -> None:
        self._inflight.pop(threading.get_ident(), None)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        pings: dict[int, tuple[ray.ObjectRef, float]] = {}
        while not self._stop.wait(0.2):
            now = time.monotonic()
            slow = {w for t0, ws in list(self._inflight.values()) if now - t0 >= HEARTBEAT_S for w in ws}
            if not slow:
                pings.clear()
                continue
            for w in slow:
                actor = self.t._actors.get(w)
                if actor is None:
                    continue
                ref, sent = pings.get(w, (None, 0.0))
                if ref is not None:
                    done, _ = ray.wait([ref], timeout=0)
                    if done:
                        pings.pop(w)
                        try:
                            ray.get(ref)
                        except RayActorError:  # dead: its layer call ends with the same error
                            self.t._lost_why.setdefault(w, "died")
                        continue
                    if now - sent > self.t.worker_timeout_s:
                        why = f"answered no health check for {self.t.worker_timeout_s:g}s"
                        log.warning("expert worker %d %s: declaring it lost", w, why)
                        self.t._lost_why[w] = why
                        kill_actor(actor)
                        pings.pop(w)
                    continue
                pings[w] = (actor.ping.remote(), now)
