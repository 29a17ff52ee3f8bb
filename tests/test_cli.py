"""`moe-serve`: generate on the cached default model, make-model, and one-line user errors."""

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moe_models import spec_from_pretrained
from router_service import Engine, cli
from router_service.default_model import CACHE_ENV, DEFAULT_MODEL_NAME, make_default_model

REPO = Path(__file__).resolve().parents[1]


def moe_serve(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """Run the command line as a user would, in a fresh interpreter."""
    env = {**os.environ, CACHE_ENV: str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "router_service.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_builds_the_default_model_once_and_prints_text(tmp_path):
    first = moe_serve("generate", "--prompt", "Hello", "--max-new-tokens", "8", cache=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / DEFAULT_MODEL_NAME / "config.json").is_file()
    assert first.stderr.count("building the default model") == 1
    text = first.stdout.removesuffix("\n")
    assert len(text) == 8 and text.isprintable(), repr(text)  # 8 byte tokens of visible ASCII

    again = moe_serve("generate", "--prompt", "Hello", "--max-new-tokens", "8", cache=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stderr == "", "no notice, no log lines, no progress bars once the model is cached"
    assert again.stdout == first.stdout, "greedy decoding is deterministic"


def test_make_model_writes_a_servable_checkpoint(tmp_path, capsys):
    assert cli.main(["make-model", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert spec_from_pretrained(tmp_path / "m").model_type == "deepseek_v3"


def test_flag_defaults_come_from_the_engine_api():
    args = cli.build_parser().parse_args(["generate", "--prompt", "x"])
    load = inspect.signature(Engine.from_pretrained).parameters
    gen = inspect.signature(Engine.generate).parameters
    assert args.num_workers == load["num_workers"].default
    assert (args.dtype, args.device, args.expert_kernel) == (
        load["dtype"].default,
        load["device"].default,
        load["expert_kernel"].default,
    )
    assert (args.temperature, args.top_p, args.seed) == (
        gen["temperature"].default,
        gen["top_p"].default,
        gen["seed"].default,
    )


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory) -> Path:
    return make_default_model(tmp_path_factory.mktemp("default"))


@pytest.fixture()
def llama_dir(tmp_path) -> Path:
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return d


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--model", "/no/such/dir"], "no config.json"),
        (["--model", "{llama}"], "unsupported model_type 'llama'"),
        (["--model", "{default}", "--workers", "0"], "num_workers"),
        (["--model", "{default}", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--model", "{default}", "--top-p", "1.5"], "top_p"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(flags, says, llama_dir, default_dir, capsys):
    flags = [f.format(llama=llama_dir, default=default_dir) for f in flags]
    assert cli.main(["generate", "--prompt", "hi", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("moe-serve: error: ") and err.count("\n") == 1, err
    assert says in err


def test_errors_show_no_traceback_in_a_real_process(llama_dir, tmp_path):
    for model in (llama_dir, tmp_path / "missing"):
        run = moe_serve("generate", "--prompt", "hi", "--model", str(model), cache=tmp_path)
        assert run.returncode == 2
        assert run.stdout == ""
        assert run.stderr.startswith("moe-serve: error: ") and run.stderr.count("\n") == 1, run.stderr
        assert "Traceback" not in run.stderr


def test_bad_flags_exit_2_without_traceback(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--prompt", "hi", "--dtype", "int8"])
    assert exc.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


# ---- serve and the client commands (a real server: tests/test_cli_serve.py) ------------------------


def test_serve_flag_defaults_come_from_the_serving_api():
    from router_service.config import BatchLimits
    from router_service.serving.launch import ServerOptions, start_server
    from router_service.serving.settings import ServingSettings

    args = cli.build_parser().parse_args(["serve"])
    options, settings, limits = ServerOptions(), ServingSettings(), BatchLimits()
    launch = inspect.signature(start_server).parameters
    assert (args.transport, args.ray_address) == (launch["transport"].default, launch["ray_address"].default)
    assert (args.host, args.http_port, args.grpc_port, args.ready_timeout_s) == (
        options.host,
        options.http_port,
        options.grpc_port,
        options.ready_timeout_s,
    )
    assert args.max_request_tokens == settings.max_request_tokens
    assert args.max_model_len == settings.max_model_len is None, "unset: the model's own context"
    assert args.max_batch_size == limits.max_batch_size
    assert args.max_batch_tokens is None, "unset: the ingress and the batcher keep their own defaults"
    assert args.num_workers == inspect.signature(Engine.from_pretrained).parameters["num_workers"].default
    url = cli.DEFAULT_URL  # what `cluster` asks without --url: the default server
    assert url == f"http://{options.host}:{options.http_port}"


@pytest.mark.parametrize(
    "argv, says",
    [
        (["serve", "--model", "{default}", "--max-batch-tokens", "0"], "max_batch_tokens must be >= 1"),
        (["serve", "--model", "{default}", "--max-request-tokens", "0"], "max_request_tokens must be >= 1"),
        (["serve", "--model", "{default}", "--max-batch-size", "0"], "max_batch_size must be >= 1"),
        (["serve", "--model", "{default}", "--max-model-len", "0"], "max_model_len must be an integer >= 1"),
        (
            ["serve", "--model", "{default}", "--max-model-len", "4096"],
            "max_model_len 4096 is more than the model's context (max_position_embeddings 2048",
        ),
        (["serve", "--model", "/no/such/dir", "--http-port", "0", "--grpc-port", "0"], "no config.json"),
        (["generate", "--url", "http://127.0.0.1:1", "--prompt", "hi", "--model", "{default}"], "--model"),
        (["generate", "--url", "http://127.0.0.1:1", "--prompt", "hi"], "http://127.0.0.1:1 unreachable"),
        (["cluster", "--url", "http://127.0.0.1:1"], "http://127.0.0.1:1 unreachable"),
    ],
)
def test_serve_and_client_errors_are_one_line_and_exit_2(argv, says, default_dir, capsys):
    assert cli.main([a.format(default=default_dir) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("moe-serve: error: ") and err.count("\n") == 1, err
    assert says in err


def test_port_check_passes_time_wait_and_refuses_a_listener():
    """A restart on the port of a server that just served traffic (its connections in TIME_WAIT)
    passes the port check; a port a live socket listens on does not."""
    from router_service.serving.launch import _check_port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's and gRPC's do
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            served, _ = listener.accept()
            served.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
            assert client.recv(1) == b""
        with pytest.raises(OSError, match=f"HTTP port {port} on 127.0.0.1 is not available"):
            _check_port_free("127.0.0.1", port, "HTTP")
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the TIME_WAIT is there: a bind without SO_REUSEADDR fails
    assert _check_port_free("127.0.0.1", port, "HTTP") == port


def test_serve_takes_only_ray_transports(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--transport", "local"])
    assert exc.value.code == 2
    assert "invalid choice: 'local'" in capsys.readouterr().err


def test_compact_ranges():
    assert cli.compact_ranges([3, 0, 1, 2, 7, 9, 10]) == "0-3,7,9-10"
    assert cli.compact_ranges(range(16)) == "0-15"
    assert cli.compact_ranges([5]) == "5"
    assert cli.compact_ranges([]) == "-"


CLUSTER_STATE = {  # the shape GET /v1/cluster answers (JSON: integer keys arrive as strings)
    "model_type": "deepseek_v3",
    "transport": "ray",
    "dtype": "float32",
    "placement_version": 3,
    "num_workers": 2,
    "moe_layers": [1, 2, 3],
    "workers": [
        {
            "worker_id": 0,
            "device": "cpu",
            "kernel": "onednn",
            "experts": {"1": list(range(16)), "2": list(range(16)), "3": list(range(16))},
            "param_bytes": 20054016,
            "node_ip": "10.0.0.1",
            "tokens": 40,
        },
        {
            "worker_id": 1,
            "device": "cuda:0",
            "kernel": "grouped_mm",
            "experts": {"1": list(range(16, 32)), "2": [*range(16, 31), 5], "3": list(range(16, 32))},
            "param_bytes": 20054016,
            "node_ip": None,
            "tokens": 12,
        },
    ],
    "expert_load": {
        "window_batches": 256,
        "batches_seen": {"1": 5, "2": 5},
        "tokens": {"1": [0] * 28 + [16, 0, 0, 5], "2": [1] * 32},
    },
    "balance": {"balancedness": {"1": 0.25, "2": 1.0, "3": 0.5}},
    "elastic": {
        "target_workers": 2,
        "num_slots": 32,
        "redundant_experts": 0,
        "health": {"serving": True, "degraded": False},
        "history": [
            {
                "time": 0,
                "kind": "start",
                "from_workers": 0,
                "to_workers": 1,
                "seconds": 0.0,
                "placement_version": 0,
            },
            {
                "time": 9,
                "kind": "scale",
                "from_workers": 1,
                "to_workers": 2,
                "seconds": 1.234,
                "placement_version": 3,
            },
        ],
    },
    "generation": {
        "running": 1,
        "waiting": 2,
        "steps_by_batch_size": {"1": 4, "10": 2, "2": 7},
        "prefills_by_batch_size": {"1": 1},
        "limits": {"max_batch_size": 32, "max_batch_tokens": 16384, "max_waiting": 512},
    },
}


def test_cluster_tables():
    lines = cli.format_cluster(CLUSTER_STATE).splitlines()
    assert " ".join(lines[0].split()) == (
        "model_type deepseek_v3 transport ray dtype float32 placement version 3 workers 2 MoE layers 1-3"
    )
    assert " ".join(lines[1].split()) == "serving target workers 2 expert slots 32 (0 redundant)"
    assert lines[3].split() == [
        "worker",
        "node",
        "ip",
        "device",
        "kernel",
        "experts",
        "per",
        "layer",
        "MB",
        "tokens",
    ]
    assert lines[4].split() == ["0", "10.0.0.1", "cpu", "onednn", "0-15", "20.1", "40"]
    assert lines[5].split() == [
        "1",
        "-",
        "cuda:0",
        "grouped_mm",
        "L1:",
        "16-31",
        "L2:",
        "5,16-30",
        "L3:",
        "16-31",
        "20.1",
        "12",
    ]
    text = "\n".join(lines)
    assert "per layer: L1:0.25 L2:1.00 L3:0.50   worst L1" in text
    assert "scale  1 -> 2      1.23        3" in text
    assert "e28:16 e31:5\n" in text + "\n", text  # only experts that saw tokens, hottest first
    assert "   2        5      32  e0:1 e1:1 e2:1 e3:1 e4:1 e5:1 e6:1 e7:1" in text  # ties by expert id
    assert "generation: running 1   waiting 2" in text
    assert "decode steps by batch size: 1:4 2:7 10:2" in text  # numeric order


def test_cluster_tables_without_load_or_generation():
    state = {**CLUSTER_STATE, "expert_load": {"tokens": {}}, "generation": None}
    text = cli.format_cluster(state)
    assert "expert load" not in text and "generation" not in text
    assert "worker" in text
