"""ExpertWorker: owns a slice of the routed experts (plus the shared experts) and computes them.

It knows nothing of the router, routing or transports: it is given a checkpoint directory and, per
MoE layer, the global ids of the experts it hosts (a *layout*; it may hold several while a new
placement is being prepared), and it answers `forward(layer, batch, layout)` with one reduced
partial output per token row. The Ray runtime wraps this very class as an actor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from expert_workers.kernels import (
    ExpertStackBuilder,
    moe_experts,
    prepack_dense,
    select_kernel,
    shared_experts,
)
from moe_models.checkpoint import Checkpoint
from moe_models.expert_layout import read_experts, read_shared
from moe_models.spec import ModelSpec
from moe_serving import tracing

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


class MissingLayout(KeyError):
    """A call named a layout this worker does not hold (any more): the caller's placement is older
    than the membership's, whose change dropped it. Callers tell it from a failure of the experts'
    code: the router takes the current placement and sends the rows again (`ExpertDispatcher`)."""


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
    """One layout's routed experts of a layer, stacked in slot order.

    With the "onednn" kernel w13 / w2 are lists of per-expert oneDNN-packed weights (same shapes)
    that replace the stacked tensors. An expert id may appear twice (two slots of one placement).
    """

    expert_ids: list[int]
    w13: torch.Tensor | list[torch.Tensor]  # [E_local, 2I, H]
    w2: torch.Tensor | list[torch.Tensor]  # [E_local, H, I]
    b13: torch.Tensor | None = None  # [E_local, 2I] biases (gpt-oss), gate then up
    b2: torch.Tensor | None = None  # [E_local, H]

    def weights(self, i: int):
        """Slot i's (w13 [2I, H], w2 [H, I]) in the kernel's layout (views of the stack, or the
        packed tensors themselves)."""
        return self.w13[i], self.w2[i]

    def biases(self, i: int):
        """Slot i's (b13 [2I], b2 [H]), or (None, None)."""
        return (None, None) if self.b13 is None else (self.b13[i], self.b2[i])


def _tensors(w) -> list[torch.Tensor]:
    if w is None:
        return []
    return [w] if isinstance(w, torch.Tensor) else list(w)


