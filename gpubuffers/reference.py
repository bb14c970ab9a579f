"""Pure-torch implementation of every hot operation: the CPU backend and the test oracle.

These functions know nothing of the buffer object: they take the episode index (a bundle
of tensors), integer proposals and sizes. They never import triton, never read a device
value on the host, and never branch in Python on tensor contents, so the same code runs
on CUDA tensors without a host sync.

Terms: T rows per lane, N lanes, ring slot ``s = (a % T) * N + n`` for absolute row ``a``
(the add number) of lane ``n``; ``oldest``/``newest`` are the absolute rows of the oldest
and newest live row (host integers: the number of adds is known on the host).

The index is per slot and written once per add, a row at a time: everything the samplers
need is read from the slot itself or from the previous row, which is always live (T >= 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: ``start`` of a reset row (``autoreset="next_step"``): larger than any row, so no
#: window can contain it and no episode owns it.
SENTINEL = 1 << 60

# Bits of ``end_flags`` at the last slot of an episode; 0 elsewhere.
ENDED, TRUNCATED, HAS_FINAL = 1, 2, 4


@dataclass
class EpisodeIndex:
    """Device episode index for T rows and N lanes, updated once per add in O(N) work.

    start: [T, N] int64, absolute row at which the episode holding the slot began (written
        with the slot, never rewritten); ``SENTINEL`` for reset rows.
    end_flags: [T, N] uint8, at the last slot of an episode once its end is known:
        ``ENDED | TRUNCATED (if truncated) | HAS_FINAL (if its final obs was stored)``, else 0.
        The episode's length is the slot's row minus its ``start``, plus one.
    ret: [T, N] float32, return of the slot's episode from its first row through this row.
    final_idx: [T, N] int64, at an end slot whose final obs was stored: the lane's final-obs
        counter when it was stored (its side-table row is ``final_idx % K``).
    fin_head: [N] int64, final observations stored per lane since construction.
    zeros: 0-d uint8 and float32 zeros, kept to avoid allocating them on every add.
    """

    start: torch.Tensor
    end_flags: torch.Tensor
    ret: torch.Tensor
    final_idx: torch.Tensor
    fin_head: torch.Tensor
    zeros: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def empty(cls, rows: int, lanes: int, device: torch.device) -> "EpisodeIndex":
        i64 = dict(dtype=torch.int64, device=device)
        return cls(
            start=torch.full((rows, lanes), SENTINEL, **i64),
            end_flags=torch.zeros((rows, lanes), dtype=torch.uint8, device=device),
            ret=torch.zeros((rows, lanes), dtype=torch.float32, device=device),
            final_idx=torch.zeros((rows, lanes), **i64),
            fin_head=torch.zeros(lanes, **i64),
            zeros=(torch.zeros((), dtype=torch.uint8, device=device),
                   torch.zeros((), dtype=torch.float32, device=device)),
        )

    @property
    def rows(self) -> int:
        return self.start.shape[0]

    @property
    def lanes(self) -> int:
        return self.start.shape[1]


def _close(ix: EpisodeIndex, row: int, ended: torch.Tensor, flags: torch.Tensor | None) -> None:
    """Mark the episodes of ``ended`` lanes as ending at ring row ``row``; ``flags`` [N] uint8
    (with the ENDED bit) describes them, None meaning plain terminations."""
    if flags is None:
        ix.end_flags[row].copy_(ended)
    else:
        torch.where(ended, flags, ix.zeros[0], out=ix.end_flags[row])


def add_step(ix: EpisodeIndex, done: torch.Tensor, flags: torch.Tensor | None,
             reward: torch.Tensor | None, abs_row: int, marks_last: bool,
             next_step: bool) -> torch.Tensor | None:
    """Update the episode index for the row written at absolute row ``abs_row``.

    done: [N] bool, the flags of this add (``marks_last``: the row ends its episode; otherwise
        the row follows the end of an episode).
    flags: [N] uint8 ``end_flags`` of episodes ending with this add (ENDED set), or None
        for plain terminations without a stored final obs.
    reward: [N] float32 rewards of this row, or None when returns are not tracked.
    Returns [N] bool, the lanes whose episode ended with this add (at row ``abs_row`` when
    ``marks_last``, else at ``abs_row - 1``), or None on the very first add of first mode.
    """
    rows = ix.rows
    row = abs_row % rows
    start_row, ret_row = ix.start[row], ix.ret[row]
    ended = None
    if abs_row == 0:
        start_row.zero_()
        if reward is None:
            ret_row.zero_()
        else:
            ret_row.copy_(reward)
        is_reset = None
    else:
        prev = (abs_row - 1) % rows
        prev_start = ix.start[prev]
        if marks_last:
            prev_ended = ix.end_flags[prev] != 0
            is_reset = prev_ended if next_step else None
            starts = (prev_start == SENTINEL) if next_step else prev_ended
        else:
            if next_step:
                ended = done & (prev_start != SENTINEL)  # a flag right after a reset row ends nothing
                is_reset, starts = ended, prev_start == SENTINEL
            else:
                ended, is_reset, starts = done, None, done
            # The flag closes the episode of the previous row.
            _close(ix, prev, ended, flags)
        here = torch.full((), abs_row, dtype=torch.int64, device=start_row.device)
        torch.where(starts, here, prev_start, out=start_row)
        if reward is None:
            torch.where(starts, ix.zeros[1], ix.ret[prev], out=ret_row)
        else:
            torch.where(starts, reward, ix.ret[prev] + reward, out=ret_row)
        if is_reset is not None:
            start_row.masked_fill_(is_reset, SENTINEL)
            ret_row.masked_fill_(is_reset, 0.0)
    if marks_last:
        ended = done if is_reset is None else done & ~is_reset
        _close(ix, row, ended, flags)
    else:
        ix.end_flags[row].zero_()
    return ended


def store_finals(ix: EpisodeIndex, ended: torch.Tensor, end_row: int, final_rows: int) -> torch.Tensor:
    """Reserve side-table rows for the final observations of ``ended`` lanes, whose episodes
    end at ring row ``end_row``. Each lane has its own ring of ``final_rows`` rows (plus a
    scratch row ``final_rows`` that absorbs the writes of lanes that did not end), evicted in
    the lane's own time order, as its storage is.

    Returns the side-table row [N] each lane's final observation is to be written to.
    """
    pos = torch.where(ended, ix.fin_head % final_rows, final_rows)
    ix.final_idx[end_row] = ix.fin_head
    ix.fin_head.add_(ended)
    return pos


def take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table.view(-1)[index]`` for an index of any shape, through ``index_select`` (several
    times faster than advanced indexing on the CPU)."""
    return table.view(-1).index_select(0, index.reshape(-1)).view(index.shape)


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
    ok = take(ix.start, slot) != SENTINEL
    return first_choice(ok, slot, row)


