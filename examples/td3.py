"""TD3 on batched Pendulum through ``gpubuffers.ReplayBuffer``, FastTD3-style: many lanes, large
batches, n-step targets sampled on the device, optional prioritized replay.

    python examples/td3.py [--device cuda] [--num-envs 1024] [--seed 0] [--prioritized]

Each iteration steps every lane once, adds the row (with the true final observations at time
limits), then runs ``--updates`` critic updates on ``sample(B, n_step=3, gamma=0.99)`` batches
and an actor update every second one. The mean return comes from the buffer's own
``episode_stats`` over the last 200 rows. Writes ``td3_pendulum.csv`` and ``.png`` like
``examples/ppo.py``, with the wall time split into simulation, acting, ``add``, sampling (with
the priority updates) and learning, in total seconds and per environment step, and ends by
printing each phase's wall time per environment step.

``--cuda-graph`` (CUDA, even ``--updates``) captures an iteration's updates, sampling and priority
updates included, in one CUDA graph and replays it each iteration; the first learning iteration
also runs three warm-up iterations and the capture. Sampling is then timed as part of learning.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Curve, Timer, arguments, summary  # noqa: E402
from envs import GymnasiumVec, Pendulum  # noqa: E402

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
    p.add_argument("--target-noise", type=float, default=0.2, help="target policy smoothing noise (clipped to 0.5)")
    p.add_argument("--prioritized", action="store_true", help="proportional prioritized replay (alpha 0.6)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each iteration's updates (sampling included) from one CUDA graph; CUDA only, "
                        "--updates even")
    return p.parse_args(argv)


class Learner:
    """One iteration's learning: ``args.updates`` critic updates on ``sample(B, n_step, gamma)``
    batches (with the priority updates when prioritized), and after every second one an actor
    update and a soft update of the targets. ``run`` calls it eagerly, or replays it from a CUDA
    graph after ``capture`` (``--cuda-graph``): sampling, priority updates, both optimizers and the
    target updates are then one graph launch per iteration, and the host only steps and adds."""

    def __init__(self, args, buf: ReplayBuffer, obs_dim: int, act_dim: int, bound: float, gen: torch.Generator):
        self.args, self.buf, self.bound, self.act_dim, self.gen = args, buf, bound, act_dim, gen
        self.device = device = gen.device
        self.actor = nn.Sequential(net(obs_dim, act_dim, args.hidden), nn.Tanh()).to(device)
        self.critic = Critic(obs_dim, act_dim, args.hidden).to(device)
        self.actor_t, self.critic_t = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        # A graph keeps the optimizer's step counts on the device (capturable) and its gradients
        # in place (zeroed, never freed).
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.lr, capturable=args.cuda_graph)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.lr, capturable=args.cuda_graph)
        self.sample_args = {"n_step": args.n_step, "gamma": args.gamma}
        if args.prioritized:
            self.sample_args["priority_beta"] = 0.4
        self.updates = 0
        self.graph = None

    def update(self, actor_too: bool, timer: Timer | None) -> None:
        args, buf, bound = self.args, self.buf, self.bound
        batch = buf.sample(args.batch_size, **self.sample_args)
        if timer:
            timer.stop("sample")
        with torch.no_grad():
            nxt = batch["next"]["obs"]
            smooth = (torch.randn(args.batch_size, self.act_dim, generator=self.gen, device=self.device)
                      * args.target_noise).clamp(-0.5, 0.5)
            a_next = (self.actor_t(nxt) + smooth).clamp(-1, 1) * bound
            q_next = torch.min(*self.critic_t(nxt, a_next))
            target = batch["return"] + batch["discount"] * q_next
        q1, q2 = self.critic(batch["obs"], batch["action"])
        td = q1 - target
        weight = batch["target_valid"].float() * batch.get("weight", 1.0)
        critic_loss = (weight * (td ** 2 + (q2 - target) ** 2)).mean()
        self.critic_opt.zero_grad(set_to_none=False)
        critic_loss.backward()
        self.critic_opt.step()
        if args.prioritized:
            if timer:
                timer.stop("learn")
            buf.update_priorities(batch["index"], td.detach().abs())
            if timer:
                timer.stop("sample")
        if actor_too:
            actor_loss = -self.critic(batch["obs"], self.actor(batch["obs"]) * bound)[0].mean()
            self.actor_opt.zero_grad(set_to_none=False)
            actor_loss.backward()
            self.actor_opt.step()
            with torch.no_grad():
                for t, s in ((self.actor_t, self.actor), (self.critic_t, self.critic)):
                    torch._foreach_lerp_(list(t.parameters()), list(s.parameters()), args.tau)
        if timer:
            timer.stop("learn")

    def iteration(self, timer: Timer | None) -> None:
        for _ in range(self.args.updates):
            self.updates += 1
            self.update(self.updates % 2 == 0, timer)

    def capture(self, warmup: int = 3) -> None:
        """Warm up ``warmup`` iterations on a side stream (kernels compile, the optimizers' state and
        the gradients are allocated), then capture one iteration. Its updates alternate critic and
        actor the same way every time, so ``--updates`` must be even."""
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(warmup):
                self.iteration(None)
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.gen)
        with torch.cuda.graph(self.graph):
            self.iteration(None)  # capture only: the counted updates run at replay
        self.updates -= self.args.updates

    def run(self, timer: Timer) -> None:
        """One iteration: eagerly (sampling and learning timed apart) or as one graph replay
        (timed as learning)."""
        if self.args.cuda_graph and self.graph is None:
            self.capture()
            timer.stop("learn")
        if self.graph is None:
            self.iteration(timer)
        else:
            self.graph.replay()
            self.updates += self.args.updates
            timer.stop("learn")


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    if args.cuda_graph and (device.type != "cuda" or args.updates % 2):
        raise ValueError(f"--cuda-graph needs a CUDA --device and an even --updates; got --device {args.device} "
                         f"and --updates {args.updates}")
    if args.cuda_graph and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        raise RuntimeError(f"--cuda-graph draws its noise from its own generator inside the graph, which needs "
                           f"CUDAGraph.register_generator_state; torch {torch.__version__} lacks it")
    torch.manual_seed(args.seed)
    gym = args.env == "halfcheetah"
    env = GymnasiumVec("HalfCheetah-v5", args.num_envs, device, args.seed) if gym else \
        Pendulum(args.num_envs, device, seed=args.seed)
    bound, act_dim = env.action_bound, env.action_dim
    buf = ReplayBuffer(args.capacity, args.num_envs, device=device, done_marks="last", seed=args.seed,
                       autoreset="next_step" if gym else "same_step",
                       priority_alpha=0.6 if args.prioritized else None)
    n = args.num_envs
    gen = torch.Generator(device=device).manual_seed(args.seed)  # exploration and target smoothing noise
    learner = Learner(args, buf, env.obs_dim, act_dim, bound, gen)

    obs = env.reset()
    timer = Timer(device, PHASES)
    curve = Curve(args, args.iterations)
    recent = float("nan")
    for it in range(args.iterations):
        timer.start()
        with torch.no_grad():
            if it < args.warmup:
                action = (torch.rand(n, act_dim, generator=gen, device=device) * 2 - 1) * bound
            else:
                noise = torch.randn(n, act_dim, generator=gen, device=device) * args.noise * bound
                action = (learner.actor(obs) * bound + noise).clamp(-bound, bound)
        timer.stop("act")
        next_obs, reward, terminated, truncated, extras = env.step(action)
        timer.stop("sim")
        buf.add({"obs": obs, "action": action, "reward": reward}, terminated=terminated, truncated=truncated,
                final_obs=extras.get("final_obs"))  # next_step: the next row holds the final obs
        timer.stop("add")
        obs = next_obs
        if it >= args.warmup:
            learner.run(timer)
        if (it + 1) % 50 == 0 or it + 1 == args.iterations:
            stats = buf.episode_stats(last_rows=env.max_steps)
            if int(stats["count"]) > 0:  # one host read per 50 iterations, for the log
                recent = float(stats["mean_return"])
            if curve.record(it + 1, (it + 1) * n, recent, timer, updates=learner.updates):
                break
    name = f"td3_{args.env}" + ("_prioritized" if args.prioritized else "") + ("_graph" if args.cuda_graph else "")
    title = (f"TD3{' + PER' if args.prioritized else ''}, {'HalfCheetah-v5' if gym else 'Pendulum'}, {n} lanes, "
             f"{device}{', CUDA graph' if args.cuda_graph else ''}")
    return curve.finish(name, title, timer)


if __name__ == "__main__":
    print(summary(main()))
