"""n-step returns and prioritized replay against TorchRL, on a real gymnasium vector env.

TorchRL's ``MultiStep`` post-processing of each lane's trajectory (terminal observations
included, reset steps left out) must give the returns, step counts, discounts and n-th next
observations of ``sample(B, n_step=, gamma=)``, in both autoreset modes and both done
conventions, on a ring that has wrapped. Its ``PrioritizedSampler``, given the same priorities
for the same transitions, must give the same importance weights and draw them as often.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
pytest.importorskip("torchrl")
from gymnasium.vector import AutoresetMode  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from torchrl.data import LazyTensorStorage, PrioritizedSampler, TensorDictReplayBuffer  # noqa: E402
from torchrl.data.postprocs import MultiStep  # noqa: E402

from gpubuffers import ReplayBuffer  # noqa: E402
from test_priority import chi_square_bound  # noqa: E402

N, STEPS, ROWS, LIMIT = 4, 160, 64, 30


class Run:
    """A CartPole rollout of ``STEPS`` steps on ``N`` lanes (episodes truncated at ``LIMIT``
    steps, so both ends occur) written into a buffer of ``ROWS`` rows, which wraps, and each
    lane's trajectory as TorchRL's collectors lay it out: obs, action, and under "next" the
    true next obs (the terminal one at an end), reward and end flags, reset steps left out."""

    def __init__(self, mode, marks: str, **buffer_kwargs):
        self.next_step = mode == AutoresetMode.NEXT_STEP
        envs = gym.make_vec("CartPole-v1", num_envs=N, vectorization_mode="sync",
                            vector_kwargs={"autoreset_mode": mode}, max_episode_steps=LIMIT)
        self.buf = buf = ReplayBuffer(ROWS * N, N, done_marks=marks, seed=3,
                                      autoreset="next_step" if self.next_step else "same_step", **buffer_kwargs)
        obs, _ = envs.reset(seed=1)
        envs.action_space.seed(1)
        lanes = [[] for _ in range(N)]
        self.transition = np.full((STEPS + 1, N), -1)  # absolute row, lane -> position in its lane
        reset = np.zeros(N, dtype=bool)  # next_step: this row only carries a reset obs
        was = (np.zeros(N, dtype=bool), np.zeros(N, dtype=bool), np.zeros_like(obs))
        for t in range(STEPS):
            action = envs.action_space.sample()
            next_obs, reward, term, trunc, info = envs.step(action)
            final = np.array(next_obs)
            if "final_obs" in info:  # same_step: the terminal obs of each lane that ended
                for j in np.flatnonzero(info["_final_obs"]):
                    final[j] = info["final_obs"][j]
            for j in range(N):
                if not reset[j]:
                    self.transition[t, j] = len(lanes[j])
                    lanes[j].append((obs[j], action[j], reward[j], final[j], term[j], trunc[j]))
            step = {"obs": obs, "action": action, "reward": reward.astype(np.float32)}
            finals = None if self.next_step else final
            if marks == "last":
                buf.add(step, term | trunc, truncated=trunc, final_obs=finals)
            else:  # the flags and the final obs of a row arrive with the next one
                buf.add(step, was[0], truncated=was[1], final_obs=None if self.next_step else was[2])
                was = (term | trunc, trunc, finals)
            reset = (term | trunc) & self.next_step
            obs = next_obs
        envs.close()
        if marks == "first":
            buf.add({"obs": obs, "action": action, "reward": np.zeros(N, dtype=np.float32)}, was[0],
                    truncated=was[1], final_obs=None if self.next_step else was[2])
        # Transitions whose successor row is written: every row before the newest.
        self.drawable = buf.num_adds - 1
        self.lanes = [lane[:self.transition[:self.drawable, j].max() + 1] for j, lane in enumerate(lanes)]

    def trajectory(self, j: int) -> TensorDict:
        """Lane ``j``'s transitions as a [1, T] TensorDict of a TorchRL collector."""
        obs, action, reward, nxt, term, trunc = (torch.as_tensor(np.array(x))[None] for x in zip(*self.lanes[j]))
        term, trunc = term[..., None], trunc[..., None]
        return TensorDict({"observation": obs.float(), "action": action, "next": {
            "observation": nxt.float(), "reward": reward.float()[..., None], "done": term | trunc,
            "terminated": term, "truncated": trunc}}, batch_size=[1, obs.shape[1]])

    def locate(self, index: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(lane, position in the lane's trajectory) of transition ids."""
        row, lane = (index // N).numpy(), (index % N).numpy()
        return lane, self.transition[row, lane]


MODES = [AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP]


@pytest.mark.parametrize("n_step", [3, 8])
@pytest.mark.parametrize("marks", ["last", "first"])
@pytest.mark.parametrize("mode", MODES)
def test_nstep_samples_match_torchrl_multistep(mode, marks, n_step):
    run = Run(mode, marks)
    gamma = 0.9
    want = [MultiStep(gamma=gamma, n_steps=n_step)(run.trajectory(j)) for j in range(N)]
    s = run.buf.sample(4096, n_step=n_step, gamma=gamma)
    assert s["valid"].all() and s["next_valid"].all() and s["target_valid"].all()
    assert s["index"].min() >= run.buf.oldest_row * N  # the ring has wrapped
    assert run.buf.oldest_row > 0
    lane, pos = run.locate(s["index"])
    assert (pos >= 0).all()  # never a reset row
    cover = set(zip(lane.tolist(), pos.tolist()))
    live = sum(int((run.transition[run.buf.oldest_row:run.drawable, j] >= 0).sum()) for j in range(N))
    assert len(cover) == live  # 4096 draws from a few hundred transitions reach all of them

    def theirs(key):
        return torch.stack([want[j][key][0, p].reshape(()) for j, p in zip(lane, pos)])

    k = theirs("steps_to_next_obs")
    assert torch.equal(s["n_steps"], k)
    assert (k < n_step).any() and (k == n_step).any()  # segments cut by ends and full ones
    assert torch.allclose(s["return"], theirs(("next", "reward")), rtol=1e-6, atol=1e-6)
    assert torch.equal(s["next"]["obs"], torch.stack([want[j]["next", "observation"][0, p] for j, p in zip(lane, pos)]))
    # The segment's last step: TorchRL leaves the end flags at the first step, so read them there.
    last = [run.lanes[j][p + int(kk) - 1] for j, p, kk in zip(lane, pos, k)]
    term = torch.tensor([bool(x[4]) for x in last])
    trunc = torch.tensor([bool(x[5]) for x in last])
    assert torch.equal(s["terminated"], term) and torch.equal(s["truncated"], trunc)
    assert term.any() and trunc.any()
    discount = theirs("gamma").float()
    assert torch.allclose(s["discount"], torch.where(term, 0.0, discount), rtol=1e-6)
    # The one-step leaves stay those of the first step.
    assert torch.equal(s["obs"], torch.stack([want[j]["observation"][0, p] for j, p in zip(lane, pos)]))
    assert torch.equal(s["reward"], theirs(("next", "original_reward")))


@pytest.mark.parametrize("mode", MODES)
def test_priorities_match_torchrl_prioritized_sampler(mode):
    alpha, beta, eps = 0.6, 0.5, 1e-6
    run = Run(mode, "last", priority_alpha=alpha, priority_eps=eps)
    buf = run.buf
    rows = torch.arange(buf.oldest_row, run.drawable)
    ids = (rows[:, None] * N + torch.arange(N)).reshape(-1)
    lane, pos = run.locate(ids)
    ids = ids[torch.as_tensor(pos >= 0)]  # reset rows are not transitions
    g = torch.Generator().manual_seed(0)
    prio = torch.rand(ids.shape[0], generator=g) * 5
    prio[::23] = 0.0
    buf.update_priorities(ids, prio)

    m = ids.shape[0]
    sampler = PrioritizedSampler(m, alpha=alpha, beta=beta, eps=eps)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(m), sampler=sampler, batch_size=4096,
                                generator=torch.Generator().manual_seed(2))
    rb.extend(TensorDict({"id": ids}, batch_size=[m]))
    rb.update_priority(torch.arange(m), prio)
    position = {int(i): p for p, i in enumerate(ids)}

    ours = torch.zeros(m)
    theirs = torch.zeros(m)
    weight_of = {}
    for _ in range(25):
        s = buf.sample(4096, priority_beta=beta)
        assert s["valid"].all()
        at = torch.tensor([position[int(i)] for i in s["index"]])
        ours += torch.bincount(at, minlength=m).float()
        got, info = rb.sample(return_info=True)
        at_theirs = info["index"]
        theirs += torch.bincount(at_theirs, minlength=m).float()
        weight_of.update(zip(at_theirs.tolist(), info["priority_weight"].tolist()))
        for p, w in zip(at.tolist(), s["weight"].tolist()):
            if p in weight_of:
                assert w == pytest.approx(weight_of[p], rel=1e-5), p
    assert len(weight_of) > 0.9 * m
    # Both samplers' counts come from the same distribution (a two-sample chi-square test).
    seen = (ours + theirs) > 0
    stat = float(((ours - theirs)[seen] ** 2 / (ours + theirs)[seen]).sum())
    assert stat < chi_square_bound(int(seen.sum()) - 1), stat
