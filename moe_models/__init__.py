"""What a served checkpoint is (spec from config.json) and how its tensors are read."""

from moe_models.checkpoint import Checkpoint, CheckpointError
from moe_models.families import SUPPORTED_FAMILIES
from moe_models.spec import ConfigError, ModelSpec, spec_from_pretrained

__all__ = [
    "SUPPORTED_FAMILIES",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "ModelSpec",
    "spec_from_pretrained",
]
