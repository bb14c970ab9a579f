"""A torch function mode that fails on every call that would sync a CUDA device with the host.

It lets the CPU test suite prove that ``add`` and the samplers never read device values on
the host (``.item()``, ``.tolist()``, ``nonzero``, ``bool(tensor)`` in a Python ``if``, a tensor
as a slice bound, boolean-mask indexing), which on a GPU would each stall the stream.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

SYNCING = {"item", "tolist", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
           "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "repeat_interleave",
           "bincount", "histc", "synchronize"}


def _syncing_index(index) -> bool:
    """A boolean mask (its size depends on values) or a tensor used as a slice bound."""
    items = index if isinstance(index, tuple) else (index,)
    for i in items:
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
            return True
        if isinstance(i, slice) and any(isinstance(b, torch.Tensor) for b in (i.start, i.stop, i.step)):
            return True
    return False


class NoHostSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            raise AssertionError(f"host sync on the hot path: {name}")
        if name in ("__getitem__", "__setitem__") and len(args) > 1 and _syncing_index(args[1]):
            raise AssertionError(f"host sync on the hot path: value-dependent index in {name}")
        return func(*args, **(kwargs or {}))
