"""Returns (pure torch): n-step segments of sampled transitions, and GAE over a rollout.

The reference of :mod:`gpubuffers.kernels.returns`. For a transition at absolute row t, the
segment runs over rows t, t+1, ... of its lane while they belong to its episode (it stops after
the row that ends it) and their successor has been written, for at most ``n_step`` rows: k rows.
Reset rows are never part of a segment (the row before one ends its episode).
"""

from __future__ import annotations

import torch

from ..layout import HAS_FINAL, SENTINEL, STATE_ADDS, TRUNCATED
from .episode_index import EpisodeIndex
from .sampling import transition_links, wrap


_TABLES: dict = {}


def segment_tables(gamma: float, n_step: int, lanes: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(offsets, powers, step) for n-step segments: ``offsets`` [n, 1] int64 ``i * lanes`` (slot
    offset of row t + i); ``powers`` [n + 1] float32 gamma^0 .. gamma^n, running float64
    products (as the kernel forms them) rounded to float32, built on the device (no
    host-to-device copy); ``step`` [n, 1] int64 ``0 .. n - 1``. Kept for reuse on the CPU."""
    key = (gamma, n_step, lanes) if device.type == "cpu" else None
    if key in _TABLES:
        return _TABLES[key]
    f64 = dict(dtype=torch.float64, device=device)
    step = torch.arange(n_step, device=device)[:, None]
    powers = torch.cat([torch.ones(1, **f64), torch.full((n_step,), gamma, **f64).cumprod(0)]).float()
    out = step * lanes, powers, step
    if key is not None:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = out
    return out


def nstep(ix: EpisodeIndex, slot: torch.Tensor, row: torch.Tensor, reward: torch.Tensor, n_step: int,
          gamma: float, final_rows: int, next_step: bool) -> dict:
    """n-step segments of the transitions at ``slot`` [B] (absolute ``row`` [B]).

    reward: [T * N] the reward leaf, any real dtype (summed in float32).
    Returns [B] tensors: ``n_steps`` int64 (k >= 1), ``return`` float32 (sum of gamma^i *
    reward[t + i], i < k), ``discount`` float32 (gamma^k, 0 where the segment ends in a
    termination), ``last`` (slot of row t + k - 1) and the links of that last row
    (:func:`transition_links` without ``is_first``: ``succ``, ``is_last``, ``terminated``,
    ``truncated``, ``next_valid``), ``first_is_last`` (row t ends its episode) and
    ``first_reward`` (row t's reward as stored, which the sample returns without reading it
    again). Powers of gamma: :func:`segment_tables`.

    The rows t + i of all items are read as an [n, B] block, row i holding step i of every
    item: each step is then a contiguous [B] vector (cheaper on the CPU than [B, n] columns).
    """
    rows, lanes = ix.start.shape
    total = rows * lanes
    batch = slot.shape[0]
    offsets, powers, step = segment_tables(gamma, n_step, lanes, slot.device)
    here = wrap(slot + offsets, total)                            # [n, B] slots of rows t + i
    flat = here.view(-1)
    flags = ix.end_flags.view(-1).index_select(0, flat).view(n_step, batch)
    # Row t + i is in the segment when its successor is written and no earlier row ended: the
    # segment stops after its first end, and before the newest row.
    ended = flags != 0
    k = torch.full_like(slot, n_step)
    for i in range(n_step - 2, -1, -1):  # the earliest end written last
        k.masked_fill_(ended[i], i + 1)
    k = torch.minimum(k, ix.state[STATE_ADDS] - 1 - row).clamp_min_(0)
    read = reward.index_select(0, flat).view(n_step, batch)
    terms = read.float() * powers[:n_step, None]
    terms.masked_fill_(step >= k, 0.0)
    ret = terms[0]
    for i in range(1, n_step):  # left to right, as the kernel sums
        ret = ret + terms[i]
    # Row t + k - 1 of each segment, picked from the [n, B] reads.
    at = (k - 1).clamp_min_(0)[None]
    last = here.gather(0, at).view(batch)
    out = transition_links(ix, last, None, final_rows, next_step, flags=flags.gather(0, at).view(batch),
                           first=False)
    out.update({"n_steps": k, "return": ret, "last": last, "first_is_last": ended[0], "first_reward": read[0],
                "discount": powers.index_select(0, k).masked_fill_(out["terminated"], 0.0)})
    return out


def gae(ix: EpisodeIndex, reward: torch.Tensor, value: torch.Tensor, final_value: torch.Tensor, tail_flags: torch.Tensor, tail_final: torch.Tensor,
        last_value: torch.Tensor, gamma: float, lam: float, next_step: bool
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(lambda) advantages and returns of a rollout of T rows by N lanes (rows in order).

    ix: the episode index of a ring of T rows holding the rollout, oldest first; row T - 1's
        end flags and final value are read from ``tail_flags`` [N] uint8 and ``tail_final`` [N]
        instead (under ``done_marks="first"`` its end arrives with the next add).
    reward, value: [T, N] any real dtype (read as float32); final_value [T, N] float32: at an
        end slot with ``HAS_FINAL``, the value of the episode's final observation.
    last_value: [N] the value of the observation after row T - 1.

    Per slot, the value it bootstraps from is the next row's value (``last_value`` after the
    last row) inside an episode; 0 where it ends by termination; where it ends by truncation,
    under ``next_step`` the next row's value (the reset row holds the final observation), under
    ``same_step`` the stored final value, else (none given) the slot's own value. The recursion
    ``adv[t] = delta[t] + gamma * lam * adv[t + 1]`` stops at every end. Reset rows
    (``next_step``, ``start == SENTINEL``) get advantage 0. Returns ``(advantage, return)`` [T, N]
    float32, ``return = advantage + value``; float32 throughout, summed in the kernel's order.
    """
    reward = reward.float()
    value = value.float()
    flags = torch.cat([ix.end_flags[:-1], tail_flags[None]])
    ended = flags != 0  # every non-zero end flag has the ENDED bit
    truncated = (flags & TRUNCATED) != 0
    next_value = torch.cat([value[1:], last_value[None].float()])
    if next_step:
        cut_value = next_value
    else:
        final = torch.cat([final_value[:-1], tail_final[None].float()])
        cut_value = torch.where((flags & HAS_FINAL) != 0, final, value)
    boot = torch.where(ended, torch.where(truncated, cut_value, 0.0), next_value)
    delta = reward + gamma * boot - value
    carry = torch.full_like(delta, gamma * lam).masked_fill_(ended, 0.0)
    if next_step:
        reset = ix.start == SENTINEL
        delta.masked_fill_(reset, 0.0)
        carry.masked_fill_(reset, 0.0)
    # In place, last row first: adv[t] = delta[t] + carry[t] * adv[t + 1], rounded after the
    # product and after the sum, as the kernel computes it.
    adv, term = delta, torch.empty_like(delta[0])
    for t in range(delta.shape[0] - 2, -1, -1):  # the one sequential dependency
        torch.add(adv[t], torch.mul(carry[t], adv[t + 1], out=term), out=adv[t])
    return adv, adv + value
