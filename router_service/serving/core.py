"""The ingress core shared by HTTP and gRPC: validate, merge small requests, call the Router actor.

Everything a client can get wrong is checked here, before the router sees it, and raised as a
`ServingError` (HTTP 4xx / gRPC INVALID_ARGUMENT or RESOURCE_EXHAUSTED); errors coming back from
the Router actor are mapped to `ServingError`s in `_as_serving_error`, the one place that knows both.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from ray.exceptions import RayActorError, RayTaskError

from moe_models.spec import ModelSpec
from moe_serving.errors import ServingError, invalid, too_large
from moe_serving.types import GenerateChunk, GenerateParams
from router_service.errors import (
    MembershipBusy,
    NoCapacityError,
    QueueFull,
    RequestTooLarge,
    ScaleError,
    WorkerError,
)
from router_service.generation.decoding import MAX_LOGPROBS
from router_service.inputs import check_attention_mask, check_moe_input, check_token_ids
from router_service.serving.chat import chat_prompt_ids
from router_service.serving.detokenize import CompletionText
from router_service.serving.settings import ServingSettings

log = logging.getLogger(__name__)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _as_serving_error(e: BaseException) -> ServingError:
    if isinstance(e, ServingError):
        return e
    if isinstance(e, RequestTooLarge):
        return too_large(str(e))
    if isinstance(e, QueueFull | ScaleError | NoCapacityError):
        return ServingError("unavailable", str(e))
    if isinstance(e, MembershipBusy):
        return ServingError("failed_precondition", str(e))
    if isinstance(e, ValueError):
        return invalid(str(e))
    if isinstance(e, WorkerError):
        return ServingError("internal", str(e))
    return ServingError("internal", f"{type(e).__name__}: {_first_line(e)}")


# ---- validation ----------------------------------------------------------------------------------


@contextlib.contextmanager
def invalid_on_value_error():
    """The shared input checks (router_service.inputs) raise ValueError; here that is a 400."""
    try:
        yield
    except ValueError as e:
        raise invalid(str(e)) from None


def check_forward_request(ids: torch.Tensor, mask: torch.Tensor | None, spec: ModelSpec):
    """(ids, mask) as int64, checked as the Router would, and a float mask refused outright."""
    if mask is not None and mask.dtype.is_floating_point:
        raise invalid("attention_mask must hold only integer 0 (padding) and 1 (token)")
    with invalid_on_value_error():
        ids = check_token_ids(ids, spec.vocab_size)
        return ids, check_attention_mask(mask, ids)


def check_moe_request(layer: int, hidden: torch.Tensor, spec: ModelSpec) -> None:
    """The Router's MoE-layer checks, and finite values (one NaN row would poison a merged batch)."""
    with invalid_on_value_error():
        check_moe_input(layer, hidden, spec, "hidden_states")
    if not torch.isfinite(hidden).all():
        raise invalid("hidden_states holds NaN or infinite values")


def check_size(tokens: int, limit: int, what: str) -> None:
    if tokens > limit:
        raise too_large(f"{what} has {tokens} tokens; this server takes at most {limit} per request")


MAX_N = 16  # choices per request
# The router's event stream sends a heartbeat every second; after this long without one, the pump
# asks the router which process it is (see IngressCore._read_events).
STREAM_SILENCE_S = 2.0
HEALTH_PROBE_TIMEOUT_S = 5.0


class RouterReplaced(Exception):
    """The router process an event stream came from is gone, though Ray did not end the stream."""


