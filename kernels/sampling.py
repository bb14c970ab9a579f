"""Index sampling with in-kernel randomness: transitions (with their links), windows, episodes.

Each item draws up to ``tries`` uniform proposals from Triton's Philox stream at counters
``offset + item * tries + try``, keeps the first one accepted, else proposal 0 with
``valid=False``. The live rows and the offset are read from the device cursors ``state``
(:mod:`gpubuffers.layout`), never passed from the host, so a launch captured in a CUDA graph
draws anew from the rows live at each replay; the caller advances the offset after the launch. Mirrors
:func:`gpubuffers.reference.transitions`, :func:`gpubuffers.reference.windows` and
:func:`gpubuffers.reference.episode_choice` fed with :func:`gpubuffers.reference.philox_below`
draws. Cost per item is O(tries) for transitions and windows, independent of capacity, and
O(log capacity) for episodes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import layout

BLOCK = 128
_TRUNCATED = tl.constexpr(layout.TRUNCATED)
_HAS_FINAL = tl.constexpr(layout.HAS_FINAL)
_FINAL_IDX_MASK = tl.constexpr(layout.FINAL_IDX_MASK)
_ADDS = tl.constexpr(layout.STATE_ADDS)
_OFFSET = tl.constexpr(layout.STATE_OFFSET)
_FLOOR = tl.constexpr(layout.STATE_FLOOR)
_SENTINEL = tl.constexpr(layout.SENTINEL)


@triton.jit
def live_span(state_ptr, rows):
    """(live rows, oldest absolute row, Philox offset) from the device cursors (layout.live_span)."""
    adds = tl.load(state_ptr + _ADDS)
    oldest = tl.minimum(tl.maximum(tl.maximum(adds - rows, 0), tl.load(state_ptr + _FLOOR)), adds)
    return adds - oldest, oldest, tl.load(state_ptr + _OFFSET)


@triton.jit
def uniform(seed, counter):
    """53-bit uniform in [0, 1) from two Philox words (reference.philox_uniform)."""
    r0, r1, _, _ = tl.randint4x(seed, counter)
    hi = (r0 >> 5).to(tl.int64)
    lo = (r1 >> 6).to(tl.int64)
    return (hi * 67108864 + lo).to(tl.float64) * 1.1102230246251565e-16  # 2**26, 2**-53


@triton.jit
def _uniform_below(seed, counter, high_f):
    """floor(u * high) for a 53-bit uniform u (as philox_below)."""
    return (uniform(seed, counter) * high_f).to(tl.int64)


@triton.jit
def _first_admissible(start_ptr, seed, offset, item, mask, tries, high, base_row, lanes, total, length,
                      BLOCK_: tl.constexpr):
    """Per item: the first of ``tries`` proposals whose slot's episode began at or before
    ``row - (length - 1)``, else proposal 0; returns (slot, row, found). With ``length=1`` this
    rejects exactly the reset rows (their start is SENTINEL, larger than any row)."""
    high_f = tl.zeros([], tl.float64) + high
    base = tl.zeros([], tl.int64) + base_row
    best_slot = tl.zeros([BLOCK_], tl.int64)
    best_row = tl.zeros([BLOCK_], tl.int64)
    found = tl.zeros([BLOCK_], tl.int1)
    for m in range(tries):
        k = _uniform_below(seed, offset + item.to(tl.int64) * tries + m, high_f)
        slot = (k + base * lanes) % total
        row = k // lanes + base
        ok = tl.load(start_ptr + slot, mask=mask, other=0) <= row - (length - 1)
        take = (ok & (found == 0)) | (m == 0)
        best_slot = tl.where(take, slot, best_slot)
        best_row = tl.where(take, row, best_row)
        found = found | ok
    return best_slot, best_row, found


@triton.jit
def links(start_ptr, end_flags_ptr, final_idx_ptr, fin_head_ptr, slot, mask, lanes, total, final_rows,
          NEXT_STEP: tl.constexpr, HAS_FINAL: tl.constexpr, BLOCK_: tl.constexpr):
    """Successor and end facts of the transitions at ``slot`` (as reference.transition_links):
    (succ, is_last, terminated, truncated, next_valid)."""
    succ = (slot + lanes) % total
    flags = tl.load(end_flags_ptr + slot, mask=mask, other=0).to(tl.int32)
    is_last = flags != 0
    truncated = (flags & _TRUNCATED) != 0
    terminated = is_last & (truncated == 0)
    if NEXT_STEP:
        # The end's successor must be its reset row (reference.transition_links).
        next_valid = (is_last == 0) | (tl.load(start_ptr + succ, mask=mask & is_last, other=0) == _SENTINEL)
    elif HAS_FINAL:
        lane = slot % lanes
        head = tl.load(fin_head_ptr + lane, mask=mask, other=0)
        idx = tl.load(final_idx_ptr + slot, mask=mask, other=0).to(tl.int64)
        idx = head - ((head - idx) & _FINAL_IDX_MASK)  # layout.final_counter
        kept = ((flags & _HAS_FINAL) != 0) & (head - idx <= final_rows)  # layout.final_lag <= final_rows
        # layout.final_slot, with the remainder taken non-negative as torch takes it (a counter
        # recovered from damaged state can be negative; it must not address outside the table).
        succ = tl.where(is_last, total + ((idx % final_rows + final_rows) % final_rows) * lanes + lane, succ)
        next_valid = (is_last == 0) | kept
    else:
        next_valid = is_last == 0
    return succ, is_last, terminated, truncated, next_valid


@triton.jit
def store_transitions(slots_ptr, row_ptr, index_ptr, masks_ptr, item, mask, batch, lanes, slot, succ, row,
                      found, is_first, is_last, terminated, truncated, next_valid):
    """Write the transitions a sampler picked: [2, B] (slot, succ), row, transition id
    ``row * N + lane``, and the [6, B] masks in the order of MASKS."""
    tl.store(slots_ptr + item, slot, mask=mask)
    tl.store(slots_ptr + batch + item, succ, mask=mask)
    tl.store(row_ptr + item, row, mask=mask)
    tl.store(index_ptr + item, row * lanes + slot % lanes, mask=mask)
    tl.store(masks_ptr + item, found.to(tl.int8), mask=mask)
    tl.store(masks_ptr + batch + item, is_first.to(tl.int8), mask=mask)
    tl.store(masks_ptr + 2 * batch + item, is_last.to(tl.int8), mask=mask)
    tl.store(masks_ptr + 3 * batch + item, terminated.to(tl.int8), mask=mask)
    tl.store(masks_ptr + 4 * batch + item, truncated.to(tl.int8), mask=mask)
    tl.store(masks_ptr + 5 * batch + item, next_valid.to(tl.int8), mask=mask)


@triton.jit(do_not_specialize=["seed", "batch", "tries", "rows", "lanes", "total", "final_rows"])
def _transitions_kernel(
    slots_ptr, row_ptr, index_ptr, masks_ptr,      # outputs: [2, B] (slot, succ), [B], [B], [6, B]
    start_ptr, end_flags_ptr, final_idx_ptr, fin_head_ptr, state_ptr,   # index, cursors
    seed, batch, tries, rows, lanes, total, final_rows,
    NEXT_STEP: tl.constexpr, HAS_FINAL: tl.constexpr, BLOCK_: tl.constexpr,
):
    """Pick transitions (as reference.transition_slots) and describe them (as
    reference.transition_links). Under same_step every live row below the newest is
    admissible, and one proposal per item is drawn."""
    item = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = item < batch
    live, oldest, offset = live_span(state_ptr, rows)
    high = (live - 1) * lanes
    base_row = oldest
    slot, row, found = _first_admissible(start_ptr, seed, offset, item, mask, tries, high, base_row,
                                         lanes, total, 1, BLOCK_)
    is_first = tl.load(start_ptr + slot, mask=mask, other=0) == row
    succ, is_last, terminated, truncated, next_valid = links(
        start_ptr, end_flags_ptr, final_idx_ptr, fin_head_ptr, slot, mask, lanes, total, final_rows,
        NEXT_STEP, HAS_FINAL, BLOCK_)
    store_transitions(slots_ptr, row_ptr, index_ptr, masks_ptr, item, mask, batch, lanes, slot, succ, row,
                      found, is_first, is_last, terminated, truncated, next_valid)


@triton.jit(do_not_specialize=["seed", "batch", "tries", "rows", "lanes", "total", "length"])
def _windows_kernel(
    slots_ptr, index_ptr, first_ptr, last_ptr, valid_ptr,  # outputs: [B, L] slots, ids, is_first/is_last, [B]
    start_ptr, end_flags_ptr, state_ptr,           # index, cursors
    seed, batch, tries, rows, lanes, total, length,
    BLOCK_: tl.constexpr,
):
    """Pick admissible windows (as reference.window_ends) and lay out their slots and flags
    (as reference.windows)."""
    item = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = item < batch
    live, oldest, offset = live_span(state_ptr, rows)
    high = (live - length + 1) * lanes
    base_row = oldest + length - 1
    end_slot, end_row, found = _first_admissible(start_ptr, seed, offset, item, mask, tries, high,
                                                 base_row, lanes, total, length, BLOCK_)
    tl.store(valid_ptr + item, found.to(tl.int8), mask=mask)
    out = item.to(tl.int64) * length
    lane = end_slot % lanes
    for j in range(length):
        back = tl.zeros([], tl.int64) + (length - 1 - j)  # int64: back * lanes may pass 2**31
        slot = (end_slot - back * lanes + total) % total
        first = tl.load(start_ptr + slot, mask=mask, other=0) == end_row - back
        last = tl.load(end_flags_ptr + slot, mask=mask, other=0) != 0
        tl.store(slots_ptr + out + j, slot, mask=mask)
        tl.store(index_ptr + out + j, (end_row - back) * lanes + lane, mask=mask)
        tl.store(first_ptr + out + j, first.to(tl.int8), mask=mask)
        tl.store(last_ptr + out + j, last.to(tl.int8), mask=mask)


def windows(start: torch.Tensor, end_flags: torch.Tensor, state: torch.Tensor, seed: int, batch: int,
            tries: int, length: int) -> dict:
    """Admissible windows of ``length`` rows among the live rows the cursors ``state`` give:
    ``slots``, ``index`` (transition ids), ``is_first``, ``is_last`` [B, L] and ``valid`` [B], in
    one launch."""
    rows, lanes = start.shape
    if start.dtype != torch.int64 or not start.is_contiguous():
        raise ValueError("start: expected a contiguous int64 tensor [T, N]")
    slots, index, first, last, valid = window_outputs(batch, length, start.device)
    grid = (triton.cdiv(batch, BLOCK),)
    _windows_kernel[grid](slots, index, first.view(torch.int8), last.view(torch.int8), valid.view(torch.int8),
                          start, end_flags, state, seed, batch, tries, rows, lanes, rows * lanes, length,
                          BLOCK_=BLOCK)
    return {"slots": slots, "index": index, "is_first": first, "is_last": last, "valid": valid}


def window_outputs(batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Empty outputs of a window sampler: slots, index [B, L] int64; is_first, is_last [B, L]
    and valid [B] bool."""
    i64, b = dict(dtype=torch.int64, device=device), dict(dtype=torch.bool, device=device)
    return (torch.empty(batch, length, **i64), torch.empty(batch, length, **i64), torch.empty(batch, length, **b),
            torch.empty(batch, length, **b), torch.empty(batch, **b))


