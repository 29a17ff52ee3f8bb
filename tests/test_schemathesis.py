"""schemathesis against a real server, on a small budget: requests generated from /openapi.json
(valid and not) get documented answers (status, content type, body), never a 5xx or a hang, and the
server answers the same greedy completion afterwards.

Left out: `positive_data_acceptance` (a schema-valid body may still be refused for what a schema
cannot say: token ids past the vocabulary, a prompt past the context, two structured outputs at
once; each is a 400 that names it), and the cluster-changing routes (scale, routers, rebalance:
each call starts or stops processes, too slow for CI; `docs/serving.md` says how to run them).
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from router_service.config import BatchLimits
from router_service.default_model import default_model_dir
from router_service.serving.launch import ServerOptions, start_server
from router_service.serving.settings import ServingSettings

pytest.importorskip("schemathesis")

EXAMPLES = 5  # per operation and phase (the coverage phase adds its own: ~1000 requests in all)
PROBE = {"prompt": "Hello, experts", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    # A short context, so that a generated chat without max_tokens ends quickly.
    settings = ServingSettings(max_model_len=64, max_request_tokens=256)
    with start_server(
        default_model_dir(),
        num_workers=2,
        options=ServerOptions(http_port=0, grpc_port=0),
        settings=settings,
        batch_limits=BatchLimits(max_batch_size=8, max_waiting=64),
        progress="off",
    ) as s:
        yield s


def test_generated_requests_get_documented_answers(server):
    before = httpx.post(f"{server.http_url}/v1/completions", json=PROBE, timeout=120).json()
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server.http_url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--exclude-path-regex",
        "/v1/cluster/(scale|routers|rebalance)",
        "--max-examples",
        str(EXAMPLES),
        "--max-response-time",
        "60",
        "--request-timeout",
        "120",
        "--workers",
        "1",
        "--seed",
        "17",
        "--generation-deterministic",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    after = httpx.post(f"{server.http_url}/v1/completions", json=PROBE, timeout=120).json()
    assert after["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]
    assert httpx.get(f"{server.http_url}/health", timeout=30).status_code == 200
