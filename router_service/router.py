"""Router: the dense model, the gate and the expert dispatch of one served model, in one process.

This is the object that runs inside the Router Ray actor (transport "ray" / "compiled") or directly
in the caller's process (transport "local"); `Engine` is the user's handle on either. It builds the
workers through the transport, then the `transformers` model minus its experts, and checks every
input at its edge with `ValueError`s that say what to change.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator

import torch

from moe_models.loading import load_hf_config, spec_from_hf_config
from moe_serving import tracing
from router_service.config import EngineConfig, resolve_device, router_threads_for
from router_service.default_model import ensure_default_model
from router_service.generation.constraints import grammar_tokenizer
from router_service.generation.decoding import SamplingParams
from router_service.generation.overlap import DEFAULT_MIN_TOKENS, MicroBatchRunner
from router_service.generation.scheduler import GenerationScheduler, eos_ids
from router_service.inputs import check_attention_mask, check_moe_input, check_token_ids
from router_service.runtime.controller import Controller
from router_service.runtime.transport import WorkerSetup
from router_service.runtime.transports import make_transport
from router_service.stages import trace_hooks
from router_service.stages.dense_model import build_router_model
from router_service.stages.moe_layer import ExpertDispatcher
from router_service.stages.placement import Placement

log = logging.getLogger(__name__)


class ModelTurn:
    """A reusable context manager around every model call: one call at a time, each on the
    configured number of torch threads.

    torch's intra-op thread count is per calling thread (OpenMP's), and a threaded Router actor
    and the generation loop call the model from threads that never ran `torch.set_num_threads`;
    they would compute with another count and round differently from the other transports.
    """

    def __init__(self, num_threads: int):
        self.num_threads = num_threads
        self._lock = threading.RLock()

    def __enter__(self):
        self._lock.acquire()
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


class Router:
    """Holds the non-expert weights and runs the model layer by layer over the expert workers.

    controller: the membership controller this router serves under (a `ControllerClient` of the
    cluster's controller actor), or None: then the router makes its own, in this process, over its
    transport's workers (the "local" transport, and one-process use). router_id: this router's name
    among its controller's routers. reattach: with its own controller, adopt the expert workers
    still running instead of starting new ones.
    """

    def __init__(self, config: EngineConfig, reattach: bool = False, controller=None, router_id: str = "0"):
        t0 = time.perf_counter()
        self.config = config
        self.router_id = router_id
        self.incarnation = uuid.uuid4().hex  # this process's router (see generation_events)
        # One model, many callers (actor threads, the generation loop): model calls take turns.
        # Holding it is also what makes a moment a pass boundary, where a placement is installed.
        self.lock = ModelTurn(1)  # the thread count is set below, once the model's size is known
        self._scheduler: GenerationScheduler | None = None
        self._sinks: dict[str, queue.SimpleQueue] = {}
        self._readers: dict[str, int] = {}  # subscriber -> generation_events streams running
        self._sinks_lock = threading.Lock()
        self._trace_hooks: list | None = None
        self._traced: tuple[int, ...] = ()
        self.dtype = config.torch_dtype
        self.device = resolve_device(config.device)
        ensure_default_model(config.model_dir)  # the built-in model, if that is the one asked for
        hf_config = load_hf_config(config.model_dir)
        self.spec = spec_from_hf_config(hf_config)
        self.threads = router_threads_for(config, self.spec.hidden_size)
        self.lock.num_threads = self.threads
        torch.set_num_threads(self.threads)  # a no-op in-process unless asked for
        transport = make_transport(config, worker_setup(config, self.spec), owns_workers=controller is None)
        self.dispatcher = ExpertDispatcher(self.spec, transport, config.load_window)
        self.dispatcher.recover = self._recover
        self.dispatcher.refresh = self._refresh
        self.dispatcher.max_attempts = config.elastic.recovery_attempts
        self._owns_controller = controller is None
        try:
            if controller is None:
                controller = Controller(self.spec, transport, config, routers=LocalRouters(self))
                controller.start(reattach=reattach)
            else:
                self._install(controller.attach_router(router_id))
            self.controller = controller
            self.model = build_router_model(
                config.model_dir, hf_config, self.spec, self.dtype, self.device, self.dispatcher
            )
        except BaseException:
            transport.close()
            raise
        if self._owns_controller:
            self.controller.start_loop()
        log.info(
            "loaded %s (%d MoE layers x %d experts) on %d %s worker(s) in %.1fs",
            self.spec.model_type,
            len(self.spec.moe_layers),
            self.spec.num_experts,
            self.dispatcher.placement.num_workers,
            config.transport,
            time.perf_counter() - t0,
        )

    # ---- placements ---------------------------------------------------------------------------------

    def install_placement(self, placement: Placement) -> int:
        """Use `placement` from the next pass on (older ones are ignored: a recovery may have
        overtaken it); returns the version installed. Taken at a pass boundary, under the model
        lock: once this returns, no pass of this router uses an older placement."""
        with self.lock:
            self._install(placement)
            return self.dispatcher.placement.version

    def _install(self, placement: Placement, same_version: bool = False) -> None:
        """Newer placements only; `same_version`: also one of the current version (a placement the
        router made itself, without the controller, from the current one minus lost workers)."""
        current = self.dispatcher.placement
        newer = current is None or placement.version > current.version
        if newer or (same_version and placement.version == current.version):
            self.dispatcher.transport.use_workers(placement.worker_ids)
            self.dispatcher.placement = placement

    def _recover(self, placement: Placement, lost: dict[int, str]) -> Placement:
        """A pass (holding the model lock) lost workers: the controller's placement without them,
        installed here at once, since the old one cannot serve."""
        new = self.controller.recover(placement, lost, self.router_id)
        self._install(new, same_version=True)
        return self.dispatcher.placement

    def _refresh(self, placement: Placement) -> Placement:
        """A pass (holding the model lock) found workers without their layouts of `placement`: a
        change retired them while this router could not install the change's placement (it was
        restarting: it attached before the change and its install came too late). The controller's
        current placement, installed here at once."""
        if self._owns_controller:
            current = self.controller.placement
        else:
            current = self.controller.attach_router(self.router_id)
        log.warning(
            "router %s: placement %d is out of date (its workers dropped its layouts); now on %d",
            self.router_id,
            placement.version,
            current.version,
        )
        self._install(current)
        return self.dispatcher.placement

    def describe(self) -> dict:
        """This router for `GET /v1/cluster`: id, sequences, tokens/s, the placement it pins."""
        stats = self._scheduler.stats() if self._scheduler is not None else None
        return {
            "router_id": self.router_id,
            "running": stats["running"] if stats else 0,
            "waiting": stats["waiting"] if stats else 0,
            "tokens_per_s": round(self._scheduler.tokens_per_s(), 2) if self._scheduler else 0.0,
            "placement_version": self.dispatcher.placement.version,
            "threads": self.threads,
        }

    def share_node(self, routers_on_node: int) -> int:
        """`routers_on_node` routers (this one included) run on this router's node: its own thread
        count follows (`router_threads_for`), from the next model call on. Returns the count."""
        self.threads = router_threads_for(self.config, self.spec.hidden_size, routers_on_node)
        self.lock.num_threads = self.threads
        return self.threads

    def report(self) -> dict:
        """What the controller sums over the routers (EPLB's load, the autoscaler's sequences) and
        what the ingress balances requests by."""
        stats = self._scheduler.stats() if self._scheduler is not None else {"running": 0, "waiting": 0}
        return {
            "router_id": self.router_id,
            "expert_load": self.dispatcher.load.totals(),
            "passes": self.dispatcher.passes,
            "sequences": float(stats["running"] + stats["waiting"]),
            "running": stats["running"],
            "waiting": stats["waiting"],
            "placement_version": self.dispatcher.placement.version,
            "placement": self.dispatcher.placement,
        }

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        """Results stay on the device in-process; a Router actor returns CPU tensors to its caller."""
        return t if self.config.transport == "local" else t.cpu()

    # ---- the API ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Logits [B, S, V] (float32) for token ids [B, S], like transformers' model(...).logits."""
        ids = check_token_ids(input_ids, self.spec.vocab_size).to(self.device)
        mask = check_attention_mask(attention_mask, ids)
        with self.lock:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return self._out(logits.float())

    @torch.inference_mode()
    def moe_forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """One MoE block (routed + shared experts) on hidden states [T, H] or [B, S, H]."""
        hidden = check_moe_input(layer, hidden, self.spec)
        block = getattr(self.model.model.layers[layer], self.spec.moe_module_path)
        if getattr(block, "is_hash", False):
            raise ValueError(
                f"MoE layer {layer} routes by token id (hash routing): it has no output for hidden "
                "states alone; use forward() with token ids"
            )
        x = hidden.to(self.device, self.dtype)
        with self.lock:
            # transformers' blocks take [B, S, H]; some return (hidden, router scores / logits)
            out = block(x.reshape(1, -1, x.shape[-1]) if x.dim() == 2 else x)
        out = (out[0] if isinstance(out, tuple) else out).reshape(hidden.shape)
        return self._out(out.to(hidden.dtype))

    @torch.inference_mode()
    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        attention_mask=None,
    ) -> torch.Tensor:
        """Prompt + generated ids [B, S + n] with transformers' own decoding loop and KV cache.

        temperature 0 is greedy; otherwise sampling with `top_p`, reproducible when `seed` is given.
        """
        ids = check_token_ids(input_ids, self.spec.vocab_size).to(self.device)
        mask = check_attention_mask(attention_mask, ids)
        if mask is None:
            mask = torch.ones_like(ids)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        kwargs = dict(max_new_tokens=max_new_tokens, attention_mask=mask)
        if temperature == 0.0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        gen_cfg = self.model.generation_config
        if gen_cfg.pad_token_id is None and gen_cfg.eos_token_id is not None:
            eos = gen_cfg.eos_token_id
            kwargs["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
        cuda = [self.device] if self.device.type == "cuda" else []
        with self.lock, torch.random.fork_rng(devices=cuda):
            if seed is not None:
                torch.manual_seed(seed)
            return self._out(self.model.generate(ids, **kwargs))

    # ---- continuous batching ------------------------------------------------------------------------

    @property
    def scheduler(self) -> GenerationScheduler:
        if self._scheduler is None:
            eos = eos_ids(self.model.generation_config, self.model.config)
            vocab, model_dir = self.spec.vocab_size, self.config.model_dir
            self._scheduler = GenerationScheduler(
                self.model,
                eos,
                self.device,
                self.lock,
                self.config.batch_limits,
                self._overlap_runner(),
                grammar_tokenizer=lambda: grammar_tokenizer(str(model_dir), vocab, tuple(sorted(eos))),
            )
        return self._scheduler

    def _overlap_runner(self) -> MicroBatchRunner | None:
        """The micro-batch runner decode steps overlap with, or None (off, or a transport whose
        experts run in this process or cannot take two micro-batches at once)."""
        setting = self.config.micro_batch_min_tokens
        if setting == "off" or not getattr(self.dispatcher.transport, "overlaps", False):
            return None
        min_tokens = DEFAULT_MIN_TOKENS if setting == "auto" else setting
        if min_tokens is None:
            return None
        return MicroBatchRunner(self.dispatcher, self.threads, min_tokens)

    def generate_stream(
        self,
        prompt_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        request_id: str | None = None,
        resume_at: int = 0,
        **options,
    ) -> Iterator[dict]:
        """Generate for one prompt (a list of token ids) in the router's continuous batch.

        Yields {"token_ids": [...], "finish_reason": None | "length" | "stop"} chunks as tokens are
        made (plus "logprobs", one (logprob, top alternatives) per token, when `logprobs` is set);
        concurrent calls share each decode step. Stops at the model's end-of-sequence token (or one
        of `stop_token_ids`) or after max_new_tokens. `options`: the other `SamplingParams` fields
        (penalties, min_tokens, ignore_eos, stop_token_ids, logprobs). Closing the iterator early (or
        `cancel_generation(request_id)`) frees the request's place in the batch. `resume_at`: see
        `submit_generation`.
        """
        key = request_id or uuid.uuid4().hex
        self._submit(key, prompt_ids, max_new_tokens, temperature, top_p, seed, None, resume_at, options)
        return self._stream(key)

    def _submit(
        self, key, prompt_ids, max_new_tokens, temperature, top_p, seed, sink, resume_at, options
    ) -> None:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(1, -1)
        elif isinstance(prompt_ids, list | tuple):
            prompt_ids = [list(prompt_ids)]
        ids = check_token_ids(prompt_ids, self.spec.vocab_size, "prompt_ids")
        params = SamplingParams(max_new_tokens, float(temperature), float(top_p), seed, resume_at, **options)
        self.scheduler.submit(key, ids[0].tolist(), params, sink)

    # A serving front end multiplexes all its streams over one `generation_events` call (one Ray
    # message per decode step for all its requests, not one per request: at 16 concurrent streams
    # that was ~5 ms of a 26 ms step) and starts each request with `submit_generation`.

    def submit_generation(
        self,
        request_id: str,
        prompt_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        subscriber: str = "default",
        resume_at: int = 0,
        **options,
    ) -> str:
        """Queue a request whose tokens are reported by `generation_events(subscriber)`; returns
        this router process's incarnation (see `generation_events`).

        resume_at: how many tokens of this completion an earlier router already produced (they end
        `prompt_ids`); sampling goes on from there (penalties count those tokens as completion), so
        a seeded stream resumed after a router restart gives the tokens the uninterrupted one would
        have. options: the other `SamplingParams` fields.
        """
        sink = self._sink(subscriber)
        self._submit(
            request_id, prompt_ids, max_new_tokens, temperature, top_p, seed, sink, resume_at, options
        )
        return self.incarnation

    def generation_events(self, subscriber: str = "default") -> Iterator[tuple[str, list, tuple]]:
        """(incarnation, events, (running, waiting)) messages for the subscriber's requests, `events`
        a list of (request_id, token_ids, finish_reason, error, logprobs), one message per batch of
        news; an empty list after a second of silence (a heartbeat). The load is this router's
        sequences when the message left: what front ends balance requests by.

        `incarnation` names this router process: a reader whose stream goes silent asks
        `event_stream_status`, and a different incarnation tells it that the process it was
        reading from is gone even when Ray never ended the stream (a streaming call to an actor that
        died and restarted can hang instead of raising: ray-project/ray#43914), so it re-submits."""
        with self._sinks_lock:
            self._readers[subscriber] = self._readers.get(subscriber, 0) + 1
        try:
            scheduler = self.scheduler
            for events in scheduler.events(self._sink(subscriber)):
                yield self.incarnation, events, scheduler.load()
        finally:
            with self._sinks_lock:
                self._readers[subscriber] -= 1

    def event_stream_status(self, subscriber: str) -> dict:
        """{"incarnation": this router process, "reading": whether a `generation_events` stream of
        `subscriber` runs here}: how a reader whose stream went silent tells a slow stream from one
        that was lost with the process it came from."""
        with self._sinks_lock:
            return {"incarnation": self.incarnation, "reading": self._readers.get(subscriber, 0) > 0}

    def _sink(self, subscriber: str) -> queue.SimpleQueue:
        with self._sinks_lock:
            return self._sinks.setdefault(subscriber, queue.SimpleQueue())

    def _stream(self, key) -> Iterator[dict]:
        stream = self.scheduler.stream(key)
        try:
            for tokens, finish, logprobs in stream:
                chunk = {"token_ids": tokens, "finish_reason": finish}
                if logprobs is not None:
                    chunk["logprobs"] = logprobs
                yield chunk
        finally:
            stream.close()  # cancels the request when it has not finished

    def cancel_generation(self, request_id: str) -> None:
        """Stop a `generate_stream` request (its client went away); unknown ids are ignored."""
        if self._scheduler is not None:
            self._scheduler.cancel(request_id)

    # ---- step tracing -----------------------------------------------------------------------------

    def start_trace(self) -> None:
        """Record timed spans in this process and in every expert worker (see moe_serving.tracing)
        until `stop_trace`; starting again clears what was recorded."""
        tracing.set_process("router")
        with self.lock:
            if self._trace_hooks is None:
                self._trace_hooks = trace_hooks.install(
                    self.model, self.spec.moe_module_path, set(self.spec.moe_layers)
                )
            self._traced = self.dispatcher.placement.worker_ids
            self.dispatcher.transport.trace(self._traced, True)
            tracing.enable(True)

    def stop_trace(self) -> dict:
        """Stop recording; the router's and the workers' spans as one Chrome trace (a JSON object
        Perfetto and chrome://tracing open), all on the machine's wall clock."""
        with self.lock:
            tracing.enable(False)
            if self._trace_hooks is not None:
                trace_hooks.remove(self._trace_hooks)
                self._trace_hooks = None
            transport = self.dispatcher.transport
            workers = tuple(self._traced)
            events = tracing.take() + transport.take_traces(workers)
            transport.trace(workers, False)
        return tracing.chrome_trace(events)

    # ---- membership (the controller's) --------------------------------------------------------------

    def scale(self, num_workers: int) -> dict:
        """Run on `num_workers` expert workers; returns the cluster state once the new placement serves.

        New workers start and load in the background while requests keep being served; the switch
        happens between two forward passes. Raises ValueError for a bad count, MembershipBusy while
        another change runs, ScaleError when the change could not finish (it was rolled back).
        """
        self.controller.scale(num_workers)
        return self.cluster_state()

    def rebalance(self) -> dict:
        """Re-place experts and replicas by EPLB over the recent load; the balance before and after."""
        return self.controller.rebalance()

    def health(self) -> dict:
        """{"serving": bool, "reason": str, "workers", "target_workers", ...}: serving is False
        whenever a request cannot be served now (all workers lost and none could be started)."""
        return self.controller.health()

    def cluster_state(self) -> dict:
        """Workers, placement (version, slots), the experts and bytes each worker holds, expert
        load, balance, membership events and generation statistics."""
        p = self.dispatcher.placement
        workers = self.controller.describe_workers(p.worker_ids)
        if workers is None:  # the controller is away: what this router's data plane can tell
            workers = self.dispatcher.transport.describe_workers(p.worker_ids)
        for info in workers:
            info["tokens"] = self.dispatcher.worker_tokens.get(info["worker_id"], 0)
        health = self.controller.health()
        return {
            "model_type": self.spec.model_type,
            "transport": self.config.transport,
            "dtype": self.config.dtype,
            "placement_version": p.version,
            "num_workers": p.num_workers,
            "moe_layers": list(self.spec.moe_layers),
            "workers": workers,
            "placement": p.to_dict(),
            "expert_load": self.dispatcher.load.snapshot(),
            "balance": self.controller.balance(),
            "elastic": {**self.controller.stats(), "health": health},
            "generation": self._scheduler.stats() if self._scheduler else None,
        }

    def shutdown(self) -> None:
        if self._owns_controller:
            self.controller.stop()
        if self._scheduler is not None:
            self._scheduler.close()
        self.dispatcher.transport.close()


def worker_setup(config: EngineConfig, spec) -> WorkerSetup:
    """What every expert worker of `config` is built from."""
    return WorkerSetup(
        config.model_dir,
        spec,
        config.torch_dtype,
        config.worker_device,
        config.expert_kernel,
        config.num_threads,
        merge_frames=config.merge_frames,
    )


class LocalRouters:
    """The `Routers` of a controller living in its one router's process."""

    def __init__(self, router: Router):
        self.router = router

    def install(self, placement: Placement, skip: str | None = None, wait: bool = True) -> None:
        if skip != self.router.router_id:
            self.router.install_placement(placement)

    def describe(self) -> dict:
        """This router for `GET /v1/cluster`: id, sequences, tokens/s, the placement it pins."""
        stats = self._scheduler.stats() if self._scheduler is not None else None
        return {
            "router_id": self.router_id,
            "running": stats["running"] if stats else 0,
            "waiting": stats["waiting"] if stats else 0,
            "tokens_per_s": round(self._scheduler.tokens_per_s(), 2) if self._scheduler else 0.0,
            "placement_version": self.dispatcher.placement.version,
        }

    def report(self) -> dict:
        if not hasattr(self.router, "dispatcher"):  # still being built
            return {}
        return self.router.report()
