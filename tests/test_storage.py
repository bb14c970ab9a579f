"""Storage dtypes, memory figures and check_finite.

A leaf stored narrower (``storage_dtypes``) must sample exactly as a plain buffer fed the same
values rounded through the storage dtype: every sampler, the next leaves and the final
observations, on both backends (the kernels widen inside the fused gather).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from compare import assert_identical, flat
from gpubuffers import ReplayBuffer, capacity_for
from gpubuffers.steps import NARROWINGS

BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
N = 5
PAIRS = [(a, s) for a, ss in NARROWINGS.items() for s in ss]


def value(dtype, shape, g):
    """Values of ``dtype`` that exercise rounding (floats) or wrapping (integers)."""
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 300).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def run(buf, adds, leaf_dtype, seed, narrow_to=None):
    """Drive ``buf`` with ``adds`` adds (dones, truncations, final observations); a leaf "x" of
    ``leaf_dtype`` is rounded through ``narrow_to`` first when given (the plain twin). Returns
    every sampler's output after the last add."""
    g = torch.Generator().manual_seed(seed)
    same = buf.autoreset == "same_step"
    for a in range(adds):
        x = value(leaf_dtype, (N, 2, 3), g)
        fx = value(leaf_dtype, (N, 2, 3), g)
        if narrow_to is not None:
            x, fx = x.to(narrow_to).to(leaf_dtype), fx.to(narrow_to).to(leaf_dtype)
        done = torch.rand(N, generator=g) < 0.25
        trunc = torch.rand(N, generator=g) < 0.5
        step = {"x": x, "obs": torch.randn(N, 4, generator=g), "reward": torch.randn(N, generator=g)}
        fo = torch.randn(N, 4, generator=g)
        buf.add(step, done, truncated=trunc, final_obs={"x": fx, "obs": fo} if same else None)
    return [buf.sample(20, n_step=2, gamma=0.9), buf.sample_sequences(4, 3), buf.sample_episodes(3, max_rows=40)]


# Every pair on the reference; three through the whole buffer on the kernels (interpreted on the
# CPU: slow), test_kernels widening every pair in the gather alone.
KERNEL_PAIRS = [(torch.float32, torch.bfloat16), (torch.int64, torch.uint8), (torch.float64, torch.float16)]
CASES = [(p, "torch") for p in PAIRS] + ([(p, "triton") for p in KERNEL_PAIRS] if "triton" in BACKENDS else [])


@pytest.mark.parametrize("pair,backend", CASES, ids=lambda v: f"{v[0]}-as-{v[1]}" if isinstance(v, tuple) else v)
def test_narrow_leaf_samples_as_the_rounded_plain_buffer(pair, backend):
    added, stored = pair
    kw = dict(capacity=12 * N, num_envs=N, next_keys=("x", "obs"), seed=3, backend=backend)
    narrow = ReplayBuffer(**kw, storage_dtypes={"x": stored})
    plain = ReplayBuffer(**kw)
    got = run(narrow, 30, added, seed=9)  # wraps the ring (12 rows) twice
    want = run(plain, 30, added, seed=9, narrow_to=stored)
    assert narrow.storage["x"].dtype == stored and narrow.specs["x"].dtype == added
    assert got[0]["x"].dtype == added and got[0]["next"]["x"].dtype == added
    assert_identical(got, want)


