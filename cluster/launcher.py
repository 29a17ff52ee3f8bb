"""The `ray start` launcher: the docker-compose topology on this machine, without Docker.

`LocalCluster(base_dir, workers=N).up()` (or `python -m cluster up --workers N`) starts a Ray head
node and N Ray worker nodes with `ray start --block`, then `moe-serve serve` joined to them, and
returns once the server prints its ready line. `router_nodes=K` (`--router-nodes K`) adds K router
nodes and runs K routers, one on each. `status()` says what runs, `kill_node(i)` SIGKILLs a
worker or router node (a node failure), `add_node()` adds one, `down()` stops exactly what `up` started. State
(pids, ports, addresses) lives in `BASE/cluster.json`; logs in `BASE/logs/`, each node's Ray
session under `BASE/n<i>/`. Linux only: processes are found through /proc.

Choices, checked against Ray 2.60 on one machine:

- Temp dirs: one per node (`--temp-dir BASE/n<i>`). Ray 2.60 accepts a different temp dir on each
  node of one machine, so each node's sockets and logs stay apart. The ports Ray would otherwise
  fix (dashboard agent 52365, client server 10001, the 10002-19999 worker range) are set to 0 or to
  a free port, so nodes, and clusters of different base dirs, never collide. Ray replaces
  127.0.0.1 by the machine's address as the node IP and listens on all interfaces; the server's
  HTTP and gRPC ports stay on 127.0.0.1 (its default `--host`).
- Token authentication stays on. `up` generates a token (as `ray get-auth-token --generate` does,
  but into `BASE/auth_token`, mode 0600, leaving `~/.ray/auth_token` alone) and gives every process
  it starts `RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...`. To reach the cluster yourself:
  `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat BASE/auth_token)`.
- Resources, as in docker-compose: each worker node has `--num-cpus C --resources
  '{"expert_node": S}'` (C = 1, S = 16 by default) and the server asks `--worker-resources
  '{"expert_node": 1}' --worker-cpus C/S`: an expert worker takes one of S slots, so up to S workers
  share a node (the workers of a lost node are replaced on the nodes left), the CPU request never
  binds before the slots do, and the head, without `expert_node`, never hosts one. The head has
  `{"head": 1}` (and 1 CPU) and the server asks `--router-resources '{"head": 0.01}'`: the router,
  the Serve ingress replica (so Serve's HTTP proxy too) and the gRPC server run on the head. Without
  it Ray puts these zero-CPU actors on any node, and a worker node that fails takes them along
  (measured: the ingress on a worker node in about half the starts). Worker nodes only host expert
  workers, so losing one costs only those.
- Router nodes (`router_nodes=K`, none by default): K more nodes with `--num-cpus 0 --resources
  '{"router_node": 1}'`, and the server asks `--routers K --router-resources '{"router_node": 0.01}'
  --serving-resources '{"head": 0.01}'`: the routers (the dense model, KV caches, decode steps) go
  to the router nodes, one per node while there are nodes without one (SPREAD), and the
  controller, the ingress and the gRPC server stay on the head. The share 0.01 only marks the
  nodes: `moe-serve routers N` with N above K puts a second router on a router node rather than
  waiting for a node. No CPUs: nothing else lands there. Losing a router node loses its router
  only; its streams move to the others.
- Stopping is exact: every process `up` starts carries `MOE_CLUSTER_PROCESS=<cluster id>/<role>` in
  its environment and passes it on (a raylet's actor workers inherit it), so `down` and `kill_node`
  signal only processes with this cluster's tag, never `ray stop` (which stops every Ray on the
  machine). Each node is a `ray start --block` in a session of its own: SIGTERM to it stops its
  processes (without Ray's drain: `down` stops the server first, so nothing is left to drain);
  SIGKILL follows for whatever is left after `stop_timeout_s`.
- Gone means gone: `down` and `kill_node` return once each process they stopped has exited (by
  /proc/<pid>/stat), not once the tag scan stops finding it, which happens as soon as a process
  begins to exit (see `is_running`). A process is known by its pid and start time, so a pid the
  kernel has since given to another process is neither waited for nor signalled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TAG_ENV = "MOE_CLUSTER_PROCESS"
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
SLOT_RESOURCE = "expert_node"  # worker nodes have S of it, each expert worker asks for 1
HEAD_RESOURCE = "head"  # the head has 1, the router and the serving actors ask for 0.01 each
ROUTER_RESOURCE = "router_node"  # router nodes have 1, each router asks for 0.01 (it marks the nodes)
NODE_READY = "Ray runtime started"
SERVER_READY = re.compile(r"^moe-serve: serving .* HTTP (\S+)\s+gRPC (\S+)", re.M)
# The GCS (on the head) checks each node every second, not every 3 s, and declares it dead after 5
# missed checks as Ray does. A lost expert worker the router notices at once, but until its node is
# declared dead Ray still offers that node to the replacement worker, so the server is back to full
# size later (MEASURED). A check still waits Ray's 10 s for an answer, so a node slowed down by a
# loaded machine is not taken for dead.
HEAD_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
# Ray processes of a node that are not actors: left out of the actor list of `status`.
NOT_ACTORS = {"IDLE", "DashboardAgent", "RuntimeEnvAgent"}
# How long `down` and `kill_node` wait for SIGKILLed processes to exit before they give up on them:
# only a process stuck in the kernel takes more than seconds. Apart from stop_timeout_s (the grace
# after SIGTERM, a choice), so a short grace does not cut short an exit slowed by a loaded machine.
KILL_TIMEOUT_S = 60.0


class LauncherError(RuntimeError):
    """A one-line reason, plus the tail of the log that shows it (may be empty)."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.message, self.log_tail = message, log_tail

    def __str__(self) -> str:
        return f"{self.message}\n{self.log_tail}" if self.log_tail else self.message


