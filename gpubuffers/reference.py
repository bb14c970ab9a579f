"""Pure-torch implementation of every hot operation: the CPU backend and the test oracle.

These functions know nothing of the buffer object: they take the episode index (a bundle
of tensors), integer proposals and sizes. They never import triton, never read a device
value on the host, and never branch in Python on tensor contents, so the same code runs
on CUDA tensors without a host sync.

Terms: T rows per lane, N lanes, ring slot ``s = (a % T) * N + n`` for absolute row ``a``
of lane ``n``; ``oldest``/``newest`` are the absolute rows of the oldest and newest live
row (host integers: the number of adds is known on the host).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: ``start`` of a reset row (``autoreset="next_step"``): larger than any row, so no
#: window can contain it and no episode owns it.
SENTINEL = 1 << 62

# Columns of the episode record table.
REC_START, REC_LANE, REC_LEN, REC_FLAGS = 0, 1, 2, 3
FLAG_TRUNCATED, FLAG_HAS_FINAL = 1, 2


@dataclass
class EpisodeIndex:
    """Device episode index for T rows and N lanes, updated once per add in O(N) work.

    start: [T, N] int64, absolute row at which the episode holding the slot began
        (written when the slot is written, never rewritten); ``SENTINEL`` for reset rows.
    end_rec: [T, N] int64, record number of the episode that ends at this slot, -1 while the
        slot is not known to end its episode.
    lane_start, lane_len: [N] int64, start row and length so far of each lane's current episode.
    lane_ret: [N] float32, running return of each lane's current episode.
    phase: [N] int64, 0 = continuing, 1 = the previous row ended an episode (``done_marks="last"``),
        2 = the previous row was a reset row (``autoreset="next_step"``).
    rec: [E + 1, 4] int64 ring of finished episodes (start, lane, length, flags); row E is a
        scratch row that absorbs the writes of lanes that did not finish.
    rec_ret: [E + 1] float32, the return of each finished episode.
    head: [] int64, number of episodes finished since construction (records ever written).
    row_head: [T + 1] int64, ``head`` right after the add of absolute row ``a``, at ``a % (T + 1)``.
    lanes: [N] int64, ``arange(N)`` kept to avoid re-allocating it.
    """

    start: torch.Tensor
    end_rec: torch.Tensor
    lane_start: torch.Tensor
    lane_len: torch.Tensor
    lane_ret: torch.Tensor
    phase: torch.Tensor
    rec: torch.Tensor
    rec_ret: torch.Tensor
    head: torch.Tensor
    row_head: torch.Tensor
    lanes: torch.Tensor

    @classmethod
    def empty(cls, rows: int, lanes: int, records: int, device: torch.device) -> "EpisodeIndex":
        i64 = dict(dtype=torch.int64, device=device)
        return cls(
            start=torch.full((rows, lanes), SENTINEL, **i64),
            end_rec=torch.full((rows, lanes), -1, **i64),
            lane_start=torch.zeros(lanes, **i64),
            lane_len=torch.zeros(lanes, **i64),
            lane_ret=torch.zeros(lanes, dtype=torch.float32, device=device),
            phase=torch.zeros(lanes, **i64),
            rec=torch.zeros(records + 1, 4, **i64),
            rec_ret=torch.zeros(records + 1, dtype=torch.float32, device=device),
            head=torch.zeros((), **i64),
            row_head=torch.zeros(rows + 1, **i64),
            lanes=torch.arange(lanes, **i64),
        )

    @property
    def rows(self) -> int:
        return self.start.shape[0]

    @property
    def records(self) -> int:
        return self.rec.shape[0] - 1


def _append_records(ix: EpisodeIndex, ended: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Write one record per ended lane (from the lane's current stats); returns record numbers [N].

    Record numbers are valid only where ``ended``; the others point past the last record.
    """
    count = ended.long()
    rec = torch.cumsum(count, 0).add_(ix.head - 1)
    pos = torch.where(ended, rec % ix.records, ix.records)
    fields = torch.stack((ix.lane_start, ix.lanes, ix.lane_len, flags), 1)
    ix.rec.index_copy_(0, pos, fields)
    ix.rec_ret.index_copy_(0, pos, ix.lane_ret)
    torch.add(rec[-1], 1, out=ix.head)
    return rec


