"""Every Triton kernel against its pure-torch reference, exactly, on awkward sizes.

On a machine without a GPU the kernels run under the Triton interpreter (conftest sets
TRITON_INTERPRET=1), which proves results, not speed; with CUDA they run compiled on the GPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gpubuffers import reference as ref

triton = pytest.importorskip("triton")
from gpubuffers.kernels import episode_index, sampling  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = [(last, nxt) for last in (False, True) for nxt in (False, True)]
DONE_PATTERNS = ["none", "all", "random", "alternate"]


def done_at(pattern: str, t: int, lanes: int, g: torch.Generator) -> torch.Tensor:
    if pattern == "none":
        return torch.zeros(lanes, dtype=torch.bool)
    if pattern == "all":  # one-step episodes
        return torch.ones(lanes, dtype=torch.bool)
    if pattern == "alternate":
        return (torch.arange(lanes) + t) % 2 == 0
    return torch.rand(lanes, generator=g) < 0.3


def build(lanes, rows, adds, marks_last, next_step, pattern="random", seed=0, with_flags=True):
    """An index written by the reference, with the done flags used."""
    g = torch.Generator().manual_seed(seed)
    ix = ref.EpisodeIndex.empty(rows, lanes, torch.device(DEVICE))
    for t in range(adds):
        done = done_at(pattern, t, lanes, g).to(DEVICE)
        trunc = (torch.rand(lanes, generator=g) < 0.5).to(DEVICE) if with_flags else None
        reward = torch.randn(lanes, generator=g).to(DEVICE)
        ref.add_step(ix, done, None, trunc, False, reward, marks_last, next_step)
        ref.advance(ix)
    return ix


def carrier_of(t: torch.Tensor) -> torch.dtype:
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def at_offset(ix, offset):
    """Set the Philox cursor of the index's device state (the kernels read it there)."""
    ix.state[ref.layout.STATE_OFFSET] = offset
    return ix


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal element for element; floats bit for bit (so -0.0 != 0.0), NaN wherever the other
    has NaN (a widened NaN's payload is not compared)."""
    if got.dtype.is_floating_point and got.dtype == want.dtype:
        nan = got.isnan()
        if torch.equal(nan, want.isnan()) and torch.equal(
                got.masked_fill(nan, 0).view(carrier_of(got)), want.masked_fill(nan, 0).view(carrier_of(want))):
            return
    elif torch.equal(got, want):
        return
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{what}: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}")
    bad = ((got != want) & ~(got.isnan() & want.isnan()) if got.is_floating_point() else got != want).nonzero()
    if len(bad) == 0:  # equal values, different bits: a signed zero
        bad = (got.view(carrier_of(got)) != want.view(carrier_of(want))).nonzero()
    raise AssertionError(f"{what}: {bad.shape[0]} of {want.numel()} elements differ, first at "
                         f"{bad[0].tolist()}: got {got[tuple(bad[0])]}, want {want[tuple(bad[0])]}")


