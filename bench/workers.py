"""W8: windows per second from a shared-memory buffer through DataLoader worker processes;
W9: the cost of an add that also writes a host mirror; W11: windows per second from a disk buffer
through workers.

``python -m bench.workers [--quick] [--capacity LOG2] [--workers 0,1,2,4] [--device DEV] [--out DIR]
[--disk-capacity LOG2] [--disk-path FOLDER] [--only w9|w12]``

A CPU buffer with ``storage="shared"`` (N=1024 lanes, obs float32[64], action float32[12],
episodes of 50-150 rows) is filled past one wrap; then a ``BufferDataset`` of
``sample_sequences(256, 32)`` is read through ``DataLoader(num_workers=k)`` while the main
process adds one row per batch received, as a training loop does. The baseline is ``k = 0``
(the main process samples), measured in the same run; each figure is windows per second over
the batches after a warm-up, and the share of windows a worker returned ``valid=False`` because
the ring overwrote them while they were read.

W11 fills a disk buffer (``storage="disk"``, memory-mapped files, the same steps, 2^24 slots;
quick: 2^18) and reads the same windows from it with 0, 2 and 4 workers, against the in-process
sampling of a shared buffer of the same size filled with the same rows (the baseline), in the
same run.

W12 times ``add`` of 4096 lanes (obs float32[64], action float32[12], reward, flags, final
observations: about 2.3 MB a row) into a 2^20-slot disk buffer, with its default ``flush_every``
and with ``rows // 2``, against the same add into a memory buffer, interleaved in one run: what
writing every row to the disk costs.

W9 times ``add`` (N=4096 lanes, obs float32[64], action float32[12], reward, flags and final
observations) of a 2^20-slot buffer on ``--device`` with a 2^22-slot CPU mirror in shared memory
against the same add without one, interleaved in one run. On a CPU device the mirror's add runs
within the add, copying the ring's index rows (not computing them again); from CUDA the rows are
staged to pinned memory on a side stream.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from gpubuffers import BufferDataset, ReplayBuffer

from . import write_rows
from .timing import interleaved

LANES, OBS, ACT, BATCH, LENGTH = 1024, 64, 12, 256, 32


def filled(capacity: int, seed: int = 0, storage: str = "shared", **where) -> tuple[ReplayBuffer, "Stepper"]:
    buf = ReplayBuffer(capacity, LANES, storage=storage, done_marks="last", seed=seed, **where)
    stepper = Stepper(seed)
    for _ in range(buf.rows + buf.rows // 4):
        stepper.add(buf)
    return buf, stepper


class Stepper:
    """Steps of LANES lanes with episodes of 50-150 rows."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.left = torch.randint(50, 151, (LANES,), generator=self.gen)

    def add(self, buf: ReplayBuffer) -> None:
        self.left -= 1
        done = self.left == 0
        self.left = torch.where(done, torch.randint(50, 151, (LANES,), generator=self.gen), self.left)
        buf.add({"obs": torch.randn(LANES, OBS, generator=self.gen),
                 "action": torch.randn(LANES, ACT, generator=self.gen),
                 "reward": torch.randn(LANES, generator=self.gen)}, done,
                final_obs=torch.randn(LANES, OBS, generator=self.gen))


def measure(buf: ReplayBuffer, stepper: Stepper, workers: int, batches: int, warmup: int) -> dict:
    ds = BufferDataset(buf, BATCH, kind="sequences", length=LENGTH)
    loader = DataLoader(ds, batch_size=None, num_workers=workers,
                        **({"prefetch_factor": 4, "persistent_workers": False} if workers else {}))
    it = iter(loader)
    items = invalid = 0
    for i in range(warmup + batches):
        if i == warmup:
            start = time.perf_counter()
        out = next(it)
        stepper.add(buf)
        if i >= warmup:
            items += out["valid"].numel()
            invalid += int((~out["valid"]).sum())
    seconds = time.perf_counter() - start
    del it
    return {"workers": workers, "windows_per_s": items / seconds, "invalid_share": invalid / items,
            "batches": batches, "seconds": seconds}


