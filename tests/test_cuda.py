"""GPU-only checks: they run wherever CUDA is available and are skipped elsewhere (a skip here
is not a pass: the CPU suite proves results under the Triton interpreter instead)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from gpubuffers import ReplayBuffer  # noqa: E402

N = 1024


def fill(buf, adds, seed=0, final=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    for t in range(adds):
        done = torch.rand(N, generator=g, device="cuda") < 0.05
        step = {"obs": torch.randn(N, 16, generator=g, device="cuda"),
                "action": torch.randn(N, 4, generator=g, device="cuda"),
                "reward": torch.randn(N, generator=g, device="cuda"),
                "info": {"row": torch.full((N,), t, device="cuda")}}
        fo = torch.randn(N, 16, generator=g, device="cuda") if final and buf.autoreset == "same_step" else None
        buf.add(step, done, final_obs=fo, truncated=torch.rand(N, generator=g, device="cuda") < 0.5)


@pytest.mark.parametrize("marks", ["first", "last"])
@pytest.mark.parametrize("autoreset", ["same_step", "next_step"])
def test_cuda_defaults_to_triton_and_matches_torch_index(marks, autoreset):
    a = ReplayBuffer(64 * N, N, done_marks=marks, autoreset=autoreset, seed=0)
    b = ReplayBuffer(64 * N, N, done_marks=marks, autoreset=autoreset, seed=0, backend="torch")
    fill(a, 150)
    fill(b, 150)
    assert a._ops.name == "triton"
    for name in ("start", "end_flags", "ret", "final_idx", "fin_head"):
        assert torch.equal(getattr(a.index, name), getattr(b.index, name)), name


@pytest.mark.parametrize("autoreset", ["same_step", "next_step"])
def test_no_host_sync_in_add_and_samplers(autoreset):
    buf = ReplayBuffer(64 * N, N, done_marks="last", autoreset=autoreset, seed=0)
    fill(buf, 70)
    buf.sample(256), buf.sample_sequences(64, 8), buf.sample_episodes(8, max_rows=512)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fill(buf, 5)
        for _ in range(3):
            buf.sample(256)
            buf.sample_sequences(64, 8)
            buf.sample_episodes(8, max_rows=512)
            buf.episode_stats()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_add_and_sample_replay_in_a_cuda_graph():
    eager = ReplayBuffer(64 * N, N, done_marks="last", seed=0)
    graphed = ReplayBuffer(64 * N, N, done_marks="last", seed=0)
    fill(eager, 80)
    fill(graphed, 80)
    g = torch.Generator(device="cuda").manual_seed(5)
    step = {"obs": torch.randn(N, 16, generator=g, device="cuda"),
            "action": torch.randn(N, 4, generator=g, device="cuda"),
            "reward": torch.randn(N, generator=g, device="cuda"),
            "info": {"row": torch.full((N,), 80, device="cuda")}}
    done = torch.rand(N, generator=g, device="cuda") < 0.1
    final = torch.randn(N, 16, generator=g, device="cuda")

    # Warm up both alike (compiles the kernels, builds the gather plans outside the capture).
    eager.sample(512)
    graphed.sample(512)
    torch.cuda.synchronize()

    eager.add(step, done, final_obs=final)
    want = eager.sample(512)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.add(step, done, final_obs=final)
        got = graphed.sample(512)
    graph.replay()
    torch.cuda.synchronize()
    for key in ("index", "is_first", "is_last", "terminated", "truncated", "next_valid"):
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(got["obs"], want["obs"]) and torch.equal(got["next"]["obs"], want["next"]["obs"])
    for name in ("start", "end_flags", "ret"):
        assert torch.equal(getattr(graphed.index, name), getattr(eager.index, name)), name