# N = 1 (single lane), 7, 1023 (just under a block), 4097 (one past four blocks).
@pytest.mark.parametrize("lanes", [1, 7, 1023, 4097])
@pytest.mark.parametrize("marks_last,next_step", MODES)
@pytest.mark.parametrize("pattern", DONE_PATTERNS)
def test_add_step_matches_reference(lanes, marks_last, next_step, pattern):
    rows = 3  # wraps the seam every three adds
    adds = 8 if lanes < 1000 else 5
    g = torch.Generator().manual_seed(lanes)
    want = ref.EpisodeIndex.empty(rows, lanes, torch.device(DEVICE))
    got = copy.deepcopy(want)
    for t in range(adds):
        done = done_at(pattern, t, lanes, g).to(DEVICE)
        term = (torch.rand(lanes, generator=g) < 0.5).to(DEVICE)
        trunc = (torch.rand(lanes, generator=g) < 0.5).to(DEVICE)
        # Every way an add states its ends: done alone; done with truncated (and a stored final
        # obs); terminated and truncated alone (done derived, termination winning where both).
        flags = [(done, None, None, False), (done, None, trunc, True), (None, done & term, done & trunc, t % 2 == 0),
                 (done, term, trunc, False)][t % 4]
        reward = None if t == 3 else torch.randn(lanes, generator=g).to(DEVICE)
        done_in = done.clone()
        e_want = ref.add_step(want, *flags, reward, marks_last, next_step)
        e_got = episode_index.add_step(got.start, got.end_flags, got.ret, got.state, *flags, reward,
                                       marks_last, next_step)
        assert torch.equal(done, done_in)  # inputs untouched
        assert_same(e_got, e_want, f"ended at add {t}")
        if t == 0 and not marks_last:
            assert not e_got.any()  # the first add of first mode closes nothing
        ref.advance(want), ref.advance(got)
        for name in ("start", "end_flags", "ret", "state"):
            assert_same(getattr(got, name), getattr(want, name), f"{name} after add {t}")


# N = 1, 7, 1023, 4097 (a loop of five blocks in the one program); rows = 3 wraps every 3 adds.
@pytest.mark.parametrize("lanes", [1, 7, 1023, 4097])
@pytest.mark.parametrize("marks_last,next_step", MODES)
@pytest.mark.parametrize("pattern", DONE_PATTERNS)
def test_record_ends_matches_reference(lanes, marks_last, next_step, pattern):
    rows, adds = 3, 8 if lanes < 1000 else 5
    g = torch.Generator().manual_seed(lanes + 1)
    ix = ref.EpisodeIndex.empty(rows, lanes, torch.device(DEVICE))
    stats = {k: (torch.zeros(rows, 3, dtype=torch.float64, device=DEVICE),
                 torch.zeros(3, dtype=torch.float64, device=DEVICE)) for k in ("want", "got")}
    for t in range(adds):
        done = done_at(pattern, t, lanes, g).to(DEVICE)
        reward = torch.randn(lanes, generator=g).to(DEVICE)
        ended = ref.add_step(ix, done, None, None, False, reward, marks_last, next_step)
        ref.record_ends(ix, *stats["want"], ended, marks_last)
        episode_index.record_ends(*stats["got"], ix.start, ix.ret, ended, ix.state, marks_last)
        ref.advance(ix)
        for (w, gt), what in zip(zip(stats["want"], stats["got"]), ("stats", "totals")):
            # Counts and lengths exactly; returns are float64 sums in another order.
            assert_same(gt[..., :2], w[..., :2], f"{what} counts and lengths after add {t}")
            assert torch.allclose(gt[..., 2], w[..., 2], rtol=1e-12, atol=1e-9), f"{what} returns after add {t}"


def test_add_step_reads_strided_inputs():
    # done, flags and reward as columns of wider tensors (stride 2), as a user may pass them.
    lanes, rows = 9, 3
    want = ref.EpisodeIndex.empty(rows, lanes, torch.device(DEVICE))
    got = copy.deepcopy(want)
    g = torch.Generator().manual_seed(3)
    for t in range(5):
        done = (torch.rand(lanes, 2, generator=g) < 0.4).to(DEVICE)[:, 0]
        term = (torch.rand(lanes, 2, generator=g) < 0.5).to(DEVICE)[:, 1]
        trunc = (torch.rand(lanes, 2, generator=g) < 0.5).to(DEVICE)[:, 0]
        reward = torch.randn(lanes, 2, generator=g).to(DEVICE)[:, 1]
        assert not reward.is_contiguous() and not trunc.is_contiguous()
        e_want = ref.add_step(want, done, term, trunc, True, reward, True, False)
        e_got = episode_index.add_step(got.start, got.end_flags, got.ret, got.state, done, term, trunc, True,
                                       reward, True, False)
        assert_same(e_got, e_want, "ended")
        ref.advance(want), ref.advance(got)
        for name in ("start", "end_flags", "ret"):
            assert_same(getattr(got, name), getattr(want, name), name)


