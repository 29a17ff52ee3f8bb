"""What a served checkpoint is: the typed `ModelSpec` every later stage reads, and `ConfigError`.

Every later stage (gate, plan, worker loading) reads this dataclass and never the raw config. This
module only defines the types and imports nothing of the package, so every other module of
`moe_models` can depend on it; `moe_models.loading` builds a spec from a checkpoint's `config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The first families served; their configs get extra checks (moe_models.loading.check_builtin_config),
# so a bad value is named before transformers trips over it.
BUILTIN_FAMILIES = ("deepseek_v3", "deepseek_v2", "qwen2_moe", "qwen3_moe", "mixtral")


class ConfigError(ValueError):
    """The checkpoint's config.json cannot be served (unsupported family or inconsistent values)."""


@dataclass(frozen=True)
class GatingSpec:
    """How many experts a token picks from (the rule itself is the family's own router module,
    which runs in the router: moe_models/families.py)."""

    num_experts: int
    top_k: int


@dataclass(frozen=True)
class ExpertFn:
    """What one routed (and shared) expert computes from its gate/up/down projections.

    glu: down(act(gate(x)) * up(x)), gate and up clamped when `limit` is set (DeepSeek-V4: gate to
    <= limit, up to [-limit, limit]). gpt_oss: both clamped, then down((up + 1) * gate *
    sigmoid(alpha * gate)). `bias`: the projections have biases (gpt-oss). `scale_input`: the gate
    weight scales the expert's input instead of its output (Llama 4).
    """

    act: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    style: Literal["glu", "gpt_oss"] = "glu"
    limit: float | None = None
    alpha: float = 1.0
    bias: bool = False
    scale_input: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """Everything the router and the workers need to know about a checkpoint."""

    model_type: str
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    moe_intermediate_size: int
    # Fused width of the shared experts (n_shared * I for deepseek); 0 when the family has none.
    shared_intermediate_size: int
    gating: GatingSpec
    expert_fn: ExpertFn = ExpertFn()
    moe_module_path: str = "mlp"  # the decoder layer's attribute holding the MoE block
    # "own": the block's forward runs with its experts replaced; "llama4": the block feeds its
    # experts a dense score-scaled input, so the router replaces the whole block (moe_layer.py).
    block_forward: Literal["own", "llama4"] = "own"
    shared_module_path: str | None = None  # the block's attribute holding the shared experts
    # LongCat-Flash's "zero-computation" experts: ids >= num_experts pass x through (times the
    # weight); the router computes them, they are never placed on a worker.
    num_zero_experts: int = 0
    # Fused expert tensors stored as [E, H, 2I] / [E, I, H] (x @ W), and gate/up interleaved by column.
    fused_transposed: bool = False
    fused_interleaved: bool = False
    # The positions the model was trained for (config.json's max_position_embeddings): the serving
    # context, prompt + completion, unless a smaller one is set. None: the config does not say.
    max_position_embeddings: int | None = None

    @property
    def num_experts(self) -> int:
        return self.gating.num_experts

    @property
    def top_k(self) -> int:
        return self.gating.top_k

    def check_moe_layer(self, layer: int) -> None:
        if layer not in self.moe_layers:
            raise ValueError(
                f"layer {layer} is not a MoE layer of this {self.model_type} model; "
                f"MoE layers are {list(self.moe_layers)}"
            )
