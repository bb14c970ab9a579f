"""RolloutBuffer: on-policy rollouts of T rows by N lanes, GAE on the device, shuffled minibatches."""

from __future__ import annotations

import math
from typing import Any, Iterator, NamedTuple

import torch

from . import ops
from .layout import SENTINEL, STATE_ADDS
from .reference import EpisodeIndex, end_flags_of
from .specs import RESERVED_KEYS, LeafSpec, carrier, check_mask, resolve_device, unflatten
from .steps import (Lanes, check_step, conventions, lane_values, leaves_under, positive_int, real,
                    scalar_leaf, seed_or_fresh)

#: Keys that rollout batches add beside the stored leaves.
ROLLOUT_KEYS = frozenset({"advantage", "return", "mask", "index", "is_first", "initial_hidden", "lane"})

#: Added to the standard deviation when advantages are normalized.
NORMALIZE_EPS = 1e-8


class _Add(NamedTuple):
    """One add, checked and converted: what the commit writes, and cannot fail on."""

    flat: dict[str, torch.Tensor]
    done: torch.Tensor | None
    terminated: torch.Tensor | None
    truncated: torch.Tensor | None
    final_value: torch.Tensor | None
    layout: dict[str, Any] | None


class RolloutBuffer(Lanes):
    """One rollout of ``num_steps`` rows from ``num_envs`` auto-resetting environments, for
    on-policy learners (PPO and its recurrent variants), kept on the device.

    Steps are added as to :class:`~gpubuffers.ReplayBuffer` (same format, flags, conventions,
    checks and errors); each leaf is stored as ``[T, N, *leaf_shape]``. Episodes are tracked as
    rows arrive, across rollouts: an episode that runs on from one rollout into the next keeps
    going, so the first row of a rollout starts an episode only where one started there.

    A rollout is full after ``num_steps`` adds; the next add starts the next rollout (overwriting
    the previous one, its returns included). :meth:`clear` starts over early, dropping the rows of
    the unfinished rollout.

    Args:
        num_steps: rows per rollout, T (at least 2).
        num_envs: lanes N; ``None`` is a single environment (leaves without a lane dimension).
        device: storage device; ``None`` takes the device of the first step's tensors.
        done_marks, autoreset: the episode conventions of :class:`~gpubuffers.ReplayBuffer`.
            The default ``done_marks="last"`` reads a row as ``(obs_t, action_t, reward_t,
            done_t)`` with ``done_t`` the flag ``env.step`` returned with ``reward_t`` (rsl_rl,
            skrl, Isaac Lab); ``"first"`` is CleanRL's ``dones[t]`` (``obs_t`` is the first of a
            new episode).
        reward_key, value_key: the scalar leaves ([N] or [N, 1]) that hold each row's reward and
            the critic's value of its observation, read by :meth:`compute_returns`.
        seed: seed of the minibatch permutations; ``None`` takes one from the operating system.
        backend: ``"torch"`` or ``"triton"`` (default: triton for CUDA tensors when installed).
    """

    def __init__(self, num_steps: int, num_envs: int | None = None, *,
                 device: str | torch.device | None = None, done_marks: str = "last",
                 autoreset: str = "same_step", reward_key: str = "reward", value_key: str = "value",
                 seed: int | None = None, backend: str | None = None) -> None:
        rows = positive_int(num_steps, "num_steps")
        if rows < 2:
            raise ValueError(f"num_steps: expected at least 2 rows, got {rows}")
        lanes = 1 if num_envs is None else positive_int(num_envs, "num_envs")
        self._marks_last, self._next_step = conventions(done_marks, autoreset)
        for name, key in (("reward_key", reward_key), ("value_key", value_key)):
            if not isinstance(key, str) or not key:
                raise TypeError(f"{name}: expected a leaf name, got {key!r}")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS} or None, got {backend!r}")
        self.done_marks = done_marks
        self.autoreset = autoreset
        self.reward_key = reward_key
        self.value_key = value_key
        self._rows = rows
        self._lanes = lanes
        self._single = num_envs is None
        self._device = None if device is None else resolve_device(device)
        self._seed = seed_or_fresh(seed)
        self._backend = backend
        self._specs: dict[str, LeafSpec] | None = None
        self._shapes: dict[str, torch.Size] | None = None
        self._storage: dict[str, torch.Tensor] = {}
        self._flat: dict[str, torch.Tensor] = {}
        self._returns: dict[str, torch.Tensor] = {}   # "advantage", "return": [T, N, *value shape]
        self._final_value: torch.Tensor | None = None  # [T, N] float32, at end slots
        self._ix: EpisodeIndex | None = None
        self._ops = None
        self._gen: torch.Generator | None = None
        self._count = 0          # rows of the current rollout
        self._total = 0          # absolute row of the next add
        self._returns_ready = False
        self._flags_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def num_steps(self) -> int:
        return self._rows

    @property
    def storage(self) -> dict[str, torch.Tensor]:
        """The leaves ``[T, N, *leaf_shape]`` by path, with ``"advantage"`` and ``"return"`` once
        computed (read them, do not write)."""
        return self._leaves()

    @property
    def index(self) -> EpisodeIndex | None:
        """The device episode index of the rollout's rows (read it, do not write)."""
        return self._ix

    @property
    def full(self) -> bool:
        """Whether the rollout holds all ``num_steps`` rows."""
        return self._count == self._rows

    def __len__(self) -> int:
        """Transitions in the current rollout: rows written times N."""
        return self._count * self._lanes

    def __repr__(self) -> str:
        return (f"RolloutBuffer(num_steps={self._rows}, num_envs={self.num_envs}, "
                f"done_marks={self.done_marks!r}, autoreset={self.autoreset!r}, device={self._device}, "
                f"rows={self._count})")

    # ------------------------------------------------------------------ add
    def add(self, step: Any, done: Any = None, *, terminated: Any = None, truncated: Any = None,
            final_value: Any = None) -> None:
        """Write one row: the same step of every lane (see :meth:`ReplayBuffer.add
        <gpubuffers.ReplayBuffer.add>` for ``step``, ``done``, ``terminated``, ``truncated``).

        final_value: [N] (or [N, 1]) the critic's value of the final observation of each episode
            that the flags close with this add (under ``done_marks="first"`` they closed on the
            previous row), so that a truncated episode bootstraps from ``gamma * V(final obs)``.
            Values of lanes whose episode did not end by truncation are ignored (``done``
            without ``truncated``/``terminated`` reads every end as a termination). Without it, a truncated
            episode bootstraps from the value of its own last row (rsl_rl's approximation).
            Not used with ``autoreset="next_step"``, where the reset row after an episode's end
            holds the final observation and its ``value_key`` leaf is that value.

        After a full rollout, the add starts the next one. A rejected call changes nothing.
        """
        prepared = self._prepare(step, done, terminated, truncated, final_value)
        with torch.no_grad():
            self._commit(prepared)

    def _prepare(self, step: Any, done: Any, terminated: Any, truncated: Any, final_value: Any) -> _Add:
        lay = self._layout()
        st = check_step(lay, step, done, terminated, truncated, RESERVED_KEYS | ROLLOUT_KEYS)
        if self._specs is None:
            instead = "store the {} in a leaf of shape [N]"
            scalar_leaf(st.specs, self.reward_key, "reward_key", instead.format("rewards"))
            scalar_leaf(st.specs, self.value_key, "value_key", instead.format("values"))
        if final_value is not None:
            if self._next_step:
                raise ValueError("final_value: not used with autoreset='next_step', where the reset "
                                 "row after an episode's end holds the final observation and its "
                                 f"{self.value_key!r} leaf is that value")
            final_value = lane_values(final_value, "final_value", lay, st.device)
        new_layout = self._allocate(st.specs, st.device) if self._specs is None else None
        return _Add(st.flat, st.done, st.terminated, st.truncated, final_value, new_layout)

    def _allocate(self, specs: dict[str, LeafSpec], device: torch.device) -> dict[str, Any]:
        rows, lanes = self._rows, self._lanes
        value_shape = specs[self.value_key].shape
        nbytes = sum(rows * lanes * math.prod(s.shape) * s.dtype.itemsize for s in specs.values())
        nbytes += rows * lanes * (8 + 1 + 4 + 8 + 4 + 2 * 4)
        try:
            storage = {p: torch.zeros((rows, lanes, *s.shape), dtype=s.dtype, device=device)
                       for p, s in specs.items()}
            returns = {k: torch.zeros((rows, lanes, *value_shape), dtype=torch.float32, device=device)
                       for k in ("advantage", "return")}
            ix = EpisodeIndex.empty(rows, lanes, device)
            final_value = torch.zeros(rows, lanes, dtype=torch.float32, device=device)
        except (RuntimeError, MemoryError) as err:
            raise ValueError(f"num_steps: cannot allocate {nbytes:,} bytes on {device} for "
                             f"{rows} rows x {lanes} lanes; lower num_steps or num_envs, or store "
                             f"smaller leaves") from err
        gen = torch.Generator(device=device)
        gen.manual_seed(self._seed)
        return {**self._installed(specs, device, storage, self._backend),
                "_returns": returns, "_ix": ix, "_final_value": final_value, "_gen": gen}

    def _commit(self, st: _Add) -> None:
        if st.layout is not None:
            self.__dict__.update(st.layout)
        ix = self._ix
        row = ix.state[STATE_ADDS:STATE_ADDS + 1] % self._rows
        for p, v in st.flat.items():
            carrier(self._storage[p]).index_copy_(0, row, carrier(v)[None])
        ended = self._ops.add_step(ix, st.done, st.terminated, st.truncated, st.final_value is not None,
                                   None, self._marks_last, self._next_step)
        if st.final_value is not None:
            end_row = row if self._marks_last else (row - 1) % self._rows
            kept = self._final_value.index_select(0, end_row)[0]
            self._final_value.index_copy_(0, end_row, torch.where(ended, st.final_value, kept)[None])
        self._ops.advance(ix)
        self._total += 1
        self._count = self._count % self._rows + 1
        self._returns_ready = False

    def clear(self) -> None:
        """Start the next rollout now: the next add writes its first row, and the rows of the
        unfinished rollout are dropped. Episodes still run on: the next row continues (or, by its
        flags, ends) each lane's episode of the last row added."""
        count = self._count
        if 0 < count < self._rows:
            ix, last, skip = self._ix, count - 1, self._rows - count
            # The next add reads the previous row at ring row T - 1: move the last row there.
            for t in (ix.start, ix.end_flags, ix.ret, self._final_value):
                t[-1] = t[last]
            ix.state[STATE_ADDS:STATE_ADDS + 1].add_(skip)
            self._total += skip
        self._count = 0
        self._returns_ready = False

    # ------------------------------------------------------------------ returns
    def compute_returns(self, last_value: Any, gamma: float, lam: float, *,
                        normalize_advantage: bool = False, next_done: Any = None,
                        next_terminated: Any = None, next_truncated: Any = None,
                        next_final_value: Any = None) -> dict[str, torch.Tensor]:
        """GAE(lambda) advantages and returns of the full rollout, on the device with no host
        sync, stored as the leaves ``"advantage"`` and ``"return"`` (``advantage + value``), of
        the ``value_key`` leaf's shape ``[T, N(, 1)]`` (a single environment is one lane:
        ``[T, 1(, 1)]``), float32. Returns those leaves themselves: the next rollout's
        ``compute_returns`` overwrites them in place (clone what must outlive the rollout).

        last_value: [N] the critic's value of the observation that follows the last row.
        gamma, lam: discount and GAE lambda, floats in [0, 1].
        normalize_advantage: shift and scale the advantages of the rollout's episode rows to mean
            0 and standard deviation 1 (over rows where ``"mask"`` holds; returns are computed
            before).
        next_done, next_terminated, next_truncated, next_final_value: under ``done_marks="first"``
            only, where the end of the last row's episode arrives with the next add: the flags
            (and final value) that the next add will carry; ``next_done`` (or
            ``next_terminated``) is required there.

        A slot bootstraps from the next row's value inside its episode (``last_value`` after the
        last row); where its episode ends by termination, from 0; where it ends by truncation,
        from the episode's ``final_value`` (under ``next_step``: the value of the reset row that
        follows, or ``last_value``), or without one from the value of the slot itself. Reset rows
        (``autoreset="next_step"``) get advantage 0 and ``mask`` False.
        """
        if not self.full:
            raise ValueError(f"compute_returns: the rollout holds {self._count} of {self._rows} rows; "
                             f"returns need a full rollout")
        gamma = real(gamma, "gamma", 0.0, 1.0)
        lam = real(lam, "lam", 0.0, 1.0)
        if not isinstance(normalize_advantage, bool):
            raise TypeError(f"normalize_advantage: expected a bool, got {type(normalize_advantage).__name__}")
        lay = self._layout()
        device = self._device
        last_value = lane_values(last_value, "last_value", lay, device)
        ix = self._ix
        nexts = {"next_done": next_done, "next_terminated": next_terminated,
                 "next_truncated": next_truncated, "next_final_value": next_final_value}
        if self._marks_last:
            given = [k for k, v in nexts.items() if v is not None]
            if given:
                raise ValueError(f"{given[0]}: only used with done_marks='first'; under 'last' the "
                                 f"last row's own flags say how its episode ended")
            tail_flags, tail_final = ix.end_flags[-1], self._final_value[-1]
        else:
            if next_done is None and next_terminated is None:
                raise ValueError("next_done: under done_marks='first' the end of the last row's episode "
                                 "arrives with the next add; pass its flags as next_done= (or "
                                 "next_terminated= and next_truncated=)")
            if next_final_value is not None and self._next_step:
                raise ValueError("next_final_value: not used with autoreset='next_step' (last_value "
                                 "is the value of the reset row's final observation)")
            masks = [None if v is None else check_mask(v, k, lay.batch, device).reshape(self._lanes)
                     for k, v in list(nexts.items())[:3]]
            tail_final = (torch.zeros(self._lanes, dtype=torch.float32, device=device)
                          if next_final_value is None else
                          lane_values(next_final_value, "next_final_value", lay, device))
            done, flags = end_flags_of(ix, *masks, next_final_value is not None)
            ended = done & (ix.start[-1] != SENTINEL) if self._next_step else done
            tail_flags = ended.to(torch.uint8) if flags is None else torch.where(ended, flags, ix.zeros[0])
        rows, lanes = self._rows, self._lanes
        reward = self._storage[self.reward_key].view(rows, lanes)
        value = self._storage[self.value_key].view(rows, lanes)
        with torch.no_grad():
            adv, ret = self._ops.gae(ix, reward, value, self._final_value, tail_flags, tail_final,
                                     last_value, gamma, lam, self._next_step)
            if normalize_advantage:
                mask = self._mask()[0]
                count = mask.sum()
                mean = torch.where(mask, adv, 0.0).sum() / count
                var = torch.where(mask, (adv - mean) ** 2, 0.0).sum() / (count - 1).clamp_min(1)
                adv = torch.where(mask, (adv - mean) / (var.sqrt() + NORMALIZE_EPS), 0.0)
            self._returns["advantage"].view(rows, lanes).copy_(adv)
            self._returns["return"].view(rows, lanes).copy_(ret)
        self._returns_ready = True
        return dict(self._returns)

    def _mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([T, N] rows that belong to an episode (not reset rows), [T, N] rows that start one),
        for the full rollout, from the episode index; built once per rollout."""
        if self._flags_cache is None or self._flags_cache[0] != self._total:
            start = self._ix.start
            base = self._total - self._rows  # absolute row of the rollout's first row
            rows = torch.arange(base, self._total, device=self._device)[:, None]
            self._flags_cache = (self._total, start != SENTINEL, start == rows)
        return self._flags_cache[1], self._flags_cache[2]

    # ------------------------------------------------------------------ minibatches
    def _check_epochs(self, what: str, num_minibatches: Any, epochs: Any, units: int, unit: str,
                      seed: Any) -> tuple[int, int, torch.Generator]:
        if not self.full:
            raise ValueError(f"{what}: the rollout holds {self._count} of {self._rows} rows; "
                             f"minibatches are drawn from a full rollout")
        num_minibatches = positive_int(num_minibatches, "num_minibatches")
        epochs = positive_int(epochs, "epochs")
        if units % num_minibatches:
            raise ValueError(f"num_minibatches: expected a divisor of the {units} {unit}, "
                             f"got {num_minibatches}")
        if seed is None:
            gen = self._gen
        else:
            gen = torch.Generator(device=self._device)
            gen.manual_seed(seed_or_fresh(seed))
        return num_minibatches, epochs, gen

    def _leaves(self) -> dict[str, torch.Tensor]:
        """Stored leaves, with the returns once computed: [T, N, *shape] by path."""
        out = dict(self._storage)
        if self._returns_ready:
            out.update(self._returns)
        return out

    def minibatches(self, num_minibatches: int, epochs: int = 1, *,
                    seed: int | None = None) -> Iterator[dict[str, Any]]:
        """Shuffled minibatches of slots for ``epochs`` passes over the full rollout: each epoch
        draws a permutation of the ``T * N`` slots on the device and yields ``num_minibatches``
        batches of ``T * N / num_minibatches`` slots, so every slot appears exactly once per epoch.

        Each batch holds every leaf at ``[S, *leaf_shape]`` (with ``"advantage"`` and
        ``"return"`` once :meth:`compute_returns` ran for this rollout), ``"mask"`` [S] bool
        (False for reset rows: leave them out of the loss) and ``"index"`` [S] int64 (slot
        ``t * N + n``). ``seed`` fixes the permutations; by default they continue the buffer's
        own stream. No host sync.
        """
        units = self._rows * self._lanes
        count, epochs, gen = self._check_epochs("minibatches", num_minibatches, epochs, units, "slots", seed)
        return self._minibatches(count, epochs, gen)

    def _minibatches(self, count: int, epochs: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
        leaves = self._leaves()
        flat = {p: t.view(-1, *t.shape[2:]) for p, t in leaves.items()}
        entries = [(t, 0) for t in flat.values()]
        mask = self._mask()[0].view(-1)
        units = mask.shape[0]
        size = units // count
        for _ in range(epochs):
            perm = torch.randperm(units, generator=gen, device=self._device)
            for m in range(count):
                idx = perm[m * size:(m + 1) * size]
                out: dict[str, Any] = unflatten(dict(zip(flat, self._ops.gather(entries, (idx,)))))
                out["mask"] = mask.index_select(0, idx)
                out["index"] = idx
                yield out

    def sequences(self, num_minibatches: int, epochs: int = 1, *, seed: int | None = None,
                  hidden_key: str | None = None) -> Iterator[dict[str, Any]]:
        """Minibatches of whole lanes for recurrent policies: each epoch draws a permutation of
        the N lanes on the device and yields ``num_minibatches`` batches of ``N /
        num_minibatches`` lanes, each lane's T rows in order.

        Each batch holds every leaf at ``[T, B, *leaf_shape]`` (with ``"advantage"`` and
        ``"return"`` once computed), ``"is_first"`` [T, B] bool (the row starts an episode:
        reset the recurrent state there), ``"mask"`` [T, B] bool (False for reset rows),
        ``"lane"`` [B] int64, and with ``hidden_key`` (the leaf, or subtree of leaves, where the
        recurrent state fed to the policy at each step was stored) ``"initial_hidden"``: that
        state at each lane's first row, ``[B, *leaf_shape]`` (a dict for a subtree, such as an
        LSTM's ``{"h": .., "c": ..}``). Fixed shapes, no host sync.

        A GRU consumes it by running the T rows in order from ``initial_hidden``, zeroing the
        state of every lane where ``is_first`` holds before that row (as the policy's state was
        reset when its episode began); see the README.
        """
        count, epochs, gen = self._check_epochs("sequences", num_minibatches, epochs, self._lanes,
                                                "lanes", seed)
        hidden: list[str] = []
        if hidden_key is not None:
            if not isinstance(hidden_key, str) or not hidden_key:
                raise TypeError(f"hidden_key: expected a leaf name, got {hidden_key!r}")
            hidden = leaves_under(hidden_key, self._specs)
            if not hidden:
                raise ValueError(f"hidden_key: {hidden_key!r} names no leaf of the step "
                                 f"(leaves: {sorted(self._specs)})")
        return self._sequences(count, epochs, gen, hidden_key, hidden)

    def _sequences(self, count: int, epochs: int, gen: torch.Generator, hidden_key: str | None,
                   hidden: list[str]) -> Iterator[dict[str, Any]]:
        leaves = self._leaves()
        mask, is_first = self._mask()
        size = self._lanes // count
        for _ in range(epochs):
            perm = torch.randperm(self._lanes, generator=gen, device=self._device)
            for m in range(count):
                lane = perm[m * size:(m + 1) * size]
                out: dict[str, Any] = unflatten({p: t.index_select(1, lane) for p, t in leaves.items()})
                out["is_first"] = is_first.index_select(1, lane)
                out["mask"] = mask.index_select(1, lane)
                out["lane"] = lane
                if hidden_key is None:
                    pass
                elif hidden == [hidden_key]:
                    out["initial_hidden"] = self._storage[hidden_key][0].index_select(0, lane)
                else:
                    out["initial_hidden"] = unflatten({p[len(hidden_key) + 1:]: self._storage[p][0].index_select(0, lane)
                                                       for p in hidden})
                yield out

