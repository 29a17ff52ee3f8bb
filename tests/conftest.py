import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_model  # noqa: E402


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
