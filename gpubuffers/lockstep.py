"""A mirror in lockstep with its buffer, on the CPU: what an add has just written into one
buffer's episode index, copied into the other's instead of computed again.

Two buffers are in lockstep when both were empty when their first add came and every add since
went to both (a buffer and its ``mirror=``). Rows are absolute, so the start, return and end
flags of a slot, the sums of the episodes that end on a row and the final-observation counters
are the same in both; only the ring rows differ (the mirror may hold more rows per lane, and
more final observations). Each function here does for the mirror what the reference ops of an
add do (:mod:`gpubuffers.reference.episode_index`, :mod:`gpubuffers.reference.finals`), writing
the same values bit for bit, once the buffer's own ops for that add have run and before either
index advances. These run on CPU tensors only: rows come from the host count of adds and the
lanes that ended are listed on the host, which on a GPU would stall the stream.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layout import ring_rows
from .reference import EpisodeIndex
from .specs import carrier


def copy_step(ix: EpisodeIndex, stats: torch.Tensor, totals: torch.Tensor, src: EpisodeIndex,
              src_stats: torch.Tensor, adds: int, marks_last: bool) -> None:
    """What ``add_step`` and ``record_ends`` write for add number ``adds`` (its absolute row),
    copied from ``src``. ``stats`` and ``totals`` are ``ix``'s own (its live rows differ from
    ``src``'s once ``src`` wraps); the sums of the episodes ending with this add come from
    ``src_stats``: in first mode ``src``'s previous row was zeroed when it was written, so it
    holds those sums now, added to zero as ``record_ends`` adds them."""
    row, prev = ring_rows(adds, ix.rows)
    src_row, src_prev = ring_rows(adds, src.rows)
    ix.start[row] = src.start[src_row]
    ix.ret[row] = src.ret[src_row]
    ix.end_flags[row] = src.end_flags[src_row]
    if not marks_last:  # the flags of this add close the previous row's episodes
        ix.end_flags[prev] = src.end_flags[src_prev]
    totals.sub_(stats[row])
    new = src_stats[src_row if marks_last else src_prev]
    if marks_last:
        stats[row] = new
    else:
        stats[row] = 0.0
        stats[prev] += new
    totals.add_(new)


def copy_finals(ix: EpisodeIndex, src: EpisodeIndex, ended: torch.Tensor, adds: int, marks_last: bool,
                final_rows: int, sides: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """What ``store_finals`` does for add number ``adds``, whose ``ended`` lanes ([N] bool) are
    the same in both: the final-obs entries and counters copied from ``src``, and the final
    observations of the ended lanes written to ``ix``'s own side tables (``final_rows`` rows per
    lane), ``side[counter % final_rows, lane] = value[lane]`` for each pair of ``sides`` and
    ``values``. The scratch row is left alone (nothing reads it)."""
    row, prev = ring_rows(adds, ix.rows)
    src_row, src_prev = ring_rows(adds, src.rows)
    ix.final_idx[row if marks_last else prev] = src.final_idx[src_row if marks_last else src_prev]
    ix.fin_head.copy_(src.fin_head)
    if not sides:
        return
    lanes = ended.nonzero().flatten()
    rows = (ix.fin_head[lanes] - 1) % final_rows  # an ended lane's counter before this add
    for side, value in zip(sides, values):
        carrier(side)[rows, lanes] = carrier(value)[lanes]
