"""Gather (pure torch): every leaf of a batch read at its slots, one ``index_select`` each.

The reference of :mod:`gpubuffers.kernels.gather`.
"""

from __future__ import annotations

import torch


def gather(entries: list[tuple], slot_sets: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Every entry ``(source [rows, *shape], slot set)`` read at its slot set (an index of any
    shape); an entry ``(source, slot set, dtype)`` is returned in ``dtype`` (a source stored
    narrower, widened after the read). Returns one ``[*index_shape, *shape]`` tensor per entry."""
    out = []
    for src, which, *dtype in entries:
        index = slot_sets[which]
        value = src.index_select(0, index.reshape(-1)).view(*index.shape, *src.shape[1:])
        out.append(value.to(dtype[0]) if dtype and dtype[0] != src.dtype else value)
    return out
