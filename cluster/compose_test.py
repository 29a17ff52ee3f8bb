"""End-to-end test of the compose cluster (Dockerfile, docker-compose.yml) on this machine's Docker.

    python -m cluster.compose_test [--keep] [--workers N] [--base-image IMAGE]
                                   [--http-port PORT] [--grpc-port PORT]

Steps, each printed with its duration: find a Docker engine and a compose command; pick the base
image (with no registry in reach, a Debian base built once with debootstrap and kept as
`moe-serving-base:debian-CODENAME`); put this machine's torch wheel and pip's CA bundle into the
build context (cluster/docker/wheelhouse, cluster/docker/certs; both git-ignored); write an env file
with a fresh Ray token; build the image; `up` with N worker nodes; wait until the server is healthy;
from the host, the README's HTTP calls (a completion, a forward, /v1/cluster, /metrics, /healthz);
check the expert workers are on the worker nodes, one per node, none on the head, and the router,
the ingress and the gRPC server on the head (whose container publishes the ports); gRPC health and
a generation; add a worker node (`up --scale ray-worker=N+1`), wait until Ray has it, `moe-serve
scale N+1`, check the new expert worker is on the new node and the server still answers; `down`
and check that no container, network or volume of the test's compose project is left.

Exit status: 0 passed; 1 a step failed (its reason, where the Ray actors run and the services' last
log lines are printed, then the cluster is torn down); 77 skipped, with the reason: no Docker
engine answers here, or no compose command (`docker-compose` or `docker compose`) is installed.
--keep leaves the cluster up at the end, after a failure too, and prints how to take it down.

The test is its own compose project (moe-compose-test) with its own image tag, env file and model
directory (in a temporary directory, removed after a pass), so it touches neither a cluster you run
from this checkout nor your .env; host ports 8000 and 50051 (or --http-port / --grpc-port) must
be free.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from moe_serving.grpc_client import GrpcClient

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
WHEELHOUSE = ROOT / "cluster" / "docker" / "wheelhouse"
CA_BUNDLE = ROOT / "cluster" / "docker" / "certs" / "ca-bundle.crt"
PROJECT = "moe-compose-test"
IMAGE = "moe-serving:compose-test"
DEFAULT_BASE = "python:3.11-slim"  # the Dockerfile's own default
SKIPPED = 77  # automake's "skipped" status
HEALTHY_TIMEOUT_S = 600.0
NODE_TIMEOUT_S = 180.0
PROMPT = "Hello, experts"
# Ray actor classes of the server that must run on the head, whose container publishes the ports.
SERVING_ACTORS = ("RouterActor", "GrpcIngress", "ServeReplica:moe-serving:MoEIngress")


class StepFailed(Exception):
    """A step's check did not hold; the message says what was expected and what was found."""


class Skipped(Exception):
    """The test cannot run here (no Docker); not a failure."""


@dataclass(frozen=True)
class Settings:
    """What one run uses; from the command line."""

    workers: int = 2  # worker nodes at start, and expert workers (one per node)
    keep: bool = False
    base_image: str | None = None  # None: found or built (see base_image)
    http_port: int = 8000
    grpc_port: int = 50051

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")


def run(cmd: list[str], *, env: dict | None = None, timeout: float = 120, check: bool = True, **kw):
    """subprocess.run with text output (captured unless `stdout` is given); a failure raises
    StepFailed with its output."""
    if "stdout" not in kw:
        kw["capture_output"] = True
    try:
        done = subprocess.run(cmd, env=env, timeout=timeout, text=True, **kw)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"`{' '.join(cmd)}` did not finish in {timeout:.0f}s") from None
    if check and done.returncode != 0:
        out = ((done.stdout or "") + (done.stderr or "")).strip()[-3000:]
        raise StepFailed(f"`{' '.join(cmd)}` exited {done.returncode}:\n{out}")
    return done


# ---- Docker and compose on this machine ---------------------------------------------------------


