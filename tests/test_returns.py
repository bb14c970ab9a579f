"""n-step returns: sample(B, n_step=..., gamma=...) against the episode structure itself, the
kernel against the reference, and bad arguments."""

from __future__ import annotations

import os

import pytest
import torch

from compare import interpreted_slow
from gpubuffers import ReplayBuffer, reference as ref
from nosync import NoHostSync
from oracle import build_lanes, feed, obs
from test_validation import assert_same, snapshot

MODES = [(m, a) for m in ("first", "last") for a in ("same_step", "next_step")]
BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def reward(lane, row):
    return float(row % 5) + 0.25 * lane


def expected(lane_list, adds, rows, n_step, gamma, next_step):
    """(lane, row) -> what an n-step sample of that transition must hold, from the episodes."""
    oldest = max(0, adds - rows)
    out = {}
    for n, lane in enumerate(lane_list):
        for first, last, tr in lane.episodes:
            for r in range(max(first, oldest), min(last, adds - 2) + 1):
                end = min(last, adds - 2, r + n_step - 1)
                k = end - r + 1
                ret = sum(gamma ** i * reward(n, r + i) for i in range(k))
                reached = end == last
                if reached:
                    nxt = obs(n, last + 1) if next_step else obs(n, last, final=True)
                else:
                    nxt = obs(n, end + 1)
                term = reached and not tr
                out[(n, r)] = dict(k=k, ret=ret, next=nxt, terminated=term, truncated=reached and tr,
                                   discount=0.0 if term else gamma ** k, first=r == first, last=r == last)
    return out


# Episodes shorter than n, one-step episodes (termination at the first row), truncations, and
# enough adds to wrap the 9-row ring several times (segments cut by the newest rows and the seam).
PLANS = [[(1, False), (4, True), (2, False)], [(7, False), (1, True)], [(3, True), (12, False)],
         [(2, False)], [(5, True), (6, False), (1, False)]]


# Every n on the reference; two on the kernels (interpreted on CPU, slow: each add runs three).
# Interpreted, two of the eight kernel cases stay in the default run (one per convention pair).
CASES = [(m, a, "torch", n, g) for m, a in MODES for n, g in [(1, 0.9), (3, 0.5), (5, 0.97), (9, 1.0)]]
CASES += [(m, a, "triton", n, g) if (m, a, n) in (("first", "same_step", 3), ("last", "next_step", 9))
          else interpreted_slow(m, a, "triton", n, g)
          for m, a in MODES for n, g in [(3, 0.5), (9, 1.0)] if "triton" in BACKENDS]


@pytest.mark.parametrize("marks,autoreset,backend,n_step,gamma", CASES)
def test_nstep_samples_match_the_episodes(marks, autoreset, n_step, gamma, backend):
    rows, adds = 9, 40
    next_step = autoreset == "next_step"
    lanes = build_lanes(PLANS, adds, next_step)
    buf = ReplayBuffer(rows * len(PLANS), len(PLANS), done_marks=marks, autoreset=autoreset, seed=1,
                       final_obs_capacity=rows * len(PLANS), backend=backend)
    feed(buf, lanes, adds, marks == "last", next_step, reward=reward)
    exp = expected(lanes, adds, rows, n_step, gamma, next_step)
    s = buf.sample(2000, n_step=n_step, gamma=gamma)
    cols = {k: s[k].tolist() for k in ("valid", "n_steps", "return", "discount", "terminated", "truncated",
                                       "next_valid", "target_valid", "reward", "is_first", "is_last")}
    lane_row = zip(s["info"]["lane"].tolist(), s["info"]["row"].tolist())
    nexts = s["next"]["obs"].tolist()
    seen = set()
    for i, key in enumerate(lane_row):
        if not cols["valid"][i]:
            continue
        want = exp[key]
        seen.add(key)
        assert cols["n_steps"][i] == want["k"], key
        assert cols["return"][i] == pytest.approx(want["ret"], rel=1e-6), key
        assert cols["discount"][i] == pytest.approx(want["discount"], rel=1e-6), key
        assert nexts[i] == want["next"], key
        assert (cols["terminated"][i], cols["truncated"][i]) == (want["terminated"], want["truncated"]), key
        assert cols["next_valid"][i] and cols["target_valid"][i], key
        assert cols["reward"][i] == pytest.approx(reward(*key)), key  # the one-step leaf as stored
        # is_first / is_last still describe row t itself, not the segment's last row.
        assert (cols["is_first"][i], cols["is_last"][i]) == (want["first"], want["last"]), key
    assert len(seen) > 0.9 * len(exp)  # nearly every transition drawn and checked


