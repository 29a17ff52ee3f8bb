"""`moe-serve serve` as a user runs it: a real server process answering HTTP and gRPC, the
`generate --url` and `cluster` clients against it, and SIGTERM stopping it with every Ray process it
started. Plus the fast failures: no server at the URL, a port already taken."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from moe_serving.grpc_client import GrpcClient

REPO = Path(__file__).resolve().parents[1]
MOE_SERVE = [sys.executable, "-m", "router_service.cli"]
READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
READY = re.compile(
    r"^moe-serve: serving (\S+) \((\d+) workers, (\w+)\) — HTTP (\S+)\s+gRPC (\S+)\s+\(ready in"
)


def moe_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MOE_SERVE, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        if fields[0] != "Z":
            out[int(entry)] = int(fields[1])
    return out


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below `pid`."""
    ppids, found, todo = _ppids(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, pp in ppids.items():
            if pp == parent and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                todo.append(child)
    return found


def alive(pids) -> set[int]:
    live = _ppids()
    return {p for p in pids if p in live}


class ServerProcess:
    """`moe-serve serve` in a child process; stdout read by a thread so the pipe never fills."""

    def __init__(self, *args: str, log: Path):
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [*MOE_SERVE, "serve", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.log = log
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {pattern.pattern!r} in {timeout}s; stdout: {self.stdout}") from None
            if line is None:
                self.proc.wait(timeout=10)
                raise AssertionError(
                    f"server exited ({self.proc.returncode}) before it was ready; stdout: {self.stdout}; "
                    f"stderr tail: {self.log.read_text()[-3000:]}"
                )
            self.stdout.append(line)
            if m := pattern.search(line):
                return m

    def rest_of_stdout(self) -> list[str]:
        while (line := self.lines.get(timeout=10)) is not None:
            self.stdout.append(line)
        return self.stdout

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    http_port, grpc_port = free_port(), free_port()
    srv = ServerProcess(
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--workers",
        "2",
        log=tmp_path_factory.mktemp("serve") / "stderr.log",
    )
    try:
        m = srv.wait_for(READY, READY_TIMEOUT_S)
        srv.name, srv.workers, srv.transport, srv.http_url, srv.grpc_target = m.groups()
        srv.ports = (http_port, grpc_port)
        yield srv
    finally:
        srv.kill()  # only when a test failed before SIGTERM stopped it


def test_ready_line_names_the_model_and_both_addresses(server):
    assert (server.workers, server.transport) == ("2", "socket")
    assert server.http_url == f"http://127.0.0.1:{server.ports[0]}"
    assert server.grpc_target == f"127.0.0.1:{server.ports[1]}"


def test_answers_http_and_grpc_health(server):
    assert httpx.get(f"{server.http_url}/healthz", timeout=10).status_code == 200
    with GrpcClient(server.grpc_target, timeout=10) as client:
        assert client.health()
        assert client.health("")  # the server as a whole, as load balancers ask


def test_generate_url_streams_text(server):
    run = moe_serve("generate", "--url", server.http_url, "--prompt", "hi", "--max-tokens", "5")
    assert run.returncode == 0, run.stderr
    text = run.stdout.removesuffix("\n")
    assert run.stdout.endswith("\n") and "\n" not in text
    assert len(text) == 5 and text.isprintable(), repr(text)  # byte tokens of visible ASCII


def test_cluster_prints_the_worker_table(server):
    run = moe_serve("cluster", "--url", server.http_url)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "model_type deepseek_v3" in out and "transport socket" in out and "workers 2" in out
    assert re.search(r"^worker\s+node ip\s+device\s+kernel\s+experts per layer\s+MB\s+tokens$", out, re.M), (
        out
    )
    slots = int(re.search(r"expert slots (\d+)", out).group(1))  # two workers split them in halves
    half = slots // 2
    assert re.search(rf"^\s+0\s+\S+\s+cpu\s+\S+\s+0-{half - 1}\s+[\d.]+\s+\d+$", out, re.M), out
    assert re.search(rf"^\s+1\s+\S+\s+cpu\s+\S+\s+{half}-{slots - 1}\s+[\d.]+\s+\d+$", out, re.M), out
    assert "expert load" in out and re.search(r"e\d+:\d+", out), out  # the generate tests made load
    assert "generation: running 0" in out


def test_scale_over_http_and_grpc_and_plot_the_load(server, tmp_path):
    run = moe_serve("scale", "3", "--url", server.http_url)
    assert run.returncode == 0, run.stderr
    assert re.match(r"2 -> 3 expert workers, placement version \d+ serving \([\d.]+s\)", run.stdout), (
        run.stdout
    )
    run = moe_serve("scale", "2", "--grpc", server.grpc_target)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("3 -> 2 expert workers"), run.stdout
    run = moe_serve("scale", "99", "--url", server.http_url)
    assert (
        run.returncode == 2 and "num_workers must be between 1 and the number of expert slots" in run.stderr
    )
    assert "Traceback" not in run.stderr
    png = tmp_path / "load.png"
    run = moe_serve("cluster", "--url", server.http_url, "--plot", str(png))
    assert run.returncode == 0, run.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "scale  3 -> 2" in run.stdout  # the event history


def test_sigterm_stops_the_server_and_its_ray(server):
    started = descendants(server.proc.pid)
    ray_procs = {p for p, cmd in started.items() if "raylet" in cmd or "gcs_server" in cmd}
    assert ray_procs, f"the server started no Ray of its own? {started}"

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=STOP_TIMEOUT_S) == 0, server.log.read_text()[-3000:]
    out = server.rest_of_stdout()
    assert out[-1] == "moe-serve: stopped\n", out

    deadline = time.monotonic() + 15  # ray.shutdown has signalled them; give them a moment to go
    while (left := alive(started)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, {p: started[p][:120] for p in left}
    assert "Traceback" not in server.log.read_text()


# ---- fast failures, no server --------------------------------------------------------------------


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()  # a first-use notice may come before the error
    assert lines and lines[-1].startswith("moe-serve: error: "), run.stderr
    assert sum("error" in line for line in lines) == 1, run.stderr
    return lines[-1]


def test_cluster_without_a_server_is_one_error_line():
    run = moe_serve("cluster", "--url", "http://127.0.0.1:1")
    assert run.stdout == ""
    line = _one_error_line(run)
    assert "http://127.0.0.1:1" in line and "unreachable" in line


def test_serve_on_a_port_in_use_names_it():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        run = moe_serve("serve", "--http-port", str(port), "--grpc-port", str(free_port()))
    line = _one_error_line(run)
    assert f"port {port}" in line and "HTTP" in line, line


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--ray-address", "127.0.0.1:1"], "cannot reach the Ray head at 127.0.0.1:1: Connection refused"),
        (["--ray-address", "nowhere"], "a Ray address is HOST:PORT (or 'auto'), got 'nowhere'"),
        (["--worker-gpus", "1"], "no node of the Ray cluster can run an expert worker needing"),
        (["--autoscaling-config", '{"max_workrs": 3}'], "unknown field(s) ['max_workrs']"),
        (["--router-resources", '{"head": 1}'], "no node of the Ray cluster can run the router needing"),
    ],
)
def test_bad_cluster_settings_end_in_one_line_not_a_hang(flags, needle):
    t0 = time.monotonic()
    run = moe_serve("serve", "--http-port", str(free_port()), "--grpc-port", str(free_port()), *flags)
    assert needle in _one_error_line(run)
    assert time.monotonic() - t0 < 90, "a bad setting must not wait out Ray's retries"


def test_sigterm_while_loading_stops_cleanly(tmp_path):
    """SIGTERM after Ray has started but before the server is ready: the same clean stop (Ray's
    core worker would otherwise have replaced the handler with one that aborts)."""
    srv = ServerProcess(
        "--http-port", str(free_port()), "--grpc-port", str(free_port()), log=tmp_path / "err.log"
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        started: dict[int, str] = {}
        # Loading: the Router actor exists (ray.init has long returned and Ray's core worker has
        # installed its handlers).
        while not any("RouterActor" in cmd or "RayExpertWorker" in cmd for cmd in started.values()):
            assert time.monotonic() < deadline, f"the model never started loading: {started}"
            assert srv.proc.poll() is None, srv.log.read_text()[-3000:]
            time.sleep(0.2)
            started = descendants(srv.proc.pid)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=STOP_TIMEOUT_S) == 0, srv.log.read_text()[-3000:]
        out = srv.rest_of_stdout()
        assert out and out[-1].startswith("moe-serve: stopped"), out
        deadline = time.monotonic() + 15
        while (left := alive(started)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, {p: started[p][:120] for p in left}
    finally:
        srv.kill()
