"""Index sampling (pure torch): transitions with their links, windows, whole episodes.

The reference of :mod:`gpubuffers.kernels.sampling`, and the CPU backend. Slots and absolute rows
follow :mod:`gpubuffers.layout`. The entry points read the live rows from the index's device
cursors (``ix.state``), never from host integers, so they can be replayed in a CUDA graph; the
pickers take ``oldest`` as an int or a 0-d tensor. No function reads a device value on the host.
"""

from __future__ import annotations

import torch

from ..layout import (HAS_FINAL, SENTINEL, STATE_ADDS, STATE_FLOOR, TRUNCATED, absolute_row, final_lag,
                      final_slot)
from ..layout import live_span as _live_span
from .episode_index import EpisodeIndex


def take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table.view(-1)[index]`` for an index of any shape, through ``index_select`` (several
    times faster than advanced indexing on the CPU)."""
    return table.view(-1).index_select(0, index.reshape(-1)).view(index.shape)


#: Every bit of an int64 but the sign.
_INT64_MAX = (1 << 63) - 1


def wrap(slot: torch.Tensor, total: int) -> torch.Tensor:
    """``slot % total`` for int64 ``slot`` in ``[0, 2 * total)``, without a division (an int64
    remainder costs several times a subtraction on the CPU): ``slot - total`` where that is not
    negative. A negative difference with its sign bit cleared exceeds every ``slot``, so the
    minimum keeps ``slot`` there."""
    return torch.minimum(slot, (slot - total).bitwise_and_(_INT64_MAX))


def transition_ids(row: torch.Tensor, slot: torch.Tensor, lanes: int) -> torch.Tensor:
    """Transition ids ``absolute_row * N + lane`` (broadcasting ``row`` and ``slot``): unlike a
    slot, an id names one transition for the life of the buffer."""
    return row * lanes + slot % lanes


def first_choice(ok: torch.Tensor, *proposed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pick, per row of [B, M] proposals, the first accepted one: (*chosen [B], valid [B]).

    The first accepted of i.i.d. uniform proposals is uniform over the accepted set; rows
    with no accepted proposal keep proposal 0 and report ``valid=False``.
    """
    j = ok.to(torch.uint8).argmax(1, keepdim=True)
    return (*(p.gather(1, j).squeeze(1) for p in proposed), ok.any(1))