def _identity(t: torch.Tensor) -> int:
    """Where a tensor's memory is, to count shared weights once (oneDNN-packed weights have no
    storage pointer; they are shared as the same object)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return id(t)


class ExpertWorker:
    """Holds routed experts in one or more *layouts* plus a replica of the shared experts.

    A layout is an opaque key (the router uses a placement version) naming, per MoE layer, the
    expert of each local slot. A worker serves every layout it holds at once, so a router can load
    the next placement's layout in the background while passes still run on the current one, switch,
    then drop the old one; weights an expert already has in another layout are reused (shared
    outright with the "onednn" kernel's per-expert weights, copied from memory for stacked kernels)
    rather than read again.
    """

    def __init__(
        self,
        worker_id: int,
        model_dir: str,
        experts_per_layer: dict[int, list[int]] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        kernel: str | None = None,
        spec: ModelSpec | None = None,
        num_threads: int | None = None,
        layout: int = 0,
    ):
        self.num_threads = num_threads
        self._use_threads()
        self.worker_id = worker_id
        if spec is None:  # `moe_models.loading.spec_from_pretrained` makes one from a checkpoint
            raise ValueError("an ExpertWorker needs the model's spec (workers do not read configs)")
        self.spec = spec
        self.dtype = dtype
        self.device = resolve_device(device)
        self.kernel = select_kernel(
            self.device, dtype, kernel, self.spec.hidden_size, self.spec.moe_intermediate_size
        )
        self.model_dir = model_dir
        self._checkpoint: Checkpoint | None = None  # opened by the first load, whose errors come back clean
        self.layouts: dict[int, dict[int, LayerExperts]] = {}
        self.shared: dict[int, tuple] = {}  # layer -> (w13 [2*I_s, H], w2 [H, I_s]) or (None, None)
        self._latest: int | None = None
        self.labels: dict = {}  # opaque notes of whoever manages this worker, returned by describe()
        if experts_per_layer is not None:
            self.load_layout(layout, experts_per_layer)

    def _use_threads(self) -> None:
        """torch's thread count is per OS thread, and a threaded actor calls us from several: set it
        where we compute (results depend on it in the last bits)."""
        if self.num_threads is not None and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)

    @property
    def checkpoint(self) -> Checkpoint:
        if self._checkpoint is None:
            self._checkpoint = Checkpoint(self.model_dir)
        return self._checkpoint

    # ---- layouts -------------------------------------------------------------------------------

    def on_layer_loaded(self, layer: int, done: int, total: int) -> None:
        """Progress hook, called after each layer of a layout is loaded; a Ray wrapper shows a bar."""
        log.debug("worker %d: layer %d loaded (%d/%d)", self.worker_id, layer, done, total)

    def load_layout(self, key: int, experts_per_layer: dict[int, list[int]]) -> dict:
        """Build layout `key` (MoE layer -> expert id of each local slot) and start serving it.

        Reads from the checkpoint only experts no other layout of this worker holds. Returns what it
        did: {"layout", "experts_read", "experts_reused", "bytes", "seconds"}.
        """
        self._use_threads()
        t0 = time.perf_counter()
        layers = {int(layer): [int(e) for e in ids] for layer, ids in experts_per_layer.items()}
        unknown = sorted(set(layers) - set(self.spec.moe_layers))
        if unknown:
            raise ValueError(f"worker {self.worker_id}: {unknown} are not MoE layers of this model")
        built: dict[int, LayerExperts] = {}
        stats = {"experts_read": 0, "experts_reused": 0}
        for done, (layer, ids) in enumerate(layers.items(), start=1):
            built[layer] = self._load_layer(layer, ids, stats)
            if layer not in self.shared:
                self.shared[layer] = self._load_shared(layer)
            self.on_layer_loaded(layer, done, len(layers))
        self.layouts[key] = built  # one assignment: a concurrent forward sees all of it or nothing
        self._latest = key
        took = time.perf_counter() - t0
        log.info(
            "worker %d: layout %d ready (%d experts read, %d reused, %.1f MB in all) in %.2fs, kernel=%s",
            self.worker_id,
            key,
            stats["experts_read"],
            stats["experts_reused"],
            self.nbytes / 1e6,
            took,
            self.kernel,
        )
        return {"layout": key, **stats, "bytes": self.nbytes, "seconds": took}

    def set_labels(self, labels: dict) -> None:
        """Keep `labels` (merged into the current ones) and report them in `describe()`: a manager
        that restarts reads back what it noted (the router: its target worker count)."""
        self.labels.update(labels)

    def drop_layout(self, key: int) -> None:
        """Stop serving layout `key` and free the weights no other layout uses (unknown keys: no-op)."""
        self.layouts.pop(key, None)
        if self._latest == key:
            self._latest = max(self.layouts) if self.layouts else None

    def _held(self, layer: int) -> dict[int, tuple]:
        """Expert id -> its (weights, biases) in some layout of this worker, for `layer`."""
        out: dict[int, tuple] = {}
        for layout in self.layouts.values():
            lx = layout.get(layer)
            if lx is None:
                continue
            for i, e in enumerate(lx.expert_ids):
                out.setdefault(e, (lx.weights(i), lx.biases(i)))
        return out

    def _load_layer(self, layer: int, expert_ids: list[int], stats: dict) -> LayerExperts:
        """Stack one layer's experts in slot order: reuse what another layout holds, read the rest.

        Each tensor read is copied into the preallocated stack and dropped at once, so peak memory
        stays near the final size (one expert's tensor above it).
        """
        spec = self.spec
        h, inter = spec.hidden_size, spec.moe_intermediate_size
        bad = [e for e in expert_ids if not 0 <= e < spec.num_experts]
        if bad:
            raise ValueError(
                f"worker {self.worker_id}: expert ids {bad} out of range [0, {spec.num_experts})"
            )
        held = self._held(layer)
        to_read = list(dict.fromkeys(e for e in expert_ids if e not in held))  # unique, in slot order
        reader = read_experts(self.checkpoint, spec, layer, to_read)
        stack = ExpertStackBuilder(self.kernel, len(expert_ids), inter, h, self.dtype, self.device)
        b13 = b2 = None
        if spec.expert_fn.bias:  # small: plain stacked tensors whatever the kernel
            b13 = torch.empty(len(expert_ids), 2 * inter, dtype=self.dtype, device=self.device)
            b2 = torch.empty(len(expert_ids), h, dtype=self.dtype, device=self.device)
        for i, e in enumerate(expert_ids):
            if e in held:
                weights, biases = held[e]
                stack.put(i, *weights)
                if b13 is not None:
                    b13[i].copy_(biases[0])
                    b2[i].copy_(biases[1])
                stats["experts_reused"] += 1
                continue
            w = next(reader)
            gate, up, down = stack.slot(i)
            for dst, t in zip((gate, up, down), (w.gate, w.up, w.down), strict=True):
                dst.copy_(t)
            if b13 is not None:
                b13[i, :inter].copy_(w.gate_bias)
                b13[i, inter:].copy_(w.up_bias)
                b2[i].copy_(w.down_bias)
            # The tensors read go before packing allocates: freed after it, they would leave holes
            # among the packed weights that the heap never gives back (1.31x the weights' RSS).
            del w
            stack.done(i)
            # a second slot of the same expert reuses it
            held[e] = (stack.weights(i), (None, None) if b13 is None else (b13[i], b2[i]))
            stats["experts_read"] += 1
        w13, w2 = stack.finish()
        return LayerExperts(expert_ids, w13, w2, b13, b2)

    def _load_shared(self, layer: int) -> tuple:
        """The layer's fused shared experts (every worker holds a replica), or (None, None)."""
        spec = self.spec
        if not spec.shared_intermediate_size:
            return None, None
        h, si = spec.hidden_size, spec.shared_intermediate_size
        shared_w13 = torch.empty(2 * si, h, dtype=self.dtype, device=self.device)
        shared_w2 = torch.empty(h, si, dtype=self.dtype, device=self.device)
        gate, up, down = read_shared(self.checkpoint, spec, layer)
        for dst, t in zip((shared_w13[:si], shared_w13[si:], shared_w2), (gate, up, down), strict=True):
            dst.copy_(t)
        return prepack_dense(self.kernel, shared_w13), prepack_dense(self.kernel, shared_w2)

    # ---- serving -------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, layer: int, batch: ExpertBatch, layout: int | None = None) -> torch.Tensor:
        """Weighted sum of this worker's experts (and the shared experts where asked) per row.

        # N = rows, P = pairs, H = hidden
        `batch.expert_counts` counts pairs per slot of `layout` (None: the latest loaded).
        Returns [N, H] in the serving dtype; accumulation is in fp32.
        """
        with tracing.span(
            "experts", {"layer": layer, "rows": batch.x.shape[0], "pairs": batch.pair_rows.numel()}
        ):
            return self._forward(layer, batch, layout)

    def _forward(self, layer: int, batch: ExpertBatch, layout: int | None) -> torch.Tensor:
        self._use_threads()
        key = self._latest if layout is None else layout
        if key not in self.layouts:
            raise MissingLayout(
                f"worker {self.worker_id} holds no layout {key} (it holds {sorted(self.layouts)})"
            )
        lx = self.layouts[key][layer]
        shared_w13, shared_w2 = self.shared[layer]
        x = batch.x.to(self.device, self.dtype, non_blocking=True)  # [N, H]
        pair_rows = batch.pair_rows.to(self.device)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=self.device)  # [N, H]
        fn = self.spec.expert_fn
        if pair_rows.numel():  # Llama 4 (fn.scale_input): the expert sees weight * x, in the serving dtype
            weights = batch.pair_weights.to(self.device, torch.float32)  # [P]
            counts = batch.expert_counts.tolist()
            moe_experts(self.kernel, x, pair_rows, weights, counts, lx.w13, lx.w2, out, fn, lx.b13, lx.b2)
        if batch.shared_rows is not None and batch.shared_rows.numel() and shared_w13 is not None:
            rows = batch.shared_rows.to(self.device)  # [NS]
            scale = batch.shared_weights
            scale = None if scale is None else scale.to(self.device, torch.float32)
            shared_experts(self.kernel, x, rows, scale, shared_w13, shared_w2, out, fn)
        return out.to(self.dtype)

    # ---- introspection ---------------------------------------------------------------------------

    def set_tracing(self, on: bool) -> None:
        """Start (clearing) or stop recording step-trace spans in this worker's process."""
        tracing.enable(on)

    def take_trace(self) -> list[dict]:
        """The spans recorded since `set_tracing(True)`, as trace events (see moe_serving.tracing)."""
        return tracing.take()

    @property
    def layers(self) -> dict[int, LayerExperts]:
        """The latest layout's layers (what a single-layout worker serves)."""
        return self.layouts.get(self._latest, {}) if self._latest is not None else {}

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights held, each tensor counted once however many layouts share it."""
        seen: dict[int, int] = {}
        for layout in self.layouts.values():
            for lx in layout.values():
                for t in _tensors(lx.w13) + _tensors(lx.w2) + _tensors(lx.b13) + _tensors(lx.b2):
                    seen[_identity(t)] = t.numel() * t.element_size()
        for pair in self.shared.values():
            for t in pair:
                if t is not None:
                    seen[_identity(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    def describe(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "kernel": self.kernel,
            "layout": self._latest,
            "layouts": sorted(self.layouts),
            "experts": {layer: list(lx.expert_ids) for layer, lx in self.layers.items()},
            "param_bytes": self.nbytes,
            "labels": dict(self.labels),
        }
