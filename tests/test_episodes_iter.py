"""ReplayBuffer.episodes(): every finished, fully stored episode, whole, against the episode
structure (tests/oracle.py), in both conventions and autoreset modes, after the ring wraps."""

from __future__ import annotations

import os

import pytest
import torch

from gpubuffers import ReplayBuffer
from oracle import build_lanes, expected, feed, obs

MODES = [(m, a) for m in ("first", "last") for a in ("same_step", "next_step")]
BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
PLANS = [[(1, False), (4, True), (2, False)], [(7, False), (1, True)], [(3, True), (12, False)], [(2, False)]]


def reward(lane, row):
    return float(row % 5) + 0.25 * lane


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("marks,autoreset", MODES)
@pytest.mark.parametrize("adds", [5, 23, 41])
def test_episodes_are_the_stored_whole_episodes(marks, autoreset, adds, backend):
    rows, n = 9, len(PLANS)
    next_step = autoreset == "next_step"
    lanes = build_lanes(PLANS, adds, next_step)
    buf = ReplayBuffer(rows * n, n, done_marks=marks, autoreset=autoreset, seed=0, final_obs_capacity=rows * n,
                       backend=backend, storage_dtypes={"obs": torch.bfloat16})
    feed(buf, lanes, adds, marks == "last", next_step, reward=reward)
    exp = expected(lanes, adds, rows, 1, marks == "last", next_step)
    got = list(buf.episodes())
    assert len(got) == len(exp.episodes) == int(buf.num_episodes)
    seen = set()
    for ep in got:
        lane, length = ep["lane"], ep["length"]
        first = int(ep["info"]["row"][0])
        seen.add((lane, first, length))
        last = first + length - 1
        assert ep["info"]["row"].tolist() == list(range(first, last + 1))
        assert ep["obs"].dtype == torch.float32 and ep["obs"].tolist() == [obs(lane, r) for r in range(first, last + 1)]
        assert ep["index"].tolist() == [r * n + lane for r in range(first, last + 1)]
        tr = next(e[2] for e in lanes[lane].episodes if e[0] == first)
        assert (ep["truncated"], ep["terminated"]) == (tr, not tr)
        assert ep["episode_return"] == pytest.approx(sum(reward(lane, r) for r in range(first, last + 1)))
        if next_step:
            assert ep["next_valid"] == (last + 1 < adds)
            want = obs(lane, last + 1)
        else:
            assert ep["next_valid"]
            want = obs(lane, last, final=True)
        if ep["next_valid"]:
            assert ep["next"]["obs"].tolist() == want
    assert seen == exp.episodes
    ends = [(ep["info"]["row"][-1].item(), ep["lane"]) for ep in got]
    assert ends == sorted(ends)  # oldest end first, ties by lane


def test_episodes_of_an_empty_buffer_and_adds_while_iterating():
    buf = ReplayBuffer(16, 2, done_marks="last", seed=0)
    assert list(buf.episodes()) == []
    for t in range(6):
        buf.add({"obs": torch.zeros(2, 3), "reward": torch.ones(2)}, torch.tensor([t % 2 == 1, True]))
    it = buf.episodes()
    first = next(it)
    assert first["length"] in (1, 2) and first["next_valid"] is False  # no final obs was given
    buf.add({"obs": torch.zeros(2, 3), "reward": torch.ones(2)}, torch.tensor([False, False]))
    with pytest.raises(RuntimeError, match="added to while iterating"):
        next(it)
    assert len(list(buf.episodes())) == int(buf.num_episodes)
