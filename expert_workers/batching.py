"""Several `ExpertBatch`es of one layer and layout as one, and the output split back.

A worker that finds frames of the same layer waiting together (from several routers, or the two
micro-batch lanes of one) runs them as one grouped FFN over the concatenated rows, which keeps the
expert GEMMs fuller (MegaScale-Infer, Step-3 and FastAFD batch the FFN side the same way). Pure
tensor code: no threads, no sockets.

The merged batch keeps the `ExpertBatch` contract: pairs sorted by local expert, and for each
expert the pairs of part 0, then part 1, ..., each part's row indices offset by its first row. So
every row meets the same experts, in the same order, with the same weights as in its own batch;
whether its result is also bit for bit the same depends only on whether the kernel's GEMMs give a
row a result independent of the other rows (`bench/batch_dependence.py` measures it per kernel).
"""

from __future__ import annotations

import torch

from expert_workers.worker import ExpertBatch


def merge_batches(batches: list[ExpertBatch]) -> tuple[ExpertBatch, list[int]]:
    """One batch holding every part's rows, pairs and shared rows, and the row count of each part.

    # K = parts, N_k / P_k / NS_k = rows / pairs / shared rows of part k, E = local experts
    All parts must count pairs over the same E experts (one layout of one layer) and have the same
    x dtype and hidden size. Merged: x [sum N_k, H]; pairs grouped by expert, part 0's pairs of an
    expert before part 1's; expert_counts summed; shared rows offset and concatenated, a part with
    rows but no weights given weights of 1.0 when another part has weights (None where no part
    has any; shared_rows None where no part has shared rows). One part comes back as it is.
    """
    if not batches:
        raise ValueError("merge_batches needs at least one batch")
    sizes = [b.x.shape[0] for b in batches]
    if len(batches) == 1:
        return batches[0], sizes
    experts = batches[0].expert_counts.numel()
    for b in batches:
        if b.expert_counts.numel() != experts:
            raise ValueError(
                f"cannot merge batches over {experts} and {b.expert_counts.numel()} local experts"
            )
    x = torch.cat([b.x for b in batches])  # [sum N, H]
    device = batches[0].pair_rows.device
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)

    # Pairs: where each part's pairs go. counts[k, e] = pairs of part k for expert e; expert e's
    # block of the merged pairs starts at sum(counts[:, :e]), and part k's pairs of e follow the
    # earlier parts' pairs of e. A part's pairs of e are contiguous in its own order, so pair i of
    # part k (expert e) goes to block_start[e] + before[k, e] + (i - part_start[k, e]).
    counts = torch.stack([b.expert_counts.to(device, torch.long) for b in batches])  # [K, E]
    total = counts.sum(0)  # [E]
    block_start = torch.cumsum(total, 0) - total  # [E]
    before = torch.cumsum(counts, 0) - counts  # [K, E]
    part_start = torch.cumsum(counts, 1) - counts  # [K, E]
    shift = block_start + before - part_start  # [K, E]: destination minus source index, per expert
    num_pairs = int(total.sum())
    pair_rows = torch.empty(num_pairs, dtype=batches[0].pair_rows.dtype, device=device)
    pair_weights = torch.empty(num_pairs, dtype=batches[0].pair_weights.dtype, device=device)
    for k, b in enumerate(batches):
        p = b.pair_rows.numel()
        if not p:
            continue
        dest = torch.repeat_interleave(shift[k], counts[k], output_size=p) + torch.arange(p, device=device)
        pair_rows[dest] = b.pair_rows.to(pair_rows.dtype) + offsets[k]
        pair_weights[dest] = b.pair_weights.to(pair_weights.dtype)

    # Shared rows: offset and concatenated; weights materialised only when some part has them.
    with_shared = [k for k, b in enumerate(batches) if b.shared_rows is not None]
    shared_rows = shared_weights = None
    if with_shared:
        shared_rows = torch.cat([batches[k].shared_rows + offsets[k] for k in with_shared])
        weighted = [batches[k].shared_weights for k in with_shared if batches[k].shared_weights is not None]
        if weighted:
            dtype = weighted[0].dtype
            shared_weights = torch.cat(
                [
                    torch.ones(batches[k].shared_rows.numel(), dtype=dtype, device=device)
                    if batches[k].shared_weights is None
                    else batches[k].shared_weights.to(dtype)
                    for k in with_shared
                ]
            )
    counts_dtype = batches[0].expert_counts.dtype
    merged = ExpertBatch(x, pair_rows, pair_weights, total.to(counts_dtype), shared_rows, shared_weights)
    return merged, sizes


def split_output(out: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """A merged call's [sum N_k, H] output as each part's [N_k, H] rows (views, in part order)."""
    if out.shape[0] != sum(sizes):
        raise ValueError(f"output has {out.shape[0]} rows, the merged parts {sum(sizes)}")
    return list(out.split(sizes))
