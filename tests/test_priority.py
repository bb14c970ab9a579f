"""Prioritized replay: the sum tree against a slow per-transition model, the kernels against the
reference, draws against priority ** alpha, weights against the formula, stale, repeated and
invalid updates, and the hot path without host syncs."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from compare import interpreted_slow
from gpubuffers import ReplayBuffer
from gpubuffers import reference as ref
from gpubuffers.layout import SENTINEL
from gpubuffers.reference import priority as rp
from nosync import NoHostSync

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch"] + (["triton"] if (CUDA or INTERPRET) else [])
MODES = [(m, a) for m in ("first", "last") for a in ("same_step", "next_step")]


class Model:
    """Per-transition priorities in a dict, following the documented rules one call at a time."""

    def __init__(self, lanes: int, rows: int, alpha: float, eps: float):
        self.lanes, self.rows, self.alpha, self.eps = lanes, rows, alpha, eps
        self.prio: dict[int, float] = {}  # transition id -> priority + eps (float32)
        self.maxp = 1.0
        self.adds = 0

    def drawable(self, tid: int, start: torch.Tensor) -> bool:
        oldest = self.adds - min(self.adds, self.rows)
        row, lane = divmod(tid, self.lanes)
        return oldest <= row < self.adds - 1 and int(start[row % self.rows, lane]) != SENTINEL

    def add(self, start: torch.Tensor):
        """After the buffer's add: the row before the new one enters at maxp."""
        self.adds += 1
        for n in range(self.lanes):
            tid = (self.adds - 2) * self.lanes + n
            if self.adds >= 2 and self.drawable(tid, start):
                self.prio[tid] = self.maxp
        gone = (self.adds - self.rows) * self.lanes
        self.prio = {k: v for k, v in self.prio.items() if k >= gone}

    def update(self, ids, prios, start):
        applied = {}
        for tid, p in zip(ids, prios):
            if self.drawable(tid, start) and math.isfinite(p) and p >= 0:
                q = float(torch.tensor(p, dtype=torch.float32) + self.eps)
                applied[tid] = q  # the last one wins
                self.maxp = max(self.maxp, q)
        self.prio.update(applied)

    def leaves(self, start: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.rows * self.lanes, dtype=torch.float32)
        for tid, q in self.prio.items():
            if self.drawable(tid, start):
                out[tid % (self.rows * self.lanes)] = rp.leaf_value(torch.tensor([q]), self.alpha)[0]
        return out


def check_tree(tree: rp.PriorityTree) -> None:
    """Every internal node equals the float64 sum (up to rounding) and the exact min of its
    children; the spare aside, every leaf past the capacity is 0."""
    f = tree.fanout
    below_s = tree.leaf[:-1].double()
    below_m = torch.where(tree.leaf[:-1] > 0, tree.leaf[:-1], math.inf)
    assert not tree.leaf[tree.capacity:-1].any()
    for l in range(1, tree.depth + 1):
        n = tree.sizes[l]
        sums, mins = tree.level(l)
        want_s = below_s[:n * f].view(n, f).sum(1)
        want_m = below_m[:n * f].view(n, f).amin(1)
        assert torch.allclose(sums[:n].cpu(), want_s.cpu(), rtol=1e-12, atol=0), l
        assert torch.equal(mins[:n].cpu(), want_m.cpu()), l
        below_s = torch.cat([sums[:n], sums.new_zeros(-n % f if l < tree.depth else 0)])
        below_m = torch.cat([mins[:n], mins.new_full((-n % f if l < tree.depth else 0,), math.inf)])


def step(n, t, g):
    return {"obs": torch.full((n, 2), float(t)), "reward": torch.randn(n, generator=g),
            "tag": torch.arange(n) + 1000 * t}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("marks,autoreset", MODES)
