"""``python -m bench [--quick] [--device DEV] [--sweep] [--out DIR]``: the demo, then the core
workloads for every provider in one run; writes CSV rows with provenance and, with ``--sweep``,
a PNG of the scaling sweeps."""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import os
import platform
import subprocess

import torch

import gpubuffers

from .core import (baseline_ratio, copy_bandwidth, nstep_overhead, ratio_table, run_core, run_w4, sweeps,
                   w1_overhead, w4_lines)
from .demo import print_demo, run_demo
from .memory import run_memory
from .rollout import run_rollout


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: torch.device) -> dict:
    here = os.path.dirname(__file__)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here).stdout.strip() or "unknown"
        # Changes to the code (not to results) since that commit make the figures not its own.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gpubuffers", "kernels", "bench/*.py"],
                               capture_output=True, text=True, cwd=os.path.join(here, "..")).stdout.strip()
        if dirty and commit != "unknown":
            commit += "+dirty"
    except OSError:
        commit = "unknown"
    triton = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton as _triton
        triton = _triton.__version__ + ("" if device.type == "cuda" else " (unused on cpu)")
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton,
            "gpubuffers": gpubuffers.__version__, "commit": commit,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def plot(points: list[dict], path: str, title: str) -> bool:
    """Ratios only (absolute times are quoted from GPUs alone): W3 time relative to the same
    provider at the smallest capacity, and W1 time relative to the plain ring at each lane count."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for sweep, short in (("W3 capacity", "W3"), ("W4 capacity", "W4")):
        pts_all = [p for p in points if p["sweep"] == sweep]
        for provider in sorted({p["provider"] for p in pts_all}):
            pts = sorted((p["x"], p["ms"]) for p in pts_all if p["provider"] == provider)
            left.plot([x for x, _ in pts], [y / pts[0][1] for _, y in pts], marker="o", label=f"{short} {provider}")
    left.set_title("W3 sample_sequences(256, 32); W4 prioritized update + sample(4096)")
    left.set_xlabel("capacity (transitions)")
    left.set_ylabel("time / time at the smallest capacity")
    w1 = [p for p in points if p["sweep"] == "W1 lanes"]
    plain = {p["x"]: p["ms"] for p in w1 if p["provider"] == "plain ring"}
    for provider in sorted({p["provider"] for p in w1} - {"plain ring"}):
        pts = sorted((p["x"], p["ms"] / plain[p["x"]]) for p in w1 if p["provider"] == provider)
        right.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=provider)
    right.axhline(1.0, color="gray", linestyle="--", label="plain ring")
    right.set_title("W1 add")
    right.set_xlabel("num_envs")
    right.set_ylabel("time / plain ring's time")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def read_sweeps(path: str) -> list[dict]:
    """Points of a sweeps CSV written by this module (to plot it again)."""
    with open(path, newline="") as f:
        return [{"sweep": r["sweep"], "x": int(r["x"]), "provider": r["provider"], "ms": float(r["median_ms"])}
                for r in csv.DictReader(f)]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats, no sweeps: about a minute on a 2-core CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-torchrl", action="store_true", help="skip the TorchRL comparison")
    p.add_argument("--sweep", action="store_true", help="also run the capacity and num_envs sweeps (and plot them)")
    p.add_argument("--out", default=None,
                   help="folder for the CSV and PNG (default bench/results, bench/results/quick with --quick)")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prov = provenance(device)
    print(f"# gpubuffers {prov['gpubuffers']} on {prov['device']}; torch {prov['torch']}, "
          f"triton {prov['triton']}, commit {prov['commit']}\n")
    print_demo(run_demo(device, steps=150 if args.quick else 256))
    with_torchrl = not args.no_torchrl
    if with_torchrl and importlib.util.find_spec("torchrl") is None:
        print("TorchRL is not installed: its rows are missing (pip install -e '.[bench]')\n")
    rows = run_core(device, repeats=10 if args.quick else 40, with_torchrl=with_torchrl)
    # W4 at 2^20 and, for a full run, 2^24 slots (about 11 GB of host memory for both providers).
    rows += run_w4(device, capacities=(1 << 20,) if args.quick else (1 << 20, 1 << 24),
                   repeats=10 if args.quick else 30, with_torchrl=with_torchrl)
    # W5-W6: the on-policy path (RolloutBuffer) against plain tensors.
    rows += run_rollout(device, repeats=10 if args.quick else 30)
    # W7: narrow storage against the FastTD3-style layout (single calls of a few ms on the CPU:
    # many repeats, so that the machine's slow phases do not decide the median).
    mem_rows, layout, mem_lines = run_memory(device, capacity=1 << (18 if args.quick else 20),
                                             repeats=10 if args.quick else 100)
    rows += mem_rows
    print("## Core workloads (N=4096, obs float32[64], action float32[12], capacity 2^20; W5-W6: a "
          "rollout of T=24 rows; W7: the Isaac-style step of bench/memory.py)\n")
    print(ratio_table(rows, prov["device"]))
    print("\nW1, recommended add over bare add (medians of the same interleaved loop; the recommended "
          "add runs on a done_marks=\"last\" buffer, the bare add on done_marks=\"first\"):")
    print("\n".join(w1_overhead(rows)))
    line = nstep_overhead(rows)
    if line:
        print(line)
    print("W4, prioritized update + sample:")
    print("\n".join(w4_lines(rows)))
    print("\n".join(mem_lines))
    print(f"\nDevice copy bandwidth (the physical limit): {copy_bandwidth(device):.1f} GB/s\n")

    if args.out is None:
        # Quick runs (the README's main job) do not overwrite the committed full-run figures.
        args.out = os.path.join(os.path.dirname(__file__), "results", *(["quick"] if args.quick else []))
    os.makedirs(args.out, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = os.path.join(args.out, f"core_{tag}.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "provider", "median_ms", "min_ms", "max_ms", "transitions_per_s", "gb_per_s",
                    "baseline", "time_vs_baseline", *prov])
        for r in rows:
            w.writerow([r.workload, r.provider, f"{1e3 * r.timing.median_s:.4f}", f"{1e3 * r.timing.min_s:.4f}",
                        f"{1e3 * r.timing.max_s:.4f}", f"{r.per_s:.0f}", f"{r.gbps:.3f}", r.baseline,
                        f"{baseline_ratio(r, rows):.3f}", *prov.values()])
    print(f"wrote {path}")
    mpath = os.path.join(args.out, f"memory_{tag}.csv")
    with open(mpath, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*layout[0], *prov])
        for r in layout:
            w.writerow([f"{v:.4g}" if isinstance(v, float) else v for v in r.values()] + list(prov.values()))
    print(f"wrote {mpath}")
    if args.sweep:
        if device.type == "cuda":
            caps = [1 << k for k in range(20, 28)]
        else:
            caps = [1 << k for k in range(18, 25)]  # 2^24: as far as 24 GiB holds both rings
        points = sweeps(device, caps, [1 << k for k in range(10, 17)], repeats=5 if args.quick else 10)
        spath = os.path.join(args.out, f"sweeps_{tag}.csv")
        with open(spath, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sweep", "x", "provider", "median_ms", *prov])
            for pt in points:
                w.writerow([pt["sweep"], pt["x"], pt["provider"], f"{pt['ms']:.4f}", *prov.values()])
        print(f"wrote {spath}")
        png = os.path.join(args.out, f"sweeps_{tag}.png")
        if plot(points, png, f"gpubuffers on {prov['device']}: ratios within one run"):
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
