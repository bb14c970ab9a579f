"""The demo: thousands of simulated, self-resetting lanes driven through the buffer on one device.

The simulated environment is Isaac Lab shaped: batched tensors on the device, episodes that end
by termination (probability ``p_end`` per step) or truncation (``max_len`` steps), the reset
observation returned in place of the final one, and the final one in ``extras["final_obs"]``.
It keeps its own episode counters, so the buffer's device statistics can be checked against them.
"""

from __future__ import annotations

import time

import torch

from gpubuffers import ReplayBuffer

from .timing import sync


class SimulatedLanes:
    def __init__(self, num_envs: int, obs_dim: int = 64, act_dim: int = 12, p_end: float = 0.01,
                 max_len: int = 200, device: torch.device | str = "cpu", seed: int = 0):
        self.n, self.obs_dim, self.act_dim = num_envs, obs_dim, act_dim
        self.p_end, self.max_len = p_end, max_len
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.obs = torch.randn(num_envs, obs_dim, generator=self.gen, device=self.device)
        self.t = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.ret = torch.zeros(num_envs, device=self.device)
        self.finished = torch.zeros((), dtype=torch.int64, device=self.device)
        self.sum_len = torch.zeros((), dtype=torch.int64, device=self.device)
        self.sum_ret = torch.zeros((), dtype=torch.float64, device=self.device)

    def reset(self) -> torch.Tensor:
        return self.obs.clone()

    def step(self, action: torch.Tensor):
        final = self.obs * 0.99 + 0.01 * action.sum(-1, keepdim=True)
        reward = -final.square().mean(-1)
        self.t += 1
        self.ret += reward
        terminated = torch.rand(self.n, generator=self.gen, device=self.device) < self.p_end
        truncated = (self.t >= self.max_len) & ~terminated
        done = terminated | truncated
        self.finished += done.sum()
        self.sum_len += (self.t * done).sum()
        self.sum_ret += (self.ret * done).sum()
        fresh = torch.randn(self.n, self.obs_dim, generator=self.gen, device=self.device)
        self.obs = torch.where(done[:, None], fresh, final)
        self.t.masked_fill_(done, 0)
        self.ret.masked_fill_(done, 0.0)
        return self.obs.clone(), reward, terminated, truncated, {"final_obs": final}


def run_demo(device: torch.device, num_envs: int = 4096, steps: int = 300, capacity: int = 1 << 20) -> dict:
    """Drive ``steps`` batched steps through a buffer, sampling as a training loop would.

    ``steps`` must not exceed ``capacity // num_envs`` for the episode counts to compare with the
    environment's: the buffer's statistics cover the episodes whose last row is still stored.
    """
    if not 2 <= steps <= capacity // num_envs:
        raise ValueError(f"steps: expected 2 to capacity // num_envs = {capacity // num_envs}, got {steps}")
    env = SimulatedLanes(num_envs, device=device)
    buf = ReplayBuffer(capacity, num_envs, device=device, done_marks="last", seed=0)
    obs = env.reset()
    gen = torch.Generator(device=device).manual_seed(1)
    add_s = sample_s = seq_s = first_add_s = 0.0
    samples = 0
    for i in range(steps):
        action = torch.rand(num_envs, env.act_dim, generator=gen, device=device) * 2 - 1
        next_obs, reward, terminated, truncated, extras = env.step(action)
        sync(device)
        t0 = time.perf_counter()
        buf.add({"obs": obs, "action": action, "reward": reward}, terminated | truncated,
                truncated=truncated, final_obs=extras["final_obs"])
        sync(device)
        if i == 0:  # the first add allocates the rings: timed apart from the adds that follow
            first_add_s = time.perf_counter() - t0
        else:
            add_s += time.perf_counter() - t0
        obs = next_obs
        if i >= 32 and i % 4 == 0:
            t0 = time.perf_counter()
            batch = buf.sample(4096)
            sync(device)
            sample_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            seqs = buf.sample_sequences(256, 32)
            sync(device)
            seq_s += time.perf_counter() - t0
            samples += 1
    stats = buf.episode_stats()  # every episode that ended within the live rows
    finished = int(stats["count"])
    return {
        "device": str(device),
        "num_envs": num_envs,
        "steps": steps,
        "transitions_added_per_s": num_envs * (steps - 1) / add_s,
        "first_add_s": first_add_s,
        "sample_4096_ms": 1e3 * sample_s / samples,
        "sequences_256x32_ms": 1e3 * seq_s / samples,
        "episodes_finished": finished,
        "env_episodes_finished": int(env.finished),
        "mean_episode_length": float(stats["mean_length"]),
        "env_mean_episode_length": float(env.sum_len) / max(int(env.finished), 1),
        "mean_episode_return": float(stats["mean_return"]),
        "env_mean_episode_return": float(env.sum_ret) / max(int(env.finished), 1),
        "next_valid_fraction": float(batch["next_valid"].float().mean()),
        "sequence_valid_fraction": float(seqs["valid"].float().mean()),
    }


def print_demo(r: dict) -> None:
    print(f"## Demo: {r['num_envs']} simulated lanes x {r['steps']} steps on {r['device']}\n")
    print(f"- add: {r['transitions_added_per_s'] / 1e6:.1f} M transitions/s (the first add, which allocates "
          f"the rings, took {r['first_add_s']:.2f} s)")
    print(f"- sample(4096) with next obs: {r['sample_4096_ms']:.2f} ms; "
          f"sample_sequences(256, 32): {r['sequences_256x32_ms']:.2f} ms")
    print(f"- episodes finished: {r['episodes_finished']} (environment's own count: {r['env_episodes_finished']})")
    print(f"- mean episode length {r['mean_episode_length']:.2f} (environment: {r['env_mean_episode_length']:.2f}), "
          f"mean return {r['mean_episode_return']:.4f} (environment: {r['env_mean_episode_return']:.4f})")
    print(f"- sampled transitions with a known successor: {100 * r['next_valid_fraction']:.1f}%; "
          f"sequence draws accepted: {100 * r['sequence_valid_fraction']:.1f}%\n")
