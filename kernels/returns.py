"""n-step segments of sampled transitions, in one launch: k, the discounted return, the discount
and the links of the segment's last row.

Mirrors :func:`gpubuffers.reference.returns.nstep`: per item, walk rows t, t+1, ... of its lane
while they stay in its episode and their successor is written (the newest row comes from the
device cursor ``state``), at most ``n_step`` rows; then describe the last row as the transition
sampler does (:func:`gpubuffers.kernels.sampling.links`). Work O(n_step) per item, no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import STATE_ADDS
from .sampling import BLOCK, links


@triton.jit(do_not_specialize=["gamma", "batch", "n_step", "lanes", "total", "final_rows"])
def _nstep_kernel(
    n_ptr, ret_ptr, disc_ptr, succ_ptr, masks_ptr,            # outputs [B] x 4, [4, B]
    slot_ptr, row_ptr, reward_ptr,                            # sampled transitions, reward leaf
    end_flags_ptr, final_idx_ptr, fin_head_ptr, state_ptr,    # index, cursors
    gamma, batch, n_step, lanes, total, final_rows,
    ADDS: tl.constexpr, NEXT_STEP: tl.constexpr, HAS_FINAL: tl.constexpr, BLOCK_: tl.constexpr,
):
    item = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = item < batch
    slot = tl.load(slot_ptr + item, mask=mask, other=0)
    row = tl.load(row_ptr + item, mask=mask, other=0)
    newest = tl.load(state_ptr + ADDS) - 1
    alive = mask
    k = tl.zeros([BLOCK_], tl.int64)
    ret = tl.zeros([BLOCK_], tl.float32)
    disc = tl.zeros([BLOCK_], tl.float32)
    last = slot
    power = tl.zeros([], tl.float64) + 1.0
    g = tl.zeros([], tl.float64) + gamma
    for i in range(n_step):
        here = (slot + i * lanes) % total
        use = alive & (row + i < newest)  # in the episode, and its successor written
        r = tl.load(reward_ptr + here, mask=use, other=0).to(tl.float32)
        ret = tl.where(use, ret + power.to(tl.float32) * r, ret)
        k += use.to(tl.int64)
        last = tl.where(use, here, last)
        power = power * g
        disc = tl.where(use, power.to(tl.float32), disc)
        ended = tl.load(end_flags_ptr + here, mask=use, other=1) != 0
        alive = use & (ended == 0)
    succ, is_last, terminated, truncated, next_valid = links(
        end_flags_ptr, final_idx_ptr, fin_head_ptr, last, mask, lanes, total, final_rows,
        NEXT_STEP, HAS_FINAL, BLOCK_)
    tl.store(n_ptr + item, k, mask=mask)
    tl.store(ret_ptr + item, ret, mask=mask)
    tl.store(disc_ptr + item, tl.where(terminated, 0.0, disc), mask=mask)
    tl.store(succ_ptr + item, succ, mask=mask)
    tl.store(masks_ptr + item, is_last.to(tl.int8), mask=mask)
    tl.store(masks_ptr + batch + item, terminated.to(tl.int8), mask=mask)
    tl.store(masks_ptr + 2 * batch + item, truncated.to(tl.int8), mask=mask)
    tl.store(masks_ptr + 3 * batch + item, next_valid.to(tl.int8), mask=mask)


MASKS = ("is_last", "terminated", "truncated", "next_valid")


def nstep(end_flags: torch.Tensor, final_idx: torch.Tensor, fin_head: torch.Tensor, state: torch.Tensor,
          slot: torch.Tensor, row: torch.Tensor, reward: torch.Tensor, n_step: int, gamma: float,
          final_rows: int, next_step: bool) -> dict:
    """n-step segments of the transitions at ``slot``/``row`` [B] int64 with the reward leaf
    ``reward`` [T * N] (any real dtype; bool as uint8): ``n_steps``, ``return``, ``discount``,
    ``succ`` and the masks of the last row, as the reference returns them (without ``last``)."""
    rows, lanes = end_flags.shape
    batch = slot.shape[0]
    if reward.dim() != 1 or reward.shape[0] != rows * lanes:
        raise ValueError(f"reward: expected a 1-d tensor of {rows * lanes} slots, got {tuple(reward.shape)}")
    if reward.dtype == torch.bool:
        reward = reward.view(torch.uint8)
    device = slot.device
    k = torch.empty(batch, dtype=torch.int64, device=device)
    ret = torch.empty(batch, dtype=torch.float32, device=device)
    disc = torch.empty(batch, dtype=torch.float32, device=device)
    succ = torch.empty(batch, dtype=torch.int64, device=device)
    masks = torch.empty(len(MASKS), batch, dtype=torch.bool, device=device)
    grid = (triton.cdiv(batch, BLOCK),)
    _nstep_kernel[grid](
        k, ret, disc, succ, masks.view(torch.int8), slot.contiguous(), row.contiguous(), reward.contiguous(),
        end_flags, final_idx, fin_head, state, float(gamma), batch, n_step, lanes, rows * lanes,
        max(final_rows, 1), ADDS=STATE_ADDS, NEXT_STEP=next_step, HAS_FINAL=final_rows > 0, BLOCK_=BLOCK,
    )
    out = {"n_steps": k, "return": ret, "discount": disc, "succ": succ}
    out.update(zip(MASKS, masks.unbind(0)))
    return out
