"""Comparing nested outputs (dicts and lists of tensors) exactly."""

from __future__ import annotations

import os

import pytest
import torch

#: Triton kernels run under the interpreter (CPU): correct, but one program instance at a time.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreted_slow(*values):
    """A parametrization that runs in the default test run on a GPU and only under ``-m slow``
    where the kernels are interpreted (the cases kept in the default run cover the same kernels)."""
    return pytest.param(*values, marks=[pytest.mark.slow] if INTERPRETED else [])


def flat(x, prefix=""):
    """(path, tensor) pairs of a nested dict / list of tensors."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from flat(v, f"{prefix}{k}/")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from flat(v, f"{prefix}{i}/")
    else:
        yield prefix, x


def assert_identical(a, b):
    """Same paths, dtypes and shapes, and the same bytes (so NaN equals NaN, -0.0 differs
    from 0.0)."""
    fa, fb = dict(flat(a)), dict(flat(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k], fb[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k
