"""The elastic server as clients see it (real Ray Serve HTTP and gRPC): scaling under 16 concurrent
streams, the scale API's errors, a Router actor killed mid-stream, and no capacity left. No
request may fail, and every completion must equal the same request on an undisturbed engine."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import grpc
import httpx
import pytest
import ray

from moe_serving import ServingError
from moe_serving.grpc_client import GrpcClient
from moe_serving.http_client import AsyncHTTPClient
from router_service import Engine
from router_service.config import BatchLimits
from router_service.default_model import default_model_dir
from router_service.serving.launch import ServerOptions, start_server
from router_service.serving.settings import ServingSettings

THREADS = 1
WAIT_S = 120
STREAMS = 16
PROMPTS = [[33 + (7 * i) % 90, 34 + i, 60, 61 + i] for i in range(STREAMS)]


def sampling(i: int) -> dict:
    """Half the streams greedy, half seeded sampling."""
    return {"temperature": 0.8, "top_p": 0.9, "seed": 1000 + i} if i % 2 else {"temperature": 0.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A copy of the default model: one test takes its weights away for a while."""
    return shutil.copytree(default_model_dir(), tmp_path_factory.mktemp("elastic") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    with start_server(
        model_dir,
        num_workers=2,
        transport="ray",
        options=ServerOptions(http_port=0, grpc_port=0),
        settings=ServingSettings(model_name="tiny-moe", router_restart_timeout_s=90),
        batch_limits=BatchLimits(max_batch_size=32),
        progress="off",
        num_threads=THREADS,
        elastic={"worker_timeout_s": 2.0, "restore_interval_s": 0.5},
    ) as s:
        yield s


def reference(model_dir, tokens: int) -> list[list[int]]:
    """The completions of PROMPTS on an undisturbed in-process engine, streamed together."""
    out: list = [None] * STREAMS
    with Engine.from_pretrained(model_dir, num_workers=2, num_threads=THREADS) as local:

        def run(i):
            params = sampling(i)
            out[i] = [
                t
                for c in local.generate_stream(
                    PROMPTS[i], tokens, params["temperature"], params.get("top_p", 1.0), params.get("seed")
                )
                for t in c["token_ids"]
            ]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return out


async def stream(client: AsyncHTTPClient, i: int, tokens: int) -> list[int]:
    out = []
    async for chunk in client.stream(PROMPTS[i], max_tokens=tokens, **sampling(i)):
        out += chunk.token_ids
    assert len(out) == tokens
    return out


async def streams_while(client, tokens: int, action) -> tuple[list, object]:
    """STREAMS clients streaming completions back to back while `action()` runs (and at least one
    round); every completion of client i, and what action returned."""
    done = asyncio.Event()
    results: list[list[list[int]]] = [[] for _ in range(STREAMS)]

    async def client_loop(i):
        while True:
            results[i].append(await stream(client, i, tokens))
            if done.is_set():
                return

    tasks = [asyncio.create_task(client_loop(i)) for i in range(STREAMS)]
    try:
        while not any(results):  # the load is on before the action starts
            await asyncio.sleep(0.05)
        value = await action()
    finally:
        done.set()
    await asyncio.gather(*tasks)
    return results, value


def test_scale_2_4_1_3_under_16_streams(server, model_dir):
    want = reference(model_dir, 32)

    async def scale_steps():
        steps = []
        async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT_S) as http:
            for n in (4, 1, 3):
                t0 = time.perf_counter()
                r = await http.post("/v1/cluster/scale", json={"num_workers": n})
                assert r.status_code == 200, r.text
                steps.append((n, r.json()["num_workers"], time.perf_counter() - t0))
                await asyncio.sleep(0.5)  # some tokens on the new placement before the next step
        return steps

    async def main():
        async with AsyncHTTPClient(server.http_url, timeout=WAIT_S) as client:
            return await streams_while(client, 32, scale_steps)

    results, steps = asyncio.run(main())
    assert [(n, got) for n, got, _ in steps] == [(4, 4), (1, 1), (3, 3)]
    for i, completions in enumerate(results):
        for got in completions:
            assert got == want[i], f"stream {i} ({sampling(i)}) changed while scaling"
    assert sum(len(c) for c in results) >= STREAMS