@pytest.mark.parametrize("marks,autoreset", MODES)
@pytest.mark.parametrize("alpha", [None, 0.6])
def test_nstep_sample_draws_and_describes_the_first_rows_as_a_plain_sample(marks, autoreset, alpha):
    # Twins with one seed: sample(B, n_step=3, gamma=...) draws the same transitions as
    # sample(B) and keeps what the plain sample says of their first rows.
    rows, adds = 9, 40
    next_step = autoreset == "next_step"
    lanes = build_lanes(PLANS, adds, next_step)
    twins = [ReplayBuffer(rows * len(PLANS), len(PLANS), done_marks=marks, autoreset=autoreset, seed=3,
                          final_obs_capacity=rows * len(PLANS), priority_alpha=alpha) for _ in range(2)]
    for buf in twins:
        feed(buf, lanes, adds, marks == "last", next_step, reward=reward)
    for _ in range(3):
        plain, seg = twins[0].sample(700), twins[1].sample(700, n_step=3, gamma=0.9)
        for key in ("index", "valid", "is_first", "is_last", "obs", "reward") + (("weight",) if alpha else ()):
            assert torch.equal(plain[key], seg[key]), key
        assert torch.equal(plain["info"]["row"], seg["info"]["row"])
        # Every [B] column comes back dense, as the kernels write it (so .view() works on both).
        assert all(v.is_contiguous() for v in seg.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("shape,dtype", [((), torch.float16), ((1,), torch.float32), ((), torch.int32),
                                         ((1,), torch.float64)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nstep_sample_returns_the_reward_leaf_as_a_plain_sample_does(shape, dtype, backend):
    # The CPU path hands back the first rows' rewards from the segments' reads instead of
    # gathering them again: same values, dtype and shape as the plain sample's leaf.
    twins = [ReplayBuffer(40, 4, seed=5, backend=backend) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    for t in range(30):
        step = {"obs": torch.randn(4, 2, generator=g), "reward": (torch.randn(4, *shape, generator=g) * 5).to(dtype)}
        term = torch.rand(4, generator=g) < 0.2
        for buf in twins:
            buf.add(step, terminated=term)
        if t >= 1:
            plain, seg = twins[0].sample(64), twins[1].sample(64, n_step=3, gamma=0.9)
            assert list(plain) == list(seg)[:len(plain)]
            for key in ("reward", "obs", "index"):
                assert seg[key].dtype == plain[key].dtype and torch.equal(seg[key], plain[key]), key
            assert seg["reward"].shape == (64, *shape)


def test_wrap_is_the_remainder_of_slots_below_twice_the_total():
    from gpubuffers.reference.sampling import wrap

    for total in (1, 2, 3, 4096, 255 * 4096 + 17, (1 << 40) + 3):
        h = torch.cat([torch.arange(min(2 * total, 1 << 16)), torch.arange(total - 9, total + 9).clamp(0, 2 * total - 1),
                       torch.randint(0, 2 * total, (4096,), generator=torch.Generator().manual_seed(total % 97))])
        assert torch.equal(wrap(h, total), h % total), total


def test_one_step_returns_are_the_reward():
    buf = ReplayBuffer(64, 4, done_marks="last", seed=0)
    g = torch.Generator().manual_seed(0)
    for t in range(12):
        buf.add({"obs": torch.randn(4, 2, generator=g), "reward": torch.randn(4, generator=g)},
                terminated=torch.rand(4, generator=g) < 0.3, truncated=torch.rand(4, generator=g) < 0.3)
    s = buf.sample(256, gamma=0.99)
    assert torch.equal(s["return"], s["reward"]) and torch.equal(s["n_steps"], torch.ones(256, dtype=torch.int64))
    want = torch.where(s["terminated"], 0.0, torch.tensor(0.99, dtype=torch.float32))
    assert torch.equal(s["discount"], want)


def test_dropped_final_obs_leaves_only_terminations_targetable():
    # No final observations (Isaac Lab's default): a segment reaching a truncation has no known
    # successor, one reaching a termination needs none.
    buf = ReplayBuffer(80, 4, done_marks="last", seed=0)
    for t in range(20):
        buf.add({"obs": torch.full((4, 1), float(t)), "reward": torch.ones(4)},
                terminated=torch.tensor([t % 5 == 4, False, False, False]),
                truncated=torch.tensor([False, t % 5 == 4, False, False]))
    s = buf.sample(2000, n_step=3, gamma=0.9)
    lane = s["index"] % 4
    r = s["obs"][:, 0].long()
    end = r + (4 - r % 5)  # the row that ends r's episode (rows 4, 9, 14, 19)
    reaches_end = (end - r < 3) & (end <= 18)  # within 3 rows, with its successor written
    assert torch.equal(s["terminated"], (lane == 0) & reaches_end)
    assert torch.equal(s["truncated"], (lane == 1) & reaches_end)
    assert torch.equal(s["next_valid"], ~(s["terminated"] | s["truncated"]))
    assert torch.equal(s["target_valid"], ~s["truncated"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_item_that_is_not_valid_has_no_successor_and_no_target(backend):
    """Under next_step with one proposal per item, items that drew a reset row come back
    invalid; neither their successor nor a TD target may be marked usable."""
    buf = ReplayBuffer(40, 2, done_marks="last", autoreset="next_step", max_proposals=1, seed=0, backend=backend)
    for t in range(12):
        buf.add({"obs": torch.full((2, 1), float(t)), "reward": torch.ones(2)},
                terminated=torch.tensor([True, t % 2 == 0]))
    for kw in ({}, {"n_step": 3, "gamma": 0.9}):
        s = buf.sample(200, **kw)
        assert int((~s["valid"]).sum()) >= 20
        assert not s["next_valid"][~s["valid"]].any()
        if kw:
            assert not s["target_valid"][~s["valid"]].any()
            assert torch.equal(s["target_valid"], (s["next_valid"] | s["terminated"]) & s["valid"])


@pytest.mark.parametrize("marks,autoreset", MODES)
def test_nstep_never_syncs(marks, autoreset):
    buf = ReplayBuffer(60, 5, done_marks=marks, autoreset=autoreset, seed=0)
    for t in range(15):
        buf.add({"obs": torch.zeros(5, 2), "reward": torch.ones(5)}, torch.rand(5) < 0.3)
    with NoHostSync():
        buf.sample(64, n_step=4, gamma=0.99)


@pytest.mark.parametrize("call,err,msg", [
    (lambda b: b.sample(4, n_step=3), ValueError, "gamma: n_step=3 needs the discount gamma"),
    (lambda b: b.sample(4, n_step=0, gamma=0.9), ValueError, "n_step: expected a positive int, got 0"),
    (lambda b: b.sample(4, n_step=9, gamma=0.9), ValueError, "n_step: expected a positive int of at most 8, got 9"),
    (lambda b: b.sample(4, n_step=2.0, gamma=0.9), TypeError, "n_step: expected a positive int, got float"),
    (lambda b: b.sample(4, gamma=1.5), ValueError, "gamma: expected a float in [0.0, 1.0], got 1.5"),
    (lambda b: b.sample(4, gamma=True), TypeError, "gamma: expected a float, got bool"),
    (lambda b: b.sample(4, gamma=torch.tensor(0.9)), TypeError, "gamma: expected a float, got Tensor"),
])
def test_bad_nstep_arguments_change_nothing(call, err, msg):
    buf = ReplayBuffer(32, 4, seed=0)
    for t in range(3):
        buf.add({"obs": torch.zeros(4, 2), "reward": torch.ones(4)}, torch.zeros(4, dtype=torch.bool))
    before = snapshot(buf)
    with pytest.raises(err) as info:
        call(buf)
    assert msg in str(info.value)
    assert_same(before, snapshot(buf))


def test_nstep_needs_a_reward():
    buf = ReplayBuffer(32, 4, seed=0, reward_key=None)
    for t in range(3):
        buf.add({"obs": torch.zeros(4, 2)}, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="gamma: n-step returns sum the reward_key leaf"):
        buf.sample(4, n_step=2, gamma=0.9)
    assert "return" not in buf.sample(4)


# ------------------------------------------------------------------------------- kernel vs reference
triton = pytest.importorskip("triton")
from gpubuffers.kernels import returns  # noqa: E402
from test_kernels import DEVICE, MODES as KMODES, assert_same as exact, build, seam_cases, with_finals  # noqa: E402


@pytest.mark.parametrize("lanes", [1, 7, 1023])
@pytest.mark.parametrize("marks_last,next_step", KMODES)
@pytest.mark.parametrize("adds", seam_cases(6))
@pytest.mark.parametrize("n_step", [1, 3, 6])
def test_nstep_kernel_matches_reference(lanes, marks_last, next_step, adds, n_step):
    rows = 6
    ix = build(lanes, rows, adds, marks_last, next_step, seed=adds)
    final_rows = 0 if next_step else 3
    if final_rows:
        with_finals(ix, lanes, rows, final_rows, seed=adds)
    g = torch.Generator().manual_seed(lanes + adds)
    live = min(adds, rows)
    k = torch.randint(0, (live - 1) * lanes, (300,), generator=g).to(DEVICE)
    oldest = adds - live
    slot = (k + oldest * lanes) % (rows * lanes)
    row = k // lanes + oldest
    reward = torch.randn(rows * lanes, generator=g).to(DEVICE)
    want = ref.nstep(ix, slot, row, reward, n_step, 0.93, final_rows, next_step)
    got = returns.nstep(ix.start, ix.end_flags, ix.final_idx, ix.fin_head, ix.state, slot, row, reward, n_step, 0.93,
                        final_rows, next_step)
    for key in ("n_steps", "succ", "is_last", "terminated", "truncated", "next_valid"):
        exact(got[key], want[key], key)
    assert torch.allclose(got["return"], want["return"], rtol=1e-6, atol=1e-6)
    assert torch.allclose(got["discount"], want["discount"], rtol=1e-6, atol=0)
