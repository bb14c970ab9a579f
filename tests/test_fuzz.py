"""A fuzzed buffer: a hypothesis state machine interleaving adds (both conventions, both autoreset
modes, episodes of random lengths ending by termination or truncation, final observations given
or left out), every sampler (n-step too), priority updates, save/load, and malformed calls.

Every sample is checked against the episode structure (tests/oracle.py): the transition, window
or episode exists, its data, successor and flags are right. A twin buffer fed the same calls but
never saved shows that a loaded buffer continues exactly (same samples, bit for bit). Every
rejected call leaves the buffer byte for byte as it was.

Budget: ``GPUBUFFERS_FUZZ_EXAMPLES`` (default 100 machines of up to 40 steps; the slow test runs
400). The counts of what ran are printed at the end of the run (``pytest -s``).
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from compare import assert_identical, raw_state, same_raw
from gpubuffers import ReplayBuffer
from oracle import build_lanes, expected, flags, obs

pytest.importorskip("safetensors")

RAN: collections.Counter = collections.Counter()

#: Leaves a machine may store narrowed, and how.
NARROW = {"info/row": torch.int16, "obs": torch.bfloat16}


def reward(lane, row):
    return float(row % 5) + 0.25 * lane


class BufferMachine(RuleBasedStateMachine):
    @initialize(lanes=st.sampled_from([1, 3, 5]), rows=st.integers(2, 8),
                marks=st.sampled_from(["first", "last"]), autoreset=st.sampled_from(["same_step", "next_step"]),
                prio=st.sampled_from([None, 0.7]), narrow=st.sampled_from([(), ("info/row",), ("obs",), ("info/row", "obs")]),
                finite=st.booleans(),
                plans=st.lists(st.lists(st.tuples(st.integers(1, 6), st.booleans()), min_size=1, max_size=4),
                               min_size=1, max_size=5),
                seed=st.integers(0, 2**31))
    def setup(self, lanes, rows, marks, autoreset, prio, narrow, finite, plans, seed):
        self.n, self.rows = lanes, rows
        self.marks_last, self.next_step = marks == "last", autoreset == "next_step"
        self.plans = [plans[i % len(plans)] for i in range(lanes)]
        kw = dict(capacity=rows * lanes, num_envs=lanes, done_marks=marks, autoreset=autoreset, seed=seed,
                  final_obs_capacity=rows * lanes, priority_alpha=prio, backend="torch",
                  # obs holds (lane, row, final): small integers, exact in bfloat16 (rows stay < 256)
                  storage_dtypes={p: NARROW[p] for p in narrow} or None, check_finite=finite)
        self.buf, self.twin = ReplayBuffer(**kw), ReplayBuffer(**kw)
        self.adds = 0
        self.missing = set()  # (lane, last row) whose final obs was left out
        self.folder = tempfile.mkdtemp(prefix="gpubuffers-fuzz-")
        RAN["machines"] += 1

    def teardown(self):
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)

    # ------------------------------------------------------------ the model
    def lanes_model(self, adds):
        return build_lanes(self.plans, adds, self.next_step)

    def both(self, fn):
        a, b = fn(self.buf), fn(self.twin)
        assert_identical(a, b)
        return a

    # ------------------------------------------------------------ adds
    @rule(count=st.integers(1, 6), give_final=st.lists(st.booleans(), min_size=6, max_size=6))
    def add(self, count, give_final):
        for i in range(count):
            a = self.adds
            lanes = self.lanes_model(a + 1)
            done, trunc = flags(lanes, a + 1, self.marks_last)
            step = {"obs": torch.tensor([obs(n, a) for n in range(self.n)]),
                    "reward": torch.tensor([reward(n, a) for n in range(self.n)]),
                    "info": {"lane": torch.arange(self.n), "row": torch.full((self.n,), a)}}
            final = None
            if not self.next_step:
                last_row = a if self.marks_last else a - 1
                if give_final[i]:
                    final = torch.tensor([obs(n, last_row, final=True) for n in range(self.n)])
                else:
                    self.missing.update((n, last_row) for n in range(self.n) if bool(done[a, n]))
            for b in (self.buf, self.twin):
                b.add(step, done[a], final_obs=final, truncated=trunc[a])
            self.adds += 1
            RAN["adds"] += 1

    # ------------------------------------------------------------ samplers
    @precondition(lambda self: self.adds >= 2)
    @rule(batch=st.integers(1, 40), n_step=st.integers(1, 4), gamma=st.sampled_from([None, 0.5, 1.0]))
    def sample(self, batch, n_step, gamma):
        n_step = 1 if gamma is None else min(n_step, self.rows)
        s = self.both(lambda b: b.sample(batch, n_step=n_step, gamma=gamma))
        lanes = self.lanes_model(self.adds)
        exp = expected(lanes, self.adds, self.rows, 1, self.marks_last, self.next_step)
        oldest = max(0, self.adds - self.rows)
        for i in range(batch):
            if not bool(s["valid"][i]):
                assert self.next_step or self.buf.priority_alpha is not None
                continue
            n, r = int(s["info"]["lane"][i]), int(s["info"]["row"][i])
            assert (n, r) in exp.transitions
            assert int(s["index"][i]) == r * self.n + n and s["obs"][i].tolist() == obs(n, r)
            assert bool(s["is_first"][i]) == exp.transitions[(n, r)]["is_first"]
            assert bool(s["is_last"][i]) == exp.transitions[(n, r)]["is_last"]
            first, last, tr = next(e for e in lanes[n].episodes if e[0] <= r <= e[1])
            end = min(last, self.adds - 2, r + n_step - 1)
            reached = end == last
            final_missing = reached and not self.next_step and (n, last) in self.missing
            if reached:
                nxt = obs(n, last + 1) if self.next_step else obs(n, last, final=True)
            else:
                nxt = obs(n, end + 1)
            assert bool(s["next_valid"][i]) == (not final_missing)
            if not final_missing:
                assert s["next"]["obs"][i].tolist() == nxt
            assert bool(s["terminated"][i]) == (reached and not tr)
            assert bool(s["truncated"][i]) == (reached and tr)
            assert first >= 0 and r >= oldest
            if gamma is not None:
                k = end - r + 1
                assert int(s["n_steps"][i]) == k
                want = sum(gamma ** j * reward(n, r + j) for j in range(k))
                assert float(s["return"][i]) == pytest.approx(want, rel=1e-5)
                term = reached and not tr
                assert float(s["discount"][i]) == pytest.approx(0.0 if term else gamma ** k)
                assert bool(s["target_valid"][i]) == ((not final_missing) or term)
        if self.buf.priority_alpha is not None:
            w, ok = s["weight"], s["valid"]
            assert ((w[ok] > 0) & (w[ok] <= 1)).all() and (w[~ok] == 0).all()
        self.last_index = s["index"]
        RAN["sample" if gamma is None else "sample n-step"] += 1

    @precondition(lambda self: self.adds >= 1)
    @rule(batch=st.integers(1, 20), length=st.integers(1, 8))
    def sample_sequences(self, batch, length):
        length = min(length, self.rows, self.adds)
        s = self.both(lambda b: b.sample_sequences(batch, length))
        exp = expected(self.lanes_model(self.adds), self.adds, self.rows, length, self.marks_last, self.next_step)
        for i in range(batch):
            if not bool(s["valid"][i]):
                continue
            lane = s["info"]["lane"][i]
            row = s["info"]["row"][i].tolist()
            assert bool((lane == lane[0]).all()) and row == list(range(row[0], row[0] + length))
            assert (int(lane[0]), row[-1]) in exp.windows
            assert s["index"][i].tolist() == [r * self.n + int(lane[0]) for r in row]
        RAN["sample_sequences"] += 1

    @precondition(lambda self: self.adds >= 1)
    @rule(batch=st.integers(1, 8), max_rows=st.sampled_from([None, 4, 30]))
    def sample_episodes(self, batch, max_rows):
        s = self.both(lambda b: b.sample_episodes(batch, max_rows=max_rows))
        lanes = self.lanes_model(self.adds)
        exp = expected(lanes, self.adds, self.rows, 1, self.marks_last, self.next_step)
        cu = s["cu_seqlens"].tolist()
        for b in range(batch):
            if not bool(s["valid"][b]):
                assert cu[b + 1] == cu[b]
                continue
            rows = s["info"]["row"][cu[b]:cu[b + 1]].tolist()
            lane = int(s["lane"][b])
            assert rows == list(range(rows[0], rows[0] + len(rows)))
            assert (lane, rows[0], len(rows)) in exp.episodes
            _, last, tr = next(e for e in lanes[lane].episodes if e[0] == rows[0])
            assert bool(s["truncated"][b]) == tr
            assert float(s["episode_return"][b]) == pytest.approx(sum(reward(lane, r) for r in rows), rel=1e-5)
        RAN["sample_episodes"] += 1

    @precondition(lambda self: self.buf.priority_alpha is not None and hasattr(self, "last_index"))
    @rule(seed=st.integers(0, 1000), repeat=st.booleans())
    def update_priorities(self, seed, repeat):
        idx = self.last_index
        g = torch.Generator().manual_seed(seed)
        pr = torch.rand(idx.shape, generator=g) * 10
        if repeat and idx.numel() > 1:
            idx = torch.cat([idx, idx[:1]])
            pr = torch.cat([pr, torch.zeros(1)])
        for b in (self.buf, self.twin):
            b.update_priorities(idx, pr)
        RAN["update_priorities"] += 1

    @invariant()
    def twins_hold_the_same_bytes(self):
        if hasattr(self, "buf"):
            # (a buffer loaded from a checkpoint has its own scratch row: it is not saved)
            a, b = raw_state(self.buf, scratch=False), raw_state(self.twin, scratch=False)
            same_raw(a, b)

    # ------------------------------------------------------------ save / load
    @precondition(lambda self: self.adds >= 1)
    @rule(where=st.sampled_from(["file", "state_dict"]))
    def save_and_load(self, where):
        if where == "file":
            path = os.path.join(self.folder, "buf.safetensors")
            self.buf.save(path)
            loaded = ReplayBuffer.load(path)
        else:
            sd = self.buf.state_dict()
            sd = {"header": sd["header"], "tensors": {k: v.clone() for k, v in sd["tensors"].items()}}
            loaded = ReplayBuffer(self.buf.capacity, self.buf.num_envs, done_marks=self.buf.done_marks,
                                  autoreset=self.buf.autoreset, seed=12345, final_obs_capacity=self.buf.capacity,
                                  priority_alpha=self.buf.priority_alpha, backend="torch",
                                  storage_dtypes=self.buf.storage_dtypes, check_finite=self.buf.check_finite)
            loaded.load_state_dict(sd)
        # The loaded buffer holds the saved one's bytes (rows past the live ones were never
        # written: the ring has not wrapped), which the invariant compares with the twin's.
        same_raw(raw_state(loaded, scratch=False), raw_state(self.buf, scratch=False))
        self.buf = loaded
        RAN[f"save/load ({where})"] += 1

    # ------------------------------------------------------------ malformed calls
    @precondition(lambda self: self.adds >= 1)
    @rule(which=st.integers(0, 29))
    def malformed(self, which):
        n = self.n
        good = {"obs": torch.zeros(n, 3), "reward": torch.zeros(n),
                "info": {"lane": torch.arange(n), "row": torch.zeros(n, dtype=torch.int64)}}
        done = torch.zeros(n, dtype=torch.bool)
        b = self.buf
        final = None if self.next_step else torch.zeros(n, 3)
        calls = [
            lambda: b.add({**good, "obs": torch.zeros(n, 4)}, done),
            lambda: b.add({**good, "obs": torch.zeros(n, 3, dtype=torch.float64)}, done),
            lambda: b.add({k: v for k, v in good.items() if k != "reward"}, done),
            lambda: b.add({**good, "extra": torch.zeros(n)}, done),
            lambda: b.add(good, torch.zeros(n + 1, dtype=torch.bool)),
            lambda: b.add(good, torch.zeros(n)),  # float flags
            lambda: b.add(good, done, truncated=torch.zeros(n, 2, dtype=torch.bool)),
            lambda: b.add(good, done, final_obs=torch.zeros(n, 5)),
            lambda: b.add(good, done, final_obs=torch.zeros(n, 3)) if self.next_step else b.add(
                good, done, final_obs={"nope": torch.zeros(n, 3)}),
            lambda: b.add([1, 2], done),
            lambda: b.add({**good, "info": {"lane": torch.arange(n), "row": torch.zeros(n, 1, dtype=torch.int64)}}, done,
                          final_obs=final),
            lambda: b.sample(0),
            lambda: b.sample(4, n_step=2),
            lambda: b.sample(4, n_step=self.rows + 1, gamma=0.9),
            lambda: b.sample(4, gamma=1.5),
            lambda: b.sample_sequences(4, self.rows + 1),
            lambda: b.sample_episodes(4, max_rows=0),
            lambda: b.update_priorities(torch.zeros(3, dtype=torch.int64), torch.zeros(2)),
            lambda: b.update_priorities(torch.zeros(2), torch.zeros(2)),
            lambda: b.load_state_dict({"header": {"format": 99}, "tensors": {}}),
            # NaN in a step: refused under check_finite (else stored as given: not malformed)
            lambda: b.add({**good, "obs": torch.full((n, 3), float("nan"))}, done, final_obs=final)
            if b.check_finite else b.sample(-1),
            # states that do not fit this buffer, from its own state
            lambda: b.load_state_dict(bad_state(b, drop="storage/obs")),
            lambda: b.load_state_dict(bad_state(b, extra=True)),
            lambda: b.load_state_dict(bad_state(b, change="storage/obs", to=lambda t: t[:-1])),
            lambda: b.load_state_dict(bad_state(b, change="storage/obs", to=lambda t: t.double())),
            lambda: b.load_state_dict(bad_state(b, change="index/start", to=lambda t: t.int())),
            lambda: b.load_state_dict(bad_state(b, change="rng/generator", to=lambda t: t[:7])),
            lambda: b.load_state_dict(bad_state(b, change="tree/leaf", to=lambda t: t[:-1]) if b.priority_alpha
                                      else bad_state(b, change="index/fin_head", to=lambda t: t[None])),
            lambda: b.load_state_dict(bad_state(b, counters={"adds": -1})),
            lambda: b.load_state_dict(bad_state(b, change="stats/totals", to=lambda t: t.tolist())),
        ]
        before = raw_state(b)
        with pytest.raises((ValueError, TypeError)):
            calls[which]()
        same_raw(before, raw_state(b))
        RAN["malformed calls"] += 1


def bad_state(buf, drop=None, extra=False, change=None, to=None, counters=None):
    """``buf``'s own state dict (cloned), with one thing wrong."""
    sd = buf.state_dict()
    tensors = {k: v.clone() for k, v in sd["tensors"].items() if k != drop}
    if extra:
        tensors["storage/nope"] = torch.zeros(1)
    if change is not None:
        tensors[change] = to(tensors[change])
    header = dict(sd["header"])
    if counters:
        header["counters"] = {**header["counters"], **counters}
    return {"header": header, "tensors": tensors}


def run_machine(examples):
    cls = BufferMachine
    cls.TestCase.settings = settings(max_examples=examples, stateful_step_count=40, deadline=None,
                                     suppress_health_check=list(HealthCheck))
    RAN.clear()
    try:
        cls.TestCase().runTest()
    finally:
        print(f"\nfuzz: {dict(RAN)}")


def test_fuzzed_buffer():
    run_machine(int(os.environ.get("GPUBUFFERS_FUZZ_EXAMPLES", "100")))


@pytest.mark.slow
def test_fuzzed_buffer_long():
    run_machine(400)
