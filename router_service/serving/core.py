"""The ingress core shared by HTTP and gRPC: validate, merge small requests, call the Router actor.

Everything a client can get wrong is checked here, before the router sees it, and raised as a
`ServingError` (HTTP 4xx / gRPC INVALID_ARGUMENT or RESOURCE_EXHAUSTED); errors coming back from
the Router actor are mapped to `ServingError`s in `_as_serving_error`, the one place that knows both.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from moe_models.spec import ModelSpec
from moe_serving.errors import ServingError, invalid, too_large
from moe_serving.types import GenerateChunk, GenerateParams, StructuredOutput
from router_service.errors import (
    MembershipBusy,
    NoCapacityError,
    QueueFull,
    RequestTooLarge,
    ScaleError,
    WorkerError,
)
from router_service.generation.constraints import check_grammar, compile_grammar, hf_grammar_tokenizer
from router_service.generation.decoding import MAX_LOGPROBS
from router_service.inputs import check_attention_mask, check_moe_input, check_token_ids
from router_service.runtime.liveness import wait_closed
from router_service.runtime.worker_actor import NAMESPACE
from router_service.serving.chat import chat_prompt_ids
from router_service.serving.detokenize import CompletionText
from router_service.serving.router_links import (
    HEALTH_PROBE_TIMEOUT_S,
    STREAM_SILENCE_S,
    OpenGeneration,
    RouterLink,
    RouterReplaced,
    pick,
)
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


MAX_STOP = 16  # stop strings per request


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_generate_params(p: GenerateParams) -> None:
    forms = [x is not None for x in (p.prompt, p.prompt_token_ids, p.messages)]
    if sum(forms) != 1:
        raise invalid("give exactly one of prompt (text), prompt token ids and chat messages")
    # max_tokens None: up to the context (chat's default), resolved with the prompt's length
    if p.max_tokens is not None and (not _is_int(p.max_tokens) or p.max_tokens < 1):
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
    if not _is_int(p.min_tokens) or not 0 <= p.min_tokens <= (p.max_tokens or p.min_tokens):
        raise invalid(
            f"min_tokens must be an integer in [0, max_tokens={p.max_tokens}], got {p.min_tokens!r}"
        )
    if not isinstance(p.ignore_eos, bool):
        raise invalid(f"ignore_eos must be true or false, got {p.ignore_eos!r}")
    if not _is_int(p.top_k) or p.top_k < -1:
        raise invalid(f"top_k must be an integer >= 1, or 0 or -1 for all tokens, got {p.top_k!r}")
    if not _is_number(p.min_p) or not 0.0 <= p.min_p <= 1.0:
        raise invalid(f"min_p must be a number in [0, 1], got {p.min_p!r}")
    if p.logit_bias is not None:
        if not isinstance(p.logit_bias, dict) or len(p.logit_bias) > MAX_LOGIT_BIAS:
            raise invalid(
                f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids -> bias, got {p.logit_bias!r}"
            )
        for token, bias in p.logit_bias.items():
            if not _is_int(token) or not _is_number(bias) or not -100.0 <= bias <= 100.0:
                raise invalid(f"logit_bias maps token ids to numbers in [-100, 100], got {token!r}: {bias!r}")
    if p.allowed_token_ids is not None and (
        not isinstance(p.allowed_token_ids, list | tuple)
        or not p.allowed_token_ids
        or not all(_is_int(t) for t in p.allowed_token_ids)
    ):
        raise invalid(f"allowed_token_ids must be a non-empty list of token ids, got {p.allowed_token_ids!r}")
    if p.structured is not None and not isinstance(p.structured, StructuredOutput):
        raise invalid(f"structured output must be a StructuredOutput, got {type(p.structured).__name__}")


MAX_LOGIT_BIAS = 1024  # token ids one request may bias


def sampling_options(p: GenerateParams, grammar: str | None = None) -> dict:
    """The router's SamplingParams fields beyond max_new_tokens, temperature, top_p and seed;
    `grammar`: the structured output, compiled (`IngressCore.grammar`)."""
    return {
        "top_k": max(int(p.top_k), 0),
        "min_p": float(p.min_p),
        "logit_bias": tuple(sorted((int(t), float(b)) for t, b in (p.logit_bias or {}).items())),
        "allowed_token_ids": None if p.allowed_token_ids is None else tuple(p.allowed_token_ids),
        "grammar": grammar,
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


class IngressCore:
    """Validation and Router calls shared by the HTTP deployment (and through it, gRPC).

    `router`: a Router actor handle (the only router, or the one to use before the controller has
    listed them); `controller`: the cluster's controller actor, or None (then `router` is the only
    router). `tokenizer`: a transformers tokenizer or None (then only token-id prompts are accepted).

    Generation requests are spread over the routers by load (`router_links.py`); a router that dies
    moves its open streams to the others at once, or, with no other router, they wait for it to
    restart (Ray re-creates it, and it attaches to the workers again) and go on there. Either way
    the client sees its stream go on, neither losing nor repeating a token. Other calls go to the
    first live router, and are made again on another (or the restarted one) when it dies. Past
    `settings.router_restart_timeout_s` without any router, requests fail as unavailable (HTTP 503 /
    gRPC UNAVAILABLE).
    """

    MEMBERSHIP_REFRESH_S = 1.0  # how often the router list is read from the controller

    def __init__(self, router, spec: ModelSpec, tokenizer, settings: ServingSettings, controller=None):
        self.spec = spec
        self.tokenizer = tokenizer
        self._grammar_tokenizer = None  # llguidance's view of it, built on the first structured output
        self._grammars: collections.OrderedDict[str, str] = collections.OrderedDict()  # see grammar()
        self.settings = settings
        self.controller = controller
        self._subscriber = uuid.uuid4().hex  # this replica's name for its generation streams
        self._open: dict[str, OpenGeneration] = {}
        self.links: dict[str, RouterLink] = {"0": RouterLink("0", router)}
        self._tasks: set[asyncio.Task] = set()  # the pumps and the membership watch
        self._watch_task: asyncio.Task | None = None
        self._back: dict[str, asyncio.Future] = {}  # router id -> the wait for its restart
        self.router_restarts = 0  # router losses this replica saw (metrics)
        self.streams_moved = 0  # open streams moved to another router (metrics)
        self.stopping = False  # set by stop(): routers going away is then expected, not a fault

    @property
    def router(self):
        """The first live router's handle (calls other than generation)."""
        return self._primary().handle

    def _primary(self) -> RouterLink:
        live = [lk for lk in self.links.values() if lk.alive] or list(self.links.values())
        return min(live, key=lambda lk: int(lk.id) if lk.id.isdigit() else 0)

    def stop(self) -> None:
        """The replica is stopping and takes the routers with it: the event streams' end is not a
        router crash to wait out and recover from (nor to log as one)."""
        self.stopping = True
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            stopped = ServingError("unavailable", "the server is stopping")
            with contextlib.suppress(RuntimeError):  # its loop already closed
                loop = tasks[0].get_loop()
                for t in tasks:
                    loop.call_soon_threadsafe(t.cancel)
                loop.call_soon_threadsafe(self._fail_open, stopped)  # any stream still open ends now

    # ---- the routers ------------------------------------------------------------------------------

    def _ensure_pumps(self) -> None:
        """Start what reads the routers: a pump per router, and the membership watch."""
        for link in self.links.values():
            if link.pump_task is None or link.pump_task.done():
                link.pump_task = self._background(self._pump(link))
        if self.controller is not None and (self._watch_task is None or self._watch_task.done()):
            self._watch_task = self._background(self._watch())

    def _background(self, coro) -> asyncio.Task:
        # Started in an empty context, not the current request's: Serve cancels the Ray calls a
        # request made when that request is cancelled, and these serve every request.
        loop = asyncio.get_running_loop()
        task = contextvars.Context().run(loop.create_task, coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def refresh_routers(self) -> None:
        """Read the router list from the controller: new routers get a link (and a pump), removed
        ones are drained (nothing new goes there; their open streams finish or move)."""
        if self.controller is None:
            return
        try:
            infos = await asyncio.wait_for(self.controller.routers.remote(), timeout=HEALTH_PROBE_TIMEOUT_S)
        except (RayActorError, RayTaskError, asyncio.TimeoutError):
            return  # the controller is away: the routers we know keep serving
        listed = {}
        for info in infos:
            listed[info["router_id"]] = info
            if info["router_id"] not in self.links:
                try:
                    handle = ray.get_actor(info["name"], namespace=NAMESPACE)
                except ValueError:
                    continue
                self.links[info["router_id"]] = RouterLink(info["router_id"], handle)
        for rid, link in list(self.links.items()):
            link.draining = rid not in listed or listed[rid]["draining"]
            if rid not in listed and not any(req.link is link for req in self._open.values()):
                del self.links[rid]  # removed, and nothing of ours left on it
                if link.pump_task is not None:
                    link.pump_task.cancel()
        self._ensure_pumps()

    async def _watch(self) -> None:
        while not self.stopping:
            await self.refresh_routers()
            await asyncio.sleep(self.MEMBERSHIP_REFRESH_S)

    async def call(self, method: str, *args):
        """One router call; if the router died, make it again on another live router, or on the
        same one once it is back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.router_restart_timeout_s
        while True:
            link = self._primary()
            try:
                with _raise_actor_errors():
                    return await getattr(link.handle, method).remote(*args)
            except RayActorError as e:
                if loop.time() > deadline:
                    raise ServingError("unavailable", f"no router is running: {_first_line(e)}") from None
                link.alive = False
                link.suspect.set()
                if not any(lk.alive for lk in self.links.values()):
                    await self._router_back(link)

    async def _router_back(self, link: RouterLink) -> None:
        """Wait until router `link` answers again (one wait shared by every caller); raises
        ServingError("unavailable") when it does not within the restart timeout."""
        back = self._back.get(link.id)
        if back is None or back.done():
            back = self._back[link.id] = asyncio.ensure_future(self._wait_for_router(link))
        if not await asyncio.shield(back):
            raise ServingError(
                "unavailable",
                f"router {link.id} died and was not back within {self.settings.router_restart_timeout_s:g}s",
            )

    async def _wait_for_router(self, link: RouterLink) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.router_restart_timeout_s
        log.warning("router %s died; waiting for it to restart", link.id)
        while loop.time() < deadline and not self.stopping:
            try:
                # Calls to a restarting actor wait for it; one to a dead one fails at once.
                await asyncio.wait_for(link.handle.health.remote(), timeout=max(1.0, deadline - loop.time()))
                self.router_restarts += 1
                link.alive = True
                log.warning("router %s is back", link.id)
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

    def prompt_ids(self, p: GenerateParams, generate: bool = True) -> list[int]:
        """The request's prompt as token ids (text tokenized, messages rendered with the chat
        template), every parameter checked: a ServingError (4xx) for anything wrong. `generate`
        False (echo with max_tokens 0): the prompt alone must fit the context."""
        check_generate_params(p)
        if p.stop and self.tokenizer is None:
            raise invalid("this model has no tokenizer, so it cannot match stop strings; use stop_token_ids")
        if p.messages is not None:
            ids = chat_prompt_ids(self.tokenizer, p.messages, p.tools)
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
            for name in ("stop_token_ids", "allowed_token_ids", "logit_bias"):
                given = getattr(p, name)
                if given:
                    check_token_ids([list(given)], self.spec.vocab_size, name)
        # the context (400), then the size (413)
        self.settings.completion_tokens(len(ids), p.max_tokens if generate else 0)
        self.grammar(p)  # a bad schema / regex / grammar is a 400 here, before any stream starts
        return ids

    GRAMMARS_KEPT = 256  # compiled structured outputs remembered (clients repeat their schemas)

    def grammar(self, p: GenerateParams) -> str | None:
        """The request's structured output as an llguidance grammar, checked against the model's
        tokenizer (None without one); a 400 naming what is wrong with the schema, regex, choices
        or grammar. Compiled once per distinct structured output (`prompt_ids` checks it, and the
        generation asks again; clients send the same tool or response schema many times)."""
        if p.structured is None:
            return None
        if self.tokenizer is None:
            raise invalid("this model has no tokenizer, so it cannot constrain its output")
        # property order matters (the output follows it): not sorted
        key = json.dumps(dataclasses.asdict(p.structured), default=repr)
        grammar = self._grammars.get(key)
        if grammar is not None:
            self._grammars.move_to_end(key)
            return grammar
        try:
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = hf_grammar_tokenizer(self.tokenizer, self.spec.vocab_size)
            grammar = compile_grammar(p.structured)
            check_grammar(grammar, self._grammar_tokenizer)
        except ValueError as e:
            raise invalid(f"structured output ({p.structured.kind}): {e}") from None
        self._grammars[key] = grammar
        if len(self._grammars) > self.GRAMMARS_KEPT:
            self._grammars.popitem(last=False)
        return grammar

    async def generate(self, p: GenerateParams) -> AsyncIterator[GenerateChunk]:
        """Stream the request's `n` choices (their chunks interleaved, each with its `index`);
        leaving early (client gone) cancels them in the router. Choice i of a seeded request uses
        seed + i, so each is reproducible and they differ from each other.

        Tokens arrive through each router's one multiplexed `generation_events` stream per replica
        (see `_pump`), not one Ray stream per request; the n copies are separate sequences, spread
        over the routers like any other requests.
        """
        ids = self.prompt_ids(p)
        p = dataclasses.replace(p, max_tokens=self.settings.completion_tokens(len(ids), p.max_tokens))
        options = sampling_options(p, self.grammar(p))
        if p.n == 1:
            async with contextlib.aclosing(self._generate_one(ids, p, 0, options)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        copies = [
            self._generate_one(
                ids, dataclasses.replace(p, seed=None if p.seed is None else p.seed + i), i, options
            )
            for i in range(p.n)
        ]
        async with contextlib.aclosing(merge_streams(copies)) as chunks:
            async for _, chunk in chunks:
                yield chunk

    async def _generate_one(
        self, ids: list[int], p: GenerateParams, index: int, options: dict
    ) -> AsyncIterator[GenerateChunk]:
        request_id = uuid.uuid4().hex
        req = OpenGeneration(ids, p, asyncio.Queue(), options)
        self._open[request_id] = req
        text = CompletionText(self.tokenizer, ids, p.stop, p.stop_token_ids, p.logprobs is not None)
        finished = router_finished = False
        try:
            self._ensure_pumps()
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
            if not router_finished and req.link is not None:  # the client left, or a stop string ended it
                req.link.handle.cancel_generation.remote(request_id)

    async def _submit_first(self, request_id: str, req: OpenGeneration) -> None:
        """Submit a new request to the least loaded live router; when that one is dead, to another,
        or (none left) to it once it is back, unless a pump has re-submitted it meanwhile."""
        while True:
            link = req.link or pick(self.links.values()) or self._primary()
            try:
                async with req.lock:
                    if req.incarnation is None:
                        req.link = link
                        link.pending += 1
                        await self._submit(request_id, req)
                return
            except RayActorError:
                link.alive = False
                link.suspect.set()  # its pump's stream may be dead too, and Ray may not say so
                if req.link is link and req.incarnation is None:
                    req.link = None
                if pick(self.links.values()) is None:
                    await self._router_back(link)

    async def _submit(self, request_id: str, req: OpenGeneration) -> None:
        """Submit (or re-submit: prompt + the tokens already streamed) to `req.link`, under
        `req.lock`; records the router process that accepted it."""
        p, done = req.params, len(req.tokens)
        try:
            with _raise_actor_errors():
                req.incarnation = await req.link.handle.submit_generation.remote(
                    request_id,
                    req.prompt + req.tokens,
                    p.max_tokens - done,
                    float(p.temperature),
                    float(p.top_p),
                    p.seed,
                    self._subscriber,
                    done,
                    **req.options,
                )
        except ServingError as e:
            if "already in use" not in e.message:
                raise
            # Only this replica knows the (random) id: an earlier submission of ours got there.
            req.incarnation = req.link.incarnation

    async def _pump(self, link: RouterLink) -> None:
        """Read router `link`'s event stream for this replica and hand each request its news; when
        the router is lost, move its open requests to the others (or wait for it to be back)."""
        while not self.stopping:
            try:
                await self._read_events(link)
            except (RayActorError, RouterReplaced) as e:
                if self.stopping:
                    return
                log.warning("router %s lost (%s)", link.id, _first_line(e))
                link.alive = False
                link.incarnation = None
                await self._move_open(link)
                if link.draining:
                    return  # removed from the cluster: nothing comes back
                try:
                    await self._router_back(link)  # the new stream's first message re-submits
                except (ServingError, RayActorError) as err:
                    self._fail_open(err, link)
                    return
            except Exception as e:  # anything else: every open stream of it learns it
                log.warning(
                    "router %s event stream ended (%s: %s)", link.id, type(e).__name__, _first_line(e)
                )
                self._fail_open(e, link)
                return

    async def _read_events(self, link: RouterLink) -> None:
        """One `generation_events` stream of router `link`, read until it ends. Each message names
        the router process it comes from and carries its load; the first from a process other than
        the last one's (a restarted router) re-submits the open requests that process has not
        accepted.

        Raises RayActorError when Ray says the router died, and RouterReplaced when the process's
        beacon closed, or when the stream went silent (no heartbeat for STREAM_SILENCE_S, or a call
        met a dead router) and the router says it is not the process the stream came from."""
        refs = link.handle.generation_events.options(num_returns="streaming").remote(self._subscriber)
        link.suspect.clear()
        try:
            await self._read_stream(link, refs)
        finally:
            if link.beacon_task is not None:
                link.beacon_task.cancel()
                link.beacon_task = None

    async def _read_stream(self, link: RouterLink, refs) -> None:
        source = None  # the router process this stream comes from, once it has said
        with _raise_actor_errors():
            while True:
                item = asyncio.ensure_future(refs.__anext__())
                try:
                    while True:
                        suspect = asyncio.ensure_future(link.suspect.wait())
                        done, _ = await asyncio.wait(
                            {item, suspect}, timeout=STREAM_SILENCE_S, return_when=asyncio.FIRST_COMPLETED
                        )
                        suspect.cancel()
                        if item in done:
                            break
                        link.suspect.clear()
                        if source is not None and link.gone == source:
                            raise RouterReplaced(f"router process {source[:8]} closed its beacon: it died")
                        await self._check_stream(link, source)
                    ref = item.result()
                except StopAsyncIteration:
                    return
                finally:
                    if not item.done():
                        item.cancel()
                source, events, load = await ref
                link.report(load)
                for request_id, tokens, finish, error, logprobs in events:
                    req = self._open.get(request_id)
                    if req is not None:
                        req.news.put_nowait((tokens, finish, error, logprobs))
                if source != link.incarnation:
                    restarted = link.incarnation is not None
                    link.incarnation = source
                    link.alive = True
                    self._watch_beacon(link, source)
                    await self._resubmit_to(link, source, restarted)
                elif link.beacon_task is None:
                    self._watch_beacon(link, source)  # a new stream from the same process

    def _watch_beacon(self, link: RouterLink, source: str) -> None:
        """Watch router process `source`'s beacon: when it closes, the process died, and the pump
        moves its streams at once instead of waiting for Ray to say so (`runtime/liveness.py`)."""
        if link.beacon_task is not None:
            link.beacon_task.cancel()

        async def watch() -> None:
            try:
                info = await asyncio.wait_for(link.handle.liveness.remote(), timeout=HEALTH_PROBE_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - no beacon known: Ray's report and the silence remain
                log.info("router %s: no process beacon (%s)", link.id, _first_line(e))
                return
            if info is None or info["incarnation"] != source:
                return  # already another process: the stream's own checks find out
            if await wait_closed(tuple(info["address"])):
                log.warning("router %s: process %s closed its beacon", link.id, source[:8])
                link.gone = source
                link.suspect.set()

        link.beacon_task = self._background(watch())

    async def _check_stream(self, link: RouterLink, source: str | None) -> None:
        """RouterReplaced when the event stream cannot be coming from the router that answers now:
        it came from another process, or it has not said yet and the router reads no stream of this
        replica. Nothing when it can (the stream is slow; a second stream would split the news), nor
        when the router does not answer in time (a busy router: the next silence asks again)."""
        try:
            with _raise_actor_errors():
                now = await asyncio.wait_for(
                    link.handle.event_stream_status.remote(self._subscriber), timeout=HEALTH_PROBE_TIMEOUT_S
                )
        except asyncio.TimeoutError:
            return
        if source is not None and now["incarnation"] != source:
            raise RouterReplaced(f"the router restarted (process {source[:8]} -> {now['incarnation'][:8]})")
        if source is None and not now["reading"]:
            raise RouterReplaced("the event stream reached no live router process")

    async def _resubmit_to(self, link: RouterLink, incarnation: str, restarted: bool) -> None:
        """Re-submit every open request of `link` that its process `incarnation` has not accepted
        (prompt + the tokens already streamed); one it cannot take fails with the cause."""
        stale = [
            (rid, req)
            for rid, req in list(self._open.items())
            if req.link is link and req.incarnation not in (None, incarnation)
        ]
        if restarted and stale:
            log.warning("router %s restarted; re-submitting %d open generations", link.id, len(stale))
        for request_id, req in stale:
            try:
                async with req.lock:
                    if req.link is link and req.incarnation != incarnation and request_id in self._open:
                        await self._submit(request_id, req)
            except RayActorError:
                link.suspect.set()  # died again: the stream will end, and its successor re-submits
                return
            except ServingError as e:
                req.news.put_nowait(([], None, e, None))

    async def _move_open(self, dead: RouterLink) -> None:
        """Move the open requests of a lost router to the live ones (prompt + the tokens already
        streamed), least loaded first; with no live router they stay, for its restart."""
        moving = [(rid, req) for rid, req in list(self._open.items()) if req.link is dead]
        if not moving or pick(self.links.values(), avoid=dead) is None:
            return
        log.warning("moving %d open generations off router %s", len(moving), dead.id)

        async def move(request_id: str, req: OpenGeneration) -> None:
            async with req.lock:
                if req.link is not dead or request_id not in self._open:
                    return
                target = pick(self.links.values(), avoid=dead)
                if target is None:
                    return
                req.link, req.incarnation = target, None
                target.pending += 1
                try:
                    await self._submit(request_id, req)
                    self.streams_moved += 1
                except RayActorError:
                    target.alive = False
                    target.suspect.set()  # its pump moves it on (or waits for it)
                    req.incarnation = "lost"  # not accepted anywhere: re-submitted when one is back
                except ServingError as e:
                    req.news.put_nowait(([], None, e, None))

        # All at once: each is one router call, and the streams wait until theirs is made.
        await asyncio.gather(*(move(rid, req) for rid, req in moving))

    def _fail_open(self, e: BaseException, link: RouterLink | None = None) -> None:
        err = (
            e if isinstance(e, ServingError) else ServingError("unavailable", f"generation stream lost: {e}")
        )
        for req in list(self._open.values()):
            if link is None or req.link is link:
                req.news.put_nowait(([], None, err, None))

    # ---- cluster ------------------------------------------------------------------------------------

    async def cluster_state(self) -> dict:
        state = await self.call("cluster_state")
        state["routers"] = await self.routers_state()
        return state

    async def routers_state(self) -> list[dict]:
        """One entry per router: id, node, pid, running, waiting, tokens/s, placement version, and
        this replica's view of it (alive, draining, load age)."""
        if self.controller is not None:
            await self.refresh_routers()
        out = []
        for link in sorted(self.links.values(), key=lambda lk: int(lk.id) if lk.id.isdigit() else 0):
            entry = link.describe()
            try:
                with _raise_actor_errors():
                    report = await asyncio.wait_for(
                        link.handle.describe.remote(), timeout=HEALTH_PROBE_TIMEOUT_S
                    )
                entry.update(report)
            except (RayActorError, asyncio.TimeoutError, ServingError) as e:
                entry["state"] = f"unreachable ({type(e).__name__})"
            out.append(entry)
        return out

    async def scale(self, num_workers: int) -> dict:
        return await self.call("scale", num_workers)

    async def rebalance(self) -> dict:
        return await self.call("rebalance")

    async def scale_routers(self, num_routers: int) -> dict:
        """Run `num_routers` routers (the controller starts or drains them); the routers after."""
        if self.controller is None:
            raise invalid("this server runs one router (the 'local' transport)")
        try:
            with _raise_actor_errors():
                result = await self.controller.scale_routers.remote(num_routers)
        except RayActorError as e:
            raise ServingError(
                "unavailable",
                f"the membership controller is not running ({type(e).__name__}); retry once it is back",
            ) from None
        await self.refresh_routers()
        return {**result, "routers": await self.routers_state()}

    async def health(self) -> dict:
        """Serving while any router serves (each asked at once, a few seconds at most)."""
        links = list(self.links.values())
        results = await asyncio.gather(*(self._health_of(lk) for lk in links))
        serving = [h for h in results if h.get("serving")]
        best = dict(serving[0] if serving else results[0])
        best["routers"] = len(links)
        best["routers_serving"] = len(serving)
        return best

    async def _health_of(self, link: RouterLink) -> dict:
        try:
            with _raise_actor_errors():
                return await asyncio.wait_for(link.handle.health.remote(), timeout=5.0)
        except (RayActorError, asyncio.TimeoutError) as e:
            why = "does not answer" if isinstance(e, asyncio.TimeoutError) else "is not running"
            return {"serving": False, "reason": f"router {link.id} {why} ({type(e).__name__})"}
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
