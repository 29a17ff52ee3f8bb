"""The generated protobuf / gRPC code in moe_serving/v1 is current with protos/ (and the check works)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "protos" / "generate_code.py"


def run_check(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", *args], capture_output=True, text=True, timeout=120
    )


def test_generated_code_is_current():
    r = run_check()
    assert r.returncode == 0, (
        f"moe_serving/v1 is stale; run `python protos/generate_code.py`.\n{r.stdout}{r.stderr}"
    )


def test_check_fails_on_altered_or_missing_files(tmp_path):
    shutil.copytree(REPO / "moe_serving" / "v1", tmp_path / "moe_serving" / "v1")
    assert run_check("--out", str(tmp_path)).returncode == 0

    grpc_file = tmp_path / "moe_serving" / "v1" / "moe_service_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace("def Forward(", "def Forward2(", 1))
    r = run_check("--out", str(tmp_path))
    assert r.returncode == 1
    assert "moe_service_pb2_grpc.py differs" in r.stderr and "stale" in r.stderr

    shutil.copy(REPO / "moe_serving" / "v1" / "moe_service_pb2_grpc.py", grpc_file)
    (tmp_path / "moe_serving" / "v1" / "moe_service_pb2.pyi").unlink()
    r = run_check("--out", str(tmp_path))
    assert r.returncode == 1 and "moe_service_pb2.pyi is missing" in r.stderr


def test_generated_code_imports():
    from moe_serving.v1 import moe_service_pb2, moe_service_pb2_grpc

    assert moe_service_pb2.DESCRIPTOR.package == "moe_serving.v1"
    assert hasattr(moe_service_pb2_grpc, "MoEServiceStub")
    assert set(moe_service_pb2.DESCRIPTOR.services_by_name["MoEService"].methods_by_name) == {
        "Forward",
        "MoELayerForward",
        "Generate",
        "GetClusterState",
        "Scale",
        "Rebalance",
        "ScaleRouters",
    }
