"""The dispatch point: both backends define every op by name; nothing falls back silently."""

from __future__ import annotations

import pytest

from gpubuffers import ops, reference


def test_reference_defines_every_op():
    for name in ops.OPS:
        assert callable(getattr(reference, name)), name


def test_triton_backend_defines_every_op_itself():
    pytest.importorskip("triton")
    backend = ops.TritonOps()
    assert not hasattr(ops.TritonOps, "__getattr__")
    for name in ops.OPS:
        fn = getattr(backend, name)
        if name in ops.TORCH_ON_TRITON:
            assert fn is getattr(reference, name), name  # listed as pure torch, and it is
        else:
            assert fn is not getattr(reference, name) and callable(fn), name
    with pytest.raises(AttributeError):
        backend.transition_links  # a reference helper the buffer must not reach through triton
