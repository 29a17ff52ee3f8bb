"""EngineConfig: every setting an Engine runs with, validated in one place.

The same frozen dataclass travels to the Router actor, so the driver and the actor agree on what
was asked; `from_pretrained` builds it and nothing reads loose keyword arguments after that.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass, field, fields

import torch

from expert_workers.kernels import check_kernel_name
from expert_workers.worker import resolve_device

__all__ = [
    "AutoscalingConfig",
    "BatchLimits",
    "ElasticConfig",
    "EngineConfig",
    "WorkerResources",
    "resolve_device",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRANSPORTS = ("local", "ray", "compiled", "socket")
PLACEMENT_STRATEGIES = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")


def from_dict(cls, value, what: str):
    """`cls(**value)` for a dict (an instance passes through), with unknown keys refused by name
    instead of a TypeError from the constructor."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a {cls.__name__} or a dict, got {type(value).__name__}")
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**value)


def dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, d in DTYPES.items():
            if d == dtype:
                return name
        raise ValueError(f"dtype {dtype} is not supported; choose one of {list(DTYPES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    return dtype


def check_device(device: str | torch.device) -> str:
    """Validate a device name without touching CUDA when the device is "auto"."""
    if str(device) == "auto":
        return "auto"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from e
    return str(dev)


@dataclass(frozen=True)
class WorkerResources:
    """Ray resources of each expert-worker actor (transport "ray" / "compiled").

    num_gpus None means: one GPU per worker when the cluster has a GPU for every worker, else none.
    resources: custom node resources each worker needs (e.g. {"expert_node": 1} to keep workers on
    nodes started with that resource). strategy: where each new worker goes, SPREAD (default: the
    node with the fewest of this server's workers), PACK, STRICT_SPREAD, STRICT_PACK.
    """

    num_cpus: float = 1.0
    num_gpus: float | None = None
    resources: dict[str, float] = field(default_factory=dict)
    strategy: str = "SPREAD"
    # How long to wait for the cluster to find room for the workers before saying what is missing.
    placement_timeout_s: float = 60.0

    def __post_init__(self):
        if not self.num_cpus > 0:
            raise ValueError(f"worker num_cpus must be > 0, got {self.num_cpus}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"worker num_gpus must be >= 0, got {self.num_gpus}")
        bad = {k: v for k, v in self.resources.items() if not isinstance(v, int | float) or v < 0}
        if bad:
            raise ValueError(f"worker resources must be non-negative numbers, got {bad}")
        if not self.placement_timeout_s > 0:
            raise ValueError(f"placement_timeout_s must be > 0, got {self.placement_timeout_s}")
        if self.strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"unknown placement strategy {self.strategy!r}; choose one of {PLACEMENT_STRATEGIES}"
            )


@dataclass(frozen=True)
class BatchLimits:
    """How much the decode loop takes on at once.

    max_batch_size: sequences decoded together per step (the T each MoE layer sees).
    max_batch_tokens: prompt + max_new_tokens summed over the batch (bounds the KV cache), and the
      largest single request accepted (prompt + max_new_tokens): larger ones are refused.
    max_waiting: requests queued beyond the batch before new ones are refused (back-pressure).
    """

    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    max_waiting: int = 512

    def __post_init__(self):
        for name in ("max_batch_size", "max_batch_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class AutoscalingConfig:
    """When to add or remove expert workers by themselves (field names after Ray Serve's
    `autoscaling_config`). Off unless given.

    The load is what a decode step has to process: the sequences running in the router's batch plus
    those waiting for a place, averaged over `look_back_period_s` (sampled every
    `metrics_interval_s`). The wanted worker count is ceil(load / target_tokens_per_worker), within
    [min_workers, max_workers]; the autoscaler scales up once it has wanted more workers for
    `upscale_delay_s`, and down once it has wanted fewer for `downscale_delay_s`.
    """

    min_workers: int = 1
    max_workers: int = 4
    target_tokens_per_worker: float = 16.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    metrics_interval_s: float = 0.5
    look_back_period_s: float = 2.0

    def __post_init__(self):
        if not isinstance(self.min_workers, int) or not isinstance(self.max_workers, int):
            raise ValueError(
                f"min_workers and max_workers must be ints, got {self.min_workers!r}, {self.max_workers!r}"
            )
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"autoscaling needs 1 <= min_workers <= max_workers, got {self.min_workers} and {self.max_workers}"
            )
        if not self.target_tokens_per_worker > 0:
            raise ValueError(f"target_tokens_per_worker must be > 0, got {self.target_tokens_per_worker}")
        for name in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.metrics_interval_s > 0:
            raise ValueError(f"metrics_interval_s must be > 0, got {self.metrics_interval_s}")


@dataclass(frozen=True)
class RouterAutoscalingConfig:
    """When to add or remove routers by themselves, in the worker autoscaler's style. Off unless
    given.

    The load is the sequences running plus waiting, summed over every router and averaged over
    `look_back_period_s`; the wanted router count is ceil(load / target_sequences_per_router), within
    [min_routers, max_routers]; up once wanted for `upscale_delay_s`, down once for
    `downscale_delay_s` (a removed router drains first). A router costs a copy of the dense model and
    its own KV caches, so the default delays are longer than the workers'.
    """

    min_routers: int = 1
    max_routers: int = 4
    target_sequences_per_router: float = 32.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 5.0

    def __post_init__(self):
        if not isinstance(self.min_routers, int) or not isinstance(self.max_routers, int):
            raise ValueError(
                f"min_routers and max_routers must be ints, got {self.min_routers!r}, {self.max_routers!r}"
            )
        if not 1 <= self.min_routers <= self.max_routers:
            raise ValueError(
                f"router autoscaling needs 1 <= min_routers <= max_routers, got {self.min_routers} and {self.max_routers}"
            )
        if not self.target_sequences_per_router > 0:
            raise ValueError(
                f"target_sequences_per_router must be > 0, got {self.target_sequences_per_router}"
            )
        for name in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ElasticConfig:
    """How the expert-worker set changes at run time (docs/elasticity.md).

    redundant_experts: extra expert slots beyond one per expert; EPLB fills them with replicas of
      the busiest experts (0: no replicas; rebalancing still moves experts between workers).
    worker_timeout_s: a worker that leaves a health check unanswered this long while the router
      waits on it is declared lost (a dead process is reported by Ray at once).
    rebalance_every_steps / rebalance_threshold: every N decode steps (0: never by itself), rebalance
      when some layer's balancedness (mean / max worker load) is below the threshold.
    recovery_attempts: how many times one MoE layer tries to re-place the rows of lost workers before
      the pass fails as unavailable.
    restore_interval_s: how often the controller retries bringing the worker count back to its target
      when it could not (no resources), and checks idle workers' health.
    router_max_restarts: how often Ray restarts a Router actor whose process died (Ray transports).
    autoscaling: an AutoscalingConfig, or None (off).
    """

    redundant_experts: int = 0
    worker_timeout_s: float = 10.0
    rebalance_every_steps: int = 0
    rebalance_threshold: float = 0.8
    recovery_attempts: int = 3
    restore_interval_s: float = 2.0
    router_max_restarts: int = 5
    # How long a router that is being removed (scale_routers) may finish its sequences before it
    # is stopped; streams still open then move to the other routers.
    router_drain_timeout_s: float = 60.0
    autoscaling: AutoscalingConfig | None = None
    # Router autoscaling (Ray transports): a RouterAutoscalingConfig, or None (off).
    router_autoscaling: RouterAutoscalingConfig | None = None

    def __post_init__(self):
        if isinstance(self.autoscaling, dict):
            object.__setattr__(
                self, "autoscaling", from_dict(AutoscalingConfig, self.autoscaling, "autoscaling")
            )
        if isinstance(self.router_autoscaling, dict):
            object.__setattr__(
                self,
                "router_autoscaling",
                from_dict(RouterAutoscalingConfig, self.router_autoscaling, "router_autoscaling"),
            )
        if isinstance(self.redundant_experts, bool) or not isinstance(self.redundant_experts, int):
            raise ValueError(f"redundant_experts must be an int, got {self.redundant_experts!r}")
        if self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {self.redundant_experts}")
        if not self.worker_timeout_s > 0:
            raise ValueError(f"worker_timeout_s must be > 0, got {self.worker_timeout_s}")
        if self.rebalance_every_steps < 0:
            raise ValueError(f"rebalance_every_steps must be >= 0, got {self.rebalance_every_steps}")
        if not 0.0 < self.rebalance_threshold <= 1.0:
            raise ValueError(f"rebalance_threshold must be in (0, 1], got {self.rebalance_threshold}")
        if self.recovery_attempts < 1:
            raise ValueError(f"recovery_attempts must be >= 1, got {self.recovery_attempts}")
        if not self.restore_interval_s > 0:
            raise ValueError(f"restore_interval_s must be > 0, got {self.restore_interval_s}")
        if self.router_max_restarts < -1:
            raise ValueError(
                f"router_max_restarts must be >= -1 (-1: always), got {self.router_max_restarts}"
            )


# From this hidden size up the router's dense work runs on every core of its machine (measured,
# docs/performance.md "Router threads": hidden 2048, 16 sequences, 2 workers on 2 cores: decode step
# 344 -> 303 ms with 2 router threads; hidden 128 and 256: 10.6 -> 14.2 and 17.4 -> 20.4 ms, worse,
# since ops that small gain nothing from a second thread and its spinning takes the workers' core;
# below it the router keeps the workers' count).
# The router and the workers take turns within a step, so the router's threads do not compete with
# the workers' compute. 1024 lies between the sizes measured.
ROUTER_ALL_CORES_MIN_HIDDEN = 1024


def router_threads_for(config: EngineConfig, hidden_size: int, routers_on_node: int = 1) -> int:
    """The router's intra-op thread count: the configured one, else by model size. A router that
    computes on every core shares them with the other routers of its node: two routers of 2 threads
    each on 2 cores spin against each other (OpenMP threads wait busily)."""
    if config.router_threads is not None:
        return config.router_threads
    if hidden_size >= ROUTER_ALL_CORES_MIN_HIDDEN:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // max(1, routers_on_node))
    return config.num_threads


@dataclass(frozen=True)
class EngineConfig:
    """The resolved settings an Engine runs with."""

    model_dir: str
    num_workers: int = 2
    transport: str = "local"
    dtype: str = "float32"
    device: str = "auto"
    expert_kernel: str | None = "auto"
    worker_resources: WorkerResources = field(default_factory=WorkerResources)
    # Expert-load statistics: token counts per (layer, expert) over the last `load_window` batches.
    load_window: int = 256
    # Intra-op threads of the router and of every worker: CPU GEMM results depend on the thread
    # count in the last bits, so transports agree bit for bit at equal counts. None: for "local"
    # (workers run one after another in this process) this process's torch.get_num_threads(); for
    # the Ray transports that divided by the workers, which compute at the same time on the same
    # cores: 2 workers x 2 threads on 2 cores made decode steps 8-20x slower than 1 thread each
    # (OpenMP threads spin while waiting and take the cores from the other processes).
    num_threads: int | None = None
    # Intra-op threads of the router's own (dense) work. None: `num_threads` when that was given (so
    # transports compare bit for bit), else the router picks by model size (`router_threads_for`).
    router_threads: int | None = None
    # Worker load progress: "bar", "log" (a line per layer) or "off"; "auto": a bar when the
    # caller's stderr is a terminal, else log lines.
    progress: str = "auto"
    # Generation batching (continuous batching in the router, see router_service/generation/scheduler.py).
    batch_limits: BatchLimits = field(default_factory=BatchLimits)
    # Micro-batch overlap (router_service/generation/overlap.py): decode steps of at least this many
    # sequences run as two micro-batches, the router's dense work on one hiding the other's expert
    # round trip. "auto": the measured default (off: it lost everywhere measured on CPU, see
    # docs/performance.md "Micro-batch overlap"); "off": never; an int >= 2.
    # Only the "ray" and "socket" transports overlap (the experts must run in other processes).
    micro_batch_min_tokens: int | str = "auto"
    # Whether a worker's data plane ("socket" transport) runs frames of one layer and layout that
    # queued up behind a running call (several routers of a pool, or two micro-batch lanes) as one
    # grouped FFN over their rows; a frame never waits to be merged. See docs/performance.md
    # ("Merging frames across routers") for which kernels then give bit-identical rows.
    merge_frames: bool = True
    # Scaling, rebalancing, fault handling and autoscaling of the expert workers.
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    # The name of this deployment's Ray actors ("{cluster_name}:controller", "{cluster_name}:router-N",
    # "{cluster_name}:worker-N");
    # None: a fresh one. A restarted router finds its workers by it.
    cluster_name: str | None = None
    # Custom Ray resources each router (and, unless serving_resources is given, the controller and a
    # Serve app's ingress and gRPC actors) must run with, e.g. {"head": 0.01} with the head node
    # started with that resource: keeps them off worker nodes that come and go. Empty: any node
    # (preferably the starting process's).
    router_resources: dict[str, float] = field(default_factory=dict)
    # Custom Ray resources of the serving actors: the membership controller, a Serve app's ingress
    # replica and its gRPC actor. None: router_resources. Set it apart to put the routers on nodes of
    # their own, e.g. router_resources {"router_node": 1} and serving_resources {"head": 0.01}.
    serving_resources: dict[str, float] | None = None
    # Routers: replicas of the dense model, each with its own KV caches and scheduler, over one pool
    # of expert workers (Ray transports; "local" has one). The ingress spreads requests over them by
    # load; one lost moves its streams to the others.
    num_routers: int = 1
    # Where the routers go: "SPREAD" (prefer nodes with the fewest routers: one node's loss takes
    # as few as possible), "PACK" (fill a node first), "STRICT_SPREAD" (one router per node).
    router_strategy: str = "SPREAD"

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r}; choose one of {TRANSPORTS}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "device", check_device(self.device))
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {self.num_workers!r}")
        check_kernel_name(self.expert_kernel)  # before any actor starts
        if self.router_threads is None and self.num_threads is not None:
            object.__setattr__(self, "router_threads", self.num_threads)
        if self.router_threads is not None and (
            not isinstance(self.router_threads, int) or self.router_threads < 1
        ):
            raise ValueError(f"router_threads must be a positive int, got {self.router_threads!r}")
        if self.num_threads is None:
            threads = torch.get_num_threads()
            if self.transport != "local":
                threads = max(1, min(threads, (os.cpu_count() or 1) // self.num_workers))
            object.__setattr__(self, "num_threads", threads)
        if not isinstance(self.num_threads, int) or self.num_threads < 1:
            raise ValueError(f"num_threads must be a positive int, got {self.num_threads!r}")
        if self.progress == "auto":
            object.__setattr__(self, "progress", "bar" if sys.stderr.isatty() else "log")
        if self.progress not in ("bar", "log", "off"):
            raise ValueError(f"progress must be 'auto', 'bar', 'log' or 'off', got {self.progress!r}")
        m = self.micro_batch_min_tokens
        if m not in ("auto", "off") and (isinstance(m, bool) or not isinstance(m, int) or m < 2):
            raise ValueError(f"micro_batch_min_tokens must be 'auto', 'off' or an int >= 2, got {m!r}")
        if self.load_window < 1:
            raise ValueError(f"load_window must be >= 1, got {self.load_window}")
        if (
            isinstance(self.num_routers, bool)
            or not isinstance(self.num_routers, int)
            or self.num_routers < 1
        ):
            raise ValueError(f"num_routers must be a positive int, got {self.num_routers!r}")
        if self.num_routers > 1 and self.transport in ("local", "compiled"):
            raise ValueError(
                f"num_routers={self.num_routers} needs the 'socket' or 'ray' transport: 'local' runs the "
                "experts in its one router's process, and a compiled graph holds its workers for one router"
            )
        if self.router_strategy not in ("SPREAD", "PACK", "STRICT_SPREAD"):
            raise ValueError(
                f"router_strategy must be 'SPREAD', 'PACK' or 'STRICT_SPREAD', got {self.router_strategy!r}"
            )
        bad = {k: v for k, v in self.router_resources.items() if not isinstance(v, int | float) or v < 0}
        if bad:
            raise ValueError(f"router_resources must be non-negative numbers, got {bad}")
        if self.serving_resources is not None:
            bad = {k: v for k, v in self.serving_resources.items() if not isinstance(v, int | float) or v < 0}
            if bad:
                raise ValueError(f"serving_resources must be non-negative numbers, got {bad}")
        if isinstance(self.elastic, dict):
            object.__setattr__(self, "elastic", from_dict(ElasticConfig, self.elastic, "elastic"))
        if self.cluster_name is None:
            object.__setattr__(self, "cluster_name", f"moe-{uuid.uuid4().hex[:8]}")
        elif not self.cluster_name or ":" in self.cluster_name:
            raise ValueError(f"cluster_name must be a non-empty name without ':', got {self.cluster_name!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def serving_actor_resources(self) -> dict[str, float]:
        """The custom resources the controller, the ingress replica and the gRPC actor ask for:
        serving_resources, or router_resources when that is None."""
        chosen = self.router_resources if self.serving_resources is None else self.serving_resources
        return dict(chosen)

    @property
    def worker_device(self) -> str:
        """Where workers put their experts: the router's device in-process, "auto" in a worker actor
        (resolved there, where Ray has or has not assigned a GPU)."""
        return self.device if self.transport == "local" else "auto"
