"""Bad input: a ValueError/TypeError naming the argument, and a buffer left exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch

from gpubuffers import ReplayBuffer

N = 4


def step(t=0, n=N):
    return {"obs": torch.full((n, 3), float(t)), "action": torch.zeros(n, 2), "reward": torch.ones(n)}


def snapshot(buf):
    ix = buf.index
    tensors = {} if ix is None else {k: v.clone() for k, v in vars(ix).items() if isinstance(v, torch.Tensor)}
    tensors.update({f"storage/{k}": v.clone() for k, v in buf.storage.items()})
    gen = None if buf._rng is None else buf._rng.generator.get_state().clone()
    offset = None if buf._rng is None else buf._rng.offset
    return buf.num_adds, buf.device, copy.copy(buf.specs), tensors, gen, offset


def assert_same(before, after):
    assert before[:3] == after[:3] and before[5] == after[5]
    assert before[3].keys() == after[3].keys()
    for k in before[3]:
        assert torch.equal(before[3][k], after[3][k]), k
    assert (before[4] is None) == (after[4] is None)
    if before[4] is not None:
        assert torch.equal(before[4], after[4])


@pytest.fixture
def buf():
    b = ReplayBuffer(8 * N, N, seed=0)
    for t in range(3):
        b.add(step(t), torch.tensor([False, True, False, False]))
    return b


BAD_ADDS = [
    # (description, call kwargs, error type, message fragment)
    ("missing leaf", dict(step={"obs": torch.zeros(N, 3), "reward": torch.ones(N)}, done=torch.zeros(N, dtype=torch.bool)),
     ValueError, "missing ['action']"),
    ("extra leaf", dict(step={**step(), "extra": torch.zeros(N)}, done=torch.zeros(N, dtype=torch.bool)),
     ValueError, "unexpected ['extra']"),
    ("leaf shape", dict(step={**step(), "obs": torch.zeros(N, 4)}, done=torch.zeros(N, dtype=torch.bool)),
     ValueError, "step['obs']: expected shape (4, 3), got (4, 4)"),
    ("lane count", dict(step=step(n=N + 1), done=torch.zeros(N, dtype=torch.bool)),
     ValueError, "expected shape (4, 3), got (5, 3)"),
    ("leaf dtype", dict(step={**step(), "obs": torch.zeros(N, 3, dtype=torch.float64)}, done=torch.zeros(N, dtype=torch.bool)),
     TypeError, "step['obs']: expected dtype torch.float32, got torch.float64"),
    ("leaf device", dict(step={**step(), "obs": torch.zeros(N, 3, device="meta")}, done=torch.zeros(N, dtype=torch.bool)),
     ValueError, "step['obs']: expected a tensor on cpu, got one on meta"),
    ("leaf type", dict(step={**step(), "obs": [[0.0] * 3] * N}, done=torch.zeros(N, dtype=torch.bool)),
     TypeError, "step['obs']: expected a torch.Tensor or numpy array, got list"),
    ("step type", dict(step=[1, 2], done=torch.zeros(N, dtype=torch.bool)),
     TypeError, "step: expected a dict of tensors"),
    ("done shape", dict(step=step(), done=torch.zeros(N + 1, dtype=torch.bool)),
     ValueError, "done: expected shape (4,), got (5,)"),
    ("done dtype", dict(step=step(), done=torch.zeros(N)),
     TypeError, "done: expected a bool (or integer 0/1) tensor, got dtype torch.float32"),
    ("done device", dict(step=step(), done=torch.zeros(N, dtype=torch.bool, device="meta")),
     ValueError, "done: expected a tensor on cpu, got one on meta"),
    ("truncated shape", dict(step=step(), done=torch.zeros(N, dtype=torch.bool), truncated=torch.zeros(2, dtype=torch.bool)),
     ValueError, "truncated: expected shape (4,), got (2,)"),
    ("final_obs shape", dict(step=step(), done=torch.ones(N, dtype=torch.bool), final_obs=torch.zeros(N, 2)),
     ValueError, "final_obs['obs']: expected shape (4, 3), got (4, 2)"),
    ("final_obs keys", dict(step=step(), done=torch.ones(N, dtype=torch.bool), final_obs={"action": torch.zeros(N, 2)}),
     ValueError, "final_obs: expected keys ['obs'], got ['action']"),
]


@pytest.mark.parametrize("desc,kwargs,err,msg", BAD_ADDS, ids=[b[0] for b in BAD_ADDS])
def test_bad_add_leaves_buffer_unchanged(buf, desc, kwargs, err, msg):
    before = snapshot(buf)
    kwargs = dict(kwargs)
    with pytest.raises(err) as info:
        buf.add(kwargs.pop("step"), kwargs.pop("done"), **kwargs)
    assert msg in str(info.value)
    assert_same(before, snapshot(buf))
    buf.add(step(9), torch.zeros(N, dtype=torch.bool))  # still usable
    assert buf.num_adds == 4


@pytest.mark.parametrize("desc,kwargs,err,msg", BAD_ADDS, ids=[b[0] for b in BAD_ADDS])
def test_bad_first_add_allocates_nothing(desc, kwargs, err, msg):
    # The same inputs on an empty buffer; leaf-set and dtype errors cannot arise before a
    # layout exists, but nothing may be allocated whatever is raised.
    b = ReplayBuffer(8 * N, N)
    kwargs = dict(kwargs)
    try:
        b.add(kwargs.pop("step"), kwargs.pop("done"), **kwargs)
    except (ValueError, TypeError):
        assert b.index is None and b.specs is None and b.num_adds == 0 and b.device is None
    else:
        assert desc in ("missing leaf", "extra leaf", "leaf shape", "leaf dtype"), desc


def test_final_obs_rejected_with_next_step():
    b = ReplayBuffer(8 * N, N, autoreset="next_step")
    b.add(step(), torch.zeros(N, dtype=torch.bool))
    before = snapshot(b)
    with pytest.raises(ValueError, match="final_obs: not used with autoreset='next_step'"):
        b.add(step(), torch.ones(N, dtype=torch.bool), final_obs=torch.zeros(N, 3))
    assert_same(before, snapshot(b))


@pytest.mark.parametrize("name", ["next", "is_first", "valid"])
def test_reserved_leaf_names(name):
    b = ReplayBuffer(8, 2)
    with pytest.raises(ValueError, match=f"leaf name '{name}' is reserved"):
        b.add({"obs": torch.zeros(2, 1), name: torch.zeros(2)}, torch.zeros(2, dtype=torch.bool))
    assert b.index is None


def test_next_keys_must_be_leaves():
    b = ReplayBuffer(8, 2, next_keys=("pixels",))
    with pytest.raises(ValueError, match=r"next_keys: \['pixels'\] are not leaves"):
        b.add({"obs": torch.zeros(2, 1)}, torch.zeros(2, dtype=torch.bool))


@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(capacity=0), ValueError, "capacity: expected a positive int, got 0"),
    (dict(capacity=2.5), TypeError, "capacity: expected a positive int, got float"),
    (dict(capacity=7, num_envs=4), ValueError, "capacity: expected at least 2 rows per lane"),
    (dict(capacity=8, num_envs=0), ValueError, "num_envs: expected a positive int, got 0"),
    (dict(capacity=8, done_marks="was_done"), ValueError, "done_marks: expected one of ('first', 'last'), got 'was_done'"),
    (dict(capacity=8, autoreset="never"), ValueError, "autoreset: expected one of"),
    (dict(capacity=8, next_keys="obs"), TypeError, "next_keys: expected a sequence of leaf names"),
    (dict(capacity=8, seed=1.5), TypeError, "seed: expected an int or None, got float"),
    (dict(capacity=8, seed=2**63), ValueError, "seed: expected an int in [-2**63, 2**63) (int64), got 9223372036854775808"),
    (dict(capacity=8, seed=-2**63 - 1), ValueError, "seed: expected an int in [-2**63, 2**63)"),
    (dict(capacity=8, next_keys=None), TypeError, "next_keys: expected a sequence of leaf names (() for none), got None"),
    (dict(capacity=8, next_keys=("obs", "")), TypeError, "next_keys: expected a sequence of leaf names"),
    (dict(capacity=8, reward_key=3), TypeError, "reward_key: expected a leaf name or None, got 3"),
    (dict(capacity=8, backend="cuda"), ValueError, "backend: expected one of ('torch', 'triton') or None, got 'cuda'"),
])
def test_bad_construction(kwargs, err, msg):
    with pytest.raises(err) as info:
        ReplayBuffer(**kwargs)
    assert msg in str(info.value)


def test_sampling_an_empty_buffer():
    b = ReplayBuffer(8 * N, N)
    with pytest.raises(ValueError, match="sample: needs at least 2 live rows.*has 0"):
        b.sample(4)
    with pytest.raises(ValueError, match="length: no window of 2 rows fits in the 0 live rows"):
        b.sample_sequences(4, 2)
    with pytest.raises(ValueError, match="sample_episodes: the buffer is empty"):
        b.sample_episodes(4)
    with pytest.raises(ValueError, match="episode_stats: the buffer is empty"):
        b.episode_stats()
    b.add(step(), torch.zeros(N, dtype=torch.bool))
    with pytest.raises(ValueError, match="sample: needs at least 2 live rows.*has 1"):
        b.sample(4)


@pytest.mark.parametrize("call,err,msg", [
    (lambda b: b.sample(0), ValueError, "batch_size: expected a positive int, got 0"),
    (lambda b: b.sample(-3), ValueError, "batch_size: expected a positive int, got -3"),
    (lambda b: b.sample(2.0), TypeError, "batch_size: expected a positive int, got float"),
    (lambda b: b.sample_sequences(4, 9), ValueError, "length: expected at most T=8 rows per lane, got 9"),
    (lambda b: b.sample_sequences(4, 4), ValueError, "length: no window of 4 rows fits in the 3 live rows"),
    (lambda b: b.sample_sequences(4, 0), ValueError, "length: expected a positive int, got 0"),
    (lambda b: b.sample_episodes(0), ValueError, "batch_size: expected a positive int"),
    (lambda b: b.sample_episodes(2, max_rows=0), ValueError, "max_rows: expected a positive int, got 0"),
    (lambda b: b.sample(10**12), ValueError, "batch_size: expected a positive int of at most 2147483647, got 1000000000000"),
    (lambda b: b.sample_sequences(10**12, 2), ValueError, "batch_size: expected a positive int of at most 2147483647"),
    (lambda b: b.sample_episodes(10**12), ValueError, "batch_size: expected a positive int of at most 2147483647"),
])
def test_bad_sampling_arguments(buf, call, err, msg):
    before = snapshot(buf)
    with pytest.raises(err) as info:
        call(buf)
    assert msg in str(info.value)
    assert_same(before, snapshot(buf))


@pytest.mark.parametrize("seed", [-2**63, 2**63 - 1, -1])
def test_seeds_at_the_int64_bounds_work(seed):
    b = ReplayBuffer(8 * N, N, seed=seed)
    for t in range(3):
        b.add(step(t), torch.zeros(N, dtype=torch.bool))
    b.sample(4), b.sample_sequences(2, 2)


def test_seed_none_leaves_the_global_stream_alone():
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    a, b = ReplayBuffer(8 * N, N), ReplayBuffer(8 * N, N)
    for buf in (a, b):
        for t in range(3):
            buf.add(step(t), torch.zeros(N, dtype=torch.bool))
        buf.sample(8)
    assert torch.equal(torch.rand(4), want)
    assert a._seed != b._seed  # fresh seeds differ


def test_numpy_scalars_are_accepted_where_ints_and_floats_are():
    # Sizes, seeds and discounts often come from numpy-typed configs.
    import numpy as np

    b = ReplayBuffer(np.int64(8 * N), np.int32(N), seed=np.int64(3))
    for t in range(3):
        b.add(step(t), np.zeros(N, dtype=bool))
    assert b.sample(np.int64(5))["obs"].shape == (5, 3)
    assert b.sample_sequences(np.int32(2), np.int64(2))["obs"].shape == (2, 2, 3)
    assert b.sample(4, n_step=np.int64(2), gamma=np.float32(0.9))["return"].dtype == torch.float32
    with pytest.raises(TypeError, match="batch_size: expected a positive int, got bool"):
        b.sample(np.bool_(True))