def test_add_step_rejects_bad_layout():
    ix = ref.EpisodeIndex.empty(3, 4, torch.device(DEVICE))
    with pytest.raises(ValueError, match="done: expected bool"):
        episode_index.add_step(ix.start, ix.end_flags, ix.ret, ix.state, torch.zeros(4, device=DEVICE), None,
                               None, False, None, True, False)
    with pytest.raises(ValueError, match="done, terminated: expected at least one"):
        episode_index.add_step(ix.start, ix.end_flags, ix.ret, ix.state, None, None, None, False, None, True, False)
    with pytest.raises(ValueError, match="state: expected a 1-d int64 tensor"):
        episode_index.add_step(ix.start, ix.end_flags, ix.ret, ix.state.int(), torch.zeros(4, dtype=torch.bool,
                               device=DEVICE), None, None, False, None, True, False)


def seam_cases(rows):
    # The newest row at every position around the seam: before the first wrap, on it, after.
    return sorted({max(2, rows - 2), rows - 1, rows, rows + 1, rows + 2, 2 * rows + 1, 3 * rows})


def with_finals(ix, lanes, rows, final_rows, seed):
    """Fill the final-obs bookkeeping as stored finals would: some ends kept, some dropped."""
    g = torch.Generator().manual_seed(seed)
    ix.final_idx.copy_(torch.randint(0, 3 * final_rows, (rows, lanes), generator=g))
    ix.fin_head.copy_(torch.randint(2 * final_rows, 4 * final_rows, (lanes,), generator=g))
    with_bit = (torch.rand(rows, lanes, generator=g) < 0.7).to(ix.end_flags.device)
    ix.end_flags.copy_(torch.where((ix.end_flags != 0) & with_bit, ix.end_flags | ref.HAS_FINAL, ix.end_flags))


# Final observations are stored only under same_step; 3 side-table rows per lane drop some.
TRANSITION_MODES = [(last, nxt, 0) for last, nxt in MODES] + [(False, False, 3), (True, False, 3)]


@pytest.mark.parametrize("lanes", [1, 7, 1023])
@pytest.mark.parametrize("marks_last,next_step,final_rows", TRANSITION_MODES)
@pytest.mark.parametrize("adds", seam_cases(6))
def test_transition_sampler_matches_reference(lanes, marks_last, next_step, adds, final_rows):
    rows = 6
    ix = build(lanes, rows, adds, marks_last, next_step, seed=adds)
    if final_rows:
        with_finals(ix, lanes, rows, final_rows, seed=adds)
    live = min(adds, rows)
    oldest = adds - live
    batch, tries, seed, offset = 257, (8 if next_step else 1), 1234 + adds, 77 * lanes
    proposals = ref.philox_below(seed, offset, (batch, tries), (live - 1) * lanes, ix.start.device)
    want = ref.transitions(ix, proposals, oldest, next_step, final_rows)
    at_offset(ix, offset)
    got = sampling.transitions(ix.start, ix.end_flags, ix.final_idx, ix.fin_head, ix.state, seed, batch,
                               tries, next_step, final_rows)
    for key in ("slot", "row", "succ", "is_first", "is_last", "terminated", "truncated", "next_valid"):
        assert_same(got[key], want[key], key)
    if next_step:
        assert_same(got["valid"], want["valid"], "valid")
    else:
        assert got["valid"].all()
    if final_rows and lanes == 1023:
        # Every kind of successor drawn: the next row, a kept final obs, a dropped one.
        side = want["succ"] >= rows * lanes
        assert side.any() and (~side).any() and (~want["next_valid"]).any()
        assert want["next_valid"][side].any()


