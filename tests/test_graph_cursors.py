"""Cursors on the device: a captured CUDA graph replays its launches with the host values they
were captured with. Here the same is expressed on any device: before each call of the "replayed"
buffer its host counters are put back to their values at "capture", so every op must take the
row it writes, the live rows and the random offset from the device state, as a graph replay
would; K such calls must equal K eager calls (and would repeat one row and one draw otherwise).
On CUDA, tests/test_cuda.py captures a real graph and replays it."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from compare import INTERPRETED, interpreted_slow
from gpubuffers import ReplayBuffer

N, ROWS, K = 5, 4, 7  # K replays wrap the 4-row ring more than once
MODES = [(m, a) for m in ("first", "last") for a in ("same_step", "next_step")]
# CPU tensors reach the kernels through the interpreter; on CUDA, test_cuda.py replays real graphs.
BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def make(marks, autoreset, backend, prio=None):
    return ReplayBuffer(ROWS * N, N, done_marks=marks, autoreset=autoreset, seed=11, backend=backend,
                        final_obs_capacity=4 * N, priority_alpha=prio)


def step_for(k, g):
    return ({"obs": torch.randn(N, 3, generator=g), "reward": torch.randn(N, generator=g),
             "tag": torch.full((N,), k)},
            torch.rand(N, generator=g) < 0.4, torch.rand(N, generator=g) < 0.5,
            torch.randn(N, 3, generator=g))


# Prioritized: every mode on the reference; on the interpreter (slow) the two modes that mix the
# conventions, which between them run every prioritized kernel branch.
# Interpreted, one case of each kind stays in the default run.
CASES = ([(m, a, b, None) if b == "torch" or (m, a) == ("first", "same_step")
          else interpreted_slow(m, a, b, None) for m, a in MODES for b in BACKENDS]
         + [(m, a, "torch", 0.6) for m, a in MODES]
         + [(m, a, b, 0.6) if m == "last" else interpreted_slow(m, a, b, 0.6)
            for m, a in (("first", "next_step"), ("last", "same_step")) for b in BACKENDS if b != "torch"])


@pytest.mark.parametrize("marks,autoreset,backend,prio", CASES)
def test_replays_with_frozen_host_values_equal_eager_calls(marks, autoreset, backend, prio):
    eager, replayed = make(marks, autoreset, backend, prio), make(marks, autoreset, backend, prio)
    g = torch.Generator().manual_seed(0)
    same_step = autoreset == "same_step"
    for k in range(6):  # warm-up, as before a capture
        obs, done, trunc, final = step_for(k, g)
        for buf in (eager, replayed):
            buf.add(obs, done, truncated=trunc, final_obs=final if same_step else None)
    for buf in (eager, replayed):
        buf.sample(8), buf.sample_sequences(2, 2), buf.sample_episodes(2, max_rows=16)
        buf.sample(8, n_step=3, gamma=0.9)
    # The captured call's inputs live in fixed tensors, refilled before each replay.
    obs, done, trunc, final = step_for(99, g)
    captured = (replayed._total, replayed._rng.offset)

    def call(buf):
        buf.add(obs, done, truncated=trunc, final_obs=final if same_step else None)
        out = (buf.sample(16), buf.sample_sequences(4, 2), buf.sample_episodes(3, max_rows=24),
               buf.episode_stats(), buf.episode_stats(2), buf.sample(16, n_step=3, gamma=0.9))
        if prio:  # priorities from this sample, for the next draws
            buf.update_priorities(out[0]["index"], out[0]["obs"][:, 0].abs())
        return out

    for k in range(K):
        nxt = step_for(100 + k, g)
        for dst, src in zip((obs, done, trunc, final), nxt):
            if isinstance(dst, dict):
                for key in dst:
                    dst[key].copy_(src[key])
            else:
                dst.copy_(src)
        want = call(eager)
        replayed._total, replayed._rng.offset = captured  # what a replayed graph still holds
        replayed._episode_ends = None
        got = call(replayed)
        for i, (a, b) in enumerate(zip(flat(want), flat(got))):
            assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True)), \
                (k, i)
    for name in ("start", "end_flags", "ret", "final_idx", "fin_head", "state"):
        assert torch.equal(getattr(eager.index, name), getattr(replayed.index, name)), name
    if prio:
        for name in ("leaf", "sums", "mins", "maxp"):
            assert torch.equal(getattr(eager._tree, name), getattr(replayed._tree, name)), name
    assert int(replayed.index.state[0]) == eager.num_adds  # the device counted every replay


@pytest.mark.parametrize("marks,autoreset", MODES)
@pytest.mark.parametrize("prio", [None, 0.6])
def test_samplers_replayed_between_eager_adds_equal_eager_calls(marks, autoreset, prio, monkeypatch):
    """The off-policy loop's pattern: adds run eagerly, the samplers replay from a graph captured
    after a warm-up. Each "replay" runs with the host values the capture saw (rows added, random
    offset, the episode count cached for that add) and as under capture; it must still draw
    from the rows added since, episodes included, as eager calls do."""
    import gpubuffers.buffer as buffer_module

    eager, replayed = make(marks, autoreset, "torch", prio), make(marks, autoreset, "torch", prio)
    g = torch.Generator().manual_seed(1)
    same_step = autoreset == "same_step"

    def add(k):
        obs, done, trunc, final = step_for(k, g)
        for buf in (eager, replayed):
            buf.add(obs, done, truncated=trunc, final_obs=final if same_step else None)

    for k in range(6):
        add(k)
    draws(eager), draws(replayed)  # warm-up: fills the caches a capture would see
    captured = (replayed._total, replayed._rng.offset, replayed._episode_ends)
    for k in range(K):
        add(100 + k)
        want = draws(eager)
        now = (replayed._total, replayed._rng.offset, replayed._episode_ends)
        replayed._total, replayed._rng.offset, replayed._episode_ends = captured
        with monkeypatch.context() as m:
            m.setattr(buffer_module, "_capturing", lambda device: True)
            got = draws(replayed)
        replayed._total, replayed._rng.offset, replayed._episode_ends = now
        replayed._rng.offset = eager._rng.offset  # the host copy an eager call would have advanced
        for i, (a, b) in enumerate(zip(flat(want), flat(got))):
            assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True)), \
                (k, i)


def draws(buf, batch=16, windows=(4, 2), episodes=(3, 24)) -> tuple:
    """Every sampler once (plain and n-step transitions, windows, packed episodes, the episode
    count and statistics), then the priorities of the plain sample where the buffer has them."""
    out = (buf.sample(batch), buf.sample(batch, n_step=3, gamma=0.9), buf.sample_sequences(*windows),
           buf.sample_episodes(episodes[0], max_rows=episodes[1]), buf.num_episodes, buf.episode_stats())
    if buf.priority_alpha is not None:
        buf.update_priorities(out[0]["index"], out[0]["obs"][:, 0].abs())
    return out


def _tensors(obj, path="buf", seen=None, out=None) -> dict[str, int]:
    """The address of every tensor reachable from a buffer's attributes, by path."""
    seen = set() if seen is None else seen
    out = {} if out is None else out
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out[path] = obj.data_ptr()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{path}[{k!r}]", seen, out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{path}[{i}]", seen, out)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _tensors(getattr(obj, f.name), f"{path}.{f.name}", seen, out)
    elif type(obj).__module__.startswith("gpubuffers") and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            _tensors(v, f"{path}.{k}", seen, out)
    return out


