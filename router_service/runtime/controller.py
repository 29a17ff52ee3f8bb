"""The membership controller: the one owner of the expert-worker set and every change to it.

Routers are replicas that each pin one placement per pass; the controller decides the placements and
hands each new one to every router (`Routers.install`, applied by a router at its next pass boundary,
under its model lock). It owns:

- `scale(n)` and `rebalance()`: plan a new placement (`transitions.py`: contiguous blocks, or EPLB
  over the expert load summed from every router), start the new workers and load the changed
  layouts *in the background* while passes go on, install the new placement on every router, and
  only once each live router has installed it (no pass of any router can still use the old one)
  retire the workers nobody uses and drop the layouts nobody serves. A change that cannot finish
  rolls back: the old placement never stopped serving, and the caller gets the cause.
- `recover(base, lost, caller)`: called by a router whose pass lost workers mid-layer. Replicas on
  survivors take over, or the survivors load the lost experts, or a fresh worker starts; the new
  placement goes back to the caller at once (it finishes its pass on it) and to the other routers.
  Several routers that lose the same worker get one recovery: a call whose lost workers the current
  placement no longer names gets that placement, not a second one.
- a loop that health-checks idle workers, brings the worker count back to its target after losses,
  rebalances when a layer's balance falls below the threshold, and runs the autoscaler.

One change at a time: a second `scale` / `rebalance` while one runs gets `MembershipBusy` (HTTP 409 /
gRPC FAILED_PRECONDITION). `recover` never waits for that lock (a pass is blocked in it); a change
that finds the placement replaced under it plans again.

The controller runs in the router's process with the "local" transport (one router, the workers in
the same process) and as its own Ray actor otherwise (`controller_actor.py`); the logic is this
class in both.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from moe_models.spec import ModelSpec
from router_service.config import EngineConfig
from router_service.errors import MembershipBusy, NoCapacityError, ScaleError
from router_service.runtime.autoscaler import Autoscaler
from router_service.runtime.membership_state import MembershipState
from router_service.runtime.transitions import (
    Change,
    adopt,
    assignment_of,
    balance,
    packs,
    plan_change,
    running_of,
)
from router_service.runtime.transport import WorkerPool
from router_service.stages.placement import (
    Placement,
    placement_from_assignments,
    reassign_lost_slots,
    without_workers,
)

log = logging.getLogger(__name__)


class Routers(Protocol):
    """The routers a controller serves, as it sees them."""

    def install(self, placement: Placement, skip: str | None = None, wait: bool = True) -> None:
        """Have every live router (but `skip`) use `placement` from its next pass on; with `wait`,
        return once each has (a router that does not answer is dropped from the set)."""
        ...

    def report(self) -> dict:
        """Summed over the routers: "expert_load" ([L, E] tensor or None), "passes" (int) and
        "sequences" (running + waiting)."""
        ...


class _Replaced(Exception):
    """The placement a change was planned on was replaced (workers lost) before it could publish."""


class Controller:
    def __init__(
        self, spec: ModelSpec, pool: WorkerPool, config: EngineConfig, routers: Routers | None = None
    ):
        self.spec = spec
        self.pool = pool
        self.routers = routers
        self.elastic = config.elastic
        self.num_slots = spec.num_experts + self.elastic.redundant_experts
        self.state = MembershipState(
            target=config.num_workers,
            redundant_experts=self.elastic.redundant_experts,
            num_slots=self.num_slots,
            target_routers=config.num_routers,
        )
        self.placement: Placement | None = None
        self._lock = threading.RLock()  # the placement, ids and versions, the dead set
        self._next_id = 0
        self._next_version = -1  # the first placement is version 0
        self._change = threading.Lock()
        self._rebalanced_at_pass = 0
        self._next_check = 0.0
        self.autoscaler = (
            Autoscaler(self.elastic.autoscaling, self.num_slots) if self.elastic.autoscaling else None
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_step = None  # called at each step of the loop (the controller actor's router upkeep)

    # ---- ids ------------------------------------------------------------------------------------

    def _new_ids(self, n: int) -> list[int]:
        with self._lock:
            ids = list(range(self._next_id, self._next_id + n))
            self._next_id += n
            return ids

    def _new_version(self) -> int:
        with self._lock:
            self._next_version += 1
            return self._next_version

    @property
    def target(self) -> int:
        return self.state.target

    # ---- start ----------------------------------------------------------------------------------

    def start(self, reattach: bool = False, known: list[Placement] = ()) -> Placement:
        """Start the configured workers, or (a restarted controller or router) adopt the running
        ones: the newest of the `known` placements (the routers') that the running workers still
        serve, else the one the workers' latest layouts form. Raises the first worker's error when
        the workers cannot start."""
        running: dict = {}
        if reattach:
            found = self.pool.discover()
            placement = self._adopt(found, known)
            if placement is not None:
                return placement
            running = {w: (int(info["layout"]), assignment_of(info)) for w, info in found.items()}
            for w, info in found.items():  # layouts of a change the old controller did not finish
                for key in info.get("layouts", []):
                    if key != info["layout"]:
                        self.pool.drop_layouts({w: key})
        change = self._plan(running, self.target, balanced=False)
        errors = self.pool.start_workers(change.starts)
        errors.update(self.pool.load_layouts(change.loads))
        if errors:
            self.pool.retire(set(change.starts))
            first = next(iter(errors.values()))
            if len(errors) > 1 and isinstance(first, ValueError):
                raise type(first)(
                    f"{len(errors)} of {self.target} expert workers failed to start; first: {first}"
                )
            raise first
        with self._lock:
            self.placement = change.placement
        self._install(change.placement)
        self.pool.retire(change.retire)
        self.pool.drop_layouts(change.drops)
        self._record("reattach" if running else "start", len(running), self.target, 0.0, change.placement)
        return change.placement

    def _adopt(self, found: dict[int, dict], known: list[Placement]) -> Placement | None:
        """The placement the running workers serve, or None when they do not cover every expert (a
        plan over them then brings back the target count: `start`).

        The target counts come back from the workers' labels (set at every change); without them,
        the configured ones."""
        if not found:
            return None
        labels = [info.get("labels") or {} for info in found.values()]
        self.state.target = max(int(lb.get("target_workers", 0)) for lb in labels) or self.state.target
        routers = max(int(lb.get("target_routers", 0)) for lb in labels)
        self.state.target_routers = routers or self.state.target_routers
        keys = [k for info in found.values() for k in info.get("layouts", [])] + [0]
        versions = [p.version for p in known]
        with self._lock:
            self._next_id = max(found) + 1
            self._next_version = max(keys + versions)
        usable = [
            p
            for p in known
            if all(w in found and p.layout_of(w) in found[w].get("layouts", []) for w in p.worker_ids)
        ]
        if usable:
            placement = max(usable, key=lambda p: p.version)  # what the routers serve: keep it
        else:
            try:
                placement = adopt(self.spec, found, self._new_version())
            except (ValueError, KeyError, TypeError) as e:
                log.warning("the running workers do not form a placement (%s); re-placing over them", e)
                return None
        with self._lock:
            self.placement = placement
        self._install(placement)
        used = set(placement.worker_ids)
        self.pool.drop_layouts(
            {
                w: k
                for w in placement.worker_ids
                for k in found[w].get("layouts", [])
                if k != placement.layout_of(w)
            }
        )
        self.pool.retire(set(found) - used)
        self._record("reattach", len(found), len(placement.worker_ids), 0.0, placement)
        self._wake.set()  # back to the target count, if fewer workers were found
        log.warning(
            "reattached to %d running expert workers (placement version %d)",
            placement.num_workers,
            placement.version,
        )
        return placement

    # ---- planning and applying ------------------------------------------------------------------

    def _load(self) -> torch.Tensor:
        """The expert load of every router, summed: [L, E]."""
        report = self.routers.report() if self.routers is not None else {}
        load = report.get("expert_load")
        if load is None:
            return torch.zeros(len(self.spec.moe_layers), self.spec.num_experts)
        return load

    def _plan(self, running, n: int, balanced: bool) -> Change:
        load = self._load() if balanced or self.elastic.redundant_experts else None
        targets = packs(self.spec, n, self.num_slots, balanced, self.elastic.redundant_experts, load)
        return plan_change(self.spec, running, targets, self._new_version(), self._new_ids)

    def _install(self, placement: Placement, skip: str | None = None, wait: bool = True) -> None:
        self.pool.label_workers(
            placement.worker_ids,
            {"target_workers": self.state.target, "target_routers": self.state.target_routers},
        )
        if self.routers is not None:
            self.routers.install(placement, skip=skip, wait=wait)

    def _apply(self, base: Placement, change: Change) -> None:
        """Start and load in the background, install on every router, then clean up."""
        errors: dict[int, BaseException] = {}
        with ThreadPoolExecutor(2, thread_name_prefix="membership") as pool:
            jobs = []
            if change.starts:
                jobs.append(pool.submit(self.pool.start_workers, change.starts))
            if change.loads:
                jobs.append(pool.submit(self.pool.load_layouts, change.loads))
            for job in jobs:
                errors.update(job.result())
        if errors:
            self._roll_back(change)
            causes = "; ".join(f"{e}" for e in errors.values())
            raise ScaleError(f"{causes}") from next(iter(errors.values()))
        with self._lock:
            if self.placement is not base:
                self._roll_back(change)
                raise _Replaced
            self.placement = change.placement
        # Every router installs it at its next pass boundary; a recovery meanwhile builds on it.
        self._install(change.placement)
        self.pool.retire(change.retire)
        self.pool.drop_layouts(change.drops)

    def _roll_back(self, change: Change) -> None:
        self.pool.retire(set(change.starts))
        self.pool.drop_layouts({w: key for w, (key, _) in change.loads.items()})

    def _resize(self, n: int, kind: str, balanced: bool = False) -> Placement:
        """Plan and apply a change to n workers; plan again when workers are lost meanwhile."""
        t0 = time.monotonic()
        for _ in range(3):
            base = self.placement
            change = self._plan(running_of(base, self.state.dead), n, balanced)
            change.retire |= set(base.worker_ids) - set(change.placement.worker_ids)  # the dead too
            try:
                self._apply(base, change)
            except _Replaced:
                continue
            except ScaleError as e:
                raise ScaleError(
                    f"{kind} to {n} workers failed and was rolled back (placement version {base.version} "
                    f"still serves): {e}"
                ) from e
            self._record(kind, base.num_workers, n, time.monotonic() - t0, change.placement)
            return change.placement
        raise ScaleError(f"{kind} to {n} workers gave up: workers kept being lost while it ran")

    def _locked(self, what: str):
        if not self._change.acquire(blocking=False):
            raise MembershipBusy(
                f"a membership change ({self.state.changing}) is in progress; retry when it is done"
            )
        self.state.changing = what
        return _Release(self)

    # ---- the API --------------------------------------------------------------------------------

    def check_count(self, n) -> int:
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"num_workers must be an integer, got {n!r}")
        if not 1 <= n <= self.num_slots:
            raise ValueError(
                f"num_workers must be between 1 and the number of expert slots ({self.num_slots} = "
                f"{self.spec.num_experts} experts + {self.elastic.redundant_experts} redundant), got {n}"
            )
        return n

    def scale(self, n: int) -> Placement:
        """Run on n workers; returns once the new placement serves on every router. ValueError for
        a bad n, MembershipBusy while another change runs, ScaleError when it rolled back."""
        n = self.check_count(n)
        if self.autoscaler is not None:
            raise MembershipBusy(
                f"autoscaling manages the worker count ({self.autoscaler.min_workers}-"
                f"{self.autoscaler.max_workers}); start without it to scale by hand"
            )
        with self._locked(f"scale to {n} workers"):
            return self._retarget(n, "scale")

    def rebalance(self) -> dict:
        """Re-place the experts (and replicas) by EPLB over the load summed from every router, on the
        same number of workers. Returns the balance before and the expected balance after."""
        with self._locked("rebalance"):
            before = self.balance()
            placement = self._resize(self.placement.num_workers, "rebalance", balanced=True)
            self._rebalanced_at_pass = self._passes()
            return {
                "before": before,
                "after": self.balance(placement),
                "placement_version": placement.version,
            }

    def balance(self, placement: Placement | None = None) -> dict:
        return balance(placement or self.placement, self._load())

    # ---- faults ---------------------------------------------------------------------------------

    def recover(self, base: Placement, lost: dict[int, str], caller: str | None = None) -> Placement:
        """Called by router `caller` whose pass on `base` lost workers (id -> why), or by the health
        check: return a placement without them in which survivors (or a fresh worker) hold every
        expert, installed on every other router too. Raises NoCapacityError when no worker can
        serve."""
        t0 = time.monotonic()
        with self._lock:
            self.state.lost(lost)
            self.pool.retire(set(lost))
            current = self.placement
            gone = self.state.dead
            if current.version > base.version and not set(current.worker_ids) & gone:
                return current  # already recovered (another router, or the health check)
            if self.state.unavailable is not None and t0 < self.state.retry_at:
                raise NoCapacityError(self.state.unavailable)
            version = self._new_version()
            new = without_workers(current, gone, version)
            if new is None:
                new = self._replace_lost(current, gone, version)
            self.placement = new
            self.state.unavailable = None
            self._record("failover", current.num_workers, new.num_workers, time.monotonic() - t0, new)
        # The others install it at their next pass boundary; not waited for: one of them may be
        # blocked in this very method, inside its pass.
        self._install(new, skip=caller, wait=False)
        self._wake.set()  # the loop brings the count back to its target
        return new

    def _replace_lost(self, placement: Placement, gone: set[int], version: int) -> Placement:
        survivors = [w for w in placement.worker_ids if w not in gone]
        if survivors:
            new, changed = reassign_lost_slots(placement, gone, version)
            errors = self.pool.load_layouts({w: (version, new.worker_assignment(w)) for w in changed})
            if not errors:
                return new
            self.state.lost({w: f"failed to take over lost experts: {e}" for w, e in errors.items()})
            self.pool.retire(set(errors))
            return self._replace_lost(placement, gone | set(errors), version)
        # Nobody left: one fresh worker takes every expert (the loop then restores the count).
        (w,) = self._new_ids(1)
        everything = {layer: list(range(self.spec.num_experts)) for layer in self.spec.moe_layers}
        errors = self.pool.start_workers({w: (version, everything)})
        if errors:
            self.state.unavailable = f"no expert worker is running and none could be started: {errors[w]}"
            self.state.retry_at = time.monotonic() + self.elastic.restore_interval_s
            raise NoCapacityError(self.state.unavailable)
        return placement_from_assignments(
            version, self.spec.moe_layers, self.spec.num_experts, (w,), [everything], (version,)
        )

    # ---- health and statistics --------------------------------------------------------------------

    def health(self) -> dict:
        return self.state.health(self.placement)

    def describe_workers(self, workers: tuple[int, ...]) -> list[dict]:
        """The workers as the pool knows them (node, device, experts, bytes)."""
        return self.pool.describe_workers(workers)

    def stats(self) -> dict:
        return self.state.stats(self.autoscaler)

    def _record(self, kind: str, before: int, after: int, seconds: float, placement: Placement) -> None:
        self.state.record(kind, before, after, seconds, placement)

    def _passes(self) -> int:
        return int(self.routers.report().get("passes", 0)) if self.routers is not None else 0

    # ---- the control loop -----------------------------------------------------------------------

    def start_loop(self) -> None:
        self._thread = threading.Thread(target=self._control_loop, name="membership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _control_loop(self) -> None:
        interval = self.elastic.restore_interval_s
        if self.autoscaler is not None:
            interval = min(interval, self.autoscaler.config.metrics_interval_s)
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._control_step()
            except Exception:  # the controller must outlive any one bad step
                log.exception("membership controller step failed")

    def _control_step(self) -> None:
        if self.on_step is not None:
            self.on_step()
        p = self.placement
        now = time.monotonic()
        if now >= self._next_check:  # idle workers too: a loss is found without waiting for traffic
            self._next_check = now + self.elastic.restore_interval_s
            self._check_health(p)
            p = self.placement
        if self.autoscaler is not None:
            report = self.routers.report() if self.routers is not None else {}
            want = self.autoscaler.observe(now, float(report.get("sequences", 0.0)), self.state.target)
            if want is not None:
                self._try(f"autoscale to {want} workers", lambda: self._retarget(want, "autoscale"))
                return
        broken = self.state.unavailable is not None or bool(set(p.worker_ids) & self.state.dead)
        if (broken or p.num_workers != self.state.target) and now >= self.state.retry_at:
            self._try(
                f"restore {self.state.target} workers", lambda: self._resize(self.state.target, "restore")
            )
            return
        every = self.elastic.rebalance_every_steps
        if every:
            passes = self._passes()
            if passes - self._rebalanced_at_pass >= every:
                worst = min(self.balance()["balancedness"].values(), default=1.0)
                if worst < self.elastic.rebalance_threshold:
                    self._try("rebalance", self._auto_rebalance)
                else:
                    self._rebalanced_at_pass = passes

    def _check_health(self, p: Placement) -> None:
        live = tuple(w for w in p.worker_ids if w not in self.state.dead)
        lost = self.pool.check(live, self.elastic.worker_timeout_s)
        if lost:
            try:
                self.recover(p, lost)
            except NoCapacityError as e:
                log.warning("%s", e)

    def _retarget(self, n: int, kind: str) -> Placement:
        """A new target count and the change to it (the target is set first, so that the change's
        labels carry it; a failed change leaves the old one)."""
        previous, self.state.target = self.state.target, n
        try:
            return self._resize(n, kind)
        except BaseException:
            self.state.target = previous
            raise

    def _auto_rebalance(self) -> None:
        self._resize(self.placement.num_workers, "rebalance", balanced=True)
        self._rebalanced_at_pass = self._passes()

    def _try(self, what: str, action) -> None:
        if not self._change.acquire(blocking=False):
            return
        self.state.changing = what
        try:
            action()
            if what.startswith("restore"):
                self.state.unavailable = None
        except ScaleError as e:
            self.state.retry_at = time.monotonic() + self.elastic.restore_interval_s
            if self.state.unavailable is not None:
                self.state.unavailable = f"no expert worker is running and none could be started: {e}"
            log.warning("%s failed: %s; retrying in %.0fs", what, e, self.elastic.restore_interval_s)
        finally:
            self.state.changing = None
            self._change.release()


class _Release:
    def __init__(self, c: Controller):
        self.c = c

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.c.state.changing = None
        self.c._change.release()
