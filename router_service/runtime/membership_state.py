"""What the membership controller knows and reports: the target counts, the workers it found dead,
why nothing can serve (if so), the change in progress, and the record of every change (counters,
history, recovery times). Plain data with its own bookkeeping; no transport, no thread."""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

from router_service.stages.placement import Placement

log = logging.getLogger(__name__)

HISTORY = 64  # membership events kept for cluster_state()


@dataclass
class MembershipState:
    target: int  # expert workers wanted
    redundant_experts: int
    num_slots: int
    target_routers: int = 1
    dead: set[int] = field(default_factory=set)  # workers found lost, until no placement names them
    unavailable: str | None = None  # why no pass can run now
    retry_at: float = 0.0  # when a failed restore may be tried again
    lost_at: float | None = None  # first loss since the count was last at its target
    changing: str | None = None  # the change in progress, named
    events: collections.Counter = field(default_factory=collections.Counter)
    recovery_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY))
    recovery_total: list = field(default_factory=lambda: [0, 0.0])  # count, seconds: for metrics
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY))

    def lost(self, workers: dict[int, str]) -> None:
        """Workers found dead (id -> why), each counted once."""
        for w, why in workers.items():
            if w not in self.dead:
                log.warning("expert worker %d lost (%s)", w, why)
                self.events["workers_lost"] += 1
        self.dead |= set(workers)
        self.lost_at = self.lost_at or time.monotonic()

    def record(self, kind: str, before: int, after: int, seconds: float, placement: Placement) -> None:
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
        if self.lost_at is not None and placement.num_workers >= self.target and not self.unavailable:
            took = time.monotonic() - self.lost_at
            self.recovery_seconds.append(round(took, 4))
            self.recovery_total[0] += 1
            self.recovery_total[1] += took
            self.lost_at = None
            log.warning("back to %d expert workers %.2fs after the first loss", placement.num_workers, took)

    def health(self, placement: Placement | None) -> dict:
        if placement is None:
            return {"serving": False, "reason": self.unavailable or "no placement yet", "workers": 0}
        live = [w for w in placement.worker_ids if w not in self.dead]
        serving = self.unavailable is None and len(live) == placement.num_workers
        reason = self.unavailable or (
            "" if serving else f"workers {sorted(set(placement.worker_ids) - set(live))} lost"
        )
        return {
            "serving": serving,
            "reason": reason,
            "workers": len(live),
            "target_workers": self.target,
            "degraded": serving and len(live) < self.target,
            "placement_version": placement.version,
            "changing": self.changing,
        }

    def stats(self, autoscaler) -> dict:
        return {
            "target_workers": self.target,
            "target_routers": self.target_routers,
            "redundant_experts": self.redundant_experts,
            "num_slots": self.num_slots,
            "events": dict(self.events),
            "recovery_seconds": list(self.recovery_seconds),
            "recovery": {"count": self.recovery_total[0], "sum": round(self.recovery_total[1], 4)},
            "history": list(self.history),
            "changing": self.changing,
            "unavailable": self.unavailable,
            "autoscaling": None
            if autoscaler is None
            else {"min_workers": autoscaler.min_workers, "max_workers": autoscaler.max_workers},
        }
