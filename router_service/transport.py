"""Stage 3, Dispatch: move each worker's ExpertBatch to it and its partial back.

The interface is deliberately small (vLLM's prepare/finalize vs experts split): the router hands a
transport one dict {worker: batch} per layer and gets {worker: partial}; it never sees how workers
are reached. "local" keeps the workers as objects in this process; "ray" and "compiled" (Ray actor
calls, Ray Compiled Graphs) come with the distributed-runtime issue and must give identical bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from expert_workers.worker import ExpertBatch, ExpertWorker
from moe_models.spec import ModelSpec
from router_service.placement import Placement

TRANSPORTS = ("local", "ray", "compiled")


class WorkerError(RuntimeError):
    """An expert worker failed; the message names the worker and the layer."""


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker is built from (the transport decides where it runs)."""

    model_dir: str
    spec: ModelSpec
    dtype: torch.dtype
    device: torch.device
    kernel: str | None = None


class Transport(Protocol):
    def run_layer(self, layer: int, batches: dict[int, ExpertBatch]) -> dict[int, torch.Tensor]: ...

    def describe_workers(self) -> list[dict]: ...

    def close(self) -> None: ...


class LocalTransport:
    """Workers as plain objects in the router's process (tests, one-machine use)."""

    def __init__(self, setup: WorkerSetup, placement: Placement):
        self.workers = [
            ExpertWorker(
                w,
                setup.model_dir,
                placement.worker_assignment(w),
                dtype=setup.dtype,
                device=setup.device,
                kernel=setup.kernel,
                spec=setup.spec,
            )
            for w in range(placement.num_workers)
        ]

    def run_layer(self, layer: int, batches: dict[int, ExpertBatch]) -> dict[int, torch.Tensor]:
        out = {}
        for w, batch in batches.items():
            try:
                out[w] = self.workers[w].forward(layer, batch)
            except Exception as e:  # re-raised with the worker and layer named; nothing is swallowed
                raise WorkerError(
                    f"expert worker {w} failed in MoE layer {layer}: {type(e).__name__}: {e}"
                ) from e
        return out

    def describe_workers(self) -> list[dict]:
        return [w.describe() for w in self.workers]

    def close(self) -> None:
        self.workers = []


def make_transport(kind: str, setup: WorkerSetup, placement: Placement) -> Transport:
    """The one place a transport is chosen."""
    if kind == "local":
        return LocalTransport(setup, placement)
    if kind in ("ray", "compiled"):
        raise NotImplementedError(
            f"transport {kind!r} arrives with the distributed runtime; use 'local' for now"
        )
    raise ValueError(f"unknown transport {kind!r}; choose one of {TRANSPORTS}")
