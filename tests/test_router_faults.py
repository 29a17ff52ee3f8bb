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
    return _pids(server_pid, "ray::RouterActor")


def _pids(server_pid: int, prefix: str) -> list[int]:
    return [pid for pid, cmd in descendants(server_pid).items() if cmd.startswith(prefix)]


def _routers(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/cluster", timeout=60).json()["routers"]


def _wait_for(what: str, check, timeout: float = CLIENT_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(0.2)
    return result


async def _streams(url: str, n: int = STREAMS, disturb=None):
    """n concurrent greedy streams; `disturb(seen)` runs once every stream has 2 tokens or more
    (mid-stream) and returns the time of the fault. Returns (tokens per stream, longest gap between
    two tokens of a stream after the fault, what `disturb` returned)."""
    seen, times = {i: [] for i in range(n)}, {i: [] for i in range(n)}
    streams = [asyncio.ensure_future(_stream(url, i, seen, times)) for i in range(n)]
    fault_at, extra = None, None
    if disturb is not None:
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while not all(len(s) >= 2 for s in seen.values()):
            assert time.monotonic() < deadline and not any(s.done() for s in streams), seen
            await asyncio.sleep(0.01)
        fault_at, extra = await disturb(seen)
    got = await asyncio.gather(*streams)
    gaps = [
        b - a for t in times.values() for a, b in zip(t, t[1:], strict=False) if fault_at and b > fault_at
    ]
    return got, max(gaps, default=0.0), extra


@pytest.fixture(scope="module")
def reference(server):
    """The undisturbed single-router run every faulted run must equal, token for token."""
    want, _, _ = asyncio.run(_streams(server.http_url))
    assert all(len(w) == MAX_TOKENS for w in want), [len(w) for w in want]
    return want


def test_router_sigkilled_mid_stream_loses_no_token(server, reference):
    url = server.http_url
    want = reference
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


def test_two_routers_share_the_load_and_a_killed_one_moves_its_streams(server, reference):
    """`POST /v1/cluster/routers` to 2; streams spread over both; SIGKILL of one mid-stream moves its
    streams to the other at once (no failure, no lost or repeated token); Ray brings it back."""
    url = server.http_url
    for bad in (0, 65, "2", None):
        r = httpx.post(f"{url}/v1/cluster/routers", json={"num_routers": bad}, timeout=60)
        assert r.status_code == 400 and "num_routers" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/v1/cluster/routers", json={"num_routers": 2}, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert (r.json()["from_routers"], r.json()["num_routers"]) == (1, 2)
    routers = _routers(url)
    assert [x["router_id"] for x in routers] == ["0", "1"] and len({x["pid"] for x in routers}) == 2, routers
    assert sorted(_router_pids(server.proc.pid)) == sorted(x["pid"] for x in routers)

    async def kill_the_busiest(seen):
        now = await asyncio.to_thread(_routers, url)
        busy = [x for x in now if x["running"] + x["waiting"]]
        assert len(busy) == 2, now  # the streams went to both
        victim = max(busy, key=lambda x: x["running"] + x["waiting"])
        os.kill(victim["pid"], signal.SIGKILL)
        return time.monotonic(), victim

    got, gap, victim = asyncio.run(_streams(url, disturb=kill_the_busiest))
    assert got == reference
    print(f"two routers, one SIGKILLed: longest gap between two tokens of a stream {gap:.2f}s")
    state = httpx.get(f"{url}/v1/cluster", timeout=60).json()
    assert state["generation"] is not None
    metrics = httpx.get(f"{url}/metrics", timeout=60).text
    assert 'moe_router_running{router="0"}' in metrics and 'moe_router_running{router="1"}' in metrics
    # Ray restarts the killed router in place; it attaches to the controller and serves again.
    _wait_for(
        "the killed router back",
        lambda: all(
            "pid" in x and x["pid"] != victim["pid"]
            for x in _routers(url)
            if x["router_id"] == victim["router_id"]
        ),
    )
    got, _, _ = asyncio.run(_streams(url))
    assert got == reference


def test_removing_a_router_drains_it(server, reference):
    """Scale 2 -> 1 routers while streams run: the removed router takes nothing new, finishes (or
    hands over) what it has, and no stream fails or changes."""
    url = server.http_url
    if len(_routers(url)) != 2:
        assert (
            httpx.post(
                f"{url}/v1/cluster/routers", json={"num_routers": 2}, timeout=CLIENT_TIMEOUT_S
            ).status_code
            == 200
        )

    async def remove_one(seen):
        r = await asyncio.to_thread(
            httpx.post, f"{url}/v1/cluster/routers", json={"num_routers": 1}, timeout=CLIENT_TIMEOUT_S
        )
        assert r.status_code == 200, r.text
        return time.monotonic(), r.json()

    got, _, result = asyncio.run(_streams(url, disturb=remove_one))
    assert got == reference
    assert (result["from_routers"], result["num_routers"]) == (2, 1)
    assert [x["router_id"] for x in _routers(url)] == ["0"]
    _wait_for("one router process", lambda: len(_router_pids(server.proc.pid)) == 1)


def test_a_worker_lost_under_two_routers_is_recovered_once(server, reference):
    """Both routers' passes lose the same worker (SIGKILL mid-stream): one recovery placement, not
    one per router; no stream notices; the controller restores the worker count."""
    url = server.http_url
    r = httpx.post(f"{url}/v1/cluster/routers", json={"num_routers": 2}, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200, r.text
    before = httpx.get(f"{url}/v1/cluster", timeout=60).json()["elastic"]["events"]

    async def kill_a_worker(seen):
        (victim, *_) = sorted(_pids(server.proc.pid, "ray::RayExpertWorker"))
        os.kill(victim, signal.SIGKILL)
        return time.monotonic(), victim

    got, gap, _ = asyncio.run(_streams(url, disturb=kill_a_worker))
    assert got == reference
    print(f"a worker SIGKILLed under two routers: longest gap between two tokens {gap:.2f}s")
    state = _wait_for(
        "back to 2 workers",
        lambda: (
            (s := httpx.get(f"{url}/v1/cluster", timeout=60).json())["num_workers"] == 2
            and s["elastic"]["health"]["serving"]
            and s
        ),
    )
    after = state["elastic"]["events"]
    assert after.get("workers_lost", 0) - before.get("workers_lost", 0) == 1, (before, after)
    assert after.get("failover", 0) - before.get("failover", 0) == 1, (before, after)
    _wait_for(
        "every router on one placement", lambda: len({x["placement_version"] for x in _routers(url)}) == 1
    )
    r = httpx.post(f"{url}/v1/cluster/routers", json={"num_routers": 1}, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200, r.text


def test_controller_sigkilled_routers_keep_serving(server, reference):
    """SIGKILL of the controller mid-stream: the routers keep serving on their placement (no stream
    notices); a scale meanwhile is refused naming the controller (503) or, once it is back, done;
    the controller comes back with the cluster as it was and scales again."""
    url = server.http_url
    (controller,) = _pids(server.proc.pid, "ray::ControllerActor")
    answers = []

    async def kill_controller(seen):
        os.kill(controller, signal.SIGKILL)
        fault_at = time.monotonic()
        r = await asyncio.to_thread(
            httpx.post, f"{url}/v1/cluster/scale", json={"num_workers": 3}, timeout=CLIENT_TIMEOUT_S
        )
        answers.append(r)
        return fault_at, None

    got, _, _ = asyncio.run(_streams(url, disturb=kill_controller))
    assert got == reference
    (r,) = answers
    assert r.status_code in (200, 503), r.text
    if r.status_code == 503:
        assert "controller" in r.json()["error"]["message"], r.text
    _wait_for(
        "the controller back",
        lambda: _pids(server.proc.pid, "ray::ControllerActor") not in ([], [controller]),
    )
    r = httpx.post(f"{url}/v1/cluster/scale", json={"num_workers": 2}, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200 and r.json()["num_workers"] == 2, r.text
    got, _, _ = asyncio.run(_streams(url))
    assert got == reference
    health = httpx.get(f"{url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["workers"] == 2, health.text


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
                return _Ref((self.process, [self.router.news.pop(0)], (1, 0)))
            await asyncio.sleep(0.01)
        return _Ref((self.process, [], (1, 0)))


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
