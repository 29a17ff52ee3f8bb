"""The router's generation queue: admits requests into one continuously batched decode loop.

Callers (the Serve deployment through the Router actor, or Python code in-process) `submit` a
request and read its tokens from `stream`; one background thread runs the model: it admits waiting
requests between steps (up to the batch limits), prefills them and hands their first tokens out at
once, then runs one step for every live sequence and hands each sequence's token to its reader. So
a stream's first chunk carries the prefill's one token and waits for no decode step of the batch,
and every later chunk carries one step's token (more only when its reader falls behind). A request
whose reader goes away is `cancel`led and leaves the batch at the next step, freeing its slot.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time

from moe_serving import tracing
from router_service.config import BatchLimits
from router_service.errors import QueueFull, RequestTooLarge
from router_service.generation.constraints import GrammarState
from router_service.generation.decoding import DecodeBatch, SamplingParams, Sequence

log = logging.getLogger(__name__)


_DONE = object()


class GenerationScheduler:
    """One decode loop over a `DecodeBatch`, fed by a queue. `lock` (a reusable context manager,
    the Router's `ModelTurn`) serialises model use with the router's other calls (forward,
    moe_forward), which run between steps."""

    def __init__(
        self,
        model,
        eos_token_ids: set[int],
        device,
        lock,
        limits: BatchLimits,
        overlap=None,
        grammar_tokenizer=None,
    ):
        self.batch = DecodeBatch(model, eos_token_ids, device, overlap)
        # () -> llguidance's tokenizer, for requests with a structured output (built on first use)
        self.grammar_tokenizer = grammar_tokenizer
        self.lock = lock
        self.limits = limits
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._outputs: dict[object, queue.SimpleQueue] = {}
        self._cancelled: set[object] = set()
        self._live: set[object] = set()  # submitted, not yet out of the batch
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps_by_batch_size: collections.Counter[int] = collections.Counter()
        self.prefill_batches: collections.Counter[int] = collections.Counter()
        self.tokens_made = 0  # tokens sampled, every sequence, every step and prefill
        self.cancelled = 0  # requests whose reader left before they finished (waiting or running)
        self._token_samples: collections.deque = collections.deque(maxlen=64)

    # ---- the caller's side -----------------------------------------------------------------------

    def submit(
        self, key, prompt: list[int], params: SamplingParams, sink: queue.SimpleQueue | None = None
    ) -> None:
        """Queue a request. Its tokens go to its own queue, read with `stream(key)`, or, with `sink`,
        as (key, item) pairs to a queue shared by many requests, read with `events(sink)`."""
        need = len(prompt) + params.max_new_tokens
        if need > self.limits.max_batch_tokens:
            raise RequestTooLarge(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = {need} "
                f"exceeds the server's limit of {self.limits.max_batch_tokens} tokens per request"
            )
        seq = self._sequence(key, prompt, params)  # a grammar that cannot compile raises here
        with self._cv:
            if key in self._outputs:
                raise ValueError(f"request id {key!r} is already in use")
            if len(self._waiting) >= self.limits.max_waiting:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (max_waiting="
                    f"{self.limits.max_waiting}); retry later"
                )
            self._outputs[key] = (sink, True) if sink is not None else (queue.SimpleQueue(), False)
            self._live.add(key)
            self._waiting.append(seq)
            self._ensure_thread()
            self._cv.notify()

    def _sequence(self, key, prompt: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(prompt, params, key=key)
        if params.grammar is not None:
            if self.grammar_tokenizer is None:
                raise ValueError("this router cannot constrain outputs (no tokenizer for the grammar)")
            seq.grammar = GrammarState(self.grammar_tokenizer(), params.grammar, seq.completion())
        return seq

    def stream(self, key, timeout: float | None = None):
        """Yield (token_ids, finish_reason, logprobs) chunks for `key`: every token ready since the
        last chunk; the last chunk has a finish_reason; logprobs is None, or one
        (logprob, [(token id, logprob), ...]) per token when the request asked for them. Raises the
        loop's error if the batch failed."""
        out, shared = self._outputs[key]
        if shared:
            raise ValueError(f"request {key!r} reports to a shared sink; read it with events()")
        finished = False
        try:
            while True:
                items = _drain(out, timeout)
                tokens, finish, logprobs = [], None, []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item is _DONE:
                        continue
                    token, finish, lp = item
                    tokens.append(token)
                    logprobs.append(lp)
                finished = finish is not None
                yield tokens, finish, (logprobs if any(lp is not None for lp in logprobs) else None)
                if finished:
                    return
        finally:
            if not finished:  # the reader left early, or the batch failed
                self.cancel(key)
            with self._cv:
                self._outputs.pop(key, None)

    def events(self, sink: queue.SimpleQueue, heartbeat_s: float = 1.0):
        """Yield, for every batch of news on `sink`, a list of (key, token_ids, finish_reason, error,
        logprobs) covering all its requests (logprobs: None, or one entry per token, see `stream`): one message per step for many requests instead of one per
        request (what a serving front end multiplexes its streams over). An empty list every
        `heartbeat_s` of silence lets the reader notice a dead writer and vice versa."""
        while True:
            try:
                items = _drain(sink, heartbeat_s)
            except queue.Empty:
                yield []
                continue
            merged: dict = {}
            for key, item in items:
                entry = merged.setdefault(key, [key, [], None, None, None])
                if isinstance(item, BaseException):
                    entry[3] = item
                else:
                    token, finish, lp = item
                    entry[1].append(token)
                    entry[2] = finish
                    if lp is not None:
                        entry[4] = (entry[4] or []) + [lp]
            yield [tuple(e) for e in merged.values()]

    def cancel(self, key) -> None:
        """Stop generating for `key` (its reader left); a no-op for unknown or finished requests."""
        with self._cv:
            if key not in self._live:
                return
            if any(s.key == key for s in self._waiting):
                self._waiting = collections.deque(s for s in self._waiting if s.key != key)
                self._live.discard(key)
                self.cancelled += 1
            else:
                self._cancelled.add(key)
            if self._outputs.get(key, (None, False))[1]:
                del self._outputs[key]  # nobody reads a shared request's news once it is cancelled
            self._cv.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences, read without the lock (a snapshot for load balancing)."""
        return len(self.batch), len(self._waiting)

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        """Tokens made per second over about the last `window_s` (one per sequence per step or
        prefill)."""
        now = time.monotonic()
        samples = self._token_samples
        samples.append((now, self.tokens_made))
        while len(samples) > 2 and now - samples[1][0] > window_s:
            samples.popleft()
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def stats(self) -> dict:
        with self._cv:
            return {
                "running": len(self.batch),
                "waiting": len(self._waiting),
                "cancelled": self.cancelled,
                "steps_by_batch_size": dict(sorted(self.steps_by_batch_size.items())),
                "prefills_by_batch_size": dict(sorted(self.prefill_batches.items())),
                "limits": {
                    "max_batch_size": self.limits.max_batch_size,
                    "max_batch_tokens": self.limits.max_batch_tokens,
                    "max_waiting": self.limits.max_waiting,
                },
            }

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.batch.overlap is not None:
            self.batch.overlap.close()

    # ---- the loop --------------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="generation-loop", daemon=True)
            self._thread.start()

    def _admit(self) -> list[Sequence]:
        """Waiting sequences that fit the batch limits now (in arrival order). Holds self._cv."""
        if not self.batch.can_join():
            return []
        admitted = []
        size, tokens = len(self.batch), self.batch.tokens_in_flight()
        while self._waiting and size < self.limits.max_batch_size:
            s = self._waiting[0]
            need = len(s.prompt) + s.params.max_new_tokens
            if size and tokens + need > self.limits.max_batch_tokens:
                break
            admitted.append(self._waiting.popleft())
            size, tokens = size + 1, tokens + need
        return admitted

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not len(self.batch):
                    self._cv.wait()
                if self._stopping:
                    self._fail_all(RuntimeError("the server is shutting down"))
                    return
                cancelled = {id(s) for s in self.batch.seqs if s.key in self._cancelled}
                for s in self.batch.seqs:
                    if id(s) in cancelled:
                        s.finish_reason = "cancelled"
                        self._cancelled.discard(s.key)
                        self._live.discard(s.key)
                        self.cancelled += 1
                new = self._admit()
            # The prefill's first tokens are handed out before the next decode step, so a stream's
            # first chunk leaves after its prefill (TTFT = queueing + prefill), not one step later.
            if cancelled or new:
                events = self._guarded(new, self._prefill, cancelled, new)
                if events is None:
                    continue
                self._hand_out(events)
            if len(self.batch):
                events = self._guarded([], self._decode)
                if events is not None:
                    self._hand_out(events)

    def _prefill(self, cancelled: set[int], new: list[Sequence]) -> list[tuple]:
        """Evict the cancelled sequences, prefill the new ones; their first tokens' events."""
        events = []
        with self.lock:
            if cancelled:
                self.batch.evict(cancelled)
            if new:
                self.prefill_batches[len(new)] += 1
                self.tokens_made += len(new)
                with tracing.span("prefill", {"sequences": len(new)}):
                    events = self.batch.add(new)
                self.batch.evict(self._finished())
        return events

    def _decode(self) -> list[tuple]:
        """One decode step of the whole batch; its events."""
        with self.lock:
            self.steps_by_batch_size[len(self.batch)] += 1
            self.tokens_made += len(self.batch)
            with tracing.span("decode step", {"sequences": len(self.batch)}):
                events = self.batch.step()
            self.batch.evict(self._finished())
        return events

    def _guarded(self, new: list[Sequence], work, *args) -> list[tuple] | None:
        """work(*args)'s events, or None when it failed: then every sequence in the batch (and
        those of `new` that had not joined it) gets the error, and the batch is emptied."""
        try:
            return work(*args)
        except Exception as e:  # a worker error: every sequence in the batch gets it
            log.exception("generation step failed; failing %d sequences", len(self.batch))
            failed = self.batch.seqs + [s for s in new if s not in self.batch.seqs]
            self.batch.evict({id(s) for s in self.batch.seqs})
            with self._cv:
                for s in failed:
                    self._push(s.key, e)
                    self._live.discard(s.key)
                    self._cancelled.discard(s.key)
            return None

    def _hand_out(self, events: list[tuple]) -> None:
        if not events:
            return
        with self._cv, tracing.span("hand out"):
            for s, token, finish, lp in events:
                self._push(s.key, (token, finish, lp))
                if finish is not None:
                    self._live.discard(s.key)
                    self._cancelled.discard(s.key)

    def _finished(self) -> set[int]:
        return {id(s) for s in self.batch.seqs if s.finish_reason is not None}

    def _push(self, key, item) -> None:
        """Hand one token (or the batch's error) to the request's reader. Holds self._cv."""
        entry = self._outputs.get(key)
        if entry is None or key in self._cancelled:
            return
        out, shared = entry
        if not shared:
            out.put(item)
            return
        out.put((key, item))
        if isinstance(item, BaseException) or item[1] is not None:
            del self._outputs[key]  # its last news: the shared sink has no reader to clean up

    def _fail_all(self, err: BaseException) -> None:
        for s in list(self._waiting) + self.batch.seqs:
            self._push(s.key, err)
        self._waiting.clear()


def _drain(q: queue.SimpleQueue, timeout: float | None) -> list:
    """Everything on `q`: waits up to `timeout` for the first item (queue.Empty if none comes),
    then takes what else is there, so a slow reader gets one batch rather than item by item."""
    items = [q.get(timeout=timeout)]
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def eos_ids(generation_config, config) -> set[int]:
    """The model's end-of-sequence token ids (generation_config first, then config)."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}
