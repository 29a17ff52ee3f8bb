"""Stage 3, Dispatch, and worker membership: the interface every transport implements.

The hot path is deliberately small (vLLM's prepare/finalize vs experts split): the router hands a
transport one dict {worker id: (layout, batch)} per layer and gets a `LayerResult` back, with the
partials of the workers that answered and, separately, the workers that did not (died, or stopped
answering health checks): a lost worker no longer fails the layer, the dispatcher re-runs only its
rows elsewhere. An exception raised by worker code (bad input, a bug) is different: it is not a
lost worker, and it still fails the call as a `WorkerError`.

Membership calls are blocking and made from the membership controller's own thread, never from a
pass: start workers and load a layout into each, load another layout into running workers, drop a
layout, retire workers. Worker ids are stable names chosen by the caller. "local" keeps the workers
as objects in this process; "ray" and "compiled" (`ray_transport.py`, `compiled_transport.py`) run
them as Ray actors. All three give bit-identical results for the same placement.

This module imports no transport: the factory that picks one is `transports.make_transport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from expert_workers.worker import ExpertBatch, ExpertWorker, MissingLayout
from moe_models.spec import ModelSpec
from router_service.errors import worker_error

LANES = 2  # micro-batches of one step in flight at once, at most (generation/overlap.py)
Assignment = dict[int, list[int]]  # MoE layer -> expert id of each slot
LayoutSpec = tuple[int, Assignment]  # (layout key, assignment)


@dataclass
class LayerResult:
    """What one layer's dispatch gave: partials [N_w, H] by worker id, and the workers lost on the
    way (id -> why), whose rows the dispatcher sends elsewhere."""

    partials: dict[int, torch.Tensor] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)
    # workers that hold none of the layout asked (id -> why): the caller's placement is out of date
    stale: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker is built from (the transport decides where it runs)."""

    model_dir: str
    spec: ModelSpec
    dtype: torch.dtype
    device: str  # "auto" resolves in the worker's own process
    kernel: str | None = None
    num_threads: int | None = None
    merge_frames: bool = True  # the data plane's: merge frames of one layer that wait together

    def build(self, worker_id: int, cls=ExpertWorker, **extra):
        """cls(...) with this setup and no layout yet: the class itself, or any callable taking its
        arguments (a Ray actor class's `.remote`, which also gets `merge_frames`: a plain
        ExpertWorker serves no data plane)."""
        if cls is not ExpertWorker:
            extra.setdefault("merge_frames", self.merge_frames)
        return cls(
            worker_id,
            self.model_dir,
            None,
            dtype=self.dtype,
            device=self.device,
            kernel=self.kernel,
            spec=self.spec,
            num_threads=self.num_threads,
            **extra,
        )


class DataPlane(Protocol):
    """What a router uses: one layer's dispatch, and the workers its passes may address."""

    # Whether two micro-batches may run layers at once (from two threads): see generation/overlap.py.
    overlaps: bool

    def run_layer(
        self, layer: int, work: dict[int, tuple[int, ExpertBatch]], lane: int = 0, waiting=None
    ) -> LayerResult:
        """lane: which micro-batch of a step this is (two may be in flight at once, from two
        threads); waiting: None, or a context manager factory to hold while blocked on workers
        (the micro-batch hands the router's compute turn over there). Runs in a pass, under the
        router's model lock."""
        ...

    def use_workers(self, workers: tuple[int, ...]) -> None:
        """The next passes use exactly these workers (called at a pass boundary, under the model
        lock, when a placement is installed): the compiled transport rebuilds its graph, the socket
        transport connects to new workers."""
        ...

    def trace(self, workers: tuple[int, ...], on: bool) -> None:
        """Start (clearing) or stop step tracing in these workers' processes."""
        ...

    def take_traces(self, workers: tuple[int, ...]) -> list[dict]:
        """The trace events these workers recorded (moe_serving.tracing), and clear them."""
        ...

    def close(self) -> None: ...


