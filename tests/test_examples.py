"""The examples: batched environments equal gymnasium's step for step, the PPO agent runs end to
end (smoke, default run) and reaches its target (slow, opt-in: ``pytest -m slow``)."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
sys.path.insert(0, EXAMPLES)

import envs  # noqa: E402

gymnasium = pytest.importorskip("gymnasium")


def gym_step(name, state, action):
    """One gymnasium step from ``state`` (float64, as gymnasium keeps it)."""
    env = gymnasium.make(name)
    env.reset(seed=0)
    env.unwrapped.state = np.array(state, dtype=np.float64)
    obs, reward, terminated, truncated, _ = env.step(action)
    return obs, reward, terminated


def test_cartpole_steps_like_gymnasium():
    n = 64
    env = envs.CartPole(n, seed=0)
    g = torch.Generator().manual_seed(1)
    # States across the whole box, some past the thresholds after one step.
    state = (torch.rand(n, 4, generator=g) * 2 - 1) * torch.tensor([2.5, 2.0, 0.25, 2.0])
    action = torch.randint(0, 2, (n,), generator=g)
    new, reward, terminated = env._dynamics(state, action)
    for i in range(n):
        obs, r, term = gym_step("CartPole-v1", state[i].double().numpy(), int(action[i]))
        np.testing.assert_allclose(new[i].numpy(), obs, rtol=1e-5, atol=1e-5)
        assert float(reward[i]) == r and bool(terminated[i]) == term
    assert 0 < int(terminated.sum()) < n


def test_pendulum_steps_like_gymnasium():
    n = 64
    env = envs.Pendulum(n, seed=0)
    g = torch.Generator().manual_seed(2)
    state = (torch.rand(n, 2, generator=g) * 2 - 1) * torch.tensor([7.0, 9.0])
    torque = (torch.rand(n, 1, generator=g) * 2 - 1) * 3.0  # some beyond the limit of 2
    new, reward, terminated = env._dynamics(state, torque)
    for i in range(n):
        obs, r, term = gym_step("Pendulum-v1", state[i].double().numpy(), torque[i].numpy())
        np.testing.assert_allclose(env.observe(new[i:i + 1])[0].numpy(), obs, rtol=1e-5, atol=1e-5)
        assert abs(float(reward[i]) - r) <= 1e-5 * max(1.0, abs(r)) and not term and not bool(terminated[i])


@pytest.mark.parametrize("cls,name", [(envs.CartPole, "CartPole-v1"), (envs.Pendulum, "Pendulum-v1")])
def test_auto_reset_time_limits_and_final_obs(cls, name):
    assert cls.max_steps == gymnasium.make(name).spec.max_episode_steps
    n = 32
    env = cls(n, seed=3)
    if cls is envs.CartPole:
        env.max_steps = 12  # random pushes rarely balance 500 steps: see truncations sooner
    obs = env.reset()
    steps = torch.zeros(n, dtype=torch.int64)
    saw_trunc = saw_term = False
    for _ in range(3 * env.max_steps):
        prev_state = env.state.clone()
        action = torch.zeros(n, 1) if cls is envs.Pendulum else torch.randint(0, 2, (n,))
        expect_state, _, expect_term = env._dynamics(prev_state, action)
        obs, reward, terminated, truncated, extras = env.step(action)
        steps += 1
        assert torch.equal(terminated, expect_term)
        assert torch.equal(truncated, (steps >= env.max_steps) & ~expect_term)
        done = terminated | truncated
        # The final observation is the one the episode ended on; obs is the next episode's first.
        assert torch.equal(extras["final_obs"][done], env.observe(expect_state)[done])
        assert torch.equal(obs[~done], env.observe(expect_state)[~done])
        steps[done] = 0
        saw_trunc |= bool(truncated.any())
        saw_term |= bool(terminated.any())
    assert saw_trunc and (saw_term or cls is envs.Pendulum)


def test_partial_cartpole_hides_the_velocities():
    env = envs.PartialCartPole(8, seed=0)
    obs = env.reset()
    assert obs.shape == (8, 2) and torch.equal(obs, env.state[:, [0, 2]])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ppo_example_runs_and_writes_its_curve(tmp_path):
    import ppo

    out = ppo.main(["--iterations", "3", "--num-envs", "64", "--num-steps", "8", "--quiet",
                    "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "ppo_cartpole.csv")
    assert len(rows) == 3 and int(rows[-1]["env_steps"]) == 3 * 8 * 64
    assert set(out["phases"]) == set(ppo.PHASES) and all(v > 0 for v in out["phases"].values())
    assert (tmp_path / "ppo_cartpole.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


@pytest.mark.slow
def test_ppo_reaches_475_on_cartpole_within_5_minutes(tmp_path):
    import ppo

    out = ppo.main(["--seed", "0", "--iterations", "200", "--quiet", "--out", str(tmp_path)])
    assert out["mean_return"] >= 475 and out["wall_s"] <= 300


def test_recurrent_ppo_example_runs_and_writes_its_curve(tmp_path):
    import ppo_recurrent

    out = ppo_recurrent.main(["--iterations", "2", "--num-envs", "32", "--num-steps", "8", "--minibatches", "4",
                              "--quiet", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "ppo_recurrent_partial.csv")
    assert len(rows) == 2 and int(rows[-1]["env_steps"]) == 2 * 8 * 32
    assert all(v > 0 for v in out["phases"].values())


@pytest.mark.slow
def test_recurrent_ppo_learns_what_a_feed_forward_agent_cannot(tmp_path):
    import ppo
    import ppo_recurrent

    rec = ppo_recurrent.main(["--seed", "0", "--iterations", "400", "--target", "400", "--max-minutes", "10",
                              "--quiet", "--out", str(tmp_path)])
    ff = ppo.main(["--seed", "0", "--env", "partial", "--iterations", "60", "--quiet", "--out", str(tmp_path)])
    assert rec["mean_return"] >= 400 and ff["mean_return"] < 100


@pytest.mark.parametrize("prioritized", [False, True])
def test_td3_example_runs_and_writes_its_curve(tmp_path, prioritized):
    import td3

    argv = ["--iterations", "210", "--num-envs", "16", "--warmup", "5", "--batch-size", "64", "--updates", "1",
            "--capacity", "8192", "--hidden", "16", "--target", "0", "--quiet", "--out", str(tmp_path)]
    out = td3.main(argv + (["--prioritized"] if prioritized else []))
    name = "td3_pendulum" + ("_prioritized" if prioritized else "")
    rows = read_csv(tmp_path / f"{name}.csv")
    assert [int(r["iteration"]) for r in rows] == [50, 100, 150, 200, 210] and int(rows[-1]["updates"]) == 205
    assert all(v > 0 for v in out["phases"].values())
    # Every lane ended its first episode (200 steps) at row 200: the buffer's statistics say so.
    assert rows[2]["mean_return"] == "nan" and out["mean_return"] < 0


def test_td3_cuda_graph_refuses_a_cpu_device():
    import td3

    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA --device"):
        td3.main(["--device", "cpu", "--cuda-graph", "--quiet"])


@pytest.mark.parametrize("prioritized", [False, True])
def test_td3_learner_iteration_never_syncs(prioritized):
    """What --cuda-graph captures must not read device values on the host: the n-step samples,
    priority updates, losses, backward passes and target updates, checked here on any device.
    Adam's step is swapped for a plain descent step, since its CPU path reads its step count (on
    CUDA it runs with capturable=True, which keeps that count on the device)."""
    from nosync import NoHostSync

    import td3

    args = td3.parse(["--device", "cpu", "--batch-size", "64", "--updates", "4", "--hidden", "16"]
                     + (["--prioritized"] if prioritized else []))
    g = torch.Generator().manual_seed(0)
    buf = td3.ReplayBuffer(16 * 8, 8, done_marks="last", seed=3, priority_alpha=0.6 if prioritized else None)
    for _ in range(20):  # wraps the 16-row ring
        buf.add({"obs": torch.randn(8, 3, generator=g), "action": torch.randn(8, 1, generator=g),
                 "reward": torch.randn(8, generator=g)}, terminated=torch.rand(8, generator=g) < 0.2,
                truncated=torch.rand(8, generator=g) < 0.1, final_obs=torch.randn(8, 3, generator=g))
    learner = td3.Learner(args, buf, 3, 1, 2.0, torch.Generator().manual_seed(1))
    for opt in (learner.actor_opt, learner.critic_opt):
        params = [p for group in opt.param_groups for p in group["params"]]
        opt.step = torch.no_grad()(lambda params=params: torch._foreach_add_(params, [p.grad for p in params],
                                                                             alpha=-1e-3))
    learner.iteration(None)  # warm-up, as before a capture
    before = [p.clone() for p in learner.critic.parameters()]
    with NoHostSync():
        learner.iteration(None)
    assert learner.updates == 8
    assert all(not torch.equal(a, b) for a, b in zip(before, learner.critic.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("prioritized", [False, True])
def test_td3_reaches_minus_250_on_pendulum_within_10_minutes(tmp_path, prioritized):
    import td3

    out = td3.main(["--seed", "0", "--quiet", "--out", str(tmp_path)] + (["--prioritized"] if prioritized else []))
    assert out["mean_return"] >= -250 and out["wall_s"] <= 600


def test_td3_drives_a_gymnasium_mujoco_vector_env(tmp_path):
    """The gymnasium path end to end: HalfCheetah-v5 through make_vec (next_step autoreset, numpy
    in and out), a buffer with autoreset="next_step", n-step samples, a few hundred steps."""
    pytest.importorskip("mujoco", reason="pip install -e '.[examples]' (or '.[test]') brings mujoco")
    import td3

    out = td3.main(["--env", "halfcheetah", "--num-envs", "4", "--iterations", "300", "--warmup", "20",
                    "--batch-size", "64", "--updates", "1", "--hidden", "32", "--quiet", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "td3_halfcheetah.csv")
    assert int(rows[-1]["env_steps"]) == 300 * 4 and int(rows[-1]["updates"]) == 280
    assert all(v > 0 for v in out["phases"].values())


def test_world_model_example_learns_from_the_host_tier_through_workers(tmp_path):
    import world_model

    out = world_model.main(["--iterations", "3", "--num-envs", "32", "--workers", "1", "--batch", "32",
                            "--quiet", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "world_model_pendulum.csv")
    assert len(rows) == 3 and out["tier_adds"] == out["ring_adds"] == 16 + 3 * 4
    assert set(out["phases"]) == set(world_model.PHASES) and all(v > 0 for v in out["phases"].values())
    assert (tmp_path / "world_model_pendulum.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


@pytest.mark.slow
def test_world_model_reaches_one_percent_of_the_no_change_error_within_5_minutes(tmp_path):
    import world_model

    out = world_model.main(["--seed", "0", "--quiet", "--out", str(tmp_path)])
    assert out["ratio"] <= 0.01 and out["wall_s"] <= 300


def test_quickstart_example_keeps_episodes_intact_in_both_layouts():
    import quickstart

    out = quickstart.main(["--steps", "600", "--num-envs", "4"])
    for name, run in out.items():
        batch = run["batch"]
        assert batch["obs"].shape == (32, 10, 3) and batch["image"].shape == (32, 10, 32, 32, 3)
        assert batch["image"].dtype == torch.uint8 and batch["valid"].all(), name
        assert (batch["image"].flatten(2).amax(2) == 255).all()  # every frame shows the rod
    assert out["single environment"]["buffer"].num_envs is None


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core machine
def test_loading_example_reads_windows_with_workers():
    import loading

    out = loading.main(["--workers", "0,2", "--num-envs", "8", "--steps", "4000", "--batch", "64",
                        "--batches", "5"])
    assert [r["workers"] for r in out] == [0, 2] and all(r["windows_per_s"] > 0 for r in out)


def test_sharded_example_trains_from_every_rank_through_global_batches():
    import sharded

    out = sharded.main(["--procs", "2", "--iterations", "60", "--num-envs", "32", "--batch", "128",
                        "--rows", "64"])
    first, last = out["rows"][0], out["rows"][-1]
    assert out["rank_adds"] == 8 + 60 and last["env_steps"] == 68 * 32 * 2
    assert last["model_mse"] < 0.5 * last["no_change_mse"] and last["model_mse"] < first["model_mse"]
