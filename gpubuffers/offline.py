"""Minari datasets in and out (``pip install -e '.[minari]'``): the field's offline-RL format.

A Minari episode of L steps holds ``observations`` [L + 1] (the reset observation, then each
step's result, the last being the episode's final observation), ``actions``, ``rewards``,
``terminations`` and ``truncations`` [L]. A buffer's episode of L rows maps onto it directly: its
``obs`` rows plus its final observation (``next`` of the last row), its action and reward rows,
and its end (terminated or truncated) on the last step.

:func:`to_minari` writes the finished episodes a buffer stores (:meth:`ReplayBuffer.episodes`)
as a local dataset; :func:`from_minari` adds a dataset's episodes to a buffer, in the buffer's
conventions. Host-side and step by step: for datasets, not the training loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .specs import flatten, unflatten


def _minari():
    try:
        import gymnasium
        import minari
        from minari.data_collector import EpisodeBuffer
    except ImportError as err:
        raise ImportError("Minari export and import need minari, gymnasium and a storage backend: "
                          "pip install -e '.[minari]'") from err
    return minari, gymnasium, EpisodeBuffer


def _space(gymnasium, example: Any):
    """A Box (or a Dict of Boxes) with the dtype and shape of one row, unbounded (ints: their
    dtype's range)."""
    if isinstance(example, dict):
        return gymnasium.spaces.Dict({k: _space(gymnasium, v) for k, v in example.items()})
    arr = np.asarray(example)
    if np.issubdtype(arr.dtype, np.floating):
        low, high = -np.inf, np.inf
    elif arr.dtype == np.bool_:
        return gymnasium.spaces.MultiBinary(arr.shape) if arr.shape else gymnasium.spaces.Discrete(2)
    else:
        info = np.iinfo(arr.dtype)
        low, high = info.min, info.max
    return gymnasium.spaces.Box(low, high, arr.shape, arr.dtype)


def _numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    t = tree.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def to_minari(buffer, dataset_id: str, *, obs_key: str = "obs", action_key: str = "action",
              data_format: str = "arrow", **metadata: Any) -> dict[str, Any]:
    """Write the finished episodes ``buffer`` stores as the local Minari dataset ``dataset_id``
    (under ``MINARI_DATASETS_PATH``, default ``~/.minari/datasets``); ``metadata`` goes to
    ``minari.create_dataset_from_buffers`` (author, algorithm_name, env, ...).

    An episode becomes ``observations`` = its ``obs_key`` rows plus its final observation,
    ``actions`` = its ``action_key`` rows, ``rewards`` = its reward leaf, and its end flags.
    Episodes whose final observation is not stored (``next_valid=False``) cannot be written
    (Minari needs it) and are counted, not written; other leaves are not exported and are
    named. Returns ``{"dataset": the MinariDataset, "episodes": written, "skipped": episodes
    without a final observation, "left_out": leaves not exported}``.
    """
    minari, gymnasium, EpisodeBuffer = _minari()
    if buffer.specs is None:
        raise ValueError("buffer: it is empty; add episodes first")
    if buffer.reward_key is None:
        raise ValueError("buffer: it was built with reward_key=None; Minari episodes need rewards")
    if obs_key not in buffer.next_keys:
        raise ValueError(f"obs_key: {obs_key!r} is not one of the buffer's next_keys {buffer.next_keys} "
                         f"(the final observation of an episode is kept only for those)")
    for name, key in (("obs_key", obs_key), ("action_key", action_key)):
        if not any(p == key or p.startswith(key + "/") for p in buffer.specs):
            raise ValueError(f"{name}: {key!r} is not a leaf of the buffer (leaves: {sorted(buffer.specs)})")
    used = (obs_key, action_key, buffer.reward_key)
    left_out = sorted(p for p in buffer.specs if not any(p == k or p.startswith(k + "/") for k in used))
    episodes, skipped = [], 0
    for ep in buffer.episodes():
        if not ep["next_valid"]:
            skipped += 1
            continue
        obs, final = _numpy(ep[obs_key]), _numpy(ep["next"][obs_key])
        if isinstance(obs, dict):
            flat, last = flatten(obs, "obs"), flatten(final, "final")
            observations = unflatten({k: np.concatenate([v, last[k][None]]) for k, v in flat.items()})
        else:
            observations = np.concatenate([obs, final[None]])
        length = ep["length"]
        ends = np.zeros(length, dtype=bool)
        ends[-1] = True
        episodes.append(EpisodeBuffer(
            id=len(episodes), observations=observations, actions=_numpy(ep[action_key]),
            rewards=list(_numpy(ep[buffer.reward_key]).reshape(length).astype(np.float64)),
            terminations=list(ends & ep["terminated"]), truncations=list(ends & ep["truncated"]), infos={}))
    if not episodes:
        raise ValueError(f"buffer: no finished episode with a final observation to write "
                         f"({skipped} without one)")
    first = episodes[0]
    obs_example = (unflatten({k: v[0] for k, v in flatten(first.observations, "obs").items()})
                   if isinstance(first.observations, dict) else first.observations[0])
    metadata.setdefault("observation_space", _space(gymnasium, obs_example))
    metadata.setdefault("action_space", _space(gymnasium, first.actions[0]))
    dataset = minari.create_dataset_from_buffers(dataset_id, episodes, data_format=data_format, **metadata)
    return {"dataset": dataset, "episodes": len(episodes), "skipped": skipped, "left_out": left_out}


def from_minari(dataset: Any, buffer, *, obs_key: str = "obs", action_key: str = "action") -> int:
    """Add every episode of ``dataset`` (a ``MinariDataset`` or its id) to ``buffer``, a
    single-environment or one-lane buffer (``num_envs=None`` or 1), one row per step, in the
    buffer's conventions: the end flags on the last row (``done_marks="last"``) or with the next
    add (``"first"``, where one more row after the dataset closes its last episode: it holds that
    episode's final observation, zero action and reward, and opens an episode that never ends),
    the final observation as ``final_obs`` (``autoreset="same_step"``) or as a reset row after the
    episode (``"next_step"``). An episode that neither terminates nor truncates (cut by the
    recording) runs on into the next one unless it is the last. Returns the rows added.
    """
    minari, _, _ = _minari()
    if buffer.num_envs not in (None, 1):
        raise ValueError(f"buffer: expected a single-environment or one-lane buffer, got num_envs="
                         f"{buffer.num_envs}; a dataset's episodes are one stream of rows")
    if buffer.reward_key is None:
        raise ValueError("buffer: it was built with reward_key=None; a dataset's rewards need a leaf")
    if isinstance(dataset, str):
        dataset = minari.load_dataset(dataset)
    lane = () if buffer.num_envs is None else (1,)
    same_step = buffer.autoreset == "same_step"
    marks_last = buffer.done_marks == "last"

    def tensor(x: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x)).reshape((*lane, *np.shape(x)))

    def zeros_like(tree: Any) -> Any:  # the ignored action of a reset row
        return {k: zeros_like(v) for k, v in tree.items()} if isinstance(tree, dict) else torch.zeros_like(tree)

    def row(tree: Any, i: int) -> Any:
        if isinstance(tree, dict):
            return {k: row(v, i) for k, v in tree.items()}
        return tensor(tree[i])

    added = 0
    pending = None  # first mode: the end the next add brings (terminated, truncated, final obs, zero action)
    flag = lambda v: torch.tensor(v).reshape(lane or ())  # noqa: E731
    for ep in dataset.iterate_episodes():
        length = len(ep.rewards)
        term, trunc = bool(ep.terminations[-1]), bool(ep.truncations[-1])
        for i in range(length):
            step = {obs_key: row(ep.observations, i), action_key: row(ep.actions, i),
                    buffer.reward_key: tensor(np.float32(ep.rewards[i]))}
            last = i == length - 1
            if marks_last:
                end = last and (term or trunc)
                kw = dict(terminated=flag(end and term), truncated=flag(end and trunc and not term))
                if end and same_step:
                    kw["final_obs"] = row(ep.observations, length)
            else:
                t, u, fin, _ = pending if pending is not None else (False, False, None, None)
                kw = dict(terminated=flag(t), truncated=flag(u and not t))
                if fin is not None and same_step:
                    kw["final_obs"] = fin
                pending = None
            buffer.add(step, **kw)
            added += 1
        if not (term or trunc):
            continue
        final = row(ep.observations, length)
        if not same_step:  # the reset row holds the final observation
            step = {obs_key: final, action_key: zeros_like(row(ep.actions, 0)),
                    buffer.reward_key: tensor(np.float32(0))}
            kw = (dict(terminated=flag(False), truncated=flag(False)) if marks_last
                  else dict(terminated=flag(term), truncated=flag(trunc and not term)))
            buffer.add(step, **kw)
            added += 1
        elif not marks_last:
            pending = (term, trunc, final, zeros_like(row(ep.actions, 0)))
    if pending is not None:
        # First mode: an end is recorded by the add after it. One more row closes the last
        # episode; it holds the final observation (zero action and reward) and starts an
        # episode that stays open (never a finished episode, never a transition).
        term, trunc, final, action = pending
        buffer.add({obs_key: final, action_key: action, buffer.reward_key: tensor(np.float32(0))},
                   terminated=flag(term), truncated=flag(trunc and not term), final_obs=final)
        added += 1
    return added
