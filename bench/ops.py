"""``python -m bench.ops [--device DEV]``: each hot op alone, in GB/s of the bytes it must move,
for the pure-torch reference and (on CUDA) the Triton kernels, beside the plain-torch ring's
nearest equivalent, all in one run. On a CPU only the reference and the plain ring run.

Ops (N = 4096 lanes, capacity 2^20, obs float32[64], action float32[12], reward float32):
  add_step     the episode index update of one add (reads done, reward and the previous row;
               writes one row of start, end flags, returns)
  transitions  picking 4096 transitions with their links (reads start and end flags per item)
  windows      picking 256 windows of 32 rows (32 proposals per item) and laying out their
               slots and flags
  gather       every leaf plus the next obs of 4096 transitions
  priority update   update_priorities of 4096 transitions (leaves, then the nodes above them)
  priority draw     4096 stratified proportional transitions with their links and weights
  gae          GAE(lambda) over a rollout of T = 24 rows by N lanes (RolloutBuffer.compute_returns),
               beside the plain loop over T

and the fan-out of the priority tree: update + draw of 4096 at 2^20 and 2^24 slots for trees of
8 to 128 children per node.
"""

from __future__ import annotations

import argparse

import torch

from gpubuffers import ReplayBuffer, RolloutBuffer
from gpubuffers.reference import EpisodeIndex, PriorityTree

from .__main__ import device_name
from .core import make_steps
from .timing import interleaved

LANES, CAPACITY = 4096, 1 << 20


