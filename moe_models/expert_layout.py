"""Where a layer's expert tensors are in a checkpoint, in each layout published checkpoints use.

Checkpoints of one family differ in how they store experts (transformers' `save_pretrained` writes
the family's published layout; transformers itself converts on load):

- per expert: `{block}.experts.{e}.gate_proj.weight` / `up_proj` / `down_proj` (DeepSeek, Qwen, GLM,
  ...), or `w1` / `w3` / `w2` (Mixtral, MiniMax, Phi-MoE), optionally with `.bias`;
- fused: `{block}.experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] (transformers v5's
  own layout), or transposed [E, H, 2I] / [E, I, H] (Llama 4, gpt-oss), with gate and up
  interleaved column by column (gpt-oss) and biases `gate_up_proj_bias` / `down_proj_bias`;
- Granite: `{block}.input_linear.weight` [E, 2I, H] and `{block}.output_linear.weight` [E, H, I].

`{block}` is the decoder layer's MoE block under its checkpoint name (`mlp`, `block_sparse_moe`,
`feed_forward`, `ffn`). The layout is found from the keys, per layer; every reader yields one expert at a
time as (gate [I, H], up [I, H], down [H, I], biases or None) and reads only the experts asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moe_models.checkpoint import Checkpoint, CheckpointError
from moe_models.spec import ModelSpec

BLOCK_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "ffn")
PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# The shared experts' module and projections as checkpoints name them (transformers renames some on
# load: Hunyuan-V3 `shared_mlp`, Laguna `shared_expert`, Hunyuan-V4 `linear_gate` for gate_proj).
SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
SHARED_TRIOS = (*PER_EXPERT_NAMES, ("linear_gate", "up_proj", "down_proj"))


@dataclass(frozen=True)
class ExpertWeights:
    """One expert in the workers' layout: gate, up [I, H], down [H, I]; biases [I], [I], [H] or None."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class ExpertLayout:
    kind: str  # "per_expert" | "fused" | "linear_io"
    prefix: str  # the checkpoint's MoE block of this layer, e.g. "model.layers.3.block_sparse_moe"
    names: tuple[str, str, str] = PER_EXPERT_NAMES[0]  # per_expert: gate, up, down

    def expert_keys(self, expert: int) -> list[str]:
        """The keys one expert's weights live in (fused layouts: the whole tensors, read by row)."""
        if self.kind == "per_expert":
            return [f"{self.prefix}.experts.{expert}.{n}.weight" for n in self.names]
        if self.kind == "fused":
            return [f"{self.prefix}.experts.gate_up_proj", f"{self.prefix}.experts.down_proj"]
        return [f"{self.prefix}.input_linear.weight", f"{self.prefix}.output_linear.weight"]


def _prefixes(spec: ModelSpec, layer: int) -> list[str]:
    names = dict.fromkeys((spec.moe_module_path, *BLOCK_NAMES))
    return [f"model.layers.{layer}.{n}" for n in names]


def find_expert_layout(ck: Checkpoint, spec: ModelSpec, layer: int) -> ExpertLayout:
    """The layout of `layer`'s routed experts in `ck`, from its keys (no tensor is read)."""
    for prefix in _prefixes(spec, layer):
        for names in PER_EXPERT_NAMES:
            if f"{prefix}.experts.0.{names[0]}.weight" in ck:
                return ExpertLayout("per_expert", prefix, names)
        if f"{prefix}.experts.gate_up_proj" in ck:
            return ExpertLayout("fused", prefix)
        if f"{prefix}.input_linear.weight" in ck:
            return ExpertLayout("linear_io", prefix)
    tried = ", ".join(_prefixes(spec, layer))
    raise CheckpointError(
        f"checkpoint {ck.model_dir} has no routed experts of MoE layer {layer} in a known layout "
        f"(looked under {tried}: experts.N.gate_proj / w1, experts.gate_up_proj, input_linear)"
    )


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    return t


