import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_model  # noqa: E402

# One intra-op torch thread in the test process. The in-process tests run tiny models, which a
# second thread does not speed up, and on a busy 2-core machine (CI runs right after other work)
# OpenMP threads spinning for cores that other processes hold made them many times slower
# (test_equivalence's fp32 tests: 13 min with 2 threads, 1 min with 1, at load 10). Tests that
# compare transports bit for bit fix their engines' threads anyway; Ray's processes keep their own.
torch.set_num_threads(1)

# Modules that start Ray (a local instance, a multi-node `Cluster`, `ray start` nodes, or server
# processes). They run after the in-process modules, so that a quick failure shows first, and
# `pytest -m "not ray"` (about 3 minutes) leaves them out.
RAY_MODULES = {
    "test_auth_serving.py",
    "test_cli_serve.py",
    "test_cluster_launcher.py",
    "test_compiled_transport.py",
    "test_compose.py",
    "test_elastic.py",
    "test_fp8.py",
    "test_frame_merging.py",
    "test_lm_eval_requests.py",
    "test_local_ray.py",
    "test_multinode.py",
    "test_ray_runtime.py",
    "test_router_faults.py",
    "test_schemathesis.py",
    "test_sdk_clients.py",
    "test_serve_app.py",
    "test_serving.py",
    "test_serving_elastic.py",
    "test_socket_transport.py",
}


def pytest_itemcollected(item):
    if item.path.name in RAY_MODULES:
        item.add_marker(pytest.mark.ray)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    # Stable: the in-process modules first, then the Ray ones, each keeping its collection order
    # (a module's tests stay together, so its module-scoped fixtures are set up once).
    items.sort(key=lambda item: item.path.name in RAY_MODULES)


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_behind():
    """Each module starts from no Ray connection in this process, and leaves none."""
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """variant -> directory of its tiny checkpoint, each built once per session."""
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            cache[variant] = make_tiny_model(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The exactness bounds against transformers (fp32 and bf16 relative error), as the kernel tests use them.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def kernel_available(kernel: str, dtype: torch.dtype) -> bool:
    """Whether this machine's torch can run expert kernel `kernel` on weights of `dtype`."""
    from expert_workers import kernels

    if kernel == "grouped_mm":
        return kernels.has_grouped_mm()
    if kernel == "onednn":
        return kernels.has_onednn() and (
            dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    return True


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error the tolerances in the issues refer to."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """max |got - want| / max |want| below `tol`, computed in fp64 (`want` is an fp64 reference)."""
    err = (got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)
    assert err.item() < tol, f"max relative error {err.item():.2e} >= {tol}"


def transport_probe_outputs(engine, ids: torch.Tensor, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """What the transport tests compare across transports: logits, a greedy generation and the last
    MoE layer on each hidden-state batch (a decode row, a mid batch, a prefill that outgrows buffers)."""
    layer = engine.spec.moe_layers[-1]
    return [engine.forward(ids), engine.generate(ids, 4)] + [engine.moe_forward(layer, h) for h in hidden]


def probe_batches(hidden_size: int = 32) -> list[torch.Tensor]:
    return [torch.randn(13, hidden_size), torch.randn(1, hidden_size), torch.randn(2048, hidden_size)]