@dataclass(frozen=True)
class ClusterOptions:
    """What `up` starts; the server's own defaults (model, ports) apply where a field is None."""

    workers: int = 2  # Ray worker nodes (besides the head)
    router_nodes: int = 0  # Ray nodes for routers only, and the server's routers (one each); 0: on the head
    expert_workers: int | None = None  # the server's expert workers; None: one per worker node
    model: str | None = None  # checkpoint directory; None: the built-in default model
    http_port: int | None = None  # 0: a free port
    grpc_port: int | None = None
    node_cpus: int = 1  # logical CPUs of each worker node
    head_cpus: int = 1  # logical CPUs of the head (for Ray tasks that ask for none in particular)
    slots_per_node: int = 16  # expert workers one worker node may host
    ray_port: int | None = None  # the head's GCS port; None: a free one
    server_args: tuple[str, ...] = ()  # more `moe-serve serve` flags
    node_timeout_s: float = 180.0  # a Ray node once took a minute to start on a loaded machine
    server_timeout_s: float = 600.0  # the server gives up by itself after its --ready-timeout
    stop_timeout_s: float = 60.0  # SIGTERM, then SIGKILL after this long

    def __post_init__(self):
        object.__setattr__(self, "server_args", tuple(self.server_args))
        if self.workers < 1:
            raise ValueError(f"workers (worker nodes) must be >= 1, got {self.workers}")
        if self.router_nodes < 0:
            raise ValueError(f"router_nodes must be >= 0, got {self.router_nodes}")
        if self.expert_workers is not None and self.expert_workers < 1:
            raise ValueError(f"expert_workers must be >= 1, got {self.expert_workers}")
        if self.node_cpus < 1 or self.head_cpus < 0:
            raise ValueError(
                f"node_cpus must be >= 1 and head_cpus >= 0, got {self.node_cpus}, {self.head_cpus}"
            )
        if self.slots_per_node < 1:
            raise ValueError(f"slots_per_node must be >= 1, got {self.slots_per_node}")
        for name in ("http_port", "grpc_port", "ray_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be 0-65535, got {port}")
        if "--ray-address" in self.server_args:
            raise ValueError(
                "server_args must not set --ray-address: the launcher joins the server to its head"
            )

    @property
    def num_expert_workers(self) -> int:
        return self.workers if self.expert_workers is None else self.expert_workers

    @property
    def worker_cpus(self) -> float:
        """Ray CPUs per expert worker: a slot's share of a node's CPUs."""
        return self.node_cpus / self.slots_per_node


