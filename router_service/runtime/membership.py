"""Membership: the live set of expert workers and every change to it.

One object per router owns the target worker count and every transition between placements:

- `scale(n)` and `rebalance()` plan a new placement (contiguous blocks, or DeepSeek's EPLB over the
  router's load window when there are redundant slots or a rebalance is asked for), match it to the
  running workers so as few weights move as possible, start the new workers and load the changed
  layouts *in the background* while passes go on, publish the new placement at a pass boundary (under
  the router's model lock, so a pass pins one version from start to end), and only then retire the
  workers no placement uses and drop the layouts nobody serves. A change that cannot finish (no
  resources for a worker, a worker dying while it loads) rolls back: the old placement never stopped
  serving, and the caller gets the cause.
- `recover()` is called by a pass that lost workers mid-layer: replicas on survivors take over, or the
  survivors load the lost experts, or (nobody left) a fresh worker starts; the new placement is
  published at once, inside that pass, since the old one cannot serve.
- a controller thread brings the worker count back to its target after losses, rebalances when a
  layer's balance falls below the threshold, and runs the autoscaler.

One change at a time: a second `scale` / `rebalance` while one runs gets `MembershipBusy` (HTTP 409 /
gRPC FAILED_PRECONDITION). `recover()` never waits for that lock (a pass holds the model lock, which a
change needs to publish); a change that finds the placement replaced under it plans again.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from moe_models.spec import ModelSpec
from router_service.config import EngineConfig
from router_service.errors import MembershipBusy, NoCapacityError, ScaleError
from router_service.runtime.autoscaler import Autoscaler
from router_service.runtime.transport import LayoutSpec, Transport
from router_service.stages.eplb import (
    balancedness,
    imbalance,
    match_workers,
    rebalance_experts,
    slot_offsets,
    worker_capacities,
    worker_loads,
)
from router_service.stages.placement import (
    Placement,
    contiguous_blocks,
    placement_from_assignments,
    reassign_lost_slots,
    without_workers,
)

log = logging.getLogger(__name__)

HISTORY = 64  # membership events kept for cluster_state()


class _Replaced(Exception):
    """The placement a change was planned on was replaced (workers lost) before it could publish."""


@dataclass
class Change:
    """A planned transition: the placement to publish and what it takes to get there."""

    placement: Placement
    starts: dict[int, LayoutSpec] = field(default_factory=dict)  # new workers
    loads: dict[int, LayoutSpec] = field(default_factory=dict)  # running workers, new layouts
    retire: set[int] = field(default_factory=set)  # workers the new placement does not use
    drops: dict[int, int] = field(default_factory=dict)  # old layout keys to free after publishing


class Membership:
    def __init__(
        self, spec: ModelSpec, transport: Transport, dispatcher, model_lock, config: EngineConfig, load_fn
    ):
        self.spec = spec
        self.transport = transport
        self.dispatcher = dispatcher  # .placement is what passes read; .load the expert load window
        self.model_lock = model_lock
        self.elastic = config.elastic
        self.target = config.num_workers
        self.num_slots = spec.num_experts + self.elastic.redundant_experts
        self._load_fn = load_fn  # () -> sequences running + waiting, for the autoscaler
        self._ids = threading.Lock()
        self._next_id = 0
        self._next_version = -1  # the first placement is version 0
        self._change = threading.Lock()
        self.changing: str | None = None
        self._dead: set[int] = set()
        self.unavailable: str | None = None  # why no pass can run now
        self._retry_at = 0.0
        self._lost_at: float | None = None  # first loss since the count was last at its target
        self.events: collections.Counter[str] = collections.Counter()
        self.recovery_seconds: collections.deque[float] = collections.deque(maxlen=HISTORY)
        self._recovery_total = [0, 0.0]  # count, seconds: cumulative, for metrics
        self.history: collections.deque[dict] = collections.deque(maxlen=HISTORY)
        self._rebalanced_at_pass = 0
        self._next_check = 0.0
        self.autoscaler = (
            Autoscaler(self.elastic.autoscaling, self.num_slots) if self.elastic.autoscaling else None
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- ids ------------------------------------------------------------------------------------

    def _new_ids(self, n: int) -> list[int]:
        with self._ids:
            ids = list(range(self._next_id, self._next_id + n))
            self._next_id += n
            return ids

    def _new_version(self) -> int:
        with self._ids:
            self._next_version += 1
            return self._next_version

    # ---- start ----------------------------------------------------------------------------------

    def start(self, reattach: bool = False) -> Placement:
        """Start the configured workers (or, after a router restart, adopt the running ones) and
        publish the first placement. Raises the first worker's error when the workers cannot start."""
        running: dict = {}
        if reattach:
            found = self.transport.discover()
            placement = self._adopt(found)
            if placement is not None:
                return placement
            running = {w: (int(info["layout"]), _assignment(info)) for w, info in found.items()}
            for w, info in found.items():  # layouts of a change the old router did not finish
                for key in info.get("layouts", []):
                    if key != info["layout"]:
                        self.transport.drop_layouts({w: key})
        change = self._plan(running, self.target, balanced=False)
        errors = self.transport.start_workers(change.starts)
        errors.update(self.transport.load_layouts(change.loads))
        if errors:
            self.transport.retire(set(change.starts))
            first = next(iter(errors.values()))
            if len(errors) > 1 and isinstance(first, ValueError):
                raise type(first)(
                    f"{len(errors)} of {self.target} expert workers failed to start; first: {first}"
                )
            raise first
        self._publish(change.placement)
        self.transport.retire(change.retire)
        self.transport.drop_layouts(change.drops)
        self._record("reattach" if running else "start", len(running), self.target, 0.0, change.placement)
        return change.placement

    def _adopt(self, found: dict[int, dict]) -> Placement | None:
        """The placement the running workers serve (each its latest layout), or None when they do not
        cover every expert (a plan over them then brings back the target count: `start`).

        The target count comes back from the workers' labels (set at every change); without them, it
        is the configured count.
        """
        if not found:
            return None
        targets = [int((info.get("labels") or {}).get("target_workers", 0)) for info in found.values()]
        self.target = max(targets) or self.target
        # Slot order is not stored anywhere; ordering by the experts held restores the contiguous
        # order (and with it the combine order) of placements this router made.
        first_layer = str(self.spec.moe_layers[0])
        ids = sorted(found, key=lambda w: (min(_experts(found[w], first_layer), default=0), w))
        keys = [k for info in found.values() for k in info.get("layouts", [])] + [0]
        with self._ids:
            self._next_id = max(ids) + 1
            self._next_version = max(keys)
        try:
            assignments = [_assignment(found[w]) for w in ids]
            placement = placement_from_assignments(
                self._new_version(),
                self.spec.moe_layers,
                self.spec.num_experts,
                tuple(ids),
                assignments,
                tuple(int(found[w]["layout"]) for w in ids),
            )
        except (ValueError, KeyError, TypeError) as e:
            log.warning("the running workers do not form a placement (%s); re-placing over them", e)
            return None
        self._publish(placement)
        self.transport.drop_layouts(
            {w: k for w in ids for k in found[w].get("layouts", []) if k != found[w]["layout"]}
        )
        self._record("reattach", len(ids), len(ids), 0.0, placement)
        self._wake.set()  # back to the target count, if fewer workers were found
        log.warning(
            "reattached to %d running expert workers (placement version %d)", len(ids), placement.version
        )
        return placement

    # ---- planning -------------------------------------------------------------------------------

    def _packs(self, n: int, balanced: bool) -> list[dict[int, list[int]]]:
        """Per new worker, MoE layer -> its experts: EPLB over the load window when asked or when
        there are redundant slots, else contiguous blocks."""
        layers = self.spec.moe_layers
        if not balanced and self.elastic.redundant_experts == 0:
            return [
                {layer: block for layer in layers} for block in contiguous_blocks(self.spec.num_experts, n)
            ]
        weight = self.dispatcher.load.totals().double()  # [L, E]
        phy2log, _, _ = rebalance_experts(weight, self.num_slots, n)
        offs = slot_offsets(worker_capacities(self.num_slots, n))
        return [
            {layer: phy2log[li, offs[j] : offs[j + 1]].tolist() for li, layer in enumerate(layers)}
            for j in range(n)
        ]

    def _running(self, base: Placement | None) -> dict[int, tuple[int, dict[int, list[int]]]]:
        """Live workers of `base`: id -> (layout key, assignment)."""
        if base is None:
            return {}
        return {
            w: (base.layout_of(w), base.worker_assignment(w)) for w in base.worker_ids if w not in self._dead
        }

    def _plan(self, running: dict[int, tuple[int, dict[int, list[int]]]], n: int, balanced: bool) -> Change:
        """The change from the `running` workers (id -> (layout key, assignment)) to `n` workers."""
        layers = self.spec.moe_layers
        packs = self._packs(n, balanced)
        version = self._new_version()
        held = {w: a for w, (_, a) in running.items()}
        running_ids = list(running)
        match = match_workers(
            [[set(p[layer]) for layer in layers] for p in packs],
            [[set(held[w][layer]) for layer in layers] for w in running_ids],
        )
        change = Change(placement=None)  # type: ignore[arg-type]
        ids, keys, assignments = [], [], []
        fresh = iter(self._new_ids(sum(1 for m in match if m < 0)))
        for pack, m in zip(packs, match, strict=True):
            if m < 0:
                w = next(fresh)
                change.starts[w] = (version, pack)
                key = version
            else:
                w = running_ids[m]
                if all(sorted(pack[layer]) == sorted(held[w][layer]) for layer in layers):
                    pack, key = held[w], running[w][0]  # the same experts: nothing to load
                else:
                    change.loads[w] = (version, pack)
                    change.drops[w] = running[w][0]
                    key = version
            ids.append(w)
            keys.append(key)
            assignments.append(pack)
        change.retire = set(running) - set(ids)
        change.placement = placement_from_assignments(
            version, layers, self.spec.num_experts, tuple(ids), assignments, tuple(keys)
        )
        return change

    # ---- applying -------------------------------------------------------------------------------

    def _publish(self, placement: Placement) -> None:
        """Make `placement` the one the next passes use. Callers hold the model lock (or nothing
        runs yet), which is what makes this a pass boundary."""
        self.transport.use_workers(placement.worker_ids)
        self.dispatcher.placement = placement

    def _apply(self, base: Placement, change: Change) -> None:
        """Start and load in the background, publish at a pass boundary, then clean up."""
        errors: dict[int, BaseException] = {}
        with ThreadPoolExecutor(2, thread_name_prefix="membership") as pool:
            jobs = []
            if change.starts:
                jobs.append(pool.submit(self.transport.start_workers, change.starts))
            if change.loads:
                jobs.append(pool.submit(self.transport.load_layouts, change.loads))
            for job in jobs:
                errors.update(job.result())
        if errors:
            self._roll_back(change)
            causes = "; ".join(f"{e}" for e in errors.values())
            raise ScaleError(f"{causes}") from next(iter(errors.values()))
        with self.model_lock:  # a pass boundary: no pass runs while we hold it
            if self.dispatcher.placement is not base:
                self._roll_back(change)
                raise _Replaced
            self._publish(change.placement)
        self.transport.retire(change.retire)
        self.transport.drop_layouts(change.drops)

    def _roll_back(self, change: Change) -> None:
        self.transport.retire(set(change.starts))
        self.transport.drop_layouts({w: key for w, (key, _) in change.loads.items()})

    def _resize(self, n: int, kind: str, balanced: bool = False) -> Placement:
        """Plan and apply a change to n workers; plan again when workers are lost meanwhile."""
        t0 = time.monotonic()
        for _ in range(3):
            base = self.dispatcher.placement
            change = self._plan(self._running(base), n, balanced)
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
            took = time.monotonic() - t0
            self._record(kind, base.num_workers, n, took, change.placement)
            return change.placement
        raise ScaleError(f"{kind} to {n} workers gave up: workers kept being lost while it ran")

    def _locked(self, what: str):
        if not self._change.acquire(blocking=False):
            raise MembershipBusy(
                f"a membership change ({self.changing}) is in progress; retry when it is done"
            )
        self.changing = what
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
        """Run on n workers; returns once the new placement serves. ValueError for a bad n,
        MembershipBusy while another change runs, ScaleError when it rolled back."""
        n = self.check_count(n)
        if self.autoscaler is not None:
            raise MembershipBusy(
                f"autoscaling manages the worker count ({self.autoscaler.min_workers}-"
                f"{self.autoscaler.max_workers}); start without it to scale by hand"
            )
        with self._locked(f"scale to {n} workers"):
            return self._retarget(n, "scale")

    def rebalance(self) -> dict:
        """Re-place the experts (and replicas) by EPLB over the load window, on the same number of
        workers. Returns the balance before and the expected balance after."""
        with self._locked("rebalance"):
            before = self.balance()
            placement = self._resize(self.dispatcher.placement.num_workers, "rebalance", balanced=True)
            self._rebalanced_at_pass = self.dispatcher.passes
            return {
                "before": before,
                "after": self.balance(placement),
                "placement_version": placement.version,
            }

    def balance(self, placement: Placement | None = None) -> dict:
        """Per layer, from the load window: balancedness (mean / max worker load, vLLM's definition),
        imbalance ((max - mean) / mean, TensorRT-LLM's) and each worker's expected load."""
        p = placement or self.dispatcher.placement
        loads = worker_loads(self.dispatcher.load.totals().double(), p.phy2log, p.slot_offsets)  # [L, W]
        bal, imb = balancedness(loads), imbalance(loads)
        return {
            "balancedness": {layer: round(float(bal[i]), 4) for i, layer in enumerate(p.moe_layers)},
            "imbalance": {layer: round(float(imb[i]), 4) for i, layer in enumerate(p.moe_layers)},
            "worker_load": {
                layer: dict(zip(p.worker_ids, loads[i].tolist(), strict=True))
                for i, layer in enumerate(p.moe_layers)
            },
        }

    # ---- faults ---------------------------------------------------------------------------------

    def recover(self, placement: Placement, lost: dict[int, str]) -> Placement:
        """Called by a pass (holding the model lock) whose workers `lost` did not answer: publish and
        return a placement without them, in which survivors (or a fresh worker) hold every expert.
        Raises NoCapacityError when no worker can serve."""
        now = time.monotonic()
        for w, why in lost.items():
            if w not in self._dead:
                log.warning("expert worker %d lost (%s)", w, why)
                self.events["workers_lost"] += 1
        self._dead |= set(lost)
        self._lost_at = self._lost_at or now
        self.transport.retire(set(lost))
        if self.unavailable is not None and now < self._retry_at:
            raise NoCapacityError(self.unavailable)
        gone = set(lost) | self._dead
        version = self._new_version()
        new = without_workers(placement, gone, version)
        if new is None:
            new = self._replace_lost(placement, gone, version)
        self._publish(new)
        self._wake.set()  # the controller brings the count back to its target
        self.unavailable = None
        self._record("failover", placement.num_workers, new.num_workers, time.monotonic() - now, new)
        return new

    def _replace_lost(self, placement: Placement, gone: set[int], version: int) -> Placement:
        survivors = [w for w in placement.worker_ids if w not in gone]
        if survivors:
            new, changed = reassign_lost_slots(placement, gone, version)
            errors = self.transport.load_layouts({w: (version, new.worker_assignment(w)) for w in changed})
            if not errors:
                return new
            return self.recover(
                placement, {w: f"failed to take over lost experts: {e}" for w, e in errors.items()}
            )
        # Nobody left: one fresh worker takes every expert (the controller then restores the count).
        (w,) = self._new_ids(1)
        everything = {layer: list(range(self.spec.num_experts)) for layer in self.spec.moe_layers}
        errors = self.transport.start_workers({w: (version, everything)})
        if errors:
            self.unavailable = f"no expert worker is running and none could be started: {errors[w]}"
            self._retry_at = time.monotonic() + self.elastic.restore_interval_s
            raise NoCapacityError(self.unavailable)
        return placement_from_assignments(
            version, self.spec.moe_layers, self.spec.num_experts, (w,), [everything], (version,)
        )

    # ---- health and statistics --------------------------------------------------------------------

    def health(self) -> dict:
        p = self.dispatcher.placement
        live = [w for w in p.worker_ids if w not in self._dead]
        serving = self.unavailable is None and len(live) == p.num_workers
        reason = self.unavailable or (
            "" if serving else f"workers {sorted(set(p.worker_ids) - set(live))} lost"
        )
        return {
            "serving": serving,
            "reason": reason,
            "workers": len(live),
            "target_workers": self.target,
            "degraded": serving and len(live) < self.target,
            "placement_version": p.version,
            "changing": self.changing,
        }

    def stats(self) -> dict:
        return {
            "target_workers": self.target,
            "redundant_experts": self.elastic.redundant_experts,
            "num_slots": self.num_slots,
            "events": dict(self.events),
            "recovery_seconds": list(self.recovery_seconds),
            "recovery": {"count": self._recovery_total[0], "sum": round(self._recovery_total[1], 4)},
            "history": list(self.history),
            "changing": self.changing,
            "unavailable": self.unavailable,
            "autoscaling": None
            if self.autoscaler is None
            else {"min_workers": self.autoscaler.min_workers, "max_workers": self.autoscaler.max_workers},
        }

    def _record(self, kind: str, before: int, after: int, seconds: float, placement: Placement) -> None:
        self._label()
        self.events[kind] += 1
        self.history.append(
            {
                "time": time.time(),
                "kind": kind,
                "from_workers": before,
                "to_workers": after,
                "seconds": round(seconds, 4),
                "placement_version": placement.version,
            }
        )
        if self._lost_at is not None and placement.num_workers >= self.target and not self.unavailable:
            took = time.monotonic() - self._lost_at
            self.recovery_seconds.append(round(took, 4))
            self._recovery_total[0] += 1
            self._recovery_total[1] += took
            self._lost_at = None
            log.warning("back to %d expert workers %.2fs after the first loss", placement.num_workers, took)

    # ---- the controller thread ------------------------------------------------------------------

    def start_controller(self) -> None:
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
        p = self.dispatcher.placement
        now = time.monotonic()
        if now >= self._next_check:  # idle workers too: a loss is found without waiting for traffic
            self._next_check = now + self.elastic.restore_interval_s
            self._check_health(p)
            p = self.dispatcher.placement
        if self.autoscaler is not None:
            want = self.autoscaler.observe(now, float(self._load_fn()), self.target)
            if want is not None:
                self._try(f"autoscale to {want} workers", lambda: self._autoscale(want))
                return
        broken = self.unavailable is not None or bool(set(p.worker_ids) & self._dead)
        if (broken or p.num_workers != self.target) and now >= self._retry_at:
            self._try(f"restore {self.target} workers", lambda: self._resize(self.target, "restore"))
            return
        every = self.elastic.rebalance_every_steps
        if every and self.dispatcher.passes - self._rebalanced_at_pass >= every:
            worst = min(self.balance()["balancedness"].values(), default=1.0)
            if worst < self.elastic.rebalance_threshold:
                self._try("rebalance", self._auto_rebalance)
            else:
                self._rebalanced_at_pass = self.dispatcher.passes

    def _check_health(self, p: Placement) -> None:
        live = tuple(w for w in p.worker_ids if w not in self._dead)
        lost = self.transport.check(live, self.elastic.worker_timeout_s)
        if not lost:
            return
        with self.model_lock:  # a pass boundary, as for any publish
            if self.dispatcher.placement is p:
                try:
                    self.recover(p, lost)
                except NoCapacityError as e:
                    log.warning("%s", e)

    def _autoscale(self, n: int) -> None:
        self._retarget(n, "autoscale")

    def _retarget(self, n: int, kind: str) -> Placement:
        """A new target count and the change to it (the target is set first, so that the change's
        record labels the workers with it; a failed change leaves the old one)."""
        previous, self.target = self.target, n
        try:
            return self._resize(n, kind)
        except BaseException:
            self.target = previous
            raise

    def _label(self) -> None:
        """Leave the target count with the workers: a restarted router reads it back from them."""
        self.transport.label_workers(self.dispatcher.placement.worker_ids, {"target_workers": self.target})

    def _auto_rebalance(self) -> None:
        self._resize(self.dispatcher.placement.num_workers, "rebalance", balanced=True)
        self._rebalanced_at_pass = self.dispatcher.passes

    def _try(self, what: str, action) -> None:
        if not self._change.acquire(blocking=False):
            return
        self.changing = what
        try:
            action()
            if what.startswith("restore"):
                self.unavailable = None
        except ScaleError as e:
            self._retry_at = time.monotonic() + self.elastic.restore_interval_s
            if self.unavailable is not None:
                self.unavailable = f"no expert worker is running and none could be started: {e}"
            log.warning("%s failed: %s; retrying in %.0fs", what, e, self.elastic.restore_interval_s)
        finally:
            self.changing = None
            self._change.release()


def _assignment(info: dict) -> dict[int, list[int]]:
    """A described worker's latest layout: MoE layer -> expert of each slot."""
    return {int(layer): [int(e) for e in ids] for layer, ids in (info.get("experts") or {}).items()}


def _experts(info: dict, layer: str) -> list[int]:
    experts = info.get("experts") or {}
    return experts.get(layer, experts.get(int(layer), []))


class _Release:
    def __init__(self, m: Membership):
        self.m = m

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.m.changing = None
        self.m._change.release()
