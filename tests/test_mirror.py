"""A buffer that mirrors its adds into a larger one (a host or shared-memory tier)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from compare import assert_identical
from gpubuffers import ReplayBuffer

N = 3
MODES = [(m, a) for m in ("first", "last") for a in ("same_step", "next_step")]


def steps(count: int, seed: int, single: bool = False):
    """(step, kwargs of add) with episodes of random lengths ending by termination or
    truncation, final observations at their ends, nested leaves and numpy inputs."""
    g = torch.Generator().manual_seed(seed)
    lanes = () if single else (N,)
    for t in range(count):
        term = torch.rand(lanes, generator=g) < 0.15
        trunc = ~term & (torch.rand(lanes, generator=g) < 0.1)
        step = {"obs": {"pos": torch.randn(*lanes, 2, generator=g), "id": torch.full((*lanes, 1), t)},
                "action": torch.randn(*lanes, 4, generator=g).numpy(),
                "reward": torch.randn(lanes, generator=g)}
        final = {"pos": torch.randn(*lanes, 2, generator=g), "id": torch.full((*lanes, 1), -t)}
        yield step, dict(terminated=term, truncated=trunc, final_obs=final)


def build(rows: int, marks: str, autoreset: str, single: bool = False, **kw) -> ReplayBuffer:
    return ReplayBuffer(rows * (1 if single else N), None if single else N, done_marks=marks,
                        autoreset=autoreset, seed=11, **kw)


def feed(bufs, count, seed, autoreset, single=False):
    for step, kw in steps(count, seed, single):
        if autoreset == "next_step":
            kw = {k: v for k, v in kw.items() if k != "final_obs"}
        for b in bufs:
            b.add(step, **kw)


@pytest.mark.parametrize("marks,autoreset", MODES)
@pytest.mark.parametrize("single", [False, True])
def test_mirror_holds_what_a_direct_add_would(marks, autoreset, single):
    # A small ring (wrapping many times) in front of a tier 4x larger, in shared memory and
    # with its own storage dtype and priorities; a twin of the tier is fed directly.
    tier_kw = dict(storage="shared", storage_dtypes={"action": torch.float16}, priority_alpha=0.6)
    tier = build(24, marks, autoreset, single, **tier_kw)
    twin = build(24, marks, autoreset, single, **tier_kw)
    ring = build(6, marks, autoreset, single, mirror=tier)
    plain = build(6, marks, autoreset, single)
    feed([ring, twin], 70, 3, autoreset, single)
    feed([plain], 70, 3, autoreset, single)
    assert tier.num_adds == twin.num_adds == ring.num_adds == 70
    assert_identical(tier.state_dict()["tensors"], twin.state_dict()["tensors"])
    assert_identical(ring.state_dict()["tensors"], plain.state_dict()["tensors"])
    assert_identical(tier.episode_stats(), twin.episode_stats())
    assert_identical(tier.sample(64, n_step=3, gamma=0.9), twin.sample(64, n_step=3, gamma=0.9))
    assert_identical(tier.sample_episodes(4), twin.sample_episodes(4))
    # The tier keeps the history the ring has overwritten.
    assert len(tier) == 24 * (1 if single else N) and tier.oldest_row == 70 - 24 and ring.oldest_row == 70 - 6


def test_mirrors_chain_and_rejected_adds_change_none_of_them():
    third = build(40, "last", "same_step")
    second = build(20, "last", "same_step", mirror=third)
    first = build(5, "last", "same_step", mirror=second)
    feed([first], 30, 5, "same_step")
    def snap(b):
        sd = b.state_dict()
        return sd["header"], {k: v.clone() for k, v in sd["tensors"].items()}

    before = [snap(b) for b in (first, second, third)]
    bad = {"obs": {"pos": torch.zeros(N, 3), "id": torch.zeros(N, 1, dtype=torch.int64)},
           "action": np.zeros((N, 4), np.float32), "reward": torch.zeros(N)}
    with pytest.raises(ValueError, match="step\\['obs/pos'\\]"):
        first.add(bad, torch.zeros(N, dtype=torch.bool))
    for b, (header, tensors) in zip((first, second, third), before):
        now = snap(b)
        assert now[0] == header
        assert_identical(now[1], tensors)
    assert [b.num_adds for b in (first, second, third)] == [30, 30, 30]


def test_a_mirror_that_refuses_the_first_add_leaves_both_empty():
    tier = build(12, "last", "same_step", storage_dtypes={"missing": torch.float16})
    ring = build(4, "last", "same_step", mirror=tier)
    with pytest.raises(ValueError, match="missing"):
        feed([ring], 1, 0, "same_step")
    assert ring.index is None and tier.index is None and ring.num_adds == tier.num_adds == 0


def test_mirror_settings_are_checked():
    with pytest.raises(TypeError, match="mirror: expected a gpubuffers.ReplayBuffer"):
        build(4, "last", "same_step", mirror={})
    with pytest.raises(ValueError, match="mirror: its done_marks='first' differs"):
        build(4, "last", "same_step", mirror=build(8, "first", "same_step"))
    with pytest.raises(ValueError, match="mirror: its num_envs=None differs"):
        build(4, "last", "same_step", mirror=build(8, "last", "same_step", single=True))
    with pytest.raises(ValueError, match="at least this buffer's 4 rows per lane"):
        build(4, "last", "same_step", mirror=build(3, "last", "same_step"))
    used = build(8, "last", "same_step")
    feed([used], 2, 0, "same_step")
    with pytest.raises(ValueError, match="expected an empty buffer, got one with 2 adds"):
        build(4, "last", "same_step", mirror=used)
    ring = build(4, "last", "same_step", mirror=build(8, "last", "same_step"))
    ring.sync_mirror()  # nothing staged on the CPU: the mirror's add runs within add


def test_an_add_the_mirror_refuses_is_refused_by_both():
    tier = build(12, "last", "same_step", check_finite=True)
    ring = build(4, "last", "same_step", mirror=tier)
    feed([ring], 6, 1, "same_step")
    sd = ring.state_dict()
    header, tensors = sd["header"], {k: v.clone() for k, v in sd["tensors"].items()}
    step, kw = next(steps(1, 9))
    step["reward"][1] = float("nan")
    with pytest.raises(ValueError, match="step\\['reward'\\]: holds NaN or Inf at lanes \\[1\\]"):
        ring.add(step, **kw)
    assert ring.state_dict()["header"] == header and ring.num_adds == tier.num_adds == 6
    assert_identical(ring.state_dict()["tensors"], tensors)


@pytest.mark.parametrize("marks", ["first", "last"])
def test_a_mirror_recomputes_its_index_once_its_buffer_stops_being_in_step_with_it(marks):
    # On the CPU a mirror copies its buffer's index rows while both have had the same adds from
    # empty; a load into the buffer (here one with as many adds, other episodes), or an add made
    # to the mirror directly, ends that, and the mirror computes its own rows again: it must
    # still hold what a direct add would.
    loaded, added = build(30, marks, "same_step"), build(30, marks, "same_step")
    rings = [build(5, marks, "same_step", mirror=loaded), build(5, marks, "same_step", mirror=added)]
    twins = [build(30, marks, "same_step"), build(30, marks, "same_step")]
    other = build(5, marks, "same_step")
    chain = build(60, marks, "same_step")
    head = build(5, marks, "same_step", mirror=build(30, marks, "same_step", mirror=chain))
    feed([other], 17, 4, "same_step")
    batches = [list(steps(17, seed)) for seed in (6, 7)]
    for step, kw in batches[0]:
        for b in (*rings, *twins, head):
            b.add(step, **kw)
    rings[0].load_state_dict(other.state_dict())  # its episodes now run on from other's
    step, kw = batches[1][0]
    for b in (added, twins[1]):
        b.add(step, **kw)
    for step, kw in batches[1][1:]:
        for b in (*rings, *twins, head):
            b.add(step, **kw)
    assert [b.num_adds for b in (loaded, added, chain)] == [33, 34, 33]
    for tier, twin in zip((loaded, added), twins):
        assert_identical(tier.state_dict()["tensors"], twin.state_dict()["tensors"])
        assert_identical(tier.episode_stats(), twin.episode_stats())
        assert_identical(tier.sample(32, n_step=2, gamma=0.9), twin.sample(32, n_step=2, gamma=0.9))
    # Down a chain of mirrors, each copies the rows of the one before it.
    direct = build(60, marks, "same_step")
    for step, kw in batches[0] + batches[1][1:]:
        direct.add(step, **kw)
    assert_identical(chain.state_dict()["tensors"], direct.state_dict()["tensors"])
    assert_identical(chain.episode_stats(), direct.episode_stats())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels run on the CPU interpreted")
@pytest.mark.parametrize("marks", ["first", "last"])
def test_a_ring_on_the_kernels_feeds_its_mirror_what_a_direct_add_would(marks):
    # The rows the mirror copies were written by the Triton kernels, its own ops are the reference.
    tier = build(24, marks, "same_step")
    twin = build(24, marks, "same_step")
    ring = build(6, marks, "same_step", backend="triton", mirror=tier)
    feed([ring, twin], 40, 12, "same_step")
    assert ring._ops.name == "triton" and tier._ops.name == "torch"
    assert_identical(tier.state_dict()["tensors"], twin.state_dict()["tensors"])
    assert_identical(tier.episode_stats(), twin.episode_stats())