MAX_STOP = 16  # stop strings per request


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_generate_params(p: GenerateParams) -> None:
    forms = [x is not None for x in (p.prompt, p.prompt_token_ids, p.messages)]
    if sum(forms) != 1:
        raise invalid("give exactly one of prompt (text), prompt token ids and chat messages")
    if not _is_int(p.max_tokens) or p.max_tokens < 1:
        raise invalid(f"max_tokens must be a positive integer, got {p.max_tokens!r}")
    if not _is_number(p.temperature) or not 0.0 <= p.temperature <= 100.0:
        raise invalid(f"temperature must be a number in [0, 100], got {p.temperature!r}")
    if not _is_number(p.top_p) or not 0.0 < p.top_p <= 1.0:
        raise invalid(f"top_p must be in (0, 1], got {p.top_p!r}")
    if p.seed is not None and (not _is_int(p.seed) or p.seed < 0):
        raise invalid(f"seed must be a non-negative integer, got {p.seed!r}")
    if not _is_int(p.n) or not 1 <= p.n <= MAX_N:
        raise invalid(f"n must be an integer in [1, {MAX_N}], got {p.n!r}")
    if not isinstance(p.stop, list | tuple) or not all(isinstance(x, str) and x for x in p.stop):
        raise invalid(f"stop must be a string or a list of non-empty strings, got {p.stop!r}")
    if len(p.stop) > MAX_STOP:
        raise invalid(f"stop takes at most {MAX_STOP} strings, got {len(p.stop)}")
    if not isinstance(p.stop_token_ids, list | tuple) or not all(_is_int(t) for t in p.stop_token_ids):
        raise invalid(f"stop_token_ids must be a list of integers, got {p.stop_token_ids!r}")
    if p.logprobs is not None and (not _is_int(p.logprobs) or not 0 <= p.logprobs <= MAX_LOGPROBS):
        raise invalid(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {p.logprobs!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if not _is_number(value) or not -2.0 <= value <= 2.0:
            raise invalid(f"{name} must be a number in [-2, 2], got {value!r}")
    if not _is_number(p.repetition_penalty) or not 0.0 < p.repetition_penalty <= 10.0:
        raise invalid(f"repetition_penalty must be a number in (0, 10], got {p.repetition_penalty!r}")
    if not _is_int(p.min_tokens) or not 0 <= p.min_tokens <= p.max_tokens:
        raise invalid(
            f"min_tokens must be an integer in [0, max_tokens={p.max_tokens}], got {p.min_tokens!r}"
        )
    if not isinstance(p.ignore_eos, bool):
        raise invalid(f"ignore_eos must be true or false, got {p.ignore_eos!r}")


def sampling_options(p: GenerateParams) -> dict:
    """The router's SamplingParams fields beyond max_new_tokens, temperature, top_p and seed."""
    return {
        "presence_penalty": float(p.presence_penalty),
        "frequency_penalty": float(p.frequency_penalty),
        "repetition_penalty": float(p.repetition_penalty),
        "min_tokens": int(p.min_tokens),
        "ignore_eos": bool(p.ignore_eos),
        "stop_token_ids": tuple(int(t) for t in p.stop_token_ids),
        "logprobs": p.logprobs,
    }


async def merge_streams(streams: list) -> AsyncIterator:
    """(k, item) from async iterators streams[k] as each item comes; the first error ends all of
    them. Leaving early (or an error) closes every stream (cancelling their generations)."""
    news: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(k, stream):
        try:
            async for item in stream:
                news.put_nowait((k, item, None))
        except Exception as e:  # handed to the reader, who raises it
            news.put_nowait((k, None, e))
        finally:
            news.put_nowait((k, end, None))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            k, item, error = await news.get()
            if error is not None:
                raise error
            if item is end:
                left -= 1
                continue
            yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            if hasattr(s, "aclose"):
                await s.aclose()


# ---- merging concurrent requests into one router call ---------------------------------------------


def merge_forward(requests: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """Stack [B_i, S_i] id batches into one right-padded [sum B, max S] batch with its mask.

    Right padding leaves every real token's logits as they are (attention is causal and the mask
    hides the padding from nobody who comes before it).
    """
    width = max(ids.shape[1] for ids, _ in requests)
    rows = sum(ids.shape[0] for ids, _ in requests)
    ids_out = torch.zeros(rows, width, dtype=torch.long)
    mask_out = torch.zeros(rows, width, dtype=torch.long)
    r = 0
    for ids, mask in requests:
        b, s = ids.shape
        ids_out[r : r + b, :s] = ids
        mask_out[r : r + b, :s] = 1 if mask is None else mask
        r += b
    needs_mask = any(m is not None for _, m in requests) or any(i.shape[1] != width for i, _ in requests)
    return ids_out, (mask_out if needs_mask else None)


def split_forward(logits: torch.Tensor, requests) -> list[torch.Tensor]:
    out, r = [], 0
    for ids, _ in requests:
        b, s = ids.shape
        out.append(logits[r : r + b, :s].clone())
        r += b
    return out


def token_groups(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive request indices grouped so that each group's tokens stay within `limit`."""
    groups, cur, total = [], [], 0
    for i, n in enumerate(sizes):
        if cur and total + n > limit:
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        groups.append(cur)
    return groups


# ---- the core --------------------------------------------------------------------------------------


def _merge_news(first: tuple, news: asyncio.Queue) -> tuple[tuple, tuple | None]:
    """`first` and the token news already queued behind it, as one (tokens, finish, error, logprobs),
    and an error item met on the way (to be handled next, after these tokens went out), or None.

    A stream that fell a step or more behind sends one chunk for all of it, not one per step (each
    chunk costs the ingress, the Serve proxy and the client their own work), at no added latency."""
    tokens, finish, error, logprobs = first
    held = None
    while error is None and finish is None and not news.empty():
        item = news.get_nowait()
        if item[2] is not None:
            held = item
            break
        more, finish, _, lps = item
        if logprobs is not None or lps is not None:
            logprobs = (logprobs or [None] * len(tokens)) + (lps or [None] * len(more))
        tokens = list(tokens) + list(more)
    return (tokens, finish, error, logprobs), held


@dataclass
class OpenGeneration:
    """A generation the ingress is streaming: what it needs to re-submit it to a restarted router."""

    prompt: list[int]
    params: GenerateParams
    news: asyncio.Queue
    tokens: list[int] = field(default_factory=list)
    # The router process that accepted it (None: none yet); submissions take turns on the lock, so
    # a request is submitted at most once to each router process.
    incarnation: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class IngressCore:
    """Validation and Router calls shared by the HTTP deployment (and through it, gRPC).

    `router` is the Router actor handle; `tokenizer` a transformers tokenizer or None (then only
    token-id prompts are accepted).

    A Router actor that dies restarts (Ray re-creates it, and it reattaches to its workers); calls
    that failed on the dead one are made again once it answers, and every open generation is
    re-submitted with the tokens it already streamed appended to its prompt, so its client sees the
    stream go on, neither losing nor repeating a token. Past `settings.router_restart_timeout_s`
    without a router, requests fail as unavailable (HTTP 503 / gRPC UNAVAILABLE).
    """

    def __init__(self, router, spec: ModelSpec, tokenizer, settings: ServingSettings):
        self.router = router
        self.spec = spec
        self.tokenizer = tokenizer
        self.settings = settings
        self._subscriber = uuid.uuid4().hex  # this replica's name for its generation stream
        self._open: dict[str, OpenGeneration] = {}
        self._pump_task: asyncio.Task | None = None
        self._back: asyncio.Future | None = None  # set while waiting for a restarted router
        self._suspect = asyncio.Event()  # a submission met a dead router: the pump checks at once
        self._incarnation: str | None = None  # the router process the event stream last came from
        self.router_restarts = 0  # restarts this replica saw (metrics)
        self.stopping = False  # set by stop(): the router going away is then expected, not a fault

    def stop(self) -> None:
        """The replica is stopping and takes the router with it: the event stream's end is not a
        router crash to wait out and recover from (nor to log as one)."""
        self.stopping = True
        if self._pump_task is not None:
            stopped = ServingError("unavailable", "the server is stopping")
            with contextlib.suppress(RuntimeError):  # its loop already closed
                loop = self._pump_task.get_loop()
                loop.call_soon_threadsafe(self._pump_task.cancel)
                loop.call_soon_threadsafe(self._fail_open, stopped)  # any stream still open ends now

    # ---- calling the router, across its restarts --------------------------------------------------

    async def call(self, method: str, *args):
        """One router call; if the router actor died, wait for it to be back and call again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.router_restart_timeout_s
        while True:
            try:
                with _raise_actor_errors():
                    return await getattr(self.router, method).remote(*args)
            except RayActorError as e:
                if loop.time() > deadline:
                    raise ServingError(
                        "unavailable", f"the router is not running: {_first_line(e)}"
                    ) from None
                await self._router_back()

    async def _router_back(self) -> None:
        """Wait until the router answers again (one wait shared by every caller); raises
        ServingError("unavailable") when it does not within the restart timeout."""
        if self._back is None or self._back.done():
            self._back = asyncio.ensure_future(self._wait_for_router())
        ok = await asyncio.shield(self._back)
        if not ok:
            raise ServingError(
                "unavailable",
                f"the router actor died and was not back within {self.settings.router_restart_timeout_s:g}s",
            )

    async def _wait_for_router(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.router_restart_timeout_s
        log.warning("the router actor died; waiting for it to restart")
        while loop.time() < deadline:
            try:
                # Calls to a restarting actor wait for it; one to a dead one fails at once.
                await asyncio.wait_for(self.router.health.remote(), timeout=max(1.0, deadline - loop.time()))
                self.router_restarts += 1
                log.warning("the router actor is back")
                return True
            except (RayActorError, asyncio.TimeoutError, RayTaskError):
                await asyncio.sleep(0.5)
        return False

    # ---- forward and MoE-layer requests ----------------------------------------------------------

    async def forward_many(self, requests: list[tuple[torch.Tensor, torch.Tensor | None]]):
        """One router call per token-limited group of already validated requests."""
        results: list = [None] * len(requests)
        sizes = [ids.numel() for ids, _ in requests]
        for group in token_groups(sizes, self.settings.max_batch_tokens):
            reqs = [requests[i] for i in group]
            ids, mask = merge_forward(reqs)
            logits = await self.call("forward", ids, mask)
            for i, out in zip(group, split_forward(logits, reqs), strict=True):
                results[i] = out
        return results

    async def moe_many(self, requests: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Requests for the same layer and dtype share one router call (rows concatenated)."""
        results: list = [None] * len(requests)
        by_key: dict[tuple, list[int]] = {}
        for i, (layer, hidden) in enumerate(requests):
            by_key.setdefault((layer, hidden.dtype), []).append(i)
        for (layer, _), idx in by_key.items():
            sizes = [requests[i][1].numel() // self.spec.hidden_size for i in idx]
            for group in token_groups(sizes, self.settings.max_batch_tokens):
                members = [idx[g] for g in group]
                flat = [requests[i][1].reshape(-1, self.spec.hidden_size) for i in members]
                out = await self.call("moe_forward", layer, torch.cat(flat))
                for i, part in zip(members, out.split([f.shape[0] for f in flat]), strict=True):
                    results[i] = part.reshape(requests[i][1].shape).clone()
        return results

    # ---- generation --------------------------------------------------------------------------------

    def prompt_ids(self, p: GenerateParams) -> list[int]:
        """The request's prompt as token ids (text tokenized, messages rendered with the chat
        template), every parameter checked: a ServingError (4xx) for anything wrong."""
        check_generate_params(p)
        if p.stop and self.tokenizer is None:
            raise invalid("this model has no tokenizer, so it cannot match stop strings; use stop_token_ids")
        if p.messages is not None:
            ids = chat_prompt_ids(self.tokenizer, p.messages)
        elif p.prompt is not None:
            if not isinstance(p.prompt, str):
                raise invalid(f"prompt must be a string, got {type(p.prompt).__name__}")
            if self.tokenizer is None:
                raise invalid("this model has no tokenizer; send prompt token ids instead of text")
            ids = self.tokenizer.encode(p.prompt, add_special_tokens=True)
        else:
            ids = p.prompt_token_ids
            if not isinstance(ids, list | tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise invalid("prompt token ids must be a list of integers")
            ids = list(ids)
        with invalid_on_value_error():
            check_token_ids([ids], self.spec.vocab_size, "prompt token ids")
            if p.stop_token_ids:
                check_token_ids([list(p.stop_token_ids)], self.spec.vocab_size, "stop_token_ids")
        check_size(len(ids) + p.max_tokens, self.settings.max_request_tokens, "prompt + max_tokens")
        return ids

    async def generate(self, p: GenerateParams) -> AsyncIterator[GenerateChunk]:
        """Stream the request's `n` choices (their chunks interleaved, each with its `index`);
        leaving early (client gone) cancels them in the router. Choice i of a seeded request uses
        seed + i, so each is reproducible and they differ from each other.

        Tokens arrive through the replica's one multiplexed `generation_events` stream (see
        `_pump`), not one Ray stream per request; the n copies are separate sequences in the
        router's continuous batch, so they run together.
        """
        ids = self.prompt_ids(p)
        if p.n == 1:
            async with contextlib.aclosing(self._generate_one(ids, p, 0)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        copies = [
            self._generate_one(ids, dataclasses.replace(p, seed=None if p.seed is None else p.seed + i), i)
            for i in range(p.n)
        ]
        async with contextlib.aclosing(merge_streams(copies)) as chunks:
            async for _, chunk in chunks:
                yield chunk

    async def _generate_one(
        self, ids: list[int], p: GenerateParams, index: int
    ) -> AsyncIterator[GenerateChunk]:
        request_id = uuid.uuid4().hex
        req = OpenGeneration(ids, p, asyncio.Queue())
        self._open[request_id] = req
        text = CompletionText(self.tokenizer, ids, p.stop, p.stop_token_ids, p.logprobs is not None)
        finished = router_finished = False
        try:
            self._ensure_pump()
            await self._submit_first(request_id, req)
            held = None
            while not finished:
                item, held = _merge_news(held or await req.news.get(), req.news)
                tokens, finish, error, logprobs = item
                if error is not None:
                    raise _as_serving_error(error)
                router_finished = finish is not None
                tokens, delta, lps, finish = text.feed(tokens, finish, logprobs)
                req.tokens += tokens
                finished = finish is not None
                yield GenerateChunk(
                    token_ids=tokens,
                    text=delta,
                    finish_reason=finish,
                    prompt_tokens=len(ids),
                    completion_tokens=len(req.tokens),
                    index=index,
                    logprobs=lps,
                )
        finally:
            self._open.pop(request_id, None)
            if not router_finished:  # the client left, or a stop string ended the text here
                self.router.cancel_generation.remote(request_id)

    async def _submit_first(self, request_id: str, req: OpenGeneration) -> None:
        """Submit a new request; when the router is dead (restarting), wait for it and submit there,
        unless the pump has re-submitted it meanwhile."""
        while True:
            try:
                async with req.lock:
                    if req.incarnation is None:
                        await self._submit(request_id, req)
                return
            except RayActorError:
                self._suspect.set()  # the pump's stream may be dead too, and Ray may not say so
                await self._router_back()

    async def _submit(self, request_id: str, req: OpenGeneration) -> None:
        """Submit (or re-submit, after a router restart: prompt + the tokens already streamed), under
        `req.lock`; records the router process that accepted it."""
        p, done = req.params, len(req.tokens)
        try:
            with _raise_actor_errors():
                req.incarnation = await self.router.submit_generation.remote(
                    request_id,
                    req.prompt + req.tokens,
                    p.max_tokens - done,
                    float(p.temperature),
                    float(p.top_p),
                    p.seed,
                    self._subscriber,
                    done,
                    **sampling_options(p),
                )
        except ServingError as e:
            if "already in use" not in e.message:
                raise
            # Only this replica knows the (random) id: an earlier submission of ours got there.
            req.incarnation = self._incarnation

    def _ensure_pump(self) -> None:
        if self._pump_task is None or self._pump_task.done():
            # Started in an empty context, not the current request's: Serve cancels the Ray calls a
            # request made when that request is cancelled, and the pump serves every request.
            loop = asyncio.get_running_loop()
            self._pump_task = contextvars.Context().run(loop.create_task, self._pump())

    async def _pump(self) -> None:
        """Read the router's event stream for this replica and hand each request its news; when the
        router dies, wait for its restart and re-submit every open request."""
        while True:
            try:
                await self._read_events()
            except (RayActorError, RouterReplaced) as e:
                if self.stopping:
                    return
                log.warning("generation event stream lost (%s)", _first_line(e))
                try:
                    await self._router_back()  # the new stream's first message re-submits
                except (ServingError, RayActorError) as err:
                    self._fail_open(err)
                    return
            except Exception as e:  # anything else: every open stream learns it
                log.warning("generation event stream ended (%s: %s)", type(e).__name__, _first_line(e))
                self._fail_open(e)
                return

    async def _read_events(self) -> None:
        """One `generation_events` stream, read until it ends. Each message names the router process
        it comes from: the first from a process other than the last one's (a restarted router)
        re-submits the open requests that process has not accepted.

        Raises RayActorError when Ray says the router died, and RouterReplaced when the stream went
        silent (no heartbeat for STREAM_SILENCE_S, or a submission met a dead router) and the router
        says it is not the process the stream came from: Ray does not always end a stream whose
        actor died and restarted (ray-project/ray#43914), and a stream nobody reads leaves every
        open request, and every one submitted to the restarted router, hanging."""
        refs = self.router.generation_events.options(num_returns="streaming").remote(self._subscriber)
        source = None  # the router process this stream comes from, once it has said
        self._suspect.clear()
        with _raise_actor_errors():
            while True:
                item = asyncio.ensure_future(refs.__anext__())
                try:
                    while True:
                        suspect = asyncio.ensure_future(self._suspect.wait())
                        done, _ = await asyncio.wait(
                            {item, suspect}, timeout=STREAM_SILENCE_S, return_when=asyncio.FIRST_COMPLETED
                        )
                        suspect.cancel()
                        if item in done:
                            break
                        self._suspect.clear()
                        await self._check_stream(source)
                    ref = item.result()
                except StopAsyncIteration:
                    return
                finally:
                    if not item.done():
                        item.cancel()
                source, events = await ref
                for request_id, tokens, finish, error, logprobs in events:
                    req = self._open.get(request_id)
                    if req is not None:
                        req.news.put_nowait((tokens, finish, error, logprobs))
                if source != self._incarnation:
                    restarted = self._incarnation is not None
                    self._incarnation = source
                    await self._resubmit_to(source, restarted)

    async def _check_stream(self, source: str | None) -> None:
        """RouterReplaced when the event stream cannot be coming from the router that answers now:
        it came from another process, or it has not said yet and the router reads no stream of this
        replica. Nothing when it can (the stream is slow; a second stream would split the news), nor
        when the router does not answer in time (a busy router: the next silence asks again)."""
        try:
            with _raise_actor_errors():
                now = await asyncio.wait_for(
                    self.router.event_stream_status.remote(self._subscriber), timeout=HEALTH_PROBE_TIMEOUT_S
                )
        except asyncio.TimeoutError:
            return
        if source is not None and now["incarnation"] != source:
            raise RouterReplaced(f"the router restarted (process {source[:8]} -> {now['incarnation'][:8]})")
        if source is None and not now["reading"]:
            raise RouterReplaced("the event stream reached no live router process")

    async def _resubmit_to(self, incarnation: str, restarted: bool) -> None:
        """Re-submit every open request that router process `incarnation` has not accepted (prompt +
        the tokens already streamed); one it cannot take fails with the cause."""
        stale = [(rid, req) for rid, req in list(self._open.items()) if req.incarnation != incarnation]
        if restarted:
            log.warning("the router restarted; re-submitting %d open generations", len(stale))
        for request_id, req in stale:
            try:
                async with req.lock:
                    if req.incarnation != incarnation and request_id in self._open:
                        await self._submit(request_id, req)
            except RayActorError:
                self._suspect.set()  # died again: the stream will end, and its successor re-submits
                return
            except ServingError as e:
                req.news.put_nowait(([], None, e, None))

    def _fail_open(self, e: BaseException) -> None:
        err = (
            e if isinstance(e, ServingError) else ServingError("unavailable", f"generation stream lost: {e}")
        )
        for req in list(self._open.values()):
            req.news.put_nowait(([], None, err, None))

    # ---- cluster ------------------------------------------------------------------------------------

    async def cluster_state(self) -> dict:
        return await self.call("cluster_state")

    async def scale(self, num_workers: int) -> dict:
        return await self.call("scale", num_workers)

    async def rebalance(self) -> dict:
        return await self.call("rebalance")

    async def health(self) -> dict:
        """The router's health; not serving when it does not answer within a few seconds."""
        try:
            with _raise_actor_errors():
                return await asyncio.wait_for(self.router.health.remote(), timeout=5.0)
        except (RayActorError, asyncio.TimeoutError) as e:
            why = "does not answer" if isinstance(e, asyncio.TimeoutError) else "is not running"
            return {"serving": False, "reason": f"the router {why} ({type(e).__name__})"}
        except ServingError as e:
            return {"serving": False, "reason": e.message}


@contextlib.contextmanager
def _raise_actor_errors():
    """Router task errors as ServingErrors; RayActorError (the router died) passes through, so the
    caller can wait for the restart."""
    try:
        yield
    except RayTaskError as e:
        raise _as_serving_error(e.cause if e.cause is not None else e) from None
