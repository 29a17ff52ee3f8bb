"""Building a `ModelSpec` from a checkpoint: read `config.json`, refuse what is not served, validate.

The raw `config.json` is checked first (quantization we cannot read, a `model_type` that is not a
served family) so that an unsupported or malformed checkpoint fails with a clear message before any
weight is read; the values then come from `transformers`' own config class, so that defaults for
missing keys are exactly the ones the numerical reference uses, and the spec itself is read off the
model transformers builds (`moe_models.families`). The top of the package's layering: it imports
`transformers`, which expert workers (given their spec by the router) never need to import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from moe_models.families import SUPPORTED_FAMILIES, UNSUPPORTED_FAMILIES, spec_from_block_model
from moe_models.quantization import quantization_from_config
from moe_models.spec import BUILTIN_FAMILIES, ConfigError, ModelSpec


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
    raw = read_config_json(model_dir)
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
