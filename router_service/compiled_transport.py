"""The "compiled" transport: the expert-worker actors of the "ray" transport, driven by one Ray
Compiled Graph instead of one actor call per worker per layer.

The graph is built once, when the workers are loaded: the router (the graph's driver, inside the
Router actor) writes the layer id and one packed ExpertBatch (or None) per worker; each worker reads
only its own batch (Ray gives every `InputNode` attribute its own channel) and writes its packed
`[N_w, H]` partial back (`MultiOutputNode`). Channels are shared memory on one node and Ray's
cross-node channels otherwise.

Tensors cross the channels packed as raw bytes, as in the "ray" transport (see `ray_runtime.pack`),
and the workers run the same `forward_packed` entry point.

Why no NCCL: every tensor goes driver -> worker or worker -> driver, and Ray's compiled graphs cannot
put the driver in an NCCL group ("DAG inputs cannot be transferred via accelerator because the driver
cannot participate in the communicator group"); an accelerator type hint on an output read by the
driver resolves to the same shared-memory channel. NCCL would pay off only for worker -> worker
traffic (e.g. a combine on the workers), which this design does not have. GPU workers therefore
send their partials through host memory, and the router puts them back on its own device.
"""

from __future__ import annotations

import contextlib
import logging
import os

import ray
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayTaskError

from expert_workers.worker import ExpertBatch
from router_service.config import WorkerResources
from router_service.placement import Placement
from router_service.ray_runtime import RayTransport, pack_batch, unpack
from router_service.transport import WorkerError, WorkerSetup

log = logging.getLogger(__name__)

# How long one layer may take before the router gives up on it (Ray's default is 10 s, too short for
# a cold T=4096 layer on a small CPU); the graph is rebuilt after a timeout (RayChannelTimeoutError).
GET_TIMEOUT_S = float(os.environ.get("MOE_COMPILED_GET_TIMEOUT_S", "600"))
# Initial size of each channel's buffer; Ray grows a channel when a larger message is written, so
# this only sets what a decode step (a few rows per worker) fits in without a resize.
BUFFER_SIZE_BYTES = int(os.environ.get("MOE_COMPILED_BUFFER_BYTES", str(1 << 20)))

# ---- the worker side -----------------------------------------------------------------------------


# ---- the router side -----------------------------------------------------------------------------


class CompiledTransport(RayTransport):
    """Workers as Ray actors (as in "ray"), one compiled-graph execution per layer."""

    def __init__(
        self, setup: WorkerSetup, placement: Placement, resources: WorkerResources, progress: str = "bar"
    ):
        super().__init__(setup, placement, resources, progress)
        self.dag = None
        try:
            self._compile()
        except BaseException:
            self.close()
            raise

    def _compile(self) -> None:
        """One graph: execute(layer, batch_0, ..., batch_{n-1}) -> [partial_0, ..., partial_{n-1}]."""
        with InputNode() as inp:
            outs = [a.forward_packed.bind(inp[0], inp[w + 1]) for w, a in enumerate(self.actors)]
            dag = MultiOutputNode(outs)
        self.dag = dag.experimental_compile(_buffer_size_bytes=BUFFER_SIZE_BYTES)

    def _teardown(self) -> None:
        if self.dag is not None:
            dag, self.dag = self.dag, None
            try:
                dag.teardown()
            except (RayChannelError, RayActorError) as e:  # a dead actor: nothing left to tear down
                log.warning("compiled graph teardown: %s", e)

    def run_layer(self, layer: int, batches: dict[int, ExpertBatch]) -> dict:
        try:
            if self.dag is None:  # torn down after a broken execution: rebuild on the same actors
                self._compile()
            refs = self.dag.execute(layer, *(pack_batch(batches.get(w)) for w in range(len(self.actors))))
        except (RayChannelError, RayActorError) as e:  # an actor died since the last layer
            raise self._broken(layer, e) from None
        out = {}
        for w, ref in enumerate(refs):
            try:
                partial = ray.get(ref, timeout=GET_TIMEOUT_S)
            except RayTaskError as e:  # a worker raised
                # Rebuild the graph on the next call: after a worker error, a later channel resize (a
                # bigger batch) left the next execution hanging until the submit timeout (measured in
                # tests/test_compiled_transport.py); a fresh graph costs ~1 s, and only on errors.
                self._drain(refs, w)
                self._teardown()
                if isinstance(e.cause, WorkerError):  # named by the worker (forward_packed)
                    raise e.cause from None
                raise WorkerError(
                    f"an expert worker failed in MoE layer {layer}: {type(e.cause).__name__}: {e.cause}"
                ) from None
            except (RayChannelError, RayActorError) as e:  # a dead actor or a hung worker
                raise self._broken(layer, e) from None
            if w in batches:
                # Copied out of the channel's buffer: a tensor viewing it would keep the channel busy
                # for as long as anyone holds it, and the next execution would block on it.
                out[w] = unpack(partial).to(batches[w].x.device, copy=True)
        return out

    @staticmethod
    def _drain(refs, failed: int) -> None:
        """Read the outputs after the failed one, so the graph is idle before its teardown."""
        for ref in refs[failed + 1 :]:
            # the same execution's error, already being reported
            with contextlib.suppress(RayTaskError, RayChannelError, RayActorError):
                ray.get(ref, timeout=GET_TIMEOUT_S)

    def _broken(self, layer: int, e: Exception) -> WorkerError:
        """The graph cannot go on: drop it (the next call rebuilds it) and name the dead workers."""
        self._teardown()
        dead = []
        for w, a in enumerate(self.actors):
            try:
                ray.get(a.node_id.remote(), timeout=10)
            except (RayActorError, GetTimeoutError):
                dead.append(w)
        who = f"expert worker(s) {dead} died" if dead else "the compiled graph broke"
        first_line = (str(e).splitlines() or [""])[0]
        return WorkerError(f"{who} during MoE layer {layer}: {type(e).__name__}: {first_line}")

    def close(self) -> None:
        self._teardown()
        super().close()
