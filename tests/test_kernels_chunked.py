"""The chunked gather -> experts -> scatter of issue 11 (kernels.moe_experts / shared_experts), the
byte-sized upcast tiles, and the automatic kernel rule, against plain per-pair torch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_rel_close, kernel_available

from expert_workers import kernels
from expert_workers.kernels import (
    KERNELS,
    auto_kernel,
    expert_chunks,
    moe_experts,
    prepack_dense,
    prepack_experts,
    shared_experts,
)
from moe_models.spec import ExpertFn

H, INTER, E = 32, 24, 5


def make_case(dtype, counts, n_rows=7, seed=0):
    """Weights, token rows x [N, H] and pairs sorted by expert (rows drawn with repeats)."""
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * INTER, H, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(E, H, INTER, generator=g) * 0.2).to(dtype)
    x = torch.randn(n_rows, H, generator=g).to(dtype)
    pair_rows = torch.randint(0, n_rows, (sum(counts),), generator=g)
    pair_weights = torch.rand(sum(counts), generator=g)
    return w13, w2, x, pair_rows, pair_weights


def reference(x, pair_rows, pair_weights, counts, w13, w2, scale_input=False):
    """fp64: out[row] += weight * down(silu(gate(x)) * up(x)) pair by pair."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    for row, e, w in zip(pair_rows.tolist(), experts.tolist(), pair_weights.double().tolist(), strict=True):
        xe = x[row].double() * (w if scale_input else 1.0)
        gate, up = (w13[e].double() @ xe).chunk(2)
        y = w2[e].double() @ (F.silu(gate) * up)
        out[row] += y if scale_input else w * y
    return out


