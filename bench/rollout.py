"""On-policy workloads W5-W6: the RolloutBuffer against the same path written with plain tensors.

W5 times ``compute_returns`` (GAE over T=24 rows of N=4096 lanes) against the loop over T that
rsl_rl-style code writes. W6 times a whole PPO update's data path: 24 adds, GAE, then 4 epochs of
4 shuffled minibatches, against preallocated plain tensors with slice assignment, the same GAE
loop and ``randperm`` + ``index_select`` per minibatch.
"""

from __future__ import annotations

import torch

from gpubuffers import RolloutBuffer

from .core import Row
from .timing import interleaved

T, LANES, OBS, ACT = 24, 4096, 64, 12
GAMMA, LAM = 0.99, 0.95
EPOCHS, MINIBATCHES = 4, 4
W5 = f"W5 compute_returns(T={T}, N={LANES})"
W6 = f"W6 PPO data path ({T} adds, GAE, {EPOCHS}x{MINIBATCHES} minibatches)"
PLAIN_GAE = "plain loop over T"
PLAIN_PPO = "plain tensors"


def make_rollout(device: torch.device, seed: int = 0) -> list[dict]:
    """T steps of a PPO rollout: obs, action, log_prob, value, reward and end flags (about 2% of
    the lanes end an episode each step, a quarter of those by a time limit)."""
    g = torch.Generator(device=device).manual_seed(seed)
    steps = []
    for _ in range(T):
        ends = torch.rand(LANES, generator=g, device=device) < 0.02
        truncated = ends & (torch.rand(LANES, generator=g, device=device) < 0.25)
        steps.append({
            "obs": torch.randn(LANES, OBS, generator=g, device=device),
            "action": torch.randn(LANES, ACT, generator=g, device=device),
            "log_prob": torch.randn(LANES, generator=g, device=device),
            "value": torch.randn(LANES, generator=g, device=device),
            "reward": torch.rand(LANES, generator=g, device=device),
            "terminated": ends & ~truncated, "truncated": truncated,
            "final_value": torch.randn(LANES, generator=g, device=device),
        })
    return steps


def plain_gae(reward: torch.Tensor, value: torch.Tensor, done: torch.Tensor, last_value: torch.Tensor,
              gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE as rsl_rl-style code writes it: a loop over T, several small ops per row."""
    adv = torch.empty_like(value)
    advantage = torch.zeros_like(last_value)
    for t in reversed(range(value.shape[0])):
        next_value = last_value if t == value.shape[0] - 1 else value[t + 1]
        not_done = 1.0 - done[t].float()
        delta = reward[t] + not_done * gamma * next_value - value[t]
        advantage = delta + not_done * gamma * lam * advantage
        adv[t] = advantage
    return adv, adv + value


class PlainRollout:
    """Preallocated [T, N, ...] tensors, slice assignment, the loop GAE and randperm minibatches;
    time-outs bootstrap from the final value folded into the reward at add time."""

    def __init__(self, device: torch.device):
        z = dict(device=device)
        self.obs = torch.zeros(T, LANES, OBS, **z)
        self.action = torch.zeros(T, LANES, ACT, **z)
        self.log_prob = torch.zeros(T, LANES, **z)
        self.value = torch.zeros(T, LANES, **z)
        self.reward = torch.zeros(T, LANES, **z)
        self.done = torch.zeros(T, LANES, dtype=torch.bool, **z)
        self.step = 0

    def add(self, s: dict, gamma: float) -> None:
        t = self.step
        self.obs[t] = s["obs"]
        self.action[t] = s["action"]
        self.log_prob[t] = s["log_prob"]
        self.value[t] = s["value"]
        self.reward[t] = s["reward"] + gamma * s["final_value"] * s["truncated"]
        self.done[t] = s["terminated"] | s["truncated"]
        self.step = (t + 1) % T

    def minibatches(self, adv: torch.Tensor, ret: torch.Tensor, gen: torch.Generator):
        flat = [x.view(T * LANES, *x.shape[2:]) for x in
                (self.obs, self.action, self.log_prob, self.value, adv, ret)]
        size = T * LANES // MINIBATCHES
        for _ in range(EPOCHS):
            perm = torch.randperm(T * LANES, generator=gen, device=self.obs.device)
            for m in range(MINIBATCHES):
                idx = perm[m * size:(m + 1) * size]
                yield [x.index_select(0, idx) for x in flat]


def run_rollout(device: torch.device, repeats: int = 20, backend: str | None = None) -> list[Row]:
    steps = make_rollout(device)
    keys = ("obs", "action", "log_prob", "value", "reward")
    ro = RolloutBuffer(T, LANES, device=device, seed=0, backend=backend)
    plain = PlainRollout(device)
    gen = torch.Generator(device=device).manual_seed(0)
    last_value = torch.randn(LANES, generator=gen, device=device)

    def add_ours():
        for s in steps:
            ro.add({k: s[k] for k in keys}, terminated=s["terminated"], truncated=s["truncated"],
                   final_value=s["final_value"])

    def add_plain():
        for s in steps:
            plain.add(s, GAMMA)

    add_ours()
    add_plain()
    fns = {"gpubuffers": lambda: ro.compute_returns(last_value, GAMMA, LAM),
           PLAIN_GAE: lambda: plain_gae(plain.reward, plain.value, plain.done, last_value, GAMMA, LAM)}
    t = interleaved(fns, device, repeats=repeats, inner=5, shuffle=True)
    out = [Row(W5, k, v, T * LANES, T * LANES * 4 * 4, baseline=PLAIN_GAE) for k, v in t.items()]

    def ppo_ours():
        add_ours()
        ro.compute_returns(last_value, GAMMA, LAM)
        for _ in ro.minibatches(MINIBATCHES, EPOCHS):
            pass

    def ppo_plain():
        add_plain()
        adv, ret = plain_gae(plain.reward, plain.value, plain.done, last_value, GAMMA, LAM)
        for _ in plain.minibatches(adv, ret, gen):
            pass

    per_slot = (OBS + ACT + 5) * 4
    t = interleaved({"gpubuffers": ppo_ours, PLAIN_PPO: ppo_plain}, device, repeats=max(5, repeats // 2),
                    shuffle=True)
    out += [Row(W6, k, v, T * LANES, T * LANES * per_slot * (2 + EPOCHS), baseline=PLAIN_PPO)
            for k, v in t.items()]
    return out
