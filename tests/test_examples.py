"""The examples: batched environments equal gymnasium's over whole trajectories, each example runs
a few hundred environment steps end to end and writes its curve (smoke, default run), and each
agent reaches its target at its defaults (slow, opt-in: ``pytest -m slow``)."""

from __future__ import annotations

import csv
import math
import os
import sys

import numpy as np
import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
sys.path.insert(0, EXAMPLES)

import common  # noqa: E402
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


def gym_trajectory(env, name, policy, steps, max_episode_steps=None):
    """Step ``env`` (our batched one) and one gymnasium ``name`` per lane (``gymnasium.make``, so
    behind its ``TimeLimit``, with ``max_episode_steps`` when given) ``steps`` times through the
    same actions, ``policy(state)`` of our lanes' states,
    comparing obs, reward, terminated, truncated and ``final_obs`` each step at 1e-4 (float32
    rounding, torch's against numpy's, compounds over a 200-step episode to about 6e-5).
    Each gymnasium env is reset and given our lane's state at the start and after each of our
    auto-resets (its state is our float32 state, from which it computes on). Counts the ends."""
    kw = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    n = env.num_envs
    gyms = [gymnasium.make(name, **kw) for _ in range(n)]
    assert gyms[0].spec.max_episode_steps == env.max_steps

    def begin(i, obs):
        gyms[i].reset(seed=i)
        gyms[i].unwrapped.state = env.state[i].numpy().copy()
        # Our reset draws from gymnasium's reset ranges, and shows that state as gymnasium would.
        if name.startswith("CartPole"):
            assert float(env.state[i].abs().max()) <= 0.05
            np.testing.assert_allclose(obs[i].numpy(), env.state[i].numpy())
        else:
            assert abs(float(env.state[i, 0])) <= math.pi and abs(float(env.state[i, 1])) <= 1.0
            np.testing.assert_allclose(obs[i].numpy(), gyms[i].unwrapped._get_obs(), rtol=1e-6, atol=1e-6)

    obs = env.reset()
    for i in range(n):
        begin(i, obs)
    ends = {"terminated": 0, "truncated": 0, "both": 0}
    for t in range(steps):
        action = policy(env.state.clone())
        obs, reward, terminated, truncated, extras = env.step(action)
        for i in range(n):
            a = int(action[i]) if action.dtype == torch.int64 else action[i].numpy()
            g_obs, g_reward, g_term, g_trunc, _ = gyms[i].step(a)
            where = f"step {t}, lane {i}"
            assert (bool(terminated[i]), bool(truncated[i])) == (g_term, g_trunc), where
            assert float(reward[i]) == pytest.approx(g_reward, rel=1e-4, abs=1e-4), where
            if g_term or g_trunc:
                ends["both" if g_term and g_trunc else "terminated" if g_term else "truncated"] += 1
                np.testing.assert_allclose(extras["final_obs"][i].numpy(), g_obs, rtol=1e-4, atol=1e-4,
                                           err_msg=where)
                begin(i, obs)  # our lane reset itself: obs is its next episode's first observation
            else:
                np.testing.assert_allclose(obs[i].numpy(), g_obs, rtol=1e-4, atol=1e-4, err_msg=where)
                assert not extras["final_obs"][i].any(), where
    return ends


def test_pendulum_trajectories_equal_gymnasium_over_its_time_limit():
    """Two and a half episodes of Pendulum-v1 (200-step limit): every step, the truncations at
    steps 200 and 400 and the final observations there, against gymnasium's own TimeLimit."""
    n = 4
    env = envs.Pendulum(n, seed=5)
    g = torch.Generator().manual_seed(6)
    ends = gym_trajectory(env, "Pendulum-v1", lambda state: (torch.rand(n, 1, generator=g) * 2 - 1) * 2.5,
                          450)  # some torques beyond the limit of 2
    assert ends == {"terminated": 0, "truncated": 2 * n, "both": 0}


def test_cartpole_trajectories_equal_gymnasium_with_a_short_time_limit():
    """CartPole-v1 with a 10-step limit (gymnasium's max_episode_steps, our max_steps): lanes that
    always push right fall at step 8 to 11, so some terminate before the limit and some exactly at
    it, where gymnasium reports terminated and truncated both; lanes that balance are truncated."""
    n = 12
    env = envs.CartPole(n, seed=7, max_steps=10)
    g = torch.Generator().manual_seed(8)
    kind = torch.arange(n) % 3

    def policy(state):
        balance = (state[:, 2] + 0.5 * state[:, 3] > 0).long()  # push the cart under the pole
        return torch.where(kind == 0, 1, torch.where(kind == 1, balance, torch.randint(0, 2, (n,), generator=g)))

    ends = gym_trajectory(env, "CartPole-v1", policy, 80, max_episode_steps=10)
    assert ends["terminated"] > 0 and ends["truncated"] > 0 and ends["both"] > 0, ends


