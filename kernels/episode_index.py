"""Episode splitting on ``add``: one launch updates the device episode index for a new row.

Mirrors :func:`gpubuffers.reference.add_step`: per lane, read the previous row's slot, decide
whether this row starts an episode, is a reset row, or continues, write the new slot's start
row and running return, and mark the episode end the flags announce. The row is read from the
device cursor ``state``, so the launch replays correctly in a CUDA graph. Work O(N), no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import ENDED, HAS_FINAL, SENTINEL, STATE_ADDS, STATE_RESTART, TRUNCATED

BLOCK = 1024
_ENDED = tl.constexpr(ENDED)
_TRUNCATED = tl.constexpr(TRUNCATED)


@triton.jit(do_not_specialize=["rows", "lanes"])
def _add_step_kernel(
    start_ptr, end_flags_ptr, ret_ptr, ended_ptr,          # outputs (index updated in place)
    state_ptr, done_ptr, term_ptr, trunc_ptr, reward_ptr,   # inputs
    rows, lanes,                                            # sizes
    SENTINEL_: tl.constexpr, ADDS: tl.constexpr, RESTART: tl.constexpr, MARKS_LAST: tl.constexpr,
    NEXT_STEP: tl.constexpr, HAS_DONE: tl.constexpr, HAS_TERM: tl.constexpr,
    HAS_TRUNC: tl.constexpr, FINAL_BIT: tl.constexpr, HAS_REWARD: tl.constexpr,
    BLOCK_: tl.constexpr,
):
    lane = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = lane < lanes
    # The row comes from the device cursor, so a captured graph writes a new row each replay.
    adds = tl.load(state_ptr + ADDS)
    row = adds % rows                   # layout.ring_rows
    prev = (adds + rows - 1) % rows
    first = adds == tl.load(state_ptr + RESTART)  # as reference.add_step
    here = row * lanes + lane
    there = prev * lanes + lane
    # The end flags of the closed episodes (as reference.end_flags_of): termination wins.
    flags = tl.full([BLOCK_], _ENDED | FINAL_BIT, tl.uint8)
    if HAS_TERM:
        term = tl.load(term_ptr + lane, mask=mask, other=0) != 0
    if HAS_TRUNC:
        trunc = tl.load(trunc_ptr + lane, mask=mask, other=0) != 0
        if HAS_TERM:
            flags = flags | tl.where(trunc & (term == 0), _TRUNCATED, 0).to(tl.uint8)
        else:
            flags = flags | tl.where(trunc, _TRUNCATED, 0).to(tl.uint8)
    if HAS_DONE:
        done = tl.load(done_ptr + lane, mask=mask, other=0) != 0
    elif HAS_TERM:
        done = term
        if HAS_TRUNC:
            done = done | trunc
    else:
        done = tl.zeros([BLOCK_], tl.int1)  # not launched: the launcher asks for done or terminated
    if HAS_REWARD:
        reward = tl.load(reward_ptr + lane, mask=mask, other=0.0)
    else:
        reward = tl.zeros([BLOCK_], tl.float32)
    prev_start = tl.load(start_ptr + there, mask=mask, other=0)
    prev_ret = tl.load(ret_ptr + there, mask=mask, other=0.0)
    is_reset = tl.zeros([BLOCK_], tl.int1)
    if MARKS_LAST:
        prev_ended = (tl.load(end_flags_ptr + there, mask=mask, other=0) != 0) & (first == 0)
        if NEXT_STEP:
            is_reset = prev_ended
            starts = (prev_start == SENTINEL_) | first
        else:
            starts = prev_ended | first
        ended = done & (is_reset == 0)
    else:
        if NEXT_STEP:
            ended = done & (prev_start != SENTINEL_) & (first == 0)
            is_reset = ended
            starts = (prev_start == SENTINEL_) | first
        else:
            ended = done & (first == 0)
            starts = done | first
        # A restart leaves the previous row alone. (`!= 0`: Triton 3.9's interpreter types a
        # block mask combined with a scalar condition as int32, and refuses it as a mask.)
        keep = (mask & (first == 0)) != 0
        tl.store(end_flags_ptr + there, tl.where(ended, flags, 0).to(tl.uint8), mask=keep)
    start = tl.where(starts, adds, prev_start)
    ret = tl.where(starts, reward, prev_ret + reward)
    start = tl.where(is_reset, SENTINEL_, start)
    ret = tl.where(is_reset, 0.0, ret)
    tl.store(start_ptr + here, start, mask=mask)
    tl.store(ret_ptr + here, ret, mask=mask)
    if MARKS_LAST:
        tl.store(end_flags_ptr + here, tl.where(ended, flags, 0).to(tl.uint8), mask=mask)
    else:
        tl.store(end_flags_ptr + here, tl.zeros([BLOCK_], tl.uint8), mask=mask)
    tl.store(ended_ptr + lane, ended.to(tl.int8), mask=mask)


def add_step(start: torch.Tensor, end_flags: torch.Tensor, ret: torch.Tensor, state: torch.Tensor,
             done: torch.Tensor | None, terminated: torch.Tensor | None, truncated: torch.Tensor | None,
             has_final: bool, reward: torch.Tensor | None, marks_last: bool, next_step: bool) -> torch.Tensor:
    """Update ``start`` [T, N] int64, ``end_flags`` [T, N] uint8 and ``ret`` [T, N] float32 in
    place for the row the next add writes (``state[STATE_ADDS]``, not advanced here), the end
    flags composed in the kernel from ``done``/``terminated``/``truncated`` ([N] bool or None;
    ``done`` None means ``terminated | truncated``) and ``has_final``; returns [N] bool, the lanes
    whose episode ended with this add (none on the first add of first mode)."""
    rows, lanes = start.shape
    for name, t, dtype in (("start", start, torch.int64), ("end_flags", end_flags, torch.uint8),
                           ("ret", ret, torch.float32)):
        if t.dtype != dtype or tuple(t.shape) != (rows, lanes) or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {(rows, lanes)}")
    if done is None and terminated is None:
        raise ValueError("done, terminated: expected at least one of them")
    for name, t in (("done", done), ("terminated", terminated), ("truncated", truncated)):
        if t is not None and (tuple(t.shape) != (lanes,) or t.dtype != torch.bool):
            raise ValueError(f"{name}: expected bool [{lanes}], got {t.dtype} {tuple(t.shape)}")
    if state.dtype != torch.int64 or state.dim() != 1:
        raise ValueError(f"state: expected a 1-d int64 tensor of cursors, got {state.dtype} {tuple(state.shape)}")
    # The kernel reads lane i at offset i: strided inputs (a column of a wider tensor) are packed.
    done, terminated, truncated, reward = (None if t is None else t.contiguous()
                                           for t in (done, terminated, truncated, reward))
    some = next(t for t in (done, terminated) if t is not None).view(torch.int8)
    ended = torch.empty(lanes, dtype=torch.bool, device=start.device)
    grid = (triton.cdiv(lanes, BLOCK),)
    _add_step_kernel[grid](
        start, end_flags, ret, ended.view(torch.int8),
        state, *(some if t is None else t.view(torch.int8) for t in (done, terminated, truncated)),
        reward if reward is not None else ret, rows, lanes,
        SENTINEL_=SENTINEL, ADDS=STATE_ADDS, RESTART=STATE_RESTART, MARKS_LAST=marks_last, NEXT_STEP=next_step,
        HAS_DONE=done is not None, HAS_TERM=terminated is not None, HAS_TRUNC=truncated is not None,
        FINAL_BIT=HAS_FINAL if has_final else 0, HAS_REWARD=reward is not None, BLOCK_=BLOCK,
    )
    return ended


@triton.jit(do_not_specialize=["rows", "lanes"])
def _record_ends_kernel(
    stats_ptr, totals_ptr,                                  # outputs: [T, 3], [3] float64
    start_ptr, ret_ptr, ended_ptr, state_ptr,               # inputs
    rows, lanes,
    ADDS: tl.constexpr, MARKS_LAST: tl.constexpr, BLOCK_: tl.constexpr,
):
    # One program: it reads the overwritten row's old sums, reduces the lanes in a fixed order
    # and writes the new sums, with no other program to race with. Work O(N), one launch.
    adds = tl.load(state_ptr + ADDS)
    row = adds % rows
    if MARKS_LAST:
        end_row = row
        end_abs = adds
    else:
        end_row = (adds + rows - 1) % rows
        end_abs = adds - 1
    base = end_row * lanes
    count = tl.zeros([BLOCK_], tl.int64)
    length = tl.zeros([BLOCK_], tl.int64)
    ret = tl.zeros([BLOCK_], tl.float64)
    for first in range(0, lanes, BLOCK_):
        lane = first + tl.arange(0, BLOCK_)
        ended = tl.load(ended_ptr + lane, mask=lane < lanes, other=0) != 0
        start = tl.load(start_ptr + base + lane, mask=ended, other=0)
        r = tl.load(ret_ptr + base + lane, mask=ended, other=0.0)
        count += ended.to(tl.int64)
        length += tl.where(ended, end_abs + 1 - start, 0)
        ret += tl.where(ended, r.to(tl.float64), 0.0)
    new_count = tl.sum(count, axis=0).to(tl.float64)
    new_length = tl.sum(length, axis=0).to(tl.float64)
    new_ret = tl.sum(ret, axis=0)
    # The overwritten row leaves the live rows with its old sums (as reference.record_ends).
    total_count = tl.load(totals_ptr + 0) - tl.load(stats_ptr + row * 3 + 0)
    total_length = tl.load(totals_ptr + 1) - tl.load(stats_ptr + row * 3 + 1)
    total_ret = tl.load(totals_ptr + 2) - tl.load(stats_ptr + row * 3 + 2)
    if MARKS_LAST:
        tl.store(stats_ptr + end_row * 3 + 0, new_count)
        tl.store(stats_ptr + end_row * 3 + 1, new_length)
        tl.store(stats_ptr + end_row * 3 + 2, new_ret)
    else:
        # The previous row's sums are added to (zero unless a reopened disk buffer cut episodes
        # there), read before the overwritten row is cleared (they differ: T >= 2).
        old_count = tl.load(stats_ptr + end_row * 3 + 0)
        old_length = tl.load(stats_ptr + end_row * 3 + 1)
        old_ret = tl.load(stats_ptr + end_row * 3 + 2)
        tl.store(stats_ptr + row * 3 + 0, 0.0)
        tl.store(stats_ptr + row * 3 + 1, 0.0)
        tl.store(stats_ptr + row * 3 + 2, 0.0)
        tl.store(stats_ptr + end_row * 3 + 0, old_count + new_count)
        tl.store(stats_ptr + end_row * 3 + 1, old_length + new_length)
        tl.store(stats_ptr + end_row * 3 + 2, old_ret + new_ret)
    tl.store(totals_ptr + 0, total_count + new_count)
    tl.store(totals_ptr + 1, total_length + new_length)
    tl.store(totals_ptr + 2, total_ret + new_ret)


def record_ends(stats: torch.Tensor, totals: torch.Tensor, start: torch.Tensor, ret: torch.Tensor,
                ended: torch.Tensor, state: torch.Tensor, marks_last: bool) -> None:
    """Per-row sums of the episodes this add ended (see reference.record_ends), in one launch:
    ``stats`` [T, 3] and ``totals`` [3] float64 updated in place from ``start`` [T, N] int64,
    ``ret`` [T, N] float32 and ``ended`` [N] bool, at the rows the cursors ``state`` give (before
    the add's cursor advance). Counts and lengths equal the reference exactly; the return sum is
    a float64 sum in this kernel's order."""
    rows, lanes = start.shape
    if stats.dtype != torch.float64 or tuple(stats.shape) != (rows, 3) or not stats.is_contiguous():
        raise ValueError(f"stats: expected a contiguous float64 tensor of shape {(rows, 3)}")
    if totals.dtype != torch.float64 or tuple(totals.shape) != (3,):
        raise ValueError("totals: expected a float64 tensor of shape (3,)")
    if tuple(ended.shape) != (lanes,) or ended.dtype != torch.bool:
        raise ValueError(f"ended: expected bool [{lanes}], got {ended.dtype} {tuple(ended.shape)}")
    _record_ends_kernel[(1,)](stats, totals, start, ret, ended.contiguous().view(torch.int8), state,
                              rows, lanes, ADDS=STATE_ADDS, MARKS_LAST=marks_last, BLOCK_=BLOCK)