def transition_slots(ix: EpisodeIndex, proposals: torch.Tensor, oldest: int,
                     next_step: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Slots of transitions whose successor row is written.

    proposals: [B, M] int64 uniform in ``[0, (live_rows - 1) * N)``: (row offset from
        ``oldest``) * N + lane. Reset rows are rejected (``next_step`` only; otherwise M = 1
        and every proposal is accepted).
    Returns (slot [B], absolute row [B], valid [B] or None when every proposal is accepted).
    """
    slot, row, _, valid = _transition_picks(ix, proposals, oldest, next_step)
    return slot, row, valid


def _transition_picks(ix: EpisodeIndex, proposals: torch.Tensor, oldest: int, next_step: bool) -> tuple:
    """:func:`transition_slots` with the transition ids: (slot, row, id, valid). A proposal plus
    ``oldest * N`` is the id itself (row * N + lane)."""
    rows, lanes = ix.start.shape
    ids = proposals + oldest * lanes
    slot = ids % (rows * lanes)
    row = ids.div(lanes, rounding_mode="floor")
    if not next_step:
        return slot[:, 0], row[:, 0], ids[:, 0], None
    ok = take(ix.start, slot) != SENTINEL
    return first_choice(ok, slot, row, ids)


def transition_links(ix: EpisodeIndex, slot: torch.Tensor, row: torch.Tensor | None, final_rows: int,
                     next_step: bool, flags: torch.Tensor | None = None, first: bool = True) -> dict:
    """Successor and end-of-episode facts of transitions at ``slot`` [B] (absolute ``row`` [B],
    read for ``is_first`` only).

    final_rows: rows per lane of the final-obs side table (0 when there is none). The side table
    sits right after the T * N ring slots of each next leaf's source, so ``succ`` addresses one
    extended source ``[(T + final_rows + 1) * N, ...]``: the next row's slot inside an episode,
    the side-table row of the episode's final obs at its end.
    flags: the end flags at ``slot``, where the caller has read them already.
    Returns a dict of [B] tensors: ``succ``, ``is_first`` (unless ``first=False``), ``is_last``,
    ``terminated``, ``truncated``, ``next_valid``.
    """
    rows, lanes = ix.start.shape
    total = rows * lanes
    if flags is None:
        flags = take(ix.end_flags, slot)
    is_last = flags != 0
    truncated = (flags & TRUNCATED) != 0
    succ = wrap(slot + lanes, total)
    out = {"is_last": is_last, "terminated": is_last ^ truncated, "truncated": truncated}
    if first:
        out["is_first"] = take(ix.start, slot) == row
    if next_step:
        # The reset row after an episode's end holds its final observation; an end followed by
        # a row that is not a reset row (an episode cut where a reopened disk buffer restarted)
        # has none.
        out["next_valid"] = ~is_last | (take(ix.start, succ) == SENTINEL)
    elif final_rows == 0:
        out["next_valid"] = ~is_last
    else:
        lane = slot % lanes
        head = ix.fin_head.index_select(0, lane)
        lag = final_lag(head, take(ix.final_idx, slot))
        idx = head - lag                                   # layout.final_counter
        kept = ((flags & HAS_FINAL) != 0) & (lag <= final_rows)
        succ = torch.where(is_last, final_slot(total, idx, lane, final_rows, lanes), succ)
        out["next_valid"] = ~is_last | kept
    out["succ"] = succ
    return out


def row_marks(ix: EpisodeIndex, slot: torch.Tensor, row: torch.Tensor) -> dict:
    """``is_first`` of transitions at ``slot`` [B] (absolute ``row`` [B]): what a sample keeps of
    its first rows' links when n-step segments describe the rest (:func:`gpubuffers.reference.nstep`
    gives their ``first_is_last``)."""
    return {"is_first": take(ix.start, slot) == row}


def window_ends(ix: EpisodeIndex, proposals: torch.Tensor, oldest: int,
                length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """End slots of admissible windows of ``length`` rows.

    proposals: [B, M] int64 uniform in ``[0, (live_rows - length + 1) * N)``: (end row offset
        from ``oldest + length - 1``) * N + lane; every proposal lies inside live data, so a
        window is admissible exactly when its end slot's episode began at or before its
        first row. Returns (end slot [B], end row [B], valid [B]).
    """
    rows, lanes = ix.start.shape
    first = oldest + length - 1
    slot = (proposals + first * lanes) % (rows * lanes)
    end_row = proposals.div(lanes, rounding_mode="floor").add_(first)
    ok = take(ix.start, slot) <= end_row - (length - 1)
    return first_choice(ok, slot, end_row)


def window_slots(end_slot: torch.Tensor, length: int, rows: int, lanes: int) -> torch.Tensor:
    """[B] end slots -> [B, length] slots of the window, oldest first."""
    back = torch.arange(length - 1, -1, -1, device=end_slot.device) * lanes
    return (end_slot[:, None] - back).remainder_(rows * lanes)


def live_span(ix: EpisodeIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """(live rows, oldest absolute row) as 0-d int64 tensors, from the device cursors."""
    return _live_span(ix.state[STATE_ADDS], ix.rows, ix.state[STATE_FLOOR])


def uniform_below(rng, shape: tuple[int, ...], high: torch.Tensor) -> torch.Tensor:
    """int64 draws uniform in ``[0, high)`` for a device ``high``: ``floor(u * high)`` for a
    float64 uniform ``u`` from the buffer's generator (bias below ``high / 2**53``)."""
    u = torch.rand(shape, dtype=torch.float64, generator=rng.generator, device=high.device)
    return (u * high).long()


def slot_age(rows: int, lanes: int, oldest, device: torch.device) -> torch.Tensor:
    """[T, N] (expanded view) rows from ``oldest`` to each slot's row: its absolute row is
    ``oldest + age``, and it is live when ``age < live_rows``."""
    ring = torch.arange(rows, device=device)
    return ((ring - oldest) % rows)[:, None].expand(rows, lanes)


def whole_episode_ends(ix: EpisodeIndex) -> torch.Tensor:
    """[T * N] bool: slots that end a finished episode whose every row is live.

    One pass over the index (O(capacity)): the episode sampler builds this once per add and
    then draws from it exactly, in O(log capacity) per episode.
    """
    rows, lanes = ix.start.shape
    live, oldest = live_span(ix)
    age = slot_age(rows, lanes, oldest, ix.start.device)
    return ((ix.end_flags != 0) & (age < live) & (ix.start >= oldest)).view(-1)


