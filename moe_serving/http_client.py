"""Python clients of the HTTP API: `HTTPClient` (blocking) and `AsyncHTTPClient` (asyncio), on httpx.

    with HTTPClient("http://localhost:8000") as client:
        logits = client.forward(torch.tensor([[1, 2, 3]]))           # msgpack tensors, exact
        out = client.complete("Hello", max_tokens=8, seed=0)         # OpenAI completion JSON
        for chunk in client.stream("Hello", max_tokens=8):           # GenerateChunk per SSE event
            print(chunk.text, end="")
        answer = client.chat([{"role": "user", "content": "Hi"}], max_tokens=8, stop=["\n"])
        print(answer["choices"][0]["message"]["content"])

Tensors go as msgpack maps `{dtype, shape, data}` (`encoding="msgpack"`, the default: exact, any
dtype) or as JSON nested lists (`encoding="json"`: readable; logits come back as float32). Any
answer other than 2xx raises `ServingError` with the server's error code and message and
`status` = the HTTP status; a server that cannot be reached raises `ServingError("unavailable")`.

A server started with keys needs one: `api_key=` (default: MOE_SERVE_API_KEY, else OPENAI_API_KEY,
as the openai client reads it), sent as `Authorization: Bearer <key>`. An https URL is checked
against the system's roots, or `verify=ssl.create_default_context(cafile="ca.pem")`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgpack
import torch

from moe_serving.credentials import api_key_from_env, auth_header
from moe_serving.errors import HTTP_STATUS, ServingError
from moe_serving.tensors import from_json, tensor_from_map, tensor_to_map, to_json_lists
from moe_serving.types import GenerateChunk, TokenLogprob

MSGPACK = "application/msgpack"
_CODE_OF_STATUS = {status: code for code, status in HTTP_STATUS.items()}
_CODE_OF_STATUS.update({422: "invalid_argument", 429: "unavailable", 504: "unavailable"})

__all__ = ["AsyncHTTPClient", "HTTPClient"]


# ---- requests and answers, shared by both clients -----------------------------------------------


def _as_tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(x, dtype=dtype)


def _check_encoding(encoding: str) -> None:
    if encoding not in ("msgpack", "json"):
        raise ValueError(f'encoding must be "msgpack" or "json", got {encoding!r}')


def _tensor_request(fields: dict[str, torch.Tensor | None], encoding: str) -> dict:
    """httpx request arguments for a body of named tensors (None fields are left out)."""
    _check_encoding(encoding)
    present = {k: v for k, v in fields.items() if v is not None}
    if encoding == "msgpack":
        body = msgpack.packb({k: tensor_to_map(v) for k, v in present.items()}, use_bin_type=True)
        return {"content": body, "headers": {"Content-Type": MSGPACK, "Accept": MSGPACK}}
    return {
        "json": {k: to_json_lists(v) for k, v in present.items()},
        "headers": {"Accept": "application/json"},
    }


def _body(response: httpx.Response) -> Any:
    ctype = response.headers.get("content-type", "")
    if MSGPACK in ctype or "application/x-msgpack" in ctype:
        return msgpack.unpackb(response.content, raw=False)
    return response.json()


def _error(response: httpx.Response) -> ServingError:
    status = response.status_code
    code, message, reason = _CODE_OF_STATUS.get(status, "internal"), None, None
    try:
        err = _body(response)["error"]
        if isinstance(err.get("code"), str) and err["code"] in HTTP_STATUS:
            code = err["code"]
        elif isinstance(err.get("code"), str):  # OpenAI's specific code (context_length_exceeded)
            reason = err["code"]
        message = str(err["message"])
    except Exception:
        code = "internal"
        text = response.text.strip().replace("\n", " ")
        message = f"HTTP {status}: {text[:200]}" if text else f"HTTP {status} {response.reason_phrase}"
    return ServingError(code, message, status=status, reason=reason)


def _tensor_answer(response: httpx.Response, key: str, encoding: str, dtype: torch.dtype) -> torch.Tensor:
    if not response.is_success:
        raise _error(response)
    body = _body(response)
    if not isinstance(body, dict) or key not in body:
        raise ServingError("internal", f"the server's answer has no {key!r}", status=response.status_code)
    value = body[key]
    if encoding == "msgpack" or (isinstance(value, dict) and isinstance(value.get("data"), bytes)):
        return tensor_from_map(value, key)
    if isinstance(value, dict):  # {dtype, shape, data: base64}
        return from_json(value, name=key)
    return from_json(value, "float32", name=key).to(dtype)


def _json_answer(response: httpx.Response) -> Any:
    if not response.is_success:
        raise _error(response)
    return response.json()


def _completion_body(
    prompt, max_tokens, temperature, top_p, seed, model, stream: bool, options: dict
) -> dict:
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        **options,
    }
    if seed is not None:
        body["seed"] = seed
    if model is not None:
        body["model"] = model
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _chat_body(messages, max_tokens, temperature, top_p, seed, model, stream: bool, options: dict) -> dict:
    body = _completion_body(None, max_tokens, temperature, top_p, seed, model, stream, options)
    del body["prompt"]
    body["messages"] = list(messages)
    return body


def _logprobs(choice: dict) -> list[TokenLogprob] | None:
    """TokenLogprobs of a choice's logprobs object, in either API's format."""
    lp = choice.get("logprobs")
    if not lp:
        return None
    ids = choice.get("token_ids") or []
    if "content" in lp:  # chat
        out = []
        for k, e in enumerate(lp["content"] or []):
            tops = [
                TokenLogprob(-1, a["token"], a["logprob"], list(a.get("bytes") or []))
                for a in e["top_logprobs"]
            ]
            tid = ids[k] if k < len(ids) else -1
            out.append(TokenLogprob(tid, e["token"], e["logprob"], list(e.get("bytes") or []), tops))
        return out
    out = []
    for k, token in enumerate(lp.get("tokens") or []):
        tops = [TokenLogprob(-1, t, v) for t, v in (lp["top_logprobs"][k] or {}).items()]
        tid = ids[k] if k < len(ids) else -1
        out.append(
            TokenLogprob(
                tid, token, lp["token_logprobs"][k], top_logprobs=tops, text_offset=lp["text_offset"][k]
            )
        )
    return out


class _SSE:
    """Server-sent events, line by line: `feed` returns an event's data when a blank line ends it."""

    def __init__(self):
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None  # comment / keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


