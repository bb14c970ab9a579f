"""Samplers: identifiable data, seeds, uniformity, single environments, nested leaves, final obs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpubuffers import ReplayBuffer, pad_episodes
from nosync import NoHostSync
from oracle import build_lanes, expected, feed

MODES = [(m, a) for m in ("first", "last") for a in ("same_step", "next_step")]


def random_run(lanes=7, rows=40, adds=100, marks="first", autoreset="same_step", seed=0, p_end=0.15):
    g = torch.Generator().manual_seed(seed)
    plans = [[(int(torch.randint(1, 12, (), generator=g)), bool(torch.rand((), generator=g) < 0.3))
              for _ in range(int(torch.randint(1, 5, (), generator=g)))] for _ in range(lanes)]
    next_step = autoreset == "next_step"
    lane_list = build_lanes(plans, adds, next_step)
    buf = ReplayBuffer(rows * lanes, lanes, done_marks=marks, autoreset=autoreset, seed=seed,
                       final_obs_capacity=rows * lanes)
    feed(buf, lane_list, adds, marks == "last", next_step)
    return buf, lane_list


def chi2_ok(counts: np.ndarray) -> bool:
    """Counts consistent with a uniform draw: chi-square within dof + 8 sqrt(2 dof)."""
    exp = counts.sum() / len(counts)
    chi2 = ((counts - exp) ** 2 / exp).sum()
    dof = len(counts) - 1
    return chi2 < dof + 8 * np.sqrt(2 * dof)


@pytest.mark.parametrize("marks,autoreset", MODES)
def test_sequence_starts_are_uniform(marks, autoreset):
    # Many wraps of the seam; windows of 4 over episodes of 1..11 rows.
    buf, lanes = random_run(marks=marks, autoreset=autoreset, adds=130)
    exp = expected(lanes, 130, 40, 4, marks == "last", autoreset == "next_step")
    keys = sorted(exp.windows)
    where = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    for _ in range(4):
        q = buf.sample_sequences(20000, 4)
        assert q["valid"].all()  # admissible windows are common: rejection never runs dry here
        for lane, row in zip(q["info"]["lane"][:, -1].tolist(), q["info"]["row"][:, -1].tolist()):
            counts[where[(lane, row)]] += 1
    assert (counts > 0).all()
    assert chi2_ok(counts)


@pytest.mark.parametrize("marks,autoreset", MODES)
def test_transitions_and_episodes_are_uniform(marks, autoreset):
    buf, lanes = random_run(marks=marks, autoreset=autoreset, adds=90)
    exp = expected(lanes, 90, 40, 1, marks == "last", autoreset == "next_step")
    keys = sorted(exp.transitions)
    where = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    s = buf.sample(60000)
    assert s["valid"].all()
    for lane, row in zip(s["info"]["lane"].tolist(), s["info"]["row"].tolist()):
        counts[where[(lane, row)]] += 1
    assert chi2_ok(counts)

    keys = sorted(exp.episodes)
    where = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    e = buf.sample_episodes(20000)
    cu = e["cu_seqlens"].tolist()
    assert e["valid"].all()
    for b in range(20000):
        r0 = cu[b]
        counts[where[(int(e["info"]["lane"][r0]), int(e["info"]["row"][r0]), cu[b + 1] - r0)]] += 1
    assert chi2_ok(counts)


@pytest.mark.parametrize("marks,autoreset", MODES)
def test_same_seed_same_stream(marks, autoreset):
    a, _ = random_run(marks=marks, autoreset=autoreset, seed=3)
    b, _ = random_run(marks=marks, autoreset=autoreset, seed=3)
    c, _ = random_run(marks=marks, autoreset=autoreset, seed=4)
    for _ in range(3):
        sa, sb, sc = a.sample(64), b.sample(64), c.sample(64)
        assert torch.equal(sa["index"], sb["index"]) and torch.equal(sa["obs"], sb["obs"])
        assert not torch.equal(sa["index"], sc["index"])
        qa, qb = a.sample_sequences(16, 3), b.sample_sequences(16, 3)
        assert torch.equal(qa["index"], qb["index"])
        ea, eb = a.sample_episodes(8), b.sample_episodes(8)
        assert torch.equal(ea["cu_seqlens"], eb["cu_seqlens"]) and torch.equal(ea["obs"], eb["obs"])


@pytest.mark.parametrize("marks,autoreset", MODES)
def test_hot_path_never_syncs(marks, autoreset):
    buf, lanes = random_run(marks=marks, autoreset=autoreset, adds=60)
    n = 7
    with NoHostSync():
        for t in range(5):
            final = None if autoreset == "next_step" else torch.zeros(n, 3)
            buf.add({"obs": torch.zeros(n, 3), "reward": torch.ones(n),
                     "info": {"lane": torch.arange(n), "row": torch.full((n,), 60 + t)}},
                    torch.rand(n) < 0.5, final_obs=final, truncated=torch.rand(n) < 0.5)
            buf.sample(32)
            buf.sample_sequences(8, 5)
            buf.sample_episodes(4, max_rows=64)
            buf.episode_stats()


def test_hot_path_check_catches_syncs():
    # The guard used above must itself fail on the patterns it is meant to catch.
    x = torch.arange(4)
    for bad in (lambda: x.sum().item(), lambda: x.tolist(), lambda: x[x > 1], lambda: bool(x.any()),
                lambda: x[: x[2]], lambda: x.nonzero()):
        with pytest.raises(AssertionError, match="host sync"):
            with NoHostSync():
                bad()


def test_single_environment():
    buf = ReplayBuffer(50, seed=1, done_marks="last")
    ends = {4, 5, 11, 20, 21, 33}
    for t in range(40):
        buf.add({"obs": torch.tensor([float(t), 0.0]), "reward": torch.tensor(1.0)}, t in ends,
                final_obs=torch.tensor([float(t), 1.0]))
    assert buf.num_envs is None and len(buf) == 40 and buf.capacity == 50
    s = buf.sample(500)
    assert s["obs"].shape == (500, 2) and s["reward"].shape == (500,)
    t = s["obs"][:, 0]
    last = torch.tensor([int(v) in ends for v in t.tolist()])
    assert torch.equal(s["is_last"], last)
    want_next = torch.where(last[:, None], torch.stack([t, torch.ones_like(t)], 1),
                            torch.stack([t + 1, torch.zeros_like(t)], 1))
    assert torch.equal(s["next"]["obs"], want_next)
    q = buf.sample_sequences(100, 9)
    assert q["obs"].shape == (100, 9, 2)
    starts = q["obs"][:, 0, 0]
    # Windows of 9 rows fit only in the episodes [12, 20] and [22, 33].
    assert set(starts[q["valid"]].long().tolist()) == set([12]) | set(range(22, 26))
    stats = buf.episode_stats()
    assert int(stats["count"]) == 6
    assert float(stats["mean_length"]) == pytest.approx((5 + 1 + 6 + 9 + 1 + 12) / 6)


def test_single_env_done_as_tensor_and_numpy_leaves():
    buf = ReplayBuffer(10, seed=0, reward_key=None)
    buf.add({"obs": np.zeros(3, dtype=np.float32)}, torch.tensor(False))
    buf.add({"obs": np.ones(3, dtype=np.float32)}, np.bool_(True))
    assert buf.storage["obs"].shape == (10, 1, 3)
    assert buf.index.start[:2, 0].tolist() == [0, 1]


def test_nested_leaves_dtypes_and_tensordict():
    tensordict = pytest.importorskip("tensordict")
    n = 5
    buf = ReplayBuffer(40, n, seed=0, done_marks="last", reward_key=None)
    for t in range(6):
        td = tensordict.TensorDict({
            "obs": {"policy": torch.full((n, 4), float(t)),
                    "camera": torch.full((n, 2, 3, 3), t, dtype=torch.uint8)},
            "action": torch.zeros(n, 2, dtype=torch.float16),
        }, batch_size=[n])
        done = torch.full((n,), t == 2)
        # The final obs of a nested next key comes as the same nested structure.
        final = {"policy": torch.full((n, 4), -1.0), "camera": torch.full((n, 2, 3, 3), 200, dtype=torch.uint8)}
        buf.add(td, done, final_obs=final)
    assert set(buf.specs) == {"obs/policy", "obs/camera", "action"}
    s = buf.sample(64)
    assert s["obs"]["camera"].dtype == torch.uint8 and s["obs"]["camera"].shape == (64, 2, 3, 3)
    assert s["action"].dtype == torch.float16
    assert torch.equal(s["obs"]["camera"][:, 0, 0, 0].float(), s["obs"]["policy"][:, 0])
    t = s["obs"]["policy"][:, 0]
    last = t == 2
    assert torch.equal(s["is_last"], last)
    assert torch.equal(s["next"]["obs"]["policy"][:, 0], torch.where(last, -1.0, t + 1))
    assert torch.equal(s["next"]["obs"]["camera"][:, 1, 2, 2].float(), torch.where(last, 200.0, t + 1))
    with pytest.raises(ValueError, match="final_obs: expected keys"):
        buf.add(td, done, final_obs={"policy": torch.zeros(n, 4)})


def test_capacity_rounds_down_to_whole_rows():
    buf = ReplayBuffer(10, 3)
    assert buf.capacity == 9 and buf.rows == 3


def test_final_obs_dropped_from_small_side_table_is_reported():
    # Every lane ends an episode on every row; the side table keeps only the newest 4 finals.
    n = 2
    buf = ReplayBuffer(20, n, done_marks="last", final_obs_capacity=4, seed=0, reward_key=None)
    for t in range(10):
        buf.add({"obs": torch.full((n, 1), float(t))}, torch.ones(n, dtype=torch.bool),
                final_obs=torch.full((n, 1), 100.0 + t))
    s = buf.sample(400)
    t = s["obs"][:, 0]
    # The newest 4 finals belong to rows 8 and 9; row 9 is the newest row, not yet sampleable.
    kept = t == 8
    assert torch.equal(s["next_valid"], kept)
    assert torch.equal(s["next"]["obs"][kept, 0], 100.0 + t[kept])


def test_missing_final_obs_marks_successor_unknown():
    n = 3
    buf = ReplayBuffer(30, n, done_marks="last", seed=0, reward_key=None)
    for t in range(8):
        buf.add({"obs": torch.full((n, 1), float(t))}, torch.full((n,), t == 3))
    s = buf.sample(300)
    last = s["obs"][:, 0] == 3
    assert torch.equal(s["is_last"], last) and torch.equal(s["next_valid"], ~last)
    assert torch.equal(s["terminated"], last) and not s["truncated"].any()


def test_sequences_flags_and_padding_helper():
    buf, lanes = random_run(adds=70, marks="last")
    q = buf.sample_sequences(200, 3)
    assert q["valid"].all()
    firsts = {(n, f) for n, lane in enumerate(lanes) for f, _, _ in lane.episodes}
    lasts = {(n, la) for n, lane in enumerate(lanes) for _, la, _ in lane.episodes}
    lane_ids, rows = q["info"]["lane"].tolist(), q["info"]["row"].tolist()
    want_first = torch.tensor([[(ln[j], r[j]) in firsts for j in range(3)] for ln, r in zip(lane_ids, rows)])
    want_last = torch.tensor([[(ln[j], r[j]) in lasts for j in range(3)] for ln, r in zip(lane_ids, rows)])
    assert torch.equal(q["is_first"], want_first) and torch.equal(q["is_last"], want_last)
    assert want_first[:, 0].any() and want_last[:, -1].any()  # both flags drawn
    assert not want_first[:, 1:].any()  # a window never spans an episode start
    e = buf.sample_episodes(6)
    p = pad_episodes(e)
    cu = e["cu_seqlens"]
    assert p["obs"].shape[:2] == p["mask"].shape and p["mask"].shape[0] == 6
    for b in range(6):
        n = int(e["length"][b])
        assert torch.equal(p["obs"][b, :n], e["obs"][cu[b]:cu[b] + n])
        assert not p["obs"][b, n:].any() and int(p["mask"][b].sum()) == n
    short = pad_episodes(e, max_len=2)
    assert short["obs"].shape[1] == 2


def test_episodes_that_do_not_fit_max_rows_are_dropped_whole():
    buf, lanes = random_run(adds=70)
    e = buf.sample_episodes(50, max_rows=30)
    assert int(e["num_rows"]) <= 30
    cu = e["cu_seqlens"]
    assert torch.equal(cu[1:] - cu[:-1], e["length"])
    assert torch.equal(e["valid"], e["length"] > 0)
    assert int(e["mask"].sum()) == int(e["num_rows"])


def test_episode_rows_default_fits_the_stored_episodes():
    # A single environment of 2**17 slots, episodes of 3..40 rows: the default row budget is
    # B times the longest stored episode rounded up to a power of two (16 * 64), not B * T.
    buf = ReplayBuffer(2**17, seed=0, done_marks="last")
    lengths = [3, 40, 7, 12, 25] * 20
    t = 0
    for length in lengths:
        for i in range(length):
            buf.add({"obs": torch.tensor([float(t)]), "reward": torch.tensor(1.0)}, i == length - 1)
            t += 1
    e = buf.sample_episodes(16)
    assert e["mask"].shape == (16 * 64,) and e["obs"].shape == (16 * 64, 1)
    assert e["valid"].all()                                   # nothing dropped
    assert set(e["length"].tolist()) <= set(lengths)
    # The shape stays fixed while no longer episode arrives, grows when one does, never shrinks.
    buf.add({"obs": torch.tensor([0.0]), "reward": torch.tensor(1.0)}, True)
    assert buf.sample_episodes(16)["mask"].shape == (16 * 64,)
    for i in range(100):
        buf.add({"obs": torch.tensor([0.0]), "reward": torch.tensor(1.0)}, i == 99)
    assert buf.sample_episodes(16)["mask"].shape == (16 * 128,)
    assert buf.sample_episodes(4)["valid"].all()


def test_tight_row_budget_keeps_draws_in_order_until_the_first_that_does_not_fit():
    buf, _ = random_run(adds=90, marks="last")
    for seed_budget in (5, 11, 30, 64):
        e = buf.sample_episodes(40, max_rows=seed_budget)
        valid = e["valid"].tolist()
        # Kept episodes are a prefix of the draws; the first that does not fit ends it.
        k = valid.index(False) if False in valid else len(valid)
        assert valid == [True] * k + [False] * (len(valid) - k)
        assert int(e["length"].sum()) <= seed_budget
        assert int(e["num_rows"]) == int(e["length"].sum())
