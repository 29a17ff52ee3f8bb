"""The Router as a Ray actor, the client it talks to the controller through, and the driver-side
calls that use it.

Routers are replicas named `{cluster}:router-{id}` in the `moe-serving` namespace, started by the
cluster's controller actor (`controller_actor.py`), which also owns the expert workers. A router
whose process dies restarts (`ElasticConfig.router_max_restarts`): Ray re-runs the constructor,
which rebuilds the router and attaches it to the controller again (it gets the current placement)
instead of waiting for `start()`; callers' handles stay valid across the restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from router_service.config import EngineConfig
from router_service.errors import NoCapacityError, ScaleError, WorkerError
from router_service.router import Router
from router_service.runtime.liveness import ProcessBeacon
from router_service.runtime.local_ray import start_local_ray
from router_service.runtime.ray_transport import cluster_gpus
from router_service.runtime.worker_actor import NAMESPACE
from router_service.stages.placement import without_workers

log = logging.getLogger(__name__)

# Concurrent calls a Router actor takes (Ray starts this many threads up front). A serving front
# end needs a few: its streams share one `generation_events` call. Each `Engine.generate_stream`
# in flight from Python holds one; beyond this many, further calls wait for a free thread.
ROUTER_MAX_CONCURRENCY = 64
LOCAL_LOGICAL_CPUS = 16  # a local Ray instance takes at least this many expert workers


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
        # A local instance: enough logical CPUs for every actor even on a small machine, and room to
        # scale up (the actors mostly wait on each other, so oversubscribing cores is harmless; it is
        # one machine, where logical CPUs only cap how many workers fit).
        # "local": a new instance even when `ray start` made one on this machine (ray.init() would
        # join that one, and then refuse num_cpus)
        start_local_ray(
            num_cpus=max(os.cpu_count() or 1, min_cpus, LOCAL_LOGICAL_CPUS),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        return True
    check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as e:
        if address == "auto":
            raise ValueError(
                f"no Ray cluster to join on this machine ({e}); start one with `ray start --head`"
            ) from None
        raise ValueError(
            f"the Ray head at {address} answers but refused to connect this process ({e}). With token "
            "authentication on (Ray's default), RAY_AUTH_TOKEN (or ~/.ray/auth_token) must hold the "
            "cluster's token; the Ray versions must match too"
        ) from None
    return False


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ValueError naming the address when nothing answers there, in seconds rather than after Ray's
    own retries (which take minutes against an address that drops the packets)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a Ray address is HOST:PORT (or 'auto'), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ValueError(
            f"cannot reach the Ray head at {address}: {why}; is `ray start --head` running there, and the port open?"
        ) from None


class RouterActor(Router):
    """The Router as a Ray actor. It is built in `start()`, not in the actor's constructor, so that a
    load error (a bad checkpoint, an unplaceable worker) reaches the caller as itself: an exception in
    an actor's constructor only comes back as "the actor died" with the cause flattened to text.
    After a crash, Ray re-runs the constructor, and then it builds the router itself, reattaching to
    the live workers (calls wait until it is done)."""

    def __init__(self, config: EngineConfig, router_id: str = "0"):  # Router.__init__ runs in start()
        self._config = config
        self._router_id = router_id
        self._started = False
        self._starting = threading.Lock()
        # Front ends keep a connection to it and read EOF the moment this process dies (liveness.py).
        self._beacon = ProcessBeacon(ray.util.get_node_ip_address())
        if ray.get_runtime_context().was_current_actor_reconstructed:
            log.warning(
                "router actor restarted: reattaching to the expert workers of %s", config.cluster_name
            )
            self.start(reattach=True)

    def start(self, reattach: bool = False) -> bool:
        """Build the router (once: later calls wait for the first, then return)."""
        with self._starting:
            if not self._started:
                controller = ControllerClient(self._config)
                super().__init__(self._config, reattach, controller=controller, router_id=self._router_id)
                self._started = True
        return True

    def ping(self) -> bool:
        """Answered once built (calls wait while the router loads or reattaches)."""
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def liveness(self) -> dict | None:
        """{"incarnation", "address"}: this router process and its `ProcessBeacon`'s (host, port);
        None until the router is built."""
        if not self._started:
            return None
        return {"incarnation": self.incarnation, "address": list(self._beacon.address)}

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        return {
            **super().describe(),
            "node_id": self.node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
        }

    def share_node(self, routers_on_node: int) -> int:
        if not self._started:
            return 0  # being built: the controller's next step tells it again
        return super().share_node(routers_on_node)

    def generate_stream(self, *args, **kwargs):
        # A generator function, as Ray's streaming calls need (Router's version returns one so
        # that bad arguments raise at the call, in-process).
        yield from super().generate_stream(*args, **kwargs)

    def shutdown(self) -> None:
        if self._started:
            super().shutdown()


def router_name(cluster: str, router_id: str) -> str:
    return f"{cluster}:router-{router_id}"


def controller_name(cluster: str) -> str:
    return f"{cluster}:controller"


def router_actor_class(config: EngineConfig, router_id: str, node: str | None = None, soft: bool = True):
    """RouterActor with its options: named, detached (it belongs to the cluster, not to whichever
    process started it; `stop_cluster` removes it); threaded (generation streams wait in their own
    threads while the decode loop runs; model calls take turns on the Router's lock); restarted by
    Ray when its process dies; on `node` when given (the controller spreads the routers)."""
    strategy = "DEFAULT" if node is None else NodeAffinitySchedulingStrategy(node, soft=soft)
    return ray.remote(RouterActor).options(
        scheduling_strategy=strategy,
        name=router_name(config.cluster_name, router_id),
        namespace=NAMESPACE,
        lifetime="detached",
        num_cpus=0,
        num_gpus=1 if _wants_gpu(config) else 0,
        max_concurrency=ROUTER_MAX_CONCURRENCY,
        max_restarts=config.elastic.router_max_restarts,
        resources=config.router_resources,
    )


class ControllerAway(Exception):
    """The cluster's controller actor is not there by its name (starting, or gone for good)."""


class ControllerClient:
    """A router's (or a front end's) handle on the cluster's controller actor, with what a router
    does while the controller is away (restarting, or its node lost): it keeps serving on the
    placement it has; a pass that loses workers finishes on their replicas when every lost expert
    has one, else waits for the controller to come back (up to the placement timeout); scale and
    rebalance fail with ScaleError (503) naming the cause."""

    CALL_TIMEOUT_S = 10.0

    def __init__(self, config: EngineConfig):
        self.cluster = config.cluster_name
        self.timeout_s = config.worker_resources.placement_timeout_s
        self._actor = None

    @property
    def actor(self):
        if self._actor is None:
            try:
                self._actor = ray.get_actor(controller_name(self.cluster), namespace=NAMESPACE)
            except ValueError as e:  # no actor by that name (yet, or any more)
                raise ControllerAway(str(e)) from None
        return self._actor

    def _call(self, method: str, *args, timeout: float | None = None):
        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)
        except RayTaskError as e:
            raise (e.cause if e.cause is not None else e) from None

    def attach_router(self, router_id: str):
        """The placement to start on; waits for a controller that is (re)starting."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                return self._call("attach_router", router_id)
            except (RayActorError, ControllerAway) as e:  # restarting, or not yet named
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the membership controller of {self.cluster} is not running: {e}"
                    ) from None
                self._actor = None
                time.sleep(0.5)

    def recover(self, placement, lost: dict[int, str], caller: str | None = None):
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return self._call("recover", placement, lost, caller, timeout=self.timeout_s)
            except (RayActorError, GetTimeoutError, ControllerAway) as e:
                survivors = without_workers(placement, set(lost), placement.version)
                if survivors is not None:
                    log.warning("the controller is away (%s); finishing on the lost workers' replicas", e)
                    return survivors
                if time.monotonic() > deadline:
                    raise NoCapacityError(
                        f"expert workers {sorted(lost)} lost while the membership controller is away ({e})"
                    ) from None
                self._actor = None
                time.sleep(0.5)

    def _admin(self, method: str, *args):
        try:
            return self._call(method, *args)
        except (RayActorError, ControllerAway) as e:
            self._actor = None
            raise ScaleError(
                f"the membership controller is not running ({type(e).__name__}); the routers keep serving "
                "on their placement; retry once it is back"
            ) from None

    def scale(self, n: int):
        return self._admin("scale", n)

    def rebalance(self) -> dict:
        return self._admin("rebalance")

    def scale_routers(self, n: int) -> dict:
        return self._admin("scale_routers", n)

    def health(self) -> dict:
        try:
            return self._call("health", timeout=self.CALL_TIMEOUT_S)
        except (RayActorError, GetTimeoutError, ControllerAway) as e:
            self._actor = None
            return {"serving": True, "reason": "", "controller": f"not answering ({type(e).__name__})"}

    def describe_workers(self, workers: tuple[int, ...]) -> list[dict] | None:
        """The workers as the controller's pool knows them; None while it is away."""
        try:
            return self._call("describe_workers", workers, timeout=self.CALL_TIMEOUT_S)
        except (RayActorError, GetTimeoutError, ControllerAway):
            self._actor = None
            return None

    def balance(self) -> dict:
        try:
            return self._call("balance", timeout=self.CALL_TIMEOUT_S)
        except (RayActorError, GetTimeoutError, ControllerAway):
            self._actor = None
            return {}

    def stats(self) -> dict:
        try:
            return self._call("stats", timeout=self.CALL_TIMEOUT_S)
        except (RayActorError, GetTimeoutError, ControllerAway) as e:
            self._actor = None
            return {"controller": f"not answering ({type(e).__name__})"}

    def stop(self) -> None:
        pass  # the controller belongs to the cluster, not to this router