class _ChunkDecoder:
    """OpenAI text_completion or chat.completion.chunk events -> GenerateChunks (one per choice in
    an event). Finishing chunks are held back until [DONE] so that the usage-only event after them
    (stream_options.include_usage) lands in the last one: its token counts are the request's."""

    def __init__(self):
        self.held: list[GenerateChunk] = []
        self.done = False

    def feed(self, data: str) -> list[GenerateChunk]:
        if data.strip() == "[DONE]":
            self.done = True
            return self.finish()
        try:
            event = json.loads(data)
        except ValueError:
            raise ServingError("internal", f"malformed server-sent event: {data[:200]!r}") from None
        if isinstance(event, dict) and "error" in event:
            err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            code = err.get("code") if err.get("code") in HTTP_STATUS else "internal"
            raise ServingError(code, str(err.get("message", "error in the stream")))
        out: list[GenerateChunk] = []
        usage = event.get("usage") or None
        for c in event.get("choices") or []:
            delta = c.get("delta")
            chunk = GenerateChunk(
                token_ids=list(c.get("token_ids") or []),
                text=(delta.get("content") or "") if isinstance(delta, dict) else (c.get("text") or ""),
                finish_reason=c.get("finish_reason") or None,
                index=int(c.get("index") or 0),
                logprobs=_logprobs(c),
            )
            if isinstance(delta, dict) and not chunk.text and not chunk.token_ids and not chunk.finish_reason:
                continue  # chat's opening event (the role) carries nothing for a GenerateChunk
            if usage:
                _set_usage(chunk, usage)
            if chunk.finish_reason is not None and not usage:
                self.held.append(chunk)
            else:
                out.append(chunk)
        if usage and not event.get("choices"):
            if self.held:
                _set_usage(self.held[-1], usage)
                out += self.held
                self.held = []
            else:
                out.append(_set_usage(GenerateChunk(), usage))
        return out

    def finish(self) -> list[GenerateChunk]:
        held, self.held = self.held, []
        return held


def _set_usage(chunk: GenerateChunk, usage: dict) -> GenerateChunk:
    chunk.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    chunk.completion_tokens = int(usage.get("completion_tokens") or 0)
    return chunk


def _unreachable(base_url: str, e: Exception) -> ServingError:
    kind = "timed out" if isinstance(e, httpx.TimeoutException) else "unreachable"
    return ServingError("unavailable", f"{base_url} {kind}: {type(e).__name__}: {e}")


# ---- clients -------------------------------------------------------------------------------------