def test_partial_cartpole_hides_the_velocities():
    env = envs.PartialCartPole(8, seed=0)
    obs = env.reset()
    assert obs.shape == (8, 2) and torch.equal(obs, env.state[:, [0, 2]])


def test_env_time_limit_option_is_checked():
    assert envs.CartPole(2, max_steps=7).max_steps == 7 and envs.CartPole(2).max_steps == 500
    with pytest.raises(ValueError, match="max_steps: expected at least 1 step per episode, got 0"):
        envs.Pendulum(2, max_steps=0)
    with pytest.raises(TypeError, match="max_steps: expected an int or None, got str"):
        envs.Pendulum(2, max_steps="10")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_curve_files(tmp_path, name, num_envs, phases, summary_text=None):
    """The run wrote ``name``.csv and .png (the test extra installs matplotlib and tqdm); each CSV
    row has each phase's wall time per vectorized env step and per lane-step, and the total, that
    agree with its cumulative seconds; the printed summary names the same figures. The rows."""
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    rows = read_csv(tmp_path / f"{name}.csv")
    for row in rows:
        steps = int(row["env_steps"])
        seconds = {k: float(row[f"{k}_s"]) for k in phases}
        for k, v in [*seconds.items(), ("total", sum(seconds.values()))]:
            rounding = 1e6 * 5e-5 * len(phases) / steps  # the CSV's seconds have 4 decimals
            assert float(row[f"{k}_us_per_step"]) == pytest.approx(1e6 * v * num_envs / steps,
                                                                   abs=rounding * num_envs + 0.01)
            assert float(row[f"{k}_us_per_lane_step"]) == pytest.approx(1e6 * v / steps, abs=rounding + 1e-4)
        assert float(row["total_us_per_step"]) > 0
    if summary_text is not None:
        last = rows[-1]
        assert f"{int(last['env_steps']):,} environment steps" in summary_text
        for k in [*phases, "total"]:
            line = next(x for x in summary_text.splitlines() if x.strip().startswith(common.PHASE_NAMES[k]))
            assert line.split()[-3] == f"{float(last[f'{k}_us_per_step']):,.1f}", line
    return rows


def test_ppo_example_runs_a_few_hundred_steps_and_writes_its_curve(tmp_path, capsys):
    import ppo

    out = ppo.main(["--iterations", "4", "--num-envs", "16", "--num-steps", "64", "--minibatches", "4",
                    "--epochs", "2", "--out", str(tmp_path)])  # not --quiet: the progress bar too
    rows = check_curve_files(tmp_path, "ppo_cartpole", 16, ppo.PHASES, common.summary(out))
    assert len(rows) == 4 and int(rows[-1]["env_steps"]) == 4 * 64 * 16 == out["env_steps"]
    assert set(out["phases"]) == set(ppo.PHASES) and all(v > 0 for v in out["phases"].values())
    assert out["mean_return"] > 0  # CartPole episodes ended and were counted
    assert "4/4 [" in capsys.readouterr().err  # tqdm's progress bar, complete


@pytest.mark.slow
def test_ppo_reaches_475_on_cartpole_within_5_minutes(tmp_path):
    import ppo

    out = ppo.main(["--seed", "0", "--iterations", "200", "--quiet", "--out", str(tmp_path)])
    assert out["mean_return"] >= 475 and out["wall_s"] <= 300


def test_recurrent_ppo_example_runs_a_few_hundred_steps_and_writes_its_curve(tmp_path, capsys):
    import ppo
    import ppo_recurrent

    assert ppo.parse([]).iterations == 60 and ppo_recurrent.ITERATIONS == 200
    out = ppo_recurrent.main(["--iterations", "4", "--num-envs", "16", "--num-steps", "64", "--minibatches", "4",
                              "--epochs", "2", "--out", str(tmp_path)])
    rows = check_curve_files(tmp_path, "ppo_recurrent_partial", 16, ppo.PHASES, common.summary(out))
    assert len(rows) == 4 and int(rows[-1]["env_steps"]) == 4 * 64 * 16 == out["env_steps"]
    assert all(v > 0 for v in out["phases"].values())
    assert "4/4 [" in capsys.readouterr().err  # tqdm's progress bar, complete


