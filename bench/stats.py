"""``python -m bench.stats [--device DEV] [--repeats R] [--out DIR]``: the cost of
``episode_stats`` against capacity.

``buf.episode_stats()`` (every live row) and ``buf.episode_stats(last_rows=1)`` (the newest row)
read per-row sums kept as rows are written. The baseline is the statistic by definition, as the
buffer computed it before: a scan of the whole episode index that counts the slots with end flags
set whose row is live and inside the window (``gpubuffers.reference.slot_age`` and
``buf.index``), and sums their lengths and returns. Both run on buffers of capacity 2^16 and 2^22
(N = 4096 lanes, so 16 and 1024 rows; obs float32[2] and reward float32; done_marks="last",
episodes end with probability 1/20 per step), filled past the seam so every index row is live.
All eight calls are timed interleaved in one run, in a fresh random order each repeat (a scan at
2^22 evicts the caches for whichever call follows it), median of repeats, warm-up excluded,
synced around each timing; the results of both ways are checked equal. Printed as ratios only: each
call against the scan at the same size, and each at 2^22 against itself at 2^16. Raw medians go
to ``stats_<device>.csv`` (default folder bench/results) with provenance.
"""

from __future__ import annotations

import argparse
import csv
import os

import torch

from gpubuffers import ReplayBuffer
from gpubuffers.reference import slot_age

from .__main__ import provenance
from .timing import interleaved

LANES = 4096
SIZES = {"2^16": 1 << 16, "2^22": 1 << 22}


def filled(device: torch.device, capacity: int, seed: int = 0) -> ReplayBuffer:
    g = torch.Generator(device=device).manual_seed(seed)
    buf = ReplayBuffer(capacity, LANES, device=device, done_marks="last", seed=seed)
    steps = [({"obs": torch.randn(LANES, 2, generator=g, device=device),
               "reward": torch.randn(LANES, generator=g, device=device)},
              torch.rand(LANES, generator=g, device=device) < 0.05) for _ in range(8)]
    for i in range(buf.rows + buf.rows // 2 + 3):  # past the seam: every row live, the ring wrapped
        buf.add(*steps[i % 8])
    return buf


def scan_stats(buf: ReplayBuffer, last_rows: int | None = None) -> dict[str, torch.Tensor]:
    """The statistics by definition: one pass over the whole index (the previous implementation)."""
    live = buf.live_rows
    last_rows = live if last_rows is None else min(last_rows, live)
    ix, oldest = buf.index, buf.oldest_row
    age = slot_age(buf.rows, LANES, oldest, buf.device)
    ended = (ix.end_flags != 0) & (age < live) & (age >= live - last_rows)
    count = ended.sum()
    lengths = ((age + oldest + 1 - ix.start) * ended).sum().double()
    returns = (ix.ret.double() * ended).sum()
    return {"count": count, "mean_length": lengths / count, "mean_return": returns / count}


def check(buf: ReplayBuffer, last_rows: int | None, size: str) -> None:
    new, ref = buf.episode_stats(last_rows), scan_stats(buf, last_rows)
    if int(new["count"]) != int(ref["count"]) or not all(
            torch.allclose(new[k].double(), ref[k].double(), rtol=1e-9, atol=1e-9)
            for k in ("mean_length", "mean_return")):
        raise AssertionError(f"episode_stats(last_rows={last_rows}) at {size}: {new} differs from the scan {ref}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for the CSV (default bench/results)")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prov = provenance(device)
    bufs = {size: filled(device, cap) for size, cap in SIZES.items()}
    calls = {"episode_stats()": (lambda b: b.episode_stats(), "scan (all live rows)"),
             "episode_stats(last_rows=1)": (lambda b: b.episode_stats(last_rows=1), "scan (last_rows=1)"),
             "scan (all live rows)": (lambda b: scan_stats(b), None),
             "scan (last_rows=1)": (lambda b: scan_stats(b, 1), None)}
    for size, buf in bufs.items():
        check(buf, None, size)
        check(buf, 1, size)
    fns = {(call, size): (lambda f=f, b=buf: f(b)) for call, (f, _) in calls.items() for size, buf in bufs.items()}
    t = interleaved(fns, device, repeats=args.repeats, warmup=2, shuffle=True)

    small, large = SIZES
    print(f"# episode_stats against capacity on {prov['device']}; gpubuffers {prov['gpubuffers']}, "
          f"commit {prov['commit']}\n")
    print(f"N = {LANES} lanes, rows {bufs[small].rows} ({small}) and {bufs[large].rows} ({large}); "
          f"episodes ended in the live rows: {int(bufs[small].episode_stats()['count'])} and "
          f"{int(bufs[large].episode_stats()['count'])}; results equal to the scan at both sizes. "
          f"Median of {args.repeats} interleaved repeats.\n")
    print(f"| call | time / scan at {small} | time / scan at {large} | time at {large} / time at {small} |")
    print("|---|---|---|---|")
    rows = []
    for call, (_, base) in calls.items():
        vs = [t[(call, s)].median_s / t[(base or call, s)].median_s for s in SIZES]
        growth = t[(call, large)].median_s / t[(call, small)].median_s
        print(f"| {call} | {vs[0]:.4f}x | {vs[1]:.4f}x | {growth:.2f}x |")
        for s, v in zip(SIZES, vs):
            rows.append([call, SIZES[s], bufs[s].rows, f"{1e3 * t[(call, s)].median_s:.5f}",
                         f"{1e3 * t[(call, s)].min_s:.5f}", f"{1e3 * t[(call, s)].max_s:.5f}",
                         base or call, f"{v:.5f}", f"{growth:.3f}"])
    print("\nLower is faster; ratios of medians measured in the same run.")

    out = args.out or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"stats_{'cuda' if device.type == 'cuda' else 'cpu'}.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["call", "capacity", "rows", "median_ms", "min_ms", "max_ms", "baseline", "time_vs_baseline",
                    f"time_{large}_vs_{small}", *prov])
        for r in rows:
            w.writerow([*r, *prov.values()])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
