"""Regenerate the Python code of the protos: the one way `moe_serving/v1/` is produced.

    python protos/generate_code.py           # (re)write moe_serving/v1/*_pb2*.py(i) and __init__.py
    python protos/generate_code.py --check   # exit 1 when the committed files are stale

Runs `grpc_tools.protoc` (package grpcio-tools) with include path `protos/` and writes into the
repository root, so `protos/moe_serving/v1/moe_service.proto` (package `moe_serving.v1`) becomes
`moe_serving/v1/moe_service_pb2.py`, `.pyi` and `moe_service_pb2_grpc.py`, importable as
`from moe_serving.v1 import moe_service_pb2, moe_service_pb2_grpc`.

`--check` generates into a temporary directory and compares with the files in place. The version
stamps the tools write (protobuf gencode version, GRPC_GENERATED_VERSION) are left out of the
comparison: a different grpcio-tools release does not make the code stale, a changed .proto does.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
OUT_PACKAGE = "moe_serving/v1"
PROTOS = ["moe_serving/v1/moe_service.proto"]

INIT_TEXT = '''"""Generated protobuf / gRPC code of the moe_serving.v1 API (protos/moe_serving/v1/*.proto).

Do not edit: regenerate with `python protos/generate_code.py`.
"""
'''

# Lines that only stamp the version of the tools that generated the code.
_VERSION_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (
        re.compile(
            r"(_runtime_version\.ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.\w+,)"
            r"\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"
        ),
        r"\1 X,",
    ),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = X"),
]


def expected_files() -> list[str]:
    names = ["__init__.py"]
    for proto in PROTOS:
        stem = Path(proto).stem
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return names


def generate(out_root: Path) -> Path:
    """Generate the package into out_root/moe_serving/v1 and return that directory."""
    try:
        from grpc_tools import protoc
    except ImportError:  # pragma: no cover - depends on the environment
        sys.exit("grpcio-tools is not installed: pip install grpcio-tools (it is in the [test] extra)")
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    out_dir = out_root / OUT_PACKAGE
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *PROTOS,
    ]
    rc = protoc.main(args)
    if rc != 0:
        sys.exit(f"protoc failed (exit {rc}) on {', '.join(PROTOS)}")
    (out_dir / "__init__.py").write_text(INIT_TEXT)
    return out_dir


def _normalized(text: str) -> str:
    for pattern, repl in _VERSION_STAMPS:
        text = pattern.sub(repl, text)
    return text


def check(target_dir: Path) -> list[str]:
    """Problems found comparing target_dir with a fresh generation (empty list: up to date)."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh_dir = generate(Path(tmp))
        for name in expected_files():
            fresh = (fresh_dir / name).read_text()
            path = target_dir / name
            if not path.exists():
                problems.append(f"{path} is missing")
                continue
            current = path.read_text()
            if _normalized(current) != _normalized(fresh):
                diff = difflib.unified_diff(
                    current.splitlines(),
                    fresh.splitlines(),
                    f"{name} (in place)",
                    f"{name} (fresh)",
                    lineterm="",
                    n=1,
                )
                snippet = "\n".join(list(diff)[:20])
                problems.append(f"{path} differs from a fresh generation:\n{snippet}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the generated files are stale")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="root to write (or check) moe_serving/v1 under (default: the repository root)",
    )
    args = parser.parse_args(argv)
    target_dir = args.out / OUT_PACKAGE
    if args.check:
        problems = check(target_dir)
        if problems:
            print("\n\n".join(problems), file=sys.stderr)
            print(
                f"\nThe generated code in {target_dir} is stale: run `python protos/generate_code.py` "
                "and commit the result.",
                file=sys.stderr,
            )
            return 1
        print(f"{target_dir}: up to date with {', '.join(PROTOS)}")
        return 0
    out_dir = generate(args.out)
    print(f"wrote {', '.join(str(out_dir / n) for n in expected_files())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
