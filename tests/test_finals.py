"""The final-observation kernel against its pure-torch reference, exactly.

The reference writes the rows of lanes whose episode did not end to the scratch row; the kernel
writes ended lanes only. Everything but the scratch row must match bit for bit, and the kernel
must leave every row of a non-ended lane alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gpubuffers import layout
from gpubuffers import reference as ref
from gpubuffers.specs import carrier

triton = pytest.importorskip("triton")
from gpubuffers.kernels import finals  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = 4  # ring rows of the episode index; end rows cycle through them and wrap
# (dtype, per-lane shape)
LEAVES = [(torch.float32, (3,)), (torch.uint8, (2, 3)), (torch.bool, ()), (torch.uint16, (1,)),
          (torch.float16, (3,)), (torch.int64, ())]


def done_at(pattern: str, lanes: int, g: torch.Generator) -> torch.Tensor:
    if pattern == "none":
        return torch.zeros(lanes, dtype=torch.bool)
    if pattern == "all":
        return torch.ones(lanes, dtype=torch.bool)
    return torch.rand(lanes, generator=g) < 0.3


def random_values(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random bits of ``dtype`` (every bit pattern a float can hold, NaNs included, must copy)."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
        return torch.randint(-(1 << 62), 1 << 62, shape, generator=g).to(bits).view(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(1 << 62)), min(info.max, 1 << 62)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit-exact: floats and bools are compared through a same-size integer view (NaN != NaN)."""
    if got.dtype == torch.bool or got.dtype.is_floating_point:
        got, want = carrier(got), carrier(want)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        raise AssertionError(f"{what}: {bad.shape[0]} of {want.numel()} elements differ, first at "
                             f"{bad[0].tolist()}: got {got[tuple(bad[0])]}, want {want[tuple(bad[0])]}")


def run_both(lanes, final_rows, adds, pattern, leaves, seed=0, strided=False):
    """Replay ``adds`` adds through the reference and the kernel from the same state, checking
    after each add."""
    g = torch.Generator().manual_seed(seed)
    want = ref.EpisodeIndex.empty(ROWS, lanes, torch.device(DEVICE))
    want.final_idx.copy_(torch.randint(0, 100, (ROWS, lanes), generator=g))
    got = copy.deepcopy(want)
    sides_want = [random_values(dt, (final_rows + 1, lanes, *shape), g).to(DEVICE) for dt, shape in leaves]
    sides_got = [s.clone() for s in sides_want]
    scratch = layout.scratch_row(final_rows)
    for t in range(adds):
        ended = done_at(pattern, lanes, g).to(DEVICE)
        values = []
        for dt, shape in leaves:
            v = random_values(dt, (lanes, *shape), g).to(DEVICE)
            if strided:  # a column slice of a wider tensor
                wide = random_values(dt, (lanes, 3, *shape), g).to(DEVICE)
                wide[:, 1] = v
                v = wide[:, 1]
                assert not v.is_contiguous()
            values.append(v)
        kept = [v.clone() for v in values]
        # The end row comes from the device cursor: the add's row (marks_last) or the one before.
        adds, marks_last = 3 * t, t % 2 == 1
        want.state[layout.STATE_ADDS] = got.state[layout.STATE_ADDS] = adds
        ref.store_finals(want, ended, marks_last, final_rows, sides_want, values)
        finals.store_finals(got.final_idx, got.fin_head, got.state, ended, marks_last, final_rows,
                            sides_got, values)
        assert got.state.tolist() == want.state.tolist() == [adds, 0, 0, 0]  # cursors are not advanced
        for v, k in zip(values, kept):
            assert_same(v, k, "input")  # inputs untouched
        assert_same(got.final_idx, want.final_idx, f"final_idx after add {t}")
        assert_same(got.fin_head, want.fin_head, f"fin_head after add {t}")
        for i, (a, b) in enumerate(zip(sides_got, sides_want)):
            assert_same(a[:scratch], b[:scratch], f"side {i} {a.dtype} after add {t}")


@pytest.mark.parametrize("lanes", [1, 7, 1023, 4097])
@pytest.mark.parametrize("final_rows", [2, 5])
@pytest.mark.parametrize("pattern", ["none", "all", "random"])
def test_store_finals_matches_reference(lanes, final_rows, pattern):
    # final_rows + 2 adds or more wrap the side table when every lane ends every add.
    run_both(lanes, final_rows, 7 if lanes < 1000 else final_rows + 2, pattern, LEAVES, seed=lanes + final_rows)


