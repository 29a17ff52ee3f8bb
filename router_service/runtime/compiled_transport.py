"""The "compiled" transport: the expert-worker actors of the "ray" transport, driven by one Ray
Compiled Graph instead of one actor call per worker per layer.

The graph is built over the workers of the current placement: the router (the graph's driver, inside
the Router actor) writes the layer id and one (layout, packed ExpertBatch) item (or None) per
worker; each worker reads only its own item (Ray gives every `InputNode` attribute its own channel)
and writes its packed `[N_w, H]` partial back (`MultiOutputNode`). Channels are shared memory on one
node and Ray's cross-node channels otherwise.

Membership changes rebuild the graph off the hot path. An actor can be in one compiled graph at a
time (a second graph's loop waits behind the first's, and its executions hang), so every graph
compiled is torn down before another is compiled over the same actors. At the pass boundary where a
new placement is published (`use_workers`) the old graph is only dropped; a background thread tears it down and compiles the new one while layers go through
plain actor calls (the "ray" transport's path, same workers, same bits), and the first layer after
the compile finishes uses the graph again. A graph that breaks (a worker died: Ray ends every output
of the execution with the error) is handled the same way: the survivors' batches are re-sent as
plain calls, the dead workers are reported lost, and a new graph is compiled in the background.

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
import threading

import ray
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayTaskError

from expert_workers.worker import ExpertBatch
from moe_serving import tracing
from router_service.errors import StaleLayout, WorkerError
from router_service.runtime.data_plane import pack_batch, unpack
from router_service.runtime.ray_transport import RayTransport, kill_actor
from router_service.runtime.transport import LayerResult

log = logging.getLogger(__name__)

# How long one layer may take before the router gives up on it (Ray's default is 10 s, too short for
# a cold T=4096 layer on a small CPU). A stopped worker is found sooner, by the watchdog's pings.
GET_TIMEOUT_S = float(os.environ.get("MOE_COMPILED_GET_TIMEOUT_S", "600"))
# Initial size of each channel's buffer; Ray grows a channel when a larger message is written, so
# this only sets what a decode step (a few rows per worker) fits in without a resize.
BUFFER_SIZE_BYTES = int(os.environ.get("MOE_COMPILED_BUFFER_BYTES", str(1 << 20)))

_BROKEN = (RayChannelError, RayActorError)


class CompiledTransport(RayTransport):
    """Workers as Ray actors (as in "ray"), one compiled-graph execution per layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._members: tuple[int, ...] = ()
        self._dag = None  # the graph layers run on, over self._members
        self._retired: list = []  # graphs no layer uses any more, awaiting teardown
        self._doomed: list = []  # retired workers' actors, killed once the graphs using them are gone
        self._ready = None  # (members, graph) compiled in the background, not adopted yet
        self._cv = threading.Condition()
        self._want: tuple[int, ...] | None = None
        self._closing = False
        self.graph_layers = 0  # layers run on a compiled graph (the rest: plain actor calls)
        self.graph_breaks = 0  # executions that broke (a worker died, or a read timed out)
        self._builder = threading.Thread(target=self._build_loop, name="compiled-graph-builder", daemon=True)
        self._builder.start()

    # ---- membership: graphs are built in the background ----------------------------------------------

    def use_workers(self, workers: tuple[int, ...]) -> None:
        """Called at a pass boundary: drop the graph, build one over `workers` in the background."""
        super().use_workers(workers)  # handles on new workers, by name
        self._drop_graph()
        with self._cv:
            if self._ready is not None:  # compiled, never used: its loops still hold the actors
                self._retired.append(self._ready[1])
            self._members, self._want, self._ready = tuple(workers), tuple(workers), None
            self._cv.notify()

    def retire(self, workers: set[int]) -> None:
        """Stop using these workers now; kill them once no graph has them (the builder's job)."""
        with self._lock:
            actors = [self._actors.pop(w) for w in workers if w in self._actors]
            for w in workers:
                self._nodes.pop(w, None)
        with self._cv:
            self._doomed.extend(actors)
            self._cv.notify()

    def wait_compiled(self, timeout: float = 60.0) -> bool:
        """True once layers run on a graph over the current members (tests and benchmarks)."""
        with self._cv:
            self._cv.wait_for(lambda: self._ready is not None or self._want is None, timeout)
        self._adopt()
        return self._dag is not None

    def _drop_graph(self) -> None:
        if self._dag is not None:
            with self._cv:
                self._retired.append(self._dag)
                self._dag = None
                self._cv.notify()

    def _build_loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(
                    lambda: self._closing or self._retired or self._doomed or self._want is not None
                )
                if self._closing:
                    return
                retired, self._retired = self._retired, []
                doomed, self._doomed = self._doomed, []
                want = self._want
            for dag in retired:
                _teardown(dag)
            for actor in doomed:  # after the teardown: its loops must not find them gone
                kill_actor(actor)
            if want is None:
                continue
            dag = None
            if self._all_alive(want):  # a compile that fails midway leaves loops running on the others
                try:
                    dag = self._compile(want)
                except Exception as e:  # a member died meanwhile: the next membership change retries
                    log.warning("compiling the graph over workers %s failed: %s; on actor calls", want, e)
            with self._cv:
                if self._want == want:
                    self._want = None
                    if dag is not None:
                        self._ready = (want, dag)
                    self._cv.notify_all()
                    continue
            if dag is not None:  # membership changed while compiling
                _teardown(dag)

    def _all_alive(self, workers: tuple[int, ...]) -> bool:
        actors = [self._actors.get(w) for w in workers]
        if any(a is None for a in actors):
            return False
        try:
            ray.get([a.ping.remote() for a in actors], timeout=self.worker_timeout_s)
            return True
        except (RayActorError, GetTimeoutError):
            log.warning("not compiling a graph over workers %s: some do not answer", workers)
            return False

    def _compile(self, workers: tuple[int, ...]):
        """One graph: execute(layer, item_0, ..., item_{n-1}) -> [partial_0, ..., partial_{n-1}]."""
        actors = [self._actors[w] for w in workers]
        with InputNode() as inp:
            outs = [a.forward_packed.bind(inp[0], inp[i + 1]) for i, a in enumerate(actors)]
            dag = MultiOutputNode(outs)
        return dag.experimental_compile(_buffer_size_bytes=BUFFER_SIZE_BYTES)

    def _adopt(self) -> None:
        if self._ready is None:  # the common case, without the lock
            return
        with self._cv:
            if self._ready is None:
                return
            (members, dag), self._ready = self._ready, None
            if members == self._members:
                self._dag = dag
            else:  # every graph ever compiled is torn down: its loops would hold the actors
                self._retired.append(dag)
                self._cv.notify()

    # ---- the hot path ------------------------------------------------------------------------------

    overlaps = False  # one graph execution at a time: a step's batch runs whole

    def run_layer(
        self, layer: int, work: dict[int, tuple[int, ExpertBatch]], lane: int = 0, waiting=None
    ) -> LayerResult:
        self._adopt()
        if self._dag is None or not set(work) <= set(self._members):
            return super().run_layer(layer, work)  # plain actor calls until the graph is ready
        t0 = tracing.now_us()
        items = [(work[w][0], pack_batch(work[w][1])) if w in work else None for w in self._members]
        self._watch.begin([w for w in self._members if w in work])
        try:
            refs = self._dag.execute(layer, *items)
            t1 = tracing.now_us()
            tracing.record("submit", t0, t1, {"layer": layer})
            self.graph_layers += 1
            result = LayerResult()
            for i, ref in enumerate(refs):
                w = self._members[i]
                try:
                    partial = ray.get(ref, timeout=GET_TIMEOUT_S)
                except RayTaskError as e:  # a worker raised: name it, and rebuild the graph
                    # After a worker error, a later channel resize (a bigger batch) left the next
                    # execution hanging until the submit timeout (tests/test_compiled_transport.py);
                    # a fresh graph costs ~1 s, and only on errors.
                    self._drain(refs, i)
                    self._rebuild()
                    if isinstance(e.cause, StaleLayout):  # plain calls tell which workers are stale
                        self._watch.end()
                        return super().run_layer(layer, work)
                    if isinstance(e.cause, WorkerError):
                        raise e.cause from None
                    raise WorkerError(
                        f"an expert worker failed in MoE layer {layer}: {type(e.cause).__name__}: {e.cause}"
                    ) from None
                if w in work:
                    # Copied out of the channel's buffer: a tensor viewing it would keep the channel
                    # busy for as long as anyone holds it, and the next execution would block on it.
                    result.partials[w] = unpack(partial).to(work[w][1].x.device, copy=True)
            tracing.record("wait", t1, tracing.now_us(), {"layer": layer})
            return result
        except _BROKEN as e:  # a worker died (or hung past the timeout): plain calls finish the layer
            self.graph_breaks += 1
            log.warning(
                "compiled graph broke in MoE layer %d (%s); re-sending as actor calls",
                layer,
                type(e).__name__,
            )
            self._rebuild()
            self._watch.end()
            return super().run_layer(layer, work)
        finally:
            self._watch.end()

    def _rebuild(self) -> None:
        """Drop the graph; compile a new one over the members still running, in the background."""
        self.use_workers(tuple(w for w in self._members if w in self._actors))

    @staticmethod
    def _drain(refs, failed: int) -> None:
        """Read the outputs after the failed one, so the graph is idle before its teardown."""
        for ref in refs[failed + 1 :]:
            # the same execution's error, already being reported
            with contextlib.suppress(RayTaskError, RayChannelError, RayActorError):
                ray.get(ref, timeout=GET_TIMEOUT_S)

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        dags = [self._dag, *self._retired, *((self._ready[1],) if self._ready else ())]
        for actor in self._doomed:
            kill_actor(actor)
        self._dag, self._retired, self._ready, self._doomed = None, [], None, []
        super().close()  # the workers first: a graph over dead actors tears down at once
        for dag in dags:
            if dag is not None:
                _teardown(dag)
        self._builder.join(timeout=10)


def _teardown(dag) -> None:
    try:
        dag.teardown()
    except (RayChannelError, RayActorError) as e:  # a dead actor: nothing left to tear down
        log.warning("compiled graph teardown: %s", e)
    except Exception as e:  # never let a teardown take the builder thread down
        log.warning("compiled graph teardown failed: %s: %s", type(e).__name__, e)
