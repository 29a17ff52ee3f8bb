"""ExpertWorker: owns a slice of the routed experts (plus the shared experts) and computes them.

It knows nothing of the router, routing or transports: it is given a checkpoint directory and, per
MoE layer, the global ids of the experts it hosts, and it answers `forward(layer, batch)` with one
reduced partial output per token row. A later issue wraps this very class as a Ray actor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from expert_workers.kernels import (
    ExpertStackBuilder,
    prepack_dense,
    select_kernel,
    swiglu_dense,
    swiglu_experts,
    weight_nbytes,
)
from moe_models.checkpoint import Checkpoint
from moe_models.spec import ModelSpec, spec_from_pretrained

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for `device` in this process ("auto": CUDA when this process sees a GPU)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} asked for, but CUDA is not available here; use 'cpu' or 'auto'"
        )
    return dev


@dataclass
class ExpertBatch:
    """One worker's share of one MoE layer (the plan slice plus its token rows).

    # N = token rows sent here, P = (row, expert) pairs routed here, NS = rows that get shared experts
    x: [N, H] the unique token rows this worker needs (a token is sent once, however many of its
       experts live here);
    pair_rows: int64 [P] row of x of each pair, pairs sorted by local expert;
    pair_weights: float32 [P] gate weight of each pair;
    expert_counts: int64 [E_local] pairs per local expert (sums to P);
    shared_rows: int64 [NS] rows of x to which this worker also applies the shared experts;
    shared_weights: float32 [NS] scale of the shared output per row, None meaning 1.
    """

    x: torch.Tensor
    pair_rows: torch.Tensor
    pair_weights: torch.Tensor
    expert_counts: torch.Tensor
    shared_rows: torch.Tensor | None = None
    shared_weights: torch.Tensor | None = None


@dataclass
class LayerExperts:
    """A layer's local weights: stacked routed experts and the (replicated) fused shared experts.

    With the "onednn" kernel w13 / w2 are lists of per-expert oneDNN-packed weights (same shapes)
    that replace the stacked tensors, and the shared weights are packed too.
    """

    expert_ids: list[int]
    w13: torch.Tensor | list[torch.Tensor]  # [E_local, 2I, H]
    w2: torch.Tensor | list[torch.Tensor]  # [E_local, H, I]
    shared_w13: torch.Tensor | None = None  # [2 * I_shared, H]
    shared_w2: torch.Tensor | None = None  # [H, I_shared]

    @property
    def nbytes(self) -> int:
        ts = [self.w13, self.w2, self.shared_w13, self.shared_w2]
        return sum(weight_nbytes(t) for t in ts)


class ExpertWorker:
    """Holds, per MoE layer, its routed experts and a replica of the shared experts."""

    def __init__(
        self,
        worker_id: int,
        model_dir: str,
        experts_per_layer: dict[int, list[int]],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        kernel: str | None = None,
        spec: ModelSpec | None = None,
        num_threads: int | None = None,
    ):
        if num_threads is not None:  # process-wide; results depend on it in the last bits
            torch.set_num_threads(num_threads)
        self.worker_id = worker_id
        self.spec = spec or spec_from_pretrained(model_dir)
        self.dtype = dtype
        self.device = resolve_device(device)
        self.kernel = select_kernel(self.device, dtype, kernel)
        self.checkpoint = Checkpoint(model_dir)
        self.layers: dict[int, LayerExperts] = {}
        t0 = time.perf_counter()
        for done, (layer, ids) in enumerate(experts_per_layer.items(), start=1):
            self.layers[layer] = self._load_layer(layer, list(ids))
            self.on_layer_loaded(layer, done, len(experts_per_layer))
        log.info(
            "worker %d loaded %d layers (%.1f MB) in %.2fs, kernel=%s",
            worker_id,
            len(self.layers),
            self.nbytes / 1e6,
            time.perf_counter() - t0,
            self.kernel,
        )

    # ---- loading -------------------------------------------------------------------------------

    def on_layer_loaded(self, layer: int, done: int, total: int) -> None:
        """Progress hook, called after each layer is loaded; a Ray wrapper shows it as a bar."""
        log.debug("worker %d: layer %d loaded (%d/%d)", self.worker_id, layer, done, total)

    def _load_layer(self, layer: int, expert_ids: list[int]) -> LayerExperts:
        """Stack this worker's experts of one layer, reading only their tensors.

        Each tensor is copied into the preallocated stack and dropped at once, so peak memory stays
        near the final size (one expert's tensor above it).
        """
        spec, names, ck = self.spec, self.spec.names, self.checkpoint
        h, inter = spec.hidden_size, spec.moe_intermediate_size
        bad = [e for e in expert_ids if not 0 <= e < spec.num_experts]
        if bad:
            raise ValueError(
                f"worker {self.worker_id}: expert ids {bad} out of range [0, {spec.num_experts})"
            )
        stack = ExpertStackBuilder(self.kernel, len(expert_ids), inter, h, self.dtype, self.device)
        per_expert = [names.expert_keys(layer, e) for e in expert_ids]
        fused_gate_up, fused_down = names.fused_expert_keys(layer)
        if expert_ids and per_expert[0][0] not in ck and fused_gate_up in ck:
            rows = zip(
                ck.read_rows(fused_gate_up, expert_ids), ck.read_rows(fused_down, expert_ids), strict=True
            )
            for i, (gate_up, down) in enumerate(rows):
                gate, up, dst_down = stack.slot(i)
                if gate_up.shape != (2 * inter, h) or down.shape != dst_down.shape:
                    raise ValueError(
                        f"{fused_gate_up} / {fused_down} rows have shapes {tuple(gate_up.shape)} / "
                        f"{tuple(down.shape)}, expected {(2 * inter, h)} / {tuple(dst_down.shape)}"
                    )
                gate.copy_(gate_up[:inter])
                up.copy_(gate_up[inter:])
                dst_down.copy_(down)
                stack.done(i)
        else:
            keys = [k for trio in per_expert for k in trio]
            for j, (_, t) in enumerate(ck.iter_tensors(keys)):
                i, which = divmod(j, 3)
                dst = stack.slot(i)[which]
                if t.shape != dst.shape:
                    raise ValueError(f"{keys[j]} has shape {tuple(t.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(t)
                if which == 2:
                    stack.done(i)
        w13, w2 = stack.finish()
        shared_w13 = shared_w2 = None
        if spec.shared_intermediate_size:
            si = spec.shared_intermediate_size
            shared_w13 = torch.empty(2 * si, h, dtype=self.dtype, device=self.device)
            shared_w2 = torch.empty(h, si, dtype=self.dtype, device=self.device)
            dsts = (shared_w13[:si], shared_w13[si:], shared_w2)
            keys = names.shared_keys(layer)
            for (key, t), dst in zip(ck.iter_tensors(keys), dsts, strict=True):
                if t.shape != dst.shape:
                    raise ValueError(f"{key} has shape {tuple(t.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(t)
        shared_w13, shared_w2 = prepack_dense(self.kernel, shared_w13), prepack_dense(self.kernel, shared_w2)
        return LayerExperts(expert_ids, w13, w2, shared_w13, shared_w2)

    # ---- serving -------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, layer: int, batch: ExpertBatch) -> torch.Tensor:
        """Weighted sum of this worker's experts (and the shared experts where asked) per row.

        # N = rows, P = pairs, H = hidden
        Returns [N, H] in the serving dtype; accumulation is in fp32.
        """
        lx = self.layers[layer]
        x = batch.x.to(self.device, self.dtype, non_blocking=True)  # [N, H]
        pair_rows = batch.pair_rows.to(self.device)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=self.device)  # [N, H]
        if pair_rows.numel():
            xs = x.index_select(0, pair_rows)  # [P, H], sorted by local expert
            ys = swiglu_experts(self.kernel, xs, batch.expert_counts.tolist(), lx.w13, lx.w2)  # [P, H]
            weights = batch.pair_weights.to(self.device, torch.float32)
            out.index_add_(0, pair_rows, ys.float() * weights[:, None])
        if batch.shared_rows is not None and batch.shared_rows.numel() and lx.shared_w13 is not None:
            rows = batch.shared_rows.to(self.device)
            ys = swiglu_dense(
                x.index_select(0, rows), lx.shared_w13, lx.shared_w2, self.kernel
            ).float()  # [NS, H]
            if batch.shared_weights is not None:
                ys = ys * batch.shared_weights.to(self.device, torch.float32)[:, None]
            out.index_add_(0, rows, ys)
        return out.to(self.dtype)

    # ---- introspection ---------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return sum(lx.nbytes for lx in self.layers.values())

    def describe(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "kernel": self.kernel,
            "experts": {layer: list(lx.expert_ids) for layer, lx in self.layers.items()},
            "param_bytes": self.nbytes,
        }