@dataclass
class NodeRecord:
    index: int  # 0: the head
    pid: int  # the `ray start --block` process
    log: str
    temp_dir: str
    node_id: str = ""  # the Ray node id, once its raylet runs
    start: int = 0  # the process's start time (`process_start`): with the pid, it names the process
    router: bool = False  # a router node (ROUTER_RESOURCE) rather than a worker node

    @property
    def role(self) -> str:
        return "head" if self.index == 0 else "router" if self.router else "worker"


@dataclass
class ServerRecord:
    pid: int
    log: str
    http_url: str = ""
    grpc_target: str = ""
    start: int = 0  # the process's start time (`process_start`)


@dataclass
class ClusterState:
    cluster_id: str
    ray_address: str
    options: dict
    nodes: list[NodeRecord] = field(default_factory=list)
    server: ServerRecord | None = None

    @classmethod
    def from_json(cls, data: dict) -> ClusterState:
        server = data.get("server")
        return cls(
            cluster_id=data["cluster_id"],
            ray_address=data["ray_address"],
            options=data["options"],
            nodes=[NodeRecord(**n) for n in data["nodes"]],
            server=ServerRecord(**server) if server else None,
        )


@dataclass(frozen=True)
class NodeStatus:
    index: int
    role: str
    pid: int
    alive: bool  # any of the node's processes still runs
    node_id: str
    processes: int
    actors: tuple[str, ...]  # Ray actors whose processes run on this node, e.g. "RayExpertWorker"


@dataclass(frozen=True)
class ClusterStatus:
    base_dir: str
    running: bool  # a state file with at least one live process
    ray_address: str = ""
    nodes: tuple[NodeStatus, ...] = ()
    server_pid: int | None = None
    server_alive: bool = False
    http_url: str = ""
    grpc_target: str = ""
    health: str = ""  # the server's GET /healthz answer ("200 {...}"), or why there is none


# ---- processes, through /proc --------------------------------------------------------------------


def tagged_processes(cluster_id: str) -> dict[int, str]:
    """pid -> role ("node-<i>" or "server") of every live process with this cluster's tag. It
    misses a process that has begun to exit, though that may run on for a while (`is_running`)."""
    prefix = f"{TAG_ENV}={cluster_id}/".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()  # empty for a zombie
        except OSError:  # gone, exiting (ESRCH once its memory is released), or not ours to read
            continue
        for var in environ.split(b"\0"):
            if var.startswith(prefix):
                found[int(entry)] = var[len(prefix) :].decode()
                break
    return found


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of process `pid` from /proc/<pid>/stat; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold anything
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5); the start in clock ticks since boot


def process_start(pid: int) -> int | None:
    """When process `pid` started (None: there is none). The kernel reuses a pid, not a pid with
    its start time: the pair names one process, the pid alone only until that process is reaped."""
    stat = _stat(pid)
    return stat[1] if stat else None