def filled(device: torch.device, backend: str) -> ReplayBuffer:
    steps = make_steps(LANES, device)
    buf = ReplayBuffer(CAPACITY, LANES, device=device, done_marks="last", seed=0, backend=backend,
                       priority_alpha=0.6)
    for i in range(CAPACITY // LANES + 3):
        s = steps[i % 8]
        buf.add({k: v for k, v in s.items() if k != "done"}, s["done"], final_obs=steps[(i + 1) % 8]["obs"])
    return buf


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    bufs = {b: filled(device, b) for b in backends}
    steps = make_steps(LANES, device)
    done, reward = steps[0]["done"], steps[0]["reward"]
    n = LANES
    moved = {
        "add_step": n * (1 + 4 + 8 + 1 + 4) + n * (8 + 1 + 4),
        "transitions": 4096 * (8 + 1 + 8 + 8 + 8 + 6),
        "windows": 256 * 32 * 8 + 256 * 32 * (8 + 8 + 1 + 2),
        "gather": 4096 * (64 + 12 + 1 + 64) * 4,
        # ids and priorities in, the leaves and one block of 32 children per level (4 levels)
        "priority update": 4096 * (8 + 4 + 4) + 4096 * 4 * 32 * 8,
        # one block of 32 children per level, then the links of transitions
        "priority draw": 4096 * 4 * 32 * 8 + 4096 * (8 + 1 + 8 + 8 + 8 + 6 + 4),
    }
    gen = torch.Generator(device=device).manual_seed(0)
    prios = torch.rand(4096, generator=gen, device=device)
    rows = []
    for op in moved:
        fns = {}
        for b, buf in bufs.items():
            ops, ix = buf._ops, buf.index
            if op == "add_step":
                # The index update of one add, then the cursor moves on (as add does).
                fns[b] = (lambda ops=ops, ix=ix: (ops.add_step(ix, done, None, None, False, reward, True, False),
                                                  ops.advance(ix)))
            elif op == "transitions":
                fns[b] = (lambda ops=ops, ix=ix, buf=buf: ops.sample_transitions(
                    ix, buf._rng, 4096, 1, False, buf._final_rows))
            elif op == "windows":
                fns[b] = (lambda ops=ops, ix=ix, buf=buf: ops.sample_windows(ix, buf._rng, 256, 32, 32))
            elif op == "priority update":
                ids = buf.sample(4096)["index"]
                fns[b] = (lambda ops=ops, ix=ix, buf=buf, ids=ids: ops.update_priorities(ix, buf._tree, ids, prios))
            elif op == "priority draw":
                fns[b] = (lambda ops=ops, ix=ix, buf=buf: ops.sample_prioritized_transitions(
                    ix, buf._tree, buf._rng, 4096, False, buf._final_rows, 0.4))
            else:
                # Fresh random slots on every call, as sampling produces (a fixed index would
                # time a cache-hot gather).
                entries = [(t, 0) for t in buf._flat.values()] + [(buf._next_src["obs"], 1)]

                def gather_fresh(ops=ops, e=entries):
                    slot = torch.randint(0, CAPACITY, (4096,), device=device)
                    return ops.gather(e, (slot, (slot + LANES) % CAPACITY))
                fns[b] = gather_fresh
        plain = bufs["torch"]
        if op == "add_step":
            fns["plain ring (copy of done)"] = (lambda t=plain.index.end_flags[0]: t.copy_(done))
        elif op == "gather":
            flat = list(plain._flat.values())

            def plain_gather():
                idx = torch.randint(0, CAPACITY, (4096,), device=device)
                return [t.index_select(0, idx) for t in flat]
            fns["plain ring (index_select, no next)"] = plain_gather
        t = interleaved(fns, device, repeats=args.repeats, inner=5)
        for name, timing in t.items():
            rows.append((op, name, moved[op] / timing.median_s / 1e9, timing.median_s / t[backends[0]].median_s))
    # The fused gather at a fixed 256 bytes per transition split into 1, 4 or 16 leaves: one
    # launch on the kernels whatever the count, one index_select per leaf on the reference.
    for leaves in (1, 4, 16):
        sources = [torch.randn(CAPACITY, 64 // leaves, device=device) for _ in range(leaves)]
        entries = [(t, 0) for t in sources]
        fns = {}
        for b, buf in bufs.items():
            def gather_leaves(ops=buf._ops, e=entries):
                return ops.gather(e, (torch.randint(0, CAPACITY, (4096,), device=device),))
            fns[b] = gather_leaves
        t = interleaved(fns, device, repeats=args.repeats, inner=5)
        for name, timing in t.items():
            rows.append((f"gather, 256 B in {leaves} leaves", name, 4096 * 256 / timing.median_s / 1e9,
                         timing.median_s / t[backends[0]].median_s))
    rows += gae_rows(device, backends, args.repeats)
    fanouts = fanout_sweep(device, backends, bufs, args.repeats)
    print(f"## Hot ops on {device_name(device)}\n")
    print("| op | provider | GB/s | time vs reference |\n|---|---|---|---|")
    for op, name, gbps, ratio in rows:
        label = {"torch": "reference (torch)", "triton": "Triton kernel"}.get(name, name)
        print(f"| {op} | {label} | {gbps:.2f} | {ratio:.2f}x |")
    print("\n## Priority tree fan-out: update + draw of 4096, time vs fan-out 32 at 2^20\n")
    print("| backend | slots | " + " | ".join(f"F={f}" for f in FANOUTS) + " |")
    print("|---|---|" + "---|" * len(FANOUTS))
    for (b, cap), times in fanouts.items():
        base = fanouts[(b, 1 << 20)][FANOUTS.index(32)]
        print(f"| {b} | 2^{cap.bit_length() - 1} | " + " | ".join(f"{t / base:.2f}" for t in times) + " |")


def gae_rows(device: torch.device, backends: list[str], repeats: int) -> list[tuple]:
    """compute_returns of a full rollout per backend, and the plain loop over T, interleaved."""
    from .rollout import GAMMA, LAM, T, make_rollout, plain_gae

    steps = make_rollout(device)
    last = torch.zeros(LANES, device=device)
    fns = {}
    for b in backends:
        ro = RolloutBuffer(T, LANES, device=device, seed=0, backend=b)
        for s in steps:
            ro.add({k: s[k] for k in ("reward", "value")}, terminated=s["terminated"], truncated=s["truncated"],
                   final_value=s["final_value"])
        fns[b] = lambda ro=ro: ro.compute_returns(last, GAMMA, LAM)
    reward = torch.stack([s["reward"] for s in steps])
    value = torch.stack([s["value"] for s in steps])
    done = torch.stack([s["terminated"] | s["truncated"] for s in steps])
    fns["plain loop over T"] = lambda: plain_gae(reward, value, done, last, GAMMA, LAM)
    # reward, value, final value and end flags read; advantage and return written (twice: the
    # op's outputs, then the leaves)
    moved = T * LANES * (4 + 4 + 4 + 1 + 4 * 4)
    t = interleaved(fns, device, repeats=repeats, inner=5)
    return [("gae", name, moved / timing.median_s / 1e9, timing.median_s / t[backends[0]].median_s)
            for name, timing in t.items()]


FANOUTS = (8, 16, 32, 64, 128)


def fanout_sweep(device: torch.device, backends: list[str], bufs: dict, repeats: int) -> dict:
    """Median seconds of update(4096) + draw(4096) per (backend, capacity), one per fan-out,
    on trees of random leaves; the index (4096 lanes, every row live) is built directly."""
    out = {}
    for cap in (1 << 20, 1 << 24):
        rows = cap // LANES
        ix = EpisodeIndex.empty(rows, LANES, device)
        ix.start.zero_()
        ix.state[0] = 3 * rows
        ids = torch.randint((2 * rows + 1) * LANES, (3 * rows - 1) * LANES, (4096,), device=device)
        prios = torch.rand(4096, device=device)
        for b in backends:
            ops, rng = bufs[b]._ops, bufs[b]._rng
            fns = {}
            for f in FANOUTS:
                tree = PriorityTree.empty(cap, LANES, 0.6, 1e-6, device, fanout=f)
                tree.leaf[:cap] = torch.rand(cap, device=device)
                ops.update_priorities(ix, tree, torch.arange(2 * rows * LANES, 3 * rows * LANES, device=device),
                                      torch.rand(cap, device=device))

                def both(t=tree):
                    ops.update_priorities(ix, t, ids, prios)
                    ops.sample_prioritized_transitions(ix, t, rng, 4096, False, 0, 0.4)
                fns[f] = both
            t = interleaved(fns, device, repeats=repeats, inner=3, shuffle=True)
            out[(b, cap)] = [t[f].median_s for f in FANOUTS]
    return out


if __name__ == "__main__":
    main()