@pytest.mark.parametrize("lanes,rows", [(1, 5), (7, 4), (33, 3)])  # one lane; N not a power of 2; T=3
def test_tree_follows_the_model_through_many_wraps(backend, marks, autoreset, lanes, rows):
    alpha, eps = 0.6, 1e-6
    buf = ReplayBuffer(lanes * rows, lanes, done_marks=marks, autoreset=autoreset, seed=3, backend=backend,
                       priority_alpha=alpha, priority_eps=eps, device=DEVICE if backend == "triton" else "cpu")
    model = Model(lanes, rows, alpha, eps)
    g = torch.Generator().manual_seed(lanes * rows)
    rnd = random.Random(lanes)
    for t in range(40):  # 40 adds wrap the ring 8 to 13 times
        buf.add(step(lanes, t, g), torch.rand(lanes, generator=g) < 0.3)
        start = buf.index.start.cpu()
        model.add(start)
        if t >= 1 and t % 2:
            s = buf.sample(6)
            ids = s["index"].cpu().tolist()
            oldest = buf.oldest_row * lanes
            # live, stale (overwritten), the newest row, far future, negative; and repeats
            ids += [rnd.randrange(max(0, oldest - 2 * lanes), buf.num_adds * lanes + lanes) for _ in range(8)]
            ids += [-1, 10**12, ids[0], ids[0]]
            prios = [rnd.choice([0.0, 0.25, 1.5, 7.0, rnd.random() * 4]) for _ in ids]
            prios[1:4] = [float("nan"), -1.0, float("inf")] if len(prios) > 4 else prios[1:4]
            buf.update_priorities(torch.tensor(ids), torch.tensor(prios))
            model.update(ids, prios, start)
        got = buf._tree.leaf[:lanes * rows].cpu()
        want = model.leaves(start)
        assert torch.equal(got > 0, want > 0), t
        assert torch.allclose(got, want, rtol=1e-6, atol=0), t
        assert torch.isclose(buf._tree.maxp.cpu(), torch.tensor([model.maxp])).all(), t
        check_tree(buf._tree)


def _tree_with(capacity, lanes, fanout, leaves):
    tree = rp.PriorityTree.empty(capacity, lanes, 1.0, 1e-6, torch.device(DEVICE), fanout=fanout)
    tree.leaf[:capacity] = leaves.to(DEVICE)
    rp.refresh(tree, torch.arange(0, capacity, device=DEVICE))
    return tree


@pytest.mark.parametrize("fanout", [4, 32])
@pytest.mark.parametrize("capacity", [2, 97, 4096 + 3])  # root only; 2 levels; padded leaves
def test_refresh_rewrites_only_what_it_must(fanout, capacity):
    g = torch.Generator().manual_seed(capacity)
    leaves = torch.rand(capacity, generator=g) * (torch.rand(capacity, generator=g) < 0.7)
    tree = _tree_with(capacity, 1, fanout, leaves)
    check_tree(tree)
    assert torch.isclose(tree.total.cpu(), leaves.double().sum())
    # Change a few leaves, refresh only above them (repeats included): the tree is whole again.
    slots = torch.randint(0, capacity, (5,), generator=g)
    tree.leaf[slots.to(DEVICE)] = 0.5
    rp.refresh(tree, torch.cat([slots, slots]).to(DEVICE))
    check_tree(tree)
    # Runs: consecutive slots refreshed from their first slot.
    tree.leaf[:min(capacity, 9)] = 2.0
    rp.refresh_runs(tree, torch.tensor([0], device=DEVICE), min(capacity, 9))
    check_tree(tree)


