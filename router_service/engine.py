"""Engine: the user's handle on a served model.

With transport "local" the Router runs in the caller's process. With "ray" or "compiled" the Router
is a Ray actor (it creates the ExpertWorker actors itself) and every call here is one actor call;
the Engine starts a local Ray instance, or joins the cluster at `ray_address`, and shuts down what
it started. Arguments and the checkpoint's config are validated here, before any process starts or
any weight is read.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from moe_models.loading import spec_from_pretrained
from moe_models.spec import ModelSpec
from router_service.config import (
    DTYPES,
    BatchLimits,
    ElasticConfig,
    EngineConfig,
    WorkerResources,
    from_dict,
)
from router_service.default_model import ensure_default_model
from router_service.router import Router
from router_service.runtime.cluster import router_handles, start_cluster, stop_cluster
from router_service.runtime.router_actor import (
    RouterDied,
    call_actor,
    restart_deadline,
    stream_actor,
    wait_for_restart,
)

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "ElasticConfig", "Engine", "EngineConfig", "WorkerResources", "make_config"]


def make_config(
    model_dir: str | Path,
    *,
    worker_resources: WorkerResources | dict | None = None,
    batch_limits: BatchLimits | dict | None = None,
    redundant_experts: int = 0,
    elastic: ElasticConfig | dict | None = None,
    **fields,
) -> tuple[EngineConfig, ModelSpec]:
    """The validated EngineConfig and the checkpoint's ModelSpec for `Engine.from_pretrained`'s
    arguments (and the Serve application's), before any process starts or any weight is read."""
    worker_resources = from_dict(WorkerResources, worker_resources, "worker_resources")
    batch_limits = from_dict(BatchLimits, batch_limits, "batch_limits")
    elastic = from_dict(ElasticConfig, elastic, "elastic") or ElasticConfig()
    if redundant_experts:
        elastic = dataclasses.replace(elastic, redundant_experts=redundant_experts)
    config = EngineConfig(
        model_dir=str(model_dir),
        worker_resources=worker_resources or WorkerResources(),
        batch_limits=batch_limits or BatchLimits(),
        elastic=elastic,
        **fields,
    )
    ensure_default_model(config.model_dir)  # the built-in model, if that is the one asked for
    spec = spec_from_pretrained(config.model_dir)  # raises before any weight is read
    slots = spec.num_experts + elastic.redundant_experts
    if not 1 <= config.num_workers <= slots:
        raise ValueError(
            f"num_workers must be between 1 and the number of expert slots ({slots} = "
            f"{spec.num_experts} experts + {elastic.redundant_experts} redundant), got {config.num_workers}"
        )
    return config, spec


class Engine:
    """A served MoE model. Use `Engine.from_pretrained(...)`; also a context manager."""

    def __init__(
        self, config: EngineConfig, spec: ModelSpec, router, owns_ray: bool = False, controller=None
    ):
        self.config = config
        self.spec = spec
        # A Router object (local) or a Ray actor handle on router 0 (Ray transports): the one that
        # answers calls (forward, scale, cluster state); streams are spread over every router.
        self._router = router
        self._controller = controller  # the controller actor (Ray transports)
        self._routers: list = [router]
        self._next = 0
        self._owns_ray = owns_ray
        if controller is not None:
            self._routers = list(router_handles(controller).values()) or [router]

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        num_workers: int = 2,
        transport: str = "local",
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "auto",
        expert_kernel: str | None = "auto",
        ray_address: str | None = None,
        worker_resources: WorkerResources | dict | None = None,
        num_threads: int | None = None,
        router_threads: int | None = None,
        progress: str = "auto",
        micro_batch_min_tokens: int | str = "auto",
        batch_limits: BatchLimits | dict | None = None,
        redundant_experts: int = 0,
        elastic: ElasticConfig | dict | None = None,
        cluster_name: str | None = None,
        router_resources: dict | None = None,
        num_routers: int = 1,
        router_strategy: str = "SPREAD",
        serving_resources: dict | None = None,
        merge_frames: bool = True,
    ) -> Engine:
        """Load a Hugging Face MoE checkpoint and start its expert workers.

        transport: "local" (workers in this process), "ray" (Router and ExpertWorker actors, plain
        actor calls), "socket" (the same actors, each layer over a TCP connection per worker) or
        "compiled" (the same actors driven by a Ray Compiled Graph).
        expert_kernel: the expert compute path, "auto" (by device, dtype and CPU flags; the
        MOE_EXPERT_KERNEL environment variable overrides "auto") or one of
        expert_workers.kernels.KERNELS: "grouped_mm", "loop", "onednn", "upcast".
        ray_address: join this cluster ("auto": the one `ray start` made on this machine); None starts
        a local Ray instance unless this process is already connected.
        worker_resources: Ray resources per worker (`WorkerResources` or its fields as a dict).
        num_threads: torch intra-op threads of the router and of each worker (default: this
        process's); the same in every transport, so that transports agree bit for bit.
        router_threads: the router's own threads (default: num_threads when given, else all cores;
        the router computes while the workers wait and the other way round).
        micro_batch_min_tokens: decode steps of at least this many sequences run as two overlapped
        micro-batches ("auto": the measured default; "off"; an int >= 2); "ray" and "socket" only.
        progress: worker load progress with Ray transports: "bar", "log", "off" or "auto" (a bar on a
        terminal, else a log line per worker and layer).
        batch_limits: the continuous-batching limits of `generate_stream` (`BatchLimits` or a dict).
        redundant_experts: extra expert slots, filled with replicas of the busiest experts (EPLB).
        elastic: scaling, fault-handling and autoscaling settings (`ElasticConfig` or a dict;
        `redundant_experts` above wins over its field of the same name).
        cluster_name: the name of the Ray actors (Ray transports; default: a fresh one).
        router_resources: custom Ray resources each Router actor needs, e.g. {"head": 0.01} to keep
        it on a head node started with that resource.
        num_routers: router replicas (Ray transports "socket" and "ray"): each holds the dense model,
        its own KV caches and batch, over one pool of expert workers; streams are spread over them.
        router_strategy: where routers go: "SPREAD" (fewest routers per node), "PACK" or
        "STRICT_SPREAD" (one per node).
        serving_resources: custom Ray resources of the controller actor (default: router_resources),
        e.g. {"head": 0.01} to keep it on the head while routers go to nodes of their own.
        merge_frames: whether a worker runs one layer's frames that queued up together (from several
        routers, or two micro-batches) as one grouped FFN ("socket" transport).
        """
        config, spec = make_config(
            model_dir,
            num_workers=num_workers,
            transport=transport,
            dtype=dtype,
            device=device,
            expert_kernel=expert_kernel,
            worker_resources=worker_resources,
            num_threads=num_threads,
            router_threads=router_threads,
            progress=progress,
            micro_batch_min_tokens=micro_batch_min_tokens,
            batch_limits=batch_limits,
            redundant_experts=redundant_experts,
            elastic=elastic,
            cluster_name=cluster_name,
            router_resources=router_resources or {},
            num_routers=num_routers,
            router_strategy=router_strategy,
            serving_resources=serving_resources,
            merge_frames=merge_frames,
        )
        if config.transport == "local":
            return cls(config, spec, Router(config))
        controller, owns_ray = start_cluster(config, ray_address)
        routers = router_handles(controller)
        return cls(config, spec, routers[min(routers, key=int)], owns_ray, controller)

    # ---- calls -------------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return isinstance(self._router, Router)

    @property
    def router(self) -> Router:
        """The in-process Router (transport "local" only; for tests and introspection)."""
        if not self.is_local:
            raise AttributeError("the Router runs in a Ray actor with this transport")
        return self._router

    @property
    def owns_ray(self) -> bool:
        """True when this Engine started the Ray instance it runs on (and stops it on shutdown)."""
        return self._owns_ray

    @property
    def actor(self):
        """The Router actor's handle (transports "ray" / "compiled"), e.g. for a serving front end."""
        if self.is_local or self._router is None:
            raise AttributeError("this Engine has no Router actor (transport 'local', or shut down)")
        return self._router

    def _call(self, method: str, *args, **kwargs):
        if self._router is None:
            raise RuntimeError("this Engine has been shut down")
        if self.is_local:
            return getattr(self._router, method)(*args, **kwargs)
        return call_actor(self._router, method, *args, **kwargs)

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Logits [B, S, V] (float32) for token ids [B, S], like transformers' model(...).logits."""
        return self._call("forward", input_ids, attention_mask)

    def moe_forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """One MoE block (routed + shared experts) on hidden states [T, H] or [B, S, H]."""
        return self._call("moe_forward", layer, hidden)

    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        attention_mask=None,
    ) -> torch.Tensor:
        """Prompt + generated ids [B, S + n]; temperature 0 is greedy, `seed` makes sampling repeatable."""
        return self._call("generate", input_ids, max_new_tokens, temperature, top_p, seed, attention_mask)

    def generate_stream(
        self,
        prompt_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        **options,
    ) -> Iterator[dict]:
        """Generate for one prompt (token ids) in the router's continuous batch, streamed.

        Yields {"token_ids": [...], "finish_reason": None | "length" | "stop"} chunks (and
        "logprobs" when asked for); concurrent calls (threads, or many clients of one server) share
        each decode step. Closing the iterator early frees the request's place in the batch.
        `options`: the other `SamplingParams` fields (presence_penalty, frequency_penalty,
        repetition_penalty, min_tokens, ignore_eos, stop_token_ids, logprobs).
        """
        if self._router is None:
            raise RuntimeError("this Engine has been shut down")
        if self.is_local:
            return self._router.generate_stream(
                prompt_ids, max_new_tokens, temperature, top_p, seed, **options
            )
        return self._remote_stream(prompt_ids, max_new_tokens, temperature, top_p, seed, options)

    def _pick(self, avoid=None):
        """The next router for a stream (round robin), other than `avoid` when there is another."""
        choices = [r for r in self._routers if r is not avoid] or self._routers
        self._next += 1
        return choices[self._next % len(choices)]

    def _remote_stream(self, prompt_ids, max_new_tokens, temperature, top_p, seed, options) -> Iterator[dict]:
        """The Router actor's stream; if the router dies, wait for its restart and go on from the
        tokens already yielded (re-submitted as prompt), so the caller sees one unbroken stream."""
        prompt = torch.as_tensor(prompt_ids).reshape(-1).tolist()
        made: list[int] = []
        request_id, done = uuid.uuid4().hex, False
        router = self._pick()
        try:
            while not done:
                try:
                    for chunk in stream_actor(
                        router,
                        "generate_stream",
                        prompt + made,
                        max_new_tokens - len(made),
                        temperature,
                        top_p,
                        seed,
                        request_id,
                        len(made),
                        **options,
                    ):
                        made += chunk["token_ids"]
                        done = chunk["finish_reason"] is not None
                        yield chunk
                except RouterDied as e:
                    if len(self._routers) > 1:  # another router goes on at once
                        router = self._pick(avoid=router)
                    elif not wait_for_restart(router, restart_deadline()):
                        raise RuntimeError(str(e)) from None
                    log.warning("router lost; resuming a stream after %d tokens", len(made))
                    request_id = uuid.uuid4().hex
        finally:
            if not done and self._router is not None:
                router.cancel_generation.remote(request_id)

    def cluster_state(self) -> dict:
        """Workers (node, device, experts per layer, bytes), placement, expert load and balance,
        membership events and generation statistics."""
        return self._call("cluster_state")

    def scale(self, num_workers: int) -> dict:
        """Run on `num_workers` expert workers; returns the cluster state once the new placement
        serves. Requests keep being served throughout. ValueError for a bad count; MembershipBusy
        while another change runs; ScaleError (the old placement still serves) when it cannot finish."""
        return self._call("scale", num_workers)

    def rebalance(self) -> dict:
        """Re-place experts and their replicas by EPLB over the recent expert load (at a pass
        boundary, like a scale); returns the per-layer balance before and after."""
        return self._call("rebalance")

    def health(self) -> dict:
        """{"serving": bool, "reason": str, "workers": n, "target_workers": n, ...}."""
        return self._call("health")

    def scale_routers(self, num_routers: int) -> dict:
        """Run `num_routers` router replicas (Ray transports): new ones load the dense model and join
        while the others serve; removed ones drain first. ValueError for a bad count."""
        if self._controller is None:
            raise ValueError("the 'local' transport runs one router in this process")
        out = call_actor(self._controller, "scale_routers", num_routers)
        self._routers = list(router_handles(self._controller).values()) or self._routers
        return out

    def start_trace(self) -> None:
        """Start recording timed spans of the router and every expert worker (docs/performance.md,
        "Tracing a decode step")."""
        self._call("start_trace")

    def stop_trace(self) -> dict:
        """Stop recording; a Chrome trace JSON object (open it in ui.perfetto.dev)."""
        return self._call("stop_trace")

    def shutdown(self) -> None:
        if self._router is None:
            return
        if self.is_local:
            self._router.shutdown()
        else:
            stop_cluster(self._controller, self._owns_ray, self.config.cluster_name)
        self._router = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
