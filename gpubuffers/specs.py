"""Leaf specs: flattening nested steps and validating them against the stored layout.

A step is a (nested) mapping of tensors. Internally every leaf is addressed by its path
joined with ``/`` (``{"obs": {"policy": x}}`` is the leaf ``"obs/policy"``). Validation
reads metadata only (type, shape, dtype, device), never tensor values, so it costs no
host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

#: Keys that samples add beside the stored leaves; a step may not use them as leaf names.
RESERVED_KEYS = frozenset(
    {"next", "next_valid", "is_first", "is_last", "terminated", "truncated", "valid",
     "index", "lane", "cu_seqlens", "length", "mask", "num_rows", "episode_return",
     "return", "n_steps", "discount", "target_valid", "weight"}
)


@dataclass(frozen=True)
class LeafSpec:
    """Layout of one stored leaf.

    shape: the per-lane shape of one step (no time and no lane dimension).
    dtype: the dtype stored and returned.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype


def _is_tensordict(obj: Any) -> bool:
    return type(obj).__module__.startswith("tensordict") and hasattr(obj, "to_dict")


def flatten(step: Any, what: str) -> dict[str, Any]:
    """Flatten a nested mapping (or TensorDict) into ``{"a/b": leaf}``; leaves are not checked."""
    if type(step) is not dict:
        if _is_tensordict(step):
            step = step.to_dict()
        elif not isinstance(step, Mapping):
            raise TypeError(f"{what}: expected a dict of tensors (or a TensorDict), got {type(step).__name__}")
    out: dict[str, Any] = {}
    _walk(step, "", out, what)
    if not out:
        raise ValueError(f"{what}: expected at least one leaf, got an empty dict")
    return out


def _walk(node: Mapping, prefix: str, out: dict[str, Any], what: str) -> None:
    for key, value in node.items():
        if type(key) is not str or not key or "/" in key:
            raise ValueError(f"{what}: leaf names must be non-empty strings without '/', got {key!r}")
        path = prefix + key
        if isinstance(value, torch.Tensor):
            out[path] = value
            continue
        if _is_tensordict(value):
            value = value.to_dict()
        if isinstance(value, Mapping):
            if not value:
                raise ValueError(f"{what}: '{path}' is an empty dict; expected tensors")
            _walk(value, path + "/", out, what)
        else:
            out[path] = value


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`: ``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def resolve_device(device: Any, name: str = "device") -> torch.device:
    """``device`` as tensors on it report theirs: ``"cpu:0"`` is ``cpu``, and a device named
    without an index (``"cuda"``) gets the current one (``cuda:0``), so a buffer built with
    ``device="cuda"`` accepts the tensors that live there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}: expected a torch.device or a device string, got {device!r}") from err
    if dev.type in ("cpu", "meta"):
        return torch.device(dev.type)
    if dev.index is not None:
        return dev
    module = getattr(torch, dev.type, None)
    current = getattr(module, "current_device", None)
    if current is None:
        return torch.device(dev.type, 0)
    try:
        return torch.device(dev.type, current())
    except (AssertionError, RuntimeError) as err:
        raise ValueError(f"{name}: {dev.type!r} asked for, but no {dev.type} device is available "
                         f"here ({err})") from err


#: numpy dtype kinds that hold no numbers: object, bytes, str, void (records), datetimes.
_NON_NUMERIC_KINDS = {"O": "object", "S": "bytes", "U": "str", "V": "void", "M": "datetime",
                      "m": "timedelta"}


def as_tensor(value: Any, name: str, device: torch.device | None) -> torch.Tensor:
    """Accept a tensor as is, or convert a numpy array / Python scalar to a tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        kind = _NON_NUMERIC_KINDS.get(value.dtype.kind)
        if kind is not None:
            raise TypeError(f"{name}: expected a numeric or bool numpy array, got dtype "
                            f"{value.dtype} ({kind})")
        if isinstance(value, np.ndarray) and any(st < 0 for st in value.strides):
            raise ValueError(f"{name}: expected a numpy array with non-negative strides, got strides "
                             f"{value.strides} (a reversed view such as x[::-1]); pass "
                             f"np.ascontiguousarray(x)")
        return torch.as_tensor(value, device=device)
    if isinstance(value, (bool, int, float)):
        return torch.as_tensor(value, device=device)
    raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")


#: Same-size integer dtypes through which rows of any leaf are scattered: torch implements
#: ``index_put``/``index_copy`` for neither unsigned 16/32/64-bit integers nor every float type.
_CARRIERS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_QUANTIZED = {getattr(torch, n) for n in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
              if hasattr(torch, n)}


def storable(dtype: torch.dtype) -> bool:
    """Whether a leaf of ``dtype`` can be stored: any dtype of 1, 2, 4 or 8 bytes (moved through
    its carrier), and complex128; not quantized dtypes."""
    return dtype not in _QUANTIZED and (dtype.itemsize in _CARRIERS or dtype == torch.complex128)


def carrier(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the signed integer dtype of its element size (complex128 as itself)."""
    c = _CARRIERS.get(t.element_size())
    return t if c is None else t.view(c)


def check_leaf(value: torch.Tensor, name: str, batch: tuple[int, ...], spec: LeafSpec,
               device: torch.device) -> None:
    """Check one leaf against its spec; ``batch`` is the expected leading shape (``(N,)`` or ``()``)."""
    expected = batch + spec.shape
    if tuple(value.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(value.shape)}")
    if value.dtype != spec.dtype:
        raise TypeError(f"{name}: expected dtype {spec.dtype}, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")


def check_mask(value: Any, name: str, batch: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Validate a per-lane flag (``done``, ``truncated``) and return it as a bool tensor of ``batch``."""
    if isinstance(value, bool) or isinstance(value, np.bool_):
        value = torch.tensor(bool(value), device=device)
    value = as_tensor(value, name, device)
    if value.dtype != torch.bool and (value.dtype.is_floating_point or value.dtype.is_complex):
        raise TypeError(f"{name}: expected a bool (or integer 0/1) tensor, got dtype {value.dtype}")
    if tuple(value.shape) != batch:
        raise ValueError(f"{name}: expected shape {batch}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
    return value if value.dtype == torch.bool else value != 0
