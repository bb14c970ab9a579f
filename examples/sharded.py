"""One process per device, each stepping its own lanes into its shard of a ShardedReplayBuffer.

Each rank steps ``--num-envs`` Pendulum lanes (random actions) and adds them to its shard with no
communication; a dynamics model (the next observation from the observation and action) is
trained data-parallel (gradients averaged with ``all_reduce``) from batches drawn uniformly over
every rank's transitions (``scope="global"``), so every rank learns from every rank's lanes.
Episode statistics are summed over the group. Rank 0 reports the model's error against
predicting no change, on a global batch.

    torchrun --nproc-per-node 2 examples/sharded.py            # gloo on CPUs, nccl on GPUs
    python examples/sharded.py --procs 2                       # the same, spawned here (gloo)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from envs import Pendulum  # noqa: E402

from gpubuffers.distributed import ShardedReplayBuffer  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=0, help="spawn this many gloo processes here (0: torchrun)")
    p.add_argument("--num-envs", type=int, default=256, help="lanes per rank")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch", type=int, default=512, help="transitions per rank per update")
    p.add_argument("--rows", type=int, default=512, help="rows per lane of each shard")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = dist.get_backend() == "nccl"
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    n = args.num_envs
    env = Pendulum(n, device, seed=args.seed + rank)
    buf = ShardedReplayBuffer(args.rows * n, n, seed=args.seed, device=device, done_marks="last")
    model = torch.nn.Sequential(torch.nn.Linear(env.obs_dim + env.action_dim, 128), torch.nn.Tanh(),
                                torch.nn.Linear(128, env.obs_dim)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1000 * rank)
    obs = env.reset()

    def step() -> None:
        nonlocal obs
        action = 4 * torch.rand(n, env.action_dim, generator=gen, device=device) - 2
        nxt, reward, terminated, truncated, extras = env.step(action)
        buf.add({"obs": obs, "action": action, "reward": reward}, terminated=terminated, truncated=truncated,
                final_obs=extras["final_obs"])
        obs = nxt

    def errors(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ok = batch["next_valid"]
        pred = batch["obs"] + model(torch.cat([batch["obs"], batch["action"]], 1))
        target = batch["next"]["obs"]
        model_mse = ((pred - target) ** 2).sum(1)[ok].mean()
        still_mse = ((batch["obs"] - target) ** 2).sum(1)[ok].mean()
        return model_mse, still_mse

    for _ in range(8):
        step()
    began, rows = time.perf_counter(), []
    for it in range(args.iterations):
        step()
        batch = buf.sample(args.batch, scope="global")  # every rank's lanes, uniformly
        loss, _ = errors(batch)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # data-parallel: average the gradients
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        if it % 50 == 0 or it == args.iterations - 1:
            with torch.no_grad():
                model_mse, still_mse = errors(buf.sample(4096, scope="global"))
            stats = buf.episode_stats(scope="global")
            row = {"iteration": it, "env_steps": buf.local.num_adds * n * world,
                   "model_mse": float(model_mse), "no_change_mse": float(still_mse),
                   "episodes": int(stats["count"]), "wall_s": time.perf_counter() - began}
            rows.append(row)
            if rank == 0:
                print(f"it {it}: {row['env_steps']} env steps over {world} ranks, model error "
                      f"{row['model_mse']:.5f} vs no change {row['no_change_mse']:.5f}, "
                      f"{row['episodes']} episodes ended", flush=True)
    return {"rows": rows, "rank_adds": buf.local.num_adds}


def _spawned(rank: int, world: int, store: str, args: argparse.Namespace, results) -> None:
    # A file store: no TCP port to pick and no store server that one rank takes down with it
    # while another is still leaving.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = train(args)
        if rank == 0:
            results.put(out)
            results.close()
            results.join_thread()  # the result is in the pipe before this process leaves
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown, where threads that torch.distributed started
    # can abort a process that has finished cleanly (SIGABRT, "terminate called without an
    # active exception"); everything this process owes is delivered above.
    os._exit(0)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    if args.procs:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_spawned, args=(args.procs, os.path.join(tmp, "store"), args, results), nprocs=args.procs,
                     join=True)
        return results.get(timeout=10)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        out = train(args)
        dist.barrier()
        return out
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