@pytest.mark.slow
def test_recurrent_ppo_reaches_475_at_its_defaults_where_a_feed_forward_agent_cannot(tmp_path):
    """The README's run: ``examples/ppo_recurrent.py`` at its defaults (seed 0, 1024 lanes, up to
    200 iterations and 10 minutes) reaches the target of 475; the feed-forward agent on the same
    partially observed task stays far below."""
    import ppo
    import ppo_recurrent

    rec = ppo_recurrent.main(["--quiet", "--out", str(tmp_path)])
    assert rec["mean_return"] >= 475 and rec["wall_s"] <= 600
    ff = ppo.main(["--seed", "0", "--env", "partial", "--iterations", "60", "--quiet", "--out", str(tmp_path)])
    assert ff["mean_return"] < 100


@pytest.mark.parametrize("argv,expected", [
    (["--device", "foo"], "argument --device: expected a torch device such as cpu, cuda or cuda:0, got 'foo'"),
    (["--device", "cuda:99"], "argument --device: expected a"),
])
@pytest.mark.parametrize("example", ["ppo", "ppo_recurrent", "td3", "world_model"])
def test_examples_refuse_a_device_this_machine_lacks(example, argv, expected, capsys):
    module = __import__(example)
    with pytest.raises(SystemExit) as raised:
        module.main(argv + ["--quiet"])
    assert raised.value.code == 2 and expected in capsys.readouterr().err


def test_device_option_names_the_missing_cuda():
    import argparse

    assert common.device_option("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert common.device_option("cuda").type == "cuda"
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="got 'cuda', but torch sees no CUDA device here"):
            common.device_option("cuda")


def test_quickstart_refuses_a_device_this_machine_lacks(capsys):
    import quickstart

    with pytest.raises(SystemExit):
        quickstart.main(["--device", "foo"])
    assert "argument --device: expected a torch device" in capsys.readouterr().err


@pytest.mark.parametrize("prioritized", [False, True])
def test_td3_example_runs_a_few_hundred_steps_and_writes_its_curve(tmp_path, prioritized, capsys):
    import td3

    argv = ["--iterations", "210", "--num-envs", "16", "--warmup", "5", "--batch-size", "64", "--updates", "1",
            "--capacity", "8192", "--hidden", "16", "--target", "0", "--out", str(tmp_path)]
    out = td3.main(argv + (["--prioritized"] if prioritized else []))
    name = "td3_pendulum" + ("_prioritized" if prioritized else "")
    rows = check_curve_files(tmp_path, name, 16, td3.PHASES, common.summary(out))
    assert [int(r["iteration"]) for r in rows] == [50, 100, 150, 200, 210] and int(rows[-1]["updates"]) == 205
    assert all(v > 0 for v in out["phases"].values())
    # Every lane ended its first episode (200 steps) at row 200: the buffer's statistics say so.
    assert rows[2]["mean_return"] == "nan" and out["mean_return"] < 0
    assert "210/210 [" in capsys.readouterr().err  # tqdm's progress bar, complete


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
    rows = check_curve_files(tmp_path, "td3_halfcheetah", 4, td3.PHASES)
    assert int(rows[-1]["env_steps"]) == 300 * 4 and int(rows[-1]["updates"]) == 280
    assert all(v > 0 for v in out["phases"].values())


def test_world_model_example_learns_from_the_host_tier_through_workers(tmp_path):
    import world_model

    out = world_model.main(["--iterations", "3", "--steps-per-iteration", "80", "--num-envs", "32", "--workers",
                            "1", "--batch", "32", "--quiet", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "world_model_pendulum.csv")
    assert len(rows) == 3 and out["tier_adds"] == out["ring_adds"] == 16 + 3 * 80  # past the ring's 64 rows
    assert set(out["phases"]) == set(world_model.PHASES) and all(v > 0 for v in out["phases"].values())
    assert (tmp_path / "world_model_pendulum.png").stat().st_size > 0


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

    out = sharded.main(["--procs", "2", "--iterations", "200", "--num-envs", "16", "--batch", "128",
                        "--rows", "64"])
    first, last = out["rows"][0], out["rows"][-1]
    assert out["rank_adds"] == 8 + 200 and last["env_steps"] == 208 * 16 * 2
    assert last["model_mse"] < 0.5 * last["no_change_mse"] and last["model_mse"] < first["model_mse"]
