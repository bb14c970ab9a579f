"""The old ``buffers`` quickstart, redone: Pendulum with rendered images in a ring of 10k steps,
sequences of ``[32, 10]`` that keep episodes intact, from vectorized lanes and from a single
environment.

    python examples/quickstart.py [--device cuda] [--num-envs 16] [--steps 10000]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_option  # noqa: E402
from envs import Pendulum, pendulum_images  # noqa: E402

from gpubuffers import ReplayBuffer  # noqa: E402


def fill(buf: ReplayBuffer, env: Pendulum, steps: int, single: bool, seed: int) -> None:
    """Random torques; every step as Isaac Lab returns it (same-step reset, final observation)."""
    gen = torch.Generator(device=env.device).manual_seed(seed)
    obs = env.reset()
    for _ in range(steps):
        action = 4 * torch.rand(env.num_envs, 1, generator=gen, device=env.device) - 2
        nxt, reward, terminated, truncated, extras = env.step(action)
        step = {"obs": obs, "image": pendulum_images(obs), "action": action, "reward": reward}
        final = extras["final_obs"]
        if single:  # one environment: leaves without a lane dimension, Python bool flags
            step = {k: v[0] for k, v in step.items()}
            terminated, truncated, final = bool(terminated[0]), bool(truncated[0]), final[0]
        buf.add(step, terminated=terminated, truncated=truncated, final_obs=final)
        obs = nxt


def check_windows(batch: dict) -> None:
    """Windows of consecutive rows of one episode: the pole's angle moves by at most
    ``max_speed * dt`` per row, which a window crossing a reset would break."""
    cos, sin = batch["obs"][..., 0], batch["obs"][..., 1]
    angle = torch.atan2(sin, cos)
    step = torch.remainder(angle[:, 1:] - angle[:, :-1] + torch.pi, 2 * torch.pi) - torch.pi
    ok = batch["valid"]
    assert (step[ok].abs() <= 8.0 * 0.05 + 1e-4).all(), "a window crossed an episode"
    assert not batch["is_first"][ok][:, 1:].any()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device_option, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N, ... (a device this machine has)")
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--steps", type=int, default=10_000, help="capacity, in steps of all lanes together")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out = {}
    for single in (False, True):
        lanes = 1 if single else args.num_envs
        env = Pendulum(lanes, device, seed=args.seed)
        buf = ReplayBuffer(args.steps, None if single else lanes, device=device, done_marks="last",
                           seed=args.seed)
        fill(buf, env, buf.rows + 150, single, args.seed)  # past one wrap of the ring
        batch = buf.sample_sequences(32, 10)
        check_windows(batch)
        stats = buf.episode_stats()
        name = "single environment" if single else f"{lanes} lanes"
        print(f"{name}: {len(buf)} steps stored, {int(buf.num_episodes)} whole episodes; "
              f"sample_sequences(32, 10): obs {tuple(batch['obs'].shape)}, image "
              f"{tuple(batch['image'].shape)} {batch['image'].dtype}; mean episode return "
              f"{float(stats['mean_return']):.1f} over {int(stats['count'])} episodes")
        out[name] = {"buffer": buf, "batch": batch}
    return out


if __name__ == "__main__":
    main()