def read_experts(
    ck: Checkpoint, spec: ModelSpec, layer: int, expert_ids: list[int]
) -> Iterator[ExpertWeights]:
    """Yield each expert of `expert_ids` in order, reading only those experts (and their biases)."""
    if not expert_ids:
        return
    h, inter = spec.hidden_size, spec.moe_intermediate_size
    lay = find_expert_layout(ck, spec, layer)
    p = lay.prefix
    if lay.kind == "per_expert":
        yield from _read_per_expert(ck, lay, expert_ids, h, inter, spec.expert_fn.bias)
        return
    if lay.kind == "linear_io":
        gate_up_key, down_key, biases = f"{p}.input_linear.weight", f"{p}.output_linear.weight", False
    else:
        gate_up_key, down_key = f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj"
        biases = spec.expert_fn.bias
    rows = [ck.read_rows(gate_up_key, expert_ids), ck.read_rows(down_key, expert_ids)]
    if biases:
        rows += [
            ck.read_rows(f"{gate_up_key}_bias", expert_ids),
            ck.read_rows(f"{down_key}_bias", expert_ids),
        ]
    for parts in zip(*rows, strict=True):
        gate_up, down = parts[0], parts[1]
        if spec.fused_transposed:  # [H, 2I], [I, H] -> the workers' [2I, H], [H, I]
            gate_up = _check(gate_up_key, gate_up, (h, 2 * inter)).t()
            down = _check(down_key, down, (inter, h)).t()
        gate_up = _check(gate_up_key, gate_up, (2 * inter, h))
        down = _check(down_key, down, (h, inter))
        gb = ub = db = None
        if biases:
            gu_b, db = (
                _check(f"{gate_up_key}_bias", parts[2], (2 * inter,)),
                _check(f"{down_key}_bias", parts[3], (h,)),
            )
        if spec.fused_interleaved:  # gate, up alternate: rows 0, 2, 4, ... are gate
            gate, up = gate_up[0::2], gate_up[1::2]
            if biases:
                gb, ub = gu_b[0::2], gu_b[1::2]
        else:
            gate, up = gate_up[:inter], gate_up[inter:]
            if biases:
                gb, ub = gu_b[:inter], gu_b[inter:]
        yield ExpertWeights(gate, up, down, gb, ub, db)


def _read_per_expert(ck, lay: ExpertLayout, expert_ids, h: int, inter: int, biases: bool):
    if biases:
        raise CheckpointError(f"per-expert tensors with biases ({lay.prefix}) are not supported")
    shapes = ((inter, h), (inter, h), (h, inter))
    keys = [k for e in expert_ids for k in lay.expert_keys(e)]
    trio: list[torch.Tensor] = []
    for j, (key, t) in enumerate(ck.iter_tensors(keys)):
        trio.append(_check(key, t, shapes[j % 3]))
        if len(trio) == 3:
            yield ExpertWeights(*trio)
            trio = []


def shared_keys(ck: Checkpoint, spec: ModelSpec, layer: int) -> tuple[str, ...]:
    """The checkpoint keys of `layer`'s shared experts: (gate, up, down) or (input_linear, output_linear)."""
    names = dict.fromkeys((*([spec.shared_module_path] if spec.shared_module_path else []), *SHARED_NAMES))
    for prefix in _prefixes(spec, layer):
        for name in names:
            base = f"{prefix}.{name}"
            for trio in SHARED_TRIOS:
                if f"{base}.{trio[0]}.weight" in ck:
                    return tuple(f"{base}.{n}.weight" for n in trio)
            if f"{base}.input_linear.weight" in ck:
                return (f"{base}.input_linear.weight", f"{base}.output_linear.weight")
    raise CheckpointError(
        f"checkpoint {ck.model_dir} has no shared experts of MoE layer {layer} "
        f"(looked for {sorted(names)} under {', '.join(_prefixes(spec, layer))})"
    )


def read_shared(
    ck: Checkpoint, spec: ModelSpec, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`layer`'s (fused) shared experts as (gate [Is, H], up [Is, H], down [H, Is])."""
    h, si = spec.hidden_size, spec.shared_intermediate_size
    keys = shared_keys(ck, spec, layer)
    tensors = dict(ck.iter_tensors(keys))
    if len(keys) == 2:
        gate_up = _check(keys[0], tensors[keys[0]], (2 * si, h))
        return gate_up[:si], gate_up[si:], _check(keys[1], tensors[keys[1]], (h, si))
    g, u, d = (tensors[k] for k in keys)
    return _check(keys[0], g, (si, h)), _check(keys[1], u, (si, h)), _check(keys[2], d, (h, si))
