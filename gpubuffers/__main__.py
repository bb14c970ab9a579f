"""``python -m gpubuffers inspect PATH [--plot FILE.png]``: what a checkpoint holds, read on the
CPU without building a buffer (or, for the folder of a ``storage="disk"`` buffer, opened
read-only): leaves, shapes, dtypes, bytes, rows, episodes, their mean length and return; with
``--plot``, histograms of the stored episodes' lengths and returns and the live rows per lane."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import checkpoint
from .layout import SENTINEL


def summary(sd: dict) -> dict:
    """Figures of a checkpoint's state dict (see :func:`gpubuffers.checkpoint.read`)."""
    header, tensors = sd["header"], sd["tensors"]
    settings, counters = header["settings"], header["counters"]
    lanes = settings["num_envs"] or 1
    rows = settings["capacity"] // lanes
    adds = counters["adds"]
    live = min(adds, rows)
    start = tensors["index/start"]
    flags = tensors["index/end_flags"]
    ring = torch.arange(live)
    absolute = adds - live + (ring - (adds - live)) % rows  # absolute row of each stored ring row
    ends = flags != 0
    lengths = (absolute[:, None] + 1 - start)[ends]
    totals = tensors["stats/totals"]
    leaves = {p: (s["shape"], s["dtype"] + (f" (stored as {s['stored']})" if "stored" in s else ""),
                  tensors[f"storage/{p}"].numel() * tensors[f"storage/{p}"].element_size())
              for p, s in header["specs"].items()}
    return {"settings": settings, "adds": adds, "rows": rows, "live_rows": live, "lanes": lanes,
            "leaves": leaves, "episodes": int(totals[0]),
            "mean_length": float(totals[1] / totals[0]) if totals[0] > 0 else float("nan"),
            "mean_return": float(totals[2] / totals[0]) if totals[0] > 0 else float("nan"),
            "lengths": lengths, "returns": tensors["index/ret"][ends],
            "live_per_lane": (start != SENTINEL).sum(0)}


def read(path: str) -> dict:
    """The state dict of a checkpoint file, or of the disk buffer in the folder ``path``."""
    if os.path.isdir(path):
        from .buffer import ReplayBuffer

        return ReplayBuffer.open(path).state_dict()
    return checkpoint.read(path)


def inspect(path: str, plot: str | None = None, out=sys.stdout) -> dict:
    s = summary(read(path))
    st = s["settings"]
    alpha = st["priority_alpha"]
    print(f"{path}: capacity {st['capacity']} ({s['rows']} rows x {s['lanes']} lanes), {s['adds']} adds, "
          f"{s['live_rows']} live rows; done_marks={st['done_marks']!r}, autoreset={st['autoreset']!r}"
          + ("" if alpha is None else f", priority_alpha={alpha}"), file=out)
    print("| leaf | shape per lane | dtype | bytes stored |\n|---|---|---|---|", file=out)
    for p, (shape, dtype, nbytes) in s["leaves"].items():
        print(f"| {p} | {tuple(shape)} | {dtype} | {nbytes:,} |", file=out)
    print(f"episodes ended in the live rows: {s['episodes']}, mean length {s['mean_length']:.2f}, "
          f"mean return {s['mean_return']:.4g}", file=out)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].hist(s["lengths"].numpy(), bins=40)
        axes[0].set_title("episode lengths (stored ends)")
        axes[1].hist(s["returns"].double().numpy(), bins=40)
        axes[1].set_title("episode returns (stored ends)")
        axes[2].bar(range(s["lanes"]), s["live_per_lane"].numpy(), width=1.0)
        axes[2].set_title("live rows per lane (reset rows excluded)")
        axes[2].set_xlabel("lane")
        fig.tight_layout()
        fig.savefig(plot, dpi=100)
        plt.close(fig)
        print(f"wrote {plot}", file=out)
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpubuffers", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="print what a checkpoint (or a disk buffer's folder) holds")
    ins.add_argument("path")
    ins.add_argument("--plot", default=None, help="PNG of episode lengths, returns and live rows per lane")
    args = p.parse_args(argv)
    inspect(args.path, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
