"""The old ``buffers`` multi-process loading notebook, redone: a CPU buffer on disk (memory-mapped
files; or in shared memory with ``--storage shared``) holding Pendulum steps with rendered
images, read as ``[512, 8]`` windows through ``DataLoader`` worker processes, while the main
process keeps adding.

    python examples/loading.py [--workers 0,2,4] [--num-envs 64] [--steps 200000] [--batches 50]
                               [--storage disk|shared] [--path FOLDER]

Prints the windows per second of each worker count (0: the main process samples), the share of
windows a worker returned ``valid=False`` (overwritten while read) and checks every window.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from envs import Pendulum, pendulum_images  # noqa: E402
from quickstart import check_windows  # noqa: E402

from gpubuffers import BufferDataset, ReplayBuffer  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="0,2,4", help="worker counts, comma-separated")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--steps", type=int, default=200_000, help="capacity, in steps of all lanes together")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--length", type=int, default=8)
    p.add_argument("--batches", type=int, default=50, help="batches timed per worker count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", choices=("disk", "shared"), default="disk")
    p.add_argument("--path", default=None, help="folder of the disk buffer (default: a temporary one, "
                   "removed at the end); an existing disk buffer there is replaced")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpubuffers-loading-") as tmp:
        return run(args, args.path or os.path.join(tmp, "buffer"))


def run(args: argparse.Namespace, path: str) -> list[dict]:
    n = args.num_envs
    env = Pendulum(n, "cpu", seed=args.seed)
    where = dict(path=path, overwrite=True) if args.storage == "disk" else {}
    buf = ReplayBuffer(args.steps, n, device="cpu", storage=args.storage, done_marks="last", seed=args.seed,
                       **where)
    gen = torch.Generator().manual_seed(args.seed)
    obs = env.reset()

    def step() -> None:
        nonlocal obs
        action = 4 * torch.rand(n, 1, generator=gen) - 2
        nxt, reward, terminated, truncated, extras = env.step(action)
        buf.add({"obs": obs, "image": pendulum_images(obs), "action": action, "reward": reward},
                terminated=terminated, truncated=truncated, final_obs=extras["final_obs"])
        obs = nxt

    for _ in range(buf.rows):
        step()
    results = []
    for workers in [int(k) for k in args.workers.split(",")]:
        ds = BufferDataset(buf, args.batch, kind="sequences", length=args.length)
        loader = DataLoader(ds, batch_size=None, num_workers=workers,
                            generator=torch.Generator().manual_seed(args.seed))
        it = iter(loader)
        next(it)  # workers started
        windows = invalid = 0
        began = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
            check_windows(batch)
            windows += batch["valid"].numel()
            invalid += int((~batch["valid"]).sum())
            step()  # the training loop keeps adding
        rate = windows / (time.perf_counter() - began)
        del it
        results.append({"workers": workers, "windows_per_s": rate, "invalid": invalid / windows})
        print(f"{workers} workers: {rate:,.0f} windows/s ({100 * invalid / windows:.3f}% overwritten while read)")
    buf.close()  # a disk buffer: flushed, and ReplayBuffer.open(path) reads it again
    return results


if __name__ == "__main__":
    main()
