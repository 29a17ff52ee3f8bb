"""The `ray start` launcher (`cluster/launcher.py`): a Ray head and two worker nodes on this machine
with the server joined to them; expert workers one per worker node and none on the head; a worker
node SIGKILLed under streaming load changes no token and the server gets back to two workers by
itself; `down` leaves no process behind, twice. Plus, without Ray: `down` waits out processes that
the tag scan no longer sees, the command lines of router nodes (`--router-nodes K`) and of the
server that runs its routers there, and the fast failures, which start nothing."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cluster.__main__ import build_parser as cluster_parser
from cluster.launcher import (
    TAG_ENV,
    ClusterOptions,
    ClusterState,
    LauncherError,
    LocalCluster,
    NodeRecord,
    tagged_processes,
)
from moe_serving.http_client import HTTPClient
from router_service import Engine
from router_service.default_model import default_model_dir

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[40 + i, 41, 42 + i, 7 * i + 3] for i in range(6)]  # token ids
MAX_TOKENS = 128  # long enough that no stream ends before the last one starts, even on a loaded machine
RECOVERY_TIMEOUT_S = 120


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat from the third (the state) on; [] if there is no such process.
    The test's own reading, not the launcher's `is_running`: what it checks `down` against."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _live(pids) -> set[int]:
    """The pids that are running processes (a zombie, or a dead one, counts as gone)."""
    return {pid for pid in pids if _stat(pid)[:1] not in ([], ["Z"], ["X"])}


def _mentioning(text: str) -> list[str]:
    """Command lines of the running processes that contain `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and _live([int(pid)]):
            found.append(cmd)
    return found


def _server_log(cluster: LocalCluster) -> str:
    return (cluster.base_dir / "logs" / "server.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def expected():
    """Greedy tokens of every prompt from an in-process engine: what the cluster must stream."""
    out: list = [None] * len(PROMPTS)
    with Engine.from_pretrained(default_model_dir(), num_workers=2, num_threads=1) as engine:

        def go(i):
            out[i] = [t for ch in engine.generate_stream(PROMPTS[i], MAX_TOKENS) for t in ch["token_ids"]]

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(out), out
    return out


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="moe-cl-"))  # short: Ray's unix sockets live under it
    c = LocalCluster(base, workers=2, expert_workers=2, http_port=0, grpc_port=0)
    try:
        c.up()
        yield c
    finally:
        c.down()
        shutil.rmtree(base, ignore_errors=True)


def test_up_puts_one_expert_worker_on_each_worker_node(cluster):
    s = cluster.status()
    assert s.running and s.server_alive, s
    assert [(n.index, n.role, n.alive) for n in s.nodes] == [
        (0, "head", True),
        (1, "worker", True),
        (2, "worker", True),
    ]
    assert all(len(n.node_id) == 56 for n in s.nodes), s.nodes
    assert s.health.startswith("200 "), s.health
    assert cluster.http_url == s.http_url and cluster.http_url.startswith("http://127.0.0.1:")
    assert cluster.ray_address.startswith("127.0.0.1:")

    with HTTPClient(cluster.http_url) as http:
        state = http.cluster_state()
    head, workers = s.nodes[0].node_id, {s.nodes[1].node_id, s.nodes[2].node_id}
    placed = [w["node_id"] for w in state["workers"]]
    assert state["num_workers"] == 2 and len(placed) == 2, state["workers"]
    assert set(placed) == workers, f"one expert worker per worker node, none on the head {head}: {placed}"
    assert [n.actors.count("RayExpertWorker") for n in s.nodes] == [0, 1, 1], s.nodes
    # the router, the ingress replica and the gRPC server on the head (--router-resources)
    for serving in ("RouterActor", "ServeReplica:moe-serving:MoEIngress", "GrpcIngress"):
        assert serving in s.nodes[0].actors, (serving, s.nodes)

    # The CLI reads the same state; a second `up` on a running cluster is refused before it starts anything.
    run = subprocess.run(
        [sys.executable, "-m", "cluster", "status", "--json", "--base-dir", str(cluster.base_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["http_url"] == cluster.http_url
    with pytest.raises(LauncherError, match="already up"):
        LocalCluster(cluster.base_dir).up()
    with pytest.raises(ValueError, match="node 0 is the head"):
        cluster.kill_node(0)


def test_worker_node_killed_under_load_changes_no_token(cluster, expected):
    got: list = [None] * len(PROMPTS)
    counts = [0] * len(PROMPTS)
    errors: list[str] = []
    started = [threading.Event() for _ in PROMPTS]

    def go(i):
        try:
            tokens = []
            with HTTPClient(cluster.http_url, timeout=RECOVERY_TIMEOUT_S) as http:
                for chunk in http.stream(PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0):
                    tokens += chunk.token_ids
                    counts[i] = len(tokens)
                    if tokens:
                        started[i].set()
            got[i] = tokens
        except Exception as e:  # the test's point: there must be none
            errors.append(f"stream {i}: {e!r}")
            started[i].set()

    s = cluster.status()
    # The victim: a worker node with an expert worker. The launcher pins the router, Serve's ingress
    # replica and the gRPC server to the head (--router-resources); the filter keeps the test about
    # a lost expert worker should that ever change (a lost ingress ends the HTTP streams whatever
    # the expert workers do; a lost router is a restart, covered by tests/test_serving_elastic.py).
    victims = [
        n
        for n in s.nodes[1:]
        if "RayExpertWorker" in n.actors
        and not any(a.startswith(("ServeReplica", "ProxyActor")) for a in n.actors)
    ]
    assert victims, s.nodes
    victim = min(victims, key=lambda n: "RouterActor" in n.actors)

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    assert all(e.wait(RECOVERY_TIMEOUT_S) for e in started), (errors, _server_log(cluster))
    assert not errors, errors
    killed = cluster.kill_node(victim.index)
    at_kill = list(counts)
    assert killed and not _live(killed), killed
    assert all(0 < n < MAX_TOKENS for n in at_kill), f"every stream must be mid-way at the kill: {at_kill}"
    for t in threads:
        t.join(RECOVERY_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), (counts, _server_log(cluster))
    assert not errors, (errors, _server_log(cluster))
    assert got == expected, f"tokens at the kill: {at_kill}"

    # Back to two expert workers by itself, none on the dead node (nor on the head).
    alive_workers = {n.node_id for n in s.nodes[1:] if n.index != victim.index}
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    with HTTPClient(cluster.http_url) as http:
        while True:
            state = http.cluster_state()
            nodes = [w["node_id"] for w in state["workers"]]
            if state["num_workers"] == 2 and set(nodes) <= alive_workers:
                break
            assert time.monotonic() < deadline, (
                f"not back to 2 workers off node {victim.node_id}: {state['workers']}"
            )
            time.sleep(0.5)
        # The router saw the loss; or, when the node took the Router actor with it, the restarted
        # router re-placed over the workers it found.
        events = state["elastic"]["events"]
        assert events.get("workers_lost", 0) + events.get("reattach", 0) >= 1, state["elastic"]
        assert http.health()
    s = cluster.status()
    assert not s.nodes[victim.index].alive and s.nodes[victim.index].processes == 0, s.nodes
    assert s.nodes[0].alive and all(n.alive for n in s.nodes[1:] if n.index != victim.index), s.nodes


def test_down_stops_everything_it_started_and_only_that(cluster):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # not ours
    try:
        state = cluster.state
        pids = set(tagged_processes(state.cluster_id)) | {n.pid for n in state.nodes} | {state.server.pid}
        assert len(_live(pids)) >= 10, pids  # head, worker node, their Ray processes, the server, actors
        base = cluster.base_dir
        stopped = cluster.down()  # no bound on its time: a loaded machine stretches a clean stop
        assert stopped >= 10, stopped
        assert not _live(pids), _live(pids)
        assert not _mentioning(str(base)), _mentioning(str(base))
        assert bystander.poll() is None, "down must stop only what up started"
        assert not (base / "cluster.json").exists() and not (base / "auth_token").exists()
        assert cluster.down() == 0  # a second down is a no-op
        assert not LocalCluster(base).status().running
    finally:
        bystander.kill()
        bystander.wait()


# ---- down without Ray: processes the tag scan has lost ----------------------------------------------

# A process caught exiting, played slowly: on SIGTERM it blanks its environment, as the kernel does
# for a process that has begun to exit (its /proc/<pid>/environ reads empty, so the tag scan loses
# it), and it runs on until SIGKILL, as an exit drawn out by a loaded machine does.
EXITING_ON_SIGTERM = """
import ctypes, signal
from pathlib import Path

fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
env_start, env_end = int(fields[47]), int(fields[48])  # fields 50 and 51 of proc(5)

def blank(*_):
    ctypes.memset(env_start, 0, env_end - env_start)
    print("blank", flush=True)

signal.signal(signal.SIGTERM, blank)
print("ready", flush=True)
while True:
    signal.pause()
"""


def test_down_waits_for_processes_the_tag_scan_has_lost(tmp_path, caplog):
    """A head and a worker node's leader, tagged; the worker's already caught exiting when `down`
    starts, the head's from `down`'s SIGTERM on. `down` returns once both have exited: it finds
    the lost one by the pid and start time in the state, and SIGKILLs both after the 1 s grace."""
    cluster_id = secrets.token_hex(8)
    leaders = []
    try:
        for index in (0, 1):
            env = {**os.environ, TAG_ENV: f"{cluster_id}/node-{index}"}
            leaders.append(
                subprocess.Popen([sys.executable, "-c", EXITING_ON_SIGTERM], env=env, stdout=subprocess.PIPE)
            )
            assert leaders[-1].stdout.readline() == b"ready\n"
        head, worker = leaders
        assert set(tagged_processes(cluster_id)) == {head.pid, worker.pid}
        worker.send_signal(signal.SIGTERM)
        assert worker.stdout.readline() == b"blank\n"
        assert set(tagged_processes(cluster_id)) == {head.pid} and _live([worker.pid])  # lost, yet running
        nodes = [
            {"index": i, "pid": p.pid, "start": int(_stat(p.pid)[19]), "log": "", "temp_dir": ""}
            for i, p in enumerate(leaders)
        ]
        state = {"cluster_id": cluster_id, "ray_address": "127.0.0.1:1", "options": {"stop_timeout_s": 1}}
        (tmp_path / "cluster.json").write_text(json.dumps({**state, "nodes": nodes}))

        with caplog.at_level(logging.INFO, logger="cluster.launcher"):
            stopped = LocalCluster(tmp_path).down()  # as `python -m cluster down` does: not the parent
        assert stopped == 2 and not _live([head.pid, worker.pid]), caplog.text
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            f"stopping the worker nodes: [{worker.pid}] still ran 1s after SIGTERM",
            f"stopping the head: [{head.pid}] still ran 1s after SIGTERM",
        ]
        assert [p.wait(timeout=10) for p in leaders] == [-signal.SIGKILL] * 2
        assert not (tmp_path / "cluster.json").exists()
    finally:
        for p in leaders:
            p.kill()
            p.wait()
            p.stdout.close()


# ---- command lines of router nodes: nothing starts --------------------------------------------------


def _planned(tmp_path, **fields) -> LocalCluster:
    """A cluster object with the state `up` writes before it starts anything, to read its command lines."""
    c = LocalCluster(tmp_path, **fields)
    c.state = ClusterState(cluster_id="0" * 16, ray_address="127.0.0.1:6390", options={})
    return c


def _flag(argv: list[str], name: str):
    """The value after the last `name` in argv (argparse's last one wins), JSON-decoded when it is."""
    value = argv[len(argv) - 1 - argv[::-1].index(name) + 1]
    try:
        return json.loads(value)
    except ValueError:
        return value


def test_router_nodes_run_the_routers_and_the_head_the_serving_actors(tmp_path):
    from router_service.cli import build_parser as serve_parser
    from router_service.engine import make_config

    c = _planned(tmp_path, workers=2, router_nodes=2)
    worker, router = c.node_argv("ray", 1), c.node_argv("ray", 3, router=True)
    assert _flag(worker, "--resources") == {"expert_node": 16}
    assert _flag(router, "--resources") == {"router_node": 1} and _flag(router, "--num-cpus") == 0
    assert _flag(router, "--address") == "127.0.0.1:6390" and "--head" not in router
    assert _flag(c.node_argv("ray", 0), "--resources") == {"head": 1}  # the head: no router_node

    argv = c.server_argv()
    assert argv[1:4] == ["-m", "router_service.cli", "serve"]
    args = serve_parser().parse_args(argv[3:])  # moe-serve's own parser knows every flag
    assert args.num_routers == 2 and args.router_strategy == "SPREAD"
    assert args.router_resources == {"router_node": 0.01} and args.serving_resources == {"head": 0.01}
    assert args.worker_resources == {"expert_node": 1}
    config, _ = make_config(
        args.model or default_model_dir(),
        num_workers=args.num_workers,
        transport="socket",
        router_resources=args.router_resources,
        serving_resources=args.serving_resources,
        num_routers=args.num_routers,
    )
    assert config.router_resources == {"router_node": 0.01}  # each router: a router node
    assert config.serving_actor_resources == {"head": 0.01}  # controller, ingress, gRPC: the head

    # flags after `--` win; without router nodes the command line is what it always was
    more = _planned(tmp_path, router_nodes=2, server_args=("--routers", "4")).server_argv()
    assert serve_parser().parse_args(more[3:]).num_routers == 4
    plain = _planned(tmp_path).server_argv()
    assert _flag(plain, "--router-resources") == {"head": 0.01}
    assert "--routers" not in plain and "--serving-resources" not in plain
    args = serve_parser().parse_args(plain[3:])
    assert args.serving_resources is None and args.num_routers == 1

    assert (
        NodeRecord(3, 1, "", "", router=True).role == "router" and NodeRecord(1, 1, "", "").role == "worker"
    )
    assert cluster_parser().parse_args(["up", "--router-nodes", "2"]).router_nodes == 2
    assert cluster_parser().parse_args(["up"]).router_nodes == 0
    assert cluster_parser().parse_args(["add-node", "--router"]).router
    with pytest.raises(ValueError, match="router_nodes must be >= 0"):
        ClusterOptions(router_nodes=-1)


# ---- fast failures: nothing starts -----------------------------------------------------------------


def test_port_in_use_is_one_error_line_and_starts_nothing(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "cluster", "up", "--base-dir", str(tmp_path), "--http-port", str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert (
        run.stderr.strip().splitlines()[-1]
        == f"python -m cluster: error: HTTP port {port} is in use (Address already in use)"
    )
    assert not (tmp_path / "cluster.json").exists()


def test_down_status_and_kill_without_a_cluster(tmp_path):
    c = LocalCluster(tmp_path)
    assert c.down() == 0 and not c.status().running
    with pytest.raises(LauncherError, match="no cluster in"):
        c.kill_node(1)
    with pytest.raises(LauncherError, match="no cluster in"):
        c.http_url  # noqa: B018
    with pytest.raises(ValueError, match="must not set --ray-address"):
        ClusterOptions(server_args=("--ray-address", "auto"))
    run = subprocess.run(
        [sys.executable, "-m", "cluster", "down", "--base-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0 and run.stdout == f"nothing running in {tmp_path}\n", (run.stdout, run.stderr)


def test_a_node_not_up_in_time_names_it_and_leaves_nothing(monkeypatch):
    base = Path(tempfile.mkdtemp(prefix="moe-cl-"))
    try:
        with pytest.raises(
            LauncherError, match=r"^head node 0: its GCS did not listen on port \d+ within 0.5s"
        ):
            LocalCluster(base, node_timeout_s=0.5).up()
        assert not (base / "cluster.json").exists()
        assert not _mentioning(str(base))
        monkeypatch.setattr(sys, "executable", "/nonexistent/python")
        monkeypatch.setenv("PATH", "")
        with pytest.raises(LauncherError, match="`ray` not found"):
            LocalCluster(base).up()
    finally:
        shutil.rmtree(base, ignore_errors=True)
