"""The dispatch point: the one module through which the buffer reaches its hot operations.

``backend(device, name)`` returns the ops for tensors on ``device``: the Triton kernels for CUDA
tensors when triton is importable, the pure-torch reference otherwise. ``GPUBUFFERS_BACKEND=
torch|triton`` (or the buffer's ``backend`` argument) forces one; forcing triton on CPU tensors
runs the kernels under the Triton interpreter, which needs ``TRITON_INTERPRET=1`` in the
environment before triton is first imported. Both backends expose the same functions with the
same signatures, so the buffer reads the same whichever runs. Only this module imports
``gpubuffers.kernels``, and only when a Triton backend is first asked for: importing
gpubuffers never imports triton.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from . import reference
from .layout import STATE_OFFSET

BACKENDS = ("torch", "triton")


@dataclass
class Rng:
    """A buffer's randomness: a torch generator for the reference backend, and the seed of a
    counter-based Philox stream for in-kernel draws, whose offset is a device cursor
    (``EpisodeIndex.state``) that the Triton samplers advance; ``offset`` is its host copy, kept
    for checks and never read back from the device."""

    generator: torch.Generator
    seed: int
    offset: int = 0


def backend_name(device: torch.device, name: str | None = None) -> str:
    """The backend used for tensors on ``device``: ``name``, else ``GPUBUFFERS_BACKEND``, else
    triton for CUDA tensors when triton is importable, else torch."""
    where = "backend"
    if name is None:
        name = os.environ.get("GPUBUFFERS_BACKEND", "").strip().lower() or None
        where = "GPUBUFFERS_BACKEND"
    if name is None:
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return "triton"
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"{where}: expected one of {BACKENDS}, got {name!r}")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError(f"{where}: 'triton' asked for, but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{where}: 'triton' on {device.type} tensors runs under the Triton "
                             f"interpreter: set TRITON_INTERPRET=1 before triton is imported")
    return name


def backend(device: torch.device, name: str | None = None):
    """The ops for tensors on ``device`` (see :func:`backend_name`)."""
    if backend_name(device, name) == "triton":
        return TritonOps()
    return reference


#: Every op a backend offers the buffer; both backends define each of them.
OPS = ("add_step", "record_ends", "store_finals", "advance", "sample_transitions", "nstep",
       "sample_windows", "sample_episode_ends", "whole_episode_ends", "pack_episodes", "gather",
       "promote", "update_priorities", "sample_prioritized_transitions", "sample_prioritized_windows",
       "gae")

#: The ops that stay pure torch on the Triton backend (sync-free on CUDA, and graph-safe: they
#: read the cursors from the device): small reductions and index arithmetic.
TORCH_ON_TRITON = ("advance", "whole_episode_ends", "pack_episodes")


class TritonOps:
    """The Triton backend: a kernel for every op but those of :data:`TORCH_ON_TRITON`, which
    run the reference. Adapts the buffer's index and randomness to the kernels' tensor-and-size
    launchers. Every op is defined here by name: there is no silent fallback."""

    name = "triton"
    advance = staticmethod(reference.advance)
    whole_episode_ends = staticmethod(reference.whole_episode_ends)
    pack_episodes = staticmethod(reference.pack_episodes)

    def __init__(self) -> None:
        from .kernels import episode_index, finals, gather, priority, returns, sampling

        self._priority = priority
        self._returns = returns
        self._episode_index = episode_index
        self._finals = finals
        self._sampling = sampling
        self._gather = gather
        self._plans: dict = {}

    def add_step(self, ix, done, terminated, truncated, has_final, reward, marks_last, next_step):
        return self._episode_index.add_step(ix.start, ix.end_flags, ix.ret, ix.state, done, terminated,
                                            truncated, has_final, reward, marks_last, next_step)

    def record_ends(self, ix, stats, totals, ended, marks_last):
        self._episode_index.record_ends(stats, totals, ix.start, ix.ret, ended, ix.state, marks_last)

    def store_finals(self, ix, ended, marks_last, final_rows, sides, values):
        self._finals.store_finals(ix.final_idx, ix.fin_head, ix.state, ended, marks_last, final_rows,
                                  sides, values)

    @staticmethod
    def _drew(ix, rng: Rng, count: int) -> None:
        """Advance the Philox offset past a launch's draws: on the device, where the next launch
        reads it (also inside a CUDA graph), and its host copy."""
        ix.state[STATE_OFFSET:STATE_OFFSET + 1].add_(count)
        rng.offset += count

    def sample_transitions(self, ix, rng: Rng, batch, tries, next_step, final_rows, links=True):
        # The kernel forms the links in the same launch either way.
        out = self._sampling.transitions(ix.start, ix.end_flags, ix.final_idx, ix.fin_head, ix.state,
                                         rng.seed, batch, tries, next_step, final_rows)
        self._drew(ix, rng, batch * tries)
        if not next_step:
            out["valid"] = None
        return out

    def nstep(self, ix, slot, row, reward, n_step, gamma, final_rows, next_step):
        return self._returns.nstep(ix.start, ix.end_flags, ix.final_idx, ix.fin_head, ix.state, slot, row, reward, n_step,
                                   gamma, final_rows, next_step)

    def gae(self, ix, reward, value, final_value, tail_flags, tail_final, last_value, gamma, lam, next_step):
        return self._returns.gae(ix.start, ix.end_flags, reward, value, final_value, tail_flags, tail_final,
                                 last_value, gamma, lam, next_step)

    def sample_windows(self, ix, rng: Rng, batch, tries, length):
        out = self._sampling.windows(ix.start, ix.end_flags, ix.state, rng.seed, batch, tries, length)
        self._drew(ix, rng, batch * tries)
        return out

    def gather(self, entries, slot_sets):
        key = tuple((e[0].data_ptr(), tuple(e[0].shape), e[0].dtype, *e[1:]) for e in entries)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._gather.make_plan(list(entries))
        shape = slot_sets[0].shape
        sets = torch.stack([s.reshape(-1) for s in slot_sets])
        out = self._gather.gather(plan, sets)
        return [o.view(*shape, *o.shape[1:]) for o in out]

    def sample_episode_ends(self, ix, cum, rng: Rng, batch):
        out = self._sampling.episode_ends(cum, ix.state, rng.seed, batch)
        self._drew(ix, rng, batch)
        return out

    def promote(self, ix, tree):
        self._priority.promote(ix.start, ix.state, tree)

    def update_priorities(self, ix, tree, index, priority):
        self._priority.update_priorities(ix.start, ix.state, tree, index, priority)

    def sample_prioritized_transitions(self, ix, tree, rng: Rng, batch, next_step, final_rows, beta, links=True):
        out = self._priority.transitions(ix.start, ix.end_flags, ix.final_idx, ix.fin_head, ix.state, tree,
                                         rng.seed, batch, next_step, final_rows, beta)
        self._drew(ix, rng, batch)
        return out

    def sample_prioritized_windows(self, ix, tree, rng: Rng, batch, tries, length, beta):
        out = self._priority.windows(ix.start, ix.end_flags, ix.state, tree, rng.seed, batch, tries, length, beta)
        self._drew(ix, rng, batch * tries)
        return out
