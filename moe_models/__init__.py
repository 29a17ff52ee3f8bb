"""What a served checkpoint is (spec from config.json) and how its tensors are read.

Layering, each module importing only those before it: `spec` (the types, `ConfigError`) <-
`quantization` <- `checkpoint` <- `expert_layout` <- `families` <- `loading`. `spec_from_pretrained`
is imported from `loading` on first use: expert-worker processes import this package for the spec
types and the checkpoint reader and must not pay for `transformers`, which `loading` imports.
"""

from moe_models.checkpoint import Checkpoint, CheckpointError
from moe_models.families import SUPPORTED_FAMILIES
from moe_models.spec import ConfigError, ModelSpec

__all__ = [
    "SUPPORTED_FAMILIES",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "ModelSpec",
    "spec_from_pretrained",
]


def __getattr__(name: str):
    if name == "spec_from_pretrained":
        from moe_models import loading

        return loading.spec_from_pretrained
    raise AttributeError(f"module 'moe_models' has no attribute {name!r}")
