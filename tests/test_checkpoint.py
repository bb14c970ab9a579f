"""Checkpoints: exact resume (a loaded buffer continues bit for bit as the saved one would have),
half-full buffers write only their rows, damaged and mismatched files are refused."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from compare import assert_identical, interpreted_slow, raw_state, same_raw
from gpubuffers import ReplayBuffer

pytest.importorskip("safetensors")

BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
N = 6


def step(a, g):
    return {"obs": torch.randn(N, 3, generator=g), "action": torch.randint(0, 4, (N,), generator=g).to(torch.uint8),
            "reward": torch.randn(N, generator=g), "info": {"row": torch.full((N,), a)}}


def drive(buf, start, stop, seed):
    """Adds with terminations, truncations and final observations, and every sampler after each;
    returns what the samplers gave."""
    g = torch.Generator().manual_seed(seed * 1000 + start)
    out = []
    for a in range(start, stop):
        done = torch.rand(N, generator=g) < 0.2
        trunc = torch.rand(N, generator=g) < 0.5
        fo = torch.randn(N, 3, generator=g) if buf.autoreset == "same_step" else None
        buf.add(step(a, g), done, truncated=trunc, final_obs=fo)
        if buf.num_adds >= 4:
            prio = {} if buf.priority_alpha is None else {"priority_beta": 0.5}
            s = buf.sample(16, n_step=2, gamma=0.9, **prio)
            out.append(s)
            out.append(buf.sample_sequences(4, 3, **prio))
            out.append(buf.sample_episodes(3, max_rows=24))
            if buf.priority_alpha is not None:
                buf.update_priorities(s["index"], s["return"].abs())
    out.append(buf.episode_stats())
    return out


# Saved before the ring wraps (16 rows) and after; every mix on the reference, two on the kernels
# (interpreted on CPU: slow).
CASES = [("torch", prio, m, a, at) for prio in (None, 0.6) for m, a in (("first", "same_step"), ("last", "next_step"))
         for at in (7, 30)]
if "triton" in BACKENDS:
    CASES += [("triton", None, "first", "same_step", 7), interpreted_slow("triton", 0.6, "last", "next_step", 30)]


@pytest.mark.parametrize("backend,prio,marks,autoreset,saved_at", CASES)
def test_resume_continues_bit_for_bit(tmp_path, backend, prio, marks, autoreset, saved_at):
    kw = dict(capacity=16 * N, num_envs=N, done_marks=marks, autoreset=autoreset, seed=3, backend=backend,
              priority_alpha=prio, final_obs_capacity=3 * N)
    a = ReplayBuffer(**kw)
    drive(a, 0, saved_at, seed=1)
    a.save(tmp_path / "ckpt.safetensors")
    want = drive(a, saved_at, saved_at + 12, seed=2)
    b = ReplayBuffer.load(tmp_path / "ckpt.safetensors")
    assert b.num_adds == saved_at and b._ops.name == a._ops.name
    got = drive(b, saved_at, saved_at + 12, seed=2)
    assert_identical(want, got)
    for p in a.storage:
        assert torch.equal(a.storage[p], b.storage[p])


def test_a_state_with_whole_int64_final_counters_loads(tmp_path):
    # Earlier checkpoints hold final_idx as int64 counters; the index keeps their low 31 bits.
    kw = dict(capacity=8 * N, num_envs=N, done_marks="last", seed=3, backend="torch", final_obs_capacity=3 * N)
    a = ReplayBuffer(**kw)
    drive(a, 0, 30, seed=1)
    sd = a.state_dict()
    wide = {**sd["tensors"], "index/final_idx": sd["tensors"]["index/final_idx"].long()}
    b = ReplayBuffer(**kw)
    b.load_state_dict({"header": sd["header"], "tensors": {k: v.clone() for k, v in wide.items()}})
    assert b.index.final_idx.dtype == torch.int32
    assert_identical(drive(a, 30, 40, seed=2), drive(b, 30, 40, seed=2))


def test_side_tables_travel_without_their_scratch_row_and_older_states_with_it_load():
    kw = dict(capacity=8 * N, num_envs=N, done_marks="last", seed=3, backend="torch", final_obs_capacity=3 * N)
    a = ReplayBuffer(**kw)
    drive(a, 0, 30, seed=1)
    sd = a.state_dict()
    assert sd["tensors"]["final/obs"].shape == (3, N, 3)  # 3 rows per lane; the scratch row stays home
    old = {**sd["tensors"], "final/obs": torch.cat([sd["tensors"]["final/obs"], torch.randn(1, N, 3)])}
    b = ReplayBuffer(**kw)
    b.load_state_dict({"header": sd["header"], "tensors": {k: v.clone() for k, v in old.items()}})
    assert_identical(drive(a, 30, 40, seed=2), drive(b, 30, 40, seed=2))
    c = ReplayBuffer(**kw)
    short = {**sd["tensors"], "final/obs": sd["tensors"]["final/obs"][:2]}
    with pytest.raises(ValueError, match="'final/obs' holds 2 rows, expected 3 rows of the final-observation"):
        c.load_state_dict({"header": sd["header"], "tensors": short})
    assert c.num_adds == 0 and c.index is None


def test_a_half_full_buffer_writes_only_its_rows(tmp_path):
    sizes = {}
    for adds in (4, 8):
        buf = ReplayBuffer(1000 * N, N, seed=0)
        g = torch.Generator().manual_seed(0)
        for a in range(adds):
            buf.add(step(a, g), torch.zeros(N, dtype=torch.bool))
        path = tmp_path / f"{adds}.safetensors"
        buf.save(path)
        sizes[adds] = os.path.getsize(path)
        b = ReplayBuffer.load(path)
        assert torch.equal(b.storage["obs"], buf.storage["obs"]) and b.num_adds == adds
    # 4 more rows of 6 lanes of obs (12 B), action (1), reward (4), info/row (8) and the index
    # (start 8, end flags 1, return 4, final-obs counter 4), and the row statistics (3 x 8); the
    # JSON header's length may move by a few bytes.
    per_row = N * (12 + 1 + 4 + 8 + 8 + 1 + 4 + 4) + 3 * 8
    assert abs(sizes[8] - sizes[4] - 4 * per_row) <= 16
    assert sizes[8] < 0.2 * 1000 * N * (12 + 1 + 4 + 8)  # far less than the 1000 rows' leaves


def saved(tmp_path, adds=5):
    buf = ReplayBuffer(16 * N, N, seed=0)
    g = torch.Generator().manual_seed(0)
    for a in range(adds):
        buf.add(step(a, g), torch.zeros(N, dtype=torch.bool))
    path = tmp_path / "c.safetensors"
    buf.save(path)
    return buf, path


def test_flipped_bits_and_truncation_are_caught(tmp_path):
    _, path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    data[-20] ^= 0x10
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted: the checksum"):
        ReplayBuffer.load(flipped)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable gpubuffers checkpoint"):
        ReplayBuffer.load(cut)


def test_newer_format_and_mismatched_settings_are_refused(tmp_path):
    buf, path = saved(tmp_path)
    sd = buf.state_dict()
    newer = {"header": dict(sd["header"], format=99), "tensors": sd["tensors"]}
    fresh = ReplayBuffer(16 * N, N, seed=0)
    with pytest.raises(ValueError, match="format version 99.*newer gpubuffers"):
        fresh.load_state_dict(newer)
    other = ReplayBuffer(32 * N, N, seed=0)
    with pytest.raises(ValueError, match=f"saved with capacity={16 * N}, this buffer has capacity={32 * N}"):
        other.load_state_dict(sd)
    assert other.specs is None and other.num_adds == 0
    g = torch.Generator().manual_seed(0)
    busy = ReplayBuffer(16 * N, N, seed=0)
    s = step(0, g)
    s["obs"] = torch.zeros(N, 4)
    busy.add(s, torch.zeros(N, dtype=torch.bool))
    with pytest.raises(ValueError, match="saved leaves differ"):
        busy.load_state_dict(sd)
    assert busy.num_adds == 1
    with pytest.raises(ValueError, match="the buffer is empty"):
        ReplayBuffer(16 * N, N).save(tmp_path / "empty.safetensors")


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path, monkeypatch):
    buf, path = saved(tmp_path)
    before = path.read_bytes()
    import safetensors.torch as st

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", crash)
    g = torch.Generator().manual_seed(5)
    buf.add(step(9, g), torch.zeros(N, dtype=torch.bool))
    with pytest.raises(OSError, match="disk full"):
        buf.save(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.safetensors"]
    assert ReplayBuffer.load(path).num_adds == 5


def test_header_is_json_and_nothing_is_unpickled(tmp_path):
    from safetensors import safe_open

    _, path = saved(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["gpubuffers"])
    assert header["format"] == 2 and header["settings"]["capacity"] == 16 * N
    assert header["specs"]["obs"] == {"shape": [3], "dtype": "float32"}
    assert header["counters"]["adds"] == 5


CHILD = r"""
import sys, torch
from gpubuffers import ReplayBuffer
path, n = sys.argv[1], 6
buf = ReplayBuffer(64 * n, n, seed=0, backend="torch")
for a in range(10_000):
    buf.add({"obs": torch.full((n, 256), float(a)), "reward": torch.ones(n), "row": torch.full((n,), a)},
            torch.zeros(n, dtype=torch.bool))
    buf.save(path)
    print(f"saved {a + 1}", flush=True)
