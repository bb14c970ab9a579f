"""``python -m bench.packing [--device DEV] [--batches K] [--out DIR]``: packing skew of
``sample_episodes`` when ``max_rows`` is too small for the draws.

The buffer holds equal numbers of finished 2-row and 30-row episodes (every lane plays a random
order of as many short as long episodes, ending its last one on the last row added, with no
overwritten rows, so every stored episode is whole and drawable and the counts are exactly
equal). For each batch size B and budget ``max_rows`` it draws K batches (400 for B <= 64, as many
draws for B = 256) and reports:

- drawn: the fraction of short episodes among all B draws of each batch (0.5 when draws are
  uniform over episodes), read from a buffer sampled with the default ``max_rows``, which
  keeps every draw;
- prefix (the buffer's rule): episodes are kept in draw order until the first that does not fit;
  the fraction of items kept, of short episodes among the kept ones, and of the budget's rows
  used, read from the buffer's own output (``valid``, ``length``) for a buffer built and seeded
  like the first one, so that it makes the same draws (checked against the rule applied to those
  draws);
- first-fit: every draw that still fits is kept, the ones that do not are skipped; computed on
  the host from the same draws.

Nothing is timed. Writes ``packing_<device>.csv`` (default folder bench/results).
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch

from gpubuffers import ReplayBuffer

from .__main__ import provenance

SHORT, LONG = 2, 30


def filled(device: torch.device, lanes: int, pairs: int, seed: int) -> ReplayBuffer:
    """A buffer of ``lanes`` lanes and ``pairs * (SHORT + LONG)`` rows, exactly full: each lane
    plays ``pairs`` short and ``pairs`` long episodes in a random order (done_marks="last")."""
    rows = pairs * (SHORT + LONG)
    g = torch.Generator().manual_seed(1234)
    order = torch.rand(lanes, 2 * pairs, generator=g).argsort(1) < pairs  # True: short episode
    lengths = torch.where(order, SHORT, LONG)
    ends = lengths.cumsum(1) - 1                                          # [lanes, 2 * pairs] end rows
    done = torch.zeros(rows, lanes, dtype=torch.bool)
    done.scatter_(0, ends.T, True)
    buf = ReplayBuffer(rows * lanes, lanes, device=device, done_marks="last", seed=seed)
    obs = torch.randn(lanes, 4, device=device)
    for r in range(rows):
        buf.add({"obs": obs, "reward": torch.ones(lanes, device=device)}, done[r].to(device))
    return buf


def first_fit(length: torch.Tensor, budget: int) -> torch.Tensor:
    """[K, B] lengths in draw order -> [K, B] bool kept by first-fit: each item is kept when it
    still fits in what the kept items before it left of ``budget``."""
    kept = torch.zeros_like(length, dtype=torch.bool)
    used = torch.zeros(length.shape[0], dtype=length.dtype)
    for b in range(length.shape[1]):
        fits = used + length[:, b] <= budget
        kept[:, b] = fits
        used += length[:, b] * fits
    return kept


def summarize(length: torch.Tensor, kept: torch.Tensor, budget: int) -> dict:
    n_kept = int(kept.sum())
    short = int((kept & (length == SHORT)).sum())
    return {"kept": n_kept / kept.numel(), "short_kept": short / max(n_kept, 1),
            "rows_used": float((length * kept).sum()) / (budget * length.shape[0])}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.packing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batches", type=int, default=400,
                   help="batches drawn per (B, max_rows) for B <= 64; B > 64 draws as many items")
    p.add_argument("--out", default=None, help="folder for the CSV (default bench/results)")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prov = provenance(device)
    t_start = time.perf_counter()
    lanes, pairs = 1024, 4
    plans = {16: [32, 64, 256, None], 64: [64, 256, 512, 1024, None], 256: [1024, 2048, 4096, None]}

    probe = filled(device, lanes, pairs, seed=0)
    count = int(probe.num_episodes)
    ref = probe.sample_episodes(4096)  # the stored population, by uniform draws
    pop_short = float((ref["length"] == SHORT).float().mean())
    print(f"# Packing skew of sample_episodes on {prov['device']}; gpubuffers {prov['gpubuffers']}, "
          f"commit {prov['commit']}\n")
    print(f"{lanes} lanes x {pairs * (SHORT + LONG)} rows, done_marks=\"last\": {count} whole finished "
          f"episodes stored, {lanes * pairs} of {SHORT} rows and {lanes * pairs} of {LONG} rows "
          f"(mean length {(SHORT + LONG) / 2:.0f}); a check draw of 4096 gives {100 * pop_short:.1f}% short.\n")

    results = []
    for batch, budgets in plans.items():
        # One buffer per budget, all built and seeded alike: they make the same draws.
        seed = 1000 + batch
        bufs = {m: filled(device, lanes, pairs, seed) for m in budgets}
        outs, rows_of = {m: [] for m in budgets}, {}
        batches = args.batches * 64 // max(batch, 64)
        for _ in range(batches):
            for m, buf in bufs.items():
                o = buf.sample_episodes(batch, m)
                outs[m].append(torch.stack([o["length"], o["valid"].long()]).cpu())
                rows_of[m] = o["mask"].shape[0]  # max_rows, also the default one
        length = torch.stack([o[0] for o in outs[None]])  # [K, B] every draw, in draw order
        if not bool(torch.stack([o[1] for o in outs[None]]).all()):
            raise AssertionError(f"B={batch}: the default max_rows dropped a draw")
        for m in budgets:
            got = torch.stack(outs[m])                       # [K, 2, B]
            budget = rows_of[m]
            prefix = length.cumsum(1) <= budget
            valid = got[:, 1].bool()
            if not torch.equal(valid, prefix) or not torch.equal(got[:, 0], length * prefix):
                raise AssertionError(f"B={batch}, max_rows={m}: the buffer's kept items differ from "
                                     f"the prefix rule applied to the same draws")
            row = {"B": batch, "max_rows": budget, "default": m is None, "batches": batches,
                   "draws": length.numel(), "drawn_short": float((length == SHORT).float().mean())}
            row.update({f"prefix_{k}": v for k, v in summarize(length, prefix, budget).items()})
            row.update({f"firstfit_{k}": v for k, v in summarize(length, first_fit(length, budget), budget).items()})
            results.append(row)

    print("| B | max_rows | draws | drawn: short | prefix (buffer): kept | short among kept | rows used "
          "| first-fit: kept | short among kept | rows used |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m = f"{r['max_rows']} (default)" if r["default"] else str(r["max_rows"])
        print(f"| {r['B']} | {m} | {r['draws']} | {100 * r['drawn_short']:.1f}% | {100 * r['prefix_kept']:.1f}% "
              f"| {100 * r['prefix_short_kept']:.1f}% | {100 * r['prefix_rows_used']:.1f}% "
              f"| {100 * r['firstfit_kept']:.1f}% | {100 * r['firstfit_short_kept']:.1f}% "
              f"| {100 * r['firstfit_rows_used']:.1f}% |")
    print(f"\nkept, short among kept: fractions of the draws; rows used: kept rows / max_rows. "
          f"The buffer's kept items equal the prefix rule on the same draws in every batch. "
          f"({time.perf_counter() - t_start:.0f} s)")

    out = args.out or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"packing_{'cuda' if device.type == 'cuda' else 'cpu'}.csv")
    cols = list(results[0])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*cols, "episodes_stored", "short_stored", *prov])
        for r in results:
            w.writerow([f"{r[c]:.4f}" if isinstance(r[c], float) else r[c] for c in cols]
                       + [count, f"{lanes * pairs / count:.4f}", *prov.values()])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
