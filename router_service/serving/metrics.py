"""Prometheus metrics of the ingress (`GET /metrics`): requests, latency, tokens, batches, and the
router's view of the cluster (workers, balance, membership events).

One registry per ingress replica. gRPC requests reach the same replica through its deployment
handle, so both protocols are counted here (label `protocol`). The router-side families are read
from `cluster_state()` at scrape time by a collector; their cardinality is bounded by the number of
MoE layers and of current workers: no series per expert (the full layer x expert load matrix is in
`GET /v1/cluster`), and a worker's series disappear when it leaves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EVENT_KINDS = (
    "scale",
    "autoscale",
    "rebalance",
    "restore",
    "failover",
    "workers_lost",
    "reattach",
    "scale_routers",
    "autoscale_routers",
)


class _ClusterCollector:
    """The router-side families, built from the last scraped cluster_state()."""

    def __init__(self):
        self.state: dict | None = None
        self.router_restarts = 0

    def describe(self):
        return []

    def collect(self):
        state = self.state
        yield CounterMetricFamily(
            "moe_router_restarts",
            "Router actor restarts this ingress replica waited for",
            value=self.router_restarts,
        )
        if state is None:
            return
        elastic = state.get("elastic") or {}
        health = elastic.get("health") or {}
        yield GaugeMetricFamily(
            "moe_serving", "1 while the server can serve, else 0", value=int(bool(health.get("serving")))
        )
        yield GaugeMetricFamily(
            "moe_expert_workers", "Expert workers in the current placement", value=state["num_workers"]
        )
        yield GaugeMetricFamily(
            "moe_target_expert_workers",
            "Expert workers the cluster is kept at",
            value=elastic.get("target_workers", 0),
        )
        yield GaugeMetricFamily(
            "moe_placement_version", "Placement version the router serves", value=state["placement_version"]
        )
        events = CounterMetricFamily("moe_membership_events", "Membership changes by kind", labels=["kind"])
        counts = elastic.get("events") or {}
        for kind in EVENT_KINDS:
            events.add_metric([kind], counts.get(kind, 0))
        yield events
        rec = elastic.get("recovery") or {}
        yield SummaryMetricFamily(
            "moe_recovery_seconds",
            "Seconds from losing a worker to being back at the target worker count",
            count_value=rec.get("count", 0),
            sum_value=rec.get("sum", 0.0),
        )
        tokens = CounterMetricFamily(
            "moe_worker_tokens", "Token rows sent to each current expert worker", labels=["worker"]
        )
        for w in state.get("workers") or []:
            tokens.add_metric([str(w["worker_id"])], w.get("tokens", 0))
        yield tokens
        balance = state.get("balance") or {}
        bal = GaugeMetricFamily(
            "moe_layer_balancedness", "Mean / max expected worker load over the load window", labels=["layer"]
        )
        imb = GaugeMetricFamily("moe_layer_imbalance", "(max - mean) / mean worker load", labels=["layer"])
        for layer, value in (balance.get("balancedness") or {}).items():
            bal.add_metric([str(layer)], value)
        for layer, value in (balance.get("imbalance") or {}).items():
            imb.add_metric([str(layer)], value)
        yield bal
        yield imb
        gen = state.get("generation") or {}
        steps = GaugeMetricFamily(
            "moe_decode_steps_by_batch_size",
            "Router decode steps run with this many sequences (cumulative)",
            labels=["batch_size"],
        )
        for size, n in (gen.get("steps_by_batch_size") or {}).items():
            steps.add_metric([str(size)], n)
        yield steps
        yield GaugeMetricFamily(
            "moe_generation_running", "Sequences in the router's decode batch", value=gen.get("running", 0)
        )
        yield GaugeMetricFamily(
            "moe_generation_waiting",
            "Generation requests waiting for a batch slot",
            value=gen.get("waiting", 0),
        )
        # Per router: its id is the label, and router ids are reused (a restored router takes the id
        # of the one it replaces), so the series stay as many as the routers.
        routers = state.get("routers") or []
        yield GaugeMetricFamily("moe_routers", "Router replicas serving", value=len(routers))
        per_router = {
            "running": GaugeMetricFamily(
                "moe_router_running", "Sequences in each router's batch", labels=["router"]
            ),
            "waiting": GaugeMetricFamily(
                "moe_router_waiting", "Requests waiting at each router", labels=["router"]
            ),
            "tokens_per_s": GaugeMetricFamily(
                "moe_router_tokens_per_second",
                "Tokens each router made per second (10 s window)",
                labels=["router"],
            ),
            "placement_version": GaugeMetricFamily(
                "moe_router_placement_version", "Placement version each router serves", labels=["router"]
            ),
        }
        for r in routers:
            for key, family in per_router.items():
                if key in r:
                    family.add_metric([str(r["router_id"])], r[key])
        yield from per_router.values()


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
        self._cluster = _ClusterCollector()
        r.register(self._cluster)

    def render(self, state: dict | None, router_restarts: int = 0) -> bytes:
        """The exposition text, router-side families from `state` (cluster_state(); None: the router
        did not answer, and only the ingress's own families are shown)."""
        self._cluster.state = state
        self._cluster.router_restarts = router_restarts
        return generate_latest(self.registry)
