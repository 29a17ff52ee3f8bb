"""ServingSettings: the limits and addresses of the HTTP and gRPC front ends, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServingSettings:
    """What the ingress enforces and how it batches. Generation batching limits live in the
    engine's `BatchLimits` (the router's continuous batch); these are the front end's own.

    max_request_tokens: the most tokens one forward / MoE-layer request may carry (B*S or T), and
      the most prompt + max_tokens one completion may ask for; larger requests are refused with
      HTTP 413 / gRPC RESOURCE_EXHAUSTED.
    max_batch_tokens: forward / MoE-layer requests that arrive together are merged into one router
      call up to this many tokens.
    max_batch_requests / batch_wait_s: at most this many requests merged, waiting at most this long
      for company (serve.batch's max_batch_size / batch_wait_timeout_s).
    router_restart_timeout_s: how long requests wait for a Router actor that died to be back (it
      restarts and reattaches to its workers) before they fail as unavailable.
    """

    model_name: str = "moe-serving"
    max_request_tokens: int = 8192
    max_batch_tokens: int = 8192
    max_batch_requests: int = 32
    batch_wait_s: float = 0.002
    router_restart_timeout_s: float = 120.0

    def __post_init__(self):
        for name in ("max_request_tokens", "max_batch_tokens", "max_batch_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {self.batch_wait_s}")
        if not self.router_restart_timeout_s > 0:
            raise ValueError(f"router_restart_timeout_s must be > 0, got {self.router_restart_timeout_s}")