def compose_command() -> list[str]:
    """`docker-compose` (1.29, Debian's) or the `docker compose` v2 plugin, whichever is here."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    raise Skipped("no compose command: neither `docker-compose` nor the `docker compose` plugin is installed")


def check_engine() -> str:
    if not shutil.which("docker"):
        raise Skipped("no `docker` command on PATH")
    try:
        done = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        raise Skipped("the Docker engine did not answer `docker info` within 30s") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no answer"])[-1]
        raise Skipped(f"no Docker engine answers ({why})")
    return done.stdout.strip()


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


class Compose:
    """The test's compose project: every command with its project name, file and environment."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.command, self.env = command, env

    def __call__(self, *args: str, timeout: float = 300, check: bool = True, **kw):
        cmd = [*self.command, "-p", PROJECT, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), *args]
        return run(cmd, env=self.env, timeout=timeout, check=check, **kw)

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service).stdout.split()

    def on_head(self, script: str, timeout: float = 60) -> object:
        """Run `script` as a Ray driver in the head container; the JSON it prints after RESULT."""
        prelude = "import json, logging, ray\nray.init(address='auto', logging_level=logging.ERROR)\n"
        out = self("exec", "-T", "ray-head", "python", "-c", prelude + script, timeout=timeout).stdout
        results = [line[7:] for line in out.splitlines() if line.startswith("RESULT ")]
        if not results:
            raise StepFailed(f"no answer from Ray on the head:\n{out[-2000:]}")
        return json.loads(results[-1])

    def ray_nodes(self) -> list[dict]:
        """Alive Ray nodes: [{"ip", "resources"}]."""
        return self.on_head(
            "nodes = [{'ip': n['NodeManagerAddress'], 'resources': n['Resources']}"
            " for n in ray.nodes() if n['Alive']]\n"
            "print('RESULT ' + json.dumps(nodes))\n"
        )

    def ray_actors(self) -> list[tuple[str, str]]:
        """Alive Ray actors: [(class name, node IP)]."""
        return self.on_head(
            "from ray.util.state import list_actors\n"
            "ips = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()}\n"
            "alive = list_actors(filters=[('state', '=', 'ALIVE')])\n"
            "actors = [(a.class_name, ips.get(a.node_id)) for a in alive]\n"
            "print('RESULT ' + json.dumps(actors))\n"
        )


def container_ip(container: str) -> str:
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    return run(["docker", "inspect", "-f", fmt, container]).stdout.split()[0]


def container_state(container: str) -> tuple[str, str, int]:
    """(status, health, restarts): ("running", "healthy", 0), ("exited", "", 0), ..."""
    fmt = "{{.State.Status}} {{.RestartCount}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"
    status, restarts, health = (run(["docker", "inspect", "-f", fmt, container]).stdout.split() + [""])[:3]
    return status, health, int(restarts)


# ---- the image's inputs -------------------------------------------------------------------------


def os_codename() -> str:
    text = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    found = re.search(r"^VERSION_CODENAME=\"?(\w+)", text, re.M)
    return found.group(1) if found else "bookworm"