@pytest.mark.parametrize("dtype,shape", LEAVES + [(torch.uint32, (2,)), (torch.uint64, ()),
                                                  (torch.int8, (5,)), (torch.bfloat16, (3,))])
def test_store_finals_every_dtype_alone(dtype, shape):
    # One leaf per call: the word size follows the leaf's row bytes (1, 2, 4 or 8 bytes).
    run_both(7, 2, 5, "random", [(dtype, shape)], seed=3)


@pytest.mark.parametrize("lanes", [7, 1023])
def test_store_finals_strided_values(lanes):
    run_both(lanes, 2, 5, "random", LEAVES, seed=11, strided=True)


def test_store_finals_bookkeeping_only():
    run_both(7, 3, 5, "random", [], seed=5)


def test_word_size_follows_row_bytes_and_alignment():
    side = torch.zeros(3, 4, 6, dtype=torch.uint8)
    assert finals.word_bytes(6, side, side) == 2
    assert finals.word_bytes(24, side, side) == 8
    assert finals.word_bytes(24, side, side.view(-1)[4:]) == 4
    assert finals.word_bytes(24, side, side.view(-1)[1:]) == 1


@pytest.mark.parametrize("lanes", [7, 4097])
def test_store_finals_leaves_other_lanes_untouched(lanes):
    g = torch.Generator().manual_seed(1)
    final_rows = 3
    ix = ref.EpisodeIndex.empty(ROWS, lanes, torch.device(DEVICE))
    leaves = [(torch.float32, (3,)), (torch.uint8, (2, 3)), (torch.bool, ())]
    markers = [torch.full((final_rows + 1, lanes, *shape), m, dtype=dt, device=DEVICE)
               for (dt, shape), m in zip(leaves, (-7.5, 0xA5, True))]
    sides = [m.clone() for m in markers]
    touched = torch.zeros(final_rows + 1, lanes, dtype=torch.bool)
    head = torch.zeros(lanes, dtype=torch.int64)
    for t in range(4):
        ended = torch.rand(lanes, generator=g) < 0.2
        if t == 0:
            ended[:] = False  # nothing ends: nothing written
        elif t == 1:
            ended[:] = False  # one lane of the last block ends: the other blocks skip their copy
            ended[-1] = True
        values = [torch.zeros((lanes, *shape), dtype=dt, device=DEVICE) for dt, shape in leaves]
        ix.state[layout.STATE_ADDS] = t
        finals.store_finals(ix.final_idx, ix.fin_head, ix.state, ended.to(DEVICE), True, final_rows, sides,
                            values)
        lane = ended.nonzero().flatten()
        touched[head[lane] % final_rows, lane] = True
        head += ended
        for s, m in zip(sides, markers):
            kept = ~touched.to(DEVICE)
            assert torch.equal(s[kept], m[kept]), f"a non-ended lane's row was written at add {t}"
            assert torch.equal(s[touched.to(DEVICE)], torch.zeros_like(m[touched.to(DEVICE)]))
    assert not touched[layout.scratch_row(final_rows)].any()
    assert torch.equal(ix.fin_head.cpu(), head)


def test_triton_ops_dispatches_the_kernel():
    from gpubuffers import ops

    assert "store_finals" in ops.OPS and "store_finals" not in ops.TORCH_ON_TRITON
    assert "store_finals" in vars(ops.TritonOps) and not isinstance(vars(ops.TritonOps)["store_finals"], staticmethod)
    lanes, final_rows = 5, 2
    ix = ref.EpisodeIndex.empty(ROWS, lanes, torch.device(DEVICE))
    side = torch.zeros(final_rows + 1, lanes, 2, device=DEVICE)
    ended = torch.tensor([True, False, True, False, False], device=DEVICE)
    value = torch.arange(lanes * 2, dtype=torch.float32, device=DEVICE).view(lanes, 2) + 1
    ix.state[layout.STATE_ADDS] = 6  # ends at ring row 6 % ROWS - 1 = 1 (marks_last False)
    ix.fin_head.fill_(3)
    ops.TritonOps().store_finals(ix, ended, False, final_rows, [side], [value])
    assert ix.fin_head.tolist() == [4, 3, 4, 3, 3]
    assert ix.final_idx[1].tolist() == [3] * lanes and ix.final_idx[[0, 2, 3]].eq(0).all()
    # Side-table row 3 % 2 = 1 of lanes 0 and 2, nothing else.
    want = torch.zeros_like(side)
    want[1, [0, 2]] = value[[0, 2]]
    assert torch.equal(side, want)
