"""PPO on batched CartPole through ``gpubuffers.RolloutBuffer``: rollouts on the device, GAE with
the final observation's value at time limits, shuffled minibatch epochs.

    python examples/ppo.py [--device cuda] [--num-envs 1024] [--seed 0] [--iterations 60]

Prints a progress line per iteration (tqdm when installed), writes a CSV of the learning curve
with the wall time split into simulation, acting, ``add``, ``compute_returns`` and learning, and a
PNG of the curve (matplotlib when installed). The time split synchronizes the device around each
phase (on CUDA), which the buffer itself never does.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from envs import CartPole, PartialCartPole  # noqa: E402

from gpubuffers import RolloutBuffer  # noqa: E402

PHASES = ("sim", "act", "add", "returns", "learn")
ENVS = {"cartpole": CartPole, "partial": PartialCartPole}


def mlp(inp: int, out: int, hidden: int = 64, gain: float = 1.0) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                        nn.Linear(hidden, out))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight, 2 ** 0.5)
            nn.init.zeros_(m.bias)
    nn.init.orthogonal_(net[-1].weight, gain)
    return net


class Timer:
    """Wall seconds per phase; synchronizes CUDA at phase borders so each phase owns its work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = dict.fromkeys(PHASES, 0.0)
        self._t = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.total[phase] += now - self._t
        self._t = now


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--env", choices=sorted(ENVS), default="cartpole",
                   help="partial: CartPole observed without velocities")
    p.add_argument("--num-envs", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--num-steps", type=int, default=16, help="rows per rollout")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--minibatches", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--target", type=float, default=475.0,
                   help="stop once the mean return (episodes ended in the last 5 iterations) reaches it")
    p.add_argument("--max-minutes", type=float, default=5.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    env = ENVS[args.env](args.num_envs, device, seed=args.seed)
    actor = mlp(env.obs_dim, env.action_dim, gain=0.01).to(device)
    critic = mlp(env.obs_dim, 1).to(device)
    opt = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=args.lr, eps=1e-5)
    ro = RolloutBuffer(args.num_steps, args.num_envs, device=device, seed=args.seed)
    n = args.num_envs

    obs = env.reset()
    ep_return = torch.zeros(n, device=device)
    timer = Timer(device)
    rows = []
    bar = None
    if not args.quiet:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.iterations, unit="it")
        except ImportError:
            pass
    began = time.perf_counter()
    recent = float("nan")
    window: list[tuple[float, float]] = []  # (return sum, episodes) of the last iterations
    for it in range(args.iterations):
        ended_sum = torch.zeros((), device=device)
        ended_count = torch.zeros((), device=device)
        timer.start()
        with torch.no_grad():
            for _ in range(args.num_steps):
                logits = actor(obs)
                action = torch.distributions.Categorical(logits=logits).sample()
                log_prob = torch.log_softmax(logits, -1).gather(1, action[:, None])[:, 0]
                value = critic(obs)[:, 0]
                timer.stop("act")
                next_obs, reward, terminated, truncated, extras = env.step(action)
                timer.stop("sim")
                final_value = critic(extras["final_obs"])[:, 0]
                timer.stop("act")
                ro.add({"obs": obs, "action": action, "log_prob": log_prob, "value": value, "reward": reward},
                       terminated=terminated, truncated=truncated, final_value=final_value)
                timer.stop("add")
                ep_return += reward
                done = terminated | truncated
                ended_sum += torch.where(done, ep_return, 0.0).sum()
                ended_count += done.sum()
                ep_return = torch.where(done, 0.0, ep_return)
                obs = next_obs
                timer.stop("sim")
            last_value = critic(obs)[:, 0]
            timer.stop("act")
            ro.compute_returns(last_value, args.gamma, args.lam)
            timer.stop("returns")
        for batch in ro.minibatches(args.minibatches, args.epochs):
            logits = actor(batch["obs"])
            log_prob = torch.log_softmax(logits, -1).gather(1, batch["action"][:, None])[:, 0]
            ratio = (log_prob - batch["log_prob"]).exp()
            adv = batch["advantage"]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - args.clip, 1 + args.clip) * adv).mean()
            value_loss = 0.5 * (critic(batch["obs"])[:, 0] - batch["return"]).pow(2).mean()
            entropy = torch.distributions.Categorical(logits=logits).entropy().mean()
            loss = policy_loss + 0.5 * value_loss - 0.0 * entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([*actor.parameters(), *critic.parameters()], 0.5)
            opt.step()
        timer.stop("learn")
        window = (window + [(float(ended_sum), float(ended_count))])[-5:]  # one host read per iteration
        count = sum(c for _, c in window)
        if count:
            recent = sum(r for r, _ in window) / count
        wall = time.perf_counter() - began
        rows.append({"iteration": it + 1, "env_steps": (it + 1) * args.num_steps * n, "wall_s": round(wall, 3),
                     "mean_return": round(recent, 2), "episodes": int(window[-1][1]),
                     **{f"{k}_s": round(v, 4) for k, v in timer.total.items()}})
        line = f"it {it + 1} steps {rows[-1]['env_steps']} return {recent:.1f} ({rows[-1]['env_steps'] / wall:,.0f} steps/s)"
        if bar is not None:
            bar.set_postfix_str(line)
            bar.update(1)
        elif not args.quiet:
            print(line, flush=True)
        if recent >= args.target or wall > 60 * args.max_minutes:
            break
    if bar is not None:
        bar.close()
    write(rows, args.out, f"ppo_{args.env}", f"PPO, {env.__class__.__name__}, {n} lanes, {device}")
    return {"rows": rows, "mean_return": recent, "wall_s": rows[-1]["wall_s"], "phases": dict(timer.total)}


def write(rows: list[dict], out: str, name: str, title: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["env_steps"] for r in rows], [r["mean_return"] for r in rows])
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean episode return")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    out = main()
    total = sum(out["phases"].values())
    print(f"mean return {out['mean_return']:.1f} after {out['wall_s']:.0f} s; time split: " +
          ", ".join(f"{k} {v / total:.0%}" for k, v in out["phases"].items()))