def debian_mirror(codename: str) -> str:
    """The Debian mirror apt uses here (debootstrap needs one): the first source for `codename`."""
    for f in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for stanza in f.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if codename in fields.get("Suites", "").split() and fields.get("URIs"):
                return fields["URIs"].split()[0]
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt").glob("sources.list.d/*.list"))]:
        if f.exists():
            found = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{codename}\s", f.read_text(), re.M)
            if found:
                return found.group(1)
    return "http://deb.debian.org/debian"


def base_image(requested: str | None) -> tuple[str | None, str]:
    """(BASE_IMAGE for the build or None for the Dockerfile's default, how it was chosen)."""
    if requested:
        return requested, "as asked"
    codename = os_codename()
    tag = f"moe-serving-base:debian-{codename}"
    if image_exists(tag):
        return tag, "cached debootstrap image"
    if image_exists(DEFAULT_BASE):
        return None, f"{DEFAULT_BASE}, present"
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        return None, f"{DEFAULT_BASE}, to be pulled (no debootstrap as root to build a base here)"
    mirror = debian_mirror(codename)
    with tempfile.TemporaryDirectory(prefix="moe-rootfs-") as rootfs:
        run(["debootstrap", "--variant=minbase", codename, rootfs, mirror], timeout=900)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):  # .debs and indexes: 80 MB
            for p in Path(rootfs, junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        try:
            run(["docker", "import", "-", tag], stdin=tar.stdout, timeout=300)
        finally:
            tar.stdout.close()  # a failed import: tar ends on the broken pipe
            tar_status = tar.wait()
        if tar_status != 0:
            run(["docker", "rmi", tag], check=False)
            raise StepFailed(f"tar of the debootstrap root {rootfs} exited {tar_status}")
    return tag, f"built with debootstrap {codename} from {mirror}"


def pip_settings() -> dict[str, str]:
    """pip's effective settings here (`pip config list` and PIP_* variables): {"cert": ..., ...}."""
    out = run([sys.executable, "-m", "pip", "config", "list"], check=False).stdout
    found = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        found[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    for key in ("cert", "find-links"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            found[key] = env
    return found


def torch_pin() -> str:
    found = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    if not found:
        raise StepFailed("no torch== pin in pyproject.toml")
    return found.group(1)


def stage_build_inputs() -> str:
    """Put the local torch wheel (of pyproject's pin, for this Python) into the wheelhouse and pip's
    CA bundle next to it; both are optional for the Dockerfile."""
    pip, version = pip_settings(), torch_pin()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    notes = []
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    CA_BUNDLE.parent.mkdir(parents=True, exist_ok=True)
    wheels = [
        w
        for d in pip.get("find-links", "").split()
        if Path(d).is_dir()
        for w in Path(d).glob(f"torch-{version}*-{tag}-*.whl")
    ]
    if wheels:
        wheel = sorted(wheels)[0]
        target = WHEELHOUSE / wheel.name
        if not target.exists() or target.stat().st_size != wheel.stat().st_size:  # 190 MB: by size
            shutil.copyfile(wheel, target)
        notes.append(f"wheelhouse: {wheel.name}")
    elif not list(WHEELHOUSE.glob(f"torch-{version}*.whl")):
        notes.append(f"no local torch {version} wheel: the build downloads it (TORCH_INDEX_URL)")
    cert = pip.get("cert")
    if cert and Path(cert).is_file():
        if not CA_BUNDLE.exists() or CA_BUNDLE.read_bytes() != Path(cert).read_bytes():
            shutil.copyfile(cert, CA_BUNDLE)
        notes.append(f"pip CA bundle: {cert}")
    return "; ".join(notes)


# ---- the test -----------------------------------------------------------------------------------


class ComposeTest:
    """The steps, in order; state the later steps need is kept on the instance."""

    def __init__(self, settings: Settings, workdir: Path):
        self.s, self.workdir = settings, workdir
        self.compose: Compose | None = None
        self.base: str | None = None
        self.http = f"http://127.0.0.1:{settings.http_port}"
        self.grpc = f"127.0.0.1:{settings.grpc_port}"
        self.started = False

    def steps(self) -> list[tuple[str, Callable[[], str]]]:
        n = self.s.workers
        steps = [
            ("Docker engine and compose", self.find_docker),
            ("base image", self.pick_base),
            ("torch wheel and CA bundle into the build context", stage_build_inputs),
            ("env file with a fresh Ray token", self.write_env),
            ("build the image", self.build),
            (f"up: head, {n} worker node(s), server", self.up),
            ("server healthy (HTTP /healthz and gRPC health)", self.wait_healthy),
            ("HTTP: completion, forward, cluster, metrics", self.http_calls),
            ("expert workers on the worker nodes, not the head", self.check_placement),
            ("gRPC: health and a generation", self.grpc_calls),
            (f"up --scale ray-worker={n + 1}: a new Ray node", self.add_node),
            (f"moe-serve scale {n + 1}: the new worker on the new node", self.scale_workers),
            ("down: nothing of the project left", self.down),
        ]
        return steps[:-1] if self.s.keep else steps

    # -- setup --

    def find_docker(self) -> str:
        version = check_engine()
        command = compose_command()
        env = {
            **os.environ,
            "MOE_IMAGE": IMAGE,
            "MOE_ENV_FILE": str(self.workdir / "test.env"),
            "MOE_MODELS_DIR": str(self.workdir / "models"),
            "MOE_MODEL": "",
            "MOE_SERVE_ARGS": "",
            "MOE_WORKERS": str(self.s.workers),
            "MOE_BIND_ADDRESS": "127.0.0.1",
            "MOE_HTTP_PORT": str(self.s.http_port),
            "MOE_GRPC_PORT": str(self.s.grpc_port),
        }
        self.compose = Compose(command, env)
        compose_version = run([*command, "version"], check=False).stdout.strip().splitlines()
        return f"engine {version}; {' '.join(command)} ({compose_version[0] if compose_version else '?'})"

    def pick_base(self) -> str:
        self.base, how = base_image(self.s.base_image)
        if self.base:
            self.compose.env["BASE_IMAGE"] = self.base
        return f"{self.base or DEFAULT_BASE}: {how}"

    def build(self) -> str:
        log = self.workdir / "build.log"
        # v1 keeps a failed step's container unless told (v2 builds with BuildKit, which keeps none)
        force_rm = ["--force-rm"] if self.compose.command == ["docker-compose"] else []
        with open(log, "w") as f:
            done = self.compose(
                "build", *force_rm, "ray-head", timeout=3600, check=False, stdout=f, stderr=subprocess.STDOUT
            )
        if done.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-40:])
            raise StepFailed(f"the image build failed (log: {log}):\n{tail}")
        size = run(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE]).stdout.strip()
        return f"{IMAGE}, {int(size) / 1e9:.2f} GB (log: {log})"

    def write_env(self) -> str:
        (self.workdir / "models").mkdir(exist_ok=True)
        token = secrets.token_hex(32)
        (self.workdir / "test.env").write_text(f"RAY_AUTH_MODE=token\nRAY_AUTH_TOKEN={token}\n")
        return str(self.workdir / "test.env")

    # -- the cluster --

    def up(self) -> str:
        for port in (self.s.http_port, self.s.grpc_port):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    raise StepFailed(f"host port {port} is in use (--http-port / --grpc-port)") from None
        self.started = True
        self.compose("up", "-d", "--no-build", "--scale", f"ray-worker={self.s.workers}", timeout=600)
        return ", ".join(sorted(self._names()))

    def _names(self) -> list[str]:
        ids = self.compose("ps", "-q").stdout.split()
        return [run(["docker", "inspect", "-f", "{{.Name}}", i]).stdout.strip().lstrip("/") for i in ids]

    def wait_healthy(self) -> str:
        (server,) = self.compose.containers("server")
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        while True:
            status, health, restarts = container_state(server)
            if health == "healthy":
                break
            if status in ("exited", "dead", "restarting") or health == "unhealthy" or restarts:
                raise StepFailed(
                    f"the server container is {status} ({health or 'no health yet'}, {restarts} restarts)"
                )
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"the server is not healthy after {HEALTHY_TIMEOUT_S:.0f}s ({status}, {health})"
                )
            time.sleep(1)
        ready = [
            line
            for line in self.compose("logs", "--no-color", "server").stdout.splitlines()
            if "serving" in line
        ]
        return ready[-1].split("|", 1)[-1].strip() if ready else "healthy"

    def http_calls(self) -> str:
        with httpx.Client(base_url=self.http, timeout=60) as client:
            r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0})
            if r.status_code != 200:
                raise StepFailed(f"POST /v1/completions: {r.status_code} {r.text[:500]}")
            completion = r.json()
            tokens = completion["choices"][0]["token_ids"]
            if not tokens or completion["usage"]["completion_tokens"] != len(tokens):
                raise StepFailed(f"POST /v1/completions gave no tokens: {completion}")
            r = client.post("/v1/forward", json={"input_ids": [[1, 2, 3]]})
            if r.status_code != 200:
                raise StepFailed(f"POST /v1/forward: {r.status_code} {r.text[:500]}")
            for path in ("/v1/cluster", "/metrics", "/healthz"):
                r = client.get(path)
                if r.status_code != 200:
                    raise StepFailed(f"GET {path}: {r.status_code} {r.text[:500]}")
        return f"completion of {len(tokens)} tokens: {completion['choices'][0]['text']!r}"

    def cluster_workers(self) -> list[dict]:
        r = httpx.get(f"{self.http}/v1/cluster", timeout=60)
        if r.status_code != 200:
            raise StepFailed(f"GET /v1/cluster: {r.status_code} {r.text[:500]}")
        return r.json()["workers"]

    def node_ips(self) -> tuple[str, dict[str, str]]:
        """(the head's IP, {IP: container name} of the worker nodes)."""
        (head,) = self.compose.containers("ray-head")
        workers = {}
        for c in self.compose.containers("ray-worker"):
            workers[container_ip(c)] = (
                run(["docker", "inspect", "-f", "{{.Name}}", c]).stdout.strip().lstrip("/")
            )
        return container_ip(head), workers

    def check_placement(self) -> str:
        head_ip, worker_ips = self.node_ips()
        workers = self.cluster_workers()
        where = {w["worker_id"]: w["node_ip"] for w in workers}
        if len(where) != self.s.workers:
            raise StepFailed(f"{len(where)} expert workers, expected {self.s.workers}: {where}")
        if head_ip in where.values():
            raise StepFailed(f"an expert worker is on the head ({head_ip}): {where}")
        if not set(where.values()) <= set(worker_ips):
            raise StepFailed(f"expert workers on nodes {where} outside the worker containers {worker_ips}")
        if len(set(where.values())) != len(where):
            raise StepFailed(f"expert workers share a node although each worker node is free: {where}")
        # The head publishes the ports: the serving actors must be there (--router-resources).
        serving = {name: ip for name, ip in self.compose.ray_actors() if name.startswith(SERVING_ACTORS)}
        away = {name: ip for name, ip in serving.items() if ip != head_ip}
        if len(serving) < len(SERVING_ACTORS) or away:
            raise StepFailed(
                f"serving actors {serving}: expected each of {SERVING_ACTORS} on the head {head_ip}"
            )
        placed = ", ".join(f"worker {w} on {worker_ips[ip]} ({ip})" for w, ip in sorted(where.items()))
        return f"{placed}; router, ingress and gRPC on the head ({head_ip})"

    def grpc_calls(self) -> str:
        with GrpcClient(self.grpc, timeout=60) as client:
            if not client.health():
                raise StepFailed(f"gRPC health at {self.grpc} is not SERVING")
            chunks = list(client.generate(prompt=PROMPT, max_tokens=8, temperature=0))
        text = "".join(c.text for c in chunks)
        if not chunks or chunks[-1].finish_reason is None:
            raise StepFailed(f"gRPC Generate did not finish: {chunks}")
        return f"health SERVING; Generate: {text!r} ({chunks[-1].finish_reason})"

    def add_node(self) -> str:
        n = self.s.workers + 1
        _, before = self.node_ips()
        self.compose("up", "-d", "--no-build", "--no-recreate", "--scale", f"ray-worker={n}", timeout=300)
        deadline = time.monotonic() + NODE_TIMEOUT_S
        while True:
            nodes = [node for node in self.compose.ray_nodes() if node["resources"].get("expert_node")]
            if len(nodes) == n:
                break
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"Ray has {len(nodes)} worker nodes after {NODE_TIMEOUT_S:.0f}s, expected {n}"
                )
            time.sleep(2)
        _, after = self.node_ips()
        (self.new_ip,) = set(after) - set(before)
        return f"{after[self.new_ip]} ({self.new_ip}) joined; Ray sees {n} worker nodes"

    def scale_workers(self) -> str:
        n = self.s.workers + 1
        before = {w["worker_id"] for w in self.cluster_workers()}
        cli = [sys.executable, "-m", "router_service.cli", "scale", "--url", self.http, str(n)]
        t0 = time.perf_counter()
        first_line = run(cli, timeout=300).stdout.strip().splitlines()[0]
        took = time.perf_counter() - t0
        workers = self.cluster_workers()
        where = {w["worker_id"]: w["node_ip"] for w in workers}
        new = {w: ip for w, ip in where.items() if w not in before}
        if len(where) != n or len(new) != 1:
            raise StepFailed(f"after scaling to {n}: workers {where} (before: {sorted(before)})")
        ((new_worker, new_ip),) = new.items()
        if new_ip != self.new_ip:
            raise StepFailed(
                f"the new worker {new_worker} is on {new_ip}, not on the new node {self.new_ip}: {where}"
            )
        if len(set(where.values())) != n:
            raise StepFailed(f"expert workers share a node: {where}")
        r = httpx.post(f"{self.http}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8}, timeout=60)
        if r.status_code != 200:
            raise StepFailed(f"POST /v1/completions after the scale: {r.status_code} {r.text[:500]}")
        return f"{first_line} (CLI {took:.1f}s); worker {new_worker} on {new_ip}; completions still 200"

    def down(self) -> str:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "60", timeout=300)
        self.started = False
        label = f"label=com.docker.compose.project={PROJECT}"
        left = {
            kind: run(["docker", *cmd, "-q", "--filter", label]).stdout.split()
            for kind, cmd in (
                ("containers", ["ps", "-a"]),
                ("networks", ["network", "ls"]),
                ("volumes", ["volume", "ls"]),
            )
        }
        left = {kind: ids for kind, ids in left.items() if ids}
        if left:
            raise StepFailed(f"left after down: {left}")
        return "no container, network or volume of the project left"

    # -- failure --

    def report_failure(self) -> None:
        if self.compose is None or not self.started:
            return
        print("\n---- where the Ray actors run ----", flush=True)
        try:
            for name, ip in sorted(self.compose.ray_actors(), key=lambda a: (a[1] or "", a[0])):
                print(f"  {ip or '?':<15} {name}")
        except StepFailed as e:
            print(f"  (no answer: {str(e).splitlines()[0]})")
        print("---- the services' last log lines ----", flush=True)
        with contextlib.suppress(StepFailed):
            print(self.compose("logs", "--no-color", "--tail", "40", check=False).stdout)

    def teardown(self) -> None:
        if self.compose is None or not self.started:
            return
        if self.s.keep:
            env_file = self.compose.env["MOE_ENV_FILE"]
            command = f"{' '.join(self.compose.command)} -p {PROJECT} -f {COMPOSE_FILE} down -v"
            print(f"--keep: the cluster is still up; take it down with:\n  MOE_ENV_FILE={env_file} {command}")
            return
        print("tearing down ...", flush=True)
        self.compose("down", "-v", "--remove-orphans", "--timeout", "60", timeout=300, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.compose_test", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker nodes (and expert workers) at start; default 2"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the cluster up at the end, also after a failure (no down step)",
    )
    parser.add_argument("--base-image", help="BASE_IMAGE for the build (default: found or built, see above)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=50051)
    args = parser.parse_args(argv)
    try:
        settings = Settings(args.workers, args.keep, args.base_image, args.http_port, args.grpc_port)
    except ValueError as e:
        parser.error(str(e))
    workdir = Path(tempfile.mkdtemp(prefix="moe-compose-test-"))
    test = ComposeTest(settings, workdir)
    steps = test.steps()
    t_start = t0 = time.perf_counter()
    failed, i, name = None, 0, ""
    try:
        for i, (name, step) in enumerate(steps, 1):
            print(f"[{i:2}/{len(steps)}] {name} ...", flush=True)
            t0 = time.perf_counter()
            detail = step()
            print(f"        ok {time.perf_counter() - t0:7.1f}s  {detail}", flush=True)
    except Skipped as e:
        print(f"SKIPPED: {e}. Nothing was run (exit status {SKIPPED}).")
        shutil.rmtree(workdir, ignore_errors=True)
        return SKIPPED
    except (StepFailed, KeyboardInterrupt) as e:
        failed = e if isinstance(e, StepFailed) else StepFailed("interrupted")
        print(f"        FAILED {time.perf_counter() - t0:.1f}s: {failed}", flush=True)
        test.report_failure()
    finally:
        test.teardown()
    if failed:
        print(f"compose test FAILED at step {i}/{len(steps)} ({name}); files in {workdir}")
        return 1
    if not settings.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"compose test passed in {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
