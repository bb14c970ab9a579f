"""Episode index (pure torch): the per-slot table the buffer updates once per add, in O(N).

The reference of :mod:`gpubuffers.kernels.episode_index`. Functions here know nothing of the
buffer object; they never import triton, never read a device value on the host and never branch
in Python on tensor contents, so the same code runs on CUDA tensors without a host sync.

The index is per slot and written once per add, a row at a time: everything the samplers need is
read from the slot itself or from the previous row, which is always live (T >= 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import ENDED, HAS_FINAL, SENTINEL, STATE_ADDS, STATE_RESTART, STATE_SIZE, TRUNCATED, ring_rows
from ..memory import full


@dataclass
class EpisodeIndex:
    """Device episode index for T rows and N lanes, updated once per add in O(N) work.

    start: [T, N] int64, absolute row at which the episode holding the slot began (written
        with the slot, never rewritten); ``SENTINEL`` for reset rows.
    end_flags: [T, N] uint8, at the last slot of an episode once its end is known:
        ``ENDED | TRUNCATED (if truncated) | HAS_FINAL (if its final obs was stored)``, else 0.
        The episode's length is the slot's row minus its ``start``, plus one.
    ret: [T, N] float32, return of the slot's episode from its first row through this row.
    final_idx: [T, N] int32, at an end slot whose final obs was stored: the low 31 bits of the
        lane's final-obs counter when it was stored (``layout.final_counter`` recovers the
        counter c from ``fin_head``; its side-table row is ``c % K``).
    fin_head: [N] int64, final observations stored per lane since construction.
    state: [STATE_SIZE] int64, the cursors (:mod:`gpubuffers.layout`): rows added, Philox offset,
        the floor of live rows and the restart add.
        Every op reads the ring rows it needs from here, never from host integers, so a CUDA
        graph of ``add`` + ``sample`` replays onto new rows with new draws.
    zeros: 0-d uint8 and float32 zeros, kept to avoid allocating them on every add.
    """

    start: torch.Tensor
    end_flags: torch.Tensor
    ret: torch.Tensor
    final_idx: torch.Tensor
    fin_head: torch.Tensor
    state: torch.Tensor
    zeros: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def empty(cls, rows: int, lanes: int, device: torch.device) -> "EpisodeIndex":
        i64 = dict(dtype=torch.int64, device=device)
        return cls(  # the [T, N] tables are read at random slots: huge pages on the host
            start=full((rows, lanes), SENTINEL, torch.int64, device),
            end_flags=full((rows, lanes), 0, torch.uint8, device),
            ret=full((rows, lanes), 0, torch.float32, device),
            final_idx=full((rows, lanes), 0, torch.int32, device),
            fin_head=torch.zeros(lanes, **i64),
            state=torch.zeros(STATE_SIZE, **i64),
            zeros=(torch.zeros((), dtype=torch.uint8, device=device),
                   torch.zeros((), dtype=torch.float32, device=device)),
        )

    @property
    def rows(self) -> int:
        return self.start.shape[0]

    @property
    def lanes(self) -> int:
        return self.start.shape[1]


def rows_of(ix: EpisodeIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[1] int64 ring rows from the cursors: (row the next add writes, newest row, adds so far)."""
    adds = ix.state[STATE_ADDS:STATE_ADDS + 1]
    return (*ring_rows(adds, ix.rows), adds)