MASKS = ("valid", "is_first", "is_last", "terminated", "truncated", "next_valid")


def transition_outputs(batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Empty outputs of a transition sampler: [2, B] (slot, succ), row and index [B] int64, and
    the [6, B] bool masks in the order of MASKS."""
    i64 = dict(dtype=torch.int64, device=device)
    return (torch.empty(2, batch, **i64), torch.empty(batch, **i64), torch.empty(batch, **i64),
            torch.empty(len(MASKS), batch, dtype=torch.bool, device=device))


def transition_dict(slots, row, index, masks) -> dict:
    """The launcher's result: ``slots`` [2, B] and its rows ``slot``, ``succ``, ``row``,
    ``index`` and each mask by name."""
    out = {"slots": slots, "slot": slots[0], "succ": slots[1], "row": row, "index": index}
    out.update(zip(MASKS, masks.unbind(0)))
    return out


def transitions(start: torch.Tensor, end_flags: torch.Tensor, final_idx: torch.Tensor,
                fin_head: torch.Tensor, state: torch.Tensor, seed: int, batch: int, tries: int,
                next_step: bool, final_rows: int) -> dict:
    """Transitions whose successor row is written among the live rows the cursors ``state``
    give, and their links, in one launch.

    Returns [B] ``slot``, ``row``, ``index`` (the transition id ``row * N + lane``), ``succ`` (into the extended next source, as
    reference.transition_links) and the bool masks ``valid``, ``is_first``, ``is_last``,
    ``terminated``, ``truncated``, ``next_valid``; ``slots`` is the [2, B] (slot, succ) block.
    """
    rows, lanes = start.shape
    slots, row, index, masks = transition_outputs(batch, start.device)
    grid = (triton.cdiv(batch, BLOCK),)
    _transitions_kernel[grid](
        slots, row, index, masks.view(torch.int8), start, end_flags, final_idx, fin_head, state,
        seed, batch, tries, rows, lanes, rows * lanes, max(final_rows, 1),
        NEXT_STEP=next_step, HAS_FINAL=final_rows > 0, BLOCK_=BLOCK,
    )
    return transition_dict(slots, row, index, masks)


@triton.jit(do_not_specialize=["seed", "batch", "size", "steps"])
def _episodes_kernel(
    slot_ptr, valid_ptr,                           # outputs [B]
    cum_ptr, state_ptr,                            # [C] inclusive count of eligible end slots; cursors
    seed, batch, size, steps,
    BLOCK_: tl.constexpr,
):
    """Rank-r eligible end slot for a uniform r, by binary search (as reference.episode_choice
    fed with philox_below draws)."""
    item = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = item < batch
    offset = tl.load(state_ptr + _OFFSET)
    count = tl.load(cum_ptr + size - 1)
    r = _uniform_below(seed, offset + item.to(tl.int64), tl.zeros([], tl.float64) + count)
    r = tl.maximum(tl.minimum(r, count - 1), 0)
    lo = tl.zeros([BLOCK_], tl.int64)
    hi = tl.zeros([BLOCK_], tl.int64) + size
    for _ in range(steps):  # first index whose count exceeds r
        open_ = lo < hi
        mid = (lo + hi) // 2
        right = tl.load(cum_ptr + mid, mask=mask & open_, other=0) <= r
        lo = tl.where(open_ & right, mid + 1, lo)
        hi = tl.where(open_ & (right == 0), mid, hi)
    tl.store(slot_ptr + item, tl.minimum(lo, size - 1), mask=mask)
    tl.store(valid_ptr + item, (tl.zeros([BLOCK_], tl.int64) + count > 0).to(tl.int8), mask=mask)


def episode_ends(cum: torch.Tensor, state: torch.Tensor, seed: int, batch: int):
    """(end slot [B], valid [B]) of eligible episodes drawn uniformly, in O(log C) per item, at
    the Philox offset the cursors ``state`` hold."""
    if cum.dtype != torch.int64 or cum.dim() != 1 or not cum.is_contiguous():
        raise ValueError("cum: expected a contiguous 1-d int64 tensor")
    size = cum.shape[0]
    slot = torch.empty(batch, dtype=torch.int64, device=cum.device)
    valid = torch.empty(batch, dtype=torch.bool, device=cum.device)
    grid = (triton.cdiv(batch, BLOCK),)
    _episodes_kernel[grid](slot, valid.view(torch.int8), cum, state, seed, batch, size,
                           max(1, size.bit_length()), BLOCK_=BLOCK)
    return slot, valid
