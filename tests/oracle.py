"""A slow, obviously-correct model of the buffer, built from the episode structure itself.

Trajectories are generated as what they are (per lane: episodes of given lengths, each ended
by termination or truncation, with a reset row after each episode under
``autoreset="next_step"``), then rendered into the ``done`` flags of either convention. What
the buffer must hold after W adds into T rows follows from that structure with plain lists:
no ring arithmetic, no flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Lane:
    label: list  # per absolute row: episode number within the lane, or None for a reset row
    episodes: list = field(default_factory=list)  # (first row, last row, truncated)


def build_lanes(plans: list[list[tuple[int, bool]]], rows: int, next_step: bool) -> list[Lane]:
    """plans[n]: episodes of lane n as (length, truncated); rendered for ``rows`` adds."""
    lanes = []
    for plan in plans:
        label: list = []
        episodes = []
        k = 0
        while len(label) < rows:
            length, trunc = plan[k % len(plan)]
            first = len(label)
            label.extend([k] * length)
            episodes.append((first, first + length - 1, trunc))
            if next_step:
                label.append(None)
            k += 1
        lanes.append(Lane(label[:rows], episodes))
    return lanes


def flags(lanes: list[Lane], rows: int, marks_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """done and truncated [rows, N] in the given convention."""
    n = len(lanes)
    done = torch.zeros(rows, n, dtype=torch.bool)
    trunc = torch.zeros(rows, n, dtype=torch.bool)
    for i, lane in enumerate(lanes):
        for _, last, tr in lane.episodes:
            at = last if marks_last else last + 1
            if at < rows:
                done[at, i] = True
                trunc[at, i] = tr
    return done, trunc


def obs(lane: int, row: int, final: bool = False) -> list[float]:
    """Identifiable observation: (lane, absolute row, 1 for a final observation)."""
    return [float(lane), float(row), 1.0 if final else 0.0]


@dataclass
class Expected:
    windows: set  # (lane, end row) of admissible windows
    transitions: dict  # (lane, row) -> dict(next=obs, is_first, is_last, terminated, truncated)
    episodes: set  # (lane, first row, length) of finished, fully live episodes


def expected(lanes: list[Lane], adds: int, rows: int, length: int, marks_last: bool,
             next_step: bool) -> Expected:
    oldest = max(0, adds - rows)
    live = range(oldest, adds)
    windows = set()
    transitions = {}
    episodes = set()
    for n, lane in enumerate(lanes):
        lab = lane.label
        for end in live:
            first = end - length + 1
            if first >= oldest and lab[end] is not None and all(lab[r] == lab[end] for r in range(first, end + 1)):
                windows.add((n, end))
        for first, last, tr in lane.episodes:
            known = last if marks_last else last + 1
            if first >= oldest and known < adds:
                episodes.add((n, first, last - first + 1))
            for r in range(first, last + 1):
                if oldest <= r <= adds - 2:
                    is_last = r == last
                    if not is_last or next_step:
                        nxt = obs(n, r + 1)
                    else:
                        nxt = obs(n, r, final=True)
                    transitions[(n, r)] = dict(next=nxt, is_first=r == first, is_last=is_last,
                                               terminated=is_last and not tr, truncated=is_last and tr)
    return Expected(windows, transitions, episodes)


def feed(buf, lanes: list[Lane], adds: int, marks_last: bool, next_step: bool, reward=None) -> None:
    """Add ``adds`` rows of identifiable data, with final observations under same_step;
    ``reward(lane, row)`` gives the reward leaf (default 1.0)."""
    n = len(lanes)
    done, trunc = flags(lanes, adds, marks_last)
    for a in range(adds):
        step = {"obs": torch.tensor([obs(i, a) for i in range(n)]),
                "reward": torch.tensor([1.0 if reward is None else reward(i, a) for i in range(n)]),
                "info": {"lane": torch.arange(n), "row": torch.full((n,), a)}}
        final = None
        if not next_step:
            # The final obs accompanies the flag that closes the episode.
            last_row = a if marks_last else a - 1
            final = torch.tensor([obs(i, last_row, final=True) for i in range(n)])
        buf.add(step, done[a], final_obs=final, truncated=trunc[a])