def add_step(ix: EpisodeIndex, done: torch.Tensor | None, terminated: torch.Tensor | None,
             truncated: torch.Tensor | None, has_final: bool, reward: torch.Tensor | None,
             marks_last: bool, next_step: bool) -> torch.Tensor:
    """Update the episode index for the row the next add writes (``state[STATE_ADDS]``; the
    caller advances the cursor once the add's other ops have run, see :func:`advance`).

    done: [N] bool, the flags of this add (``marks_last``: the row ends its episode; otherwise
        the row follows the end of an episode); None: ``terminated | truncated``.
    terminated, truncated: [N] bool or None, how the episodes the flags close ended; a lane with
        both is a termination. has_final: their final observations are being stored.
        The closed episodes' ``end_flags`` are ``ENDED | HAS_FINAL (has_final) | TRUNCATED
        (truncated and not terminated)``.
    reward: [N] float32 rewards of this row, or None when returns are not tracked.
    Returns [N] bool, the lanes whose episode ended with this add (at the new row when
    ``marks_last``, else at the row before it; none on the very first add of first mode).

    The first add (``state[STATE_RESTART]``, 0 unless a disk buffer was reopened to write on)
    starts an episode in every lane and never makes a reset row; in first mode its flags close
    nothing (they describe episodes before the restart), and the previous row is left as it is.
    """
    done, flags = end_flags_of(ix, done, terminated, truncated, has_final)
    row, prev, adds = rows_of(ix)
    first = adds == ix.state[STATE_RESTART:STATE_RESTART + 1]  # [1]: every lane starts an episode
    prev_start = ix.start.index_select(0, prev)[0]
    prev_ret = ix.ret.index_select(0, prev)[0]
    none = torch.zeros_like(done)
    if marks_last:
        prev_ended = (ix.end_flags.index_select(0, prev)[0] != 0) & ~first
        is_reset = prev_ended if next_step else none
        starts = ((prev_start == SENTINEL) if next_step else prev_ended) | first
        ended = done & ~is_reset
    else:
        if next_step:
            ended = done & (prev_start != SENTINEL) & ~first  # a flag right after a reset row ends nothing
            is_reset, starts = ended, (prev_start == SENTINEL) | first
        else:
            ended, is_reset, starts = done & ~first, none, done | first
        # The flag closes the episode of the previous row (a restart leaves that row alone).
        closed = torch.where(first, ix.end_flags.index_select(0, prev)[0], _end_flags(ix, ended, flags))
        ix.end_flags.index_copy_(0, prev, closed[None])
    start = torch.where(starts, adds, prev_start).masked_fill_(is_reset, SENTINEL)
    if reward is None:
        ret = torch.where(starts, ix.zeros[1], prev_ret)
    else:
        ret = torch.where(starts, reward, prev_ret + reward)
    ix.start.index_copy_(0, row, start[None])
    ix.ret.index_copy_(0, row, ret.masked_fill_(is_reset, 0.0)[None])
    here = _end_flags(ix, ended, flags) if marks_last else torch.zeros_like(ix.end_flags[0])
    ix.end_flags.index_copy_(0, row, here[None])
    return ended


def end_flags_of(ix: EpisodeIndex, done: torch.Tensor | None, terminated: torch.Tensor | None,
                 truncated: torch.Tensor | None, has_final: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(done [N] bool, end flags [N] uint8 of the episodes the flags close, or None for plain
    terminations) from the flags of an add, as :func:`add_step` describes them."""
    if done is None:
        done = terminated if truncated is None else terminated | truncated
    if truncated is None and not has_final:
        return done, None
    flags = torch.full_like(done, ENDED | (HAS_FINAL if has_final else 0), dtype=torch.uint8)
    if truncated is not None:
        if terminated is not None:
            truncated = truncated & ~terminated  # termination takes precedence
        flags.add_(truncated, alpha=TRUNCATED)
    return done, flags


def _end_flags(ix: EpisodeIndex, ended: torch.Tensor, flags: torch.Tensor | None) -> torch.Tensor:
    """[N] uint8 end flags of a row whose ``ended`` lanes close their episode; ``flags`` describes
    them (with the ENDED bit), None meaning plain terminations."""
    if flags is None:
        return ended.to(torch.uint8)
    return torch.where(ended, flags, ix.zeros[0])


def advance(ix: EpisodeIndex) -> None:
    """Count the add whose ops have all run: the next add writes the next row."""
    ix.state[STATE_ADDS:STATE_ADDS + 1].add_(1)


def record_ends(ix: EpisodeIndex, stats: torch.Tensor, totals: torch.Tensor, ended: torch.Tensor,
                marks_last: bool) -> None:
    """Keep per-row sums of the episodes that end on each live row, and their total.

    stats: [T, 3] float64, per ring row: episodes ended there, the sum of their lengths, the sum
        of their returns; totals: [3] float64, the same summed over live rows.
    ended: [N] bool, lanes whose episode ended with this add (as :func:`add_step` returns them,
        before :func:`advance`): at the new row when ``marks_last``, else at the row before it.
    The row this add overwrites leaves the live rows first, with its old sums. In first mode the
    previous row's sums are added to (they are zero since that row was written, except where a
    reopened disk buffer cut its episodes there). Counts and lengths are integers, exact in
    float64 below 2**53.
    """
    row, prev, adds = rows_of(ix)
    totals.sub_(stats.index_select(0, row)[0])
    end_row, end_abs = (row, adds) if marks_last else (prev, adds - 1)
    start = ix.start.index_select(0, end_row)[0]
    ret = ix.ret.index_select(0, end_row)[0]
    # where, not a product: a lane that did not end may hold an inf return or a reset row's start.
    lengths = torch.where(ended, end_abs + 1 - start, 0).sum()
    returns = torch.where(ended, ret, 0.0).sum(dtype=torch.float64)
    new = torch.stack([ended.sum().double(), lengths.double(), returns])
    if marks_last:
        stats.index_copy_(0, end_row, new[None])
    else:
        stats.index_fill_(0, row, 0.0)  # the overwritten row ends nothing yet
        stats.index_add_(0, end_row, new[None])
    totals.add_(new)
