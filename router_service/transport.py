"""Stage 3, Dispatch: move each worker's ExpertBatch to it and its partial back.

The interface is deliberately small (vLLM's prepare/finalize vs experts split): the router hands a
transport one dict {worker: batch} per layer and gets {worker: partial}; it never sees how workers
are reached. "local" keeps the workers as objects in this process; "ray" and "compiled" (Ray actor
calls, `ray_runtime.py`; Ray Compiled Graphs, `compiled_transport.py`) give bit-identical results
for the same placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from expert_workers.worker import ExpertBatch, ExpertWorker
from moe_models.spec import ModelSpec
from router_service.placement import Placement


class WorkerError(RuntimeError):
    """An expert worker failed; the message names the worker and the layer."""


def worker_error(worker: int, layer: int, cause: BaseException) -> WorkerError:
    """The error every transport raises when worker `worker` fails in MoE layer `layer`."""
    return WorkerError(f"expert worker {worker} failed in MoE layer {layer}: {type(cause).__name__}: {cause}")


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker is built from (the transport decides where it runs)."""

    model_dir: str
    spec: ModelSpec
    dtype: torch.dtype
    device: str  # "auto" resolves in the worker's own process
    kernel: str | None = None
    num_threads: int | None = None

    def build(self, worker_id: int, experts_per_layer: dict[int, list[int]], cls=ExpertWorker):
        """cls(...) with this setup: the class itself, or any callable taking its arguments."""
        return cls(
            worker_id,
            self.model_dir,
            experts_per_layer,
            dtype=self.dtype,
            device=self.device,
            kernel=self.kernel,
            spec=self.spec,
            num_threads=self.num_threads,
        )


class Transport(Protocol):
    def run_layer(self, layer: int, batches: dict[int, ExpertBatch]) -> dict[int, torch.Tensor]: ...

    def describe_workers(self) -> list[dict]: ...

    def close(self) -> None: ...


class LocalTransport:
    """Workers as plain objects in the router's process (tests, one-machine use)."""

    def __init__(self, setup: WorkerSetup, placement: Placement):
        self.workers = [setup.build(w, placement.worker_assignment(w)) for w in range(placement.num_workers)]

    def run_layer(self, layer: int, batches: dict[int, ExpertBatch]) -> dict[int, torch.Tensor]:
        out = {}
        for w, batch in batches.items():
            try:
                out[w] = self.workers[w].forward(layer, batch)
            except Exception as e:  # re-raised with the worker and layer named; nothing is swallowed
                raise worker_error(w, layer, e) from e
        return out

    def describe_workers(self) -> list[dict]:
        return [w.describe() for w in self.workers]

    def close(self) -> None:
        self.workers = []


def make_transport(config, setup: WorkerSetup, placement: Placement) -> Transport:
    """The one place a transport is chosen (config: an EngineConfig)."""
    if config.transport == "local":
        return LocalTransport(setup, placement)
    if config.transport == "ray":
        from router_service.ray_runtime import RayTransport

        return RayTransport(setup, placement, config.worker_resources, config.progress)
    from router_service.compiled_transport import CompiledTransport

    return CompiledTransport(setup, placement, config.worker_resources, config.progress)
