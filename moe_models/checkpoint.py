"""Reading individual tensors from a Hugging Face safetensors checkpoint.

A worker must read only its own experts and the router only the non-expert tensors, so nothing here
loads a whole file: the index (or each file's header) says which file holds a key, and safetensors
reads one tensor at a time. `keys_read` records every tensor read, which is how the tests prove
that nobody reads what it does not own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from moe_models.quantization import read_quantization

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint's files do not hold what its config promises."""


def _open(path: Path):
    # "pread" reads each tensor's bytes with pread(2) instead of mapping the file: with mmap every page
    # read stays resident (and counted in RSS) until the file is closed, so stacking a worker's
    # experts would peak near twice their size; with pread the peak is one tensor above the stack.
    return safe_open(str(path), framework="pt", backend="pread")


class Checkpoint:
    """Key -> file map of a checkpoint directory, single-file or sharded."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.key_to_file = self._key_map()
        self.keys_read: list[str] = []
        # FP8 block-quantized weights read back dequantized to fp32 (see moe_models/quantization.py).
        self.quant = read_quantization(self.model_dir)

    def _key_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' object")
            return dict(weight_map)
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors file in {self.model_dir}")
        key_map: dict[str, str] = {}
        for f in files:  # reads headers only
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    key_map[k] = f.name
        return key_map

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def keys(self) -> Iterable[str]:
        return self.key_to_file.keys()

    def require(self, keys: Iterable[str]) -> None:
        missing = [k for k in keys if k not in self.key_to_file]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"checkpoint {self.model_dir} lacks tensors {missing[:5]}{more}")

    def iter_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) one at a time, opening each file once; the caller copies and drops it."""
        keys = list(keys)
        self.require(keys)
        with ExitStack() as stack:
            handles = {}

            def read(key: str) -> torch.Tensor:
                fname = self.key_to_file[key]
                if fname not in handles:
                    handles[fname] = stack.enter_context(_open(self.model_dir / fname))
                self.keys_read.append(key)
                return handles[fname].get_tensor(key)

            for key in keys:
                yield key, self._dequantized(key, read(key), read)

    def read_rows(self, key: str, rows: list[int]) -> Iterator[torch.Tensor]:
        """Yield `tensor[r]` for each r, reading only those rows (fused-expert layouts)."""
        self.require([key])
        scale_key = self._scale_key(key)
        with ExitStack() as stack:
            slices = {}
            for k in (key, scale_key) if scale_key else (key,):
                slices[k] = stack.enter_context(_open(self.model_dir / self.key_to_file[k])).get_slice(k)

            def read_row(k: str, r: int) -> torch.Tensor:
                self.keys_read.append(f"{k}[{r}]")
                return slices[k][r : r + 1][0]

            for r in rows:
                yield self._dequantized(key, read_row(key, r), lambda k, r=r: read_row(k, r))

    def _scale_key(self, key: str) -> str | None:
        """The key of `key`'s FP8 block scales when the checkpoint stores it quantized, else None."""
        if self.quant is None or self.quant.scale_key(key) not in self.key_to_file:
            return None
        return self.quant.scale_key(key)

    def _dequantized(self, key: str, tensor: torch.Tensor, read) -> torch.Tensor:
        """`tensor` (stored under `key`) in full precision: quantized ones dequantized with the scales
        `read(scale_key)` returns, the others as stored."""
        scale_key = self._scale_key(key)
        if scale_key is None:
            if tensor.dtype.itemsize == 1 and tensor.dtype.is_floating_point:
                raise CheckpointError(
                    f"{self.model_dir}: {key} is stored as {tensor.dtype} without block scales "
                    f"({key}_scale_inv) or without an FP8 quantization_config in config.json"
                )
            return tensor
        try:
            return self.quant.dequantize(tensor, read(scale_key))
        except ValueError as e:
            raise CheckpointError(f"{self.model_dir}: {key}: {e}") from e
