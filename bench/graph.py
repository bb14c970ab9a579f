"""Eager calls against the same calls captured once in a CUDA graph and replayed (CUDA only).

``python -m bench.graph``: N = 4096 lanes, obs float32[64], action float32[12], reward, capacity
2^20, done_marks="last". Times, per call, the median of 200 calls between CUDA events: the bare
add, the recommended add (terminated, truncated, final_obs), sample(4096) with next obs, and
sample_sequences(256, 32), each eager and as a replayed graph, and checks that K replays equal K
eager calls. Writes bench/results/graph_cuda.csv (or --out).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch

from gpubuffers import ReplayBuffer

N, CAP = 4096, 1 << 20


def make_inputs(g):
    dev = "cuda"
    step = {"obs": torch.randn(N, 64, generator=g, device=dev), "action": torch.randn(N, 12, generator=g, device=dev),
            "reward": torch.randn(N, generator=g, device=dev)}
    term = torch.rand(N, generator=g, device=dev) < 0.005
    trunc = torch.rand(N, generator=g, device=dev) < 0.005
    final = torch.randn(N, 64, generator=g, device=dev)
    return step, term, trunc, final


def per_call_us(fn, calls=200, repeats=5):
    """Median over ``repeats`` of the mean time per call of ``calls`` back-to-back calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(out)


def graphed(fn):
    """Capture ``fn`` once (after a warm-up on a side stream) and return the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.graph needs a CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    step, term, trunc, final = make_inputs(g)
    buf = ReplayBuffer(CAP, N, device="cuda", done_marks="last", seed=0)
    for _ in range(300):  # past the seam (256 rows)
        buf.add(step, terminated=term, truncated=trunc, final_obs=final)
    calls = {
        "add (bare)": lambda: buf.add(step, term),
        "add (recommended: terminated, truncated, final_obs)":
            lambda: buf.add(step, terminated=term, truncated=trunc, final_obs=final),
        "sample(4096) with next obs": lambda: buf.sample(4096),
        "sample_sequences(256, 32)": lambda: buf.sample_sequences(256, 32),
    }
    rows = []
    for name, fn in calls.items():
        eager = per_call_us(fn)
        replay = graphed(fn)
        graph = per_call_us(replay)
        rows.append((name, eager, graph))
    # K replays of add + sample equal K eager calls on a twin buffer.
    twin = ReplayBuffer(CAP, N, device="cuda", done_marks="last", seed=1)
    mirror = ReplayBuffer(CAP, N, device="cuda", done_marks="last", seed=1)
    for b in (twin, mirror):
        for _ in range(260):
            b.add(step, terminated=term, truncated=trunc, final_obs=final)
        b.sample(4096)
    holder = {}

    def both():
        twin.add(step, terminated=term, truncated=trunc, final_obs=final)
        holder["s"] = twin.sample(4096)
    replay = graphed(both)  # the warm-up inside ran once eagerly: mirror it
    mirror.add(step, terminated=term, truncated=trunc, final_obs=final)
    mirror.sample(4096)
    same = True
    for _ in range(5):
        mirror.add(step, terminated=term, truncated=trunc, final_obs=final)
        want = mirror.sample(4096)
        replay()
        torch.cuda.synchronize()
        same &= torch.equal(holder["s"]["index"], want["index"]) and torch.equal(holder["s"]["next"]["obs"],
                                                                                    want["next"]["obs"])
    name = torch.cuda.get_device_name()
    print(f"| call ({name}, N={N}, capacity 2^20) | eager us/call | CUDA graph us/call |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} |")
    print(f"\n5 replays of add + sample(4096) equal 5 eager calls: {same}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "graph_cuda.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["call", "eager_us", "graph_us", "device", "torch", "replays_equal_eager"])
        for r in rows:
            w.writerow([r[0], f"{r[1]:.2f}", f"{r[2]:.2f}", name, torch.__version__, same])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