"""


def test_a_process_killed_during_save_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that saves after every add, at random moments: what is at the path always
    loads, passes its checksum, is the last save that completed (or the one that completed as the
    kill came, before it could say so) and holds a consistent buffer (rows 0..adds-1 in order)."""
    import random
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "live.safetensors"
    rng = random.Random(0)
    outcomes = []
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saved 1"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        said = [int(line.split()[1]) for line in ["saved 1", *proc.stdout.read().splitlines()]]
        buf = ReplayBuffer.load(path)
        adds = buf.num_adds
        assert adds in (said[-1], said[-1] + 1)
        rows = buf.storage["row"][:, 0]
        live = min(adds, buf.rows)
        ring = [(adds - live + k) % buf.rows for k in range(live)]  # ring rows, oldest first
        for k, r in enumerate(ring):
            assert int(rows[r]) == adds - live + k
        assert torch.equal(buf.storage["obs"][:live, 0, 0].long(), rows[:live])
        outcomes.append(adds)
        # At most the temporary folder of the killed save is left beside it; the next save clears it.
        assert set(os.listdir(tmp_path)) <= {"live.safetensors", f".live.safetensors.{proc.pid}.tmp"}
    print(f"\nkill trials: the checkpoint left held {outcomes} adds; every one loaded and matched")
    assert len(set(outcomes)) > 1  # the kills landed at different points
    buf.save(path)
    assert os.listdir(tmp_path) == ["live.safetensors"]