@pytest.mark.parametrize("marks,autoreset,prio,backend", [(m, a, p, "torch") for m, a in MODES for p in (None, 0.6)]
                         + [("last", "same_step", 0.6, b) for b in BACKENDS if b != "torch"])
def test_eager_calls_keep_every_tensor_a_graph_reads_in_place(marks, autoreset, prio, backend):
    """A graph replays reads and writes at the addresses it captured: after the warm-up, adds and
    every sampler over many wraps of the ring write the storage, index, tree and side tables in
    place and never rebind them. The one exception is the per-add episode count, which a
    captured call builds for itself (see the test above)."""
    buf = make(marks, autoreset, backend, prio)
    g = torch.Generator().manual_seed(2)

    def add_and_draw(k):
        obs, done, trunc, final = step_for(k, g)
        buf.add(obs, done, truncated=trunc, final_obs=final if autoreset == "same_step" else None)
        if k == 0:
            return  # a transition needs its successor row
        s = buf.sample(8)
        buf.sample(8, n_step=3, gamma=0.9), buf.sample_sequences(2, 2), buf.sample_episodes(2, max_rows=16)
        buf.episode_stats(), buf.episode_stats(2), buf.num_episodes
        if prio:
            buf.update_priorities(s["index"], s["reward"].abs())

    for k in range(6):
        add_and_draw(k)
    before = {p: a for p, a in _tensors(buf).items() if not p.startswith("buf._episode_ends")}
    assert any(p.startswith("buf._ix.") for p in before) and any(p.startswith("buf._storage") for p in before)
    # Three wraps of the ring; one where the kernels are interpreted (each call is slow there).
    for k in range((ROWS + 1) if backend == "triton" and INTERPRETED else (3 * ROWS + 1)):
        add_and_draw(100 + k)
    after = _tensors(buf)
    assert {p: after.get(p) for p in before} == before


def flat(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in flat(tree[k])]
    return [t for x in tree for t in flat(x)]
