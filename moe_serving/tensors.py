"""Wire codecs of tensors: the one place a torch tensor is turned into bytes and back.

A tensor travels as `{dtype, shape, data}`: `dtype` spelled as torch spells it ("float32",
"bfloat16", "int64", ...), `shape` a list of non-negative ints, `data` the elements' bytes,
little-endian, C order (so `len(data) == prod(shape) * itemsize`), on every host.

- msgpack (HTTP, `application/msgpack`): `tensor_to_map` / `tensor_from_map`, `data` raw bytes.
- protobuf (gRPC): `tensor_to_proto` / `tensor_from_proto` on `moe_serving.v1.Tensor`.
- JSON (HTTP, small requests): `to_json_lists` gives nested lists; `from_json` takes nested lists
  (with the dtype to build) or a `{dtype, shape, data}` map whose `data` is base64
  (`tensor_to_json_map` writes one).
- raw (between the router and the expert workers, through Ray's object store): `to_raw` /
  `from_raw`, the bytes as a uint8 numpy array, which Ray moves without pickling or copying.

Anything malformed raises `ServingError("invalid_argument", ...)` with a message naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import math
import sys
import warnings
from typing import Any

import numpy as np
import torch

from moe_serving.errors import ServingError
from moe_serving.v1 import moe_service_pb2

# wire name -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dt: name for name, dt in DTYPES.items()}

# torch dtype -> numpy dtype with the same bytes (numpy has no bfloat16: its bits travel as int16)
_NUMPY = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(np.int16),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
}
_BIG_ENDIAN_HOST = sys.byteorder == "big"

__all__ = [
    "DTYPES",
    "dtype_name",
    "from_json",
    "from_raw",
    "parse_dtype",
    "tensor_from_map",
    "tensor_from_proto",
    "tensor_to_json_map",
    "tensor_to_map",
    "tensor_to_proto",
    "to_json_lists",
    "to_raw",
]


def _invalid(message: str) -> ServingError:
    return ServingError("invalid_argument", message)


def parse_dtype(dtype: str | torch.dtype, name: str = "tensor") -> torch.dtype:
    """The torch dtype of a wire dtype name (a torch.dtype passes through if supported)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _NAMES:
            raise _invalid(f"{name}: unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        shown = "missing" if dtype in ("", None) else repr(dtype)
        raise _invalid(f"{name}: unknown dtype ({shown}); one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype ("float32", "bfloat16", ...)."""
    return _NAMES[parse_dtype(dtype)]


# ---- bytes ---------------------------------------------------------------------------------------


def to_raw(t: torch.Tensor) -> tuple[str, list[int], np.ndarray]:
    """(dtype name, shape, the elements' bytes as a uint8 numpy array), little-endian, C order.

    No copy for a contiguous CPU tensor on a little-endian host: Ray ships the array zero-copy
    through shared memory (the expert workers' transport), and `tensor_to_map` / `tensor_to_proto`
    take its bytes.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    name = dtype_name(t.dtype)
    t = t.detach().to("cpu").contiguous()
    shape = list(t.shape)
    flat = t.reshape(-1)
    if _BIG_ENDIAN_HOST and t.element_size() > 1:
        typed = (flat.view(torch.int16) if t.dtype == torch.bfloat16 else flat).numpy()
        return name, shape, typed.byteswap().view(np.uint8)
    return name, shape, flat.view(torch.uint8).numpy()


def from_raw(dtype: Any, shape: Any, data: Any, name: str = "tensor", copy: bool = True) -> torch.Tensor:
    """The tensor of (dtype, shape, bytes), checked. `data`: bytes or any buffer (a numpy array).

    copy=False views the buffer where the host order allows (read-only memory then: never write to
    the result); copy=True gives a writable tensor that owns its memory.
    """
    dt = parse_dtype(dtype, name)
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise _invalid(f"{name}: shape must be a list of ints, got {type(shape).__name__}")
    dims = list(shape)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise _invalid(f"{name}: shape must be a list of ints, got {dims!r}")
        if d < 0:
            raise _invalid(f"{name}: negative dimension in shape {dims}")
    dims = [int(d) for d in dims]
    if not isinstance(data, (bytes, bytearray, memoryview, np.ndarray)):
        raise _invalid(f"{name}: data must be bytes, got {type(data).__name__}")
    np_dtype = _NUMPY[dt]
    size = data.nbytes if isinstance(data, np.ndarray) else len(data)
    expected = math.prod(dims) * np_dtype.itemsize
    if size != expected:
        raise _invalid(
            f"{name}: data has {size} bytes, but shape {dims} of {_NAMES[dt]} needs {expected} "
            f"({math.prod(dims)} elements x {np_dtype.itemsize} bytes)"
        )
    arr = np.frombuffer(data, dtype=np_dtype.newbyteorder("<"))
    if copy or _BIG_ENDIAN_HOST:
        arr = arr.astype(np_dtype, copy=True)  # native byte order, writable, owns its memory
    with warnings.catch_warnings():  # torch warns about read-only arrays; the caller was told
        warnings.simplefilter("ignore", UserWarning)
        out = torch.from_numpy(arr)
    if dt == torch.bfloat16:
        out = out.view(torch.bfloat16)
    return out.reshape(dims)


def _to_bytes(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    dtype, shape, arr = to_raw(t)
    return dtype, shape, arr.tobytes()


# ---- msgpack map ---------------------------------------------------------------------------------


def tensor_to_map(t: torch.Tensor) -> dict:
    """`{"dtype", "shape", "data"}` with raw bytes (for msgpack)."""
    dtype, shape, data = _to_bytes(t)
    return {"dtype": dtype, "shape": shape, "data": data}


def tensor_from_map(m: Any, name: str = "tensor") -> torch.Tensor:
    """The tensor of a `{"dtype", "shape", "data"}` map (data: raw bytes)."""
    if not isinstance(m, dict):
        raise _invalid(f"{name}: expected a map with dtype, shape and data, got {type(m).__name__}")
    missing = [k for k in ("dtype", "shape", "data") if k not in m]
    if missing:
        raise _invalid(f"{name}: missing {', '.join(missing)} (a tensor is a map of dtype, shape and data)")
    return from_raw(m["dtype"], m["shape"], m["data"], name)


# ---- protobuf ------------------------------------------------------------------------------------


def tensor_to_proto(t: torch.Tensor, msg=None):
    """A `moe_serving.v1.Tensor` (or fill `msg`, e.g. `response.logits`, in place)."""
    if msg is None:
        msg = moe_service_pb2.Tensor()
    dtype, shape, data = _to_bytes(t)
    msg.dtype = dtype
    del msg.shape[:]
    msg.shape.extend(shape)
    msg.data = data
    return msg


def tensor_from_proto(msg, name: str = "tensor") -> torch.Tensor:
    """The tensor of a `moe_serving.v1.Tensor` message."""
    return from_raw(msg.dtype, list(msg.shape), msg.data, name)


# ---- JSON ----------------------------------------------------------------------------------------


def to_json_lists(t: torch.Tensor) -> Any:
    """Nested lists of Python numbers (bfloat16 / float16 as float values; a scalar as a number)."""
    t = t.detach().to("cpu")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.tolist()


def tensor_to_json_map(t: torch.Tensor) -> dict:
    """`{"dtype", "shape", "data"}` with base64 data: exact (bit for bit) and compact in JSON."""
    dtype, shape, data = _to_bytes(t)
    return {"dtype": dtype, "shape": shape, "data": base64.b64encode(data).decode("ascii")}


def _nested_shape(value: Any, name: str) -> tuple[list[int], list]:
    """(shape, flat leaves) of rectangular nested lists, level by level (no recursion)."""
    shape: list[int] = []
    level = [value]
    while level and isinstance(level[0], (list, tuple)):
        n = len(level[0])
        nxt: list = []
        for item in level:
            if not isinstance(item, (list, tuple)):
                raise _invalid(f"{name}: ragged nested lists (a number and a list at depth {len(shape)})")
            if len(item) != n:
                raise _invalid(
                    f"{name}: ragged nested lists (lengths {n} and {len(item)} at depth {len(shape)})"
                )
            nxt.extend(item)
        shape.append(n)
        level = nxt
    for item in level:
        if isinstance(item, (list, tuple)):
            raise _invalid(f"{name}: ragged nested lists (a number and a list at depth {len(shape)})")
    return shape, level


def from_json(value: Any, dtype: str | torch.dtype | None = None, name: str = "tensor") -> torch.Tensor:
    """The tensor of a JSON value: nested lists of numbers (built as `dtype`; default int64 when
    every number is an integer, else float32) or a `{dtype, shape, data}` map with base64 data."""
    if isinstance(value, dict):
        data = value.get("data")
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                raise _invalid(f"{name}: data is not valid base64 ({e})") from None
        elif data is not None:
            raise _invalid(f"{name}: in JSON, data must be a base64 string, got {type(data).__name__}")
        out = tensor_from_map({**value, "data": data} if "data" in value else value, name)
        if dtype is not None and out.dtype != parse_dtype(dtype, name):
            raise _invalid(
                f"{name}: dtype must be {dtype_name(parse_dtype(dtype))}, got {dtype_name(out.dtype)}"
            )
        return out
    shape, leaves = _nested_shape(value, name)
    dt = None if dtype is None else parse_dtype(dtype, name)
    for x in leaves:
        if (isinstance(x, bool) and dt != torch.bool) or not isinstance(x, (int, float)):
            raise _invalid(f"{name}: expected numbers in nested lists, got {type(x).__name__} ({x!r:.40})")
    if dt is None:
        dt = torch.int64 if all(isinstance(x, int) for x in leaves) else torch.float32
    if not dt.is_floating_point and dt != torch.bool:
        for x in leaves:
            if isinstance(x, float) and not x.is_integer():
                raise _invalid(f"{name}: {_NAMES[dt]} values must be integers, got {x!r}")
        leaves = [int(x) for x in leaves]
        info = torch.iinfo(dt)
        for x in leaves:
            if not info.min <= x <= info.max:
                raise _invalid(f"{name}: value {x} is out of range for {_NAMES[dt]}")
    try:
        return torch.tensor(leaves, dtype=dt).reshape(shape)
    except (RuntimeError, OverflowError, TypeError, ValueError) as e:
        raise _invalid(f"{name}: cannot build a {_NAMES[dt]} tensor: {e}") from None
