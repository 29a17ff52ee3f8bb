"""A router process SIGKILLed mid-stream, on what `moe-serve serve` starts by default (two expert
workers, the socket transport): every open stream finishes with the tokens an undisturbed run
gives, none lost or repeated; completions sent while the router restarts are answered; health is
truthful afterwards. The kill comes from outside, as an OOM killer or an operator's would.

Plus the ingress's side of it without Ray: an event stream that never ends although its router
process is gone (Ray does not always end one: ray-project/ray#43914) does not hang the requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time

import httpx
import pytest
from test_cli_serve import READY, READY_TIMEOUT_S, ServerProcess, descendants, free_port

from moe_serving.types import GenerateParams
from router_service.serving import core as core_module
from router_service.serving.core import IngressCore
from router_service.serving.settings import ServingSettings

STREAMS = 8
MAX_TOKENS = 48
CLIENT_TIMEOUT_S = 240  # generous: the restart reloads the dense model on a possibly busy machine
PROBES = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    http_port, grpc_port = free_port(), free_port()
    srv = ServerProcess(
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        log=tmp_path_factory.mktemp("serve") / "stderr.log",
    )
    try:
        m = srv.wait_for(READY, READY_TIMEOUT_S)
        srv.http_url = m.group(4)
        assert (m.group(2), m.group(3)) == ("2", "socket"), m.group(0)  # the defaults under test
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # killed below
                srv.proc.wait(timeout=120)
        srv.kill()


def _body(i: int) -> dict:
    return {"prompt": [40 + i, 41, 42 + i], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}


async def _stream(url: str, i: int, seen: dict[int, list], times: dict[int, list]) -> list[int]:
    async with (
        httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client,
        client.stream("POST", f"{url}/v1/completions", json=_body(i)) as r,
    ):
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                if choice.get("token_ids"):
                    seen[i] += choice["token_ids"]
                    times[i].append(time.monotonic())
    return seen[i]


def _router_pids(server_pid: int) -> list[int]:
    return [pid for pid, cmd in descendants(server_pid).items() if cmd.startswith("ray::RouterActor")]


def test_router_sigkilled_mid_stream_loses_no_token(server):
    url = server.http_url

    async def reference():
        seen, times = {i: [] for i in range(STREAMS)}, {i: [] for i in range(STREAMS)}
        return await asyncio.gather(*(_stream(url, i, seen, times) for i in range(STREAMS)))

    want = asyncio.run(reference())
    assert all(len(w) == MAX_TOKENS for w in want), [len(w) for w in want]
    routers = _router_pids(server.proc.pid)
    assert len(routers) == 1, routers

    async def disturbed():
        seen, times = {i: [] for i in range(STREAMS)}, {i: [] for i in range(STREAMS)}
        streams = [asyncio.ensure_future(_stream(url, i, seen, times)) for i in range(STREAMS)]
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        # Mid-stream: every stream has tokens and none has all of them.
        while not all(len(s) >= 2 for s in seen.values()):
            assert time.monotonic() < deadline and not any(s.done() for s in streams), seen
            await asyncio.sleep(0.01)
        os.kill(routers[0], signal.SIGKILL)
        killed_at = time.monotonic()
        sent_at_kill = {i: len(s) for i, s in seen.items()}

        async def one_token(j: int):
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
                body = {"prompt": [50 + j, 51, 52], "max_tokens": 1}
                return await client.post(f"{url}/v1/completions", json=body)

        probes = []
        for j in range(PROBES):  # while the router is down and restarting
            probes.append(asyncio.ensure_future(one_token(j)))
            await asyncio.sleep(0.3)
        got = await asyncio.gather(*streams)
        answered = await asyncio.gather(*probes)
        return got, answered, times, killed_at, sent_at_kill

    got, answered, times, killed_at, sent_at_kill = asyncio.run(disturbed())
    assert got == want
    assert any(n < MAX_TOKENS for n in sent_at_kill.values()), sent_at_kill  # the kill was mid-stream
    for r in answered:
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"][0]["token_ids"]) == 1
    gaps = [b - a for t in times.values() for a, b in zip(t, t[1:], strict=False) if b > killed_at]
    print(f"router restart: longest gap between two tokens of a stream {max(gaps, default=0):.2f}s")
    assert _router_pids(server.proc.pid) not in ([], routers), "the router did not come back"
    health = httpx.get(f"{url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["serving"], health.text


# ---- the ingress's side, without Ray: a stream Ray never ends --------------------------------------


class _Ref:
    def __init__(self, value):
        self.value = value

    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        return self.value


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class _Stream:
    """A `generation_events` stream of one router process: its messages and heartbeats, then, once
    that process is gone, silence for ever (what Ray gave after a restart in the reported hang)."""

    def __init__(self, router):
        self.router, self.process = router, router.process
        router.readers.add(self)

    def __aiter__(self):
        return self

    async def __anext__(self):
        for _ in range(5):  # an empty message (a heartbeat) after a while without news
            if self.router.process != self.process:
                await asyncio.Event().wait()  # dead: never ends, never raises
            if self.router.news:
                return _Ref((self.process, [self.router.news.pop(0)]))
            await asyncio.sleep(0.01)
        return _Ref((self.process, []))


class _Router:
    """A router whose process can be replaced: requests it accepted are lost with it."""

    def __init__(self):
        self.process, self.accepted, self.news, self.readers = "p1", {}, [], set()
        self.generation_events = _Method(lambda subscriber: _Stream(self))
        self.submit_generation = _Method(self._submit)
        self.event_stream_status = _Method(self._status)
        self.cancel_generation = _Method(lambda rid: None)
        self.health = _Method(lambda: _Ref({"serving": True}))

    def _submit(self, request_id, prompt, max_new, *_args, **_kw):
        self.accepted[request_id] = (self.process, list(prompt), max_new)
        return _Ref(self.process)

    def _status(self, subscriber):
        reading = any(s.process == self.process for s in self.readers)
        return _Ref({"incarnation": self.process, "reading": reading})

    def restart(self):
        self.process, self.accepted, self.news = "p2", {}, []

    def emit(self, tokens, finish=None):
        for rid, (process, _prompt, _n) in self.accepted.items():
            if process == self.process:
                self.news.append((rid, tokens, finish, None, None))


def test_a_stream_ray_never_ends_does_not_hang_the_requests(monkeypatch):
    monkeypatch.setattr(core_module, "STREAM_SILENCE_S", 0.1)
    router = _Router()

    async def main():
        core = IngressCore(router, spec=None, tokenizer=None, settings=ServingSettings())
        core.prompt_ids = lambda p: list(p.prompt_token_ids)  # no spec to check against here
        params = GenerateParams(prompt_token_ids=[1, 2], max_tokens=3)
        chunks = core.generate(params)
        first = asyncio.ensure_future(chunks.__anext__())
        while not router.accepted:
            await asyncio.sleep(0.01)
        router.emit([7])
        assert (await asyncio.wait_for(first, 10)).token_ids == [7]
        router.restart()  # the old stream goes silent for ever; the request is lost with p1
        deadline = time.monotonic() + 10
        while not router.accepted:  # re-submitted to p2: prompt + the token already streamed
            assert time.monotonic() < deadline, "not re-submitted"
            await asyncio.sleep(0.01)
        ((_, (process, prompt, max_new)),) = router.accepted.items()
        assert (process, prompt, max_new) == ("p2", [1, 2, 7], 2)
        router.emit([8])
        router.emit([9], "length")
        rest = [c async for c in chunks]
        assert [t for c in rest for t in c.token_ids] == [8, 9] and rest[-1].finish_reason == "length"
        core.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
