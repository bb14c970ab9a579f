"""Disk buffers: memory-mapped files that outlive the process, reopened after a clean close or a
kill, with the cursors (floor, restart) that reopening needs checked kernel against reference.

Every step carries its address: ``obs = [absolute row, lane, generation]`` (a generation is one
writer process), and the final observation of an episode that ends at row t of lane n is
``[FINAL + t, n, generation]``, so whatever survives a kill can be checked item by item.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from compare import assert_identical
from gpubuffers import BufferDataset, ReplayBuffer, reference as ref
from gpubuffers.layout import STATE_FLOOR, STATE_RESTART

N = 3
FINAL = 10_000
MODES = [(m, a) for m in ("first", "last") for a in ("same_step", "next_step")]


def ends(t: int, lane: int) -> bool:
    return t % (lane + 2) == lane + 1


def add(buf: ReplayBuffer, t: int, gen: int = 0) -> None:
    lanes = torch.arange(N).float()
    done = torch.tensor([ends(t, n) for n in range(N)])
    obs = torch.stack([torch.full((N,), float(t)), lanes, torch.full((N,), float(gen))], 1)
    kw = {}
    if buf.autoreset == "same_step":
        kw["final_obs"] = torch.stack([torch.full((N,), float(FINAL + t)), lanes, torch.full((N,), float(gen))], 1)
    buf.add({"obs": obs, "reward": torch.ones(N)}, done, truncated=done & (torch.arange(N) == 1), **kw)


def check_items(buf: ReplayBuffer) -> None:
    """Every sampler's items hold the rows their ids name, successors of the same writer."""
    out = buf.sample(2048, n_step=2, gamma=0.5)
    row, lane = out["index"] // N, out["index"] % N
    obs, nxt = out["obs"], out["next"]["obs"]
    assert (obs[:, 0] == row).all() and (obs[:, 1] == lane).all()
    last = row + out["n_steps"] - 1
    ok = out["next_valid"]
    ended = out["terminated"] | out["truncated"]
    final = ok & ended & (buf.autoreset == "same_step")
    inside = ok & ~final
    late = int(buf.done_marks == "first")  # first mode: the add after an end brings its final obs
    assert (nxt[inside, 0] == last[inside] + 1).all() and (nxt[final, 0] == FINAL + late + last[final]).all()
    assert (nxt[ok, 1] == lane[ok]).all() and (nxt[ok, 2] == obs[ok, 2]).all()
    assert (row >= buf.oldest_row).all() and (row < buf.num_adds - 1).all()
    seq = buf.sample_sequences(512, 3)
    v = seq["valid"]
    assert v.any()
    assert (seq["obs"][v][..., 0] == (seq["index"][v] // N)).all()
    assert (seq["obs"][v][..., 2] == seq["obs"][v][:, :1, 2]).all()  # never across writers
    eps = buf.sample_episodes(16)
    m = eps["mask"]
    assert (eps["obs"][m][:, 0] == (eps["index"][m] // N)).all()


# ---------------------------------------------------------------- kernels against the reference
triton_only = pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="needs triton")


def restarted_index(lanes, rows, adds, more, marks_last, next_step, floor):
    """An index written by the reference for ``adds`` adds, restarted there (as a writable reopen
    leaves it, episodes cut at the last row), then ``more`` adds, with ``floor`` set."""
    from test_kernels import DEVICE, done_at
    g = torch.Generator().manual_seed(adds + 7 * more)
    ix = ref.EpisodeIndex.empty(rows, lanes, torch.device(DEVICE))
    stats = (torch.zeros(rows, 3, dtype=torch.float64, device=DEVICE), torch.zeros(3, dtype=torch.float64, device=DEVICE))
    for t in range(adds + more):
        if t == adds:
            ix.state[STATE_RESTART] = adds
            prev = (adds - 1) % rows
            running = (ix.start[prev] != ref.SENTINEL) & (ix.end_flags[prev] == 0)
            ix.end_flags[prev] = torch.where(running, ref.ENDED | ref.TRUNCATED, ix.end_flags[prev])
        done = done_at("random", t, lanes, g).to(DEVICE)
        ended = ref.add_step(ix, done, None, None, False, torch.randn(lanes, generator=g).to(DEVICE),
                             marks_last, next_step)
        ref.record_ends(ix, *stats, ended, marks_last)
        ref.advance(ix)
    ix.state[STATE_FLOOR] = floor
    return ix


@triton_only
@pytest.mark.parametrize("marks_last,next_step", [(False, False), (True, True), (False, True), (True, False)])
def test_restart_add_step_and_record_ends_match_reference(marks_last, next_step):
    from gpubuffers.kernels import episode_index
    from test_kernels import DEVICE, assert_same, done_at
    lanes, rows = 7, 5
    want = restarted_index(lanes, rows, 9, 0, marks_last, next_step, 0)
    want.state[STATE_RESTART] = 9
    prev = 8 % rows
    want.end_flags[prev] = torch.where(want.start[prev] != ref.SENTINEL, ref.ENDED | ref.TRUNCATED, 0).to(torch.uint8)
    got = ref.EpisodeIndex(**{f: getattr(want, f).clone() for f in ("start", "end_flags", "ret", "final_idx",
                                                                   "fin_head", "state")}, zeros=want.zeros)
    stats = {k: (torch.rand(rows, 3, dtype=torch.float64, device=DEVICE).round(),
                 torch.zeros(3, dtype=torch.float64, device=DEVICE)) for k in ("want", "got")}
    stats["got"] = tuple(t.clone() for t in stats["want"])
    flags_before = want.end_flags[prev].clone()
    g = torch.Generator().manual_seed(3)
    for t in range(4):
        done = done_at("all" if t == 0 else "random", t, lanes, g).to(DEVICE)  # flags at the restart too
        reward = torch.randn(lanes, generator=g).to(DEVICE)
        e_want = ref.add_step(want, done, None, None, False, reward, marks_last, next_step)
        e_got = episode_index.add_step(got.start, got.end_flags, got.ret, got.state, done, None, None, False, reward,
                                       marks_last, next_step)
        assert_same(e_got, e_want, f"ended at add {t}")
        ref.record_ends(want, *stats["want"], e_want, marks_last)
        episode_index.record_ends(*stats["got"], got.start, got.ret, e_got, got.state, marks_last)
        if t == 0:
            assert not e_want.any() if not marks_last else True  # first mode: the restart closes nothing
            assert torch.equal(want.end_flags[prev], flags_before)  # the cut row is left alone
            new = 9 % rows
            assert (want.start[new] == 9).all()  # every lane starts an episode, none a reset row
        ref.advance(want), ref.advance(got)
        for name in ("start", "end_flags", "ret", "state"):
            assert_same(getattr(got, name), getattr(want, name), f"{name} after add {t}")
        assert_same(stats["got"][0][:, :2], stats["want"][0][:, :2], f"stats after add {t}")
        assert torch.allclose(stats["got"][0], stats["want"][0]) and torch.allclose(stats["got"][1], stats["want"][1])


@triton_only
@pytest.mark.parametrize("marks_last,next_step", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("floor", [0, 11])
def test_floor_and_cut_ends_in_samplers_match_reference(marks_last, next_step, floor):
    from gpubuffers.kernels import returns, sampling
    from test_kernels import assert_same
    lanes, rows, adds, more = 7, 8, 13, 4
    ix = restarted_index(lanes, rows, adds, more, marks_last, next_step, floor)
    live, oldest = ref.live_span(ix)
    assert int(oldest) == max(adds + more - rows, floor)
    batch, seed, offset = 300, 99, 5
    tries = 8 if next_step else 1
    proposals = ref.philox_below(seed, offset, (batch, tries), (live - 1) * lanes, ix.start.device)
    want = ref.transitions(ix, proposals, oldest, next_step, 0)
    ix.state[ref.layout.STATE_OFFSET] = offset
    got = sampling.transitions(ix.start, ix.end_flags, ix.final_idx, ix.fin_head, ix.state, seed, batch, tries,
                               next_step, 0)
    for key in ("slot", "row", "succ", "is_first", "is_last", "terminated", "truncated", "next_valid"):
        assert_same(got[key], want[key], key)
    assert (want["row"] >= oldest).all()
    if next_step:
        cut = want["row"] == adds - 1
        assert cut.any() and not want["next_valid"][cut & want["is_last"]].any()
    n = returns.nstep(ix.start, ix.end_flags, ix.final_idx, ix.fin_head, ix.state, want["slot"], want["row"],
                      torch.randn(rows * lanes), 3, 0.9, 0, next_step)
    n_want = ref.nstep(ix, want["slot"], want["row"], torch.randn(rows * lanes), 3, 0.9, 0, next_step)
    for key in ("n_steps", "succ", "is_last", "terminated", "truncated", "next_valid"):
        assert_same(n[key], n_want[key], key)
    length = 3
    proposals = ref.philox_below(seed, offset, (batch, 8), (live - length + 1) * lanes, ix.start.device)
    w_want = ref.windows(ix, proposals, oldest, length)
    w_got = sampling.windows(ix.start, ix.end_flags, ix.state, seed, batch, 8, length)
    for key in ("slots", "is_first", "is_last", "valid"):
        assert_same(w_got[key], w_want[key], key)


# ---------------------------------------------------------------- the buffer
@pytest.mark.parametrize("marks,autoreset", MODES)
def test_a_disk_buffer_equals_a_memory_buffer_and_reopens_whole(tmp_path, marks, autoreset):
    kw = dict(done_marks=marks, autoreset=autoreset, seed=5, final_obs_capacity=4 * N)
    d = ReplayBuffer(16 * N, N, storage="disk", path=tmp_path / "b", flush_every=3, **kw)
    m = ReplayBuffer(16 * N, N, **kw)
    for t in range(100):  # wraps the ring six times
        add(d, t), add(m, t)
    assert_identical(d.state_dict()["tensors"], m.state_dict()["tensors"])
    assert_identical(d.sample(256, n_step=3, gamma=0.9), m.sample(256, n_step=3, gamma=0.9))
    assert_identical(d.sample_episodes(8), m.sample_episodes(8))
    d.close()
    r = ReplayBuffer.open(tmp_path / "b")  # a clean close keeps every live row
    assert (r.num_adds, r.oldest_row, len(r)) == (100, 84, 16 * N)
    # The same rows, index and statistics (the cursors differ: a reopen records its restart).
    skip = ("rng/generator", "index/state")
    assert_identical({k: v for k, v in r.state_dict()["tensors"].items() if k not in skip},
                     {k: v for k, v in m.state_dict()["tensors"].items() if k not in skip})
    assert_identical(r.episode_stats(), m.episode_stats())
    assert [e["index"].tolist() for e in r.episodes()] == [e["index"].tolist() for e in m.episodes()]
    check_items(r)
    with pytest.raises(RuntimeError, match="read-only"):
        add(r, 100)


@pytest.mark.parametrize("marks,autoreset", MODES)
def test_a_writer_that_stops_without_closing_reopens_at_its_last_flush(tmp_path, marks, autoreset):
    rows, flush = 16, 4
    d = ReplayBuffer(rows * N, N, storage="disk", path=tmp_path / "b", flush_every=flush, done_marks=marks,
                     autoreset=autoreset, final_obs_capacity=3 * N)
    for t in range(39):
        add(d, t)
    # Adds 36-38 came after the last flush (at 36); the writer dies without closing.
    d._disk.close()
    r = ReplayBuffer.open(tmp_path / "b")
    assert r.num_adds == 36 and r.oldest_row == 36 + flush - rows  # the rows being reclaimed are gone
    check_items(r)
    w = ReplayBuffer.open(tmp_path / "b", writable=True)
    for t in range(36, 36 + 50):
        add(w, t, gen=1)
    check_items(w)
    eps = list(w.episodes())
    assert all(len(set(e["obs"][:, 2].tolist())) == 1 for e in eps)  # no episode spans the restart
    cut = [e for e in eps if int(e["index"][-1]) // N == 35]
    if cut:
        assert all(e["truncated"] and not e["next_valid"] for e in cut if not ends(35, e["lane"]) or marks == "first")
    w.close()
    again = ReplayBuffer.open(tmp_path / "b")
    assert again.num_adds == 86 and again.oldest_row == 86 - rows
    check_items(again)


def test_inspect_reads_a_disk_buffer_folder(tmp_path):
    import io

    from gpubuffers.__main__ import inspect
    b = ReplayBuffer(16 * N, N, storage="disk", path=tmp_path / "b", done_marks="last")
    m = ReplayBuffer(16 * N, N, done_marks="last")
    for t in range(40):
        add(b, t), add(m, t)
    b.close()
    text = io.StringIO()
    s = inspect(str(tmp_path / "b"), out=text)
    assert s["adds"] == 40 and s["episodes"] == int(m.episode_stats()["count"]) > 0
    assert "40 adds, 16 live rows" in text.getvalue() and "| obs | (3,) | float32 |" in text.getvalue()


def test_errors_name_the_argument_and_change_nothing(tmp_path):
    with pytest.raises(ValueError, match="path: storage='disk' needs"):
        ReplayBuffer(8 * N, N, storage="disk")
    with pytest.raises(ValueError, match="path: only for storage='disk'"):
        ReplayBuffer(8 * N, N, path=tmp_path / "x")
    with pytest.raises(ValueError, match="priority_alpha: a disk buffer is uniform"):
        ReplayBuffer(8 * N, N, storage="disk", path=tmp_path / "x", priority_alpha=0.5)
    with pytest.raises(ValueError, match="flush_every: expected a positive int of at most 4"):
        ReplayBuffer(8 * N, N, storage="disk", path=tmp_path / "x", flush_every=5)
    with pytest.raises(ValueError, match="storage='disk' holds CPU tensors"):
        ReplayBuffer(8 * N, N, storage="disk", path=tmp_path / "x", device="meta")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        ReplayBuffer(8 * N, N, storage="disk", path=tmp_path / "other", overwrite=True)
    with pytest.raises(ValueError, match="holds no gpubuffers disk buffer"):
        ReplayBuffer.open(tmp_path / "other")
    with pytest.raises(ValueError, match="is a file"):
        ReplayBuffer(8 * N, N, storage="disk", path=tmp_path / "other" / "notes.txt")
    b = ReplayBuffer(8 * N, N, storage="disk", path=tmp_path / "b")
    with pytest.raises(ValueError, match="flush: only a storage='disk'"):
        ReplayBuffer(8 * N, N).flush()
    for t in range(5):
        add(b, t)
    with pytest.raises(ValueError, match="already holds a disk buffer"):
        ReplayBuffer(8 * N, N, storage="disk", path=tmp_path / "b")
    with pytest.raises(ValueError, match="another process is adding"):
        ReplayBuffer.open(tmp_path / "b", writable=True)
    before = {k: v.clone() for k, v in b.state_dict()["tensors"].items()}
    with pytest.raises(ValueError, match="step"):
        b.add({"obs": torch.zeros(N, 2), "reward": torch.ones(N)}, torch.zeros(N, dtype=torch.bool))
    assert_identical(b.state_dict()["tensors"], before)
    b.close()
    header = json.loads((tmp_path / "b" / "gpubuffers.json").read_text())
    header["version"] = 99
    (tmp_path / "b" / "gpubuffers.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="version 99.*newer"):
        ReplayBuffer.open(tmp_path / "b")
    header["version"] = 1
    (tmp_path / "b" / "gpubuffers.json").write_text(json.dumps(header))
    os.truncate(tmp_path / "b" / "index-start.bin", 8)
    with pytest.raises(ValueError, match="index-start.bin.*holds 8 bytes"):
        ReplayBuffer.open(tmp_path / "b")
    c = ReplayBuffer(8 * N, N, storage="disk", path=tmp_path / "b", overwrite=True)
    add(c, 0)
    c.close()
    assert ReplayBuffer.open(tmp_path / "b").num_adds == 1


def test_a_mirror_into_a_disk_tier_holds_what_a_direct_add_would(tmp_path):
    tier = ReplayBuffer(40 * N, N, storage="disk", path=tmp_path / "tier", seed=2, final_obs_capacity=8 * N)
    twin = ReplayBuffer(40 * N, N, seed=2, final_obs_capacity=8 * N)
    ring = ReplayBuffer(6 * N, N, mirror=tier, final_obs_capacity=2 * N)
    for t in range(90):
        add(ring, t), add(twin, t)
    assert_identical(tier.state_dict()["tensors"], twin.state_dict()["tensors"])
    tier.close()
    back = ReplayBuffer.open(tmp_path / "tier")
    assert [e["index"].tolist() for e in back.episodes()] == [e["index"].tolist() for e in twin.episodes()]


def test_a_read_only_open_feeds_workers_and_a_writable_one_the_training_loop(tmp_path):
    from torch.utils.data import DataLoader
    b = ReplayBuffer(32 * N, N, storage="disk", path=tmp_path / "b", seed=4)
    for t in range(50):
        add(b, t)
    b.close()
    r = ReplayBuffer.open(tmp_path / "b")
    for context in ("fork", "spawn"):
        loader = DataLoader(BufferDataset(r, 64, kind="sequences", length=4, num_batches=4), batch_size=None,
                            num_workers=2, multiprocessing_context=context, generator=torch.Generator().manual_seed(1))
        batches = list(loader)
        assert len(batches) == 4
        for out in batches:
            v = out["valid"]
            assert v.any() and (out["obs"][v][..., 0] == out["index"][v] // N).all()
            assert ((out["index"][v] // N) >= 50 - 32).all()


def test_a_reader_of_a_folder_still_written_marks_what_the_writer_overwrote(tmp_path):
    w = ReplayBuffer(8 * N, N, storage="disk", path=tmp_path / "b", flush_every=2, seed=3)
    for t in range(20):
        add(w, t)
    r = ReplayBuffer.open(tmp_path / "b")
    assert (r.num_adds, r.oldest_row) == (20, 20 + 2 - 8)
    view = r._reader(seed=1)
    for t in range(20, 25):  # overwrites the slots of rows 12-16
        add(w, t, gen=1)
    out = view._read_batch("transitions", 4096)
    row = out["index"] // N
    torn = (out["obs"][:, 0] != row) | (out["obs"][:, 2] != 0)
    assert torn.any() and not (torn & out["valid"]).any()
    assert torch.equal(out["valid"], row > 25 - 1 - 8)


# ---------------------------------------------------------------- killed writers
WRITER = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_disk import add
from gpubuffers import ReplayBuffer
path, rows, flush, marks, autoreset, gen = {path!r}, {rows}, {flush}, {marks!r}, {autoreset!r}, {gen}
if gen == 0:
    buf = ReplayBuffer(rows * 3, 3, storage="disk", path=path, flush_every=flush, done_marks=marks,
                       autoreset=autoreset, final_obs_capacity=2 * 3)
else:
    buf = ReplayBuffer.open(path, writable=True)
print("ready", buf.num_adds, flush=True)
t = buf.num_adds
while True:
    add(buf, t, gen)
    t += 1
    if buf._flushed_at == t:
        print("flushed", t, flush=True)
"""


def kill_rounds(tmp_path, marks, autoreset, rounds, rows=24, flush=5):
    path = str(tmp_path / "b")
    rng = random.Random(rows + rounds)
    tests = os.path.dirname(__file__)
    for gen in range(rounds):
        code = WRITER.format(tests=tests, path=path, rows=rows, flush=flush, marks=marks, autoreset=autoreset, gen=gen)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().startswith("ready")
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        lines = proc.stdout.read().split()
        proc.wait()
        flushed = [int(x) for x in lines[1::2]] if lines else []
        r = ReplayBuffer.open(path)
        # Every row flushed before the kill is there, but the ones being reclaimed ...
        assert r.num_adds >= (flushed[-1] if flushed else 0)
        if r.num_adds >= rows:
            assert r.live_rows >= rows - flush
        # ... and nothing is torn.
        if r.live_rows >= 4:
            rows_live = torch.arange(r.oldest_row, r.num_adds)
            obs = r.storage["obs"][rows_live % rows]
            assert (obs[..., 0] == rows_live[:, None]).all() and (obs[..., 1] == torch.arange(N)).all()
            check_items(r)


@pytest.mark.parametrize("marks,autoreset", [("last", "same_step"), ("first", "next_step")])
def test_a_writer_killed_at_random_moments_always_reopens_clean(tmp_path, marks, autoreset):
    kill_rounds(tmp_path, marks, autoreset, rounds=2)


@pytest.mark.slow
@pytest.mark.parametrize("marks,autoreset", MODES)
def test_a_writer_killed_at_random_moments_always_reopens_clean_long(tmp_path, marks, autoreset):
    kill_rounds(tmp_path, marks, autoreset, rounds=25, rows=64, flush=7)