class WorkerPool(Protocol):
    """What the membership controller manages: the worker processes and their layouts. Blocking
    calls, made from the controller's own threads, never from a pass."""

    def start_workers(self, specs: dict[int, LayoutSpec]) -> dict[int, BaseException]:
        """Start a worker per id and load its layout; the workers that failed (and were stopped),
        with why. Workers that did start keep running: the caller retires them on a rollback."""
        ...

    def load_layouts(self, specs: dict[int, LayoutSpec]) -> dict[int, BaseException]:
        """Load another layout into running workers (they keep serving their others meanwhile)."""
        ...

    def drop_layouts(self, keys: dict[int, int]) -> None:
        """Free layout keys[w] in worker w (best effort, not waited for)."""
        ...

    def retire(self, workers: set[int]) -> None:
        """Stop these workers (unknown or dead ones are ignored)."""
        ...

    def label_workers(self, workers: tuple[int, ...], labels: dict) -> None:
        """Leave `labels` with these workers (best effort, not waited for)."""
        ...

    def check(self, workers: tuple[int, ...], timeout_s: float) -> dict[int, str]:
        """Health check of idle workers: the ones dead or not answering within timeout_s, with why."""
        ...

    def discover(self) -> dict[int, dict]:
        """Workers of this cluster that are already running (a restarted controller or router
        finds them): id -> describe()."""
        ...

    def describe_workers(self, workers: tuple[int, ...]) -> list[dict]: ...

    def close(self) -> None: ...


class Transport(DataPlane, WorkerPool, Protocol):
    """Both halves, as every transport class implements them: a router's data plane and the
    controller's worker pool (in one process, as with one router, they are the same object)."""


class LocalTransport:
    """Workers as plain objects in the router's process (tests, one-machine use).

    A worker is lost only when it was retired; loads run in the calling thread.
    """

    overlaps = False  # the experts compute in the router's own process: nothing to hide

    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.workers: dict[int, ExpertWorker] = {}

    def run_layer(
        self, layer: int, work: dict[int, tuple[int, ExpertBatch]], lane: int = 0, waiting=None
    ) -> LayerResult:
        result = LayerResult()  # computed here, in the caller's thread: nothing to wait for
        for w, (layout, batch) in work.items():
            if w not in self.workers:
                result.lost[w] = "not running"
                continue
            try:
                result.partials[w] = self.workers[w].forward(layer, batch, layout)
            except MissingLayout as e:  # an out-of-date placement: the dispatcher re-sends
                result.stale[w] = str(worker_error(w, layer, e, stale=True))
            except Exception as e:  # re-raised with the worker and layer named; nothing is swallowed
                raise worker_error(w, layer, e) from e
        return result

    def start_workers(self, specs: dict[int, LayoutSpec]) -> dict[int, BaseException]:
        errors: dict[int, BaseException] = {}
        for w, (key, assignment) in specs.items():
            try:
                worker = self.setup.build(w)
                worker.load_layout(key, assignment)
                self.workers[w] = worker
            except Exception as e:
                errors[w] = e
        return errors

    def load_layouts(self, specs: dict[int, LayoutSpec]) -> dict[int, BaseException]:
        errors: dict[int, BaseException] = {}
        for w, (key, assignment) in specs.items():
            try:
                self.workers[w].load_layout(key, assignment)
            except Exception as e:
                errors[w] = e
        return errors

    def drop_layouts(self, keys: dict[int, int]) -> None:
        for w, key in keys.items():
            if w in self.workers:
                self.workers[w].drop_layout(key)

    def retire(self, workers: set[int]) -> None:
        for w in workers:
            self.workers.pop(w, None)

    def label_workers(self, workers: tuple[int, ...], labels: dict) -> None:
        for w in workers:
            if w in self.workers:
                self.workers[w].set_labels(labels)

    def check(self, workers: tuple[int, ...], timeout_s: float) -> dict[int, str]:
        return {w: "not running" for w in workers if w not in self.workers}

    def use_workers(self, workers: tuple[int, ...]) -> None:
        pass

    def trace(self, workers: tuple[int, ...], on: bool) -> None:
        pass  # the workers share the router's process, and its trace buffer

    def take_traces(self, workers: tuple[int, ...]) -> list[dict]:
        return []

    def discover(self) -> dict[int, dict]:
        return {}

    def describe_workers(self, workers: tuple[int, ...]) -> list[dict]:
        return [self.workers[w].describe() for w in workers if w in self.workers]

    def close(self) -> None:
        self.workers = {}
