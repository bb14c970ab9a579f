"""Recurrent PPO (a GRU) on CartPole observed without velocities, trained from whole lanes of a
``gpubuffers.RolloutBuffer`` (``ro.sequences``): the policy must infer the velocities from its
memory.

    python examples/ppo_recurrent.py [--device cuda] [--num-envs 1024] [--seed 0]

The GRU state fed to the policy at each step is stored with the step (leaf ``"h"``); training
replays each lane's rows in order from ``initial_hidden`` (that state at the rollout's first row),
zeroing the state where ``is_first`` marks the start of an episode, as collection did. Writes
``ppo_recurrent_partial.csv``/``.png`` and prints the wall time per environment step like
``examples/ppo.py`` (same options and phases; sampling is ``ro.sequences``), but runs up to 200
iterations and 10 minutes by default: seed 0 needs about 150 to reach the target of 475.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Curve, Returns, Timer, summary  # noqa: E402
from envs import PartialCartPole  # noqa: E402
from ppo import PHASES, mlp, parse  # noqa: E402

from gpubuffers import RolloutBuffer  # noqa: E402

ITERATIONS = 200  # the default --iterations: seed 0 reaches the target of 475 in about 150


class RecurrentAgent(nn.Module):
    def __init__(self, obs_dim: int, actions: int, hidden: int = 64):
        super().__init__()
        self.hidden = hidden
        self.gru = nn.GRUCell(obs_dim, hidden)
        self.actor = mlp(hidden, actions, gain=0.01)
        self.critic = mlp(hidden, 1)

    def step(self, obs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.gru(obs, h)

    def unroll(self, obs: torch.Tensor, is_first: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """[T, B, H] states over a lane's rows: reset where an episode begins, then one GRU step."""
        out = []
        for t in range(obs.shape[0]):
            h = torch.where(is_first[t][:, None], 0.0, h)
            h = self.gru(obs[t], h)
            out.append(h)
        return torch.stack(out)


def main(argv=None) -> dict:
    args = parse(argv, __doc__, choose_env=False, iterations=ITERATIONS, minutes=10.0)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    env = PartialCartPole(args.num_envs, device, seed=args.seed)
    agent = RecurrentAgent(env.obs_dim, env.action_dim).to(device)
    opt = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)
    n = args.num_envs
    ro = RolloutBuffer(args.num_steps, n, device=device, seed=args.seed)

    obs = env.reset()
    h = torch.zeros(n, agent.hidden, device=device)
    returns = Returns(n, device)
    timer = Timer(device, PHASES)
    curve = Curve(args, args.iterations)
    for it in range(args.iterations):
        timer.start()
        with torch.no_grad():
            for _ in range(args.num_steps):
                h_new = agent.step(obs, h)
                logits = agent.actor(h_new)
                action = torch.distributions.Categorical(logits=logits).sample()
                log_prob = torch.log_softmax(logits, -1).gather(1, action[:, None])[:, 0]
                value = agent.critic(h_new)[:, 0]
                timer.stop("act")
                next_obs, reward, terminated, truncated, extras = env.step(action)
                timer.stop("sim")
                # The value of the final observation, seen with the episode's own memory.
                final_value = agent.critic(agent.step(extras["final_obs"], h_new))[:, 0]
                timer.stop("act")
                ro.add({"obs": obs, "h": h, "action": action, "log_prob": log_prob, "value": value,
                        "reward": reward}, terminated=terminated, truncated=truncated, final_value=final_value)
                timer.stop("add")
                done = terminated | truncated
                returns.step(reward, done)
                h = torch.where(done[:, None], 0.0, h_new)  # a new episode starts from a fresh state
                obs = next_obs
                timer.stop("sim")
            last_value = agent.critic(agent.step(obs, h))[:, 0]
            timer.stop("act")
            ro.compute_returns(last_value, args.gamma, args.lam)
            timer.stop("returns")
        for batch in ro.sequences(args.minibatches, args.epochs, hidden_key="h"):
            timer.stop("sample")
            states = agent.unroll(batch["obs"], batch["is_first"], batch["initial_hidden"])
            logits = agent.actor(states)
            log_prob = torch.log_softmax(logits, -1).gather(2, batch["action"][..., None])[..., 0]
            ratio = (log_prob - batch["log_prob"]).exp()
            mask = batch["mask"].float()
            adv = batch["advantage"]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            surrogate = torch.min(ratio * adv, ratio.clamp(1 - args.clip, 1 + args.clip) * adv)
            policy_loss = -(surrogate * mask).sum() / mask.sum()
            value_loss = 0.5 * (((agent.critic(states)[..., 0] - batch["return"]) ** 2) * mask).sum() / mask.sum()
            loss = policy_loss + 0.5 * value_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
            opt.step()
            timer.stop("learn")
        if curve.record(it + 1, (it + 1) * args.num_steps * n, returns.mean(), timer, episodes=returns.episodes):
            break
    return curve.finish("ppo_recurrent_partial", f"recurrent PPO (GRU), PartialCartPole, {n} lanes, {device}",
                        timer)


if __name__ == "__main__":
    print(summary(main()))
