"""The autoscaling policies: how many expert workers (or routers) the load asks for, with hysteresis.

A plain object fed with load samples and the current worker count; it answers a new count only
when the wish has held long enough (`upscale_delay_s` up, `downscale_delay_s` down), so a burst
does not start workers that a lull then stops. The membership controller samples the load and acts
on the answer; this module knows nothing of Ray or the router, and the tests drive it with a clock.
"""

from __future__ import annotations

import collections
import math

from router_service.config import AutoscalingConfig, RouterAutoscalingConfig


class CountPolicy:
    """ceil(load / target) within [minimum, maximum], acted on only once wanted for the delay."""

    def __init__(
        self,
        minimum: int,
        maximum: int,
        target: float,
        upscale_delay_s: float,
        downscale_delay_s: float,
        look_back_period_s: float,
    ):
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.target = target
        self.upscale_delay_s = upscale_delay_s
        self.downscale_delay_s = downscale_delay_s
        self.look_back_period_s = look_back_period_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._wish: int | None = None
        self._since = 0.0

    def desired(self, load: float) -> int:
        want = math.ceil(load / self.target) if load > 0 else 0
        return max(self.minimum, min(self.maximum, want))

    def observe(self, now: float, load: float, current: int) -> int | None:
        """Record a load sample; the count to scale to now, or None to stay."""
        self._samples.append((now, load))
        while self._samples and self._samples[0][0] < now - self.look_back_period_s:
            self._samples.popleft()
        average = sum(x for _, x in self._samples) / len(self._samples)
        want = self.desired(average)
        if want == current:
            self._wish = None
            return None
        if want != self._wish:
            self._wish, self._since = want, now
        delay = self.upscale_delay_s if want > current else self.downscale_delay_s
        if now - self._since >= delay:
            self._wish = None
            return want
        return None


class Autoscaler(CountPolicy):
    """The expert workers' policy: sequences per worker (`AutoscalingConfig`)."""

    def __init__(self, config: AutoscalingConfig, max_slots: int):
        self.config = config
        maximum = min(config.max_workers, max_slots)
        super().__init__(
            config.min_workers,
            maximum,
            config.target_tokens_per_worker,
            config.upscale_delay_s,
            config.downscale_delay_s,
            config.look_back_period_s,
        )

    @property
    def min_workers(self) -> int:
        return self.minimum

    @property
    def max_workers(self) -> int:
        return self.maximum


def router_autoscaler(config: RouterAutoscalingConfig) -> CountPolicy:
    """The routers' policy: sequences per router."""
    return CountPolicy(
        config.min_routers,
        config.max_routers,
        config.target_sequences_per_router,
        config.upscale_delay_s,
        config.downscale_delay_s,
        config.look_back_period_s,
    )
