"""W10: a global ``sample(4096)`` of a ShardedReplayBuffer against a local one, same run.

``python -m bench.distributed [--world 2] [--backend gloo] [--repeats 30] [--out DIR]``

Spawns ``--world`` processes (gloo on CPU; nccl puts rank r on GPU r), each holding a shard of
2^18 transitions from 1024 lanes (obs float32[64], action float32[12], reward, flags, final
observations), and times, interleaved and behind a barrier, ``sample(4096)`` (local) and
``sample(4096, scope="global")``, and the same for ``sample_sequences(256, 32)`` and
``sample_episodes(64)``; reports the median ratios and the bytes each rank sends and receives
per global transition call.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import write_rows

LANES, OBS, ACT, BATCH = 1024, 64, 12, 4096


def run(rank: int, world: int, port: int, backend: str, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from gpubuffers.distributed import ShardedReplayBuffer

    buf = ShardedReplayBuffer(1 << 18, LANES, seed=0, done_marks="last", device=device)
    g = torch.Generator(device=device).manual_seed(rank)
    for _ in range(buf.local.rows + 8):
        buf.add({"obs": torch.randn(LANES, OBS, generator=g, device=device),
                 "action": torch.randn(LANES, ACT, generator=g, device=device),
                 "reward": torch.randn(LANES, generator=g, device=device)},
                terminated=torch.rand(LANES, generator=g, device=device) < 0.01,
                final_obs=torch.randn(LANES, OBS, generator=g, device=device))
    times: dict[str, list[float]] = {"local": [], "global": [], "seq local": [], "seq global": [],
                                     "ep local": [], "ep global": []}
    for i in range(repeats + 3):
        for name in times:
            scope = name.split()[-1]
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            if name.startswith("seq"):
                buf.sample_sequences(256, 32, scope=scope)
            elif name.startswith("ep"):
                buf.sample_episodes(64, scope=scope)
            else:
                out = buf.sample(BATCH, scope=scope)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    item = sum(t[0].numel() * t.element_size() for t in _tensors(out) if t is not out["rank"])
    if rank == 0:
        queue.put({**{f"{k.replace(' ', '_')}_s": statistics.median(v) for k, v in times.items()},
                   "item_bytes": item, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else "CPU"})
    dist.barrier()
    dist.destroy_process_group()


def _tensors(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    else:
        yield x


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=None, help="folder for distributed_<backend>.csv (default bench/results)")
    args = p.parse_args()
    from .__main__ import provenance

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(run, args=(args.world, port, args.backend, args.repeats, queue), nprocs=args.world,
                       start_method="spawn")
    r = queue.get()
    # Per global call a rank sends its drawable count and request counts (8 B per rank each) and
    # about B items' bytes (the share other ranks draw from it), and receives B items.
    moved = BATCH * r["item_bytes"]
    prov = provenance(torch.device("cuda" if args.backend == "nccl" else "cpu"))
    ratio = r["global_s"] / r["local_s"]
    seq_ratio = r["seq_global_s"] / r["seq_local_s"]
    ep_ratio = r["ep_global_s"] / r["ep_local_s"]
    print(f"# W10 on {prov['device']}, {args.backend}, {args.world} processes, commit {prov['commit']}: "
          f"global sample({BATCH}) takes {ratio:.2f}x a local one; each rank receives {moved / 1e6:.2f} MB "
          f"({r['item_bytes']} B per item) and sends as much on average, plus 16 B per rank of counts; "
          f"global sample_sequences(256, 32) takes {seq_ratio:.2f}x a local one; "
          f"global sample_episodes(64) takes {ep_ratio:.2f}x a local one")
    out = args.out or os.path.join(os.path.dirname(__file__), "results")
    row = {"world": args.world, "batch": BATCH, "item_bytes": r["item_bytes"], "bytes_received_per_call": moved,
           "global_vs_local": ratio, "sequences_global_vs_local": seq_ratio, "episodes_global_vs_local": ep_ratio}
    print(f"wrote {write_rows(out, f'distributed_{args.backend}.csv', [row], prov)}")

if __name__ == "__main__":
    main()
