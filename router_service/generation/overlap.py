"""Micro-batch overlap (ping-pong): a decode step's batch as two micro-batches, so that the router's
dense work on one runs while the expert workers compute the other's MoE layer.

Each micro-batch runs `transformers`' own forward (the dense math stays the model's, for every
family) in a thread of its own, and the two take turns holding a `Baton`: a micro-batch holds it while
the router computes for it and hands it over while it waits on the workers (the dispatcher passes
`Baton.released()` to the transport as the wait's context). So with micro-batches A and B, layer by
layer: A's attention and gate, A's experts go out; B's attention and gate run while A's experts
compute; B's experts go out, A's answer is in, A's next layer runs while B's experts compute; and
so on. The router's core never waits while a micro-batch has work for it.

Splitting costs the router (every op runs twice, on half the rows), so it pays only where the round
trips and expert compute it hides outweigh that: `micro_batches` applies the threshold measured in
docs/performance.md ("Micro-batch overlap").

The KV cache is split by rows into views (no copy) before the step and the two halves' updated
layers are concatenated back after it (one copy of the cache, like the update itself makes).
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from router_service.runtime.transport import LANES


class Baton:
    """The router's compute turn, passed between the micro-batch threads."""

    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self) -> None:
        self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def released(self):
        """Hand the turn over for the duration of a wait on the workers."""
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()


def split_bounds(n: int, lanes: int = LANES) -> list[tuple[int, int]]:
    """Row ranges of `lanes` near-equal micro-batches of n rows."""
    cuts = [n * i // lanes for i in range(lanes + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def split_cache(cache: DynamicCache, lo: int, hi: int) -> DynamicCache:
    """A cache over rows [lo, hi) of `cache`: its layers view the same tensors (no copy)."""
    sub = DynamicCache()
    for layer in cache.layers:
        part = DynamicLayer()
        part.lazy_initialization(layer.keys, layer.values)
        part.keys, part.values = layer.keys[lo:hi], layer.values[lo:hi]
        sub.layers.append(part)
    return sub


def join_caches(cache: DynamicCache, parts: list[DynamicCache]) -> None:
    """Put the micro-batches' updated layers back into `cache`, rows in order."""
    for i, layer in enumerate(cache.layers):
        layer.keys = torch.cat([p.layers[i].keys for p in parts])
        layer.values = torch.cat([p.layers[i].values for p in parts])


# The threshold "auto" stands for: None, off. Measured on the 2-core CPU machine of
# docs/performance.md ("Micro-batch overlap"), served, at 16, 32 and 64 streams, overlap lost
# everywhere: -3/-10/-24% tokens/s on the default model, -1/-16/-13% on the medium preset (each
# micro-batch re-reads the expert weights a decode step touches, per-op overhead doubles, and the
# router and the workers share the same cores and memory bandwidth, so there is little to hide).
# EngineConfig.micro_batch_min_tokens = N turns it on from N sequences (on a GPU, or with the
# router on a machine of its own, where the two sides do not compete: not measured here).
DEFAULT_MIN_TOKENS: int | None = None


class MicroBatchRunner:
    """Runs the micro-batches of one step in their own threads, taking turns on a Baton.

    `dispatcher.lane(i, baton)` tells the MoE layers which micro-batch a thread runs and what to
    release while waiting. Threads persist across steps; each sets the router's torch thread count
    once (torch's count is per OS thread).
    """

    def __init__(self, dispatcher, num_threads: int, min_tokens: int = 2):
        self.dispatcher = dispatcher
        self.min_tokens = max(min_tokens, LANES)
        self._pool = ThreadPoolExecutor(
            LANES,
            thread_name_prefix="micro-batch",
            initializer=torch.set_num_threads,
            initargs=(num_threads,),
        )

    def wanted(self, tokens: int) -> bool:
        """Whether a step of `tokens` rows runs as micro-batches."""
        return tokens >= self.min_tokens

    def run(self, fns: list) -> list:
        """[fn() for fn in fns], overlapped; the first micro-batch starts holding the baton."""
        baton = Baton()
        baton.acquire()  # handed to lane 0, which releases it at its first wait

        def lane(i, fn):
            if i:
                baton.acquire()
            try:
                with torch.inference_mode(), self.dispatcher.lane(i, baton):
                    return fn()
            finally:
                baton.release()

        futures = [self._pool.submit(lane, i, fn) for i, fn in enumerate(fns)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False)