def add_step(ix: EpisodeIndex, done: torch.Tensor, flags: torch.Tensor, reward: torch.Tensor | None,
             abs_row: int, marks_last: bool, next_step: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Update the episode index for the row written at absolute row ``abs_row``.

    done: [N] bool, the flags of this add (``marks_last``: the row ends its episode; otherwise
        the row follows the end of an episode).
    flags: [N] int64, record flags (truncated, final obs stored) for episodes ending with this add.
    reward: [N] rewards of this row, or None when returns are not tracked.
    Returns ``(ended, rec)``: [N] lanes whose episode ended with this add and their record
    numbers, or ``(None, None)`` when no episode can have ended (the very first row, first mode).
    """
    rows = ix.rows
    row = abs_row % rows
    first_row = abs_row == 0
    # Which lanes' episodes ended on the previous row (known at this add).
    if first_row:
        ended_before = None
    elif marks_last:
        ended_before = ix.phase == 1
    elif next_step:
        ended_before = done & (ix.phase == 0)  # a flag right after a reset row ends nothing
    else:
        ended_before = done
    is_reset = ended_before if next_step else None
    starts = (ix.phase == 2) if next_step else ended_before

    ended = rec = None
    if not marks_last and ended_before is not None:
        # The flag closes the episode of the previous row: record it before row a joins the stats.
        rec = _append_records(ix, ended_before, flags)
        prev = (abs_row - 1) % rows
        ix.end_rec[prev] = torch.where(ended_before, rec, ix.end_rec[prev])
        ended = ended_before

    if first_row:
        ix.lane_start.fill_(0)
        ix.lane_len.fill_(1)
        ix.lane_ret.zero_()
        if reward is not None:
            ix.lane_ret.add_(reward)
    else:
        ix.lane_start.masked_fill_(starts, abs_row)
        ix.lane_len.masked_fill_(starts, 0)
        ix.lane_ret.masked_fill_(starts, 0.0)
        if is_reset is None:
            ix.lane_len.add_(1)
            if reward is not None:
                ix.lane_ret.add_(reward)
        else:
            ix.lane_len.add_(~is_reset)
            if reward is not None:
                ix.lane_ret.add_(reward.masked_fill(is_reset, 0))

    if is_reset is None:
        ix.start[row] = ix.lane_start
    else:
        ix.start[row] = ix.lane_start.masked_fill(is_reset, SENTINEL)

    if marks_last:
        ended = done if is_reset is None else done & ~is_reset
        rec = _append_records(ix, ended, flags)
        ix.end_rec[row] = torch.where(ended, rec, -1)
        if next_step:
            phase = ended.long()
            if is_reset is not None:
                phase.add_(is_reset.long(), alpha=2)
            ix.phase.copy_(phase)
        else:
            ix.phase.copy_(ended)
    else:
        ix.end_rec[row] = -1
        if next_step:
            if is_reset is None:
                ix.phase.zero_()
            else:
                ix.phase.copy_(is_reset.long() * 2)
    ix.row_head[abs_row % (rows + 1)] = ix.head
    return ended, rec


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
    rows, lanes = ix.start.shape
    slot = (proposals + oldest * lanes) % (rows * lanes)
    row = proposals.div(lanes, rounding_mode="floor").add_(oldest)
    if not next_step:
        return slot[:, 0], row[:, 0], None
    ok = ix.start.view(-1)[slot] != SENTINEL
    return first_choice(ok, slot, row)


def transition_links(ix: EpisodeIndex, slot: torch.Tensor, final_rows: int, next_step: bool) -> dict:
    """Successor and end-of-episode facts of transitions at ``slot`` [B].

    final_rows: rows of the final-obs side table (0 when there is none).
    Returns a dict of [B] tensors: ``succ`` (slot of the next row), ``is_last``,
    ``terminated``, ``truncated``, ``use_final`` (next obs comes from the side table, at
    ``final_pos``), ``next_valid``.
    """
    rows, lanes = ix.start.shape
    rec = ix.end_rec.view(-1)[slot]
    is_last = rec >= 0
    flags = ix.rec[:, REC_FLAGS][rec.clamp_min(0) % ix.records]
    truncated = is_last & ((flags & FLAG_TRUNCATED) != 0)
    out = {
        "succ": (slot + lanes) % (rows * lanes),
        "is_last": is_last,
        "terminated": is_last & ~truncated,
        "truncated": truncated,
    }
    if next_step:
        # The reset row after an episode's end holds its final observation.
        out["use_final"] = None
        out["next_valid"] = torch.ones_like(is_last)
    elif final_rows == 0:
        out["use_final"] = None
        out["next_valid"] = ~is_last
    else:
        kept = (flags & FLAG_HAS_FINAL != 0) & (rec >= ix.head - final_rows)
        out["use_final"] = is_last
        out["final_pos"] = rec.clamp_min(0) % final_rows
        out["next_valid"] = ~is_last | kept
    return out


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
    ok = ix.start.view(-1)[slot] <= end_row - (length - 1)
    return first_choice(ok, slot, end_row)


def window_slots(end_slot: torch.Tensor, length: int, rows: int, lanes: int) -> torch.Tensor:
    """[B] end slots -> [B, length] slots of the window, oldest first."""
    back = torch.arange(length - 1, -1, -1, device=end_slot.device) * lanes
    return (end_slot[:, None] - back).remainder_(rows * lanes)


def live_record_range(ix: EpisodeIndex, oldest: int, marks_last: bool) -> torch.Tensor:
    """Lowest record number that can still describe a fully live episode ([] int64).

    Records are appended in the order their ends become known; those appended no later than
    the add that made the row before ``oldest`` known to end describe episodes that began
    before ``oldest``.
    """
    if oldest == 0:
        return torch.zeros_like(ix.head)
    known = oldest - 1 if marks_last else oldest
    return ix.row_head[known % (ix.rows + 1)].clone()


def episode_choice(ix: EpisodeIndex, uniforms: torch.Tensor, low: torch.Tensor,
                   oldest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Records of finished, fully live episodes.

    uniforms: [B, M] float64 in [0, 1); each proposes the record ``low + floor(u * count)``
    with ``count = head - low``; episodes cut by the seam are rejected.
    Returns (record slot in the table [B], valid [B]).
    """
    count = ix.head - low
    rec = low + (uniforms * count).long().clamp_max_(count - 1)
    pos = rec.clamp_min(0) % ix.records
    ok = (count > 0) & (ix.rec[:, REC_START][pos] >= oldest)
    return first_choice(ok, pos)


def pack_episodes(ix: EpisodeIndex, pos: torch.Tensor, valid: torch.Tensor, max_rows: int) -> dict:
    """Lay chosen episodes end to end in ``max_rows`` rows.

    Episodes that would overflow ``max_rows`` are dropped from the batch (``valid=False``,
    length 0), so every kept episode is whole.
    Returns [B] ``lane``, ``length``, ``valid``, ``cu_seqlens`` [B + 1], and per packed row
    [max_rows] ``slot``, ``row`` (absolute), ``mask``.
    """
    rows, lanes = ix.start.shape
    start = ix.rec[pos, REC_START]
    lane = ix.rec[pos, REC_LANE]
    length = ix.rec[pos, REC_LEN] * valid
    valid = valid & (torch.cumsum(length, 0) <= max_rows)
    length = length * valid
    cu = torch.zeros(pos.shape[0] + 1, dtype=torch.int64, device=pos.device)
    torch.cumsum(length, 0, out=cu[1:])
    r = torch.arange(max_rows, device=pos.device)
    b = torch.searchsorted(cu[1:], r, right=True).clamp_max_(pos.shape[0] - 1)
    row = start[b] + (r - cu[b])
    mask = r < cu[-1]
    row = torch.where(mask, row, start[b])
    slot = (row % rows) * lanes + lane[b]
    return {"lane": lane, "length": length, "valid": valid, "cu_seqlens": cu,
            "slot": slot, "row": row, "mask": mask}
