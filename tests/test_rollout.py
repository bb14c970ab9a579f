"""RolloutBuffer: GAE against a slow model built from the episodes themselves, the kernel against
the reference, minibatches and recurrent sequences, clear/restart, and bad input."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from gpubuffers import RolloutBuffer, reference as ref
from gpubuffers.layout import ENDED, HAS_FINAL, SENTINEL, TRUNCATED
from nosync import NoHostSync
from oracle import build_lanes, flags, obs

MODES = [(m, a) for m in ("first", "last") for a in ("same_step", "next_step")]
BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])

# Per lane: episodes (length, truncated), some longer than a rollout of T = 6 rows.
PLANS = [[(3, False), (2, True)], [(9, True), (4, False)], [(1, False), (1, True), (5, False)],
         [(13, False)], [(2, True)], [(6, False), (6, True)]]
T = 6


def reward(n, r):
    return 0.5 + 0.1 * n + (r % 4) * 0.25


def value(n, r):
    return 1.0 + 0.05 * n - 0.1 * (r % 3)


def final_value(n, r):
    return 7.0 + n + 0.5 * (r % 5)


def model(lanes, base, rows, gamma, lam, next_step, finals):
    """(advantage, return) [rows, N] in float64 for the rollout of absolute rows base.., from the
    episode structure: explicit sums over each slot's future rows, no recursion and no flags."""
    end = base + rows
    adv = torch.zeros(rows, len(lanes), dtype=torch.float64)
    ret = torch.zeros_like(adv)
    for n, lane in enumerate(lanes):
        for first, last, tr in lane.episodes:
            for r in range(max(first, base), min(last, end - 1) + 1):
                total = 0.0
                for j in range(r, min(last, end - 1) + 1):
                    if j < last:
                        boot = value(n, j + 1)  # the row after the rollout: last_value, same function
                    elif not tr:
                        boot = 0.0
                    elif next_step:
                        boot = value(n, j + 1)  # the reset row holds the final observation
                    else:
                        boot = final_value(n, j) if finals else value(n, j)
                    delta = reward(n, j) + gamma * boot - value(n, j)
                    total += (gamma * lam) ** (j - r) * delta
                adv[r - base, n] = total
                ret[r - base, n] = total + value(n, r)
        for r in range(base, end):
            if lane.label[r] is None:
                ret[r - base, n] = value(n, r)
    return adv, ret


def fill(ro, lanes, start, stop, done, trunc, marks_last, finals, hidden=False):
    n = len(lanes)
    for a in range(start, stop):
        step = {"obs": torch.tensor([obs(i, a) for i in range(n)]),
                "reward": torch.tensor([reward(i, a) for i in range(n)]),
                "value": torch.tensor([[value(i, a)] for i in range(n)]),
                "info": {"row": torch.full((n,), a), "lane": torch.arange(n)}}
        if hidden:
            step["hidden"] = {"h": torch.full((n, 2), float(a)), "c": torch.arange(n)[:, None].float().expand(n, 3)}
        fv = None
        if finals:
            at = a if marks_last else a - 1
            fv = torch.tensor([final_value(i, at) for i in range(n)])
        ro.add(step, done[a], truncated=trunc[a], final_value=fv)


def run(marks, autoreset, finals, backend, rollouts=3, gamma=0.9, lam=0.8, normalize=False):
    marks_last, next_step = marks == "last", autoreset == "next_step"
    total = rollouts * T
    lanes = build_lanes(PLANS, total + 1, next_step)
    done, trunc = flags(lanes, total + 1, marks_last)
    ro = RolloutBuffer(T, len(PLANS), done_marks=marks, autoreset=autoreset, seed=0, backend=backend)
    for k in range(rollouts):
        fill(ro, lanes, k * T, (k + 1) * T, done, trunc, marks_last, finals)
        end = (k + 1) * T
        last = torch.tensor([value(i, end) for i in range(len(PLANS))])
        extra = {}
        if not marks_last:
            extra = {"next_done": done[end], "next_truncated": trunc[end]}
            if finals:
                extra["next_final_value"] = torch.tensor([final_value(i, end - 1) for i in range(len(PLANS))])
        out = ro.compute_returns(last, gamma, lam, normalize_advantage=normalize, **extra)
        yield k, lanes, ro, out, model(lanes, k * T, T, gamma, lam, next_step, finals)