def test_inspect_reports_a_checkpoint_without_a_buffer(tmp_path):
    import io

    from gpubuffers.__main__ import inspect, main

    buf = ReplayBuffer(16 * N, N, done_marks="last", seed=0)
    g = torch.Generator().manual_seed(0)
    for a in range(40):  # wraps: 16 live rows
        buf.add(step(a, g), torch.rand(N, generator=g) < 0.3)
    path = tmp_path / "c.safetensors"
    buf.save(path)
    text = io.StringIO()
    s = inspect(str(path), out=text)
    stats = buf.episode_stats()
    assert s["adds"] == 40 and s["live_rows"] == 16 and s["episodes"] == int(stats["count"])
    assert abs(s["mean_length"] - float(stats["mean_length"])) < 1e-9
    assert abs(s["mean_return"] - float(stats["mean_return"])) < 1e-6
    assert s["leaves"]["obs"] == ([3], "float32", 16 * N * 3 * 4)
    assert len(s["lengths"]) == int((buf.index.end_flags != 0).sum())
    assert "| obs | (3,) | float32 | 1,152 |" in text.getvalue()
    if importlib.util.find_spec("matplotlib") is not None:
        assert main(["inspect", str(path), "--plot", str(tmp_path / "c.png")]) == 0
        assert (tmp_path / "c.png").stat().st_size > 0


