"""The membership controller as a Ray actor, and the routers as it sees them.

One `ControllerActor` per cluster (`{cluster}:controller`, detached, restarted by Ray when its
process dies) owns the expert workers (a `WorkerPool`) and the router replicas (`RayRouters`):
it starts both, installs every placement on every router, restores both counts after losses, and
serves `scale`, `rebalance` and `scale_routers`. A restarted controller recovers what it knows
from the running workers (their layouts and labels) and the routers (the placements they serve).

Routers keep serving while it is away (see `router_actor.ControllerClient`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from moe_models.loading import spec_from_pretrained
from router_service.config import EngineConfig
from router_service.default_model import ensure_default_model
from router_service.errors import MembershipBusy, ScaleError
from router_service.router import worker_setup
from router_service.runtime.autoscaler import router_autoscaler
from router_service.runtime.controller import Controller
from router_service.runtime.ray_transport import choose_node, kill_actor
from router_service.runtime.router_actor import router_actor_class, router_name
from router_service.runtime.transports import make_pool
from router_service.runtime.worker_actor import NAMESPACE
from router_service.stages.placement import Placement

log = logging.getLogger(__name__)

CONTROLLER_MAX_CONCURRENCY = 32  # routers call in (attach, recover) while a change runs
INSTALL_TIMEOUT_S = 60.0  # a router that takes longer to reach a pass boundary is taken for lost
REPORT_TIMEOUT_S = 5.0
MAX_ROUTERS = 64


def free_ids(count: int, taken: set[str]) -> list[str]:
    """The `count` lowest router ids ("0", "1", ...) not in `taken`."""
    out, i = [], 0
    while len(out) < count:
        if str(i) not in taken:
            out.append(str(i))
        i += 1
    return out


class RayRouters:
    """The router replicas of a cluster: detached, named actors `{cluster}:router-{id}`."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.cluster = config.cluster_name
        self._lock = threading.Lock()
        self._handles: dict[str, ray.actor.ActorHandle] = {}
        self._nodes: dict[str, str] = {}
        self.draining: set[str] = set()
        # One start at a time: a scale's start runs for as long as the new routers load, and the
        # controller's step (`maintain`) must not take the ids it is starting for missing ones.
        self._start_lock = threading.Lock()
        # Routers created ahead of their start (`prepare`), with the node each was placed on.
        self._prepared: dict[str, tuple[ray.actor.ActorHandle, str | None]] = {}

    # ---- the set --------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._handles, key=int)

    def handles(self) -> dict[str, ray.actor.ActorHandle]:
        with self._lock:
            return dict(self._handles)

    def discover(self) -> None:
        """Adopt the routers of this cluster that Ray knows by name (a restarted controller)."""
        prefix = f"{self.cluster}:router-"
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry.get("name", "")
            if (
                entry.get("namespace") == NAMESPACE
                and name.startswith(prefix)
                and name[len(prefix) :].isdigit()
            ):
                try:
                    handle = ray.get_actor(name, namespace=NAMESPACE)
                except ValueError:
                    continue
                with self._lock:
                    self._handles[name[len(prefix) :]] = handle

    def start(self, n: int) -> list[str]:
        """Start routers until there are n, spread over nodes by `router_strategy`; returns the new
        ids once each has loaded the dense model and attached. Raises ScaleError (the new ones
        stopped) when one cannot start."""
        with self._start_lock:
            return self._start(n)

    def prepare(self, n: int) -> None:
        """Create the actors of the routers `start(n)` would add, without starting them: their
        processes import the model code (~5 s on 2 cores) while the controller starts the workers,
        instead of after. A router that cannot be created is left to `start` to report."""
        with self._start_lock:
            ours = self._nodes_taken()
            for rid in self._new_ids(n):
                try:
                    self._prepared[rid] = self._create(rid, ours)
                except ScaleError:
                    return

    def drop_prepared(self) -> None:
        """Stop the routers `prepare` created that no `start` took."""
        with self._start_lock:
            prepared, self._prepared = self._prepared, {}
        self._stop({rid: h for rid, (h, _) in prepared.items()})

    def _new_ids(self, n: int) -> list[str]:
        """The ids of the routers to add, running and prepared ones counted, to have `n`."""
        with self._lock:
            taken = set(self._handles) | set(self._prepared)
        return free_ids(n - len(taken), taken)

    def _nodes_taken(self) -> collections.Counter:
        """Routers per node: the running ones' and the prepared ones'."""
        with self._lock:
            ours = collections.Counter(self._nodes.values())
        ours.update(node for _, node in self._prepared.values() if node is not None)
        return ours

    def _create(self, rid: str, ours: collections.Counter) -> tuple[ray.actor.ActorHandle, str | None]:
        """Router `rid`'s actor on a node chosen by `router_strategy` (counted in `ours`)."""
        bundle = {"CPU": 0.0, **self.config.router_resources}
        try:
            node, soft = choose_node(self.config.router_strategy, bundle, ours)
        except ValueError as e:
            raise ScaleError(str(e)) from None
        if node is not None:
            ours[node] += 1
        try:
            handle = router_actor_class(self.config, rid, node, soft).remote(self.config, rid)
        except ValueError as e:  # ActorAlreadyExistsError: the name is still held by the old one
            raise ScaleError(f"router {rid} could not be created: {e}") from None
        return handle, node

    def _start(self, n: int) -> list[str]:
        ours = self._nodes_taken()
        with self._lock:
            running = set(self._handles)
        want = n - len(running)
        created = {rid: self._prepared.pop(rid)[0] for rid in sorted(self._prepared, key=int)[: max(0, want)]}
        extra, self._prepared = self._prepared, {}
        self._stop({rid: h for rid, (h, _) in extra.items()})  # prepared for more than are needed now
        for rid in free_ids(want - len(created), running | set(created)):
            try:
                created[rid] = self._create(rid, ours)[0]
            except ScaleError:
                self._stop(created)
                raise
        new = sorted(created, key=int)
        refs = {rid: h.start.remote() for rid, h in created.items()}
        for rid, ref in refs.items():
            try:
                ray.get(ref, timeout=self.config.worker_resources.placement_timeout_s + 600)
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                self._stop(created)
                cause = e.cause if isinstance(e, RayTaskError) and e.cause is not None else e
                raise ScaleError(f"router {rid} did not start: {type(cause).__name__}: {cause}") from None
        nodes = {rid: ray.get(h.node_id.remote()) for rid, h in created.items()}
        with self._lock:
            self._handles.update(created)
            self._nodes.update(nodes)
        return new

    def _stop(self, handles: dict) -> None:
        for h in handles.values():
            kill_actor(h)

    def remove(self, rid: str, drain_timeout_s: float) -> None:
        """Stop router `rid`: first no new requests (the front ends leave it: `draining`), then
        wait for its sequences to finish (up to `drain_timeout_s`), then kill it; streams still
        open then move to the other routers (their front ends re-submit them)."""
        with self._lock:
            handle = self._handles.get(rid)
            self.draining.add(rid)
        if handle is None:
            return
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            try:
                report = ray.get(handle.report.remote(), timeout=REPORT_TIMEOUT_S)
            except (RayActorError, GetTimeoutError):
                break
            if report["sequences"] == 0:
                break
            time.sleep(0.2)
        with self._lock:
            self._handles.pop(rid, None)
            self._nodes.pop(rid, None)
            self.draining.discard(rid)
        with_shutdown(handle)

    def maintain(self, n: int) -> None:
        """Bring back routers Ray gave up restarting (their count below `n`), and tell each router
        how many share its node."""
        for rid, handle in self.handles().items():
            try:
                node = ray.get(handle.node_id.remote(), timeout=REPORT_TIMEOUT_S)
                with self._lock:
                    if rid in self._handles:
                        self._nodes[rid] = node  # routers adopted by a restarted controller too
            except (GetTimeoutError, ActorUnavailableError):
                continue  # busy, or restarting: Ray's to bring back
            except ActorDiedError as e:  # for good: no restarts left, or its node is gone
                log.warning("router %s is gone (%s); starting another", rid, type(e).__name__)
                with self._lock:
                    self._handles.pop(rid, None)
                    self._nodes.pop(rid, None)
        if len(self.handles()) < n and not self._start_lock.locked():  # (a scale may be starting them)
            try:
                self.start(n)
            except ScaleError as e:
                log.warning("could not restore %d routers: %s", n, e)
        self._share_nodes()

    def _share_nodes(self) -> None:
        """Each router learns how many routers run on its node (`Router.share_node`: a router that
        computes on every core divides them with those). Sent without waiting, every controller
        step, so a router Ray restarted (back to its own default) hears it again."""
        with self._lock:
            per_node = collections.Counter(self._nodes.values())
            shares = [
                (h, per_node[self._nodes[rid]]) for rid, h in self._handles.items() if rid in self._nodes
            ]
        for handle, count in shares:
            handle.share_node.remote(count)

    # ---- what a controller needs (`controller.Routers`) ------------------------------------------

    def install(self, placement: Placement, skip: str | None = None, wait: bool = True) -> None:
        refs = {
            rid: h.install_placement.remote(placement) for rid, h in self.handles().items() if rid != skip
        }
        if not wait or not refs:
            return
        for rid, ref in refs.items():
            try:
                ray.get(ref, timeout=INSTALL_TIMEOUT_S)
            except (RayActorError, GetTimeoutError) as e:
                # Dead (a restarted one attaches anew and gets the current placement) or stuck: in
                # neither case can a pass of it use the old placement's retired workers for long.
                log.warning(
                    "router %s did not install placement %d (%s)", rid, placement.version, type(e).__name__
                )

    def reports(self) -> dict[str, dict]:
        refs = {rid: h.report.remote() for rid, h in self.handles().items()}
        out = {}
        for rid, ref in refs.items():
            try:
                out[rid] = ray.get(ref, timeout=REPORT_TIMEOUT_S)
            except (RayActorError, GetTimeoutError, RayTaskError):
                continue
        return out

    def report(self) -> dict:
        reports = list(self.reports().values())
        loads = [r["expert_load"] for r in reports if r.get("expert_load") is not None]
        return {
            "expert_load": sum(loads[1:], loads[0].clone()) if loads else None,
            "passes": sum(int(r["passes"]) for r in reports),
            "sequences": sum(float(r["sequences"]) for r in reports),
        }

    def placements(self) -> list[Placement]:
        return [r["placement"] for r in self.reports().values() if r.get("placement") is not None]


