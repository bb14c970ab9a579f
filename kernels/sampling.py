"""Index sampling with in-kernel randomness: transitions and sequence windows.

Each item draws up to ``tries`` uniform proposals from Triton's Philox stream at counters
``offset + item * tries + try`` (the host advances ``offset``; nothing is read back), keeps the
first one accepted, else proposal 0 with ``valid=False``. Mirrors
:func:`gpubuffers.reference.transition_slots` and :func:`gpubuffers.reference.window_ends` fed
with :func:`gpubuffers.reference.philox_below` draws. Cost per item is O(tries), independent of
capacity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SENTINEL = 1 << 60
BLOCK = 128


@triton.jit
def _uniform_below(seed, counter, high_f):
    """floor(u * high) for a 53-bit uniform u from two Philox words (as philox_below)."""
    r0, r1, _, _ = tl.randint4x(seed, counter)
    hi = (r0 >> 5).to(tl.int64)
    lo = (r1 >> 6).to(tl.int64)
    u = (hi * 67108864 + lo).to(tl.float64) * 1.1102230246251565e-16  # 2**26, 2**-53
    return (u * high_f).to(tl.int64)


@triton.jit
def _pick_kernel(
    slot_ptr, row_ptr, valid_ptr,                  # outputs [B]
    start_ptr,                                     # index: start [T * N]
    seed, offset, batch, tries, high, base_row, lanes, total, length,
    SENTINEL_: tl.constexpr, WINDOWS: tl.constexpr, REJECT: tl.constexpr, BLOCK_: tl.constexpr,
):
    item = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = item < batch
    high_f = high.to(tl.float64)
    base = base_row.to(tl.int64)
    best_slot = tl.zeros([BLOCK_], tl.int64)
    best_row = tl.zeros([BLOCK_], tl.int64)
    found = tl.zeros([BLOCK_], tl.int1)
    for m in range(tries):
        counter = offset + item.to(tl.int64) * tries + m
        k = _uniform_below(seed, counter, high_f)
        slot = (k + base * lanes) % total
        row = k // lanes + base
        if REJECT:
            first = tl.load(start_ptr + slot, mask=mask, other=SENTINEL_)
            if WINDOWS:
                ok = first <= row - (length - 1)
            else:
                ok = first != SENTINEL_
            take = (ok & (found == 0)) | (m == 0)
            best_slot = tl.where(take, slot, best_slot)
            best_row = tl.where(take, row, best_row)
            found = found | ok
        else:
            best_slot = slot
            best_row = row
            found = found | True
    tl.store(slot_ptr + item, best_slot, mask=mask)
    tl.store(row_ptr + item, best_row, mask=mask)
    tl.store(valid_ptr + item, found.to(tl.int8), mask=mask)


def _pick(start: torch.Tensor, seed: int, offset: int, batch: int, tries: int, high: int,
          base_row: int, length: int, windows: bool, reject: bool):
    rows, lanes = start.shape
    if start.dtype != torch.int64 or not start.is_contiguous():
        raise ValueError("start: expected a contiguous int64 tensor [T, N]")
    slot = torch.empty(batch, dtype=torch.int64, device=start.device)
    row = torch.empty(batch, dtype=torch.int64, device=start.device)
    valid = torch.empty(batch, dtype=torch.bool, device=start.device)
    grid = (triton.cdiv(batch, BLOCK),)
    _pick_kernel[grid](slot, row, valid.view(torch.int8), start, seed, offset, batch, tries, high,
                       base_row, lanes, rows * lanes, length, SENTINEL_=SENTINEL, WINDOWS=windows,
                       REJECT=reject, BLOCK_=BLOCK)
    return slot, row, valid


def transition_slots(start: torch.Tensor, seed: int, offset: int, batch: int, tries: int,
                     oldest: int, live: int, next_step: bool):
    """(slot [B], row [B], valid [B]) of transitions whose successor row is written."""
    lanes = start.shape[1]
    return _pick(start, seed, offset, batch, tries, (live - 1) * lanes, oldest, 1,
                 windows=False, reject=next_step)


def window_ends(start: torch.Tensor, seed: int, offset: int, batch: int, tries: int,
                oldest: int, live: int, length: int):
    """(end slot [B], end row [B], valid [B]) of admissible windows of ``length`` rows."""
    lanes = start.shape[1]
    return _pick(start, seed, offset, batch, tries, (live - length + 1) * lanes,
                 oldest + length - 1, length, windows=True, reject=True)
