"""Prometheus metrics of the ingress (`GET /metrics`): requests, latency, tokens, batches, expert load.

One registry per ingress replica. gRPC requests reach the same replica through its deployment
handle, so both protocols are counted here (label `protocol`). Expert load and generation batch
sizes are read from the router's `cluster_state()` at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "moe_requests",
            "Requests answered, by endpoint, protocol and status",
            ["endpoint", "protocol", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "moe_request_latency_seconds",
            "Time to the full answer",
            ["endpoint", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "moe_time_to_first_token_seconds",
            "Generation: time to the first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("moe_prompt_tokens", "Prompt tokens of completions", registry=r)
        self.generated_tokens = Counter("moe_generated_tokens", "Tokens generated", registry=r)
        self.forward_tokens = Counter(
            "moe_forward_tokens", "Tokens through /v1/forward and MoE-layer calls", ["endpoint"], registry=r
        )
        self.ingress_batch = Histogram(
            "moe_ingress_batch_requests",
            "Requests merged into one router call",
            ["endpoint"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.decode_steps = Gauge(
            "moe_decode_steps_by_batch_size",
            "Router decode steps run with this many sequences (cumulative)",
            ["batch_size"],
            registry=r,
        )
        self.running = Gauge("moe_generation_running", "Sequences in the router's decode batch", registry=r)
        self.waiting = Gauge(
            "moe_generation_waiting", "Generation requests waiting for a batch slot", registry=r
        )
        self.expert_tokens = Gauge(
            "moe_expert_tokens",
            "Tokens routed to each expert over the router's load window",
            ["layer", "expert"],
            registry=r,
        )
        self.placement_version = Gauge(
            "moe_placement_version", "Placement version the router serves", registry=r
        )
        self.workers = Gauge("moe_expert_workers", "Expert workers", registry=r)

    def render(self, state: dict | None) -> bytes:
        """The exposition text, with router-side gauges refreshed from `state` (cluster_state())."""
        if state is not None:
            for layer, tokens in state["expert_load"]["tokens"].items():
                for expert, n in enumerate(tokens):
                    self.expert_tokens.labels(str(layer), str(expert)).set(n)
            gen = state.get("generation") or {}
            for size, steps in gen.get("steps_by_batch_size", {}).items():
                self.decode_steps.labels(str(size)).set(steps)
            self.running.set(gen.get("running", 0))
            self.waiting.set(gen.get("waiting", 0))
            self.placement_version.set(state["placement_version"])
            self.workers.set(state["num_workers"])
        return generate_latest(self.registry)
