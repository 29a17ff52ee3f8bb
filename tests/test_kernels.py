"""Every expert compute path against a plain per-expert torch reference, and the kernel selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_rel_close, kernel_available

from expert_workers import kernels
from expert_workers.kernels import (
    KERNELS,
    prepack_dense,
    prepack_experts,
    select_kernel,
    swiglu_dense,
    swiglu_experts,
    weight_nbytes,
)

H, INTER, E = 64, 48, 5


def reference(x, counts, w13, w2):
    """fp64 per-expert SwiGLU on the stored weights."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    out, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start : start + n]
        gate, up = (xe @ w13[e].t()).chunk(2, dim=-1)
        out.append((F.silu(gate) * up) @ w2[e].t())
        start += n
    return torch.cat(out)


def make_weights(dtype, n_experts=E, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(n_experts, 2 * INTER, H, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(n_experts, H, INTER, generator=g) * 0.1).to(dtype)
    return w13, w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "counts",
    [
        [1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [2, 0, 3, 0, 1],
        [7, 13, 0, 5, 0],
        [0, 0, 0, 0, 0],
        [64, 3, 100, 1, 31],
    ],
    ids=["T1", "T1-mid", "odd", "zeros", "empty", "larger"],
)
def test_swiglu_experts_matches_reference(kernel, dtype, counts):
    if not kernel_available(kernel, dtype):
        pytest.skip(f"{kernel} not available for {dtype} here")
    w13, w2 = make_weights(dtype)
    x = torch.randn(sum(counts), H).to(dtype)
    want = reference(x, counts, w13, w2)
    p13, p2 = prepack_experts(kernel, w13, w2)
    got = swiglu_experts(kernel, x, counts, p13, p2)
    assert got.shape == (sum(counts), H)
    if sum(counts):
        assert_rel_close(got, want, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["loop", "onednn", "upcast"])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_swiglu_dense_matches_reference(kernel, dtype, rows):
    if not kernel_available(kernel, dtype):
        pytest.skip(f"{kernel} not available for {dtype} here")
    w13, w2 = make_weights(dtype, n_experts=1, seed=1)
    x = torch.randn(rows, H).to(dtype)
    want = reference(x, [rows], w13, w2)
    got = swiglu_dense(x, prepack_dense(kernel, w13[0]), prepack_dense(kernel, w2[0]), kernel)
    assert_rel_close(got, want, TOL[dtype])


def test_upcast_tiles_cover_every_row(monkeypatch):
    """Weights taller than one tile, with a ragged last tile, still give every output column."""
    monkeypatch.setattr(kernels, "UPCAST_TILE_ROWS", 7)
    monkeypatch.setattr(kernels, "UPCAST_WHOLE_MIN_ROWS", 4)  # expert 4 takes the whole-weight branch
    w13, w2 = make_weights(torch.bfloat16)
    counts = [3, 0, 2, 1, 4]
    x = torch.randn(sum(counts), H).bfloat16()
    got = swiglu_experts("upcast", x, counts, w13, w2)
    assert got.dtype == torch.float32
    assert_rel_close(got, reference(x, counts, w13, w2), TOL[torch.bfloat16])


@pytest.mark.skipif(not kernels.has_onednn(), reason="no oneDNN")
def test_prepack_replaces_weights_and_keeps_nbytes():
    w13, w2 = make_weights(torch.float32)
    p13, p2 = prepack_experts("onednn", w13, w2)
    assert isinstance(p13, list) and len(p13) == E and p13[0].is_mkldnn
    assert weight_nbytes(p13) + weight_nbytes(p2) == weight_nbytes(w13) + weight_nbytes(w2)
    assert prepack_experts("loop", w13, w2) == (w13, w2)
    assert weight_nbytes(None) == 0


def test_override_wins_and_bad_override_raises(monkeypatch):
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    cpu = torch.device("cpu")
    for k in ("loop", "upcast"):
        assert select_kernel(cpu, torch.bfloat16, k) == k
    with pytest.raises(ValueError, match="unknown expert kernel"):
        select_kernel(cpu, torch.float32, "fastest")
    with pytest.raises(ValueError, match="onednn"):
        select_kernel(cpu, torch.float16, "onednn")


def test_env_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(kernels.KERNEL_ENV, "upcast")
    assert select_kernel(cpu, torch.bfloat16) == "upcast"
    assert select_kernel(cpu, torch.bfloat16, "auto") == "upcast"
    assert select_kernel(cpu, torch.bfloat16, "loop") == "loop"  # the argument beats the environment
    monkeypatch.setenv(kernels.KERNEL_ENV, "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        select_kernel(cpu, torch.float32)


@pytest.mark.parametrize("native", [True, False])
def test_auto_rule_on_cpu(monkeypatch, native):
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    monkeypatch.setattr(kernels, "has_onednn", lambda: True)
    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert select_kernel(cpu, torch.float32) == "onednn"
    assert select_kernel(cpu, torch.bfloat16) == ("onednn" if native else "upcast")
    assert select_kernel(cpu, torch.float16) == "upcast"
    monkeypatch.setattr(kernels, "has_onednn", lambda: False)
    assert select_kernel(cpu, torch.float32) == "loop"


def test_auto_rule_on_cuda(monkeypatch):
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert select_kernel(torch.device("cuda"), torch.bfloat16) == (
        "grouped_mm" if kernels.has_grouped_mm() else "loop"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert select_kernel(torch.device("cuda"), torch.bfloat16) == "loop"
    with pytest.raises(ValueError, match="onednn"):
        select_kernel(torch.device("cuda"), torch.float32, "onednn")


@pytest.mark.parametrize("kernel", ["loop", "onednn"])
def test_stack_builder_gives_the_layout_the_kernel_reads(kernel):
    if not kernel_available(kernel, torch.float32):
        pytest.skip(f"{kernel} not available here")
    w13, w2 = make_weights(torch.float32, n_experts=3)
    b = kernels.ExpertStackBuilder(kernel, 3, INTER, H, torch.float32, "cpu")
    for i in range(3):
        gate, up, down = b.slot(i)
        gate.copy_(w13[i, :INTER])
        up.copy_(w13[i, INTER:])
        down.copy_(w2[i])
        b.done(i)
    got13, got2 = b.finish()
    want13, want2 = prepack_experts(kernel, w13, w2)
    x = torch.randn(5, H)
    counts = [2, 0, 3]
    torch.testing.assert_close(
        swiglu_experts(kernel, x, counts, got13, got2), swiglu_experts(kernel, x, counts, want13, want2)
    )
    if kernel == "onednn":
        assert all(w.is_mkldnn for w in got13 + got2)
        with pytest.raises(RuntimeError, match="in order"):
            kernels.ExpertStackBuilder(kernel, 3, INTER, H, torch.float32, "cpu").slot(1)
