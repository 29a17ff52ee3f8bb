"""The "compiled" transport: the expert-worker actors of the "ray" transport, driven by one Ray
Compiled Graph instead of one actor call per worker per layer.

The graph is built once, when the workers are loaded: the router (the graph's driver, inside the
Router actor) writes the layer id and one ExpertBatch (or None) per worker; each worker reads only
its own batch (one input channel per `InputNode` attribute) and writes its `[N_w, H]` partial back
(`MultiOutputNode`). Channels are shared memory on one node and Ray's cross-node channels otherwise;
an actor call costs ~2-3 ms, a compiled round trip well under 1 ms (docs/performance.md).

Why no NCCL here: every tensor goes driver -> worker or worker -> driver, and Ray's compiled graphs
cannot put the driver in an NCCL group ("DAG inputs cannot be transferred via accelerator because the
driver cannot participate in the communicator group"). NCCL would pay off only for worker -> worker
traffic (e.g. a combine on the workers), which this design does not have. On GPU workers the
partials are annotated as torch tensors (`with_tensor_transport`), which Ray resolves to its
shared-memory tensor channel for a driver reader and NCCL wherever a GPU peer reads them.
"""

from __future__ import annotations

import logging
import os

import ray
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayTaskError

from expert_workers.worker import ExpertBatch
from router_service.config import WorkerResources
from router_service.placement import Placement
from router_service.ray_runtime import RayExpertWorker, RayTransport
from router_service.transport import WorkerError, WorkerSetup

log = logging.getLogger(__name__)

# How long one layer may take before the router gives up on it (Ray's default is 10 s, too short for
# a cold T=4096 layer on a small CPU); the graph is rebuilt after a timeout (RayChannelTimeoutError).
GET_TIMEOUT_S = float(os.environ.get("MOE_COMPILED_GET_TIMEOUT_S", "600"))
# Initial size of each channel's buffer; Ray grows a channel when a larger message is written, so
# this only sets what a decode step (a few rows per worker) fits in without a resize.
BUFFER_SIZE_BYTES = int(os.environ.get("MOE_COMPILED_BUFFER_BYTES", str(1 << 20)))


class CompiledExpertWorker(RayExpertWorker):
    """RayExpertWorker plus the graph's entry point; every worker runs at every execution."""

    def forward_compiled(self, layer: int, batch: ExpertBatch | None):
        """The partial [N, H] for this worker's batch; None when the plan sent it no rows."""
        if batch is None:
            return None
        try:
            return self.forward(layer, batch)
        except Exception as e:
            # Named here because Ray hands the first error of an execution to every output of the
            # graph, so the router cannot tell from which output it came; re-raised, not swallowed.
            raise WorkerError(
                f"expert worker {self.worker_id} failed in MoE layer {layer}: {type(e).__name__}: {e}"
            ) from e

    def uses_gpu(self) -> bool:
        return self.device.type == "cuda"


class CompiledTransport(RayTransport):
    """Workers as Ray actors (as in "ray"), one compiled-graph execution per layer."""

    worker_cls = CompiledExpertWorker

    def __init__(self, setup: WorkerSetup, placement: Placement, resources: WorkerResources):
        super().__init__(setup, placement, resources)
        self.dag = None
        try:
            self._gpu = any(ray.get([a.uses_gpu.remote() for a in self.actors]))
            self._compile()
        except BaseException:
            self.close()
            raise

    def _compile(self) -> None:
        """One graph: execute(layer, batch_0, ..., batch_{n-1}) -> [partial_0, ..., partial_{n-1}]."""
        with InputNode() as inp:
            outs = [a.forward_compiled.bind(inp[0], inp[w + 1]) for w, a in enumerate(self.actors)]
            if self._gpu:
                outs = [o.with_tensor_transport("auto") for o in outs]
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
            refs = self.dag.execute(layer, *(batches.get(w) for w in range(len(self.actors))))
        except (RayChannelError, RayActorError) as e:  # an actor died since the last layer
            raise self._broken(layer, e) from None
        out = {}
        for w, ref in enumerate(refs):
            try:
                partial = ray.get(ref, timeout=GET_TIMEOUT_S)
            except RayTaskError as e:  # a worker raised; the graph stays usable
                if isinstance(e.cause, WorkerError):  # named by the worker (forward_compiled)
                    raise e.cause from None
                raise WorkerError(
                    f"an expert worker failed in MoE layer {layer}: {type(e.cause).__name__}: {e.cause}"
                ) from None
            except (RayChannelError, RayActorError) as e:  # a dead actor or a hung worker
                raise self._broken(layer, e) from None
            if w in batches:
                out[w] = partial
        return out

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
        first_line = str(e).splitlines()[0] if str(e) else ""
        return WorkerError(f"{who} during MoE layer {layer}: {type(e).__name__}: {first_line}")

    def close(self) -> None:
        self._teardown()
        super().close()