def transition_links(ix: EpisodeIndex, slot: torch.Tensor, row: torch.Tensor, final_rows: int,
                     next_step: bool) -> dict:
    """Successor and end-of-episode facts of transitions at ``slot`` [B] (absolute ``row`` [B]).

    final_rows: rows per lane of the final-obs side table (0 when there is none). The side table
    sits right after the T * N ring slots of each next leaf's source, so ``succ`` addresses one
    extended source ``[(T + final_rows + 1) * N, ...]``: the next row's slot inside an episode,
    the side-table row of the episode's final obs at its end.
    Returns a dict of [B] tensors: ``succ``, ``is_first``, ``is_last``, ``terminated``,
    ``truncated``, ``next_valid``.
    """
    rows, lanes = ix.start.shape
    total = rows * lanes
    flags = take(ix.end_flags, slot)
    is_last = flags != 0
    truncated = (flags & TRUNCATED) != 0
    succ = (slot + lanes) % total
    out = {
        "is_first": take(ix.start, slot) == row,
        "is_last": is_last,
        "terminated": is_last & ~truncated,
        "truncated": truncated,
    }
    if next_step:
        # The reset row after an episode's end holds its final observation.
        out["next_valid"] = torch.ones_like(is_last)
    elif final_rows == 0:
        out["next_valid"] = ~is_last
    else:
        lane = slot % lanes
        idx = take(ix.final_idx, slot)
        kept = ((flags & HAS_FINAL) != 0) & (ix.fin_head[lane] - idx <= final_rows)
        succ = torch.where(is_last, total + (idx % final_rows) * lanes + lane, succ)
        out["next_valid"] = ~is_last | kept
    out["succ"] = succ
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
    ok = take(ix.start, slot) <= end_row - (length - 1)
    return first_choice(ok, slot, end_row)