def run_mirror(device: torch.device, repeats: int) -> dict:
    """W9: add with a CPU mirror against add alone (median seconds, same interleaved run)."""
    lanes = 4096
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        return ({"obs": torch.randn(lanes, OBS, generator=g, device=device),
                 "action": torch.randn(lanes, ACT, generator=g, device=device),
                 "reward": torch.randn(lanes, generator=g, device=device)},
                torch.rand(lanes, generator=g, device=device) < 0.01,
                torch.randn(lanes, OBS, generator=g, device=device))

    pool = [step() for _ in range(8)]
    alone = ReplayBuffer(1 << 20, lanes, device=device, done_marks="last", seed=0)
    tier = ReplayBuffer(1 << 22, lanes, device="cpu", storage="shared", done_marks="last", seed=0)
    mirrored = ReplayBuffer(1 << 20, lanes, device=device, done_marks="last", seed=0, mirror=tier)
    counter = [0, 0]

    def add(buf, k):
        def fn():
            s, done, final = pool[counter[k] % len(pool)]
            counter[k] += 1
            buf.add(s, terminated=done, final_obs=final)
        return fn

    times = interleaved({"alone": add(alone, 0), "mirrored": add(mirrored, 1)}, device,
                        warmup=5, repeats=repeats, inner=4)
    mirrored.sync_mirror()
    return {"alone_s": times["alone"].median_s, "mirrored_s": times["mirrored"].median_s,
            "ratio": times["mirrored"].median_s / times["alone"].median_s, "mirror_adds": tier.num_adds}


