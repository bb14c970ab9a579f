"""``python -m bench [--quick] [--device DEV]``: the demo, then the core workloads in one run."""

from __future__ import annotations

import argparse
import platform

import torch

import gpubuffers

from .core import ratio_table, run_core
from .demo import print_demo, run_demo


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats: about a minute on a 2-core CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-torchrl", action="store_true", help="skip the TorchRL comparison")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = device_name(device)
    print(f"# gpubuffers {gpubuffers.__version__} on {name}; torch {torch.__version__}\n")
    print_demo(run_demo(device, steps=150 if args.quick else 256))
    rows = run_core(device, repeats=10 if args.quick else 40, with_torchrl=not args.no_torchrl)
    print("## Core workloads (N=4096, obs float32[64], action float32[12], capacity 2^20)\n")
    print(ratio_table(rows, name))


if __name__ == "__main__":
    main()