class HTTPClient:
    """Blocking client of the HTTP API at `base_url` (e.g. "http://localhost:8000").

    api_key: sent as `Authorization: Bearer` (default: from the environment, see the module
    docstring); verify: TLS verification of an https URL (True: the system's roots, or an
    ssl.SSLContext)."""

    def __init__(
        self,
        base_url: str,
        timeout: float | None = 60.0,
        headers: dict[str, str] | None = None,
        *,
        api_key: str | None = None,
        verify=True,
    ):
        self.base_url = base_url.rstrip("/")
        headers = {**auth_header(api_key or api_key_from_env()), **(headers or {})}
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, verify=verify)

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self._client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise _unreachable(self.base_url, e) from e

    def forward(self, input_ids, attention_mask=None, *, encoding: str = "msgpack") -> torch.Tensor:
        """Logits [B, S, V] for token ids [B, S] (POST /v1/forward)."""
        ids = _as_tensor(input_ids, torch.int64)
        mask = None if attention_mask is None else _as_tensor(attention_mask, torch.int64)
        req = _tensor_request({"input_ids": ids, "attention_mask": mask}, encoding)
        return _tensor_answer(self._send("POST", "/v1/forward", **req), "logits", encoding, torch.float32)

    def moe_layer(self, layer: int, hidden_states, *, encoding: str = "msgpack") -> torch.Tensor:
        """One MoE block on hidden states [T, H] or [B, S, H] (POST /v1/layers/{layer}/moe)."""
        h = _as_tensor(hidden_states, torch.float32)
        req = _tensor_request({"hidden_states": h}, encoding)
        resp = self._send("POST", f"/v1/layers/{int(layer)}/moe", **req)
        return _tensor_answer(resp, "hidden_states", encoding, h.dtype)

    def complete(
        self,
        prompt,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed=None,
        model=None,
        **options,
    ) -> dict:
        """An OpenAI completion (POST /v1/completions); `prompt` is text or a list of token ids.
        `options`: the API's other fields (n, stop, logprobs, presence_penalty, ...)."""
        body = _completion_body(prompt, max_tokens, temperature, top_p, seed, model, False, options)
        return _json_answer(self._send("POST", "/v1/completions", json=body))

    def stream(
        self,
        prompt,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed=None,
        model=None,
        **options,
    ) -> Iterator[GenerateChunk]:
        """The completion as it is generated: one GenerateChunk per choice in each server-sent
        event; a choice's last one has finish_reason, and the very last the request's token counts."""
        body = _completion_body(prompt, max_tokens, temperature, top_p, seed, model, True, options)
        return self._events("/v1/completions", body)

    def chat(
        self,
        messages: list[dict],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed=None,
        model=None,
        **options,
    ) -> dict:
        """An OpenAI chat completion (POST /v1/chat/completions) of `messages`
        ([{"role": ..., "content": ...}]); `options` as for `complete` (logprobs: bool, top_logprobs).
        max_tokens None: up to the model's context (OpenAI's chat default)."""
        body = _chat_body(messages, max_tokens, temperature, top_p, seed, model, False, options)
        return _json_answer(self._send("POST", "/v1/chat/completions", json=body))

    def chat_stream(
        self,
        messages: list[dict],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed=None,
        model=None,
        **options,
    ) -> Iterator[GenerateChunk]:
        """The chat answer as it is generated, as GenerateChunks (see `stream`)."""
        body = _chat_body(messages, max_tokens, temperature, top_p, seed, model, True, options)
        return self._events("/v1/chat/completions", body)

    def _events(self, path: str, body: dict) -> Iterator[GenerateChunk]:
        try:
            with self._client.stream(
                "POST", path, json=body, headers={"Accept": "text/event-stream"}
            ) as resp:
                if not resp.is_success:
                    resp.read()
                    raise _error(resp)
                sse, dec = _SSE(), _ChunkDecoder()
                for line in resp.iter_lines():
                    data = sse.feed(line)
                    if data is not None:
                        yield from dec.feed(data)
                        if dec.done:
                            return
                data = sse.flush()
                if data is not None:
                    yield from dec.feed(data)
                yield from dec.finish()
        except httpx.TransportError as e:
            raise _unreachable(self.base_url, e) from e

    def cluster_state(self) -> dict:
        """Workers, placement, expert load and balance, membership events (GET /v1/cluster)."""
        return _json_answer(self._send("GET", "/v1/cluster"))

    def scale(self, num_workers: int) -> dict:
        """Run on `num_workers` expert workers; the cluster state once the new placement serves
        (POST /v1/cluster/scale). ServingError "failed_precondition" (409) while another change runs,
        "unavailable" (503) when the change was rolled back."""
        return _json_answer(self._send("POST", "/v1/cluster/scale", json={"num_workers": num_workers}))

    def rebalance(self) -> dict:
        """Re-place experts by EPLB over the recent load; the balance before and after
        (POST /v1/cluster/rebalance)."""
        return _json_answer(self._send("POST", "/v1/cluster/rebalance"))

    def scale_routers(self, num_routers: int) -> dict:
        """Run `num_routers` routers (POST /v1/cluster/routers); 400 for a bad count, 409 while
        another router change runs, 503 when a new router could not start."""
        return _json_answer(self._send("POST", "/v1/cluster/routers", json={"num_routers": num_routers}))

    def models(self) -> dict:
        """OpenAI's model list (GET /v1/models)."""
        return _json_answer(self._send("GET", "/v1/models"))

    def health(self) -> bool:
        """True when the server answers GET /healthz with 2xx; False otherwise (also if unreachable)."""
        try:
            return self._client.get("/healthz").is_success
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncHTTPClient:
    """asyncio client of the HTTP API; the same methods as `HTTPClient`, awaitable
    (`stream` is an async iterator)."""

    def __init__(
        self,
        base_url: str,
        timeout: float | None = 60.0,
        headers: dict[str, str] | None = None,
        *,
        api_key: str | None = None,
        verify=True,
    ):
        self.base_url = base_url.rstrip("/")
        headers = {**auth_header(api_key or api_key_from_env()), **(headers or {})}
        self._client = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=headers, verify=verify
        )

    async def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise _unreachable(self.base_url, e) from e

    async def forward(self, input_ids, attention_mask=None, *, encoding: str = "msgpack") -> torch.Tensor:
        ids = _as_tensor(input_ids, torch.int64)
        mask = None if attention_mask is None else _as_tensor(attention_mask, torch.int64)
        req = _tensor_request({"input_ids": ids, "attention_mask": mask}, encoding)
        resp = await self._send("POST", "/v1/forward", **req)
        return _tensor_answer(resp, "logits", encoding, torch.float32)

    async def moe_layer(self, layer: int, hidden_states, *, encoding: str = "msgpack") -> torch.Tensor:
        h = _as_tensor(hidden_states, torch.float32)
        req = _tensor_request({"hidden_states": h}, encoding)
        resp = await self._send("POST", f"/v1/layers/{int(layer)}/moe", **req)
        return _tensor_answer(resp, "hidden_states", encoding, h.dtype)

    async def complete(
        self,
        prompt,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed=None,
        model=None,
        **options,
    ) -> dict:
        body = _completion_body(prompt, max_tokens, temperature, top_p, seed, model, False, options)
        return _json_answer(await self._send("POST", "/v1/completions", json=body))

    def stream(
        self,
        prompt,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed=None,
        model=None,
        **options,
    ) -> AsyncIterator[GenerateChunk]:
        body = _completion_body(prompt, max_tokens, temperature, top_p, seed, model, True, options)
        return self._events("/v1/completions", body)

    async def chat(
        self,
        messages: list[dict],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed=None,
        model=None,
        **options,
    ) -> dict:
        body = _chat_body(messages, max_tokens, temperature, top_p, seed, model, False, options)
        return _json_answer(await self._send("POST", "/v1/chat/completions", json=body))

    def chat_stream(
        self,
        messages: list[dict],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed=None,
        model=None,
        **options,
    ) -> AsyncIterator[GenerateChunk]:
        body = _chat_body(messages, max_tokens, temperature, top_p, seed, model, True, options)
        return self._events("/v1/chat/completions", body)

    async def _events(self, path: str, body: dict) -> AsyncIterator[GenerateChunk]:
        try:
            async with self._client.stream(
                "POST", path, json=body, headers={"Accept": "text/event-stream"}
            ) as resp:
                if not resp.is_success:
                    await resp.aread()
                    raise _error(resp)
                sse, dec = _SSE(), _ChunkDecoder()
                async for line in resp.aiter_lines():
                    data = sse.feed(line)
                    if data is not None:
                        for chunk in dec.feed(data):
                            yield chunk
                        if dec.done:
                            return
                data = sse.flush()
                rest = (dec.feed(data) if data is not None else []) + dec.finish()
                for chunk in rest:
                    yield chunk
        except httpx.TransportError as e:
            raise _unreachable(self.base_url, e) from e

    async def cluster_state(self) -> dict:
        return _json_answer(await self._send("GET", "/v1/cluster"))

    async def scale(self, num_workers: int) -> dict:
        return _json_answer(await self._send("POST", "/v1/cluster/scale", json={"num_workers": num_workers}))

    async def rebalance(self) -> dict:
        return _json_answer(await self._send("POST", "/v1/cluster/rebalance"))

    async def scale_routers(self, num_routers: int) -> dict:
        return _json_answer(
            await self._send("POST", "/v1/cluster/routers", json={"num_routers": num_routers})
        )

    async def models(self) -> dict:
        return _json_answer(await self._send("GET", "/v1/models"))

    async def health(self) -> bool:
        try:
            return (await self._client.get("/healthz")).is_success
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        await self._client.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncHTTPClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