def test_loading_into_a_used_buffer_forgets_its_rows(tmp_path):
    a, path = saved(tmp_path, adds=5)
    b = ReplayBuffer(16 * N, N, seed=0)
    g = torch.Generator().manual_seed(9)
    for k in range(30):  # wrapped: every row holds data
        b.add(step(k, g), torch.rand(N, generator=g) < 0.3)
    b.load_state_dict(ReplayBuffer.load(path).state_dict())
    fresh = ReplayBuffer.load(path)
    for p in fresh.storage:
        assert torch.equal(b.storage[p], fresh.storage[p]), p
    for name in ("start", "end_flags", "ret", "final_idx", "fin_head", "state"):
        assert torch.equal(getattr(b.index, name), getattr(fresh.index, name)), name
    assert b.num_adds == 5 and torch.equal(b.sample_episodes(4, max_rows=16)["valid"],
                                           fresh.sample_episodes(4, max_rows=16)["valid"])


def used(prio=0.6, adds=30, **kw):
    """A buffer with every part a state can hold: priorities, final observations, wrapped."""
    buf = ReplayBuffer(16 * N, N, done_marks="last", seed=3, priority_alpha=prio, final_obs_capacity=3 * N, **kw)
    drive(buf, 0, adds, seed=1)
    return buf


def wrong(sd, drop=(), extra=None, change=None, to=None, header=None, counters=None):
    """A copy of ``sd`` with one thing wrong."""
    tensors = {k: v.clone() for k, v in sd["tensors"].items() if k not in drop}
    if extra:
        tensors[extra] = torch.zeros(1)
    if change:
        tensors[change] = to(tensors[change])
    head = {**sd["header"], **(header or {})}
    if counters:
        head["counters"] = {**head["counters"], **counters}
    return {"header": head, "tensors": tensors}


REFUSED = [
    # (what is wrong, how, error type, message fragment)
    ("a leaf's rows", dict(drop=["storage/obs"]), ValueError, "missing ['storage/obs']"),
    ("the index", dict(drop=["index/start", "index/ret"]), ValueError, "missing ['index/ret', 'index/start']"),
    ("the tree", dict(drop=["tree/leaf"]), ValueError, "missing ['tree/leaf']"),
    ("the side table", dict(drop=["final/obs"]), ValueError, "missing ['final/obs']"),
    ("the generator", dict(drop=["rng/generator"]), ValueError, "missing ['rng/generator']"),
    ("an unknown tensor", dict(extra="storage/nope"), ValueError, "unexpected ['storage/nope']"),
    ("rows", dict(change="storage/obs", to=lambda t: t[:-1]), ValueError,
     "tensors['storage/obs'] must have shape (16, 6, 3) and dtype torch.float32, got (15, 6, 3) torch.float32"),
    ("a leaf's shape", dict(change="storage/obs", to=lambda t: t[..., :2]), ValueError, "got (16, 6, 2)"),
    ("a leaf's dtype", dict(change="storage/obs", to=lambda t: t.double()), ValueError, "got (16, 6, 3) torch.float64"),
    ("the index dtype", dict(change="index/start", to=lambda t: t.int()), ValueError,
     "tensors['index/start'] must have shape (16, 6) and dtype torch.int64"),
    ("the lane count", dict(change="index/fin_head", to=lambda t: t[:-1]), ValueError, "tensors['index/fin_head']"),
    ("the tree's leaves", dict(change="tree/leaf", to=lambda t: t[:-1]), ValueError, "'tree/leaf' holds 95 leaves"),
    ("the tree's sums", dict(change="tree/sums", to=lambda t: t.float()), ValueError, "tensors['tree/sums']"),
    ("the side table's rows", dict(change="final/obs", to=lambda t: t[:1]), ValueError,
     "'final/obs' holds 1 rows, expected 3 rows"),
    ("the generator state", dict(change="rng/generator", to=lambda t: t[:9]), ValueError,
     "'rng/generator' is not a cpu generator state"),
    ("too many counters", dict(change="index/state", to=lambda t: torch.cat([t, t])), ValueError,
     "tensors['index/state'] holds"),
    ("not a tensor", dict(change="stats/totals", to=lambda t: t.tolist()), TypeError,
     "tensors['stats/totals'] must be a torch.Tensor, got list"),
    ("adds", dict(counters={"adds": -1}), ValueError, "counters['adds'] must be an int >= 0, got -1"),
    ("the offset", dict(counters={"rng_offset": "7"}), ValueError, "counters['rng_offset']"),
    ("no counters", dict(header={"counters": None}), ValueError, "the header's 'counters' is missing"),
    ("a leaf's spec", dict(header={"specs": {"obs": {"shape": [3], "dtype": "float99"}}}), ValueError,
     "the spec of leaf 'obs'"),
    ("the seed", dict(header={"settings": None}), ValueError, "the header's 'settings' is missing"),
]