def episode_choice(cum: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """End slots of the eligible episodes ranked ``draws``.

    cum: [T * N] int64 inclusive cumulative count of eligible end slots.
    draws: [B] int64 uniform in ``[0, count)`` (``count = cum[-1]``, clamped into it).
    Returns (end slot [B], valid [B]; False when none is eligible).
    """
    count = cum[-1]
    r = draws.clamp_max(count - 1).clamp_min_(0)
    slot = torch.searchsorted(cum, r, right=True)
    return slot.clamp_max_(cum.shape[0] - 1), (count > 0).expand(draws.shape[0])


def sample_episode_ends(ix: EpisodeIndex, cum: torch.Tensor, rng, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(end slot [B], valid [B]) of eligible episodes, uniform, drawn from the buffer's generator."""
    uniforms = torch.rand(batch, dtype=torch.float64, generator=rng.generator, device=cum.device)
    return episode_choice(cum, (uniforms * cum[-1]).long())


def pack_episodes(ix: EpisodeIndex, end_slot: torch.Tensor, valid: torch.Tensor, max_rows: int) -> dict:
    """Lay chosen episodes end to end in ``max_rows`` rows.

    Episodes that would overflow ``max_rows`` are dropped from the batch (``valid=False``,
    length 0), so every kept episode is whole.
    Returns [B] ``lane``, ``length``, ``valid``, ``cu_seqlens`` [B + 1], and per packed row
    [max_rows] ``slot``, ``mask``, ``is_first``, ``is_last``.
    """
    rows, lanes = ix.start.shape
    total = rows * lanes
    _, oldest = live_span(ix)
    end_row = absolute_row(end_slot.div(lanes, rounding_mode="floor"), oldest, rows)
    length = (end_row + 1 - take(ix.start, end_slot)) * valid
    valid = valid & (torch.cumsum(length, 0) <= max_rows)
    length = length * valid
    first_slot = (end_slot - (length - 1) * lanes) % total
    cu = torch.zeros(end_slot.shape[0] + 1, dtype=torch.int64, device=end_slot.device)
    torch.cumsum(length, 0, out=cu[1:])
    r = torch.arange(max_rows, device=end_slot.device)
    b = torch.searchsorted(cu[1:], r, right=True).clamp_max_(end_slot.shape[0] - 1)
    mask = r < cu[-1]
    offset = (r - cu[b]) * mask
    slot = wrap(first_slot[b] + offset * lanes, total)  # offsets stay below an episode's length
    return {"lane": end_slot % lanes, "length": length, "valid": valid, "cu_seqlens": cu,
            "slot": slot, "mask": mask, "is_first": mask & (offset == 0),
            "is_last": mask & (offset == length[b] - 1)}


# Sampler entry points: draw proposals from the buffer's generator, then pick.

def transitions(ix: EpisodeIndex, proposals: torch.Tensor, oldest: int, next_step: bool,
                final_rows: int, links: bool = True) -> dict:
    """Pick transitions from [B, M] proposals (see :func:`transition_slots`) and describe them
    (see :func:`transition_links`; only :func:`row_marks` when not ``links``): one dict with
    ``slot``, ``row``, ``index`` (transition ids), ``valid`` (None when every proposal is
    accepted) and the links."""
    slot, row, ids, valid = _transition_picks(ix, proposals, oldest, next_step)
    out = transition_links(ix, slot, row, final_rows, next_step) if links else row_marks(ix, slot, row)
    out.update(slot=slot, row=row, valid=valid, index=ids)
    return out


def sample_transitions(ix: EpisodeIndex, rng, batch: int, tries: int, next_step: bool,
                       final_rows: int, links: bool = True) -> dict:
    """Uniform transitions whose successor is written, drawn from the buffer's generator (see
    :func:`transitions`)."""
    live, oldest = live_span(ix)
    proposals = uniform_below(rng, (batch, tries), (live - 1) * ix.lanes)
    return transitions(ix, proposals, oldest, next_step, final_rows, links)


def windows(ix: EpisodeIndex, proposals: torch.Tensor, oldest: int, length: int) -> dict:
    """Pick windows from [B, M] proposals (see :func:`window_ends`) and lay them out:
    ``slots``, ``index`` (transition ids), ``is_first``, ``is_last`` [B, L] and ``valid`` [B]."""
    rows, lanes = ix.start.shape
    end_slot, end_row, valid = window_ends(ix, proposals, oldest, length)
    slots = window_slots(end_slot, length, rows, lanes)
    window_rows = end_row[:, None] - torch.arange(length - 1, -1, -1, device=end_slot.device)
    return {"slots": slots, "index": transition_ids(window_rows, end_slot[:, None], lanes),
            "is_first": take(ix.start, slots) == window_rows,
            "is_last": take(ix.end_flags, slots) != 0, "valid": valid}


def sample_windows(ix: EpisodeIndex, rng, batch: int, tries: int, length: int) -> dict:
    """Uniform admissible windows of ``length`` rows, drawn from the buffer's generator."""
    live, oldest = live_span(ix)
    proposals = uniform_below(rng, (batch, tries), (live - length + 1) * ix.lanes)
    return windows(ix, proposals, oldest, length)
