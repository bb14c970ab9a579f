"""TD3 on batched Pendulum through ``gpubuffers.ReplayBuffer``, FastTD3-style: many lanes, large
batches, n-step targets sampled on the device, optional prioritized replay.

    python examples/td3.py [--device cuda] [--num-envs 1024] [--seed 0] [--prioritized]

Each iteration steps every lane once, adds the row (with the true final observations at time
limits), then runs ``--updates`` critic updates on ``sample(B, n_step=3, gamma=0.99)`` batches
and an actor update every second one. The mean return comes from the buffer's own
``episode_stats`` over the last 200 rows. Writes ``td3_pendulum.csv`` and ``.png`` like
``examples/ppo.py``, with the wall time split into simulation, acting, ``add``, sampling (with
the priority updates) and learning.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Curve, Timer, arguments  # noqa: E402
from envs import GymnasiumVec, Pendulum  # noqa: E402
from ppo import summary  # noqa: E402

from gpubuffers import ReplayBuffer  # noqa: E402

PHASES = ("sim", "act", "add", "sample", "learn")


def net(inp: int, out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


class Critic(nn.Module):
    """Two Q networks (clipped double Q)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.q1 = net(obs_dim + act_dim, 1, hidden)
        self.q2 = net(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, act], -1)
        return self.q1(x)[:, 0], self.q2(x)[:, 0]


def parse(argv=None):
    p = arguments(__doc__, target=-250.0, minutes=10.0)
    p.add_argument("--env", choices=("pendulum", "halfcheetah"), default="pendulum",
                   help="halfcheetah: gymnasium's MuJoCo HalfCheetah-v5 through make_vec (autoreset next_step; "
                        "pip install -e '.[examples]')")
    p.add_argument("--iterations", type=int, default=3000, help="env steps per lane at most")
    p.add_argument("--capacity", type=int, default=1 << 20)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--updates", type=int, default=8, help="critic updates per iteration")
    p.add_argument("--n-step", type=int, default=3)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tau", type=float, default=0.005)
    p.add_argument("--noise", type=float, default=0.2, help="exploration noise, fraction of the action bound")
    p.add_argument("--warmup", type=int, default=10, help="iterations of random actions first")
    p.add_argument("--prioritized", action="store_true", help="proportional prioritized replay (alpha 0.6)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gym = args.env == "halfcheetah"
    env = GymnasiumVec("HalfCheetah-v5", args.num_envs, device, args.seed) if gym else \
        Pendulum(args.num_envs, device, seed=args.seed)
    bound, act_dim = env.action_bound, env.action_dim
    actor = nn.Sequential(net(env.obs_dim, env.action_dim, args.hidden), nn.Tanh()).to(device)
    critic = Critic(env.obs_dim, env.action_dim, args.hidden).to(device)
    actor_t, critic_t = copy.deepcopy(actor), copy.deepcopy(critic)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.lr)
    buf = ReplayBuffer(args.capacity, args.num_envs, device=device, done_marks="last", seed=args.seed,
                       autoreset="next_step" if gym else "same_step",
                       priority_alpha=0.6 if args.prioritized else None)
    n = args.num_envs
    gen = torch.Generator(device=device).manual_seed(args.seed)
    beta = {"priority_beta": 0.4} if args.prioritized else {}

    obs = env.reset()
    timer = Timer(device, PHASES)
    curve = Curve(args, args.iterations)
    recent = float("nan")
    updates = 0
    for it in range(args.iterations):
        timer.start()
        with torch.no_grad():
            if it < args.warmup:
                action = (torch.rand(n, act_dim, generator=gen, device=device) * 2 - 1) * bound
            else:
                noise = torch.randn(n, act_dim, generator=gen, device=device) * args.noise * bound
                action = (actor(obs) * bound + noise).clamp(-bound, bound)
        timer.stop("act")
        next_obs, reward, terminated, truncated, extras = env.step(action)
        timer.stop("sim")
        buf.add({"obs": obs, "action": action, "reward": reward}, terminated=terminated, truncated=truncated,
                final_obs=extras.get("final_obs"))  # next_step: the next row holds the final obs
        timer.stop("add")
        obs = next_obs
        if it >= args.warmup:
            for _ in range(args.updates):
                batch = buf.sample(args.batch_size, n_step=args.n_step, gamma=args.gamma, **beta)
                timer.stop("sample")
                with torch.no_grad():
                    nxt = batch["next"]["obs"]
                    smooth = (torch.randn(args.batch_size, act_dim, generator=gen, device=device) * 0.2).clamp(-0.5, 0.5)
                    a_next = (actor_t(nxt) + smooth).clamp(-1, 1) * bound
                    q_next = torch.min(*critic_t(nxt, a_next))
                    target = batch["return"] + batch["discount"] * q_next
                q1, q2 = critic(batch["obs"], batch["action"])
                td = q1 - target
                weight = batch["target_valid"].float() * batch.get("weight", 1.0)
                critic_loss = (weight * (td ** 2 + (q2 - target) ** 2)).mean()
                critic_opt.zero_grad(set_to_none=True)
                critic_loss.backward()
                critic_opt.step()
                if args.prioritized:
                    timer.stop("learn")
                    buf.update_priorities(batch["index"], td.detach().abs())
                    timer.stop("sample")
                updates += 1
                if updates % 2 == 0:
                    actor_loss = -critic(batch["obs"], actor(batch["obs"]) * bound)[0].mean()
                    actor_opt.zero_grad(set_to_none=True)
                    actor_loss.backward()
                    actor_opt.step()
                    with torch.no_grad():
                        for t, s in ((actor_t, actor), (critic_t, critic)):
                            for pt, ps in zip(t.parameters(), s.parameters()):
                                pt.lerp_(ps, args.tau)
                timer.stop("learn")
        if (it + 1) % 50 == 0 or it + 1 == args.iterations:
            stats = buf.episode_stats(last_rows=env.max_steps)
            if int(stats["count"]) > 0:  # one host read per 50 iterations, for the log
                recent = float(stats["mean_return"])
            if curve.record(it + 1, (it + 1) * n, recent, timer, updates=updates):
                break
    name = f"td3_{args.env}" + ("_prioritized" if args.prioritized else "")
    title = f"TD3{' + PER' if args.prioritized else ''}, {'HalfCheetah-v5' if gym else 'Pendulum'}, {n} lanes, {device}"
    return curve.finish(name, title, timer)

if __name__ == "__main__":
    print(summary(main()))
