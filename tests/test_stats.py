"""episode_stats from per-row sums kept as rows are written, against a scan of the whole index."""

from __future__ import annotations

import math
import os

import pytest
import torch

from gpubuffers import ReplayBuffer, reference

MODES = [(m, a) for m in ("first", "last") for a in ("same_step", "next_step")]
# The Triton backend's statistics kernel, interpreted on CPU tensors.
BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def scanned(buf, last_rows):
    """The statistics by definition: every live slot that ends an episode within the newest
    ``last_rows`` rows, its length from its start row, its running return."""
    ix, live, oldest = buf.index, buf.live_rows, buf.oldest_row
    age = reference.slot_age(buf.rows, ix.lanes, oldest, ix.start.device)
    ended = (ix.end_flags != 0) & (age < live) & (age >= live - last_rows)
    count = int(ended.sum())
    lengths = float(((age + oldest + 1 - ix.start) * ended).sum())
    returns = float((ix.ret.double() * ended).sum())
    return count, lengths, returns


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("marks,autoreset", MODES)
@pytest.mark.parametrize("lanes", [1, 7, 64])
def test_windows_equal_a_scan_over_many_wraps(marks, autoreset, lanes, backend):
    rows = 13
    g = torch.Generator().manual_seed(lanes)
    buf = ReplayBuffer(rows * lanes, lanes, done_marks=marks, autoreset=autoreset, seed=0, backend=backend)
    for t in range(10 * rows + 5):  # ten wraps of the seam, then a partial one
        done = torch.rand(lanes, generator=g) < 0.2
        reward = torch.randn(lanes, generator=g)
        buf.add({"obs": torch.zeros(lanes, 1), "reward": reward}, done,
                truncated=torch.rand(lanes, generator=g) < 0.5)
        if t % 3 and t > rows:
            continue
        for last in sorted({1, 2, 5, rows - 1, rows, buf.live_rows}):
            stats = buf.episode_stats(last)
            count, lengths, returns = scanned(buf, min(last, buf.live_rows))
            assert int(stats["count"]) == count, (t, last)
            if count == 0:
                assert math.isnan(float(stats["mean_length"])) and math.isnan(float(stats["mean_return"]))
            else:
                assert float(stats["mean_length"]) == lengths / count
                assert float(stats["mean_return"]) == pytest.approx(returns / count, rel=1e-9, abs=1e-9)


def test_stats_of_a_long_single_env_run():
    # 50 wraps of a single environment: the running totals stay equal to a scan.
    buf = ReplayBuffer(64, done_marks="last", seed=0)
    g = torch.Generator().manual_seed(0)
    for t in range(64 * 50):
        buf.add({"obs": torch.zeros(1), "reward": torch.rand((), generator=g)},
                bool(torch.rand((), generator=g) < 0.1))
    count, lengths, returns = scanned(buf, buf.live_rows)
    stats = buf.episode_stats()
    assert int(stats["count"]) == count > 0
    assert float(stats["mean_length"]) == lengths / count
    assert float(stats["mean_return"]) == pytest.approx(returns / count, rel=1e-9)


def test_inf_reward_on_a_lane_that_did_not_end_leaves_others_alone():
    buf = ReplayBuffer(16, 2, done_marks="last")
    buf.add({"obs": torch.zeros(2, 1), "reward": torch.tensor([1.0, math.inf])}, torch.tensor([True, False]))
    buf.add({"obs": torch.zeros(2, 1), "reward": torch.tensor([1.0, 1.0])}, torch.tensor([True, False]))
    assert float(buf.episode_stats()["mean_return"]) == 1.0
