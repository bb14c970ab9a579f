"""Shared-memory and disk buffers sampled by DataLoader worker processes.

Every step carries its own address: ``obs = [absolute row, lane]`` and the final observation of
an episode that ends at row t of lane n is ``[FINAL + t, n]``, so a batch can be checked item by
item against its ``index`` whatever process sampled it and whatever was overwritten meanwhile.
"""

from __future__ import annotations

import tempfile
import time

import pytest
import torch
from torch.utils.data import DataLoader

from gpubuffers import BufferDataset, ReplayBuffer

N = 3
FINAL = 10_000


def ends(t: int, lane: int) -> bool:
    """Lane n ends an episode every n + 2 rows."""
    return t % (lane + 2) == lane + 1


def add(buf: ReplayBuffer, t: int) -> None:
    lanes = torch.arange(N)
    done = torch.tensor([ends(t, n) for n in range(N)])
    obs = torch.stack([torch.full((N,), float(t)), lanes.float()], 1)
    final = torch.stack([torch.full((N,), float(FINAL + t)), lanes.float()], 1)
    buf.add({"obs": obs, "reward": torch.ones(N)}, done, final_obs=final)


STORAGES = ["shared", "disk"]


def shared(rows: int = 8, adds: int = 20, final_rows: int = 2, storage: str = "shared", **kw) -> ReplayBuffer:
    if storage == "disk":
        kw.update(path=tempfile.mkdtemp(prefix="gpubuffers-test-"), flush_every=2)
    buf = ReplayBuffer(rows * N, N, done_marks="last", storage=storage, seed=1,
                       final_obs_capacity=final_rows * N, **kw)
    for t in range(adds):
        add(buf, t)
    return buf


def torn_transitions(out: dict) -> torch.Tensor:
    """Items whose data is not that of the transition their index names."""
    row, lane = out["index"] // N, out["index"] % N
    bad = (out["obs"][:, 0] != row) | (out["obs"][:, 1] != lane)
    # The successor of the last row of the item's segment (n-step: n_steps rows from row).
    last = row + out["n_steps"] - 1 if "n_steps" in out else row
    ended = out["terminated"] | out["truncated"]
    inside = out["next_valid"] & ~ended
    final = out["next_valid"] & ended
    nxt = out["next"]["obs"]
    bad |= inside & ((nxt[:, 0] != last + 1) | (nxt[:, 1] != lane))
    bad |= final & ((nxt[:, 0] != FINAL + last) | (nxt[:, 1] != lane))
    return bad


class AddsDuringGather:
    """Ops of a worker's view whose gather first lets the owner add ``k`` rows: the writes a
    concurrent training loop makes while a worker reads, made deterministic."""

    def __init__(self, ops, owner: ReplayBuffer, k: int) -> None:
        self._ops, self._owner, self._k = ops, owner, k

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def gather(self, *args):
        for _ in range(self._k):
            add(self._owner, self._owner.num_adds)
        return self._ops.gather(*args)


@pytest.mark.parametrize("k,storage", [(1, "shared"), (3, "shared"), (7, "shared"), (3, "disk")])
def test_rows_overwritten_during_the_gather_are_marked_invalid(k, storage):
    owner = shared(storage=storage)
    view = owner._reader(seed=5)
    view._ops = AddsDuringGather(view._ops, owner, k)
    out = view._read_batch("transitions", 4096)
    torn = torn_transitions(out)
    row = out["index"] // N
    # The scenario tears items (so the test sees a failure to mark them) ...
    assert torn.any()
    # ... every torn item is marked, and nothing is marked that was not read while overwritten.
    assert not (torn & out["valid"]).any()
    newest = owner.num_adds
    from_ring = ~out["is_last"] | ~out["next_valid"]
    assert out["valid"][from_ring].eq(row[from_ring] >= newest - owner.rows).all()
    # The view's snapshot was taken before the adds: it drew from the rows live then.
    assert int(row.min()) == 20 - owner.rows and int(row.max()) == 20 - 2


