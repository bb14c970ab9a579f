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


def raw_state(buf, scratch=True):
    """Every byte the buffer holds (whole rings and side tables, index, statistics, tree,
    generator) and its host counters; without ``scratch``, not the side tables' scratch row nor
    the tree's spare leaf (where updates that do not apply write), which nothing reads and a
    checkpoint does not carry."""
    out = {"counters": (buf.num_adds, buf._rng.offset if buf._rng else None, buf._episode_rows)}
    if buf._ix is None:
        return out
    cut = 0 if scratch or not buf._final else buf._lanes  # the scratch row ends each allocation
    tensors = {f"src/{k}": v[:v.shape[0] - cut] for k, v in buf._next_src.items()}
    tensors.update({f"storage/{k}": v for k, v in buf._storage.items()})
    tensors.update({f"ix/{k}": v for k, v in vars(buf._ix).items() if isinstance(v, torch.Tensor)})
    tensors.update({"stats/rows": buf._row_stats, "stats/totals": buf._stat_totals,
                    "gen": buf._rng.generator.get_state()})
    if buf._tree is not None:
        tensors.update({f"tree/{k}": getattr(buf._tree, k) for k in ("leaf", "sums", "mins", "maxp")})
        if not scratch:
            tensors["tree/leaf"] = tensors["tree/leaf"][:-1]
    out.update({k: v.detach().clone().reshape(-1).view(torch.uint8) for k, v in tensors.items()})
    return out


def same_raw(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "counters":
            assert a[k] == b[k]
        else:
            assert torch.equal(a[k], b[k]), k