def _wants_gpu(config: EngineConfig) -> bool:
    return config.device.startswith("cuda") or (config.device == "auto" and cluster_gpus() > 0)


def min_cluster_cpus(config: EngineConfig) -> int:
    """Logical CPUs a local Ray instance needs for the most workers this config may run, + 1."""
    auto = config.elastic.autoscaling
    most = max(config.num_workers, auto.max_workers if auto else 0)
    return most * int(max(1, config.worker_resources.num_cpus)) + 1


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
        raise RouterDied(e) from None


class RouterDied(RuntimeError):
    """The Router actor died during a call (Ray may be restarting it)."""

    def __init__(self, cause: RayActorError):
        super().__init__(f"the router actor died: {cause}")
        self.cause = cause


RESTART_TIMEOUT_S = 120.0


def restart_deadline() -> float:
    return time.monotonic() + RESTART_TIMEOUT_S


def call_actor(actor, method: str, *args):
    """One Router call, waited for; a call the router died in is made again once it restarted."""
    deadline = restart_deadline()
    while True:
        try:
            with actor_errors():
                return ray.get(getattr(actor, method).remote(*args))
        except RouterDied as e:
            if time.monotonic() > deadline or not wait_for_restart(actor, deadline):
                raise RuntimeError(f"the router actor died: {e.cause}") from None


