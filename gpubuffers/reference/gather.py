"""Gather (pure torch): every leaf of a batch read at its slots, one ``index_select`` each.

The reference of :mod:`gpubuffers.kernels.gather`.
"""

from __future__ import annotations

import threading

import torch

_scratch = threading.local()


def gather(entries: list[tuple], slot_sets: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Every entry ``(source [rows, *shape], slot set)`` read at its slot set (an index of any
    shape); an entry ``(source, slot set, dtype)`` is returned in ``dtype`` (a source stored
    narrower, widened after the read). Returns one ``[*index_shape, *shape]`` tensor per entry."""
    out = []
    for src, which, *dtype in entries:
        index = slot_sets[which]
        if dtype and dtype[0] != src.dtype:
            value = _narrow_rows(src, index.reshape(-1)).to(dtype[0])
        else:
            value = src.index_select(0, index.reshape(-1))
        out.append(value.view(*index.shape, *src.shape[1:]))
    return out


def _narrow_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``src.index_select(0, index)`` for a source stored narrower than it is returned. On the
    CPU the rows land in scratch kept per thread and per shape, since they are widened into fresh
    memory right away: a batch then allocates what a leaf stored as added allocates (the pages of
    a fresh allocation are faulted in as they are first written, which costs about as much as the
    read itself here)."""
    if src.device.type != "cpu":
        return src.index_select(0, index)
    shape = (index.shape[0], *src.shape[1:])
    cache = _scratch.__dict__.setdefault("rows", {})
    key = (src.dtype, shape)
    rows = cache.get(key)
    if rows is None:
        if len(cache) >= 16:
            cache.clear()
        rows = cache[key] = torch.empty(shape, dtype=src.dtype)
    return torch.index_select(src, 0, index, out=rows)
