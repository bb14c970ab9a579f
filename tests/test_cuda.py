"""GPU-only checks: they run wherever CUDA is available and are skipped elsewhere (a skip here
is not a pass: the CPU suite proves results under the Triton interpreter instead)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from gpubuffers import ReplayBuffer  # noqa: E402
from test_graph_cursors import draws, flat as _flat  # noqa: E402

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
    a = ReplayBuffer(64 * N, N, done_marks=marks, autoreset=autoreset, seed=0, priority_alpha=0.6)
    b = ReplayBuffer(64 * N, N, done_marks=marks, autoreset=autoreset, seed=0, backend="torch",
                     priority_alpha=0.6)
    fill(a, 150)
    fill(b, 150)
    assert a._ops.name == "triton"
    for name in ("start", "end_flags", "ret", "final_idx", "fin_head"):
        assert torch.equal(getattr(a.index, name), getattr(b.index, name)), name
    # Priorities: every stored transition at the initial 1.0 (exact sums), then one update.
    ids = torch.arange(100 * N, 140 * N, 3, device="cuda")
    prio = (torch.arange(ids.shape[0], device="cuda") % 8).float() / 4
    for buf in (a, b):
        buf.update_priorities(ids, prio)
    for name in ("leaf", "sums", "mins", "maxp"):
        x, y = getattr(a._tree, name), getattr(b._tree, name)
        if name == "leaf":
            x, y = x[:-1], y[:-1]
        assert torch.allclose(x, y, rtol=1e-6, atol=0) and torch.equal(x > 0, y > 0), name


@pytest.mark.parametrize("autoreset", ["same_step", "next_step"])
@pytest.mark.parametrize("prio", [None, 0.6])
def test_no_host_sync_in_add_and_samplers(autoreset, prio):
    buf = ReplayBuffer(64 * N, N, done_marks="last", autoreset=autoreset, seed=0, priority_alpha=prio)
    fill(buf, 70)
    s = buf.sample(256, n_step=3, gamma=0.99)  # warm-up
    buf.sample_sequences(64, 8), buf.sample_episodes(8, max_rows=512)
    if prio:
        buf.update_priorities(s["index"], s["return"].abs())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fill(buf, 5)
        for _ in range(3):
            s = buf.sample(256, n_step=3, gamma=0.99)
            q = buf.sample_sequences(64, 8)
            if prio:
                buf.update_priorities(s["index"], s["return"].abs())
                buf.update_priorities(q["index"][:, 0], torch.rand(64, device="cuda"))
            buf.sample_episodes(8, max_rows=512)
            buf.episode_stats()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_device_named_without_an_index(device):
    # CUDA tensors report cuda:0: a buffer built on "cuda" must accept them.
    buf = ReplayBuffer(64 * N, N, device=device, done_marks="last", seed=0)
    assert buf.device == torch.device("cuda", torch.cuda.current_device())
    fill(buf, 5)
    assert buf.sample(8)["obs"].device == buf.device


def static_inputs():
    step = {"obs": torch.empty(N, 16, device="cuda"), "action": torch.empty(N, 4, device="cuda"),
            "reward": torch.empty(N, device="cuda"),
            "info": {"row": torch.empty(N, dtype=torch.int64, device="cuda")}}
    return step, torch.empty(N, dtype=torch.bool, device="cuda"), torch.empty(N, dtype=torch.bool, device="cuda"), \
        torch.empty(N, 16, device="cuda")


def refill(inputs, k, g):
    step, term, trunc, final = inputs
    for t in (step["obs"], step["action"], step["reward"], final):
        t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
    step["info"]["row"].fill_(1000 + k)
    term.copy_(torch.rand(N, generator=g, device="cuda") < 0.05)
    trunc.copy_(torch.rand(N, generator=g, device="cuda") < 0.05)


@pytest.mark.parametrize("prio", [None, 0.6])
@pytest.mark.parametrize("marks", ["first", "last"])
def test_add_and_sample_replay_in_a_cuda_graph(marks, prio):
    # add + every sampler captured once and replayed K times equals K eager calls: every replay
    # writes a new row (the cursors live on the device) and draws new samples.
    K = 5
    eager = ReplayBuffer(64 * N, N, done_marks=marks, seed=0, priority_alpha=prio)
    graphed = ReplayBuffer(64 * N, N, done_marks=marks, seed=0, priority_alpha=prio)
    fill(eager, 62)
    fill(graphed, 62)  # the replays wrap the 64-row ring
    inputs = static_inputs()

    def call(buf):
        step, term, trunc, final = inputs
        buf.add(step, terminated=term, truncated=trunc, final_obs=final)
        out = (buf.sample(512), buf.sample_sequences(64, 8), buf.sample_episodes(8, max_rows=512),
               buf.episode_stats(), buf.episode_stats(last_rows=4), buf.sample(512, n_step=3, gamma=0.99))
        if prio:
            buf.update_priorities(out[0]["index"], out[0]["obs"][:, 0].abs())
        return out

    g_warm = torch.Generator(device="cuda").manual_seed(4)
    refill(inputs, -1, g_warm)
    call(eager), call(graphed)  # warm-up: compiles the kernels, builds the gather plans
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    g_in = torch.Generator(device="cuda").manual_seed(5)
    refill(inputs, 0, g_in)
    with torch.cuda.graph(graph):
        got = call(graphed)   # capture only: nothing runs yet
    g_in = torch.Generator(device="cuda").manual_seed(5)
    for k in range(K):
        refill(inputs, k, g_in)
        want = [t.clone() for t in _flat(call(eager))]
        graph.replay()
        torch.cuda.synchronize()
        have = _flat(got)
        assert len(have) == len(want)
        for i, (a, b) in enumerate(zip(have, want)):
            assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True)), (k, i)
    for name in ("start", "end_flags", "ret", "final_idx", "fin_head", "state"):
        assert torch.equal(getattr(graphed.index, name), getattr(eager.index, name)), name
    if prio:
        for name in ("leaf", "sums", "mins", "maxp"):
            x, y = getattr(graphed._tree, name), getattr(eager._tree, name)
            assert torch.equal(x[:-1] if name == "leaf" else x, y[:-1] if name == "leaf" else y), name
    assert int(graphed.index.state[0]) == eager.num_adds



@pytest.mark.parametrize("prio", [None, 0.6])
def test_samplers_replayed_from_a_cuda_graph_see_eager_adds(prio):
    # The off-policy loop's pattern: adds run eagerly, the samplers (and priority updates) replay
    # from a graph captured after a warm-up that filled every cache. Each replay must draw from
    # the rows added since, episodes included (their count is per add), as K eager calls do.
    K = 6
    eager = ReplayBuffer(16 * N, N, done_marks="last", seed=0, priority_alpha=prio)
    graphed = ReplayBuffer(16 * N, N, done_marks="last", seed=0, priority_alpha=prio)
    fill(eager, 14)
    fill(graphed, 14)

    def draw(buf):
        return draws(buf, 512, (64, 8), (8, 512))

    draw(eager), draw(graphed)  # warm-up: compiles, builds the gather plans and the episode count
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = draw(graphed)
    inputs = static_inputs()
    g_in = torch.Generator(device="cuda").manual_seed(6)
    for k in range(K):  # the adds wrap the 16-row ring
        refill(inputs, k, g_in)
        step, term, trunc, final = inputs
        for buf in (eager, graphed):
            buf.add(step, terminated=term, truncated=trunc, final_obs=final)
        want = [t.clone() for t in _flat(draw(eager))]
        graph.replay()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(_flat(got), want)):
            assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True)), (k, i)


@pytest.mark.parametrize("marks", ["first", "last"])
@pytest.mark.parametrize("autoreset", ["same_step", "next_step"])
def test_rollout_on_cuda_matches_torch_and_never_syncs(marks, autoreset):
    from gpubuffers import RolloutBuffer

    steps, lanes = 32, N
    bufs = [RolloutBuffer(steps, lanes, device="cuda", done_marks=marks, autoreset=autoreset, seed=0, backend=b)
            for b in ("triton", "torch")]
    g = torch.Generator(device="cuda").manual_seed(0)
    for rollout in range(3):
        data = []
        for t in range(steps):
            done = torch.rand(lanes, generator=g, device="cuda") < 0.05
            step = {"obs": torch.randn(lanes, 8, generator=g, device="cuda"),
                    "reward": torch.randn(lanes, generator=g, device="cuda"),
                    "value": torch.randn(lanes, 1, generator=g, device="cuda"),
                    "h": torch.randn(lanes, 2, 4, generator=g, device="cuda")}
            fv = torch.randn(lanes, generator=g, device="cuda") if autoreset == "same_step" else None
            data.append((step, done, torch.rand(lanes, generator=g, device="cuda") < 0.5, fv))
        last = torch.randn(lanes, generator=g, device="cuda")
        nxt = {} if marks == "last" else {"next_done": data[0][1], "next_truncated": data[0][2]}
        outs = []
        for i, ro in enumerate(bufs):
            torch.cuda.synchronize()
            if i == 0 and rollout > 0:
                torch.cuda.set_sync_debug_mode("error")
            try:
                for step, done, trunc, fv in data:
                    ro.add(step, done, truncated=trunc, final_value=fv)
                out = ro.compute_returns(last, 0.99, 0.95, normalize_advantage=rollout == 2, **nxt)
                batches = [b["advantage"].sum() for b in ro.minibatches(4, 2)]
                seqs = [b["initial_hidden"].sum() for b in ro.sequences(4, 1, hidden_key="h")]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            outs.append({k: v.clone() for k, v in out.items()})
            del batches, seqs
        assert bufs[0]._ops.name == "triton"
        for k in ("advantage", "return"):
            torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-5)
        for name in ("start", "end_flags"):
            assert torch.equal(getattr(bufs[0].index, name), getattr(bufs[1].index, name))


def test_checkpoint_resumes_on_cuda_and_moves_to_cpu(tmp_path):
    pytest.importorskip("safetensors")
    a = ReplayBuffer(64 * N, N, done_marks="last", seed=0, priority_alpha=0.6)
    fill(a, 40)
    a.save(tmp_path / "c.safetensors")
    b = ReplayBuffer.load(tmp_path / "c.safetensors")  # back onto CUDA, the Triton backend
    assert b.device.type == "cuda" and b._ops.name == "triton"
    for buf in (a, b):
        fill(buf, 10, seed=7)
    sa, sb = a.sample(256, n_step=3, gamma=0.99), b.sample(256, n_step=3, gamma=0.99)
    for k in ("obs", "index", "weight", "return"):
        assert torch.equal(sa[k], sb[k]), k
    c = ReplayBuffer.load(tmp_path / "c.safetensors", device="cpu")
    d = ReplayBuffer.load(tmp_path / "c.safetensors")
    assert c.device.type == "cpu" and c._ops.name == "torch" and c.num_adds == 40
    for p in c.storage:
        assert torch.equal(c.storage[p], d.storage[p].cpu()), p
    for name in ("start", "end_flags", "ret", "final_idx", "fin_head", "state"):
        assert torch.equal(getattr(c.index, name), getattr(d.index, name).cpu()), name
    assert torch.equal(c._tree.leaf, d._tree.leaf.cpu())


@pytest.mark.parametrize("autoreset", ["same_step", "next_step"])
def test_storage_dtypes_on_cuda_widen_in_the_gather_and_never_sync(autoreset):
    # bf16 obs and an int64 leaf stored as int16: the fused gather widens on the GPU what the
    # ring holds, and sampling stays sync-free.
    buf = ReplayBuffer(64 * N, N, done_marks="last", autoreset=autoreset, seed=0,
                       storage_dtypes={"obs": torch.bfloat16, "info/row": torch.int16})
    fill(buf, 90)
    assert buf.storage["obs"].dtype == torch.bfloat16 and buf._ops.name == "triton"
    buf.sample(512), buf.sample_sequences(64, 8)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = buf.sample(512, n_step=3, gamma=0.99)
        q = buf.sample_sequences(64, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    obs, row = buf.storage["obs"].view(-1, 16), buf.storage["info/row"].view(-1)
    slot = s["index"] % buf.capacity
    assert s["obs"].dtype == torch.float32 and s["info"]["row"].dtype == torch.int64
    assert torch.equal(s["obs"], obs[slot].float()) and torch.equal(s["info"]["row"], row[slot].long())
    assert torch.equal(s["info"]["row"], s["index"] // N)
    qslot = q["index"] % buf.capacity
    assert torch.equal(q["obs"], obs[qslot].float())


@pytest.mark.parametrize("marks", ["first", "last"])
def test_a_host_mirror_is_fed_without_host_syncs_and_holds_what_a_direct_add_would(marks):
    # Isaac Lab reuses its step tensors: they are overwritten in place right after each add.
    tier = ReplayBuffer(96 * N, N, done_marks=marks, seed=0, device="cpu", storage="shared",
                        storage_dtypes={"obs": torch.bfloat16})
    twin = ReplayBuffer(96 * N, N, done_marks=marks, seed=0, device="cpu", storage="shared",
                        storage_dtypes={"obs": torch.bfloat16})
    ring = ReplayBuffer(16 * N, N, done_marks=marks, seed=0, mirror=tier)
    g = torch.Generator(device="cuda").manual_seed(0)
    step = {"obs": torch.empty(N, 16, device="cuda"), "reward": torch.empty(N, device="cuda")}
    done, final = torch.empty(N, dtype=torch.bool, device="cuda"), torch.empty(N, 16, device="cuda")
    for t in range(200):
        torch.randn(N, 16, generator=g, device="cuda", out=step["obs"])
        torch.randn(N, generator=g, device="cuda", out=step["reward"])
        torch.lt(torch.rand(N, generator=g, device="cuda"), 0.05, out=done)
        torch.randn(N, 16, generator=g, device="cuda", out=final)
        twin.add({k: v.cpu() for k, v in step.items()}, done.cpu(), final_obs=final.cpu())
        if t >= 1:  # the first add allocates both buffers
            torch.cuda.set_sync_debug_mode("error")
        try:
            ring.add(step, done, final_obs=final)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ring.sync_mirror()
    assert tier.num_adds == twin.num_adds == 200
    a, b = tier.state_dict()["tensors"], twin.state_dict()["tensors"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("storage", ["shared", "disk"])
def test_workers_of_a_shared_buffer_feed_the_gpu_through_pinned_memory(storage, tmp_path):
    from torch.utils.data import DataLoader

    from gpubuffers import BufferDataset

    where = {"path": tmp_path / "b"} if storage == "disk" else {}
    buf = ReplayBuffer(64 * 8, 8, device="cpu", storage=storage, done_marks="last", seed=0, **where)
    for t in range(40):
        buf.add({"obs": torch.full((8, 3), float(t)), "reward": torch.ones(8)}, torch.zeros(8, dtype=torch.bool))
    loader = DataLoader(BufferDataset(buf, 32, kind="sequences", length=4, num_batches=6), batch_size=None,
                        num_workers=2, pin_memory=True)
    for batch in loader:
        assert batch["obs"].is_pinned()
        obs = batch["obs"].to("cuda", non_blocking=True)
        rows = (batch["index"] // 8).to("cuda", non_blocking=True)
        assert torch.equal(obs[..., 0], rows.float())


def _example(name):
    """A module of examples/ (they import each other by name)."""
    import importlib
    import os
    import sys

    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    return importlib.import_module(name)


@pytest.mark.parametrize("prioritized", [False, True])
def test_td3_iterations_replayed_from_a_cuda_graph_equal_eager_ones(prioritized):
    """The learner's iteration (n-step samples, priority updates, both optimizers, target
    updates) captured once and replayed K times, with adds in between that wrap the ring, equals
    K eager iterations of a twin: same parameters, same priorities, same random streams."""
    td3 = _example("td3")
    argv = ["--device", "cuda", "--batch-size", "256", "--updates", "4", "--hidden", "32", "--cuda-graph"]
    args = td3.parse(argv + (["--prioritized"] if prioritized else []))
    lanes, rows = 64, 16
    twins = []
    for _ in range(2):
        buf = td3.ReplayBuffer(rows * lanes, lanes, device="cuda", done_marks="last", seed=3,
                               priority_alpha=0.6 if prioritized else None)
        torch.manual_seed(0)
        gen = torch.Generator(device="cuda").manual_seed(1)
        twins.append((buf, td3.Learner(args, buf, 3, 1, 2.0, gen)))
    g = torch.Generator(device="cuda").manual_seed(2)

    def add_all(k):
        step = {"obs": torch.randn(lanes, 3, generator=g, device="cuda"),
                "action": torch.randn(lanes, 1, generator=g, device="cuda"),
                "reward": torch.randn(lanes, generator=g, device="cuda")}
        term = torch.rand(lanes, generator=g, device="cuda") < 0.05
        trunc = torch.rand(lanes, generator=g, device="cuda") < 0.05
        final = torch.randn(lanes, 3, generator=g, device="cuda")
        for buf, _ in twins:
            buf.add(step, terminated=term, truncated=trunc, final_obs=final)

    for k in range(8):
        add_all(k)
    (_, eager), (_, graphed) = twins
    for _ in range(3):  # what capture() runs as its warm-up
        eager.iteration(None)
    graphed.capture()
    for k in range(3 * rows):  # replays wrap the 16-row ring three times
        add_all(100 + k)
        eager.iteration(None)
        graphed.graph.replay()
    torch.cuda.synchronize()
    for a, b in ((eager.actor, graphed.actor), (eager.critic, graphed.critic), (eager.critic_t, graphed.critic_t)):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa)
    if prioritized:
        torch.testing.assert_close(twins[1][0]._tree.leaf, twins[0][0]._tree.leaf)