def window_slots(end_slot: torch.Tensor, length: int, rows: int, lanes: int) -> torch.Tensor:
    """[B] end slots -> [B, length] slots of the window, oldest first."""
    back = torch.arange(length - 1, -1, -1, device=end_slot.device) * lanes
    return (end_slot[:, None] - back).remainder_(rows * lanes)


def slot_age(rows: int, lanes: int, oldest: int, device: torch.device) -> torch.Tensor:
    """[T, N] (expanded view) rows from ``oldest`` to each slot's row: its absolute row is
    ``oldest + age``, and it is live when ``age < live_rows``."""
    ring = torch.arange(rows, device=device)
    return ((ring - oldest) % rows)[:, None].expand(rows, lanes)


def whole_episode_ends(ix: EpisodeIndex, oldest: int, live: int) -> torch.Tensor:
    """[T * N] bool: slots that end a finished episode whose every row is live.

    One pass over the index (O(capacity)): the episode sampler builds this once per add and
    then draws from it exactly, in O(log capacity) per episode.
    """
    rows, lanes = ix.start.shape
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


def sample_episode_ends(cum: torch.Tensor, rng, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(end slot [B], valid [B]) of eligible episodes, uniform, drawn from the buffer's generator."""
    uniforms = torch.rand(batch, dtype=torch.float64, generator=rng.generator, device=cum.device)
    return episode_choice(cum, (uniforms * cum[-1]).long())


def pack_episodes(ix: EpisodeIndex, end_slot: torch.Tensor, valid: torch.Tensor, oldest: int,
                  max_rows: int) -> dict:
    """Lay chosen episodes end to end in ``max_rows`` rows.

    Episodes that would overflow ``max_rows`` are dropped from the batch (``valid=False``,
    length 0), so every kept episode is whole.
    Returns [B] ``lane``, ``length``, ``valid``, ``cu_seqlens`` [B + 1], and per packed row
    [max_rows] ``slot``, ``mask``, ``is_first``, ``is_last``.
    """
    rows, lanes = ix.start.shape
    total = rows * lanes
    end_row = oldest + (end_slot.div(lanes, rounding_mode="floor") - oldest) % rows
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
    slot = (first_slot[b] + offset * lanes) % total
    return {"lane": end_slot % lanes, "length": length, "valid": valid, "cu_seqlens": cu,
            "slot": slot, "mask": mask, "is_first": mask & (offset == 0),
            "is_last": mask & (offset == length[b] - 1)}


# ---------------------------------------------------------------------------------------------
# Counter-based randomness, bit-exact with Triton's ``tl.randint4x`` (Philox 4x32, 10 rounds).
# The Triton samplers draw in-kernel from (seed, offset); this is the same stream in torch, so
# that kernel and reference can be compared on the same draws.

_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant and a tensor of 32-bit values,
    in int64 arithmetic without overflow (16-bit halves)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p = b_lo * a_lo
    mid = b_lo * a_hi + b_hi * a_lo
    hi = b_hi * a_hi + ((mid + (p >> 16)) >> 16)
    lo = (p + ((mid & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox4x32(seed: int, offset: torch.Tensor, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Four int64 tensors of uint32 values: ``tl.randint4x(seed, offset)`` for int64 offsets."""
    c0 = offset & _M32
    c1 = offset >> 32
    c2 = torch.zeros_like(offset)
    c3 = torch.zeros_like(offset)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_below(seed: int, offset: int, shape: tuple[int, ...], high: int | torch.Tensor,
                 device: torch.device) -> torch.Tensor:
    """int64 draws uniform in ``[0, high)`` at counters ``offset + arange(numel)`` (row-major).

    Two 32-bit words give a 53-bit uniform ``u`` in [0, 1) (exact in float64); the draw is
    ``floor(u * high)``, whose bias is below ``high / 2**53``. ``high`` may be a device tensor.
    """
    numel = 1
    for s in shape:
        numel *= s
    counters = torch.arange(numel, dtype=torch.int64, device=device).add_(offset).view(shape)
    r0, r1, _, _ = philox4x32(seed, counters)
    u = ((r0 >> 5) * (1 << 26) + (r1 >> 6)).double() * (2.0 ** -53)
    return (u * high).long()


# ---------------------------------------------------------------------------------------------
# Sampler entry points (draw proposals from the buffer's generator, then pick) and the gather.

def transitions(ix: EpisodeIndex, proposals: torch.Tensor, oldest: int, next_step: bool,
                final_rows: int) -> dict:
    """Pick transitions from [B, M] proposals (see :func:`transition_slots`) and describe them
    (see :func:`transition_links`): one dict with ``slot``, ``row``, ``valid`` (None when every
    proposal is accepted) and the links."""
    slot, row, valid = transition_slots(ix, proposals, oldest, next_step)
    out = transition_links(ix, slot, row, final_rows, next_step)
    out.update(slot=slot, row=row, valid=valid)
    return out


def sample_transitions(ix: EpisodeIndex, rng, batch: int, tries: int, oldest: int, live: int,
                       next_step: bool, final_rows: int) -> dict:
    """Uniform transitions whose successor is written, drawn from the buffer's generator."""
    proposals = torch.randint(0, (live - 1) * ix.lanes, (batch, tries), generator=rng.generator,
                              device=ix.start.device)
    return transitions(ix, proposals, oldest, next_step, final_rows)


def windows(ix: EpisodeIndex, proposals: torch.Tensor, oldest: int, length: int) -> dict:
    """Pick windows from [B, M] proposals (see :func:`window_ends`) and lay them out:
    ``slots``, ``is_first``, ``is_last`` [B, L] and ``valid`` [B]."""
    rows, lanes = ix.start.shape
    end_slot, end_row, valid = window_ends(ix, proposals, oldest, length)
    slots = window_slots(end_slot, length, rows, lanes)
    window_rows = end_row[:, None] - torch.arange(length - 1, -1, -1, device=end_slot.device)
    return {"slots": slots, "is_first": take(ix.start, slots) == window_rows,
            "is_last": take(ix.end_flags, slots) != 0, "valid": valid}


def sample_windows(ix: EpisodeIndex, rng, batch: int, tries: int, oldest: int, live: int,
                   length: int) -> dict:
    """Uniform admissible windows of ``length`` rows, drawn from the buffer's generator."""
    proposals = torch.randint(0, (live - length + 1) * ix.lanes, (batch, tries),
                              generator=rng.generator, device=ix.start.device)
    return windows(ix, proposals, oldest, length)


def gather(entries: list[tuple[torch.Tensor, int]], slot_sets: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Every entry ``(source [rows, *shape], slot set)`` read at its slot set (an index of any
    shape). Returns one ``[*index_shape, *shape]`` tensor per entry."""
    out = []
    for src, which in entries:
        index = slot_sets[which]
        out.append(src.index_select(0, index.reshape(-1)).view(*index.shape, *src.shape[1:]))
    return out
