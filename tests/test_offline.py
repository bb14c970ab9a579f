"""Minari export and import: a buffer's finished episodes round-trip through a local dataset
(no network), in every convention."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("minari")
pytest.importorskip("pyarrow")

from gpubuffers import ReplayBuffer  # noqa: E402
from gpubuffers.offline import from_minari, to_minari  # noqa: E402

MODES = [(m, a) for m in ("first", "last") for a in ("same_step", "next_step")]
N = 3


def fill(buf: ReplayBuffer, adds: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in range(adds):
        term = torch.rand(N, generator=g) < 0.15
        trunc = ~term & (torch.rand(N, generator=g) < 0.1)
        step = {"obs": torch.randn(N, 3, generator=g), "action": torch.randn(N, 2, generator=g),
                "reward": torch.randn(N, generator=g), "extra": torch.zeros(N, 1)}
        kw = dict(terminated=term, truncated=trunc)
        if buf.autoreset == "same_step":
            kw["final_obs"] = torch.randn(N, 3, generator=g)
        buf.add(step, **kw)


def episode_rows(ep):
    return (ep["obs"], ep["action"], ep["reward"], ep["next"]["obs"], ep["terminated"], ep["truncated"])


@pytest.mark.parametrize("marks,autoreset", MODES)
def test_episodes_round_trip_through_minari(tmp_path, monkeypatch, marks, autoreset):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    import warnings
    src = ReplayBuffer(40 * N, N, done_marks=marks, autoreset=autoreset, seed=1)
    fill(src, 60)
    want = [ep for ep in src.episodes() if ep["next_valid"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Minari's reminders to set an author etc.
        out = to_minari(src, f"gpubuffers/test-{marks}-{autoreset}-v0")
    assert out["episodes"] == len(want) > 5 and out["left_out"] == ["extra"]
    dataset = out["dataset"]
    assert dataset.total_episodes == len(want)
    assert dataset.total_steps == sum(ep["length"] for ep in want)
    for ep, got in zip(want, dataset.iterate_episodes()):
        assert got.observations.shape == (ep["length"] + 1, 3)
        assert torch.equal(torch.as_tensor(got.observations[:-1]), ep["obs"])
        assert torch.equal(torch.as_tensor(got.observations[-1]), ep["next"]["obs"])
        assert bool(got.terminations[-1]) == ep["terminated"] and bool(got.truncations[-1]) == ep["truncated"]
    # And back, into a single-environment buffer of the same conventions.
    back = ReplayBuffer(4096, done_marks=marks, autoreset=autoreset)
    rows = from_minari(dataset, back)
    assert rows == back.num_adds
    got = list(back.episodes())
    assert len(got) == len(want)
    for a, b in zip(want, got):
        for x, y in zip(episode_rows(a), episode_rows(b)):
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))
        assert b["next_valid"]


def test_export_and_import_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    buf = ReplayBuffer(8 * N, N)
    with pytest.raises(ValueError, match="buffer: it is empty"):
        to_minari(buf, "gpubuffers/x-v0")
    fill(buf, 5)
    with pytest.raises(ValueError, match="obs_key: 'state' is not one of the buffer's next_keys"):
        to_minari(buf, "gpubuffers/x-v0", obs_key="state")
    with pytest.raises(ValueError, match="action_key: 'act'"):
        to_minari(buf, "gpubuffers/x-v0", action_key="act")
    with pytest.raises(ValueError, match="one-lane buffer, got num_envs=3"):
        from_minari("gpubuffers/x-v0", ReplayBuffer(8 * N, N))