@pytest.mark.parametrize("lanes", [1, 7, 1023])
@pytest.mark.parametrize("marks_last,next_step", MODES)
@pytest.mark.parametrize("length", [1, 2, 5, 6])  # 5 and 6 are longer than most episodes here
@pytest.mark.parametrize("pattern", ["random", "all", "none"])
def test_window_sampler_matches_reference(lanes, marks_last, next_step, length, pattern):
    rows, adds = 6, 17
    ix = build(lanes, rows, adds, marks_last, next_step, pattern=pattern, seed=length)
    live, oldest = rows, adds - rows
    batch, tries, seed, offset = 200, 16, 99, 12345678901
    proposals = ref.philox_below(seed, offset, (batch, tries), (live - length + 1) * lanes, ix.start.device)
    want = ref.windows(ix, proposals, oldest, length)
    got = sampling.windows(ix.start, ix.end_flags, at_offset(ix, offset).state, seed, batch, tries, length)
    for key in ("slots", "is_first", "is_last", "valid"):
        assert_same(got[key], want[key], key)
    if pattern == "all" and not next_step:  # one-step episodes: only single-row windows exist
        assert (length == 1) == bool(want["valid"].all()) and (length > 1) == (not want["valid"].any())


@pytest.mark.parametrize("lanes", [1, 7, 1023])
@pytest.mark.parametrize("marks_last,next_step", MODES)
@pytest.mark.parametrize("adds", [1, 5, 6, 7, 13])
def test_episode_sampler_matches_reference(lanes, marks_last, next_step, adds):
    rows = 6
    ix = build(lanes, rows, adds, marks_last, next_step, seed=adds)
    cum = torch.cumsum(ref.whole_episode_ends(ix), 0)
    batch, seed, offset = 300, 5 + adds, 2**33 + lanes
    draws = ref.philox_below(seed, offset, (batch,), cum[-1], cum.device)
    want = ref.episode_choice(cum, draws)
    got = sampling.episode_ends(cum, at_offset(ix, offset).state, seed, batch)
    assert_same(got[0], want[0], "end slot")
    assert_same(got[1], want[1], "valid")
    if bool(want[1][0]):
        eligible = ref.whole_episode_ends(ix)
        assert eligible[got[0]].all()  # every draw is the end of a whole, finished episode