@pytest.mark.parametrize(
    "counts, max_rows, want",
    [
        ([2, 3, 1], 8, [(0, 0, [2, 3, 1])]),  # all in one chunk
        ([2, 3, 1], 5, [(0, 0, [2, 3]), (5, 2, [1])]),  # whole experts packed up to the bound
        ([0, 7, 0, 1], 3, [(0, 1, [2]), (2, 1, [2]), (4, 1, [3]), (7, 2, [0, 1])]),
        ([4, 4], 4, [(0, 0, [4]), (4, 1, [4])]),
        ([0, 0], 4, []),
    ],
    ids=["one", "packed", "split", "exact", "empty"],
)
def test_expert_chunks(counts, max_rows, want):
    got = expert_chunks(counts, max_rows)
    assert got == want
    # every pair once, in order, within the bound
    pos = 0
    for start, _, part in got:
        assert start == pos and 0 < sum(part) <= max_rows
        pos += sum(part)
    assert pos == sum(counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("max_rows", [None, 1, 3, 100])
@pytest.mark.parametrize(
    "counts", [[1, 0, 0, 0, 0], [3, 0, 5, 1, 2], [0, 9, 0, 0, 4]], ids=["T1", "odd", "big"]
)
def test_moe_experts_matches_pairwise_reference(kernel, dtype, max_rows, counts):
    if not kernel_available(kernel, dtype):
        pytest.skip(f"{kernel} not available for {dtype} here")
    w13, w2, x, pair_rows, pair_weights = make_case(dtype, counts)
    want = reference(x, pair_rows, pair_weights, counts, w13, w2)
    p13, p2 = prepack_experts(kernel, w13, w2)
    out = torch.zeros(x.shape[0], H)
    moe_experts(kernel, x, pair_rows, pair_weights, counts, p13, p2, out, max_rows=max_rows)
    assert_rel_close(out, want, TOL[dtype])


@pytest.mark.parametrize("kernel", ["loop", "onednn"])
def test_moe_experts_scale_input_and_accumulates(kernel):
    """Llama 4's weight-scaled input, and `out` is added to, not overwritten."""
    if not kernel_available(kernel, torch.float32):
        pytest.skip(f"{kernel} not available here")
    counts = [2, 0, 3, 1, 0]
    w13, w2, x, pair_rows, pair_weights = make_case(torch.float32, counts, seed=3)
    want = reference(x, pair_rows, pair_weights, counts, w13, w2, scale_input=True) + 1.0
    p13, p2 = prepack_experts(kernel, w13, w2)
    out = torch.ones(x.shape[0], H)
    fn = ExpertFn(scale_input=True)
    moe_experts(kernel, x, pair_rows, pair_weights, counts, p13, p2, out, fn, max_rows=2)
    assert_rel_close(out, want, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["loop", "onednn", "upcast"])
@pytest.mark.parametrize("weighted", [False, True])
def test_shared_experts_chunked(kernel, dtype, weighted):
    if not kernel_available(kernel, dtype):
        pytest.skip(f"{kernel} not available for {dtype} here")
    w13, w2, x, _, _ = make_case(dtype, [0] * E, n_rows=9, seed=1)
    rows = torch.tensor([8, 0, 3, 4, 1])
    scale = torch.rand(5) if weighted else None
    want = reference(x, rows, torch.ones(5) if scale is None else scale, [5], w13[:1], w2[:1])
    out = torch.zeros(9, H)
    shared_experts(
        kernel, x, rows, scale, prepack_dense(kernel, w13[0]), prepack_dense(kernel, w2[0]), out, max_rows=2
    )
    assert_rel_close(out, want, TOL[dtype])


@pytest.mark.parametrize("tile_rows", [5, 7, 2 * INTER])
def test_upcast_tiles_of_any_height(tile_rows):
    """bf16 weights converted a tile of `tile_rows` rows at a time give every output column."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, H, generator=g)
    w = torch.randn(2 * INTER, H, generator=g).bfloat16()
    got = kernels._linear_upcast(x, w, tile_rows=tile_rows)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x @ w.float().t(), rtol=1e-5, atol=1e-5)


def test_upcast_tile_rows_follow_the_byte_budget():
    assert kernels.upcast_tile_rows(1024) == kernels.UPCAST_TILE_BYTES // 4096
    assert kernels.upcast_tile_rows(2048) * 2 == kernels.upcast_tile_rows(1024)
    assert kernels.upcast_tile_rows(10**9) == 1


BIG, SMALL = (1024, 256), (128, 96)  # the sweep's smallest expert, the built-in model's


@pytest.mark.parametrize(
    "dtype, shape, native, onednn, want",
    [
        (torch.float32, BIG, False, True, "onednn"),
        (torch.float32, (2048, 2048), False, True, "onednn"),
        (torch.float32, None, False, True, "onednn"),  # shape not known: the unbounded row
        (torch.float32, SMALL, False, True, "grouped_mm"),
        (torch.float32, (256, 128), False, True, "grouped_mm"),  # the bound itself
        (torch.float32, (256, 129), False, True, "onednn"),
        (torch.float32, BIG, True, False, "loop"),  # no oneDNN
        (torch.bfloat16, BIG, True, True, "onednn"),
        (torch.bfloat16, SMALL, True, True, "grouped_mm"),
        (torch.bfloat16, BIG, False, True, "upcast"),  # AVX2-only / AVX-512 without BF16
        (torch.bfloat16, SMALL, False, True, "upcast"),
        (torch.bfloat16, BIG, False, False, "upcast"),
        (torch.float16, BIG, True, True, "upcast"),
        (torch.float64, BIG, True, True, "loop"),
    ],
)
def test_auto_kernel_rule_cpu(dtype, shape, native, onednn, want):
    """The rule as data, from the machine's facts as arguments (no CPU of the other kind needed)."""
    hidden, inter = shape or (None, None)
    got = auto_kernel("cpu", dtype, hidden, inter, native_bf16=native, onednn=onednn, grouped_mm=True)
    assert got == want


def test_auto_kernel_rule_without_grouped_mm():
    assert auto_kernel("cpu", torch.float32, *SMALL, onednn=True, grouped_mm=False) == "loop"


def test_auto_kernel_rule_gpu():
    assert auto_kernel("cuda", torch.bfloat16, cuda_capability=(9, 0), grouped_mm=True) == "grouped_mm"
    assert auto_kernel("cuda", torch.bfloat16, cuda_capability=(8, 0), grouped_mm=True) == "loop"
    assert auto_kernel("cuda", torch.float32, cuda_capability=(9, 0), grouped_mm=False) == "loop"
    assert auto_kernel("mps", torch.float32) == "loop"


def test_this_machine_follows_the_rule(monkeypatch):
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    facts = dict(
        native_bf16=kernels.cpu_has_native_bf16(),
        onednn=kernels.has_onednn(),
        grouped_mm=kernels.has_grouped_mm(),
    )
    for dtype in (torch.float32, torch.bfloat16):
        for shape in (BIG, SMALL):
            want = auto_kernel("cpu", dtype, *shape, **facts)
            assert kernels.select_kernel("cpu", dtype, None, *shape) == want