@pytest.mark.parametrize("what,how,error,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_refused_state_leaves_the_buffer_as_it_was(what, how, error, message):
    """Every state that does not fit is refused before anything is written: a used buffer keeps
    every byte and counter, an empty one stays empty (nothing allocated)."""
    sd = used().state_dict()
    bad = wrong(sd, **how)
    busy = used(adds=21)
    before = raw_state(busy)
    with pytest.raises(error, match=__import__("re").escape(message)):
        busy.load_state_dict(bad)
    same_raw(before, raw_state(busy))
    assert busy.num_adds == 21 and busy._floor == 0 and busy.specs is not None
    assert_identical(drive(busy, 21, 25, seed=7), drive(used(adds=21), 21, 25, seed=7))
    empty = ReplayBuffer(16 * N, N, done_marks="last", seed=3, priority_alpha=0.6, final_obs_capacity=3 * N)
    with pytest.raises(error, match=__import__("re").escape(message)):
        empty.load_state_dict(bad)
    assert empty.specs is None and empty.index is None and empty.num_adds == 0 and empty._rng is None
    empty.load_state_dict(sd)  # the right state still loads
    assert_identical(drive(empty, 30, 34, seed=7), drive(used(), 30, 34, seed=7))


def test_a_half_full_buffer_writes_half_of_its_tree_and_side_table(tmp_path):
    """The priority leaves of live slots and the side-table rows that hold entries travel, not
    the whole of either: a buffer saved half full writes about half the bytes of a full one."""
    lanes, rows = 16, 1000
    sizes, parts = {}, {}
    for adds in (rows // 2, rows):
        buf = ReplayBuffer(rows * lanes, lanes, done_marks="last", seed=0, priority_alpha=0.6,
                           final_obs_capacity=rows * lanes // 4)
        g = torch.Generator().manual_seed(0)
        for a in range(adds):
            done = torch.rand(lanes, generator=g) < 0.01
            buf.add({"obs": torch.randn(lanes, 3, generator=g), "reward": torch.randn(lanes, generator=g)},
                    done, final_obs=torch.randn(lanes, 3, generator=g))
        sd = buf.state_dict()
        parts[adds] = {k: v.numel() * v.element_size() for k, v in sd["tensors"].items()}
        assert sd["tensors"]["tree/leaf"].shape == (adds * lanes,)
        written = int(buf.index.fin_head.max())
        assert sd["tensors"]["final/obs"].shape[0] == min(written, rows // 4) > 0
        buf.save(tmp_path / f"{adds}.safetensors")
        sizes[adds] = os.path.getsize(tmp_path / f"{adds}.safetensors")
        back = ReplayBuffer.load(tmp_path / f"{adds}.safetensors")
        same_raw(raw_state(back, scratch=False), raw_state(buf, scratch=False))
    assert parts[rows // 2]["tree/leaf"] * 2 == parts[rows]["tree/leaf"]
    assert parts[rows // 2]["final/obs"] < parts[rows]["final/obs"]
    assert sizes[rows // 2] / sizes[rows] < 0.53


def test_a_format_1_state_with_whole_tables_loads():
    """States of format 1 held the tree's every leaf (and its spare) and the side tables with
    their scratch row: they load and continue exactly."""
    a = used()
    sd = a.state_dict()
    t = dict(sd["tensors"])
    t["tree/leaf"] = torch.cat([t["tree/leaf"], torch.zeros(a._tree.leaf.shape[0] - t["tree/leaf"].shape[0])])
    t["final/obs"] = torch.cat([t["final/obs"], torch.randn(a._final_rows + 1 - t["final/obs"].shape[0], N, 3)])
    b = ReplayBuffer(16 * N, N, done_marks="last", seed=3, priority_alpha=0.6, final_obs_capacity=3 * N)
    b.load_state_dict({"header": {**sd["header"], "format": 1}, "tensors": {k: v.clone() for k, v in t.items()}})
    assert_identical(drive(a, 30, 40, seed=2), drive(b, 30, 40, seed=2))
