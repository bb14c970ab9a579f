"""A real gymnasium vector env (CartPole) through the buffer, checked against gymnasium's own
RecordEpisodeStatistics, in both autoreset modes and both done conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
from gymnasium.vector import AutoresetMode  # noqa: E402
from gymnasium.wrappers.vector import RecordEpisodeStatistics  # noqa: E402

from gpubuffers import ReplayBuffer  # noqa: E402

N, STEPS = 6, 400


def make_env(mode):
    envs = gym.make_vec("CartPole-v1", num_envs=N, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": mode})
    return RecordEpisodeStatistics(envs, buffer_length=100_000)


def finals(info, obs):
    """Stack gymnasium's per-lane final observations (None where no episode ended)."""
    if "final_obs" not in info:
        return np.zeros_like(obs)
    return np.stack([f if m else np.zeros_like(obs[0]) for f, m in zip(info["final_obs"], info["_final_obs"])])


@pytest.mark.parametrize("marks", ["first", "last"])
@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP])
def test_cartpole_episode_statistics(marks, mode):
    next_step = mode == AutoresetMode.NEXT_STEP
    envs = make_env(mode)
    buf = ReplayBuffer(N * 1024, N, done_marks=marks, seed=0,
                       autoreset="next_step" if next_step else "same_step")
    obs, _ = envs.reset(seed=0)
    envs.action_space.seed(0)
    was_done = np.zeros(N, dtype=bool)
    was_trunc = np.zeros(N, dtype=bool)
    prev_final = np.zeros_like(obs)
    for _ in range(STEPS):
        action = envs.action_space.sample()
        next_obs, reward, term, trunc, info = envs.step(action)
        step = {"obs": obs, "action": action, "reward": reward.astype(np.float32)}
        final = None if next_step else finals(info, obs)
        if marks == "last":
            buf.add(step, term | trunc, truncated=trunc, final_obs=final)
        else:
            # was_done: the flag, its truncation and its final obs arrive with the next row.
            buf.add(step, was_done, truncated=was_trunc, final_obs=None if next_step else prev_final)
            was_done, was_trunc, prev_final = term | trunc, trunc, final
        obs = next_obs
    if marks == "first":
        buf.add({"obs": obs, "action": action, "reward": np.zeros(N, dtype=np.float32)}, was_done,
                truncated=was_trunc, final_obs=None if next_step else prev_final)

    want = sorted(zip(envs.length_queue, np.round(envs.return_queue, 3)))
    ix = buf.index
    ends = ix.end_flags != 0  # the buffer holds every step of this run, unwrapped
    row = torch.arange(ix.rows)[:, None].expand_as(ix.start)
    got = sorted(zip((row - ix.start + 1)[ends].tolist(), np.round(ix.ret[ends].numpy(), 3)))
    assert len(want) > 10
    assert got == want
    stats = buf.episode_stats()
    assert int(stats["count"]) == len(want)
    assert float(stats["mean_length"]) == pytest.approx(np.mean(envs.length_queue))
    assert float(stats["mean_return"]) == pytest.approx(np.mean(envs.return_queue))

    # Sampled transitions: the next obs is the true successor, final obs included.
    s = buf.sample(2048)
    assert s["next_valid"].all() and s["valid"].all()
    assert not s["truncated"].any()  # CartPole-v1 truncates at 500 steps, never reached here
    cont = ~s["is_last"]
    assert cont.any() and s["is_last"].any()
    # CartPole's dynamics: x' = x + tau * x_dot for a step inside an episode.
    x, x_dot, x_next = s["obs"][:, 0], s["obs"][:, 1], s["next"]["obs"][:, 0]
    assert torch.allclose(x_next, x + 0.02 * x_dot, atol=1e-6)
    # A terminal successor is out of bounds (|x| > 2.4 or |theta| > 0.2095); a reset obs is not.
    term_next = s["next"]["obs"][s["terminated"]]
    assert ((term_next[:, 0].abs() > 2.4) | (term_next[:, 2].abs() > 0.2094)).all()

    e = buf.sample_episodes(32)
    lengths = e["length"][e["valid"]].tolist()
    assert set(lengths) <= set(envs.length_queue)
