"""n-step segments of sampled transitions, in one launch: k, the discounted return, the discount
and the links of the segment's last row; and GAE(lambda) over a rollout, in one launch.

Mirrors :func:`gpubuffers.reference.returns.nstep`: per item, walk rows t, t+1, ... of its lane
while they stay in its episode and their successor is written (the newest row comes from the
device cursor ``state``), at most ``n_step`` rows; then describe the last row as the transition
sampler does (:func:`gpubuffers.kernels.sampling.links`). Work O(n_step) per item, no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import ENDED, HAS_FINAL, SENTINEL, STATE_ADDS, TRUNCATED
from .sampling import BLOCK, links


@triton.jit(do_not_specialize=["gamma", "batch", "n_step", "lanes", "total", "final_rows"])
def _nstep_kernel(
    n_ptr, ret_ptr, disc_ptr, succ_ptr, masks_ptr,            # outputs [B] x 4, [4, B]
    slot_ptr, row_ptr, reward_ptr,                            # sampled transitions, reward leaf
    start_ptr, end_flags_ptr, final_idx_ptr, fin_head_ptr, state_ptr,    # index, cursors
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
        start_ptr, end_flags_ptr, final_idx_ptr, fin_head_ptr, last, mask, lanes, total, final_rows,
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


def nstep(start: torch.Tensor, end_flags: torch.Tensor, final_idx: torch.Tensor, fin_head: torch.Tensor, state: torch.Tensor,
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
        start, end_flags, final_idx, fin_head, state, float(gamma), batch, n_step, lanes, rows * lanes,
        max(final_rows, 1), ADDS=STATE_ADDS, NEXT_STEP=next_step, HAS_FINAL=final_rows > 0, BLOCK_=BLOCK,
    )
    out = {"n_steps": k, "return": ret, "discount": disc, "succ": succ}
    out.update(zip(MASKS, masks.unbind(0)))
    return out


@triton.jit(do_not_specialize=["gamma", "gamma_lam", "rows", "lanes"])
def _gae_kernel(
    adv_ptr, ret_ptr,                                         # outputs [T, N] float32
    reward_ptr, value_ptr, final_ptr, flags_ptr, start_ptr,   # [T, N]
    tail_flags_ptr, tail_final_ptr, last_value_ptr,           # [N]
    gamma, gamma_lam, rows, lanes,
    SENTINEL_: tl.constexpr, ENDED_: tl.constexpr, TRUNCATED_: tl.constexpr, HAS_FINAL_: tl.constexpr,
    NEXT_STEP: tl.constexpr, BLOCK_: tl.constexpr,
):
    lane = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = lane < lanes
    g = tl.zeros([], tl.float32) + gamma
    gl = tl.zeros([], tl.float32) + gamma_lam
    next_value = tl.load(last_value_ptr + lane, mask=mask, other=0).to(tl.float32)
    tail_flags = tl.load(tail_flags_ptr + lane, mask=mask, other=0).to(tl.int32)
    tail_final = tl.load(tail_final_ptr + lane, mask=mask, other=0).to(tl.float32)
    acc = tl.zeros([BLOCK_], tl.float32)
    for i in range(rows):  # backward over the rollout: the one sequential dependency
        t = rows - 1 - i
        at = t.to(tl.int64) * lanes + lane
        body = (mask & (t < rows - 1)) != 0  # a bool block mask (kernels/episode_index.py)
        flags = tl.where(t == rows - 1, tail_flags,
                         tl.load(flags_ptr + at, mask=body, other=0).to(tl.int32))
        final = tl.where(t == rows - 1, tail_final, tl.load(final_ptr + at, mask=body, other=0))
        reward = tl.load(reward_ptr + at, mask=mask, other=0).to(tl.float32)
        value = tl.load(value_ptr + at, mask=mask, other=0).to(tl.float32)
        ended = (flags & ENDED_) != 0
        truncated = (flags & TRUNCATED_) != 0
        if NEXT_STEP:
            cut_value = next_value
        else:
            cut_value = tl.where((flags & HAS_FINAL_) != 0, final, value)
        boot = tl.where(ended, tl.where(truncated, cut_value, 0.0), next_value)
        delta = reward + g * boot - value
        carry = tl.where(ended, 0.0, gl)
        if NEXT_STEP:
            reset = tl.load(start_ptr + at, mask=mask, other=0) == SENTINEL_
            delta = tl.where(reset, 0.0, delta)
            carry = tl.where(reset, 0.0, carry)
        acc = delta + carry * acc
        tl.store(adv_ptr + at, acc, mask=mask)
        tl.store(ret_ptr + at, acc + value, mask=mask)
        next_value = value


#: Lanes per GAE program: each walks its lanes' T rows backward.
GAE_BLOCK = 256


def gae(start: torch.Tensor, end_flags: torch.Tensor, reward: torch.Tensor, value: torch.Tensor,
        final_value: torch.Tensor, tail_flags: torch.Tensor, tail_final: torch.Tensor,
        last_value: torch.Tensor, gamma: float, lam: float, next_step: bool
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(lambda) over a rollout in one launch, one program per block of lanes: as
    :func:`gpubuffers.reference.returns.gae` (same arguments and outputs)."""
    rows, lanes = end_flags.shape
    for name, t in (("reward", reward), ("value", value), ("final_value", final_value), ("start", start)):
        if tuple(t.shape) != (rows, lanes):
            raise ValueError(f"{name}: expected shape {(rows, lanes)}, got {tuple(t.shape)}")
    if reward.dtype == torch.bool:
        reward = reward.view(torch.uint8)
    if value.dtype == torch.bool:
        value = value.view(torch.uint8)
    adv = torch.empty(rows, lanes, dtype=torch.float32, device=end_flags.device)
    ret = torch.empty_like(adv)
    grid = (triton.cdiv(lanes, GAE_BLOCK),)
    _gae_kernel[grid](
        adv, ret, reward.contiguous(), value.contiguous(), final_value.float().contiguous(), end_flags,
        start, tail_flags.contiguous(), tail_final.float().contiguous(), last_value.float().contiguous(),
        float(gamma), float(gamma * lam), rows, lanes, SENTINEL_=SENTINEL, ENDED_=ENDED,
        TRUNCATED_=TRUNCATED, HAS_FINAL_=HAS_FINAL, NEXT_STEP=next_step, BLOCK_=GAE_BLOCK,
    )
    return adv, ret
