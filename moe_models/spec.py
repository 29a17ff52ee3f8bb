"""What a served checkpoint is: one typed `ModelSpec` built from `config.json`.

Every later stage (gate, plan, worker loading) reads this dataclass and never the raw config. The
values come from `transformers`' own config class so that defaults for missing keys are exactly the
ones the numerical reference uses; the raw `model_type` is checked first so that an unsupported or
malformed checkpoint fails with a clear message before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# The first families served; their configs get extra checks here (checked_builtin_config), so a bad
# value is named before transformers trips over it.
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


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} is not a Hugging Face checkpoint directory: no config.json in it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def load_hf_config(model_dir: str | Path):
    """The `transformers` config of a checkpoint, after checking its family is one we serve."""
    from transformers import AutoConfig

    raw = read_config_json(model_dir)
    from moe_models.quantization import quantization_from_config  # imports ConfigError from here

    quantization_from_config(raw, model_dir)  # an FP8 / quantized checkpoint we cannot read: refused now
    model_type = raw.get("model_type")
    check_family(model_type, f"{model_dir}/config.json")
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"malformed {model_dir}/config.json: {e}") from e


def spec_from_pretrained(model_dir: str | Path) -> ModelSpec:
    return spec_from_hf_config(load_hf_config(model_dir))


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_family(model_type, where: str) -> None:
    """Refuse a model_type we do not serve, naming why when it is a known MoE family."""
    from moe_models.families import SUPPORTED_FAMILIES, UNSUPPORTED_FAMILIES

    if model_type in UNSUPPORTED_FAMILIES:
        raise ConfigError(
            f"model_type {model_type!r} in {where} is not served: {UNSUPPORTED_FAMILIES[model_type]}"
        )
    if model_type not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"unsupported model_type {model_type!r} in {where}; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )


def spec_from_hf_config(cfg) -> ModelSpec:
    """Build and validate the spec; the only place that reads family-specific config keys."""
    from moe_models.families import spec_from_block_model

    check_family(cfg.model_type, "the model config")
    if cfg.model_type in BUILTIN_FAMILIES:
        check_builtin_config(cfg)
    return spec_from_block_model(cfg)


def check_builtin_config(cfg) -> None:
    """Values of a DeepSeek-V2/V3, Qwen2/3-MoE or Mixtral config that transformers would take and
    then fail on, or compute nonsense with, refused with their names."""
    t = cfg.model_type
    groups = None  # (n_group, topk_group, ranked by the top-2 sum)
    if t in ("deepseek_v3", "deepseek_v2"):
        num_experts, moe_inter = cfg.n_routed_experts, cfg.moe_intermediate_size
        if t == "deepseek_v3":
            groups = (cfg.n_group, cfg.topk_group, True)
        else:
            method = cfg.topk_method
            _require(
                method in ("greedy", "group_limited_greedy"),
                f"deepseek_v2 topk_method {method!r} is not supported (use 'greedy' or 'group_limited_greedy')",
            )
            if method == "group_limited_greedy":
                groups = (cfg.n_group, cfg.topk_group, False)
    elif t in ("qwen2_moe", "qwen3_moe"):
        num_experts, moe_inter = cfg.num_experts, cfg.moe_intermediate_size
        _require(num_experts > 0, f"{t} with num_experts={num_experts} has no MoE layer to serve")
        step = cfg.decoder_sparse_step
        _require(step >= 1, f"decoder_sparse_step must be >= 1, got {step}")
    else:  # mixtral
        num_experts, moe_inter = cfg.num_local_experts, cfg.intermediate_size
    top_k = cfg.num_experts_per_tok
    _require(num_experts >= 1, f"number of routed experts must be >= 1, got {num_experts}")
    _require(
        top_k is not None and 1 <= top_k <= num_experts,
        f"num_experts_per_tok={top_k} must be between 1 and the number of experts ({num_experts})",
    )
    if groups is not None:
        n_group, topk_group, top2 = groups
        _require(
            n_group is not None and n_group >= 1 and num_experts % n_group == 0,
            f"n_group={n_group} must divide the number of experts ({num_experts})",
        )
        _require(
            topk_group is not None and 1 <= topk_group <= n_group,
            f"topk_group={topk_group} must be between 1 and n_group={n_group}",
        )
        per_group = num_experts // n_group
        _require(
            topk_group * per_group >= top_k,
            f"topk_group={topk_group} groups of {per_group} experts cannot hold top-{top_k} choices",
        )
        if top2:
            _require(per_group >= 2, f"groups of {per_group} expert(s) cannot be ranked by their top-2 sum")
    _require(moe_inter >= 1, f"expert intermediate size must be >= 1, got {moe_inter}")
    _require(cfg.hidden_size >= 1, f"hidden_size must be >= 1, got {cfg.hidden_size}")
