"""add as users call it: devices, autograd inputs, numpy dtypes, termination vs truncation,
reward tracking, and adds that fail halfway (a rejected add leaves the buffer as it was)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpubuffers import ReplayBuffer
from test_validation import assert_same, snapshot

N = 4


def step(t=0, n=N, **extra):
    return {"obs": torch.full((n, 3), float(t)), "action": torch.zeros(n, 2), "reward": torch.ones(n),
            **extra}


def no_done(n=N):
    return torch.zeros(n, dtype=torch.bool)


# ---------------------------------------------------------------- devices
@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu", 0), torch.device("cpu")])
def test_device_named_with_or_without_index(device):
    # CPU tensors report "cpu"; "cpu:0" must accept them (as "cuda" must accept cuda:0 tensors).
    buf = ReplayBuffer(8 * N, N, device=device, seed=0)
    assert buf.device == torch.device("cpu")
    for t in range(3):
        buf.add(step(t), no_done())
    assert buf.sample(4)["obs"].device == torch.device("cpu")


def test_device_that_is_not_available():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the CUDA tests check device='cuda'")
    with pytest.raises(ValueError, match="device: 'cuda' asked for, but no cuda device is available"):
        ReplayBuffer(8, 2, device="cuda")
    with pytest.raises(ValueError, match="device: expected a torch.device or a device string"):
        ReplayBuffer(8, 2, device="gpu-please")


# ---------------------------------------------------------------- autograd
def test_inputs_that_require_grad_are_stored_detached():
    policy = torch.nn.Linear(3, 2)
    value = torch.nn.Linear(3, 1)
    buf = ReplayBuffer(8 * N, N, done_marks="last", seed=0)
    for t in range(6):
        obs = torch.randn(N, 3)
        action = policy(obs)                   # requires grad, as an un-detached policy output
        reward = value(obs).squeeze(-1)        # a reward that requires grad (shape [N])
        buf.add({"obs": obs, "action": action, "reward": reward}, torch.full((N,), t == 3),
                final_obs=obs.requires_grad_(True) * 1.0)
    for t in buf.storage.values():
        assert not t.requires_grad and t.grad_fn is None
    assert not buf.index.ret.requires_grad
    batch = buf.sample(16)
    assert not batch["action"].requires_grad and not batch["next"]["obs"].requires_grad
    # A loss on a sample reaches only the current networks; two backwards in a row work.
    for _ in range(2):
        loss = (policy(batch["obs"]) - batch["action"]).pow(2).mean()
        loss.backward()
    assert float(buf.episode_stats()["count"]) == N


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("np_dtype", [np.uint16, np.uint32, np.uint64, np.int8, np.float16, np.bool_])
def test_numpy_dtypes_are_stored_and_sampled(np_dtype):
    # numpy produces unsigned 16/32/64-bit arrays, whose index_put torch does not implement:
    # the final-obs write and the gather must still handle them.
    buf = ReplayBuffer(8 * N, N, done_marks="last", seed=0, reward_key=None)
    big = np.iinfo(np_dtype).max if np.issubdtype(np_dtype, np.integer) else 1
    for t in range(10):
        obs = np.full((N, 2), t % 2 if np_dtype is np.bool_ else t, dtype=np_dtype)
        obs[:, 1] = big
        final = np.full((N, 2), big, dtype=np_dtype)
        buf.add({"obs": obs}, np.arange(N) == t % N, final_obs=final)
    s = buf.sample(64)
    assert s["obs"].dtype == torch.from_numpy(np.zeros(1, dtype=np_dtype)).dtype
    end = s["is_last"]
    assert bool(end.any())
    want_next = torch.from_numpy(np.full((2,), big, dtype=np_dtype))
    assert all(torch.equal(s["next"]["obs"][i], want_next) for i in range(64) if end[i])
    q = buf.sample_sequences(8, 2)
    assert q["obs"].dtype == s["obs"].dtype


@pytest.mark.parametrize("value,err,msg", [
    (np.array([["a"] * 3] * N), TypeError, "step['obs']: expected a numeric or bool numpy array, got dtype <U1 (str)"),
    (np.zeros((N, 3), dtype=object), TypeError, "step['obs']: expected a numeric or bool numpy array, got dtype object"),
    (np.zeros((N, 3), dtype=np.float32)[::-1], ValueError, "step['obs']: expected a numpy array with non-negative strides"),
    (np.zeros((N, 3), dtype=np.float32)[:, ::-1], ValueError, "np.ascontiguousarray"),
])
def test_numpy_inputs_that_cannot_be_stored(value, err, msg):
    buf = ReplayBuffer(8 * N, N, seed=0)
    buf.add(step(0), no_done())
    before = snapshot(buf)
    with pytest.raises(err) as info:
        buf.add({**step(1), "obs": value}, no_done())
    assert msg in str(info.value)
    assert_same(before, snapshot(buf))
    fresh = ReplayBuffer(8 * N, N)
    with pytest.raises(err):
        fresh.add({**step(1), "obs": value}, no_done())
    assert fresh.index is None and fresh.specs is None


def test_unstorable_dtype_on_first_add():
    buf = ReplayBuffer(8 * N, N)
    x = torch.zeros(N, 2, dtype=torch.complex128)  # 16 bytes: stored as itself
    buf.add(step(0, extra=x), no_done())
    assert buf.storage["extra"].dtype == torch.complex128


# ---------------------------------------------------------------- termination and truncation
@pytest.mark.parametrize("marks", ["first", "last"])
def test_termination_takes_precedence_over_truncation(marks):
    # Lane 0 terminates, lane 1 is truncated, lane 2 both (a terminal state reached on the
    # time limit's step: no bootstrap), lane 3 runs on.
    term = torch.tensor([True, False, True, False])
    trunc = torch.tensor([False, True, True, False])
    buf = ReplayBuffer(8 * N, N, done_marks=marks, seed=0)
    flags = no_done()
    for t in range(4):
        end = t == 1
        if marks == "last":
            buf.add(step(t), terminated=term & end, truncated=trunc & end,
                    final_obs=torch.full((N, 3), -1.0))
        else:
            buf.add(step(t), terminated=term & flags, truncated=trunc & flags,
                    final_obs=torch.full((N, 3), -1.0))
            flags = torch.full((N,), end)
    e = buf.sample_episodes(8)
    ended = {int(lane): (bool(tr)) for lane, tr, v in zip(e["lane"], e["truncated"], e["valid"]) if v}
    assert ended == {0: False, 1: True, 2: False}
    s = buf.sample(256)
    last = s["is_last"]
    lane = s["index"] % N
    assert torch.equal(s["terminated"], last & ((lane == 0) | (lane == 2)))
    assert torch.equal(s["truncated"], last & (lane == 1))


def test_done_and_terminated_together():
    # With done given as well, done says where episodes end; terminated only settles the kind.
    buf = ReplayBuffer(8 * N, N, done_marks="last", seed=0)
    both = torch.tensor([True, True, False, False])
    buf.add(step(0), both, terminated=torch.tensor([True, False, False, False]), truncated=both)
    buf.add(step(1), no_done())
    flags = buf.index.end_flags[0]
    assert flags.tolist() == [1, 3, 0, 0]  # ENDED; ENDED | TRUNCATED


def test_done_or_terminated_is_required():
    buf = ReplayBuffer(8 * N, N)
    with pytest.raises(TypeError, match="done: expected the episode flags"):
        buf.add(step(0))
    assert buf.index is None


# ---------------------------------------------------------------- rewards
def test_reward_key_naming_no_leaf_raises():
    buf = ReplayBuffer(8 * N, N, reward_key="rew")
    with pytest.raises(ValueError, match=r"reward_key: 'rew' names no leaf of the step \(leaves: \['action', 'obs', 'reward'\]\)"):
        buf.add(step(0), no_done())
    assert buf.index is None and buf.specs is None
    default = ReplayBuffer(8 * N, N)
    with pytest.raises(ValueError, match="reward_key=None"):
        default.add({"obs": torch.zeros(N, 3)}, no_done())


def test_vector_reward_raises_and_none_tracks_nothing():
    buf = ReplayBuffer(8 * N, N)
    with pytest.raises(ValueError, match=r"reward_key: the leaf 'reward' has per-lane shape \(3,\)"):
        buf.add({"obs": torch.zeros(N, 3), "reward": torch.zeros(N, 3)}, no_done())
    untracked = ReplayBuffer(8 * N, N, done_marks="last", reward_key=None)
    for t in range(4):
        untracked.add({"obs": torch.zeros(N, 3), "reward": torch.ones(N, 3)}, torch.full((N,), t == 1))
    stats = untracked.episode_stats()
    assert "mean_return" not in stats and int(stats["count"]) == N
    assert "episode_return" not in untracked.sample_episodes(2)


@pytest.mark.parametrize("shape", [(N,), (N, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.bool])
def test_reward_shapes_and_dtypes_are_tracked(shape, dtype):
    buf = ReplayBuffer(8 * N, N, done_marks="last")
    for t in range(3):
        buf.add({"obs": torch.zeros(N, 1), "reward": torch.ones(shape, dtype=dtype)}, torch.full((N,), t == 2))
    assert float(buf.episode_stats()["mean_return"]) == 3.0


# ---------------------------------------------------------------- half-done adds
@pytest.mark.parametrize("free_known", [True, False])
def test_allocation_failure_on_first_add_keeps_nothing(free_known, monkeypatch):
    # 2**40 slots of a 64-float leaf: far beyond any machine. Where the free memory is known the
    # add refuses before allocating; where it is not, the allocator refuses at once.
    from gpubuffers import memory

    if not free_known:
        monkeypatch.setattr(memory, "free_bytes", lambda device, shared=False: None)
    buf = ReplayBuffer(2**40, 2**10, reward_key=None, next_keys=("pix",))
    with pytest.raises(ValueError) as info:
        buf.add({"obs": torch.zeros(2**10, 64), "pix": torch.zeros(2**10, 3, dtype=torch.uint8)},
                torch.zeros(2**10, dtype=torch.bool))
    msg = str(info.value)
    if free_known:
        assert msg.startswith("capacity: 303,903,295,941,688 bytes asked for on cpu") and "bytes are free" in msg
    else:
        assert msg.startswith("capacity: cannot allocate 303,903,295,941,688 bytes on cpu")
    assert "'obs': 281,474,976,710,656 B" in msg and "lower capacity, final_obs_capacity" in msg
    assert buf.index is None and buf.specs is None and buf.device is None and buf.num_adds == 0
    assert buf.storage == {}


def test_rows_per_lane_are_bounded():
    # final_idx keeps 31 bits of a counter that a live slot trails by fewer than T: T < 2**31.
    with pytest.raises(ValueError, match=r"capacity: expected at most 2147483647 rows per lane, got 2147483648"):
        ReplayBuffer(2**31)
    assert ReplayBuffer(2**31 - 1).rows == 2**31 - 1  # nothing allocated before the first add


def test_rejected_add_after_reward_conversion_changes_nothing():
    # Every check of an add runs before the first write: a bad final obs after a reward that
    # requires grad and a numpy leaf leaves storage, index, side table, stats and counters alone.
    buf = ReplayBuffer(8 * N, N, done_marks="last", seed=0)
    for t in range(3):
        buf.add(step(t), torch.full((N,), t == 1), final_obs=torch.zeros(N, 3))
    before = snapshot(buf)
    side = {k: v.clone() for k, v in buf._final.items()}
    stats = (buf._row_stats.clone(), buf._stat_totals.clone())
    bad = {"obs": np.ones((N, 3), dtype=np.float32), "action": torch.zeros(N, 2),
           "reward": torch.ones(N, requires_grad=True)}
    with pytest.raises(ValueError, match=r"final_obs\['obs'\]: expected shape"):
        buf.add(bad, torch.ones(N, dtype=torch.bool), final_obs=torch.zeros(N, 5))
    assert_same(before, snapshot(buf))
    assert all(torch.equal(side[k], buf._final[k]) for k in side)
    assert torch.equal(stats[0], buf._row_stats) and torch.equal(stats[1], buf._stat_totals)