# final_value is refused under next_step (tested below), where the reset row holds that value.
CASES = [(m, a, f) for m, a in MODES for f in ([True, False] if a == "same_step" else [False])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("marks,autoreset,finals", CASES)
def test_gae_matches_the_episodes(marks, autoreset, finals, backend):
    for k, lanes, ro, out, (adv, ret) in run(marks, autoreset, finals, backend):
        assert out["advantage"].shape == (T, len(PLANS), 1) and out["advantage"].dtype == torch.float32
        torch.testing.assert_close(out["advantage"][..., 0].double(), adv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["return"][..., 0].double(), ret, rtol=1e-5, atol=1e-5)
        mask = torch.tensor([[lanes[n].label[k * T + t] is not None for n in range(len(PLANS))]
                             for t in range(T)])
        assert torch.equal(ro._mask()[0], mask)


def test_truncation_bootstrap_changes_with_final_value():
    # The model would agree with itself if final values were ignored: make sure they matter.
    with_final = [out["advantage"].clone() for *_, out, _ in run("last", "same_step", True, "torch")]
    without = [out["advantage"].clone() for *_, out, _ in run("last", "same_step", False, "torch")]
    assert any(not torch.equal(a, b) for a, b in zip(with_final, without))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("marks,autoreset", MODES)
def test_gae_kernel_equals_reference(marks, autoreset, normalize):
    outs = {}
    for backend in ("torch", "triton"):
        outs[backend] = [{k: v.clone() for k, v in o.items()}
                         for *_, o, _ in run(marks, autoreset, autoreset == "same_step", backend,
                                             normalize=normalize)]
    for a, b in zip(outs["torch"], outs["triton"]):
        assert torch.equal(a["advantage"], b["advantage"]) and torch.equal(a["return"], b["return"])


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("next_step", [False, True])
@pytest.mark.parametrize("lanes", [1, 37, 300])
def test_gae_op_kernel_equals_reference_on_random_index(next_step, lanes):
    from gpubuffers.kernels import returns as kernels

    g = torch.Generator().manual_seed(lanes)
    rows = 9
    ix = ref.EpisodeIndex.empty(rows, lanes, torch.device("cpu"))
    ix.start.copy_(torch.randint(0, 5, (rows, lanes), generator=g))
    ix.start[torch.rand(rows, lanes, generator=g) < 0.2] = SENTINEL
    bits = torch.tensor([0, ENDED, ENDED | TRUNCATED, ENDED | HAS_FINAL, ENDED | TRUNCATED | HAS_FINAL],
                        dtype=torch.uint8)
    ix.end_flags.copy_(bits[torch.randint(0, 5, (rows, lanes), generator=g)])
    args = (torch.randn(rows, lanes, generator=g), torch.randn(rows, lanes, generator=g).half(),
            torch.randn(rows, lanes, generator=g), bits[torch.randint(0, 5, (lanes,), generator=g)],
            torch.randn(lanes, generator=g), torch.randn(lanes, generator=g), 0.97, 0.9, next_step)
    want = ref.gae(ix, *args)
    got = kernels.gae(ix.start, ix.end_flags, *args)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_normalized_advantage_has_zero_mean_unit_std_over_episode_rows():
    *_, (k, lanes, ro, out, _) = run("last", "next_step", False, "torch")
    raw = out["advantage"].clone()
    mask = ro._mask()[0]
    extra = ro.compute_returns(torch.tensor([value(i, 3 * T) for i in range(len(PLANS))]), 0.9, 0.8,
                               normalize_advantage=True)
    adv = extra["advantage"][..., 0]
    assert not mask.all()  # reset rows are present and left out
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
    assert abs(adv[mask].mean().item()) < 1e-5 and abs(adv[mask].std().item() - 1) < 1e-4
    sel = raw[..., 0][mask]
    torch.testing.assert_close(adv[mask], (sel - sel.mean()) / (sel.std() + 1e-8))
    torch.testing.assert_close(extra["return"], raw + ro.storage["value"])  # returns: unnormalized


def test_compute_returns_is_sync_free_and_graph_shaped():
    *_, (k, lanes, ro, out, _) = run("first", "same_step", True, "torch")
    end = 3 * T
    with NoHostSync():
        ro.compute_returns(torch.zeros(len(PLANS)), 0.99, 0.95, normalize_advantage=True,
                           next_done=torch.zeros(len(PLANS), dtype=torch.bool))
        for batch in ro.minibatches(4, 2):
            pass
        for batch in ro.sequences(2, 2, hidden_key="info/row"):
            pass
    assert end == ro._total


# ---------------------------------------------------------------- minibatches and sequences
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("marks,autoreset", MODES)
def test_minibatches_cover_every_slot_once_per_epoch(marks, autoreset, backend):
    *_, (k, lanes, ro, out, _) = run(marks, autoreset, False, backend)
    n = len(PLANS)
    stored = ro.storage
    seen = []
    for batch in ro.minibatches(4, 3, seed=5):
        idx = batch["index"]
        assert idx.shape == (T * n // 4,)
        row, lane = idx // n, idx % n
        assert torch.equal(batch["info"]["row"], 2 * T + row)
        assert torch.equal(batch["info"]["lane"], lane)
        assert torch.equal(batch["obs"], stored["obs"][row, lane])
        assert torch.equal(batch["advantage"], stored["advantage"][row, lane])
        assert torch.equal(batch["return"], stored["return"][row, lane])
        want = torch.tensor([lanes[int(c)].label[2 * T + int(r)] is not None for r, c in zip(row, lane)])
        assert torch.equal(batch["mask"], want)
        seen.append(idx)
    assert len(seen) == 12
    for e in range(3):
        epoch = torch.cat(seen[4 * e:4 * e + 4])
        assert torch.equal(epoch.sort().values, torch.arange(T * n))
    assert not torch.equal(seen[0], seen[4])  # a new permutation each epoch
    again = [b["index"] for b in ro.minibatches(4, 3, seed=5)]
    assert all(torch.equal(a, b) for a, b in zip(seen, again))
    other = [b["index"] for b in ro.minibatches(4, 3, seed=6)]
    assert not all(torch.equal(a, b) for a, b in zip(seen, other))


@pytest.mark.parametrize("marks,autoreset", MODES)
def test_sequences_reproduce_lanes_and_flags(marks, autoreset):
    marks_last, next_step = marks == "last", autoreset == "next_step"
    lanes = build_lanes(PLANS, 2 * T + 1, next_step)
    done, trunc = flags(lanes, 2 * T + 1, marks_last)
    n = len(PLANS)
    ro = RolloutBuffer(T, n, done_marks=marks, autoreset=autoreset, seed=3)
    for k in range(2):
        fill(ro, lanes, k * T, (k + 1) * T, done, trunc, marks_last, False, hidden=True)
    seen = []
    for batch in ro.sequences(3, 2, hidden_key="hidden"):
        lane = batch["lane"]
        assert lane.shape == (n // 3,)
        assert batch["obs"].shape == (T, n // 3, 3)
        assert torch.equal(batch["info"]["lane"], lane[None].expand(T, -1))
        assert torch.equal(batch["info"]["row"][:, 0], torch.arange(T, 2 * T))
        for j, c in enumerate(lane.tolist()):
            lab = lanes[c].label
            firsts = [lab[r] is not None and (r == 0 or lab[r - 1] != lab[r]) for r in range(T, 2 * T)]
            assert batch["is_first"][:, j].tolist() == firsts
            assert batch["mask"][:, j].tolist() == [lab[r] is not None for r in range(T, 2 * T)]
        init = batch["initial_hidden"]
        assert torch.equal(init["h"], torch.full((n // 3, 2), float(T)))
        assert torch.equal(init["c"], lane[:, None].float().expand(-1, 3))
        seen.append(lane)
    for e in range(2):
        assert torch.equal(torch.cat(seen[3 * e:3 * e + 3]).sort().values, torch.arange(n))
    one = next(iter(ro.sequences(1, hidden_key="hidden/h")))
    assert torch.equal(one["initial_hidden"], torch.full((n, 2), float(T)))


def test_a_gru_loop_over_sequences_reproduces_the_collection():
    """The README's recipe: a GRU run over each lane's rows from initial_hidden, reset where
    is_first, gives the hidden states the policy had while collecting."""
    torch.manual_seed(0)
    n, hid = 4, 5
    gru = torch.nn.GRUCell(3, hid)
    ro = RolloutBuffer(T, n, done_marks="last", seed=0)
    h = torch.zeros(n, hid)
    outputs = []
    with torch.no_grad():
        for t in range(2 * T):  # the second rollout carries the first one's states in
            o = torch.randn(n, 3)
            done = torch.rand(n) < 0.3
            ro.add({"obs": o, "reward": torch.ones(n), "value": torch.zeros(n), "h": h}, done)
            h = gru(o, h)
            outputs.append(h)
            h = torch.where(done[:, None], 0.0, h)  # the policy resets a lane whose episode ended
    batch = next(iter(ro.sequences(1, hidden_key="h")))
    lane = batch["lane"]
    state = batch["initial_hidden"]
    replay = []
    with torch.no_grad():
        for t in range(T):
            state = torch.where(batch["is_first"][t][:, None], 0.0, state)
            state = gru(batch["obs"][t], state)
            replay.append(state)
    assert not batch["is_first"][0].all() and batch["is_first"][1:].any()
    torch.testing.assert_close(torch.stack(replay), torch.stack(outputs[T:])[:, lane])


# ---------------------------------------------------------------- rollout boundaries
def test_next_add_after_a_full_rollout_starts_the_next():
    ro = RolloutBuffer(3, 2, seed=0)
    step = lambda a: {"obs": torch.full((2, 1), float(a)), "reward": torch.ones(2), "value": torch.zeros(2)}
    for a in range(3):
        ro.add(step(a), torch.tensor([a == 1, False]))
    ro.compute_returns(torch.zeros(2), 0.9, 0.9)
    assert ro.full and len(ro) == 6 and "advantage" in ro.storage
    ro.add(step(3), torch.tensor([False, False]))
    assert not ro.full and len(ro) == 2 and "advantage" not in ro.storage
    assert ro.storage["obs"][:, 0, 0].tolist() == [3.0, 1.0, 2.0]
    for a in (4, 5):
        ro.add(step(a), torch.tensor([False, False]))
    _, is_first = ro._mask()
    # Lane 0's episode ended at row 1 and the next started at row 2: it runs on into this rollout.
    assert is_first[:, 0].tolist() == [False, False, False] and is_first[:, 1].tolist() == [False] * 3
    with pytest.raises(ValueError, match="next_done: only used with done_marks='first'"):
        ro.compute_returns(torch.zeros(2), 0.9, 0.9, next_done=torch.zeros(2, dtype=torch.bool))


@pytest.mark.parametrize("marks", ["first", "last"])
def test_clear_starts_over_and_episodes_run_on(marks):
    ro = RolloutBuffer(4, 3, done_marks=marks, seed=0)
    step = lambda a: {"obs": torch.full((3, 1), float(a)), "reward": torch.ones(3), "value": torch.zeros(3)}
    ro.add(step(0), torch.tensor([False, False, False]))
    ro.add(step(1), torch.tensor([False, False, False]))
    ro.clear()
    assert len(ro) == 0 and not ro.full
    with pytest.raises(ValueError, match="holds 0 of 4 rows"):
        ro.compute_returns(torch.zeros(3), 0.9, 0.9)
    # Lane 1 ends its episode at the first new row (last) or just before it (first).
    for a in range(2, 6):
        ro.add(step(a), torch.tensor([False, a == 2, False]))
    assert ro.storage["obs"][:, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    _, is_first = ro._mask()
    if marks == "first":
        assert is_first[0].tolist() == [False, True, False]
    else:
        assert is_first[0].tolist() == [False, False, False] and is_first[1].tolist() == [False, True, False]
    extra = {"next_done": torch.zeros(3, dtype=torch.bool)} if marks == "first" else {}
    adv = ro.compute_returns(torch.zeros(3), 1.0, 1.0, **extra)["advantage"]
    want_lane1 = [1.0, 3.0, 2.0, 1.0] if marks == "last" else [4.0, 3.0, 2.0, 1.0]
    assert adv[:, 1].tolist() == want_lane1 and adv[:, 0].tolist() == [4.0, 3.0, 2.0, 1.0]


def test_single_environment_numpy_and_requires_grad():
    ro = RolloutBuffer(4, None, seed=0)
    v = torch.zeros((), requires_grad=True)
    for a in range(4):
        ro.add({"obs": np.full(3, a, dtype=np.float32), "reward": np.float32(1.0), "value": v * 1.0},
               a == 1, truncated=a == 1, final_value=np.float32(5.0))
    out = ro.compute_returns(np.zeros(1, dtype=np.float32), 0.5, 1.0)
    assert out["advantage"].shape == (4, 1) and not out["advantage"].requires_grad
    assert out["advantage"][:, 0].tolist() == [1.0 + 0.5 * (1 + 0.5 * 5.0), 1 + 0.5 * 5.0, 1.5, 1.0]
    batch = next(iter(ro.minibatches(2)))
    assert batch["obs"].shape == (2, 3)


def test_storage_dtypes_and_value_shapes():
    ro = RolloutBuffer(2, 3, seed=0)
    for a in range(2):
        ro.add({"obs": torch.zeros(3, 2, dtype=torch.uint8), "reward": torch.ones(3, dtype=torch.int32),
                "value": torch.full((3,), 0.5, dtype=torch.bfloat16)}, torch.zeros(3, dtype=torch.bool))
    out = ro.compute_returns(torch.zeros(3, dtype=torch.float64), 1.0, 1.0)
    assert out["advantage"].shape == (2, 3) and out["advantage"].dtype == torch.float32
    assert out["advantage"][:, 0].tolist() == [1.5, 0.5]
    assert ro.storage["obs"].dtype == torch.uint8


# ---------------------------------------------------------------- bad input
def snap(ro):
    state = {k: v.clone() for k, v in ro.storage.items()}
    if ro.index is not None:
        state.update({f"ix/{k}": v.clone() for k, v in vars(ro.index).items() if isinstance(v, torch.Tensor)})
    return len(ro), ro._total, copy.copy(ro.specs), state


def same(a, b):
    assert a[:3] == b[:3] and a[3].keys() == b[3].keys()
    assert all(torch.equal(a[3][k], b[3][k]) for k in a[3])


def good(a=0):
    return {"obs": torch.zeros(4, 2), "reward": torch.ones(4), "value": torch.zeros(4)}


@pytest.mark.parametrize("call,exc,msg", [
    (lambda r: r.add({"obs": torch.zeros(4, 2), "reward": torch.ones(4)}, torch.zeros(4, dtype=torch.bool)),
     ValueError, "step: expected leaves"),
    (lambda r: r.add(good(), torch.zeros(3, dtype=torch.bool)), ValueError, r"done: expected shape \(4,\)"),
    (lambda r: r.add(good(), torch.zeros(4, dtype=torch.bool), final_value=torch.zeros(3)),
     ValueError, r"final_value: expected shape \(4,\) or \(4, 1\), got \(3,\)"),
    (lambda r: r.add(good(), torch.zeros(4, dtype=torch.bool), final_value=torch.zeros(4, dtype=torch.bool)),
     TypeError, "final_value: expected a real"),
    (lambda r: r.add(good(), torch.zeros(4, dtype=torch.bool), final_value="x"), TypeError, "final_value"),
    (lambda r: r.add({**good(), "obs": torch.zeros(4, 2, dtype=torch.float64)}, torch.zeros(4, dtype=torch.bool)),
     TypeError, "step\\['obs'\\]: expected dtype torch.float32"),
    (lambda r: r.compute_returns(torch.zeros(4), 0.9, 0.9), ValueError, "holds 2 of 3 rows"),
    (lambda r: r.minibatches(2), ValueError, "minibatches: the rollout holds 2 of 3 rows"),
])
def test_bad_input_changes_nothing(call, exc, msg):
    ro = RolloutBuffer(3, 4, seed=0)
    for _ in range(2):
        ro.add(good(), torch.zeros(4, dtype=torch.bool))
    before = snap(ro)
    with pytest.raises(exc, match=msg):
        call(ro)
    same(before, snap(ro))


@pytest.fixture
def full():
    ro = RolloutBuffer(3, 4, seed=0, done_marks="first")
    for _ in range(3):
        ro.add(good(), torch.zeros(4, dtype=torch.bool))
    return ro


@pytest.mark.parametrize("call,exc,msg", [
    (lambda r: r.compute_returns(torch.zeros(4), 0.9, 0.9), ValueError, "next_done: under done_marks='first'"),
    (lambda r: r.compute_returns(torch.zeros(4), 1.5, 0.9, next_done=torch.zeros(4, dtype=torch.bool)), ValueError,
     r"gamma: expected a float in \[0.0, 1.0\], got 1.5"),
    (lambda r: r.compute_returns(torch.zeros(4), 0.9, -0.1, next_done=torch.zeros(4, dtype=torch.bool)), ValueError, "lam"),
    (lambda r: r.compute_returns(torch.zeros(5), 0.9, 0.9, next_done=torch.zeros(4, dtype=torch.bool)), ValueError,
     r"last_value: expected shape"),
    (lambda r: r.compute_returns(torch.zeros(4), 0.9, 0.9, next_done=torch.zeros(2, dtype=torch.bool)), ValueError,
     r"next_done: expected shape \(4,\)"),
    (lambda r: r.compute_returns(torch.zeros(4), 0.9, 0.9, next_done=torch.zeros(4, dtype=torch.bool), normalize_advantage=1),
     TypeError, "normalize_advantage"),
    (lambda r: r.minibatches(5), ValueError, "num_minibatches: expected a divisor of the 12 slots, got 5"),
    (lambda r: r.minibatches(2, 0), ValueError, "epochs: expected a positive int"),
    (lambda r: r.sequences(3), ValueError, "num_minibatches: expected a divisor of the 4 lanes, got 3"),
    (lambda r: r.sequences(2, hidden_key="h"), ValueError, "hidden_key: 'h' names no leaf"),
])
def test_bad_returns_and_minibatch_arguments(full, call, exc, msg):
    before = snap(full)
    with pytest.raises(exc, match=msg):
        call(full)
    same(before, snap(full))


@pytest.mark.parametrize("kwargs,step,exc,msg", [
    (dict(num_steps=1), None, ValueError, "num_steps: expected at least 2 rows"),
    (dict(num_steps=2.0), None, TypeError, "num_steps: expected a positive int"),
    (dict(done_marks="both"), None, ValueError, "done_marks"),
    (dict(value_key=None), None, TypeError, "value_key"),
    (dict(), {"obs": torch.zeros(4, 2), "reward": torch.ones(4)}, ValueError, "value_key: 'value' names no leaf"),
    (dict(), {"reward": torch.ones(4), "value": torch.zeros(4, 2)}, ValueError, "value_key: the leaf 'value'"),
    (dict(), {**good(), "advantage": torch.zeros(4)}, ValueError, "leaf name 'advantage' is reserved"),
    (dict(autoreset="next_step"), "final", ValueError, "final_value: not used with autoreset='next_step'"),
])
def test_bad_construction_and_first_add(kwargs, step, exc, msg):
    args = dict(num_steps=3, num_envs=4, seed=0)
    args.update(kwargs)
    if step is None:
        with pytest.raises(exc, match=msg):
            RolloutBuffer(**args)
        return
    ro = RolloutBuffer(**args)
    with pytest.raises(exc, match=msg):
        if step == "final":
            ro.add(good(), torch.zeros(4, dtype=torch.bool), final_value=torch.zeros(4))
        else:
            ro.add(step, torch.zeros(4, dtype=torch.bool))
    assert ro.specs is None and len(ro) == 0
