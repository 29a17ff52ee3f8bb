"""The autoscaling policy: how many expert workers the load asks for, with hysteresis.

A plain object fed with load samples and the current worker count; it answers a new count only
when the wish has held long enough (`upscale_delay_s` up, `downscale_delay_s` down), so a burst
does not start workers that a lull then stops. The membership controller samples the load and acts
on the answer; this module knows nothing of Ray or the router, and the tests drive it with a clock.
"""

from __future__ import annotations

import collections
import math

from router_service.config import AutoscalingConfig


class Autoscaler:
    def __init__(self, config: AutoscalingConfig, max_slots: int):
        self.config = config
        self.max_workers = min(config.max_workers, max_slots)
        self.min_workers = min(config.min_workers, self.max_workers)
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._wish: int | None = None
        self._since = 0.0

    def desired(self, load: float) -> int:
        """ceil(load / target) within [min_workers, max_workers]."""
        want = math.ceil(load / self.config.target_tokens_per_worker) if load > 0 else 0
        return max(self.min_workers, min(self.max_workers, want))

    def observe(self, now: float, load: float, current: int) -> int | None:
        """Record a load sample (sequences running + waiting); the worker count to scale to now, or
        None to stay."""
        self._samples.append((now, load))
        while self._samples and self._samples[0][0] < now - self.config.look_back_period_s:
            self._samples.popleft()
        average = sum(x for _, x in self._samples) / len(self._samples)
        want = self.desired(average)
        if want == current:
            self._wish = None
            return None
        if want != self._wish:
            self._wish, self._since = want, now
        delay = self.config.upscale_delay_s if want > current else self.config.downscale_delay_s
        if now - self._since >= delay:
            self._wish = None
            return want
        return None
