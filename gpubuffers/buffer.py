"""ReplayBuffer: time-major ring storage with a device episode index."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from . import ops
from .reference import ENDED, HAS_FINAL, TRUNCATED, EpisodeIndex, slot_age, take
from .specs import (RESERVED_KEYS, LeafSpec, as_tensor, check_leaf, check_mask, flatten,
                    unflatten)

DONE_MARKS = ("first", "last")
AUTORESET = ("same_step", "next_step")


def _leaves_under(key: str, specs: Mapping[str, Any]) -> list[str]:
    """Leaf paths named by ``key``: the leaf itself or every leaf of the subtree ``key/...``."""
    return [p for p in specs if p == key or p.startswith(key + "/")]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


class ReplayBuffer:
    """A ring of ``capacity`` transitions from ``num_envs`` auto-resetting environments.

    Every leaf is stored as one preallocated tensor ``[T, N, *leaf_shape]`` with
    ``T = capacity // N`` rows (``capacity`` is rounded down to a multiple of ``N``), allocated
    on the first :meth:`add` from that step's shapes and dtypes, on ``device`` (default: the
    device of that step's tensors). When the ring is full the oldest row is overwritten.

    Args:
        capacity: transitions held at most (rounded down to ``T * N``; at least 2 rows).
        num_envs: number of lanes N; ``None`` is a single environment whose leaves carry no
            batch dimension and whose ``done`` is a Python bool or 0-d tensor.
        device: storage device; ``None`` takes the device of the first step's tensors.
        done_marks: ``"first"``: ``done[n]`` says this row follows the end of an episode
            (the ``was_done`` reading of CleanRL and rsl_rl); ``"last"``: this row is the last
            of its episode (the ``terminated | truncated`` returned by ``env.step``).
        autoreset: ``"same_step"`` (Isaac Lab, SB3, Brax): the row after an episode's end
            starts the next episode; ``"next_step"`` (gymnasium >= 1.0): the row after an
            episode's end is a reset row that holds the final observation and belongs to no
            episode.
        next_keys: leaves whose successor value samples return under ``"next"``.
        seed: seed of the sampling generator; ``None`` draws one from torch's global RNG.
        reward_key: leaf summed into episode returns (shape ``[N]`` or ``[N, 1]``); ignored
            when the step has no such leaf.
        final_obs_capacity: final observations kept (default ``capacity // 8``, enough while
            episodes average 8 rows or more), as a ring per lane of ``ceil(final_obs_capacity / N)``
            rows (at least 2); when a lane ends more episodes while their transitions are still
            live, its oldest final observations are dropped and reported through ``next_valid``.
        max_proposals: uniform proposals per sampled item for the samplers that reject
            (sequences, episodes, ``next_step`` transitions); an item whose proposals are
            all rejected is returned with ``valid=False``.
        backend: ``"torch"`` (pure torch) or ``"triton"`` (kernels); default: triton for CUDA
            tensors when it is installed, else torch, unless ``GPUBUFFERS_BACKEND`` says otherwise.
    """

    def __init__(self, capacity: int, num_envs: int | None = None, *,
                 device: str | torch.device | None = None, done_marks: str = "first",
                 autoreset: str = "same_step", next_keys: Sequence[str] = ("obs",),
                 seed: int | None = None, reward_key: str | None = "reward",
                 final_obs_capacity: int | None = None, max_proposals: int = 32,
                 backend: str | None = None) -> None:
        capacity = _positive_int(capacity, "capacity")
        lanes = 1 if num_envs is None else _positive_int(num_envs, "num_envs")
        if capacity // lanes < 2:
            raise ValueError(f"capacity: expected at least 2 rows per lane (>= {2 * lanes} for "
                             f"num_envs={lanes}), got {capacity}")
        if done_marks not in DONE_MARKS:
            raise ValueError(f"done_marks: expected one of {DONE_MARKS}, got {done_marks!r}")
        if autoreset not in AUTORESET:
            raise ValueError(f"autoreset: expected one of {AUTORESET}, got {autoreset!r}")
        if isinstance(next_keys, str) or not all(isinstance(k, str) for k in next_keys):
            raise TypeError(f"next_keys: expected a sequence of leaf names, got {next_keys!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
        if final_obs_capacity is not None:
            final_obs_capacity = _positive_int(final_obs_capacity, "final_obs_capacity")
        self._rows = capacity // lanes
        self._lanes = lanes
        self._single = num_envs is None
        self._device = None if device is None else torch.device(device)
        self._marks_last = done_marks == "last"
        self._next_step = autoreset == "next_step"
        self.done_marks = done_marks
        self.autoreset = autoreset
        self.next_keys = tuple(next_keys)
        self.reward_key = reward_key
        self.max_proposals = _positive_int(max_proposals, "max_proposals")
        # The side table is a ring per lane, so its capacity is rounded up to whole rows.
        self._final_rows = max(2, -(-(final_obs_capacity or self.capacity // 8) // lanes))
        self._seed = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        self._specs: dict[str, LeafSpec] | None = None
        self._storage: dict[str, torch.Tensor] = {}
        self._flat: dict[str, torch.Tensor] = {}
        self._final: dict[str, torch.Tensor] = {}
        self._next_src: dict[str, torch.Tensor] = {}
        self._finals_stored = False  # host flag: no side-table lookups until a final obs arrives
        self._episode_cum: torch.Tensor | None = None
        self._ix: EpisodeIndex | None = None
        self._rng: ops.Rng | None = None
        self._ops = None
        self._backend = backend
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS} or None, got {backend!r}")
        self._total = 0
        self._ix_lanes: torch.Tensor | None = None
        self._shapes: dict[str, torch.Size] | None = None
        self._reward_tracked = False

    # ------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        """Transitions held at most: ``T * N``."""
        return self._rows * self._lanes

    @property
    def num_envs(self) -> int | None:
        return None if self._single else self._lanes

    @property
    def rows(self) -> int:
        """Rows per lane, T."""
        return self._rows

    @property
    def device(self) -> torch.device | None:
        """Storage device (``None`` until the first add when it was not given)."""
        return self._device

    @property
    def specs(self) -> dict[str, LeafSpec] | None:
        """Per-leaf layout (``"a/b"`` paths), known after the first add."""
        return None if self._specs is None else dict(self._specs)

    @property
    def storage(self) -> dict[str, torch.Tensor]:
        """The ring tensors ``[T, N, *leaf_shape]`` by leaf path (read them, do not write)."""
        return dict(self._storage)

    @property
    def index(self) -> EpisodeIndex | None:
        """The device episode index (read it, do not write)."""
        return self._ix

    @property
    def num_adds(self) -> int:
        """Rows added since construction."""
        return self._total

    @property
    def live_rows(self) -> int:
        return min(self._total, self._rows)

    @property
    def oldest_row(self) -> int:
        """Absolute row (add number) of the oldest live row."""
        return self._total - self.live_rows

    def __len__(self) -> int:
        """Transitions stored (live slots)."""
        return self.live_rows * self._lanes

    @property
    def num_episodes(self) -> torch.Tensor:
        """[] int64 on the device: finished episodes whose rows are all still stored
        (what :meth:`sample_episodes` draws from). Reading it as a Python int syncs."""
        if self._ix is None:
            return torch.zeros((), dtype=torch.int64)
        return self._episode_cumsum()[-1].clone()

    def episode_stats(self, last_rows: int | None = None) -> dict[str, torch.Tensor]:
        """Statistics of the episodes that ended in the newest ``last_rows`` rows (default: all
        live rows), as device tensors, without a host sync.

        Returns ``count``, ``mean_length`` and ``mean_return`` (NaN while none has ended);
        lengths and returns count whole episodes, also those whose first rows were overwritten.
        """
        if self._ix is None:
            raise ValueError("episode_stats: the buffer is empty; add steps first")
        live = self.live_rows
        last_rows = live if last_rows is None else min(_positive_int(last_rows, "last_rows"), live)
        ix = self._ix
        age = slot_age(self._rows, self._lanes, self.oldest_row, self._device)
        ended = (ix.end_flags != 0) & (age < live) & (age >= live - last_rows)
        count = ended.sum()
        lengths = ((age + self.oldest_row + 1 - ix.start) * ended).sum().double()
        returns = (ix.ret.double() * ended).sum()
        return {"count": count, "mean_length": lengths / count, "mean_return": returns / count}

    def __repr__(self) -> str:
        return (f"ReplayBuffer(capacity={self.capacity}, num_envs={self.num_envs}, rows={self._rows}, "
                f"done_marks={self.done_marks!r}, autoreset={self.autoreset!r}, "
                f"device={self._device}, adds={self._total})")

    # ------------------------------------------------------------------ add
    def add(self, step: Any, done: Any, *, final_obs: Any = None, truncated: Any = None) -> None:
        """Write one row: the same step of every lane.

        step: (nested) dict or TensorDict of leaves ``[N, *leaf_shape]`` (``[*leaf_shape]`` for
            a single environment); numpy arrays are converted.
        done: [N] bool (integer 0/1 accepted) read as ``done_marks`` says.
        final_obs: for ``autoreset="same_step"``: the true final observation of the episodes
            that ``done`` closes with this add, as a tensor (one next key) or a dict by next
            key, ``[N, *leaf_shape]``; rows of lanes whose episode did not end are ignored.
        truncated: [N] bool, the episodes that ``done`` closes ended by truncation (time
            limit), not termination; default all False.

        The whole call is validated before anything is written: a rejected call leaves the
        buffer as it was.
        """
        batch = () if self._single else (self._lanes,)
        device = self._device
        flat = flatten(step, "step")
        if device is None:
            device = next((v.device for v in flat.values() if isinstance(v, torch.Tensor)),
                          torch.device("cpu"))
        specs = self._specs
        for p, v in flat.items():
            if type(v) is not torch.Tensor:
                flat[p] = as_tensor(v, f"step['{p}']", device)
        if specs is None:
            specs = self._new_specs(flat, batch)
        if flat.keys() != specs.keys():
            missing = sorted(set(specs) - set(flat))
            extra = sorted(set(flat) - set(specs))
            raise ValueError(f"step: expected leaves {sorted(specs)}, got {sorted(flat)} "
                             f"(missing {missing}, unexpected {extra})")
        shapes = self._shapes
        for p, v in flat.items():
            spec = specs[p]
            if shapes is None or v.shape != shapes[p] or v.dtype != spec.dtype or v.device != device:
                check_leaf(v, f"step['{p}']", batch, spec, device)
        done = check_mask(done, "done", batch, device)
        if truncated is not None:
            truncated = check_mask(truncated, "truncated", batch, device)
        finals = None
        if final_obs is not None:
            finals = self._check_final(final_obs, specs, batch, device)

        # Validated: allocate (first add) and write.
        if self._specs is None:
            self._allocate(specs, device)
        row = self._total % self._rows
        for p, v in flat.items():
            self._storage[p][row] = v
        if self._single:
            done = done.reshape(1)
            truncated = None if truncated is None else truncated.reshape(1)
        if truncated is None and finals is None:
            flags = None
        else:
            flags = torch.full(batch or (1,), ENDED | (HAS_FINAL if finals is not None else 0),
                               dtype=torch.uint8, device=device)
            if truncated is not None:
                flags.add_(truncated.reshape(flags.shape), alpha=TRUNCATED)
        reward = None
        if self._reward_tracked:
            reward = flat[self.reward_key]
            if reward.dim() != 1:
                reward = reward.reshape(self._lanes)
            if reward.dtype != torch.float32:
                reward = reward.to(torch.float32)
        ended = self._ops.add_step(self._ix, done, flags, reward, self._total,
                                   self._marks_last, self._next_step)
        if finals is not None and ended is not None:
            end_row = (self._total - (0 if self._marks_last else 1)) % self._rows
            pos = self._ops.store_finals(self._ix, ended, end_row, self._final_rows)
            for k, v in finals.items():
                self._final[k][pos, self._ix_lanes] = v.reshape(self._lanes, *specs[k].shape)
            self._finals_stored = True
        self._total += 1
        self._episode_cum = None

    def _new_specs(self, flat: dict[str, torch.Tensor], batch: tuple[int, ...]) -> dict[str, LeafSpec]:
        specs = {}
        for p, v in flat.items():
            top = p.split("/")[0]
            if top in RESERVED_KEYS:
                raise ValueError(f"step: leaf name {top!r} is reserved for sample outputs "
                                 f"(reserved: {sorted(RESERVED_KEYS)})")
            if tuple(v.shape[:len(batch)]) != batch:
                raise ValueError(f"step['{p}']: expected a leading lane dimension of {batch[0]} "
                                 f"(num_envs), got shape {tuple(v.shape)}")
            specs[p] = LeafSpec(tuple(v.shape[len(batch):]), v.dtype)
        missing = [k for k in self.next_keys if not _leaves_under(k, specs)]
        if missing:
            raise ValueError(f"next_keys: {missing} are not leaves of the step (leaves: {sorted(specs)})")
        return specs

    def _check_final(self, final_obs: Any, specs: dict[str, LeafSpec], batch: tuple[int, ...],
                     device: torch.device) -> dict[str, torch.Tensor]:
        if self._next_step:
            raise ValueError("final_obs: not used with autoreset='next_step', where the reset row "
                             "after an episode's end already holds its final observation")
        leaves = [p for k in self.next_keys for p in _leaves_under(k, specs)]
        if isinstance(final_obs, Mapping) or type(final_obs).__module__.startswith("tensordict"):
            finals = flatten(final_obs, "final_obs")
            if set(finals) != set(leaves) and len(self.next_keys) == 1 and leaves != [self.next_keys[0]]:
                # The value of the single next key, itself a nested dict.
                finals = {f"{self.next_keys[0]}/{p}": v for p, v in finals.items()}
        elif leaves == list(self.next_keys[:1]):
            finals = {leaves[0]: final_obs}
        else:
            raise TypeError(f"final_obs: expected a dict of the leaves {leaves}, "
                            f"got {type(final_obs).__name__}")
        if set(finals) != set(leaves):
            raise ValueError(f"final_obs: expected keys {sorted(leaves)}, got {sorted(finals)}")
        out = {}
        for k, v in finals.items():
            v = as_tensor(v, f"final_obs['{k}']", device)
            check_leaf(v, f"final_obs['{k}']", batch, specs[k], device)
            out[k] = v
        return out

    def _allocate(self, specs: dict[str, LeafSpec], device: torch.device) -> None:
        rows, lanes = self._rows, self._lanes
        next_leaves = [p for k in self.next_keys for p in _leaves_under(k, specs)]
        # Under same_step, each next leaf's final-obs side table (a ring of final_rows rows per
        # lane, plus a scratch row) follows its ring in the same allocation, so one gather at one
        # index reads the successor wherever it lives.
        extra = 0 if self._next_step else self._final_rows + 1
        whole = {p: torch.zeros(((rows + (extra if p in next_leaves else 0)) * lanes, *s.shape),
                                dtype=s.dtype, device=device) for p, s in specs.items()}
        storage = {p: t[:rows * lanes].view(rows, lanes, *specs[p].shape) for p, t in whole.items()}
        ix = EpisodeIndex.empty(rows, lanes, device)
        gen = torch.Generator(device=device)
        gen.manual_seed(self._seed)
        self._ops = ops.backend(device, self._backend)
        self._storage = storage
        self._flat = {p: t.view(rows * lanes, *specs[p].shape) for p, t in storage.items()}
        self._ix = ix
        self._rng = ops.Rng(gen, self._seed)
        self._ix_lanes = torch.arange(lanes, device=device)
        self._next_leaves = next_leaves
        self._next_src = {p: whole[p] for p in next_leaves}
        if extra:
            self._final = {p: whole[p][rows * lanes:].view(extra, lanes, *specs[p].shape) for p in next_leaves}
        batch = () if self._single else (lanes,)
        self._shapes = {p: torch.Size(batch + s.shape) for p, s in specs.items()}
        self._reward_tracked = self.reward_key in specs and math.prod(specs[self.reward_key].shape) == 1
        self._device = device
        self._specs = specs

    # ------------------------------------------------------------------ sampling
    def _check_batch(self, batch_size: Any) -> int:
        return _positive_int(batch_size, "batch_size")

    def _gather(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every leaf at ``slots`` (any shape): ``[*slots.shape, *leaf_shape]``."""
        entries = [(t, 0) for t in self._flat.values()]
        return dict(zip(self._flat, self._ops.gather(entries, (slots,))))

    def sample(self, batch_size: int) -> dict[str, Any]:
        """B transitions, uniform over live slots whose successor row has been written.

        Returns every leaf at ``[B, *leaf_shape]``, and
          ``next``: {key: [B, *leaf_shape]} the successor of each ``next_keys`` leaf: the next
            row inside the episode, else the episode's final observation;
          ``next_valid`` [B] bool: False where that successor is unknown (an episode ended and
            its final observation was not given or was dropped) -- mask these out;
          ``is_first``, ``is_last``, ``terminated``, ``truncated`` [B] bool;
          ``valid`` [B] bool: False for items whose proposals were all rejected (only possible
            with ``autoreset="next_step"``);
          ``index`` [B] int64 ring slot ``row * N + lane``.
        """
        batch_size = self._check_batch(batch_size)
        if self._total < 2:
            raise ValueError(f"sample: needs at least 2 adds (a transition is complete once the "
                             f"next row is written), the buffer has {self._total}")
        ix, oldest = self._ix, self.oldest_row
        tries = self.max_proposals if self._next_step else 1
        links = self._ops.sample_transitions(ix, self._rng, batch_size, tries, oldest, self.live_rows,
                                             self._next_step, self._final_rows if self._finals_stored else 0)
        slot, valid = links["slot"], links["valid"]
        # One gather for the leaves and the next leaves (successor row, or side table at an end).
        entries = [(t, 0) for t in self._flat.values()] + [(self._next_src[k], 1) for k in self._next_leaves]
        values = self._ops.gather(entries, (slot, links["succ"]))
        out: dict[str, Any] = dict(zip(self._flat, values))
        nxt = dict(zip(self._next_leaves, values[len(self._flat):]))
        out = unflatten(out)
        out["next"] = unflatten(nxt)
        out["next_valid"] = links["next_valid"]
        out["is_first"] = links["is_first"]
        out["is_last"] = links["is_last"]
        out["terminated"] = links["terminated"]
        out["truncated"] = links["truncated"]
        out["valid"] = torch.ones_like(links["is_last"]) if valid is None else valid
        out["index"] = slot
        return out

    def sample_sequences(self, batch_size: int, length: int) -> dict[str, Any]:
        """B windows of ``length`` consecutive rows of one lane, inside one episode and inside
        live data, uniform over all such windows; the cost does not grow with capacity.

        Returns every leaf at ``[B, L, *leaf_shape]``, and ``is_first``, ``is_last`` [B, L]
        bool, ``valid`` [B] bool (False for items whose ``max_proposals`` proposals all crossed
        an episode boundary; their data is not a window of one episode), ``index`` [B, L] slots.
        """
        batch_size = self._check_batch(batch_size)
        length = _positive_int(length, "length")
        if length > self._rows:
            raise ValueError(f"length: expected at most T={self._rows} rows per lane, got {length}")
        if self._total < length:
            raise ValueError(f"length: no window of {length} rows fits in the {self.live_rows} "
                             f"live rows; add more steps first")
        win = self._ops.sample_windows(self._ix, self._rng, batch_size, self.max_proposals,
                                       self.oldest_row, self.live_rows, length)
        out: dict[str, Any] = unflatten(self._gather(win["slots"]))
        out["is_first"] = win["is_first"]
        out["is_last"] = win["is_last"]
        out["valid"] = win["valid"]
        out["index"] = win["slots"]
        return out

    def sample_episodes(self, batch_size: int, max_rows: int | None = None) -> dict[str, Any]:
        """B finished episodes whose rows are all stored, uniform over such episodes, packed.

        Episodes cut by the seam (their first rows overwritten) and the unfinished episode of
        each lane are not drawn. Rows are packed end to end into ``max_rows`` rows (default
        ``B * T``, the worst case); episodes that would not fit are left out with
        ``valid=False`` and length 0, as are all B when no finished episode is stored.
        Drawing is exact (no rejection): the first call after an add counts the eligible
        episodes in one pass over the index, O(capacity); each draw is then O(log capacity).

        Returns every leaf at ``[max_rows, *leaf_shape]``, ``cu_seqlens`` [B + 1] int64
        (episode b is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``), ``length``, ``lane``,
        ``episode_return`` [B], ``truncated`` [B] bool, ``valid`` [B] bool, ``mask``
        [max_rows] bool (rows that belong to an episode), ``is_first``, ``is_last`` [max_rows],
        ``num_rows`` [] int64. :func:`gpubuffers.pad_episodes` turns it into ``[B, L, ...]``.
        """
        batch_size = self._check_batch(batch_size)
        if max_rows is None:
            max_rows = batch_size * self._rows
        max_rows = _positive_int(max_rows, "max_rows")
        if self._total == 0:
            raise ValueError("sample_episodes: the buffer is empty; add steps first")
        ix = self._ix
        end_slot, valid = self._ops.sample_episode_ends(self._episode_cumsum(), self._rng, batch_size)
        packed = self._ops.pack_episodes(ix, end_slot, valid, self.oldest_row, max_rows)
        out: dict[str, Any] = unflatten(self._gather(packed["slot"]))
        flags = take(ix.end_flags, end_slot)
        out["cu_seqlens"] = packed["cu_seqlens"]
        out["length"] = packed["length"]
        out["lane"] = packed["lane"]
        out["episode_return"] = take(ix.ret, end_slot)
        out["truncated"] = packed["valid"] & ((flags & TRUNCATED) != 0)
        out["valid"] = packed["valid"]
        out["mask"] = packed["mask"]
        out["is_first"] = packed["is_first"]
        out["is_last"] = packed["is_last"]
        out["num_rows"] = packed["cu_seqlens"][-1]
        return out

    def _episode_cumsum(self) -> torch.Tensor:
        """[T * N] cumulative count of slots that end a whole live episode, built once per add."""
        if self._episode_cum is None:
            ends = self._ops.whole_episode_ends(self._ix, self.oldest_row, self.live_rows)
            self._episode_cum = torch.cumsum(ends, 0)
        return self._episode_cum