def test_philox_reference_matches_triton_stream():
    import triton.language as tl

    @triton.jit
    def draws(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        a, b, c, d = tl.randint4x(seed, offset + i.to(tl.int64))
        m = i < n
        tl.store(out_ptr + i * 4 + 0, a.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + i * 4 + 1, b.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + i * 4 + 2, c.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + i * 4 + 3, d.to(tl.int64) & 0xFFFFFFFF, mask=m)

    for seed, offset in [(0, 0), (7, 2**32 - 3), (2**61 + 5, 2**45)]:
        out = torch.zeros(64, 4, dtype=torch.int64, device=DEVICE)
        draws[(1,)](out, seed, offset, 64, BLOCK=64)
        want = torch.stack(ref.philox4x32(seed, torch.arange(64, device=DEVICE) + offset), 1)
        assert_same(out, want, f"philox seed={seed} offset={offset}")


def test_philox_below_is_uniform():
    x = ref.philox_below(3, 0, (200_000,), 10, torch.device("cpu"))
    counts = torch.bincount(x, minlength=10).double()
    assert x.min() >= 0 and x.max() < 10
    assert ((counts - 20_000).abs() < 5 * 20_000 ** 0.5).all()


# ------------------------------------------------------------------------------- fused gather
from gpubuffers.kernels import gather as gather_kernel  # noqa: E402


def leaf_sources(rows_total, g):
    """Leaves of several dtypes and trailing shapes, with identifiable contents."""
    base = torch.arange(rows_total)
    return [
        torch.randn(rows_total, 5, generator=g),                               # float32 [5]
        (base[:, None, None, None] % 251).to(torch.uint8).expand(rows_total, 3, 4, 4).contiguous(),  # uint8 image
        torch.randn(rows_total, 3, generator=g).to(torch.float16),             # float16 [3]
        base.clone(),                                                          # int64 scalar
        (base % 3 == 0),                                                       # bool scalar
    ]


@pytest.mark.parametrize("n_items", [1, 7, 33, 300])
def test_gather_matches_reference(n_items):
    g = torch.Generator().manual_seed(n_items)
    rows_total = 97
    sources = [s.to(DEVICE) for s in leaf_sources(rows_total, g)]
    entries = [(s, 0) for s in sources] + [(sources[0], 1), (sources[1], 1)]
    slots = torch.randint(0, rows_total, (n_items,), generator=g).to(DEVICE)
    succ = (slots + 1) % rows_total
    want = ref.gather(entries, (slots, succ))
    plan = gather_kernel.make_plan(entries)
    before = [s.clone() for s in sources]
    got = gather_kernel.gather(plan, torch.stack([slots, succ]))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
        assert_same(a, b, f"entry {i}")
    assert all(torch.equal(a, b) for a, b in zip(sources, before))  # sources untouched


def mixed_sources(rows_total, g):
    """Leaves whose rows want different word sizes: bool [] (1 byte), uint8 [3, 5] (15 bytes),
    float32 [64] (256), int64 [2] (16), float16 [3] (6), uint16 [1] (2)."""
    return [
        torch.randint(0, 2, (rows_total,), generator=g).bool(),
        torch.randint(0, 256, (rows_total, 3, 5), generator=g).to(torch.uint8),
        torch.randn(rows_total, 64, generator=g),
        torch.randint(-2**62, 2**62, (rows_total, 2), generator=g),
        torch.randn(rows_total, 3, generator=g).to(torch.float16),
        torch.randint(0, 2**16, (rows_total, 1), generator=g).to(torch.uint16),
    ]


def check_gather(entries, slot_sets):
    """Runs one plan over entries and checks every output against the reference, exactly."""
    want = ref.gather(entries, slot_sets)
    plan = gather_kernel.make_plan(entries)
    got = gather_kernel.gather(plan, torch.stack(slot_sets))
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
        assert_same(a, b, f"entry {i} ({b.dtype}{list(b.shape[1:])}, {plan.word_bytes[i]}-byte words)")
    return plan


@pytest.mark.parametrize("n_items", [1, 33, 100])
def test_gather_mixed_word_sizes_matches_reference(n_items):
    # One plan whose entries each move in their own word size; a bool leaf among them must not
    # change what (or how) the float32 and int64 leaves copy.
    g = torch.Generator().manual_seed(1000 + n_items)
    rows_total = 61
    sources = [s.to(DEVICE) for s in mixed_sources(rows_total, g)]
    entries = [(s, 0) for s in sources] + [(s, 1) for s in sources]
    slots = torch.randint(0, rows_total, (n_items,), generator=g).to(DEVICE)
    check_gather(entries, (slots, (slots + 7) % rows_total))


def test_gather_plan_word_size_per_entry():
    sources = [s.to(DEVICE) for s in mixed_sources(5, torch.Generator().manual_seed(0))]
    plan = gather_kernel.make_plan([(s, 0) for s in sources])
    # bool, uint8 [3, 5], float32 [64], int64 [2], float16 [3] (6 bytes), uint16 [1]
    assert plan.word_bytes == [1, 1, 8, 8, 2, 2]
    assert plan.word_tab.tolist() == plan.word_bytes
    assert plan.words.tolist() == [1, 15, 32, 2, 3, 1]


def test_gather_misaligned_source_uses_smaller_word():
    # A float32 [16] source viewed 4 bytes into its buffer: 64-byte rows, but only 4-byte
    # aligned, so it must move in 4-byte words; an int16 [2] one 2 bytes in moves in 2-byte words.
    g = torch.Generator().manual_seed(5)
    rows_total = 23
    raw = torch.randn(rows_total * 16 + 1, generator=g).to(DEVICE)
    shifted = raw[1:].view(rows_total, 16)
    raw16 = torch.randint(-2**15, 2**15, (rows_total * 2 + 1,), generator=g).to(torch.int16).to(DEVICE)
    shifted16 = raw16[1:].view(rows_total, 2)
    assert shifted.data_ptr() % 8 == 4 and shifted16.data_ptr() % 4 == 2
    aligned = torch.randn(rows_total, 16, generator=g).to(DEVICE)
    slots = torch.randint(0, rows_total, (40,), generator=g).to(DEVICE)
    plan = check_gather([(shifted, 0), (shifted16, 0), (aligned, 1)], (slots, (slots + 1) % rows_total))
    assert plan.word_bytes == [4, 2, 8]


def narrow_source(stored, rows_total, g, shape=(3,)):
    """A source of dtype ``stored`` spanning its range (floats: normal values, with inf, -inf,
    NaN, -0.0 and subnormals in the first rows)."""
    if stored.is_floating_point:
        x = (torch.randn(rows_total, *shape, generator=g) * 100).to(stored)
        special = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 1e-40, 6e-8], dtype=torch.float64)
        x.view(-1)[:special.numel()] = special.to(stored)
        return x
    info = torch.iinfo(stored)
    return torch.randint(info.min, info.max + 1, (rows_total, *shape), generator=g).to(stored)


