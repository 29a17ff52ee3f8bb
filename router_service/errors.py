"""The error types the runtime, the generation loop and serving share: raised by one, mapped to a
client-facing status by another (`serving/core.py`, `_as_serving_error`), so they live below both.

This module imports nothing of the project: anything may import it.
"""

from __future__ import annotations


class WorkerError(RuntimeError):
    """Expert-worker code raised; the message names the worker and the layer."""


class StaleLayout(WorkerError):
    """A worker does not hold the layout a pass asked for: the pass's placement is older than the
    membership's (a router that restarted while a change retired it). Not a fault of the worker:
    the router takes the current placement and re-sends those rows."""


class WorkerStartError(RuntimeError):
    """A worker could not be started or could not load its experts; the message says why."""


def worker_error(worker: int, layer: int, cause: BaseException, stale: bool = False) -> WorkerError:
    """The error every transport raises when worker `worker`'s code fails in MoE layer `layer`;
    `stale`: the cause is a layout the worker does not hold (a `StaleLayout`)."""
    kind = StaleLayout if stale else WorkerError
    return kind(f"expert worker {worker} failed in MoE layer {layer}: {type(cause).__name__}: {cause}")


class MembershipBusy(RuntimeError):
    """Another scale, rebalance or recovery is running (HTTP 409 / gRPC FAILED_PRECONDITION)."""


class ScaleError(RuntimeError):
    """A change could not finish and was rolled back; the old placement still serves."""


class NoCapacityError(RuntimeError):
    """No expert worker can serve (all lost, none could be started)."""


class QueueFull(RuntimeError):
    """More requests are waiting than `max_waiting`: try again later."""


class RequestTooLarge(ValueError):
    """A single request needs more than `max_batch_tokens`."""