def is_running(pid: int, start: int | None = None) -> bool:
    """Whether process `pid` (started at `start`, if given) has not exited: /proc/<pid>/stat is
    there, in a state other than zombie ('Z') or dead ('X'), with that start time. This, not the tag
    scan, says when a process is gone: once a process begins to exit (SIGKILL, say) its
    /proc/<pid>/environ is unreadable, as its memory is being released, so `tagged_processes` no
    longer lists it; yet it runs on until it has released everything (MEASURED: up to 1.5 s for a
    2 GB heap on an idle machine; when `kill_node` went by the tag scan, one of a node's Ray
    processes still ran after it returned)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and start in (None, stat[1])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return [""]


def _actor_name(pid: int) -> str | None:
    """The Ray actor (or worker kind) a process runs, from the title Ray gives it ("ray::Name.method")."""
    argv0 = _cmdline(pid)[0]
    if not argv0.startswith("ray::"):
        return None
    name = argv0.removeprefix("ray::").split(".", 1)[0].split(" ", 1)[0]
    return None if name in NOT_ACTORS else name


def _signal(pids, sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_until(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def _tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # Ray listens on every interface
        return s.getsockname()[1]


def _check_port_free(port: int, what: str) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise LauncherError(f"{what} port {port} is in use ({e.strerror})") from None


def find_ray() -> str:
    """The `ray` command of this Python environment, else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise LauncherError(
            f"`ray` not found next to {sys.executable} or on PATH; install the project (ray[serve])"
        )
    return found


def default_base_dir() -> Path:
    """Per user, under the system temp dir; a second cluster of one user needs its own --base-dir."""
    return Path(tempfile.gettempdir()) / f"moe-cluster-{os.getuid()}"


# ---- the cluster ---------------------------------------------------------------------------------


