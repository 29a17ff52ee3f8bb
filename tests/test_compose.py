"""The compose cluster: docker-compose.yml and the Dockerfile checked as files (fast, no Docker), and
the end-to-end run of `python -m cluster.compose_test` (image build, cluster up, serve, scale, down)
when MOE_COMPOSE_TEST=1; it takes minutes, so it is opt-in."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SKIPPED = 77  # cluster.compose_test's exit status when there is no Docker to run on


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def command_text(service: dict) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def test_compose_file_structure(compose):
    assert "version" not in compose, "Compose Specification: no top-level version key"
    services = compose["services"]
    assert {"ray-head", "ray-worker", "server"} <= set(services)
    head, worker, server = services["ray-head"], services["ray-worker"], services["server"]
    for name, service in services.items():
        assert service.get("env_file"), f"{name}: the Ray token comes from an env file"
        assert service.get("shm_size"), f"{name}: /dev/shm sized for Ray's object store"
        assert service.get("healthcheck", {}).get("test"), f"{name}: no health check"
    assert "--head" in command_text(head) and "--block" in command_text(head)
    assert re.search(r"--num-cpus[= ]", command_text(head)), "the head's CPUs are set (kept small)"
    assert "ray-head:6379" in command_text(worker) and "expert_node" in command_text(worker)
    assert "build" not in worker and "ports" not in worker, "worker nodes scale: nothing fixed to publish"
    serve = command_text(server)
    assert "moe-serve serve" in serve and "--ray-address ray-head:6379" in serve
    assert "--host 0.0.0.0" in serve and "expert_node" in serve
    # the router and the serving actors stay on the head, whose container publishes the ports
    assert '"head"' in command_text(head) and "--router-resources" in serve
    assert server["depends_on"]["ray-head"]["condition"] == "service_healthy"


def interpolate(text: str, env: dict[str, str]) -> str:
    """What compose makes of ${VAR}, ${VAR:-default} and $$ in `text` (the forms the file uses)."""

    def value(m: re.Match) -> str:
        if m[0] == "$$":
            return "$"
        name, default = m[1], m[2] or ""
        return env.get(name) or default

    return re.sub(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}", value, text)


def server_flags(compose: dict, env: dict[str, str]):
    """`moe-serve serve`'s arguments as the server container runs them with `env` set for compose:
    compose's interpolation, then the container's shell (word splitting, quotes, ${MOE_MODEL:+...})."""
    from router_service.cli import build_parser

    command = compose["services"]["server"]["command"]
    assert command[:2] == ["sh", "-c"], command
    line = interpolate(command[2], env)
    assert line.startswith("exec moe-serve serve "), line
    words = subprocess.run(
        ["sh", "-c", "printf '%s\\n' " + line.removeprefix("exec moe-serve serve ")],
        env={"PATH": os.environ.get("PATH", ""), "MOE_MODEL": env.get("MOE_MODEL", "")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return build_parser().parse_args(["serve", *words])


def test_routers_on_nodes_of_their_own(compose):
    """The `routers` profile: router-node services for routers only; by default (no profile, no
    MOE_ROUTER* settings) the server's flags put its one router on the head, as before."""
    services = compose["services"]
    node = services["router-node"]
    assert node.get("profiles") == ["routers"], "off unless the profile is asked for"
    text = command_text(node)
    assert "ray-head:6379" in text and "--block" in text and "--num-cpus=0" in text
    assert '{"router_node": 1}' in text and "expert_node" not in text
    assert "build" not in node and "ports" not in node, "router nodes scale: nothing fixed to publish"
    assert node["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "healthcheck.py ray-worker" in " ".join(node["healthcheck"]["test"])
    for name in ("ray-head", "ray-worker"):
        assert "router_node" not in command_text(services[name]), f"{name} must not offer router_node"

    plain = server_flags(compose, {})
    assert plain.num_routers == 1 and plain.router_resources == {"head": 0.01}
    assert plain.serving_resources == {"head": 0.01} and plain.worker_resources == {"expert_node": 1}
    assert plain.model is None and plain.ray_address == "ray-head:6379"
    routed = server_flags(
        compose, {"MOE_ROUTERS": "2", "MOE_ROUTER_RESOURCE": "router_node", "MOE_MODEL": "/models/m"}
    )
    assert routed.num_routers == 2 and routed.router_resources == {"router_node": 0.01}
    assert routed.serving_resources == {"head": 0.01}, "the controller, ingress and gRPC stay on the head"
    assert str(routed.model) == "/models/m"
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^# MOE_ROUTERS=1$", example, re.M) and re.search(
        r"^# MOE_ROUTER_RESOURCE=head$", example, re.M
    )


def test_ports_published_and_health_checked(compose):
    services = compose["services"]
    # The server runs in the head's network namespace (a Ray driver belongs on a node), so the
    # head's container publishes the server's ports.
    assert services["server"]["network_mode"] == "service:ray-head"
    ports = services["ray-head"]["ports"]
    published = {int(p.rsplit(":", 1)[-1]) for p in ports}
    assert {8000, 50051} <= published
    assert all(p.startswith("${MOE_BIND_ADDRESS:-127.0.0.1}:") for p in ports), "loopback by default"
    check = " ".join(services["server"]["healthcheck"]["test"])
    assert "healthcheck.py server" in check
    script = (ROOT / "cluster" / "docker" / "healthcheck.py").read_text()
    assert "/healthz" in script and "grpc_health" in script


def test_token_auth_and_volumes(compose):
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^RAY_AUTH_MODE=token$", example, re.M)
    assert re.search(r"^RAY_AUTH_TOKEN=$", example, re.M), "no token committed: each cluster makes its own"
    server = compose["services"]["server"]
    assert server["environment"]["MOE_SERVING_CACHE"] == "/cache"
    mounts = " ".join(server["volumes"])
    assert "moe-cache:/cache" in mounts and ":/models" in mounts
    assert "moe-cache" in compose["volumes"]


def test_dockerfile_build_args():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=", dockerfile, re.M), "the CUDA torch build is a build argument"
    assert "wheelhouse" in dockerfile and "--find-links" in dockerfile
    assert re.search(r"^USER \w+", dockerfile, re.M), "runs as a non-root user"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git", "models"} <= set(ignored), (
        "no secrets, environments or weights in the context"
    )


@pytest.mark.skipif(
    os.environ.get("MOE_COMPOSE_TEST") != "1",
    reason="slow (builds the image, starts a cluster): run with MOE_COMPOSE_TEST=1 "
    "(needs a Docker engine and docker-compose), or directly: python -m cluster.compose_test",
)
def test_compose_end_to_end():
    done = subprocess.run([sys.executable, "-m", "cluster.compose_test"], cwd=ROOT, timeout=3600)
    if done.returncode == SKIPPED:
        pytest.skip(
            "cluster.compose_test found no Docker engine or compose command here (its output says which)"
        )
    assert done.returncode == 0, "python -m cluster.compose_test failed: its output above says at which step"
