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

from .core import copy_bandwidth, ratio_table, run_core, sweeps
from .demo import print_demo, run_demo


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
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
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, sweep, ylabel in ((axes[0], "W3 capacity", "ms per sample_sequences(256, 32)"),
                              (axes[1], "W1 lanes", "M transitions added per s")):
        for provider in sorted({p["provider"] for p in points if p["sweep"] == sweep}):
            pts = sorted((p["x"], p["ms"] if sweep.startswith("W3") else p["per_s"] / 1e6)
                         for p in points if p["sweep"] == sweep and p["provider"] == provider)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("capacity (transitions)" if sweep.startswith("W3") else "num_envs")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


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
    print("## Core workloads (N=4096, obs float32[64], action float32[12], capacity 2^20)\n")
    print(ratio_table(rows, prov["device"]))
    print(f"\nDevice copy bandwidth (the physical limit): {copy_bandwidth(device):.1f} GB/s")
    print("W4 (prioritized) is not measured: gpubuffers has no prioritized sampler yet.\n")

    if args.out is None:
        # Quick runs (the README's main job) do not overwrite the committed full-run figures.
        args.out = os.path.join(os.path.dirname(__file__), "results", *(["quick"] if args.quick else []))
    os.makedirs(args.out, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = os.path.join(args.out, f"core_{tag}.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "provider", "median_ms", "min_ms", "max_ms", "transitions_per_s", "gb_per_s",
                    *prov])
        for r in rows:
            w.writerow([r.workload, r.provider, f"{1e3 * r.timing.median_s:.4f}", f"{1e3 * r.timing.min_s:.4f}",
                        f"{1e3 * r.timing.max_s:.4f}", f"{r.per_s:.0f}", f"{r.gbps:.3f}", *prov.values()])
    print(f"wrote {path}")
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
        if plot(points, png, f"gpubuffers on {prov['device']}"):
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
