"""A dynamics model learned from the whole history, kept on the host behind a device ring.

The old ``buffers`` workflow of a small fast buffer in front of a large dataset, sampled by
DataLoader worker processes: Pendulum lanes step on ``--device`` and are added to a ring there
(``ReplayBuffer(..., mirror=tier)``), which writes every row to a larger CPU tier as well: a disk
buffer (memory-mapped files that outlive the run; ``--tier shared`` keeps it in shared memory). A GRU learns to predict the next observation from windows of (observation, action)
drawn from the tier's whole history by ``--workers`` worker processes, and is scored on windows
of the newest rows drawn from the ring, against predicting no change (the next observation
equal to the current one), in the same run. Random actions, so the data does not depend on the
model.

    python examples/world_model.py [--device cuda] [--num-envs 256] [--workers 2] [--tier disk|shared]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Timer, arguments, write_curve  # noqa: E402
from envs import Pendulum  # noqa: E402

from gpubuffers import BufferDataset, ReplayBuffer  # noqa: E402

PHASES = ("simulate", "add", "sample", "learn")
LENGTH = 16


class Model(nn.Module):
    """obs[t], action[t] -> obs[t + 1] along a window, through a GRU."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.gru = nn.GRU(obs_dim + action_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, obs_dim)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(torch.cat([obs, action], -1))
        return obs + self.head(out)  # predicts the change


def window_loss(model: Model, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(model MSE, no-change MSE) of the next observation over the valid windows of a batch."""
    obs, action = batch["obs"].to(device), batch["action"].to(device)
    valid = batch["valid"].to(device).float()
    pred = model(obs[:, :-1], action[:, :-1])
    err = ((pred - obs[:, 1:]) ** 2).mean((1, 2))
    still = ((obs[:, :-1] - obs[:, 1:]) ** 2).mean((1, 2))
    count = valid.sum().clamp(min=1)
    return (err * valid).sum() / count, (still * valid).sum() / count


def main(argv: list[str] | None = None) -> dict:
    p = arguments(__doc__, target=0.0, minutes=5.0)
    p.set_defaults(num_envs=256)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--steps-per-iteration", type=int, default=4, help="env steps added per iteration")
    p.add_argument("--updates", type=int, default=4, help="gradient steps per iteration")
    p.add_argument("--batch", type=int, default=256, help="windows per batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes sampling the tier")
    p.add_argument("--ring-rows", type=int, default=64, help="rows per lane of the device ring")
    p.add_argument("--tier-rows", type=int, default=4096, help="rows per lane of the host tier")
    p.add_argument("--target-ratio", type=float, default=0.01,
                   help="stop once the model's error on the newest rows is this fraction of no-change's")
    p.add_argument("--tier", choices=("disk", "shared"), default="disk")
    p.add_argument("--tier-path", default=None, help="folder of the disk tier (default: a temporary one, "
                   "removed at the end); an existing disk buffer there is replaced")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpubuffers-tier-") as tmp:
        return run(args, args.tier_path or os.path.join(tmp, "tier"))


def run(args, tier_path: str) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    env = Pendulum(args.num_envs, device, seed=args.seed)
    n = args.num_envs
    where = dict(path=tier_path, overwrite=True) if args.tier == "disk" else {}
    tier = ReplayBuffer(args.tier_rows * n, n, device="cpu", storage=args.tier, done_marks="last",
                        seed=args.seed, **where)
    ring = ReplayBuffer(args.ring_rows * n, n, device=device, done_marks="last", seed=args.seed, mirror=tier)
    model = Model(env.obs_dim, env.action_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    obs = env.reset()
    timer = Timer(device, PHASES)
    rows: list[dict] = []
    began = time.perf_counter()

    def step_env() -> None:
        nonlocal obs
        timer.start()
        action = 4 * torch.rand(n, env.action_dim, generator=gen, device=device) - 2
        nxt, reward, terminated, truncated, extras = env.step(action)
        timer.stop("simulate")
        ring.add({"obs": obs, "action": action, "reward": reward}, terminated=terminated,
                 truncated=truncated, final_obs=extras["final_obs"])
        timer.stop("add")
        obs = nxt

    for _ in range(LENGTH):  # the first windows fit before learning starts
        step_env()
    ring.sync_mirror()
    loader = DataLoader(BufferDataset(tier, args.batch, kind="sequences", length=LENGTH), batch_size=None,
                        num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed),
                        **({"prefetch_factor": 2} if args.workers else {}))
    batches = iter(loader)
    for it in range(1, args.iterations + 1):
        for _ in range(args.steps_per_iteration):
            step_env()
        for _ in range(args.updates):
            timer.start()
            batch = next(batches)
            timer.stop("sample")
            loss, _ = window_loss(model, batch, device)
            opt.zero_grad()
            loss.backward()
            opt.step()
            timer.stop("learn")
        with torch.no_grad():
            recent = ring.sample_sequences(args.batch, LENGTH)
            held, still = window_loss(model, recent, device)
        ratio = float(held / still)
        wall = time.perf_counter() - began
        rows.append({"iteration": it, "env_steps": ring.num_adds * n, "tier_rows": tier.num_adds,
                     "train_mse": round(float(loss.detach()), 6), "recent_mse": round(float(held), 6),
                     "no_change_mse": round(float(still), 6), "ratio": round(ratio, 4),
                     "wall_s": round(wall, 3), **{f"{k}_s": round(v, 4) for k, v in timer.total.items()}})
        if not args.quiet and (it % 20 == 0 or it == 1):
            print(f"it {it} steps {rows[-1]['env_steps']} recent mse {float(held):.5f} "
                  f"(no change {float(still):.5f}, ratio {ratio:.3f})", flush=True)
        if ratio <= args.target_ratio or wall > 60 * args.max_minutes:
            break
    del batches
    ring.sync_mirror()
    write_curve(args.out, "world_model_pendulum", rows,
                f"Pendulum dynamics from the host tier ({args.workers} workers)", "next-observation MSE",
                {"model, newest rows (ring)": "recent_mse", "no change": "no_change_mse"}, log=True)
    out = {"rows": rows, "ratio": rows[-1]["ratio"], "wall_s": rows[-1]["wall_s"],
           "phases": dict(timer.total), "tier_adds": tier.num_adds, "ring_adds": ring.num_adds}
    tier.close()  # a disk tier: flushed, and ReplayBuffer.open(path) reads its history again
    return out


if __name__ == "__main__":
    main()
