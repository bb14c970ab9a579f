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

BACKENDS = ("torch", "triton")


@dataclass
class Rng:
    """A buffer's randomness: a torch generator for the reference backend, and the (seed,
    offset) of a counter-based Philox stream for in-kernel draws; ``offset`` advances on the
    host by the number of draws a call makes, never read back from the device."""

    generator: torch.Generator
    seed: int
    offset: int = 0

    def advance(self, count: int) -> int:
        offset = self.offset
        self.offset += count
        return offset


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


class TritonOps:
    """Triton kernels where they exist; the reference (pure torch, sync-free on CUDA) for the
    rest. Adapts the buffer's index and randomness to the kernels' tensor-and-size launchers."""

    name = "triton"

    def __init__(self) -> None:
        from .kernels import episode_index, gather, sampling

        self._episode_index = episode_index
        self._sampling = sampling
        self._gather = gather
        self._plans: dict = {}

    def __getattr__(self, attr: str):
        return getattr(reference, attr)

    def add_step(self, ix, done, flags, reward, abs_row, marks_last, next_step):
        return self._episode_index.add_step(ix.start, ix.end_flags, ix.ret, done, flags, reward,
                                            abs_row, marks_last, next_step)

    def sample_transitions(self, ix, rng: Rng, batch, tries, oldest, live, next_step, final_rows):
        offset = rng.advance(batch * tries)
        out = self._sampling.transitions(ix.start, ix.end_flags, ix.final_idx, ix.fin_head, rng.seed,
                                         offset, batch, tries, oldest, live, next_step, final_rows)
        if not next_step:
            out["valid"] = None
        return out

    def sample_windows(self, ix, rng: Rng, batch, tries, oldest, live, length):
        offset = rng.advance(batch * tries)
        return self._sampling.windows(ix.start, ix.end_flags, rng.seed, offset, batch, tries, oldest,
                                      live, length)

    def gather(self, entries, slot_sets):
        key = tuple((s.data_ptr(), tuple(s.shape), s.dtype, k) for s, k in entries)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._gather.make_plan(list(entries))
        shape = slot_sets[0].shape
        sets = torch.stack([s.reshape(-1) for s in slot_sets])
        out = self._gather.gather(plan, sets)
        return [o.view(*shape, *o.shape[1:]) for o in out]

    def sample_episode_ends(self, cum, rng: Rng, batch):
        return self._sampling.episode_ends(cum, rng.seed, rng.advance(batch), batch)
