"""Cursors on the device: a captured CUDA graph replays its launches with the host values they
were captured with. Here the same is expressed on any device: before each call of the "replayed"
buffer its host counters are put back to their values at "capture", so every op must take the
row it writes, the live rows and the random offset from the device state, as a graph replay
would; K such calls must equal K eager calls (and would repeat one row and one draw otherwise).
On CUDA, tests/test_cuda.py captures a real graph and replays it."""

from __future__ import annotations

import os

import pytest
import torch

from compare import interpreted_slow
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


def flat(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in flat(tree[k])]
    return [t for x in tree for t in flat(x)]
