"""`moe-serve`: generate on the cached default model, make-model, and one-line user errors."""

import inspect
import json
import os
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