def test_scale_api_errors_and_rebalance(server):
    url = server.http_url
    for body, status in (
        ({"num_workers": 0}, 400),
        ({"num_workers": "3"}, 400),
        ({"num_workers": 2.5}, 400),
        ({"num_workers": 99}, 400),
        ({}, 400),
    ):
        r = httpx.post(f"{url}/v1/cluster/scale", json=body, timeout=WAIT_S)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["code"] == "invalid_argument"
    first: dict = {}
    thread = threading.Thread(
        target=lambda: first.update(
            r=httpx.post(f"{url}/v1/cluster/scale", json={"num_workers": 4}, timeout=WAIT_S)
        )
    )
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while httpx.get(f"{url}/v1/cluster", timeout=WAIT_S).json()["elastic"]["changing"] is None:
        assert time.monotonic() < deadline and "r" not in first, "the first scale never showed as running"
        time.sleep(0.02)
    r = httpx.post(f"{url}/v1/cluster/scale", json={"num_workers": 2}, timeout=WAIT_S)
    assert r.status_code == 409 and r.json()["error"]["code"] == "failed_precondition", r.text
    thread.join(WAIT_S)
    assert first["r"].status_code == 200 and first["r"].json()["num_workers"] == 4
    with GrpcClient(server.grpc_target, timeout=WAIT_S) as rpc:
        assert rpc.scale(2)["num_workers"] == 2
        with pytest.raises(ServingError) as e:
            rpc.scale(99)
        assert e.value.status == "INVALID_ARGUMENT"
        balance = rpc.rebalance()
        assert set(balance) >= {"before", "after", "placement_version"}
    r = httpx.post(f"{url}/v1/cluster/rebalance", timeout=WAIT_S)
    assert r.status_code == 200 and r.json()["placement_version"] > balance["placement_version"]
    metrics = httpx.get(f"{url}/metrics", timeout=WAIT_S).text
    assert 'moe_membership_events_total{kind="scale"}' in metrics
    assert 'moe_requests_total{endpoint="scale",protocol="http",status="failed_precondition"} 1.0' in metrics


def test_router_killed_mid_stream_loses_nothing(server, model_dir):
    want = reference(model_dir, 48)

    async def kill_router():
        ray.kill(server.router, no_restart=False)  # Ray restarts it; it reattaches to its workers
        await asyncio.sleep(0)

    async def main():
        async with AsyncHTTPClient(server.http_url, timeout=WAIT_S) as client:
            return await streams_while(client, 48, kill_router)

    results, _ = asyncio.run(main())
    for i, completions in enumerate(results):
        for got in completions:
            assert got == want[i], f"stream {i} ({sampling(i)}) differs after the router restart"
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=WAIT_S).text
    assert "moe_router_restarts_total 1.0" in metrics
    state = httpx.get(f"{server.http_url}/v1/cluster", timeout=WAIT_S).json()
    assert state["num_workers"] == 2 and state["elastic"]["health"]["serving"]


def test_no_capacity_is_503_until_workers_can_start_again(server, model_dir):
    url = server.http_url
    body = {"prompt": [40, 41, 42], "max_tokens": 4, "temperature": 0}
    (model_dir / "model.safetensors").rename(model_dir / "weights.moved")  # new workers cannot load

    def kill_all(router):
        for actor in list(router.dispatcher.transport._actors.values()):
            ray.kill(actor)

    ray.get(server.router.__ray_call__.remote(kill_all))
    try:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=WAIT_S)
        assert r.status_code == 503, r.text
        assert "no expert worker is running and none could be started" in r.json()["error"]["message"]
        health = httpx.get(f"{url}/healthz", timeout=WAIT_S)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert "CheckpointError" in health.json()["reason"]
        with GrpcClient(server.grpc_target, timeout=WAIT_S) as rpc:
            deadline = time.monotonic() + 30
            while rpc.health():
                assert time.monotonic() < deadline, "gRPC health still says SERVING"
                time.sleep(0.2)
            with pytest.raises(ServingError) as e:
                rpc.forward([[40, 41]])
            assert e.value.status == grpc.StatusCode.UNAVAILABLE.name
    finally:
        (model_dir / "weights.moved").rename(model_dir / "model.safetensors")
    deadline = time.monotonic() + WAIT_S
    while httpx.get(f"{url}/healthz", timeout=WAIT_S).status_code != 200:
        assert time.monotonic() < deadline, "not serving again after the weights came back"
        time.sleep(0.2)
    with GrpcClient(server.grpc_target, timeout=WAIT_S) as rpc:
        deadline = time.monotonic() + 30
        while not rpc.health():
            assert time.monotonic() < deadline, "gRPC health does not say SERVING again"
            time.sleep(0.2)
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=WAIT_S)
    assert r.status_code == 200 and len(json.loads(r.text)["choices"][0]["token_ids"]) == 4