class LocalCluster:
    """A Ray head, worker nodes (and router nodes, `router_nodes=K`) and the MoE server on this
    machine. `LocalCluster(base_dir, workers=2).up()`; `status()`, `kill_node(i)`, `add_node()`, `down()`; `http_url`,
    `grpc_target`, `ray_address` once up. Another process may attach to a running cluster with
    `LocalCluster(base_dir)` (its options come from the state file)."""

    def __init__(self, base_dir: str | Path | None = None, options: ClusterOptions | None = None, **fields):
        self.base_dir = Path(base_dir) if base_dir is not None else default_base_dir()
        self.state = self._load()
        if options is None and self.state is not None and not fields:
            try:
                options = ClusterOptions(**self.state.options)
            except (TypeError, ValueError) as e:
                raise LauncherError(f"unreadable options in {self.state_path}: {e}") from None
        self.options = dataclasses.replace(options or ClusterOptions(), **fields)
        self._children: dict[int, subprocess.Popen] = {}  # started by this object: reaped on stop

    # ---- state ----------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.base_dir / STATE_FILE

    def _load(self) -> ClusterState | None:
        try:
            return ClusterState.from_json(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise LauncherError(f"unreadable state file {self.state_path}: {e}") from None

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self.state), indent=2))
        tmp.replace(self.state_path)

    def _processes(self) -> dict[int, str]:
        return tagged_processes(self.state.cluster_id) if self.state else {}

    def _require_up(self) -> ClusterState:
        if self.state is None:
            raise LauncherError(f"no cluster in {self.base_dir} (start one with `python -m cluster up`)")
        return self.state

    @property
    def ray_address(self) -> str:
        return self._require_up().ray_address

    @property
    def http_url(self) -> str:
        return self._serving().http_url

    @property
    def grpc_target(self) -> str:
        return self._serving().grpc_target

    def _serving(self) -> ServerRecord:
        server = self._require_up().server
        if server is None or not server.http_url:
            raise LauncherError(f"the server of the cluster in {self.base_dir} is not serving")
        return server

    # ---- up -------------------------------------------------------------------------------------

    def up(self) -> ClusterStatus:
        """Start the head, the worker nodes, the router nodes and the server; return once the server
        is ready. On any failure, stop what was started and raise LauncherError naming what failed."""
        if self.state is not None:
            if self._processes():
                raise LauncherError(
                    f"a cluster is already up in {self.base_dir}; `python -m cluster down --base-dir "
                    f"{self.base_dir}` first, or choose another --base-dir"
                )
            self.state = None  # what a crashed or killed cluster left behind
        ray = find_ray()
        opts = self.options
        for port, what in ((opts.http_port, "HTTP"), (opts.grpc_port, "gRPC"), (opts.ray_port, "Ray GCS")):
            if port:
                _check_port_free(port, what)
        (self.base_dir / "logs").mkdir(parents=True, exist_ok=True)
        token_path = self.base_dir / TOKEN_FILE
        token_path.unlink(missing_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        ray_port = opts.ray_port or _free_port()
        self.state = ClusterState(
            cluster_id=secrets.token_hex(8),
            ray_address=f"127.0.0.1:{ray_port}",
            options=dataclasses.asdict(opts),
        )
        self._save()
        try:
            self._start_node(ray, 0)
            self._wait_gcs()  # the worker nodes start once they can join, while the head finishes
            added = [self._start_node(ray, i) for i in range(1, opts.workers + 1)]
            first = opts.workers + 1
            added += [self._start_node(ray, i, router=True) for i in range(first, first + opts.router_nodes)]
            self._wait_nodes([0, *added])
            self._start_server()
        except BaseException:
            self.down()
            raise
        return self.status()

    def _env(self, role: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", TAG_ENV)}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=(self.base_dir / TOKEN_FILE).read_text().strip(),
            RAY_USAGE_STATS_ENABLED="0",
            # `down` stops the server first: a node has nothing left to drain when SIGTERM comes.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            **{TAG_ENV: f"{self.state.cluster_id}/{role}"},
        )
        if role == "node-0":
            env.update(HEAD_ENV)
        return env

    def _spawn(self, argv: list[str], role: str, log_path: Path) -> subprocess.Popen:
        with log_path.open("wb") as out:  # a fresh log: an old ready line must not count
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(role),
                start_new_session=True,  # its own process group: no terminal signal reaches it
            )
        self._children[proc.pid] = proc
        return proc

    def node_argv(self, ray: str, index: int, router: bool = False) -> list[str]:
        """The `ray start` command line of node `index` (0: the head; a router node if `router`)."""
        opts = self.options
        temp_dir = self.base_dir / f"n{index}"  # short: Ray's unix socket paths live under it
        argv = [ray, "start", "--block", "--temp-dir", str(temp_dir), "--disable-usage-stats"]
        argv += ["--log-style", "record", "--log-color", "false", "--dashboard-agent-listen-port", "0"]
        argv += ["--min-worker-port", "0", "--max-worker-port", "0"]
        if index == 0:
            argv += ["--head", "--port", self._require_up().ray_address.rsplit(":", 1)[1]]
            argv += ["--num-cpus", str(opts.head_cpus), "--resources", json.dumps({HEAD_RESOURCE: 1})]
            argv += ["--include-dashboard", "false"]
            argv += ["--dashboard-port", "0", "--ray-client-server-port", str(_free_port())]
        elif router:
            argv += ["--address", self._require_up().ray_address, "--num-cpus", "0"]
            argv += ["--resources", json.dumps({ROUTER_RESOURCE: 1})]
        else:
            argv += ["--address", self._require_up().ray_address, "--num-cpus", str(opts.node_cpus)]
            argv += ["--resources", json.dumps({SLOT_RESOURCE: opts.slots_per_node})]
        return argv

    def _start_node(self, ray: str, index: int, router: bool = False) -> int:
        temp_dir = self.base_dir / f"n{index}"
        log_path = self.base_dir / "logs" / f"node-{index}.log"
        argv = self.node_argv(ray, index, router)
        log.info("starting %s node %d", "head" if index == 0 else "router" if router else "worker", index)
        proc = self._spawn(argv, f"node-{index}", log_path)
        start = process_start(proc.pid) or 0  # our child, not yet reaped: its pid is still its own
        record = NodeRecord(index, proc.pid, str(log_path), str(temp_dir), start=start, router=router)
        self.state.nodes.append(record)
        self._save()
        return index

    def _node(self, index: int) -> NodeRecord:
        for node in self._require_up().nodes:
            if node.index == index:
                return node
        raise LauncherError(f"no node {index} in the cluster in {self.base_dir}")

    def _wait_gcs(self) -> None:
        """Wait until the head's GCS port accepts connections."""
        head, port = self._node(0), int(self.state.ray_address.rsplit(":", 1)[1])
        deadline = time.monotonic() + self.options.node_timeout_s
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            if head.pid not in self._processes():
                raise LauncherError(f"head node 0 exited while starting (log {head.log})", _tail(head.log))
            if time.monotonic() > deadline:
                raise LauncherError(
                    f"head node 0: its GCS did not listen on port {port} within {self.options.node_timeout_s:g}s "
                    f"(log {head.log})",
                    _tail(head.log),
                )
            time.sleep(0.2)

    def _wait_nodes(self, indices: list[int]) -> None:
        """Wait until each node's `ray start` says it runs and its raylet is up (for its node id)."""
        deadline = time.monotonic() + self.options.node_timeout_s
        pending = {i: self._node(i) for i in indices}
        while pending:
            procs = self._processes()
            for index, node in list(pending.items()):
                if node.pid not in procs:
                    raise LauncherError(
                        f"{node.role} node {index} exited while starting (log {node.log})", _tail(node.log)
                    )
                node.node_id = node.node_id or _raylet_node_id(procs, index)
                if node.node_id and NODE_READY in Path(node.log).read_text(errors="replace"):
                    log.info("node %d up (pid %d, node id %s)", index, node.pid, node.node_id[:8])
                    del pending[index]
            if pending and time.monotonic() > deadline:
                index, node = next(iter(pending.items()))
                raise LauncherError(
                    f"{node.role} node {index} did not come up within {self.options.node_timeout_s:g}s "
                    f"(log {node.log})",
                    _tail(node.log),
                )
            time.sleep(0.2)
        self._save()

    def server_argv(self) -> list[str]:
        """The `moe-serve serve` command line `up` runs (the options' server_args last: they win)."""
        opts = self.options
        argv = [sys.executable, "-m", "router_service.cli", "serve"]
        argv += ["--ray-address", self._require_up().ray_address]
        argv += ["--workers", str(opts.num_expert_workers)]
        argv += [
            "--worker-resources",
            json.dumps({SLOT_RESOURCE: 1}),
            "--worker-cpus",
            f"{opts.worker_cpus:g}",
        ]
        if opts.router_nodes:  # the routers on the router nodes, the serving actors on the head
            argv += ["--routers", str(opts.router_nodes)]
            argv += ["--router-resources", json.dumps({ROUTER_RESOURCE: 0.01})]
            argv += ["--serving-resources", json.dumps({HEAD_RESOURCE: 0.01})]
        else:
            argv += ["--router-resources", json.dumps({HEAD_RESOURCE: 0.01})]
        if opts.model is not None:
            argv += ["--model", str(opts.model)]
        if opts.http_port is not None:
            argv += ["--http-port", str(opts.http_port)]
        if opts.grpc_port is not None:
            argv += ["--grpc-port", str(opts.grpc_port)]
        argv += list(opts.server_args)  # after ours: argparse lets the last one win
        return argv

    def _start_server(self) -> None:
        opts = self.options
        argv = self.server_argv()
        log_path = self.base_dir / "logs" / "server.log"
        log.info("starting the server (%d expert workers)", opts.num_expert_workers)
        proc = self._spawn(argv, "server", log_path)
        self.state.server = ServerRecord(proc.pid, str(log_path), start=process_start(proc.pid) or 0)
        self._save()
        deadline = time.monotonic() + opts.server_timeout_s
        while not (m := SERVER_READY.search(log_path.read_text(errors="replace"))):
            if proc.poll() is not None:
                raise LauncherError(
                    f"the server exited ({proc.returncode}) before it was ready (log {log_path})",
                    _tail(log_path),
                )
            if time.monotonic() > deadline:
                raise LauncherError(
                    f"the server was not ready within {opts.server_timeout_s:g}s (log {log_path})",
                    _tail(log_path),
                )
            time.sleep(0.2)
        self.state.server.http_url, self.state.server.grpc_target = m.groups()
        self._save()
        log.info("serving: HTTP %s  gRPC %s", *m.groups())

    # ---- status ---------------------------------------------------------------------------------

    def status(self) -> ClusterStatus:
        if self.state is None:
            return ClusterStatus(str(self.base_dir), running=False)
        procs = self._processes()
        nodes = []
        for node in self.state.nodes:
            mine = [pid for pid, role in procs.items() if role == f"node-{node.index}"]
            actors = sorted(filter(None, (_actor_name(pid) for pid in mine)))
            nodes.append(
                NodeStatus(
                    node.index, node.role, node.pid, bool(mine), node.node_id, len(mine), tuple(actors)
                )
            )
        server = self.state.server
        return ClusterStatus(
            base_dir=str(self.base_dir),
            running=bool(procs),
            ray_address=self.state.ray_address,
            nodes=tuple(nodes),
            server_pid=server.pid if server else None,
            server_alive=server is not None and server.pid in procs,
            http_url=server.http_url if server else "",
            grpc_target=server.grpc_target if server else "",
            health=_health(server.http_url) if server and server.http_url and server.pid in procs else "",
        )

    # ---- faults and growth ----------------------------------------------------------------------

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL every process of worker or router node `index` (its raylet, agents and actors), as
        a machine failure would; returns their pids once all are gone (exited, not merely out of
        the tag scan: see `is_running`)."""
        node = self._node(index)
        if node.index == 0:
            raise ValueError("node 0 is the head: killing it ends the cluster (use down())")
        roles = {f"node-{index}"}
        procs = self._tagged(roles)
        procs |= self._leaders(roles, procs)
        if left := self._kill_until_gone(roles, procs):
            raise LauncherError(f"processes {left} of node {index} outlived SIGKILL for {KILL_TIMEOUT_S:g}s")
        log.info("killed %s node %d (%d processes)", node.role, index, len(procs))
        return sorted(procs)

    def add_node(self, router: bool = False) -> int:
        """Start one more worker node (the options' CPUs and slots), or router node if `router`;
        its index once it is up. `moe-serve routers N` then puts a router on a new router node."""
        state = self._require_up()
        if not self._processes():
            raise LauncherError(f"the cluster in {self.base_dir} is not running")
        index = max(n.index for n in state.nodes) + 1
        try:
            self._start_node(find_ray(), index, router=router)
            self._wait_nodes([index])
        except BaseException:
            self._stop({f"node-{index}"}, f"{'router' if router else 'worker'} node {index}", {})
            raise
        return index

    # ---- down -----------------------------------------------------------------------------------

    def down(self) -> int:
        """Stop the server, then the worker and router nodes, then the head: SIGTERM, SIGKILL after
        `stop_timeout_s`; return once every process it stopped has exited. Only processes with this
        cluster's tag, or started by `up` (known by pid and start time), are signalled. Returns how
        many processes it stopped; a cluster that is not there is a no-op (0). Processes that
        outlive SIGKILL for KILL_TIMEOUT_S raise LauncherError, and the state file stays, so that
        `status` shows them and a second `down` tries again."""
        if self.state is None:
            return 0
        stopped: dict[int, int] = {}  # pid -> start time of every process stopped
        left: list[int] = []
        for what, roles in (
            ("the server", {"server"}),
            ("the worker nodes", {f"node-{n.index}" for n in self.state.nodes if n.index != 0}),
            ("the head", {"node-0"}),
            ("what else has the cluster's tag", None),
        ):
            left += self._stop(roles, what, stopped)
        if left:
            raise LauncherError(
                f"processes {sorted(left)} of the cluster in {self.base_dir} outlived SIGKILL for "
                f"{KILL_TIMEOUT_S:g}s"
            )
        self.state_path.unlink(missing_ok=True)
        (self.base_dir / TOKEN_FILE).unlink(missing_ok=True)
        self.state = None
        if stopped:
            log.info("stopped %d processes", len(stopped))
        return len(stopped)

    def _stop(self, roles: set[str] | None, what: str, stopped: dict[int, int]) -> list[int]:
        """SIGTERM the leaders of `roles` (the server, which shuts down cleanly; each node's `ray
        start --block`, which stops its Ray processes), wait up to stop_timeout_s for them to exit,
        then SIGKILL whatever of those roles is left (actor workers a raylet did not wait for, a
        leader that hung) until it is gone. None: every process with this cluster's tag, killed at
        once. Adds what it stops to `stopped` (pid -> start time); returns the pids that outlived
        SIGKILL."""
        procs = self._tagged(roles)
        leaders = self._leaders(roles, procs) if roles is not None else {}
        procs |= leaders
        if not procs:
            return []
        log.info("stopping %s", what)
        timeout_s = self.options.stop_timeout_s
        _signal(leaders, signal.SIGTERM)
        # A leader exits once it has stopped its own processes; what it leaves is killed below.
        if not _wait_until(lambda: not self._running(leaders), timeout_s):
            log.warning(
                "stopping %s: %s still ran %gs after SIGTERM", what, sorted(self._running(leaders)), timeout_s
            )
        left = self._kill_until_gone(roles, procs)
        stopped |= procs
        return left

    def _tagged(self, roles: set[str] | None) -> dict[int, int]:
        """pid -> start time of the processes with this cluster's tag and one of `roles` (None: any)."""
        found = {}
        for pid, role in self._processes().items():
            if (roles is None or role in roles) and (start := process_start(pid)) is not None:
                found[pid] = start
        return found

    def _leaders(self, roles: set[str], tagged: dict[int, int]) -> dict[int, int]:
        """pid -> start time of the processes `up` started for `roles` (each node's `ray start
        --block`, the server) that still run. Taken from the state, as the tag scan misses a leader
        that has begun to exit; a leader recorded without a start time counts if `tagged` has it."""
        records: list[NodeRecord | ServerRecord] = [n for n in self.state.nodes if f"node-{n.index}" in roles]
        if "server" in roles and self.state.server is not None:
            records.append(self.state.server)
        known = {r.pid: r.start or tagged.get(r.pid, 0) for r in records}
        return {pid: start for pid, start in known.items() if start and is_running(pid, start)}

    def _kill_until_gone(self, roles: set[str] | None, procs: dict[int, int]) -> list[int]:
        """SIGKILL the processes of `procs` (pid -> start time), and those of `roles` the tag scan
        adds (a Ray process may fork a worker between a scan and a kill), until none runs by
        /proc/<pid>/stat: the tag scan loses a process as soon as it begins to exit, before it has
        (`is_running`). Adds what it finds to `procs`; returns the pids still running after
        KILL_TIMEOUT_S: none, unless one is stuck in the kernel."""
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while True:
            procs |= self._tagged(roles)
            left = self._running(procs)
            if not left or time.monotonic() > deadline:
                return sorted(left)
            _signal(left, signal.SIGKILL)
            time.sleep(0.05)

    def _running(self, procs: dict[int, int]) -> set[int]:
        """The pids of `procs` (pid -> start time) that still run; reaps our children that exited."""
        running = {pid for pid, start in procs.items() if is_running(pid, start)}
        self._reap()  # after the check: a child it found a zombie is reaped now, not left behind
        return running

    def _reap(self) -> None:
        """Collect the children of this process that exited (a zombie keeps its pid)."""
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]


def _raylet_node_id(procs: dict[int, str], index: int) -> str:
    """Node `index`'s Ray node id, from its raylet's command line ("" until the raylet runs)."""
    for pid, role in procs.items():
        if role != f"node-{index}":
            continue
        argv = _cmdline(pid)
        if argv[0].endswith("/raylet"):
            for arg in argv:
                if arg.startswith("--node_id="):
                    return arg.removeprefix("--node_id=")
    return ""


def _health(http_url: str) -> str:
    import httpx

    try:
        reply = httpx.get(f"{http_url}/healthz", timeout=5)
    except httpx.HTTPError as e:
        return f"unreachable ({type(e).__name__})"
    return f"{reply.status_code} {' '.join(reply.text.split())[:200]}"