@pytest.mark.parametrize("pair", gather_kernel.CONVERSIONS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_gather_widens_every_conversion_as_the_reference(pair):
    # Each allowed (stored, returned) pair widened inside the launch equals index_select +
    # .to() bit for bit (NaN payloads aside: NaN stays NaN), beside plain entries.
    stored, returned = pair
    g = torch.Generator().manual_seed(CONVERSION_SEEDS[pair])
    rows_total = 29
    narrow = narrow_source(stored, rows_total, g).to(DEVICE)
    odd = narrow_source(stored, rows_total, g, shape=(5, 1)).to(DEVICE)  # rows of 5 elements
    plain = torch.randn(rows_total, 4, generator=g).to(DEVICE)
    slots = torch.randint(0, rows_total, (37,), generator=g).to(DEVICE)
    slots[:6] = torch.arange(6)  # the special values
    entries = [(narrow, 0, returned), (plain, 0), (odd, 1, returned), (narrow, 1)]
    plan = check_gather(entries, (slots, (slots + 3) % rows_total))
    kind = gather_kernel.CONVERSIONS.index(pair) + 1
    assert plan.word_bytes[0] == plan.word_bytes[2] == -kind and plan.kinds == 1 << kind
    assert plan.word_bytes[1] > 0 and plan.word_bytes[3] > 0


CONVERSION_SEEDS = {p: 300 + i for i, p in enumerate(gather_kernel.CONVERSIONS)}


def test_gather_several_conversions_in_one_plan():
    g = torch.Generator().manual_seed(77)
    rows_total = 31
    entries = [(narrow_source(a, rows_total, g, (2, 3)).to(DEVICE), i % 2, b)
               for i, (a, b) in enumerate(gather_kernel.CONVERSIONS)]
    entries.append((torch.randint(0, 2, (rows_total,), generator=g).bool().to(DEVICE), 0))
    slots = torch.randint(0, rows_total, (70,), generator=g).to(DEVICE)
    plan = check_gather(entries, (slots, (slots * 5 + 1) % rows_total))
    assert plan.kinds == sum(1 << k for k in range(1, len(gather_kernel.CONVERSIONS) + 1))


def test_gather_plan_refuses_a_narrowing_read():
    src = torch.zeros(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="no conversion from torch.float32 to torch.float16"):
        gather_kernel.make_plan([(src, 0, torch.float16)])


def test_gather_plan_rejects_non_contiguous_sources():
    src = torch.zeros(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        gather_kernel.make_plan([(src.t(), 0)])
