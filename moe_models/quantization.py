"""FP8 block-quantized checkpoints, as DeepSeek-V3/V3.2/R1 and Kimi-K2 publish them.

Their config.json carries `quantization_config: {quant_method: "fp8", fmt: "e4m3", activation_scheme:
"dynamic", weight_block_size: [128, 128]}`, and each quantized 2-D weight `X.weight` is stored as
float8_e4m3fn next to a companion `X.weight_scale_inv: float32 [ceil(rows/128), ceil(cols/128)]`
(fused expert tensors: `X: [E, rows, cols]` with `X_scale_inv: [E, ceil(rows/128), ceil(cols/128)]`).
The weight is `fp8.float() * scale_inv`, one scale per 128x128 block; blocks at the right and bottom
edges are partial (DeepSeek pads them with zeros before taking the block's amax, so they have a scale
of their own like any other block).

Which tensors are quantized is read from the checkpoint itself: a tensor is quantized when it has a
`_scale_inv` companion. The published checkpoints leave the embeddings, the norms, the router gate and
`lm_head` in bf16 without scales (DeepSeek's README_WEIGHTS.md; transformers' FineGrainedFP8 keeps
`lm_head` and `modules_to_not_convert` unconverted), so those read as stored, with no list of module
names to keep in sync.

Where dequantization happens: `Checkpoint` returns every quantized weight dequantized to fp32 (its
scale read with it and recorded in `keys_read`), and the router and the workers copy it into the
serving dtype as they do for any checkpoint: dequantize at load. Keeping FP8 in memory and
dequantizing a tile at a time in the expert kernel was measured against it on this project's 2-core
AMD EPYC (`python -m bench.fp8_experts --rows 1,8,64 --reps 5 --threads 1`, docs/performance.md "FP8
checkpoints"): with the fastest FP8 -> fp32 conversion we found (a bit trick, 4.7 G elements/s; torch's
own float8 cast does 0.34) it ran at 0.60x / 0.64x / 0.84x the speed of fp32 weights dequantized at
load for 1 / 8 / 64 rows per expert, against 2.30x / 3.49x / 2.06x for bf16 at load (native bf16) and
1.18x / 1.11x / 0.97x for bf16 at load computed by the `upcast` kernel (CPUs without native bf16). The
conversion costs more than the bytes it saves, so on CPU FP8 storage would only trade speed for
memory; serve `dtype="bfloat16"` to halve what fp32 takes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_models.spec import ConfigError

SCALE_SUFFIX = "_scale_inv"  # `X.weight` -> `X.weight_scale_inv`; fused `X.gate_up_proj` -> `..._scale_inv`
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn}
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn
ACTIVATION_SCHEMES = ("dynamic",)  # "static" would need per-tensor activation scales we do not apply
SCALE_FORMATS = ("float", "ue8m0")  # ue8m0 (V3.1/V3.2): power-of-two scales, fp32 or e8m0 bytes


@dataclass(frozen=True)
class Fp8BlockQuant:
    """A checkpoint's FP8 block quantization: the storage format and the block each scale covers."""

    block: tuple[int, int] = (128, 128)  # (rows, cols) of one scale's block
    fmt: str = "e4m3"

    @property
    def storage_dtype(self) -> torch.dtype:
        return FP8_FORMATS[self.fmt]

    def scale_key(self, key: str) -> str:
        """The checkpoint key of `key`'s block scales (present only when `key` is quantized)."""
        return key + SCALE_SUFFIX

    def dequantize(self, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
        """`weight` in fp32; ValueError when the tensors are not what this quantization stores."""
        if weight.dtype != self.storage_dtype:
            raise ValueError(f"stored as {weight.dtype}, expected {self.storage_dtype} (it has block scales)")
        return dequantize_fp8_blocks(weight, scale_inv, self.block)


def quantization_from_config(raw: dict[str, Any], where: str | Path) -> Fp8BlockQuant | None:
    """The quantization `config.json` declares (None: plain weights); refuses what we cannot read.

    Called when the config is loaded, so a checkpoint we cannot dequantize fails with its name before
    any weight is read.
    """
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"{where}/config.json: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method != "fp8":
        raise ConfigError(
            f"{where}/config.json: quant_method {method!r} is not supported; only FP8 block-quantized "
            f"checkpoints (quant_method 'fp8' with weight_block_size, as DeepSeek-V3 and Kimi-K2 publish "
            f"them) are read. Dequantize the checkpoint to bf16 / fp32 to serve it."
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt not in FP8_FORMATS:
        raise ConfigError(
            f"{where}/config.json: FP8 format fmt={fmt!r} is not supported (supported: {list(FP8_FORMATS)})"
        )
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ACTIVATION_SCHEMES:
        raise ConfigError(
            f"{where}/config.json: FP8 activation_scheme={scheme!r} is not supported "
            f"(supported: {list(ACTIVATION_SCHEMES)})"
        )
    scale_fmt = qc.get("scale_fmt", "float")
    if scale_fmt not in SCALE_FORMATS:
        raise ConfigError(
            f"{where}/config.json: FP8 scale_fmt={scale_fmt!r} is not supported (supported: {list(SCALE_FORMATS)})"
        )
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise ConfigError(
            f"{where}/config.json: FP8 checkpoints with expert_dtype={qc['expert_dtype']!r} "
            f"(FP4-packed experts) are not supported"
        )
    block = qc.get("weight_block_size")
    if not (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConfigError(
            f"{where}/config.json: FP8 weight_block_size={block!r} is not supported; block-quantized "
            f"checkpoints name two positive block sides, e.g. [128, 128] (per-tensor FP8 is not read)"
        )
    return Fp8BlockQuant(block=(block[0], block[1]), fmt=fmt)


def read_quantization(model_dir: str | Path) -> Fp8BlockQuant | None:
    """The quantization of the checkpoint in `model_dir` (None without a config.json or without
    `quantization_config`)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return quantization_from_config(raw, model_dir)


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the block scales of a weight of `shape` ([..., rows, cols] -> [..., ceil, ceil])."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def _scales_fp32(scale_inv: torch.Tensor) -> torch.Tensor:
    """Block scales as fp32: float tensors as they are, ue8m0 exponents (float8_e8m0fnu, or the raw
    bytes as uint8) as 2 ** (byte - 127)."""
    if scale_inv.dtype == torch.uint8:
        return torch.exp2(scale_inv.float() - 127.0)
    return scale_inv.float()


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """fp32 `weight * scale_inv`, each scale applied to its block of the last two dims.

    # R, C = rows, cols; BR, BC = block sides
    weight: [..., R, C] (float8); scale_inv: [..., ceil(R/BR), ceil(C/BC)]. Returns [..., R, C] fp32.
    """
    if weight.dim() < 2:
        raise ValueError(f"a block-quantized weight has at least 2 dims, got shape {tuple(weight.shape)}")
    expected = scale_grid(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"block scales have shape {tuple(scale_inv.shape)}, expected {expected} for a weight of shape "
            f"{tuple(weight.shape)} in {block[0]}x{block[1]} blocks"
        )
    rows, cols = weight.shape[-2:]
    br, bc = block
    scale = _scales_fp32(scale_inv)
    # Step 1: the weight padded to whole blocks, as [..., nR, BR, nC, BC] (a view when nothing is padded).
    nr, nc = expected[-2:]
    w = weight.float()
    if (nr * br, nc * bc) != (rows, cols):
        w = torch.nn.functional.pad(w, (0, nc * bc - cols, 0, nr * br - rows))
    w = w.reshape(*w.shape[:-2], nr, br, nc, bc)
    # Step 2: one multiply per element by its block's scale, then drop the padding.
    w = w * scale[..., :, None, :, None]
    return w.reshape(*w.shape[:-4], nr * br, nc * bc)[..., :rows, :cols].contiguous()


def quantize_fp8_blocks(
    weight: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scale_inv) of `weight` [..., R, C], DeepSeek's recipe: per block
    scale = amax / 448 (stored as `scale_inv`, the factor that dequantizes), edge blocks zero-padded.

    For tests and benchmarks, which build FP8 checkpoints themselves.
    """
    rows, cols = weight.shape[-2:]
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    w = torch.nn.functional.pad(weight.float(), (0, nc * bc - cols, 0, nr * br - rows))
    w = w.reshape(*w.shape[:-2], nr, br, nc, bc)
    amax = w.abs().amax(dim=(-3, -1))  # [..., nR, nC]
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    q = (w / scale[..., :, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(*q.shape[:-4], nr * br, nc * bc)[..., :rows, :cols].contiguous()
    return q, scale.contiguous()
