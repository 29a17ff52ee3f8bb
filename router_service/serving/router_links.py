"""The front end's side of the router replicas: one `RouterLink` per router (its handle, its event
stream, its load), the choice of a router per request, and what happens to open streams when a
router goes away.

- A request goes to the live router with the lowest `4 * waiting + running` (vLLM's data-parallel
  balancing score): the counts come with every message of the router's event stream (each decode
  step, and a heartbeat every second when idle), and the requests this front end sent since that
  message count as waiting, so the score is never older than the router's last step. A stream stays
  on its router.
- Each router's events come over one multiplexed `generation_events` stream per front end. Each
  message names the router process it comes from (its incarnation). When that process's beacon
  connection closes (`runtime/liveness.py`: milliseconds after it dies), when Ray says the router
  died, or when the stream went silent and the router answering now is another process (Ray does not
  always end a stream whose actor died and restarted: ray-project/ray#43914), the router is lost:
  its open streams move at once to the other live routers (prompt + the tokens already streamed;
  seeded sampling goes on from there, so nothing is lost or repeated); with no other router they
  wait for it to come back and go on there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ray.exceptions import RayActorError

from moe_serving.errors import ServingError
from moe_serving.types import GenerateParams

log = logging.getLogger(__name__)

# The router's event stream sends a heartbeat every second; after this long without one, the pump
# asks the router which process it is.
STREAM_SILENCE_S = 2.0
HEALTH_PROBE_TIMEOUT_S = 5.0


class RouterReplaced(Exception):
    """The router process an event stream came from is gone, though Ray did not end the stream."""


class RouterLink:
    """One router replica as this front end sees it."""

    def __init__(self, router_id: str, handle):
        self.id = router_id
        self.handle = handle
        self.incarnation: str | None = None  # the process its event stream last came from
        self.running = 0
        self.waiting = 0
        self.reported_at = 0.0
        self.pending = 0  # requests sent here since its last report
        self.alive = True  # False from its loss until it answers again
        self.draining = False  # being removed: gets nothing new
        self.pump_task: asyncio.Task | None = None
        self.suspect = asyncio.Event()  # a call met a dead router: the pump checks at once
        self.gone: str | None = None  # a router process whose beacon closed (it died)
        self.beacon_task: asyncio.Task | None = None  # watches the current process's beacon

    def score(self) -> float:
        """vLLM's `4 * waiting + running`, with the requests sent since the report as waiting."""
        return 4 * (self.waiting + self.pending) + self.running

    def report(self, load) -> None:
        if load is not None:
            self.running, self.waiting = int(load[0]), int(load[1])
            self.pending = 0
            self.reported_at = time.monotonic()

    def describe(self) -> dict:
        return {
            "router_id": self.id,
            "alive": self.alive,
            "draining": self.draining,
            "running": self.running,
            "waiting": self.waiting,
            "load_age_s": round(time.monotonic() - self.reported_at, 3) if self.reported_at else None,
        }


@dataclass
class OpenGeneration:
    """A generation the front end is streaming: what it needs to re-submit it elsewhere."""

    prompt: list[int]
    params: GenerateParams
    news: asyncio.Queue
    options: dict = field(default_factory=dict)  # the router's sampling options, checked once
    tokens: list[int] = field(default_factory=list)
    link: RouterLink | None = None  # the router it runs on
    # The router process that accepted it (None: none yet); submissions take turns on the lock, so
    # a request is submitted at most once to each router process.
    incarnation: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def pick(links, avoid: RouterLink | None = None) -> RouterLink | None:
    """The live, not draining router with the lowest score (ties: the lowest id); None if none."""
    live = [lk for lk in links if lk.alive and not lk.draining and lk is not avoid]
    if not live:
        return None
    return min(live, key=lambda lk: (lk.score(), int(lk.id) if lk.id.isdigit() else 0))


def is_actor_gone(e: BaseException) -> bool:
    return isinstance(e, RayActorError | RouterReplaced)


def unavailable(message: str) -> ServingError:
    return ServingError("unavailable", message)
