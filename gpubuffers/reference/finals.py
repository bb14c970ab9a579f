"""Final observations (pure torch): reserve side-table rows for the episodes an add ended and
write their final observations there.

The reference of :mod:`gpubuffers.kernels.finals`. Like the rest of the reference it never
imports triton, never reads a device value on the host and never branches in Python on tensor
contents, so the same code runs on CUDA tensors without a host sync.

Each lane has its own ring of ``final_rows`` side-table rows, evicted in the lane's own time
order as its storage is, plus a scratch row (:func:`gpubuffers.layout.scratch_row`): here every
lane writes a row, and the lanes whose episode did not end write theirs to the scratch row, which
nothing reads. (The kernel writes the ended lanes only and leaves the scratch row alone.)
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..layout import FINAL_IDX_MASK, scratch_row
from ..specs import carrier
from .episode_index import EpisodeIndex, rows_of


def store_finals(ix: EpisodeIndex, ended: torch.Tensor, marks_last: bool, final_rows: int,
                 sides: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Store the final observations of the ``ended`` lanes ([N] bool, as :func:`add_step`
    returns them, before :func:`advance`), whose episodes end at the row the add writes
    (``marks_last``) or at the row before it; that ring row ``end_row`` is read from the device
    cursor ``ix.state[STATE_ADDS]`` (graph-safe).

    For each ended lane, ``ix.final_idx[end_row]`` records the lane's final-obs counter
    ``ix.fin_head`` (its low 31 bits) (every lane's entry is written; only ended lanes' are read), the counter
    advances, and ``side[fin_head % final_rows, lane] = value[lane]`` for each pair of ``sides``
    ([final_rows + 1, N, *shape], written in place) and ``values`` ([N, *shape], same dtype, any
    strides). Lanes that did not end write their values to the scratch row.
    """
    if len(sides) != len(values):
        raise ValueError(f"sides, values: expected as many of each, got {len(sides)} and {len(values)}")
    row, prev, _ = rows_of(ix)
    end_row = row if marks_last else prev  # [1] int64
    pos = torch.where(ended, ix.fin_head % final_rows, scratch_row(final_rows))
    ix.final_idx.index_copy_(0, end_row, (ix.fin_head & FINAL_IDX_MASK).to(torch.int32)[None])
    ix.fin_head.add_(ended)
    if not sides:
        return
    lanes = torch.arange(ended.shape[0], device=ended.device)
    for i, (side, value) in enumerate(zip(sides, values)):
        if value.dtype != side.dtype:
            raise ValueError(f"values[{i}]: expected dtype {side.dtype}, got {value.dtype}")
        # index_put is not implemented for every dtype (uint16/32/64): write the same bits through
        # same-size integer views, which keep every stride, so a strided value needs no packing.
        carrier(side)[pos, lanes] = carrier(value)
