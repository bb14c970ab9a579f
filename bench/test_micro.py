"""pytest-benchmark micro-benchmarks of add and each sampler, kept out of the default test run.

Run: ``python -m pytest bench/test_micro.py --benchmark-only`` (add ``--benchmark-json out.json``
to keep the figures). The device is CUDA when available, else the CPU.
"""

from __future__ import annotations

import pytest
import torch

from gpubuffers import ReplayBuffer

from .core import make_steps
from .timing import sync

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LANES, CAPACITY = 4096, 1 << 20


@pytest.fixture(scope="module")
def filled():
    steps = make_steps(LANES, DEVICE)
    data = [{k: v for k, v in s.items() if k != "done"} for s in steps]
    buf = ReplayBuffer(CAPACITY, LANES, device=DEVICE, done_marks="last", seed=0)
    for i in range(CAPACITY // LANES + 3):
        buf.add(data[i % 8], steps[i % 8]["done"], final_obs=data[(i + 1) % 8]["obs"])
    return buf, steps, data


def run(benchmark, fn):
    def call():
        fn()
        sync(DEVICE)
    benchmark.pedantic(call, rounds=30, iterations=5, warmup_rounds=3)


def test_add(benchmark, filled):
    buf, steps, data = filled
    i = iter(range(10**9))
    run(benchmark, lambda: (lambda k: buf.add(data[k % 8], steps[k % 8]["done"]))(next(i)))


def test_sample_transitions(benchmark, filled):
    run(benchmark, lambda: filled[0].sample(4096))


def test_sample_sequences(benchmark, filled):
    run(benchmark, lambda: filled[0].sample_sequences(256, 32))


def test_sample_episodes(benchmark, filled):
    run(benchmark, lambda: filled[0].sample_episodes(32, max_rows=32 * 256))