def test_descent_reaches_a_tiny_slot_among_huge_ones_and_never_an_empty_one():
    """float64 sums: a slot of eps ** alpha next to slots a billion times larger keeps its share."""
    cap = 4096
    leaves = torch.full((cap,), 1e6)
    leaves[1234] = 1e-6 ** 0.6
    leaves[1000:1100] = 0.0  # not drawable
    tree = _tree_with(cap, 1, 32, leaves)
    before = leaves[:1234].double().sum()
    x = torch.tensor([before + leaves[1234].double() / 2, before + leaves[1234].double() * 0.99,
                      before + leaves[1234].double() * 0.01], dtype=torch.float64, device=DEVICE)
    for flat in range(1, tree.depth + 1):
        assert rp.descend(tree, x, flat=flat).tolist() == [1234, 1234, 1234]
    # Masses at or past the total (rounding) land on the last slot with mass, never an empty one.
    leaves[-5:] = 0.0
    tree = _tree_with(cap, 1, 32, leaves)
    end = torch.tensor([float(tree.total) * (1 + 1e-15), float(tree.total)], dtype=torch.float64,
                       device=DEVICE)
    for flat in range(1, tree.depth + 1):
        assert rp.descend(tree, end, flat=flat).tolist() == [cap - 6, cap - 6]
    # Every stratified draw over the whole mass lands on a drawable slot.
    u = torch.rand(20000, dtype=torch.float64, device=DEVICE)
    got = rp.descend(tree, rp.stratified(tree, u))
    assert (tree.leaf[got] > 0).all()


if CUDA or INTERPRET:
    import triton
    import triton.language as tl

    from gpubuffers.kernels import priority as kp

    @triton.jit
    def _probe_descent(out_ptr, x_ptr, leaf_ptr, sums_ptr, offs_ptr, n, DEPTH: tl.constexpr,
                       F: tl.constexpr, BLOCK_: tl.constexpr):
        i = tl.arange(0, BLOCK_)
        mask = i < n
        x = tl.load(x_ptr + i, mask=mask, other=0.0)
        tl.store(out_ptr + i, kp._descend(leaf_ptr, sums_ptr, offs_ptr, x, mask, DEPTH, F, BLOCK_), mask=mask)


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs the Triton interpreter or CUDA")
def test_kernel_descent_reaches_a_tiny_slot():
    cap = 4096
    leaves = torch.full((cap,), 1e6)
    leaves[1234] = 1e-6 ** 0.6
    leaves[1000:1100] = 0.0
    leaves[-5:] = 0.0
    tree = _tree_with(cap, 1, 32, leaves)
    before = leaves[:1234].double().sum()
    x = torch.tensor([before + leaves[1234].double() / 2, before + leaves[1234].double() * 0.01,
                      float(tree.total) * (1 + 1e-15),
                      float(tree.total)], dtype=torch.float64, device=DEVICE)
    out = torch.empty(4, dtype=torch.int64, device=DEVICE)
    _probe_descent[(1,)](out, x, tree.leaf, tree.sums, kp._offsets(tree), 4, DEPTH=tree.depth, F=32, BLOCK_=4)
    assert out.tolist() == [1234, 1234, cap - 6, cap - 6]


def chi_square_bound(dof: int, z: float = 4.0) -> float:
    """Upper tail of chi-square(dof) at about z standard deviations (Wilson-Hilferty)."""
    k = 2.0 / (9.0 * dof)
    return dof * (1 - k + z * math.sqrt(k)) ** 3


