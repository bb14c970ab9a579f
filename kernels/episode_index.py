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

from ..layout import SENTINEL, STATE_ADDS
BLOCK = 1024


@triton.jit(do_not_specialize=["rows", "lanes"])
def _add_step_kernel(
    start_ptr, end_flags_ptr, ret_ptr, ended_ptr,          # outputs (index updated in place)
    state_ptr, done_ptr, flags_ptr, reward_ptr,             # inputs
    rows, lanes,                                            # sizes
    SENTINEL_: tl.constexpr, ADDS: tl.constexpr, MARKS_LAST: tl.constexpr,
    NEXT_STEP: tl.constexpr, HAS_FLAGS: tl.constexpr, HAS_REWARD: tl.constexpr,
    BLOCK_: tl.constexpr,
):
    lane = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = lane < lanes
    # The row comes from the device cursor, so a captured graph writes a new row each replay.
    adds = tl.load(state_ptr + ADDS)
    row = adds % rows
    prev = (adds + rows - 1) % rows
    first = adds == 0
    here = row * lanes + lane
    there = prev * lanes + lane
    done = tl.load(done_ptr + lane, mask=mask, other=0) != 0
    if HAS_FLAGS:
        flags = tl.load(flags_ptr + lane, mask=mask, other=0)
    else:
        flags = tl.full([BLOCK_], 1, tl.uint8)
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
        tl.store(end_flags_ptr + there, tl.where(ended, flags, 0).to(tl.uint8), mask=mask)
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
             done: torch.Tensor, flags: torch.Tensor | None, reward: torch.Tensor | None,
             marks_last: bool, next_step: bool) -> torch.Tensor:
    """Update ``start`` [T, N] int64, ``end_flags`` [T, N] uint8 and ``ret`` [T, N] float32 in
    place for the row the next add writes (``state[STATE_ADDS]``, not advanced here); returns
    [N] bool, the lanes whose episode ended with this add (none on the first add of first mode)."""
    rows, lanes = start.shape
    for name, t, dtype in (("start", start, torch.int64), ("end_flags", end_flags, torch.uint8),
                           ("ret", ret, torch.float32)):
        if t.dtype != dtype or tuple(t.shape) != (rows, lanes) or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {(rows, lanes)}")
    if tuple(done.shape) != (lanes,) or done.dtype != torch.bool:
        raise ValueError(f"done: expected bool [{lanes}], got {done.dtype} {tuple(done.shape)}")
    if state.dtype != torch.int64 or state.dim() != 1:
        raise ValueError(f"state: expected a 1-d int64 tensor of cursors, got {state.dtype} {tuple(state.shape)}")
    # The kernel reads lane i at offset i: strided inputs (a column of a wider tensor) are packed.
    done = done.contiguous()
    flags = None if flags is None else flags.contiguous()
    reward = None if reward is None else reward.contiguous()
    ended = torch.empty(lanes, dtype=torch.bool, device=start.device)
    grid = (triton.cdiv(lanes, BLOCK),)
    _add_step_kernel[grid](
        start, end_flags, ret, ended.view(torch.int8),
        state, done.view(torch.int8), flags if flags is not None else done, reward if reward is not None else ret,
        rows, lanes,
        SENTINEL_=SENTINEL, ADDS=STATE_ADDS, MARKS_LAST=marks_last, NEXT_STEP=next_step,
        HAS_FLAGS=flags is not None, HAS_REWARD=reward is not None, BLOCK_=BLOCK,
    )
    return ended
