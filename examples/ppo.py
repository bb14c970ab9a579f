"""PPO on batched CartPole through ``gpubuffers.RolloutBuffer``: rollouts on the device, GAE with
the final observation's value at time limits, shuffled minibatch epochs.

    python examples/ppo.py [--device cuda] [--num-envs 1024] [--seed 0] [--env partial]

Prints progress (tqdm when installed), writes ``ppo_<env>.csv`` (the learning curve, with the wall
time split into simulation, acting, ``add``, ``compute_returns``, sampling (the minibatch gathers
of ``ro.minibatches``) and learning, in total seconds and in microseconds per environment step)
and ``.png`` (matplotlib when installed), and ends by printing each phase's wall time per
environment step. The time split synchronizes the device around each phase (on CUDA), which the
buffer itself never does. Stops at the target mean return (episodes ended in the last 5
iterations) or after ``--max-minutes``.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Curve, Returns, Timer, arguments, summary  # noqa: E402
from envs import CartPole, PartialCartPole  # noqa: E402

from gpubuffers import RolloutBuffer  # noqa: E402

PHASES = ("sim", "act", "add", "returns", "sample", "learn")
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


def parse(argv=None, doc: str = __doc__, choose_env: bool = True, iterations: int = 60, minutes: float = 5.0):
    """The options; ``iterations`` and ``minutes`` are the defaults of ``--iterations`` and
    ``--max-minutes`` (the recurrent agent needs more of both)."""
    p = arguments(doc, target=475.0, minutes=minutes)
    if choose_env:
        p.add_argument("--env", choices=sorted(ENVS), default="cartpole",
                       help="partial: CartPole observed without velocities")
    p.add_argument("--iterations", type=int, default=iterations)
    p.add_argument("--num-steps", type=int, default=16, help="rows per rollout")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--minibatches", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--clip", type=float, default=0.2)
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
    returns = Returns(n, device)
    timer = Timer(device, PHASES)
    curve = Curve(args, args.iterations)
    for it in range(args.iterations):
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
                returns.step(reward, terminated | truncated)
                obs = next_obs
                timer.stop("sim")
            last_value = critic(obs)[:, 0]
            timer.stop("act")
            ro.compute_returns(last_value, args.gamma, args.lam)
            timer.stop("returns")
        for batch in ro.minibatches(args.minibatches, args.epochs):
            timer.stop("sample")
            logits = actor(batch["obs"])
            log_prob = torch.log_softmax(logits, -1).gather(1, batch["action"][:, None])[:, 0]
            ratio = (log_prob - batch["log_prob"]).exp()
            adv = batch["advantage"]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - args.clip, 1 + args.clip) * adv).mean()
            value_loss = 0.5 * (critic(batch["obs"])[:, 0] - batch["return"]).pow(2).mean()
            loss = policy_loss + 0.5 * value_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([*actor.parameters(), *critic.parameters()], 0.5)
            opt.step()
            timer.stop("learn")
        if curve.record(it + 1, (it + 1) * args.num_steps * n, returns.mean(), timer, episodes=returns.episodes):
            break
    return curve.finish(f"ppo_{args.env}", f"PPO, {env.__class__.__name__}, {n} lanes, {device}", timer)


if __name__ == "__main__":
    print(summary(main()))