def run_w9(args: argparse.Namespace, out: str) -> None:
    from .__main__ import provenance

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mirror = run_mirror(device, 10 if args.quick else 30)
    prov = provenance(device)
    print(f"\n# W9 on {prov['device']}, commit {prov['commit']}: "
          f"add of 4096 lanes with a 2^22-slot CPU mirror: {mirror['ratio']:.2f}x the add alone "
          f"({mirror['mirror_adds']} rows reached the mirror)")
    tag = "cuda" if device.type == "cuda" else "cpu"
    print(f"wrote {write_rows(out, f'mirror_{tag}.csv', [mirror], prov)}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    p.add_argument("--quick", action="store_true", help="2^20 slots and fewer batches")
    p.add_argument("--capacity", type=int, default=None, help="log2 of the capacity (default 22, quick 20)")
    p.add_argument("--workers", default="0,1,2", help="worker counts, comma-separated (0 is the baseline)")
    p.add_argument("--device", default=None, help="W9's buffer device (default: cuda when available, else cpu)")
    p.add_argument("--out", default=None, help="folder for workers_cpu.csv (default bench/results)")
    p.add_argument("--disk-capacity", type=int, default=None, help="log2 of W11's capacity (default 24, quick 18)")
    p.add_argument("--disk-path", default=None, help="where W11's disk buffer is written (default: the temp folder)")
    p.add_argument("--only", choices=("w9", "w12"), default=None,
                   help="run only W9 (add with a mirror) or W12 (add into disk buffers)")
    args = p.parse_args()
    from .__main__ import provenance

    out = args.out or os.path.join(os.path.dirname(__file__), "results", *(["quick"] if args.quick else []))
    if args.only == "w12":
        run_disk_add(out, 3 if args.quick else 10)
        return
    if args.only == "w9":
        run_w9(args, out)
        return
    capacity = 1 << (args.capacity or (20 if args.quick else 22))
    counts = [int(k) for k in args.workers.split(",")]
    if 0 not in counts:
        counts = [0] + counts
    batches, warmup = (60, 10) if args.quick else (300, 30)
    prov = provenance(torch.device("cpu"))
    buf, stepper = filled(capacity)
    print(f"# W8 on {prov['device']}, commit {prov['commit']}: sample_sequences({BATCH}, {LENGTH}) "
          f"through DataLoader workers from a shared buffer of {capacity} slots ({LANES} lanes), "
          f"one add per batch\n")
    rows = [measure(buf, stepper, k, batches, warmup) for k in counts]
    base = next(r for r in rows if r["workers"] == 0)["windows_per_s"]
    print("| workers | windows/s vs 0 workers | windows returned invalid |")
    print("|---|---|---|")
    for r in rows:
        r["vs_baseline"] = r["windows_per_s"] / base
        print(f"| {r['workers']} | {r['vs_baseline']:.2f}x | {100 * r['invalid_share']:.3f}% |")
    path = write_rows(out, "workers_cpu.csv", [{"capacity": capacity, **r} for r in rows], prov)
    print(f"\nwrote {path}")
    run_w9(args, out)
    run_disk(args, out, batches, warmup)
    run_disk_add(out, 3 if args.quick else 10)


def run_disk_add(out: str, repeats: int) -> None:
    """W12: add into disk buffers (default and rows // 2 flush intervals) against memory."""
    from .__main__ import provenance

    lanes = 4096
    g = torch.Generator().manual_seed(0)
    pool = [({"obs": torch.randn(lanes, OBS, generator=g), "action": torch.randn(lanes, ACT, generator=g),
              "reward": torch.randn(lanes, generator=g)}, torch.rand(lanes, generator=g) < 0.01,
             torch.randn(lanes, OBS, generator=g)) for _ in range(8)]
    folder = tempfile.mkdtemp(prefix="gpubuffers-w12-")
    try:
        bufs = {"memory": ReplayBuffer(1 << 20, lanes, done_marks="last", seed=0)}
        rows = bufs["memory"].rows
        for every, name in ((None, "disk, default flush_every"), (rows // 2, "disk, flush_every=rows // 2")):
            bufs[name] = ReplayBuffer(1 << 20, lanes, done_marks="last", seed=0, storage="disk", flush_every=every,
                                      path=os.path.join(folder, f"f{every}"))
        counters = dict.fromkeys(bufs, 0)

        def add(name):
            def fn():
                s, done, final = pool[counters[name] % len(pool)]
                counters[name] += 1
                bufs[name].add(s, terminated=done, final_obs=final)
            return fn

        inner = rows // 2  # a multiple of every flush interval timed: flushes amortized exactly
        for name in bufs:  # past one wrap: every page of the files exists
            for _ in range(rows + 8):
                add(name)()
        times = interleaved({k: add(k) for k in bufs}, torch.device("cpu"), warmup=0, repeats=repeats, inner=inner)
        row_bytes = sum(t[0].numel() * t.element_size() for t in bufs["memory"].storage.values()) + \
            lanes * OBS * 4  # the row of every leaf, and the final observations' writes
        every = {k: b.flush_every for k, b in bufs.items()}
        for b in bufs.values():
            b.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = times["memory"].median_s
    prov = provenance(torch.device("cpu"))
    print(f"\n# W12 on {prov['device']}: add of {lanes} lanes ({row_bytes / 1e6:.1f} MB a row) into a 2^20-slot "
          f"buffer, interleaved\n")
    print("| storage | flush_every | add time vs memory | rows written per second |")
    print("|---|---|---|---|")
    result = []
    for name, t in times.items():
        result.append({"storage": name, "flush_every": every[name], "median_s": t.median_s,
                       "vs_memory": t.median_s / base, "row_mb_per_s": row_bytes / t.median_s / 1e6})
        print(f"| {name} | {every[name] or ''} | {t.median_s / base:.2f}x | {1 / t.median_s:,.0f} "
              f"({row_bytes / t.median_s / 1e6:,.0f} MB/s) |")
    print(f"wrote {write_rows(out, 'disk_add_cpu.csv', result, prov)}")


def run_disk(args, out: str, batches: int, warmup: int) -> None:
    """W11: windows/s from a disk buffer with 0, 2, 4 workers against a shared buffer sampled in
    the main process, both holding the same rows."""
    from .__main__ import provenance

    capacity = 1 << (args.disk_capacity or (18 if args.quick else 24))
    folder = tempfile.mkdtemp(prefix="gpubuffers-w11-", dir=args.disk_path)
    prov = provenance(torch.device("cpu"))
    try:
        began = time.perf_counter()
        shared, stepper = filled(capacity)
        rows = [dict(measure(shared, stepper, 0, batches, warmup), storage="shared")]
        del shared
        fill_s = time.perf_counter() - began
        disk, stepper = filled(capacity, storage="disk", path=os.path.join(folder, "buffer"))
        for k in (0, 2, 4):
            rows.append(dict(measure(disk, stepper, k, batches, warmup), storage="disk"))
        disk_bytes = sum(os.path.getsize(os.path.join(folder, "buffer", f))
                         for f in os.listdir(os.path.join(folder, "buffer")))
        disk.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = rows[0]["windows_per_s"]
    print(f"\n# W11 on {prov['device']}: sample_sequences({BATCH}, {LENGTH}) from a disk buffer of "
          f"{capacity} slots ({disk_bytes / 2**30:.2f} GiB of files), one add per batch; baseline: "
          f"a shared buffer of the same rows sampled in the main process (filled in {fill_s:.0f} s)\n")
    print("| storage | workers | windows/s vs shared, 0 workers | windows returned invalid |")
    print("|---|---|---|---|")
    for r in rows:
        r["vs_baseline"] = r["windows_per_s"] / base
        print(f"| {r['storage']} | {r['workers']} | {r['vs_baseline']:.2f}x | {100 * r['invalid_share']:.3f}% |")
    print(f"wrote {write_rows(out, 'disk_cpu.csv', [{'capacity': capacity, **r} for r in rows], prov)}")

if __name__ == "__main__":
    main()
