"""Classic-control environments batched over N lanes as torch tensors, on any device, shaped
like Isaac Lab's: ``obs, reward, terminated, truncated, extras = env.step(action)``.

Each lane resets itself in the same step its episode ends (the returned ``obs`` is already the
next episode's first observation) and ``extras["final_obs"]`` holds the true last observation of
the lanes that ended (zeros elsewhere). Time limits end episodes by truncation, as gymnasium's
``TimeLimit`` does: ``truncated`` is set in the step that reaches the limit whether or not that
step also terminates (a lane with both flags ends by termination: it has no future to bootstrap
from; ``gpubuffers`` buffers read it so). The dynamics, rewards, terminations and limits are
gymnasium's ``CartPole-v1`` and ``Pendulum-v1`` (checked against gymnasium over whole
trajectories, auto-resets and time limits included, in ``tests/test_examples.py``), computed in
float32.

This module does not import gpubuffers: it stands for the user's simulator.
"""

from __future__ import annotations

import math

import torch


class BatchedEnv:
    """Shared bookkeeping: per-lane step counters, time limits, same-step auto-reset."""

    state_dim: int
    obs_dim: int
    action_dim: int
    max_steps: int

    def __init__(self, num_envs: int, device: str | torch.device = "cpu", seed: int = 0,
                 max_steps: int | None = None) -> None:
        """``max_steps``: the time limit in steps per episode, gymnasium's ``max_episode_steps``
        (default: the class's, as registered in gymnasium)."""
        if max_steps is not None:
            if isinstance(max_steps, bool) or not isinstance(max_steps, int):
                raise TypeError(f"max_steps: expected an int or None, got {type(max_steps).__name__}")
            if max_steps < 1:
                raise ValueError(f"max_steps: expected at least 1 step per episode, got {max_steps}")
            self.max_steps = max_steps
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.state = torch.zeros(num_envs, self.state_dim, device=self.device)
        self.steps = torch.zeros(num_envs, dtype=torch.int64, device=self.device)

    def _uniform(self, n: int, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        u = torch.rand(n, low.shape[0], generator=self.gen, device=self.device)
        return low + (high - low) * u

    def reset(self) -> torch.Tensor:
        self.state = self._initial(self.num_envs)
        self.steps.zero_()
        return self.observe(self.state)

    def step(self, action: torch.Tensor):
        state, reward, terminated = self._dynamics(self.state, action)
        self.steps += 1
        truncated = self.steps >= self.max_steps  # gymnasium's TimeLimit: terminated or not
        done = terminated | truncated
        final_obs = torch.where(done[:, None], self.observe(state), 0.0)
        fresh = self._initial(self.num_envs)  # drawn for every lane: fixed shapes, no sync
        self.state = torch.where(done[:, None], fresh, state)
        self.steps = torch.where(done, 0, self.steps)
        return self.observe(self.state), reward, terminated, truncated, {"final_obs": final_obs}

    # Subclasses define these.
    def _initial(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def _dynamics(self, state: torch.Tensor, action: torch.Tensor):
        raise NotImplementedError

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CartPole(BatchedEnv):
    """gymnasium ``CartPole-v1``: action 0 or 1 (push left or right), reward 1 per step, ends by
    termination when the pole falls past 12 degrees or the cart leaves [-2.4, 2.4], and by
    truncation after 500 steps. Observation ``[x, x_dot, theta, theta_dot]``."""

    state_dim = obs_dim = 4
    action_dim = 2  # discrete actions
    max_steps = 500
    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    theta_threshold = 12 * 2 * math.pi / 360
    x_threshold = 2.4

    def _initial(self, n: int) -> torch.Tensor:
        half = torch.full((4,), 0.05, device=self.device)
        return self._uniform(n, -half, half)

    def _dynamics(self, state: torch.Tensor, action: torch.Tensor):
        x, x_dot, theta, theta_dot = state.unbind(1)
        total_mass = self.masspole + self.masscart
        polemass_length = self.masspole * self.length
        force = torch.where(action.reshape(-1) == 1, self.force_mag, -self.force_mag)
        cos, sin = torch.cos(theta), torch.sin(theta)
        temp = (force + polemass_length * theta_dot ** 2 * sin) / total_mass
        thetaacc = (self.gravity * sin - cos * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * cos ** 2 / total_mass))
        xacc = temp - polemass_length * thetaacc * cos / total_mass
        new = torch.stack([x + self.tau * x_dot, x_dot + self.tau * xacc,
                           theta + self.tau * theta_dot, theta_dot + self.tau * thetaacc], 1)
        nx, nth = new[:, 0], new[:, 2]
        terminated = (nx < -self.x_threshold) | (nx > self.x_threshold) | \
                     (nth < -self.theta_threshold) | (nth > self.theta_threshold)
        return new, torch.ones_like(nx), terminated

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        return state.clone()


class PartialCartPole(CartPole):
    """CartPole observed without its velocities, ``[x, theta]``: a policy needs memory."""

    obs_dim = 2

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        return state[:, [0, 2]]


class Pendulum(BatchedEnv):
    """gymnasium ``Pendulum-v1``: torque in [-2, 2], reward ``-(angle^2 + 0.1 * speed^2 + 0.001 *
    torque^2)``, never terminates, truncated after 200 steps. Observation ``[cos, sin, speed]``."""

    state_dim = 2
    obs_dim = 3
    action_dim = 1
    max_steps = 200
    max_speed, max_torque, dt, g, m, l = 8.0, 2.0, 0.05, 10.0, 1.0, 1.0
    action_bound = max_torque

    def _initial(self, n: int) -> torch.Tensor:
        high = torch.tensor([math.pi, 1.0], device=self.device)
        return self._uniform(n, -high, high)

    def _dynamics(self, state: torch.Tensor, action: torch.Tensor):
        th, thdot = state.unbind(1)
        u = action.reshape(-1).clamp(-self.max_torque, self.max_torque)
        angle = torch.remainder(th + math.pi, 2 * math.pi) - math.pi
        cost = angle ** 2 + 0.1 * thdot ** 2 + 0.001 * u ** 2
        newthdot = thdot + (3 * self.g / (2 * self.l) * torch.sin(th) + 3.0 / (self.m * self.l ** 2) * u) * self.dt
        newthdot = newthdot.clamp(-self.max_speed, self.max_speed)
        new = torch.stack([th + newthdot * self.dt, newthdot], 1)
        return new, -cost, torch.zeros_like(th, dtype=torch.bool)

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        th, thdot = state.unbind(1)
        return torch.stack([torch.cos(th), torch.sin(th), thdot], 1)


class GymnasiumVec:
    """A gymnasium vector environment (``gymnasium.make_vec``) behind the same torch interface:
    numpy in and out of the simulator, tensors on ``device`` in and out of this adapter.

    gymnasium's default autoreset is ``next_step``: after an episode ends, the next step is a
    reset step (its action is ignored, it returns the first observation of the next episode with
    reward 0), so the observation returned with the end flags is the final one and there are no
    ``extras["final_obs"]``; store it in a buffer built with ``autoreset="next_step"``.
    """

    def __init__(self, name: str, num_envs: int, device: str | torch.device = "cpu", seed: int = 0) -> None:
        import gymnasium

        self.envs = gymnasium.make_vec(name, num_envs=num_envs, vectorization_mode="sync")
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.seed = seed
        space = self.envs.single_action_space
        self.obs_dim = self.envs.single_observation_space.shape[0]
        self.action_dim = space.shape[0]
        self.action_bound = float(space.high[0])  # symmetric: [-bound, bound] per dimension
        self.max_steps = self.envs.spec.max_episode_steps

    def _tensor(self, x) -> torch.Tensor:
        return torch.as_tensor(x, device=self.device)

    def reset(self) -> torch.Tensor:
        obs, _ = self.envs.reset(seed=self.seed)
        return self._tensor(obs).float()

    def step(self, action: torch.Tensor):
        obs, reward, terminated, truncated, _ = self.envs.step(action.detach().cpu().numpy())
        return (self._tensor(obs).float(), self._tensor(reward).float(), self._tensor(terminated),
                self._tensor(truncated), {})


def pendulum_images(obs: torch.Tensor, size: int = 32) -> torch.Tensor:
    """[N, size, size, 3] uint8 pictures of Pendulum observations ``[cos, sin, speed]``: the rod
    from the pivot (the centre) to its tip, white on black, in batch on the observations' device."""
    cos, sin = obs[:, 0], obs[:, 1]
    axis = torch.arange(size, device=obs.device, dtype=obs.dtype) - (size - 1) / 2
    y, x = axis[:, None], axis[None, :]
    length = 0.45 * size
    # gymnasium draws angle 0 pointing up: the tip is at (sin, -cos) in image coordinates.
    tip_x, tip_y = (length * sin)[:, None, None], (-length * cos)[:, None, None]
    along = ((x * tip_x + y * tip_y) / length ** 2).clamp(0, 1)
    dist = torch.hypot(x - along * tip_x, y - along * tip_y)
    lit = (dist < 1.5).to(torch.uint8) * 255
    return lit[..., None].expand(-1, -1, -1, 3).contiguous()
