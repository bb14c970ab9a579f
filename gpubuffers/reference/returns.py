"""Returns (pure torch): n-step segments of sampled transitions.

The reference of :mod:`gpubuffers.kernels.returns`. For a transition at absolute row t, the
segment runs over rows t, t+1, ... of its lane while they belong to its episode (it stops after
the row that ends it) and their successor has been written, for at most ``n_step`` rows: k rows.
Reset rows are never part of a segment (the row before one ends its episode).
"""

from __future__ import annotations

import torch

from ..layout import STATE_ADDS
from .episode_index import EpisodeIndex
from .sampling import take, transition_links


def nstep(ix: EpisodeIndex, slot: torch.Tensor, row: torch.Tensor, reward: torch.Tensor, n_step: int,
          gamma: float, final_rows: int, next_step: bool) -> dict:
    """n-step segments of the transitions at ``slot`` [B] (absolute ``row`` [B]).

    reward: [T * N] the reward leaf, any real dtype (summed in float32).
    Returns [B] tensors: ``n_steps`` int64 (k >= 1), ``return`` float32 (sum of gamma^i *
    reward[t + i], i < k), ``discount`` float32 (gamma^k, 0 where the segment ends in a
    termination), ``last`` (slot of row t + k - 1) and the links of that last row
    (:func:`transition_links`: ``succ``, ``is_last``, ``terminated``, ``truncated``,
    ``next_valid``). Powers of gamma are running float64 products rounded to float32, built on
    the device (no host-to-device copy).
    """
    rows, lanes = ix.start.shape
    total = rows * lanes
    newest = ix.state[STATE_ADDS] - 1
    step = torch.arange(n_step, device=slot.device)
    here = (slot[:, None] + step * lanes) % total                 # [B, n] slots of rows t + i
    ended = take(ix.end_flags, here) != 0
    # Row t + i is in the segment when its successor is written and no earlier row ended.
    ended_before = torch.cumsum(ended, 1) - ended.long()
    use = (row[:, None] + step < newest) & (ended_before == 0)
    k = use.sum(1)
    # gamma^0 .. gamma^n as running float64 products (as the kernel forms them), then float32.
    f64 = dict(dtype=torch.float64, device=slot.device)
    powers = torch.cat([torch.ones(1, **f64), torch.full((n_step,), gamma, **f64).cumprod(0)]).float()
    terms = torch.where(use, powers[:n_step] * take(reward, here).float(), 0.0)
    ret = terms[:, 0]
    for i in range(1, n_step):  # left to right, as the kernel sums
        ret = ret + terms[:, i]
    last = here.gather(1, (k - 1).clamp_min(0)[:, None]).squeeze(1)
    discount = powers.index_select(0, k)
    out = transition_links(ix, last, row + k - 1, final_rows, next_step)
    out.update({"n_steps": k, "return": ret, "last": last,
                "discount": torch.where(out["terminated"], 0.0, discount)})
    return out

