"""Gather (pure torch): every leaf of a batch read at its slots, one ``index_select`` each.

The reference of :mod:`gpubuffers.kernels.gather`.
"""

from __future__ import annotations

import torch


def gather(entries: list[tuple[torch.Tensor, int]], slot_sets: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Every entry ``(source [rows, *shape], slot set)`` read at its slot set (an index of any
    shape). Returns one ``[*index_shape, *shape]`` tensor per entry."""
    out = []
    for src, which in entries:
        index = slot_sets[which]
        out.append(src.index_select(0, index.reshape(-1)).view(*index.shape, *src.shape[1:]))
    return out