def wait_for_restart(actor, deadline: float) -> bool:
    """True once a restarting Router actor answers; False when it is dead for good (or the deadline
    passes). While Ray restarts an actor, calls fail at once with ActorUnavailableError."""
    while time.monotonic() < deadline:
        try:
            ray.get(actor.health.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return True
        except ActorUnavailableError:
            time.sleep(0.5)
        except (RayActorError, GetTimeoutError):
            return False
    return False


def stream_actor(actor, method: str, *args, **kwargs) -> Iterator:
    """A Router generator method, item by item as the actor yields them (a Ray streaming call)."""
    refs = getattr(actor, method).options(num_returns="streaming").remote(*args, **kwargs)
    with actor_errors():
        for ref in refs:
            yield ray.get(ref)


def kill_cluster_actors(cluster: str) -> None:
    """Kill every named actor of `cluster` still alive (detached workers outlive their router)."""
    try:
        names = ray.util.list_named_actors(all_namespaces=True)
    except Exception:  # Ray gone
        return
    for entry in names:
        if entry.get("namespace") == NAMESPACE and entry.get("name", "").startswith(f"{cluster}:"):
            with contextlib.suppress(Exception):
                ray.kill(ray.get_actor(entry["name"], namespace=NAMESPACE), no_restart=True)