def test_narrow_rows_are_read_per_thread_and_returned_in_their_own_memory():
    # Narrow leaves are read into scratch before they are widened: samples drawn from several
    # threads at once each get their own rows, and a batch stays as it was after later draws.
    lanes, rows = 6, 200
    buf = ReplayBuffer(rows * lanes, lanes, seed=0, reward_key=None,
                       storage_dtypes={"obs": torch.bfloat16, "x": torch.float16})
    for r in range(rows + 40):  # wrap the ring; bf16 / f16 hold these integers exactly
        buf.add({"obs": torch.full((lanes, 3), float(r % 200)), "x": torch.full((lanes, 2, 2), float(r % 1000)),
                 "row": torch.full((lanes,), r)}, torch.zeros(lanes, dtype=torch.bool))
    kept = buf.sample(64)
    kept_obs, kept_row = kept["obs"].clone(), kept["row"].clone()
    errors = []

    def draw(batch):
        for _ in range(60):
            s = buf.sample(batch)
            row = s["row"].double()
            ok = (torch.equal(s["obs"], (row % 200)[:, None].expand(-1, 3).float())
                  and torch.equal(s["next"]["obs"], ((row + 1) % 200)[:, None].expand(-1, 3).float())
                  and torch.equal(s["x"], (row % 1000)[:, None, None].expand(-1, 2, 2).float()))
            if not ok:
                errors.append(batch)

    import threading
    threads = [threading.Thread(target=draw, args=(b,)) for b in (64, 64, 97, 300)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.equal(kept["obs"], kept_obs) and torch.equal(kept["row"], kept_row)
    assert torch.equal(kept["obs"], (kept["row"].double() % 200)[:, None].expand(-1, 3).float())


@pytest.mark.parametrize("autoreset", ["same_step", "next_step"])
def test_nested_subtree_narrowed_and_final_obs_rounded(autoreset):
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(8 * N, N, autoreset=autoreset, storage_dtypes={"obs": torch.bfloat16}, seed=0,
                       done_marks="last")
    finals = []
    for a in range(6):
        obs = {"policy": torch.randn(N, 3, generator=g), "critic": torch.randn(N, 5, generator=g)}
        done = torch.tensor([a == 2] + [False] * (N - 1))
        fo = {"policy": torch.randn(N, 3, generator=g), "critic": torch.randn(N, 5, generator=g)}
        finals.append(fo)
        buf.add({"obs": obs, "reward": torch.ones(N)}, done,
                final_obs=fo if autoreset == "same_step" else None)
    assert {p: t.dtype for p, t in buf.storage.items()} == {
        "obs/policy": torch.bfloat16, "obs/critic": torch.bfloat16, "reward": torch.float32}
    s = buf.sample(64)
    assert s["obs"]["policy"].dtype == torch.float32 and s["next"]["obs"]["critic"].dtype == torch.float32
    if autoreset == "same_step":
        # the transition that ended lane 0's episode at row 2 has its final obs as next, rounded
        hit = (s["index"] == 2 * N) & s["next_valid"]
        assert bool(hit.any())
        want = finals[2]["critic"][0].to(torch.bfloat16).float()
        assert torch.equal(s["next"]["obs"]["critic"][hit][0], want)


def test_storage_dtypes_bad_input_is_refused_and_nothing_changes():
    step = {"obs": torch.randn(N, 3), "act": torch.zeros(N, dtype=torch.int64), "flag": torch.zeros(N, dtype=torch.bool),
            "reward": torch.zeros(N)}
    done = torch.zeros(N, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"storage_dtypes: expected a dict"):
        ReplayBuffer(64, N, storage_dtypes=[("obs", torch.float16)])
    with pytest.raises(TypeError, match=r"storage_dtypes\['obs'\]: expected a torch.dtype, got 'bfloat16'"):
        ReplayBuffer(64, N, storage_dtypes={"obs": "bfloat16"})
    with pytest.raises(ValueError, match=r"storage_dtypes\['obs'\]: a leaf can be stored in one of"):
        ReplayBuffer(64, N, storage_dtypes={"obs": torch.float64})
    cases = [({"nope": torch.float16}, r"'nope' names no leaf"),
             ({"obs": torch.int8}, r"added as torch.float32, which can be stored as one of"),
             ({"flag": torch.uint8}, r"added as torch.bool, which can be stored as itself only"),
             ({"act": torch.float16}, r"added as torch.int64"),
             ({"reward": torch.bfloat16}, r"reward_key leaf"),
             ({"obs": torch.float16, "act": torch.int32, "flag": torch.int8}, r"'flag'")]
    for dtypes, msg in cases:
        buf = ReplayBuffer(64, N, storage_dtypes=dtypes)
        with pytest.raises(ValueError, match=msg):
            buf.add(step, done)
        assert buf.num_adds == 0 and buf.specs is None and buf.storage == {}
    nested = ReplayBuffer(64, N, storage_dtypes={"o": torch.float16, "o/a": torch.bfloat16}, next_keys=())
    with pytest.raises(ValueError, match=r"'o/a' is named twice \(by 'o' and 'o/a'\)"):
        nested.add({"o": {"a": torch.zeros(N)}, "reward": torch.zeros(N)}, done)
    # the dtype the leaf is added in is what every later add must bring
    buf = ReplayBuffer(64, N, storage_dtypes={"obs": torch.float16})
    buf.add(step, done)
    with pytest.raises(TypeError, match=r"step\['obs'\]: expected dtype torch.float32, got torch.float16"):
        buf.add(dict(step, obs=step["obs"].half()), done)


def test_integer_narrowing_wraps_outside_the_stored_range_as_documented():
    buf = ReplayBuffer(4 * N, N, storage_dtypes={"a": torch.uint8}, reward_key=None, next_keys=())
    a = torch.tensor([0, 255, 256, -1, 1000])
    buf.add({"a": a}, torch.zeros(N, dtype=torch.bool))
    buf.add({"a": a}, torch.zeros(N, dtype=torch.bool))
    s = buf.sample(50)
    lane = s["index"] % N
    assert torch.equal(s["a"], a.to(torch.uint8).to(torch.int64)[lane])
    assert s["a"].dtype == torch.int64


def test_narrowing_halves_the_leaf_bytes():
    kw = dict(capacity=64 * N, num_envs=N, seed=0)
    step = {"obs": torch.randn(N, 64), "priv": torch.randn(N, 128), "reward": torch.zeros(N)}
    wide, narrow = ReplayBuffer(**kw), ReplayBuffer(**kw, storage_dtypes={"obs": torch.bfloat16, "priv": torch.float16})
    for b in (wide, narrow):
        b.add(step, torch.zeros(N, dtype=torch.bool))
    w, n = wide.nbytes(), narrow.nbytes()
    assert n["leaves"]["obs"] * 2 == w["leaves"]["obs"] and n["leaves"]["priv"] * 2 == w["leaves"]["priv"]
    assert n["leaves"]["reward"] == w["leaves"]["reward"] and n["index"] == w["index"]


# ---------------------------------------------------------------- nbytes and capacity_for
def allocated(buf):
    """Bytes of every tensor the buffer holds, counted from the tensors themselves."""
    seen, total = set(), 0
    ts = list(buf._storage.values()) + list(buf._next_src.values())
    ix = buf._ix
    ts += [ix.start, ix.end_flags, ix.ret, ix.final_idx, ix.fin_head, ix.state, buf._row_stats, buf._stat_totals]
    if buf._tree is not None:
        ts += [buf._tree.leaf, buf._tree.sums, buf._tree.mins, buf._tree.maxp]
    for t in ts:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("prio", [None, 0.6])
@pytest.mark.parametrize("autoreset", ["same_step", "next_step"])
def test_nbytes_counts_what_is_allocated(prio, autoreset):
    buf = ReplayBuffer(40 * N, N, autoreset=autoreset, priority_alpha=prio, storage_dtypes={"obs": torch.bfloat16})
    with pytest.raises(ValueError, match="nbytes: the buffer is empty"):
        buf.nbytes()
    buf.add({"obs": torch.randn(N, 7), "a": torch.zeros(N, 2, dtype=torch.int16), "reward": torch.zeros(N)},
            torch.zeros(N, dtype=torch.bool))
    nb = buf.nbytes()
    stored = sum(nb["leaves"].values()) + nb["index"] + nb["priority"] + nb["stats"]
    assert nb["total"] == stored + nb["scratch"]
    assert stored == allocated(buf)
    assert (nb["priority"] > 0) == (prio is not None)


def example():
    return {"obs": torch.zeros(N, 64), "priv": torch.zeros(N, 128), "action": torch.zeros(N, 12),
            "reward": torch.zeros(N)}


@pytest.mark.parametrize("opts", [{}, {"storage_dtypes": {"obs": torch.bfloat16, "priv": torch.bfloat16}},
                                  {"priority_alpha": 0.6, "autoreset": "next_step"},
                                  {"next_keys": ("obs", "priv"), "final_obs_capacity": 1000}])
def test_capacity_for_is_the_largest_that_fits(opts):
    budget = 3_000_000
    cap = capacity_for(example(), N, budget_bytes=budget, **opts)
    assert cap % N == 0 and cap >= 2 * N
    fits = ReplayBuffer(cap, N, **opts)
    fits.add(example(), torch.zeros(N, dtype=torch.bool))
    assert fits.nbytes()["total"] <= budget
    more = ReplayBuffer(cap + N, N, **opts)
    more.add(example(), torch.zeros(N, dtype=torch.bool))
    assert more.nbytes()["total"] > budget


def test_capacity_for_defaults_and_errors(monkeypatch):
    from gpubuffers import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device, shared=False: 10_000_000)
    cap = capacity_for(example(), N)  # 0.8 of the free memory
    assert cap == capacity_for(example(), N, budget_bytes=8_000_000)
    assert capacity_for(example(), N, fraction=0.4) == capacity_for(example(), N, budget_bytes=4_000_000)
    single = capacity_for({"obs": torch.zeros(64), "reward": torch.zeros(())}, None, budget_bytes=100_000)
    assert single >= 2
    with pytest.raises(ValueError, match=r"budget_bytes: .* holds not even 2 rows"):
        capacity_for(example(), N, budget_bytes=1000)
    with pytest.raises(ValueError, match=r"fraction: expected a float in \(0.0, 1.0\], got 1.5"):
        capacity_for(example(), N, fraction=1.5)
    with pytest.raises(TypeError, match=r"capacity_for: unexpected buffer option 'capacity'"):
        capacity_for(example(), N, budget_bytes=10**6, capacity=10)
    with pytest.raises(ValueError, match=r"storage_dtypes\['obs'\]"):
        capacity_for(example(), N, budget_bytes=10**6, storage_dtypes={"obs": torch.int8})
    for lanes, kind in ((-1, ValueError), (0, ValueError), ("8", TypeError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(kind, match=r"^num_envs: expected a positive int"):
            capacity_for(example(), lanes, budget_bytes=10**6)


def test_capacity_for_stops_at_the_largest_row_count_a_buffer_may_hold():
    # A huge budget and a tiny single-environment step: the answer is bounded by the rows per
    # lane a buffer accepts, and a buffer of that capacity can be built.
    from gpubuffers.layout import MAX_ROWS

    step = {"obs": torch.zeros((), dtype=torch.int8), "reward": torch.zeros(())}
    cap = capacity_for(step, None, budget_bytes=10**15)
    assert cap == MAX_ROWS
    assert ReplayBuffer(cap).rows == MAX_ROWS


def test_allocation_beyond_free_memory_is_refused_before_allocating(monkeypatch):
    from gpubuffers import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device, shared=False: 1_000_000)
    buf = ReplayBuffer(1000 * N, N)
    with pytest.raises(ValueError) as err:
        buf.add(example(), torch.zeros(N, dtype=torch.bool))
    msg = str(err.value)
    assert "1,000,000 bytes are free" in msg and "'priv'" in msg and "capacity_for" in msg
    need = buf.nbytes(example())
    assert f"{need['total'] - need['scratch']:,} bytes asked for" in msg
    assert buf.num_adds == 0 and buf.storage == {}
    monkeypatch.setattr(memory, "free_bytes", lambda device, shared=False: None)  # unknown: allocation decides
    buf.add(example(), torch.zeros(N, dtype=torch.bool))
    assert buf.num_adds == 1


# ---------------------------------------------------------------- check_finite
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_refuses_and_leaves_the_buffer_unchanged(backend):
    g = torch.Generator().manual_seed(1)
    buf = ReplayBuffer(6 * N, N, check_finite=True, storage_dtypes={"obs": torch.float16}, backend=backend, seed=0)
    done = torch.zeros(N, dtype=torch.bool)
    for _ in range(8):
        buf.add({"obs": torch.randn(N, 3, generator=g), "reward": torch.randn(N, generator=g)}, done,
                final_obs=torch.randn(N, 3, generator=g))
    before = {k: v.clone() for k, v in flat(buf.state_dict()["tensors"])}
    bad = torch.randn(N, 3, generator=g)
    bad[1, 2] = math.nan
    bad[3, 0] = -math.inf
    with pytest.raises(ValueError, match=r"step\['obs'\]: holds NaN or Inf at lanes \[1, 3\] \(2 of 5\)"):
        buf.add({"obs": bad, "reward": torch.zeros(N)}, done)
    big = torch.zeros(N, 3)
    big[4] = 1e5
    with pytest.raises(ValueError, match=r"step\['obs'\]: overflows to Inf when stored as torch.float16 at lanes \[4\]"):
        buf.add({"obs": big, "reward": torch.zeros(N)}, done)
    r = torch.zeros(N)
    r[0] = math.nan
    with pytest.raises(ValueError, match=r"step\['reward'\]: holds NaN or Inf at lanes \[0\]"):
        buf.add({"obs": torch.zeros(N, 3), "reward": r}, done)
    with pytest.raises(ValueError, match=r"final_obs\['obs'\]: holds NaN or Inf at lanes \[1, 3\]"):
        buf.add({"obs": torch.zeros(N, 3), "reward": torch.zeros(N)}, done, final_obs=bad)
    after = {k: v for k, v in flat(buf.state_dict()["tensors"])}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert buf.num_adds == 8


def test_nan_is_stored_as_given_by_default():
    buf = ReplayBuffer(4 * N, N, seed=0)
    x = torch.full((N, 2), math.nan)
    x[:, 1] = math.inf
    buf.add({"obs": x, "reward": torch.full((N,), math.nan)}, torch.zeros(N, dtype=torch.bool))
    buf.add({"obs": x, "reward": torch.zeros(N)}, torch.zeros(N, dtype=torch.bool))
    s = buf.sample(8)
    assert s["obs"][:, 0].isnan().all() and s["obs"][:, 1].isposinf().all() and s["reward"].isnan().all()
    with pytest.raises(TypeError, match="check_finite: expected a bool"):
        ReplayBuffer(8, 2, check_finite=1)


def test_checkpoint_keeps_storage_dtypes(tmp_path):
    pytest.importorskip("safetensors")
    buf = ReplayBuffer(6 * N, N, storage_dtypes={"x": torch.bfloat16}, next_keys=("x", "obs"), seed=4)
    run(buf, 9, torch.float32, seed=2)
    path = str(tmp_path / "b.safetensors")
    buf.save(path)
    back = ReplayBuffer.load(path)
    assert back.storage_dtypes == {"x": torch.bfloat16} and back.storage["x"].dtype == torch.bfloat16
    assert_identical(run(back, 5, torch.float32, seed=3), run(buf, 5, torch.float32, seed=3))
    other = ReplayBuffer(6 * N, N, next_keys=("x", "obs"), seed=4)
    with pytest.raises(ValueError, match="saved with storage_dtypes=.*'x': 'bfloat16'.* this buffer has storage_dtypes={}"):
        other.load_state_dict(buf.state_dict())


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def huge_kb_over(t: torch.Tensor) -> int:
    """kB of transparent huge pages (``AnonHugePages`` in /proc/self/smaps) in the mappings that
    hold ``t``'s memory."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                inside = a < hi and lo < b
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


def test_host_full_fills_like_torch_full_in_its_own_memory():
    from gpubuffers import memory

    big = memory.HUGE_PAGE_MIN
    for shape, value, dtype in (((3,), 7, torch.int64), ((big // 8,), -1, torch.int64), ((5, 4), 0, torch.uint8),
                                ((big // 4, 3), 0.5, torch.bfloat16), ((big,), True, torch.bool)):
        t = memory.host_full(shape, value, dtype)
        assert t.dtype == dtype and t.is_contiguous() and torch.equal(t, torch.full(shape, value, dtype=dtype))
        t.fill_(0)  # writable, and held alive by the tensor alone
        assert not t.any()
    full = memory.full((4, 4), 3, torch.int64, torch.device("meta"))
    assert full.device.type == "meta" and full.shape == (4, 4)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_host_full_memory_is_private_to_a_forked_process():
    # A fork-started DataLoader worker writing to its copy must not change the parent's.
    from gpubuffers import memory

    t = memory.host_full((memory.HUGE_PAGE_MIN // 4,), 0, torch.float32)
    pid = os.fork()
    if pid == 0:  # numpy's write: no OpenMP pool in the child
        t.numpy()[:] = 5
        os._exit(0 if t.numpy()[-1] == 5 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and not t.any()


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="needs Linux transparent huge pages on")
def test_cpu_storage_index_and_priorities_sit_on_huge_pages():
    # A ring of 2^20 slots: its storage, episode index and priority leaves are read at random
    # slots, and each is large enough to be advised onto 2 MiB pages before its first write.
    buf = ReplayBuffer(1 << 20, 4096, priority_alpha=0.6)
    buf.add({"obs": torch.randn(4096, 16), "reward": torch.randn(4096)}, terminated=torch.zeros(4096, dtype=torch.bool))
    for t in (buf.storage["obs"], buf._ix.start, buf._tree.leaf):
        assert huge_kb_over(t) >= 2048, t.shape
    # Shared storage is allocated by share_memory_, apart from this path, and still works.
    shared = ReplayBuffer(1 << 16, 64, storage="shared", reward_key=None)
    shared.add({"obs": torch.ones(64, 4)}, terminated=torch.zeros(64, dtype=torch.bool))
    assert shared.storage["obs"].is_shared() and shared.storage["obs"][0].eq(1).all()