def with_shutdown(handle) -> None:
    try:
        ray.get(handle.shutdown.remote(), timeout=30)
    except (RayActorError, RayTaskError, GetTimeoutError) as e:
        log.warning("router shutdown did not finish cleanly: %s", e)
    kill_actor(handle)


class ControllerActor:
    """`Controller` as a Ray actor, with the router replicas. Built in `start()` (an error there
    reaches the caller as itself); after a crash Ray re-runs the constructor, which then rebuilds it
    from the running workers and routers."""

    def __init__(self, config: EngineConfig):
        self._config = config
        self._controller: Controller | None = None
        self._routers = RayRouters(config)
        self._starting = threading.Lock()
        self._scaling = threading.Lock()
        auto = config.elastic.router_autoscaling
        self._autoscaler = router_autoscaler(auto) if auto is not None else None
        if ray.get_runtime_context().was_current_actor_reconstructed:
            log.warning(
                "membership controller restarted: recovering %s from its workers and routers",
                config.cluster_name,
            )
            # The routers it must start call back into it: not from the constructor, where their
            # calls would wait for it to end.
            self.start(reattach=True, routers_in_background=True)

    def start(self, reattach: bool = False, routers_in_background: bool = False) -> bool:
        """Start (or adopt) the workers, then the routers; once: later calls wait for the first."""
        with self._starting:
            if self._controller is not None:
                return True
            config = self._config
            ensure_default_model(config.model_dir)
            spec = spec_from_pretrained(config.model_dir)
            pool = make_pool(config, worker_setup(config, spec))
            self._routers.discover()
            known = self._routers.placements()
            controller = Controller(spec, pool, config, routers=self._routers)
            if not routers_in_background:
                # The routers' processes import the model code while the workers start and load.
                self._routers.prepare(controller.state.target_routers)
            try:
                controller.start(reattach=reattach or bool(known), known=known)
            except BaseException:
                pool.close()
                self._routers.drop_prepared()
                raise
            self._controller = controller
            if self._autoscaler is not None and not reattach:  # start within the autoscaler's range
                target = controller.state.target_routers
                controller.state.target_routers = max(
                    self._autoscaler.minimum, min(self._autoscaler.maximum, target)
                )
        controller.on_step = self._upkeep
        # Outside the start lock: each new router's start() calls attach_router() here.
        if routers_in_background:
            controller.start_loop()  # its first step restores the router count
        else:
            self._routers.start(controller.state.target_routers)
            controller.start_loop()
        return True

    def _upkeep(self) -> None:
        """Each controller step: bring back routers Ray gave up on, and autoscale the routers."""
        controller = self._controller
        self._routers.maintain(controller.state.target_routers)
        if self._autoscaler is None or self._scaling.locked():
            return
        load = float(self._routers.report().get("sequences", 0.0))
        want = self._autoscaler.observe(time.monotonic(), load, controller.state.target_routers)
        if want is not None:
            threading.Thread(
                target=self._autoscale, args=(want,), name="router-autoscale", daemon=True
            ).start()

    def _autoscale(self, n: int) -> None:
        try:
            self.scale_routers(n, by_hand=False)
            log.warning("router autoscaling: %d routers", n)
        except (MembershipBusy, ScaleError, ValueError) as e:
            log.warning("router autoscaling to %d failed: %s", n, e)

    @property
    def controller(self) -> Controller:
        if self._controller is None:
            with self._starting:  # a router attaching while the controller starts waits for it
                pass
        if self._controller is None:
            raise RuntimeError("the membership controller has not started")
        return self._controller

    def ping(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # ---- routers ----------------------------------------------------------------------------------

    def attach_router(self, router_id: str) -> Placement:
        return self.controller.placement

    def routers(self) -> list[dict]:
        """id, actor name, and whether it is draining (front ends send it nothing new), per router."""
        return [
            {
                "router_id": rid,
                "name": router_name(self._config.cluster_name, rid),
                "draining": rid in self._routers.draining,
            }
            for rid in self._routers.ids()
        ]

    def router_reports(self) -> dict[str, dict]:
        """Each router's report (its load, placement version), for cluster state and metrics."""
        out = {}
        for rid, r in self._routers.reports().items():
            out[rid] = {k: v for k, v in r.items() if k not in ("expert_load", "placement")}
        return out

    def scale_routers(self, n: int, by_hand: bool = True) -> dict:
        """Run `n` routers: new ones load the dense model and join while the others serve; removed
        ones drain first. ValueError for a bad n, MembershipBusy while another router change runs
        (or router autoscaling is on), ScaleError (the new ones stopped) when one cannot start."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_ROUTERS:
            raise ValueError(f"num_routers must be an integer between 1 and {MAX_ROUTERS}, got {n!r}")
        if by_hand and self._autoscaler is not None:
            raise MembershipBusy(
                f"router autoscaling manages the router count ({self._autoscaler.minimum}-"
                f"{self._autoscaler.maximum}); start without it to scale routers by hand"
            )
        if not self._scaling.acquire(blocking=False):
            raise MembershipBusy("a router change is in progress; retry when it is done")
        state = self.controller.state
        try:
            before = len(self._routers.ids())
            t0 = time.monotonic()
            previous, state.target_routers = state.target_routers, n
            try:
                if n > before:
                    self._routers.start(n)
                for rid in self._routers.ids()[n:][::-1]:
                    self._routers.remove(rid, drain_timeout_s=self._config.elastic.router_drain_timeout_s)
            except BaseException:
                state.target_routers = previous
                raise
            self.controller._install(self.controller.placement, wait=False)  # the labels carry n
            state.events["scale_routers" if by_hand else "autoscale_routers"] += 1
            return {"from_routers": before, "num_routers": n, "seconds": round(time.monotonic() - t0, 3)}
        finally:
            self._scaling.release()

    # ---- membership -------------------------------------------------------------------------------

    def recover(self, base: Placement, lost: dict[int, str], caller: str | None = None) -> Placement:
        return self.controller.recover(base, lost, caller)

    def scale(self, n: int) -> Placement:
        return self.controller.scale(n)

    def rebalance(self) -> dict:
        return self.controller.rebalance()

    def health(self) -> dict:
        return self.controller.health()

    def describe_workers(self, workers: tuple[int, ...]) -> list[dict]:
        return self.controller.describe_workers(workers)

    def balance(self) -> dict:
        return self.controller.balance()

    def stats(self) -> dict:
        return self.controller.stats()

    def placement(self) -> Placement:
        return self.controller.placement

    def shutdown(self) -> None:
        """Stop the routers, then the workers (the cluster's end)."""
        if self._controller is not None:
            self._controller.stop()
        for handle in self._routers.handles().values():
            with_shutdown(handle)
        if self._controller is not None:
            self._controller.pool.close()
