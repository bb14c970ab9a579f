"""Where a call's time goes on CUDA: launches per call, GPU kernel time, host time.

``python -m bench.profile_calls`` (CUDA only): N = 4096 lanes, obs float32[64], action
float32[12], reward, capacity 2^20, done_marks="last", on the default (Triton) backend. For each
call: kernel launches per call and the GPU time they take (torch.profiler), the host time to
issue one call (back-to-back calls, no sync: Python, checks and launch overhead), and the eager
time per call between CUDA events. Prints a table and the kernels of the bare add by name.
Then prioritized replay at 2^26 slots: update_priorities of the previous sample's 4096 ids plus
sample(4096), eager and replayed from a CUDA graph.
"""

from __future__ import annotations

import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .graph import CAP, N, make_inputs, per_call_us

from gpubuffers import ReplayBuffer


def host_us(fn, calls=200):
    """Host time per call when the GPU keeps up: issue calls without syncing in between."""
    torch.cuda.synchronize()
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) * 1e6 / calls)
        torch.cuda.synchronize()
    return statistics.median(out)


def kernels(fn, calls=20):
    """(launches per call, GPU microseconds per call, Counter of kernel names) from the profiler."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    names = collections.Counter()
    gpu = 0.0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            names[e.name] += 1
            gpu += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    return sum(names.values()) / calls, gpu / calls, names


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench.profile_calls needs a CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    step, term, trunc, final = make_inputs(g)
    buf = ReplayBuffer(CAP, N, device="cuda", done_marks="last", seed=0)
    for _ in range(300):
        buf.add(step, terminated=term, truncated=trunc, final_obs=final)
    calls = {
        "add (bare)": lambda: buf.add(step, term),
        "add (recommended)": lambda: buf.add(step, terminated=term, truncated=trunc, final_obs=final),
        "sample(4096)": lambda: buf.sample(4096),
        "sample_sequences(256, 32)": lambda: buf.sample_sequences(256, 32),
        "sample_episodes(32, max_rows=8192)": lambda: buf.sample_episodes(32, max_rows=8192),
        "episode_stats()": lambda: buf.episode_stats(),
    }
    print(f"| call ({torch.cuda.get_device_name()}) | launches | GPU us | host us | eager us |")
    print("|---|---|---|---|---|")
    detail = {}
    for name, fn in calls.items():
        launches, gpu, names = kernels(fn)
        detail[name] = names
        print(f"| {name} | {launches:.0f} | {gpu:.1f} | {host_us(fn):.1f} | {per_call_us(fn):.1f} |")
    for name in ("add (bare)", "sample(4096)"):
        print(f"\nkernels of {name} (20 calls):")
        for k, c in detail[name].most_common():
            print(f"  {c:4d}  {k[:100]}")
    prioritized(step, term)


def prioritized(step, term, capacity: int = 1 << 26) -> None:
    """update_priorities(4096) + sample(4096) at ``capacity`` slots: launches, GPU time, host and
    eager time, and the time of a replayed CUDA graph of the same call."""
    buf = ReplayBuffer(capacity, N, device="cuda", seed=0, priority_alpha=0.6)
    for _ in range(capacity // N + 3):
        buf.add(step, term)
    prios = torch.rand(4096, device="cuda")
    ids = buf.sample(4096)["index"].clone()  # the previous sample's ids, in fixed memory for the graph

    def call():
        buf.update_priorities(ids, prios)
        ids.copy_(buf.sample(4096)["index"])

    launches, gpu, names = kernels(call)
    print(f"\n| prioritized, {capacity:,} slots | launches | GPU us | host us | eager us | graph us |")
    print("|---|---|---|---|---|---|")
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    print(f"| update(4096) + sample(4096) | {launches:.0f} | {gpu:.1f} | {host_us(call):.1f} | "
          f"{per_call_us(call):.1f} | {per_call_us(graph.replay):.1f} |")
    for k, c in names.most_common():
        print(f"  {c:4d}  {k[:100]}")


if __name__ == "__main__":
    main()