@pytest.mark.parametrize("backend", [b if b == "torch" else interpreted_slow(b) for b in BACKENDS])
def test_draws_follow_priority_to_the_alpha(backend):
    lanes, rows, alpha = 8, 40, 0.7
    buf = ReplayBuffer(lanes * rows, lanes, seed=5, backend=backend, priority_alpha=alpha,
                       device=DEVICE if backend == "triton" else "cpu")
    g = torch.Generator().manual_seed(0)
    for t in range(rows + 13):  # wrapped: 39 drawable rows, 312 slots
        buf.add(step(lanes, t, g), torch.rand(lanes, generator=g) < 0.1)
    live = torch.arange(buf.oldest_row * lanes, (buf.num_adds - 1) * lanes)
    prio = torch.rand(live.shape[0], generator=g) * 10
    prio[::17] = 0.0  # zero priorities stay drawable (eps)
    buf.update_priorities(live, prio)
    counts = torch.zeros(live.shape[0])
    draws = 0
    for _ in range(40 if backend == "torch" or CUDA else 8):
        s = buf.sample(1024)
        assert s["valid"].all()
        counts += torch.bincount(s["index"].cpu() - live[0], minlength=live.shape[0]).float()
        draws += 1024
    p = (prio.double() + 1e-6) ** alpha
    expected = p / p.sum() * draws
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < chi_square_bound(live.shape[0] - 1), stat
    # Importance weights: (N P(i)) ** -beta over the largest, that of the smallest priority.
    s = buf.sample(256, priority_beta=0.5)
    pi = p[s["index"].cpu() - live[0]]
    want = (pi / p.min()) ** -0.5
    assert torch.allclose(s["weight"].cpu().double(), want, rtol=1e-5)
    assert (s["weight"] <= 1).all() and s["weight"].dtype == torch.float32


