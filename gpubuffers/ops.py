"""The dispatch point: the one module through which the buffer reaches its hot operations.

``backend(device)`` returns the module implementing the ops for tensors on ``device``.
Every backend exposes the functions of :mod:`gpubuffers.reference` with the same
signatures, so the buffer and the samplers read the same whichever backend runs. Only this
module may import ``gpubuffers.kernels``; importing it never imports triton.
"""

from __future__ import annotations

import os

import torch

from . import reference

BACKENDS = ("torch",)


def backend_name(device: torch.device) -> str:
    """Name of the backend used for tensors on ``device`` (``GPUBUFFERS_BACKEND`` forces one)."""
    forced = os.environ.get("GPUBUFFERS_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"GPUBUFFERS_BACKEND: expected one of {BACKENDS}, got {forced!r}")
    return "torch"


def backend(device: torch.device):
    """The module implementing the hot operations for ``device``."""
    backend_name(device)
    return reference
