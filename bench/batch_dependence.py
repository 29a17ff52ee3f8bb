"""Does a row's expert output depend on the other rows of its batch? Per expert kernel and dtype.

A worker's data plane merges frames of one layer that wait together into one `forward`
(`expert_workers.batching`): each row then meets the same experts in the same order, but the GEMMs
run over more rows. Whether that changes a row's bits is the kernel's property, measured here: for
every kernel of `expert_workers.kernels.KERNELS` that runs on this CPU, in fp32 and bf16, a few probe
rows go through `ExpertWorker.forward` alone, then merged (`merge_batches`) with other rows (1 to
512 of them, split before and after the probe), and the probe's rows of the merged output are
compared with the rows alone: bit-identical, or the max relative difference (max |a - b| / max |b|).

The layer is DeepSeek-V2-shaped with random weights (bench.moe_layer's checkpoint, built once and
cached): 16 routed experts top-4 and one shared expert, every row routed at random, half the rows
given the shared expert with a gate weight. `auto` marks the kernel `select_kernel` picks here.

    python -m bench.batch_dependence
    python -m bench.batch_dependence --shapes 128x96,1024x512 --threads 1,2 --others 1,8,64,512
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.moe_layer import CACHE, Shape, build_checkpoint, cpu_info
from expert_workers.batching import merge_batches, split_output
from expert_workers.kernels import KERNELS, cpu_has_native_bf16, has_grouped_mm, has_onednn, select_kernel
from expert_workers.worker import ExpertBatch, ExpertWorker
from moe_models.loading import spec_from_pretrained

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROBE_ROWS = 4


def random_batch(rows: int, hidden: int, experts: int, topk: int, gen: torch.Generator) -> ExpertBatch:
    """`rows` token rows, each routed to `topk` distinct experts with random weights, pairs sorted by
    expert (as the router's plan sends them); every other row gets the shared expert."""
    x = torch.randn(rows, hidden, generator=gen)
    ids = torch.rand(rows, experts, generator=gen).argsort(1)[:, :topk]  # [rows, topk]
    weights = torch.rand(rows, topk, generator=gen)
    order = ids.flatten().argsort(stable=True)
    pair_rows = torch.arange(rows).repeat_interleave(topk)[order]
    counts = torch.bincount(ids.flatten(), minlength=experts)
    shared = torch.arange(0, rows, 2)
    return ExpertBatch(
        x, pair_rows, weights.flatten()[order], counts, shared, torch.rand(shared.numel(), generator=gen)
    )


def available(kernel: str, dtype: torch.dtype) -> bool:
    if kernel == "grouped_mm":
        return has_grouped_mm()
    if kernel == "onednn":
        return has_onednn() and (dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def measure(path, spec, shape: Shape, kernel: str, dtype: torch.dtype, threads: int, others: list[int]):
    """{other rows: (identical, max rel diff)} for PROBE_ROWS rows merged with that many others."""
    worker = ExpertWorker(
        0,
        str(path),
        {spec.moe_layers[0]: list(range(shape.experts))},
        dtype=dtype,
        kernel=kernel,
        spec=spec,
        num_threads=threads,
    )
    layer = spec.moe_layers[0]
    gen = torch.Generator().manual_seed(0)
    probe = random_batch(PROBE_ROWS, shape.hidden, shape.experts, shape.topk, gen)
    probe.x = probe.x.to(dtype)
    alone = worker.forward(layer, probe)
    result = {}
    for n in others:
        other = random_batch(n, shape.hidden, shape.experts, shape.topk, gen)
        other.x = other.x.to(dtype)
        before, after = split_batch(other, n // 2)
        merged, sizes = merge_batches([before, probe, after])
        got = split_output(worker.forward(layer, merged), sizes)[1]
        same = torch.equal(got, alone)
        result[n] = (same, 0.0 if same else rel_diff(got, alone))
    return result


def split_batch(b: ExpertBatch, rows: int) -> tuple[ExpertBatch, ExpertBatch]:
    """b's first `rows` rows and the rest, as two batches (pairs kept in expert order)."""
    experts = torch.arange(b.expert_counts.numel()).repeat_interleave(b.expert_counts)
    parts = []
    for first in (True, False):
        keep = b.pair_rows < rows if first else b.pair_rows >= rows
        sel = b.shared_rows < rows if first else b.shared_rows >= rows
        off = 0 if first else rows
        parts.append(
            ExpertBatch(
                b.x[:rows] if first else b.x[rows:],
                b.pair_rows[keep] - off,
                b.pair_weights[keep],
                torch.bincount(experts[keep], minlength=b.expert_counts.numel()),
                b.shared_rows[sel] - off,
                b.shared_weights[sel],
            )
        )
    return parts[0], parts[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="128x96,1024x512", help="expert shapes HxI (default: %(default)s)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--threads", default="1,2", help="intra-op thread counts (default: %(default)s)")
    p.add_argument("--others", default="1,8,64,512", help="rows merged with the probe (default: %(default)s)")
    args = p.parse_args(argv)
    others = [int(n) for n in args.others.split(",")]
    threads = [int(n) for n in args.threads.split(",")]
    model, flags = cpu_info()
    print(f"cpu: {model} ({flags}); native bf16: {cpu_has_native_bf16()}; torch {torch.__version__}")
    print(f"{PROBE_ROWS} probe rows alone vs merged with N other rows; '=' bit-identical, else max rel diff")
    head = f"| shape | kernel | dtype | threads | {' | '.join(f'N={n}' for n in others)} |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    t0 = time.perf_counter()
    for text in args.shapes.split(","):
        h, _, i = text.partition("x")
        shape = Shape(int(h), int(i), args.experts, args.topk, 1)
        path = build_checkpoint(shape, CACHE)
        spec = spec_from_pretrained(path)
        for dname, dtype in DTYPES.items():
            auto = select_kernel(torch.device("cpu"), dtype, "auto", shape.hidden, shape.inter)
            for kernel in KERNELS:
                if not available(kernel, dtype):
                    continue
                for t in threads:
                    try:
                        res = measure(path, spec, shape, kernel, dtype, t, others)
                        cells = ["=" if same else f"{d:.1e}" for same, d in res.values()]
                    except RuntimeError as e:  # a kernel this torch cannot run here
                        cells = [f"fails: {str(e)[:60]}"] + [""] * (len(others) - 1)
                    name = f"{kernel} (auto)" if kernel == auto else kernel
                    print(f"| {shape.name} | {name} | {dname} | {t} | {' | '.join(cells)} |", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")
    print("command: python -m bench.batch_dependence " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