@pytest.mark.parametrize("backend", [b if b == "torch" else interpreted_slow(b) for b in BACKENDS])
def test_windows_are_proportional_among_admissible_windows(backend):
    lanes, rows, length = 4, 30, 3
    buf = ReplayBuffer(lanes * rows, lanes, seed=8, backend=backend, priority_alpha=1.0, max_proposals=8,
                       device=DEVICE if backend == "triton" else "cpu")
    g = torch.Generator().manual_seed(1)
    for t in range(rows + 7):
        buf.add(step(lanes, t, g), torch.rand(lanes, generator=g) < 0.15)
    live = torch.arange(buf.oldest_row * lanes, (buf.num_adds - 1) * lanes)
    prio = torch.rand(live.shape[0], generator=g) * 5 + 0.1
    buf.update_priorities(live, prio)
    start = buf.index.start.cpu()
    newest = buf.num_adds - 1
    ok = torch.tensor([(tid // lanes + length - 1 <= newest)
                       and int(start[(tid // lanes + length - 1) % rows, tid % lanes]) <= tid // lanes
                       for tid in live.tolist()])
    counts = torch.zeros(live.shape[0])
    for _ in range(30 if backend == "torch" or CUDA else 6):
        s = buf.sample_sequences(512, length)
        valid = s["valid"].cpu()
        assert valid.float().mean() > 0.98  # 8 proposals, most windows admissible
        first = s["index"][:, 0].cpu()
        assert torch.equal(s["index"].cpu(), first[:, None] + lanes * torch.arange(length))
        tag = s["tag"].cpu()
        assert torch.equal(s["index"].cpu(), tag // 1000 * lanes + tag % 1000)  # the rows are the ids' rows
        # The first admissible of i.i.d. proportional proposals is proportional among admissible
        # windows; an item with none admissible is marked invalid and left out.
        counts += torch.bincount(first[valid] - live[0], minlength=live.shape[0]).float()
    assert counts[~ok].sum() == 0
    p = (prio.double() + 1e-6) * ok
    expected = (p / p.sum() * counts.sum())[ok]
    stat = float(((counts[ok] - expected) ** 2 / expected).sum())
    assert stat < chi_square_bound(int(ok.sum()) - 1), stat


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autoreset", ["same_step", "next_step"])
def test_never_draws_the_newest_row_unwritten_slots_or_reset_rows(backend, autoreset):
    lanes, rows = 5, 50
    buf = ReplayBuffer(lanes * rows, lanes, seed=2, backend=backend, priority_alpha=0.5, autoreset=autoreset,
                       device=DEVICE if backend == "triton" else "cpu")
    g = torch.Generator().manual_seed(2)
    for t in range(12):  # not wrapped: most slots never written
        buf.add(step(lanes, t, g), torch.rand(lanes, generator=g) < 0.3)
        if t >= 1:
            s = buf.sample(300 if backend == "torch" or CUDA else 100)
            rows_drawn = s["index"] // lanes
            assert (rows_drawn < t).all() and (rows_drawn >= 0).all()
            assert torch.equal(s["obs"][:, 0].long(), rows_drawn)
            slot = s["index"] % buf.capacity
            assert s["valid"].all()
            assert (buf.index.start.view(-1)[slot] != SENTINEL).all()
            assert (s["valid"] == (buf._tree.leaf[slot] > 0)).all()


@pytest.mark.parametrize("autoreset", ["same_step", "next_step"])
def test_nothing_drawable_yet_gives_invalid_items_on_both_backends(autoreset):
    # One add (the newest row is never drawable), or under next_step a newest episode row after a
    # reset row: the tree holds no mass; every sampler returns valid=False and weight 0, and the
    # reference lands on the same slot as the kernel.
    outs = {}
    for backend in BACKENDS:
        buf = ReplayBuffer(2, 1, seed=0, backend=backend, priority_alpha=0.7, autoreset=autoreset,
                           done_marks="last", device=DEVICE if backend == "triton" else "cpu")
        buf.add({"obs": torch.zeros(1, 2), "reward": torch.ones(1)}, torch.tensor([autoreset == "next_step"]))
        got = [buf.sample_sequences(3, 1)]
        if autoreset == "next_step":  # row 0 ends an episode, row 1 is its reset row, row 2 a new one
            buf.add({"obs": torch.ones(1, 2), "reward": torch.ones(1)}, torch.tensor([False]))
            buf.add({"obs": torch.ones(1, 2), "reward": torch.ones(1)}, torch.tensor([False]))
            got.append(buf.sample(4))
        assert float(buf._tree.total) == 0.0
        for s in got:
            assert not s["valid"].any() and (s["weight"] == 0).all()
        outs[backend] = [{k: v.cpu() for k, v in s.items() if isinstance(v, torch.Tensor)} for s in got]
    if len(outs) == 2:
        for a, b in zip(outs["torch"], outs["triton"]):
            for k in a:
                assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_updates_are_ignored_after_the_ring_wraps(backend):
    lanes, rows = 3, 6
    buf = ReplayBuffer(lanes * rows, lanes, seed=4, backend=backend, priority_alpha=0.6,
                       device=DEVICE if backend == "triton" else "cpu")
    g = torch.Generator().manual_seed(4)
    for t in range(8):
        buf.add(step(lanes, t, g), torch.zeros(lanes, dtype=torch.bool))
    s = buf.sample(32)
    for t in range(8, 8 + rows):  # every sampled row is overwritten
        buf.add(step(lanes, t, g), torch.zeros(lanes, dtype=torch.bool))
    before = [buf._tree.leaf.clone(), buf._tree.sums.clone(), buf._tree.mins.clone(), buf._tree.maxp.clone()]
    buf.update_priorities(s["index"], torch.full((32,), 100.0))
    after = [buf._tree.leaf, buf._tree.sums, buf._tree.mins, buf._tree.maxp]
    assert all(torch.equal(a[:-1] if i == 0 else a, b[:-1] if i == 0 else b)
               for i, (a, b) in enumerate(zip(before, after)))
    # The same slots under their new ids take the update.
    fresh = s["index"] + rows * lanes
    buf.update_priorities(fresh, torch.full((32,), 100.0))
    got = buf._tree.leaf[s["index"] % buf.capacity].double()
    assert torch.allclose(got, torch.full_like(got, (100.0 + 1e-6) ** 0.6))


def test_batches_of_changing_sizes_keep_memory_bounded():
    """Updating only some items of each sample gives a new size almost every call: the tree keeps
    a bounded number of index ranges, and what it returns is still right."""
    from gpubuffers.reference.priority import ARANGES

    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(40 * 4, 4, seed=0, priority_alpha=1.0, backend="torch")
    for t in range(30):
        buf.add(step(4, t, g), torch.zeros(4, dtype=torch.bool))
    for k in range(1, 120):
        s = buf.sample(k)
        buf.update_priorities(s["index"], torch.full((k,), float(k)))
        assert torch.equal(buf._tree.arange(k), torch.arange(k))
    assert len(buf._tree.__dict__["_aranges"]) <= ARANGES


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_ids_last_one_wins_and_zero_stays_drawable(backend):
    buf = ReplayBuffer(40, 4, seed=1, backend=backend, priority_alpha=1.0, priority_eps=0.01,
                       device=DEVICE if backend == "triton" else "cpu")
    g = torch.Generator().manual_seed(1)
    for t in range(6):
        buf.add(step(4, t, g), torch.zeros(4, dtype=torch.bool))
    tid = 9
    buf.update_priorities(torch.tensor([tid, 3, tid, tid, 3]), torch.tensor([5.0, 1.0, 9.0, 2.0, 0.0]))
    leaf = buf._tree.leaf
    assert torch.isclose(leaf[tid], torch.tensor(2.01, device=leaf.device))
    assert torch.isclose(leaf[3], torch.tensor(0.01, device=leaf.device))  # 0 + eps: still drawable
    assert torch.isclose(buf._tree.maxp, torch.tensor([9.01], device=leaf.device)).all()
    buf.add(step(4, 6, g), torch.zeros(4, dtype=torch.bool))  # the row before enters at the largest
    assert torch.allclose(leaf[20:24], torch.tensor(9.01, device=leaf.device))
    assert (leaf[24:28] == 0).all()  # the newest row waits for its successor


def test_update_priorities_accepts_numpy_grad_and_other_devices_and_rejects_bad_input():
    np = pytest.importorskip("numpy")
    buf = ReplayBuffer(40, 4, seed=1, priority_alpha=0.6)
    with pytest.raises(ValueError, match="empty"):
        buf.update_priorities(torch.tensor([0]), torch.tensor([1.0]))
    g = torch.Generator().manual_seed(1)
    for t in range(6):
        buf.add(step(4, t, g), torch.zeros(4, dtype=torch.bool))
    s = buf.sample(8)
    td = torch.rand(8, 1, requires_grad=True) * 3  # a TD error [B, 1] still in the graph
    buf.update_priorities(s["index"], td)
    buf.update_priorities(s["index"].numpy(), np.abs(np.random.default_rng(0).normal(size=8)))
    buf.update_priorities(torch.tensor([], dtype=torch.int64), torch.tensor([]))
    tree = [t.clone() for t in (buf._tree.leaf, buf._tree.sums, buf._tree.mins, buf._tree.maxp)]
    with pytest.raises(TypeError, match="index: expected an integer"):
        buf.update_priorities(s["index"].float(), torch.ones(8))
    with pytest.raises(ValueError, match=r"priority: expected 8 values"):
        buf.update_priorities(s["index"], torch.ones(7))
    with pytest.raises(TypeError, match="priority: expected a real"):
        buf.update_priorities(s["index"], torch.ones(8, dtype=torch.complex64))
    with pytest.raises(TypeError, match="index: expected a torch.Tensor"):
        buf.update_priorities("0", torch.ones(1))
    bad = torch.ones(8)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="priority: expected finite values >= 0 that float32 holds "
                                         r"\(at most 3.4028235e\+38\), got nan at position 3"):
        buf.update_priorities(s["index"], bad, check=True)
    huge = torch.ones(8, dtype=torch.float64)
    huge[5] = 1e39  # finite as given, infinite in float32
    with pytest.raises(ValueError, match=r"got 1e\+39 at position 5"):
        buf.update_priorities(s["index"], huge, check=True)
    for a, b in zip(tree, (buf._tree.leaf, buf._tree.sums, buf._tree.mins, buf._tree.maxp)):
        assert torch.equal(a, b)  # rejected calls changed nothing
    buf.update_priorities(s["index"], bad)  # without check, the NaN entry is ignored
    uniform = ReplayBuffer(40, 4)
    uniform.add(step(4, 0, g), torch.zeros(4, dtype=torch.bool))
    uniform.add(step(4, 1, g), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="priority_alpha=None"):
        uniform.update_priorities(torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="priority_beta: the buffer samples uniformly"):
        uniform.sample(4, priority_beta=0.4)
    assert "weight" not in uniform.sample(4)
    with pytest.raises(ValueError, match="priority_beta: expected a float in"):
        buf.sample(4, priority_beta=1.5)
    for alpha, err in ((0.0, ValueError), (1.2, ValueError), ("0.5", TypeError), (True, TypeError)):
        with pytest.raises(err, match="priority_alpha"):
            ReplayBuffer(40, 4, priority_alpha=alpha)
    for eps in (0.0, 1e-50, 1e-39, 2e30, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"priority_eps: expected a float in \[1.1754943508222875e-38, 1e\+30\]"):
            ReplayBuffer(40, 4, priority_alpha=0.5, priority_eps=eps)
    for eps in (2.0 ** -126, 1e30):
        ReplayBuffer(40, 4, priority_alpha=0.5, priority_eps=eps)


@pytest.mark.parametrize("autoreset", ["same_step", "next_step"])
def test_prioritized_hot_path_never_syncs(autoreset):
    n = 6
    buf = ReplayBuffer(20 * n, n, seed=1, priority_alpha=0.6, autoreset=autoreset)
    g = torch.Generator().manual_seed(0)
    for t in range(25):
        buf.add(step(n, t, g), torch.rand(n, generator=g) < 0.2)
    buf.sample_episodes(2)  # the default row budget reads the device once per add: not here
    with NoHostSync():
        for t in range(5):
            buf.add(step(n, 25 + t, g), torch.rand(n, generator=g) < 0.2)
            s = buf.sample(32, n_step=3, gamma=0.9)
            buf.update_priorities(s["index"], (s["return"] - 1).abs())
            q = buf.sample_sequences(8, 4, priority_beta=0.6)
            buf.update_priorities(q["index"][:, 0], torch.rand(8))
            buf.sample_episodes(2, max_rows=64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_is_the_transition_id_in_every_sampler(backend):
    lanes, rows = 3, 7
    for prio in (None, 0.6):
        buf = ReplayBuffer(lanes * rows, lanes, seed=9, backend=backend, priority_alpha=prio,
                           device=DEVICE if backend == "triton" else "cpu")
        g = torch.Generator().manual_seed(9)
        for t in range(30):
            buf.add(step(lanes, t, g), torch.rand(lanes, generator=g) < 0.2)
        s = buf.sample(64)
        assert torch.equal(s["index"], s["tag"] // 1000 * lanes + s["tag"] % 1000)
        q = buf.sample_sequences(16, 2)
        assert torch.equal(q["index"], q["tag"] // 1000 * lanes + q["tag"] % 1000)
        e = buf.sample_episodes(4)
        m = e["mask"]
        assert torch.equal(e["index"][m], (e["tag"] // 1000 * lanes + e["tag"] % 1000)[m])
        assert (e["index"][~m] == -1).all()


# ---------------------------------------------------------------- kernels against the reference
# Leaves in [0.5, 4) with alpha = 1: every sum of them is exact in float64 at these sizes, so the
# kernels (tl.sum, tl.cumsum) and the reference (torch) agree bit for bit on trees and draws.

def _exact_setup(lanes, rows, marks_last, next_step, adds=25, seed=0):
    from test_kernels import build

    ix = build(lanes, rows, adds, marks_last, next_step, seed=seed)
    tree = rp.PriorityTree.empty(rows * lanes, lanes, 1.0, 0.25, torch.device(DEVICE), fanout=4)
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange((adds - rows) * lanes, (adds - 1) * lanes)
    prio = (torch.rand(ids.shape[0], generator=g) * 3.5 + 0.25).to(DEVICE)
    rp.update_priorities(ix, tree, ids.to(DEVICE), prio)
    return ix, tree, g


def _same_tree(a, b, what):
    for name in ("leaf", "sums", "mins", "maxp"):
        x, y = getattr(a, name), getattr(b, name)
        if name == "leaf":
            x, y = x[:-1], y[:-1]  # the spare holds whatever the ignored updates wrote
        assert torch.equal(x, y), (what, name, (x != y).nonzero()[:5].tolist())


KMODES = [(last, nxt) for last in (False, True) for nxt in (False, True)]


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("marks_last,next_step", KMODES)
@pytest.mark.parametrize("lanes,rows", [(1, 9), (7, 6), (130, 3)])  # one lane; odd N; 390 slots, 5 levels
def test_update_and_promote_kernels_match_reference(lanes, rows, marks_last, next_step):
    import copy

    from gpubuffers.kernels import priority as kp

    ix, tree, g = _exact_setup(lanes, rows, marks_last, next_step)
    adds = int(ix.state[0])
    ids = torch.randint((adds - rows - 2) * lanes, adds * lanes + 3, (300,), generator=g)
    ids[::7] = ids[3]  # repeats
    prio = (torch.rand(300, generator=g) * 3.5 + 0.25)
    prio[::11] = float("nan")
    prio[5::13] = -1.0
    ids, prio = ids.to(DEVICE), prio.to(DEVICE)
    want, got = copy.deepcopy(tree), copy.deepcopy(tree)
    rp.update_priorities(ix, want, ids, prio)
    kp.update_priorities(ix.start, ix.state, got, ids, prio)
    _same_tree(got, want, "update")
    rp.promote(ix, want)
    kp.promote(ix.start, ix.state, got)
    _same_tree(got, want, "promote")
    assert torch.equal(got.slots, want.slots)


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("marks_last,next_step", KMODES)
@pytest.mark.parametrize("lanes,rows", [(1, 9), (7, 6), (130, 3)])
def test_draw_kernels_match_reference(lanes, rows, marks_last, next_step):
    from gpubuffers.kernels import priority as kp

    ix, tree, _ = _exact_setup(lanes, rows, marks_last, next_step, seed=lanes)
    seed, offset, batch, tries, length = 77, 12345, 300, 4, min(3, rows)
    ix.state[1] = offset
    final_rows = 0 if next_step else 3
    u = ref.philox_uniform(seed, offset, (batch,), torch.device(DEVICE))
    want = rp.prioritized_transitions(ix, tree, u, next_step, final_rows, 0.4)
    for flat in range(1, tree.depth + 1):  # from a level search to the plain descent from the root
        assert torch.equal(rp.descend(tree, rp.stratified(tree, u), flat=flat), want["slot"]), flat
    got = kp.transitions(ix.start, ix.end_flags, ix.final_idx, ix.fin_head, ix.state, tree, seed, batch,
                         next_step, final_rows, 0.4)
    for key in ("slot", "row", "index", "succ", "valid", "is_first", "is_last", "terminated", "truncated",
                "next_valid"):
        assert torch.equal(got[key], want[key]), key
    assert torch.allclose(got["weight"], want["weight"], rtol=1e-6)
    u = ref.philox_uniform(seed, offset, (batch, tries), torch.device(DEVICE))
    want = rp.prioritized_windows(ix, tree, u, length, 0.4)
    got = kp.windows(ix.start, ix.end_flags, ix.state, tree, seed, batch, tries, length, 0.4)
    for key in ("slots", "index", "is_first", "is_last", "valid"):
        assert torch.equal(got[key], want[key]), key
    assert torch.allclose(got["weight"], want["weight"], rtol=1e-6)
