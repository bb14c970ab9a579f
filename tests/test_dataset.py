"""BufferDataset through torch.utils.data.DataLoader."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from gpubuffers import BufferDataset, ReplayBuffer

N = 5


def filled(adds=30, seed=0):
    buf = ReplayBuffer(20 * N, N, seed=seed, done_marks="last")
    for t in range(adds):
        add(buf, t)
    return buf


def add(buf, t):
    buf.add({"obs": torch.stack([torch.arange(N).float(), torch.full((N,), float(t))], 1),
             "reward": torch.ones(N)}, torch.full((N,), t % 7 == 6))


@pytest.mark.parametrize("kind,kw", [("transitions", {}), ("sequences", {"length": 4}),
                                     ("episodes", {"max_rows": 64})])
def test_batches_match_direct_sampling(kind, kw):
    a, b = filled(seed=1), filled(seed=1)
    length = kw.pop("length", None)
    ds = BufferDataset(a, 8, kind=kind, length=length, num_batches=3, **kw)
    assert len(ds) == 3
    got = list(DataLoader(ds, batch_size=None))
    assert len(got) == 3
    for batch in got:
        if kind == "transitions":
            want = b.sample(8)
        elif kind == "sequences":
            want = b.sample_sequences(8, length)
        else:
            want = b.sample_episodes(8, **kw)
        assert batch.keys() == want.keys()
        assert torch.equal(batch["obs"], want["obs"])


def test_invariants_and_adds_between_batches_are_seen():
    buf = filled(adds=10)
    ds = BufferDataset(buf, 256, kind="sequences", length=3)
    seen_rows = []
    for i, batch in enumerate(DataLoader(ds, batch_size=None)):
        rows = batch["obs"][..., 1]
        lanes = batch["obs"][..., 0]
        ok = batch["valid"]
        # Each window: one lane, consecutive rows, inside one episode of 7 rows.
        assert (lanes[ok] == lanes[ok][:, :1]).all()
        assert (rows[ok][:, 1:] - rows[ok][:, :-1] == 1).all()
        assert ((rows[ok][:, 0] // 7) == (rows[ok][:, -1] // 7)).all()
        seen_rows.append(int(rows.max()))
        add(buf, 10 + i)
        if i == 5:
            break
    # The newest row that ends a 3-row window inside an episode (episodes are rows 7k..7k+6).
    newest_end = [max(r for r in range(newest + 1) if r % 7 >= 2) for newest in range(9, 15)]
    assert seen_rows == newest_end == [9, 10, 11, 12, 13, 13]


def test_workers_are_refused_with_the_reason():
    ds = BufferDataset(filled(), 4)
    with pytest.raises(RuntimeError, match="num_workers=0"):
        next(iter(DataLoader(ds, batch_size=None, num_workers=1)))


def test_empty_buffer_raises_the_buffer_error():
    ds = BufferDataset(ReplayBuffer(10 * N, N), 4, kind="sequences", length=2)
    with pytest.raises(ValueError, match="no window of 2 rows fits in the 0 live rows"):
        next(iter(ds))


def test_forever_has_no_len_and_bad_arguments():
    ds = BufferDataset(filled(), 4)
    with pytest.raises(TypeError, match="yields forever"):
        len(ds)
    it = iter(ds)
    assert all(next(it)["obs"].shape == (4, 2) for _ in range(50))
    with pytest.raises(ValueError, match="kind: expected one of"):
        BufferDataset(filled(), 4, kind="frames")
    with pytest.raises(ValueError, match="length: kind='sequences' needs"):
        BufferDataset(filled(), 4, kind="sequences")
    with pytest.raises(TypeError, match="buffer: expected a gpubuffers.ReplayBuffer"):
        BufferDataset([], 4)