@pytest.mark.parametrize("storage", STORAGES)
def test_final_observations_rewritten_during_the_gather_are_marked_invalid(storage):
    # A side table of 2 finals per lane and lanes that end every 2-4 rows: two adds rewrite
    # final observations whose transitions stay live in the ring.
    owner = shared(rows=16, adds=40, final_rows=2, storage=storage)
    view = owner._reader(seed=7)
    view._ops = AddsDuringGather(view._ops, owner, 2)
    out = view._read_batch("transitions", 8192)
    torn = torn_transitions(out)
    row = out["index"] // N
    in_ring = row >= owner.num_adds - owner.rows
    final = out["is_last"] & out["next_valid"]
    assert (torn & in_ring & final).any()       # side-table rows were rewritten under live items
    assert not (torn & out["valid"]).any()
    assert out["valid"][in_ring & ~final].all()  # only those items lost their validity


def test_sequences_and_episodes_overwritten_during_the_gather_are_marked_invalid():
    owner = shared(rows=12, adds=30)
    view = owner._reader(seed=3)
    view._ops = AddsDuringGather(view._ops, owner, 4)
    seq = view._read_batch("sequences", 2048, length=2)
    row, lane = seq["index"] // N, seq["index"] % N
    torn = ((seq["obs"][..., 0] != row) | (seq["obs"][..., 1] != lane)).any(1)
    assert torn.any() and not (torn & seq["valid"]).any()

    owner = shared(rows=12, adds=30)
    view = owner._reader(seed=3)
    view._ops = AddsDuringGather(view._ops, owner, 4)
    eps = view._read_batch("episodes", 512)
    rows = eps["index"] // N
    bad_row = eps["mask"] & (eps["obs"][:, 0] != rows)
    assert not bad_row.any()  # the rows of torn episodes leave the mask
    cu = eps["cu_seqlens"]
    first = torch.where(eps["length"] > 0, eps["index"][cu[:-1].clamp(max=len(rows) - 1)] // N, 10**9)
    overwritten = first <= owner.num_adds - 1 - owner.rows
    assert overwritten.any()
    assert not (eps["valid"] & overwritten).any()
    assert eps["valid"][~overwritten & (eps["length"] > 0)].all()
    assert int(eps["num_rows"]) == int(eps["mask"].sum()) + int(eps["length"][~eps["valid"]].sum())


def test_a_view_draws_its_own_stream_and_refreshes_to_new_rows():
    owner = shared(adds=10)
    a, b, c = owner._reader(seed=1), owner._reader(seed=1), owner._reader(seed=2)
    x, y, z = (v._read_batch("transitions", 64) for v in (a, b, c))
    assert torch.equal(x["index"], y["index"]) and not torch.equal(x["index"], z["index"])
    before = owner._ix.state.clone()
    for t in range(10, 30):
        add(owner, t)
    after = owner._ix.state.clone()
    out = a._read_batch("transitions", 4096)
    assert int((out["index"] // N).max()) == 28 and out["valid"].all()
    # The owner's cursors are its own: views never advance the owner's Philox offset.
    assert torch.equal(after, owner._ix.state) and not torch.equal(before, after)
    with pytest.raises(RuntimeError, match="read-only"):
        add(a, 30)


def _check_batches(batches, kind):
    for out in batches:
        if kind == "transitions":
            assert not (torn_transitions(out) & out["valid"]).any()
        else:
            row, lane = out["index"] // N, out["index"] % N
            ok = out["valid"]
            assert (out["obs"][ok][..., 0] == row[ok]).all() and (out["obs"][ok][..., 1] == lane[ok]).all()
            assert (row[ok][:, 1:] - row[ok][:, :-1] == 1).all()


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core machine
@pytest.mark.parametrize("context,workers", [("fork", 2), ("fork", 4), ("spawn", 2)])
@pytest.mark.parametrize("storage", STORAGES)
def test_workers_sample_the_live_buffer(context, workers, storage):
    owner = shared(rows=64, adds=10, storage=storage)
    ds = BufferDataset(owner, 256, kind="transitions")
    loader = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context=context,
                        generator=torch.Generator().manual_seed(0), prefetch_factor=1)
    newest, batches = [], []
    for i, out in enumerate(loader):
        batches.append(out)
        newest.append(int((out["index"] // N).max()))
        add(owner, owner.num_adds)
        if newest[-1] >= 30 or i > 400:
            break
    _check_batches(batches, "transitions")
    # Adds made after the workers started reach their samples, and the workers' streams differ
    # (the loader takes one batch from each worker in turn).
    assert newest[-1] >= 30
    first = [b["index"] for b in batches[:workers]]
    assert all(not torch.equal(first[i], first[j]) for i in range(workers) for j in range(i))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core machine
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("workers", [2, 4])
def test_workers_split_num_batches_and_repeat_under_a_seeded_loader(storage, workers):
    owner = shared(rows=32, adds=30, storage=storage)
    ds = BufferDataset(owner, 16, kind="sequences", length=3, num_batches=10)

    def run():
        g = torch.Generator().manual_seed(123)
        return list(DataLoader(ds, batch_size=None, num_workers=workers, generator=g))

    first, again = run(), run()
    assert len(first) == len(ds) == 10
    _check_batches(first, "sequences")
    assert all(torch.equal(a["index"], b["index"]) for a, b in zip(first, again))
    # Each worker samples the whole buffer, and the workers' batches differ.
    rows = torch.cat([b["index"][b["valid"]] // N for b in first])
    assert int(rows.min()) <= 2 and int(rows.max()) >= 27
    assert len({tuple(b["index"].flatten().tolist()) for b in first}) == len(first)


def concurrent_reads(kind: str, batches: int, seconds: float, storage: str = "shared", **kw) -> tuple[int, int]:
    """A small ring written as fast as the main process can while two workers read it; every
    batch checked. Returns (items seen, items marked invalid)."""
    owner = shared(rows=6, adds=10, final_rows=2, storage=storage)
    ds = BufferDataset(owner, 512, kind=kind, **kw)
    it = iter(DataLoader(ds, batch_size=None, num_workers=2, prefetch_factor=4))
    seen = invalid = 0
    deadline = time.monotonic() + seconds
    for _ in range(batches):
        for _ in range(25):
            add(owner, owner.num_adds)
        out = next(it)
        _check_batches([out], kind)
        seen += len(out["valid"])
        invalid += int((~out["valid"]).sum())
        if time.monotonic() > deadline:
            break
    return seen, invalid


@pytest.mark.parametrize("storage", STORAGES)
def test_concurrent_adds_never_return_a_torn_item(storage):
    seen, invalid = concurrent_reads("transitions", 60, 20, storage)
    assert seen > 0 and invalid < seen


@pytest.mark.slow
@pytest.mark.parametrize("kind,kw", [("transitions", {}), ("transitions", {"n_step": 3, "gamma": 0.9}),
                                     ("sequences", {"length": 3})])
@pytest.mark.parametrize("storage", STORAGES)
def test_concurrent_adds_never_return_a_torn_item_long(kind, kw, storage):
    seen, invalid = concurrent_reads(kind, 5000, 60, storage, **kw)
    assert seen > 0 and invalid < seen


def test_workers_refusals_name_the_fix():
    mem = ReplayBuffer(8 * N, N, done_marks="last")
    for t in range(5):
        add(mem, t)
    for context in ("fork", "spawn"):
        with pytest.raises(RuntimeError, match="storage='shared'"):
            next(iter(DataLoader(BufferDataset(mem, 4), batch_size=None, num_workers=1,
                                 multiprocessing_context=context)))
    empty = ReplayBuffer(8 * N, N, storage="shared")
    with pytest.raises(RuntimeError, match="first add"):
        next(iter(DataLoader(BufferDataset(empty, 4), batch_size=None, num_workers=1)))
    prio = shared(priority_alpha=0.6)
    with pytest.raises(RuntimeError, match="priority"):
        next(iter(DataLoader(BufferDataset(prio, 4), batch_size=None, num_workers=1)))
    with pytest.raises(ValueError, match="storage: expected one of"):
        ReplayBuffer(8 * N, N, storage="gpu")
    with pytest.raises(ValueError, match="storage='shared' holds CPU tensors"):
        ReplayBuffer(8 * N, N, storage="shared", device="meta")
    cuda_step = ReplayBuffer(8 * N, N, storage="shared")
    with pytest.raises(ValueError, match="storage='shared' holds CPU tensors"):
        cuda_step.add({"obs": torch.zeros(N, 2, device="meta")}, torch.zeros(N, dtype=torch.bool, device="meta"))


def test_shared_storage_is_shared_and_checkpoints_round_trip(tmp_path):
    buf = shared(adds=13)
    tensors = [*buf.storage.values(), buf.index.start, buf.index.end_flags, buf.index.ret,
               buf.index.final_idx, buf.index.fin_head, buf.index.state]
    assert all(t.is_shared() for t in tensors)
    buf.save(tmp_path / "b.gpub")
    back = ReplayBuffer(8 * N, N, done_marks="last", storage="shared", final_obs_capacity=2 * N)
    back.load_state_dict(ReplayBuffer.load(tmp_path / "b.gpub").state_dict())
    again = ReplayBuffer.load(tmp_path / "b.gpub", storage="shared")
    for b in (back, again):
        assert all(t.is_shared() for t in b.storage.values()) and b.storage_kind == "shared"
    assert torch.equal(back.sample(64)["index"], buf.sample(64)["index"])
    assert torch.equal(again.sample(64)["index"], ReplayBuffer.load(tmp_path / "b.gpub").sample(64)["index"])
    out = next(iter(DataLoader(BufferDataset(again, 16), batch_size=None, num_workers=1)))
    assert not (torn_transitions(out) & out["valid"]).any() and out["valid"].all()


def test_shared_allocation_is_checked_against_the_space_in_dev_shm(monkeypatch):
    from types import SimpleNamespace

    from gpubuffers import memory

    monkeypatch.setattr(memory.os, "statvfs", lambda path: SimpleNamespace(f_bavail=10, f_frsize=4096))
    assert memory.free_bytes(torch.device("cpu"), shared=True) == 40960
    assert memory.free_bytes(torch.device("cpu")) is None or memory.free_bytes(torch.device("cpu")) > 40960
    buf = ReplayBuffer(4096 * N, N, storage="shared", done_marks="last")
    with pytest.raises(ValueError, match="40,960 bytes are free"):
        add(buf, 0)
    assert buf.index is None and buf.num_adds == 0


def test_shared_buffer_with_index_tables_on_their_own_mappings_reaches_workers():
    # Index tables of 4 MiB or more are allocated in mappings of their own (memory.host_full)
    # before share_memory_ moves them: a worker must still read the live tables.
    from gpubuffers import memory

    lanes = 64
    buf = ReplayBuffer(memory.HUGE_PAGE_MIN // 8, lanes, storage="shared", done_marks="last",
                       reward_key=None)

    def add(i):
        buf.add({"obs": torch.full((lanes, 2), float(i))}, torch.zeros(lanes, dtype=torch.bool))

    for i in range(10):
        add(i)
    assert buf.index.start.numel() * 8 >= memory.HUGE_PAGE_MIN and buf.index.start.is_shared()
    newest = 0
    loader = DataLoader(BufferDataset(buf, 256, kind="transitions"), batch_size=None, num_workers=1)
    for j, out in enumerate(loader):
        add(buf.num_adds)
        newest = max(newest, int(out["obs"][:, 0].max()))
        if newest >= 30 or j > 300:
            break
    assert newest >= 30  # rows added after the worker started reach its samples
