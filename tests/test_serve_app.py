"""The Serve application as Ray users deploy it: the committed config is valid and current, the
builder's arguments are checked, and on a real `ray start` cluster `serve deploy` and `serve run`
start the server (HTTP and gRPC), `serve status` says healthy and `serve shutdown` removes it all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.serve_app import CONFIG_HEADER, AppArgs, build_app, serve_config
from moe_serving.grpc_client import GrpcClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WAIT_S = 180
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a loopback test cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_committed_serve_config_is_valid_and_current():
    text = (REPO / "cluster" / "serve_config.yaml").read_text()
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema
    app = config["applications"][0]
    assert app["import_path"] == "cluster.serve_app:build_app"
    assert text == CONFIG_HEADER + yaml.safe_dump(
        serve_config(AppArgs.from_args(app["args"])), sort_keys=False
    ), "cluster/serve_config.yaml is stale: python -m cluster.serve_app > cluster/serve_config.yaml"


def test_app_args_from_the_command_line_and_bad_ones():
    a = AppArgs.from_args(
        {
            "num_workers": "3",
            "worker_resources": '{"expert_node": 1}',
            "worker_gpus": "none",
            "rebalance_threshold": 1,
        }
    )
    assert a.num_workers == 3 and a.worker_resources == {"expert_node": 1} and a.worker_gpus is None
    assert a.rebalance_threshold == 1.0
    with pytest.raises(ValueError, match=r"unknown application argument\(s\) \['workers'\]"):
        AppArgs.from_args({"workers": 2})
    with pytest.raises(ValueError, match="num_workers='two' is not a valid int"):
        AppArgs.from_args({"num_workers": "two"})
    with pytest.raises(ValueError, match="num_workers must be between 1 and the number of expert slots"):
        build_app({"num_workers": 99})
    with pytest.raises(ValueError, match="needs a Ray transport"):
        build_app({"transport": "local"})


def test_routers_on_nodes_of_their_own_and_the_serving_actors_on_the_head():
    """num_routers, router_strategy and router_autoscaling_config reach the config; router_resources
    place the routers and serving_resources the ingress (and, through the config, the controller and
    the gRPC actor); without serving_resources they follow router_resources, as before."""
    app = build_app(
        {
            "num_routers": "3",
            "router_strategy": "STRICT_SPREAD",
            "router_resources": '{"router_node": 1}',
            "serving_resources": '{"head": 0.01}',
            "router_autoscaling_config": '{"min_routers": 2, "max_routers": 6}',
        }
    )
    config = app._bound_deployment.init_args[0]
    assert config.num_routers == 3 and config.router_strategy == "STRICT_SPREAD"
    assert config.elastic.router_autoscaling.max_routers == 6
    assert config.router_resources == {"router_node": 1}
    assert config.serving_actor_resources == {"head": 0.01}
    assert app._bound_deployment.ray_actor_options == {"num_cpus": 0, "resources": {"head": 0.01}}
    app = build_app({"router_resources": {"head": 0.01}})
    assert app._bound_deployment.init_args[0].serving_actor_resources == {"head": 0.01}
    assert app._bound_deployment.ray_actor_options["resources"] == {"head": 0.01}
    with pytest.raises(ValueError, match="router_strategy must be"):
        build_app({"router_strategy": "RANDOM"})
    with pytest.raises(ValueError, match="min_routers <= max_routers"):
        build_app({"router_autoscaling_config": {"min_routers": 3, "max_routers": 2}})


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node Ray cluster started with `ray start --head` (its own process group)."""
    port, dashboard = free_port(), free_port()
    log = (tmp_path_factory.mktemp("head") / "head.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--num-cpus=6"],
        env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{dashboard}/api/version", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        stop_group(proc)
        log.close()
        forget_cluster(port)


def forget_cluster(port: int) -> None:
    """Remove Ray's "latest `ray start` cluster" note when it names ours (`ray stop` would): a stale
    one makes a later plain `ray.init()` on this machine try to join the dead cluster."""
    note = Path("/tmp/ray/ray_current_cluster")
    if note.is_file() and note.read_text().strip().endswith(f":{port}"):
        note.unlink()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left (gcs_server ignores SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(3)


def run(*cmd: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(BIN / cmd[0]), *cmd[1:]],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def wait_serving(head: dict, http: int, grpc: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        status = run("serve", "status", "--address", head["dashboard"]).stdout
        if "status: RUNNING" in status and "HEALTHY" in status:
            break
        assert "DEPLOY_FAILED" not in status and "UNHEALTHY" not in status, status
        assert time.monotonic() < deadline, f"not healthy in {WAIT_S}s:\n{status}"
        time.sleep(1)
    r = httpx.post(
        f"http://127.0.0.1:{http}/v1/completions",
        json={"prompt": [40, 41, 42], "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 4, r.text
    with GrpcClient(f"127.0.0.1:{grpc}", timeout=60) as client:
        deadline = time.monotonic() + 30
        while not client.health():
            assert time.monotonic() < deadline, "gRPC health never said SERVING"
            time.sleep(0.2)
        assert len([t for c in client.generate(prompt_token_ids=[40, 41], max_tokens=3, temperature=0)
                    for t in c.token_ids]) == 3  # fmt: skip


def named_actors(head: dict) -> list[str]:
    code = (
        f"import json, ray; ray.init(address={head['address']!r}, logging_level='ERROR');"
        "print(json.dumps(sorted(a['name'] for a in ray.util.list_named_actors(all_namespaces=True))))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def shut_down(head: dict) -> None:
    run("serve", "shutdown", "-y", "--address", head["dashboard"])
    deadline = time.monotonic() + WAIT_S
    while left := [n for n in named_actors(head) if n.startswith(("moe-serving", "SERVE"))]:
        assert time.monotonic() < deadline, f"left running after serve shutdown: {left}"
        time.sleep(1)


def test_serve_deploy_then_serve_run_start_the_server_and_shutdown_removes_it(head, tmp_path):
    http, grpc = free_port(), free_port()
    config = serve_config(AppArgs(grpc_port=grpc, progress="off"), http_host="127.0.0.1", http_port=http)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    run("serve", "deploy", str(path), "--address", head["dashboard"])
    wait_serving(head, http, grpc)
    actors = named_actors(head)
    assert {
        "moe-serving:controller",
        "moe-serving:router-0",
        "moe-serving:grpc",
        "moe-serving:worker-0",
        "moe-serving:worker-1",
    } <= set(actors)
    shut_down(head)

    http, grpc = free_port(), free_port()
    # `serve run` has no HTTP port flag: Serve is started first with one, and the app deployed onto it
    run("serve", "start", "--address", head["address"], "--http-host", "127.0.0.1", "--http-port", str(http))
    run(
        "serve", "run", "--non-blocking", "--address", head["address"], "cluster.serve_app:build_app",
        "num_workers=1", f"grpc_port={grpc}", "progress=off",
    )  # fmt: skip
    wait_serving(head, http, grpc)
    assert "moe-serving:worker-1" not in named_actors(head)
    shut_down(head)
