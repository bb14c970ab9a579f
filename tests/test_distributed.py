"""ShardedReplayBuffer on gloo: 2 and 4 processes on this machine, each check bounded in time.

Every step carries its address: ``obs = [rank, lane, row]``, so an item fetched from another
rank can be checked against the ``rank`` and ``index`` it comes with.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N = 4
#: Chi-square quantiles at 0.999 by degrees of freedom.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 7: 24.322, 11: 31.264, 15: 37.697}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_step(rank: int, t: int, lanes: int = N) -> dict:
    lane = torch.arange(lanes, dtype=torch.float32)
    obs = torch.stack([torch.full((lanes,), float(rank)), lane, torch.full((lanes,), float(t))], 1)
    return {"obs": obs, "reward": rank + 0.1 * lane + 0.01 * t}


def make_done(rank: int, t: int, lanes: int = N) -> torch.Tensor:
    return (torch.arange(lanes) + t + 3 * rank) % 7 == 6


def checks(rank: int, world: int, device: torch.device, tmp: str) -> None:
    from gpubuffers import ReplayBuffer
    from gpubuffers.distributed import ShardedReplayBuffer

    def step(rank, t, lanes=N):
        return {k: v.to(device) for k, v in make_step(rank, t, lanes).items()}

    def done(rank, t, lanes=N):
        return make_done(rank, t, lanes).to(device)

    # Shards of different sizes: rank r holds 10 (r + 1) rows, no episode ends.
    buf = ShardedReplayBuffer(1000 * N, N, seed=5, done_marks="last", device=device)
    plain = ReplayBuffer(1000 * N, N, seed=5 + rank, done_marks="last", device=device)
    for t in range(10 * (rank + 1)):
        buf.add(step(rank, t), torch.zeros(N, dtype=torch.bool, device=device))
        plain.add(step(rank, t), torch.zeros(N, dtype=torch.bool, device=device))
    # Local sampling is the plain buffer's.
    assert torch.equal(buf.sample(64)["obs"], plain.sample(64)["obs"])
    # Global: the exchanged rows are the rows their rank and index name.
    counts = torch.zeros(world, N)
    for _ in range(5):
        out = {k: v.cpu() if isinstance(v, torch.Tensor) else {a: b.cpu() for a, b in v.items()}
               for k, v in buf.sample(2000, scope="global").items()}
        row, lane = out["index"] // N, out["index"] % N
        assert out["obs"].shape == (2000, 3) and out["rank"].shape == (2000,)
        assert torch.equal(out["obs"][:, 0], out["rank"].float())
        assert torch.equal(out["obs"][:, 1], lane.float()) and torch.equal(out["obs"][:, 2], row.float())
        assert torch.equal(out["next"]["obs"][:, 2], row.float() + 1) and out["next_valid"].all()
        counts += torch.zeros(world, N).index_put_((out["rank"], lane), torch.ones(2000), accumulate=True)
    # Uniform over the union: each (rank, lane) cell in proportion to the rank's transitions.
    sizes = torch.tensor([(10 * (r + 1) - 1) * N for r in range(world)], dtype=torch.float64)
    expected = (sizes / sizes.sum() / N)[:, None].expand(world, N) * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < CHI2_999[world * N - 1], (stat, counts)
    # n-step targets pass through.
    out = buf.sample(256, scope="global", n_step=3, gamma=0.5)
    assert {"return", "discount", "n_steps", "rank"} <= out.keys()

    # Prioritized shards: rank r's transitions all have priority r + 1, so global draws favour
    # the higher ranks in that proportion, and weights are normalized over the group.
    alpha, beta = 1.0, 0.5
    pr = ShardedReplayBuffer(64 * N, N, seed=3, done_marks="last", device=device, priority_alpha=alpha)
    for t in range(20):
        pr.add(step(rank, t), torch.zeros(N, dtype=torch.bool, device=device))
    ids = torch.arange(19 * N, device=device)  # every drawable transition of this shard
    pr.update_priorities(ids, torch.full((19 * N,), float(rank + 1), device=device))
    per_rank = torch.zeros(world)
    for _ in range(3):
        out = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in
               pr.sample(2000, scope="global", priority_beta=beta).items()}
        owner = out["rank"]
        assert torch.equal(out["obs"][:, 0], owner.float())
        leaf = (owner.double() + 1 + 1e-6) ** alpha
        want = (leaf / (1 + 1e-6) ** alpha) ** -beta
        assert torch.allclose(out["weight"].double(), want, rtol=1e-5), (out["weight"][:5], want[:5])
        per_rank += torch.bincount(owner, minlength=world)
    share = torch.arange(1, world + 1, dtype=torch.float64)
    expected = share / share.sum() * per_rank.sum()
    stat = float(((per_rank - expected) ** 2 / expected).sum())
    assert world == 1 or stat < CHI2_999[world - 1], (stat, per_rank, expected)
    # Routed updates: each id of a global sample reaches its owner; the largest priority becomes
    # the group's on every rank.
    out = pr.sample(512, scope="global", priority_beta=beta)
    sent = {(int(r), int(i)) for r, i in zip(out["rank"].tolist(), out["index"].tolist())}
    pr.update_priorities(out["index"], torch.full((512,), 50.0 + rank, device=device), rank=out["rank"])
    everyone = [None] * world
    dist.all_gather_object(everyone, sent)
    mine = {i for s_ in everyone for r, i in s_ if r == rank}
    tree = pr.local._tree
    big = {int(k) for k in (tree.leaf[:19 * N] > 40).nonzero().flatten().tolist()}
    assert big == mine, (sorted(big)[:10], sorted(mine)[:10])
    assert float(tree.maxp) == pytest.approx(50.0 + (world - 1) + 1e-6)
    try:
        pr.update_priorities(out["index"], torch.ones(512, device=device),
                             rank=out["rank"] if rank else out["rank"][:3])
    except ValueError as err:
        assert "rank 0" in str(err) and "expected one per index" in str(err), err
    else:
        raise AssertionError("a malformed routed update was not refused on every rank")
    try:
        pr.sample_sequences(8, 2, scope="global")
    except ValueError as err:
        assert "draws its windows with scope='local'" in str(err), err
    else:
        raise AssertionError("prioritized global windows were drawn")
    try:
        pr.sample_episodes(4, scope="global")  # no episode has ended on any rank yet
    except ValueError as err:
        assert "no rank holds a finished episode" in str(err), err
    else:
        raise AssertionError("episodes drawn from shards that hold none")

    # Statistics over the group equal a single buffer fed every rank's rows as its lanes.
    shard = ShardedReplayBuffer(64 * N, N, seed=1, done_marks="last", device=device)
    whole = ReplayBuffer(64 * N * world, N * world, seed=1, done_marks="last", device=device)
    for t in range(40):
        shard.add(step(rank, t), done(rank, t))
        whole.add({"obs": torch.cat([step(r, t)["obs"] for r in range(world)]),
                   "reward": torch.cat([step(r, t)["reward"] for r in range(world)])},
                  torch.cat([done(r, t) for r in range(world)]))
    for last_rows in (None, 9):
        got, want = shard.episode_stats(last_rows, scope="global"), whole.episode_stats(last_rows)
        assert int(got["count"]) == int(want["count"]) > 0
        assert torch.allclose(got["mean_length"], want["mean_length"])
        assert torch.allclose(got["mean_return"], want["mean_return"])
    # Global windows: uniform over every rank's admissible windows. Rank r's episodes last 2 + 2r
    # rows ("last" marks, 40 rows, no wrap), so the ranks' shares of windows of 3 rows differ from
    # their shares of rows (rank 0 has none): drawing owners by rows alone would be biased.
    L = 3

    def seq_done(r, t):
        return torch.full((N,), (t + 1) % (2 + 2 * r) == 0)

    seq = ShardedReplayBuffer(64 * N, N, seed=2, done_marks="last", device=device)
    for t in range(40):
        seq.add(step(rank, t), seq_done(rank, t).to(device))
    admissible = torch.zeros(world)
    for r in range(world):
        ends = torch.stack([seq_done(r, t) for t in range(40)])  # [T, N]
        for t in range(L - 1, 40):
            admissible[r] += int((~ends[t - L + 1:t].any(0)).sum())
    per_rank = torch.zeros(world)
    for _ in range(3):
        win = {k: v.cpu() for k, v in seq.sample_sequences(2000, L, scope="global").items()}
        ok = win["valid"]  # an item is left unfilled only if 32 rounds of proposals all failed
        assert ok.float().mean() > 0.99 and win["rank"].shape == (2000,)
        obs, rows, owner = win["obs"][ok], (win["index"] // N)[ok], win["rank"][ok]
        assert torch.equal(obs[:, :, 0], owner[:, None].float().expand(-1, L))
        assert torch.equal(obs[:, :, 2], rows.float()) and (rows[:, 1:] - rows[:, :-1] == 1).all()
        assert not win["is_first"][ok][:, 1:].any() and not win["is_last"][ok][:, :-1].any()
        per_rank += torch.bincount(owner, minlength=world)
    assert per_rank[0] == 0
    expected = admissible[1:] / admissible.sum() * per_rank.sum()
    stat = float(((per_rank[1:] - expected) ** 2 / expected).sum())
    assert world <= 2 or stat < CHI2_999[world - 2], (stat, per_rank, expected)

    # Global episodes: uniform over every rank's finished episodes (rank r's last 2 + 2r rows),
    # each arriving whole with its owner's rows.
    finished = torch.tensor([N * (40 // (2 + 2 * r)) for r in range(world)], dtype=torch.float64)
    assert int(seq.local.num_episodes) == int(finished[rank])
    per_rank = torch.zeros(world)
    for _ in range(3):
        eps = {k: v.cpu() for k, v in seq.sample_episodes(300, scope="global").items()}
        assert eps["valid"].all() and eps["rank"].shape == (300,)
        length, cu, owner = eps["length"], eps["cu_seqlens"], eps["rank"]
        assert torch.equal(length, 2 + 2 * owner) and int(eps["num_rows"]) == int(length.sum())
        assert eps["mask"].all() and eps["obs"].shape[0] == int(length.sum())
        who = torch.repeat_interleave(owner, length)
        rows = eps["index"] // N
        assert torch.equal(eps["obs"][:, 0], who.float()) and torch.equal(eps["obs"][:, 2], rows.float())
        assert torch.equal(eps["obs"][:, 1], torch.repeat_interleave(eps["lane"], length).float())
        assert torch.equal(eps["is_first"], torch.zeros_like(eps["mask"]).index_fill_(0, cu[:-1], True))
        assert torch.equal(eps["is_last"], torch.zeros_like(eps["mask"]).index_fill_(0, cu[1:] - 1, True))
        step_ = rows[1:] - rows[:-1]
        inside = ~eps["is_first"][1:]
        assert (step_[inside] == 1).all()
        per_rank += torch.bincount(owner, minlength=world)
    expected = finished / finished.sum() * per_rank.sum()
    stat = float(((per_rank - expected) ** 2 / expected).sum())
    assert stat < CHI2_999[world - 1], (stat, per_rank, expected)
    budget = seq.sample_episodes(50, max_rows=60, scope="global")
    assert budget["mask"].shape == (60,) and int(budget["num_rows"]) <= 60
    assert int(budget["length"].sum()) == int(budget["num_rows"]) == int(budget["mask"].sum())
    assert not budget["valid"].all() and (budget["length"][~budget["valid"]] == 0).all()

    local = shard.episode_stats()
    assert int(local["count"]) < int(shard.episode_stats(scope="global")["count"])

    # Per-rank checkpoints: the loaded group continues exactly, global draws included; a layout
    # of another world size is refused on every rank.
    folder = os.path.join(tmp, f"sharded{world}")
    shard.save(folder)
    back = ShardedReplayBuffer.load(folder, device=device)
    for a, b in ((shard.sample(64, scope="global"), back.sample(64, scope="global")),
                 (shard.sample(32), back.sample(32))):
        assert torch.equal(a["obs"], b["obs"]) and torch.equal(a["index"], b["index"])
    assert torch.equal(shard.episode_stats(scope="global")["count"], back.episode_stats(scope="global")["count"])
    dist.barrier()
    if rank == 0:
        with open(os.path.join(folder, "shards.json")) as f:
            saved = json.load(f)
        with open(os.path.join(folder, "shards.json"), "w") as f:
            json.dump({**saved, "world_size": world + 1}, f)
    dist.barrier()
    try:
        ShardedReplayBuffer.load(folder, device=device)
    except ValueError as err:
        assert f"saved by {world + 1} ranks, this group has {world}" in str(err), err
    else:
        raise AssertionError("a checkpoint of another world size was loaded")

    # A rank whose leaves differ makes every rank raise, none hangs.
    odd = ShardedReplayBuffer(16 * N, N, done_marks="last", device=device)
    extra = {"extra": torch.zeros(N, device=device)} if rank == world - 1 else {}
    for t in range(3):
        odd.add({**step(rank, t), **extra}, torch.zeros(N, dtype=torch.bool, device=device))
    try:
        odd.sample(8, scope="global")
    except ValueError as err:
        assert "specs differ" in str(err), err
    else:
        if world > 1:
            raise AssertionError("mismatched leaves were not refused")
    try:
        odd.sample(8, scope="everywhere")
    except ValueError as err:
        assert "scope: expected one of" in str(err)
    else:
        raise AssertionError("bad scope accepted")


def worker(rank: int, world: int, port: int, backend: str, tmp: str, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        checks(rank, world, device, tmp)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world: int, backend: str, tmp: str) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, backend, tmp, errors)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 150
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(f"rank {r}:\n{tb}" for r, tb in found)
    assert not alive, f"{len(alive)} ranks still running after 150 s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_buffer_on_gloo(world, tmp_path):
    spawn(world, "gloo", str(tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_sharded_buffer_on_nccl(tmp_path):
    spawn(min(torch.cuda.device_count(), 4), "nccl", str(tmp_path))
