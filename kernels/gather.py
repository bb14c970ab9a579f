"""Fused gather: one launch copies every leaf of a batch of slots into one output block.

Each entry is one leaf storage ``[rows, *leaf_shape]`` read at one of several slot sets (the
sampled slots, or their successors for the ``next`` leaves, whose sources extend past the ring
into the final-observation side table). Leaves of any dtype and trailing shape are moved as
machine words, each entry in the widest word (8, 4, 2 or 1 bytes) that divides its row size
and its source's address, so one bool leaf does not drag a float32 observation down to byte
copies; an entry stored narrower than it is returned (``storage_dtypes``) is widened element
by element in the same launch (:data:`CONVERSIONS`); outputs are contiguous views into one
preallocated block. The tables of source
addresses, sizes and word widths are built once per layout and stay on the device, so a launch
reads nothing from the host but scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_ITEMS = 32
BLOCK_WORDS = 64


#: (stored dtype, returned dtype) pairs the gather widens in the kernel: every narrowing that
#: ``storage_dtypes`` allows, read back. Entry k of the list is conversion kind k + 1.
CONVERSIONS = [
    (torch.float32, torch.float64), (torch.bfloat16, torch.float64), (torch.float16, torch.float64),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
    (torch.int32, torch.int64), (torch.int16, torch.int64), (torch.int8, torch.int64), (torch.uint8, torch.int64),
    (torch.int16, torch.int32), (torch.int8, torch.int32), (torch.uint8, torch.int32),
    (torch.int8, torch.int16), (torch.uint8, torch.int16),
]


@triton.jit
def _copy_rows(src, slot, dst, items, in_range, words,
               SRC: tl.constexpr, SRC_BYTES: tl.constexpr, DST: tl.constexpr, DST_BYTES: tl.constexpr,
               BW: tl.constexpr, BF16: tl.constexpr = False):
    """src, slot, items, in_range: [BI]. Copies, for each item in range, row ``slot`` of the
    entry's source (at byte address ``src``) to row ``item`` of its output region (at byte
    address ``dst``), ``words`` elements per row, read as SRC (SRC_BYTES bytes) and written as
    DST (DST_BYTES bytes): a plain copy of machine words when they are the same, else a
    widening conversion. BF16: the source holds bfloat16 read as int16 bits, widened exactly by
    placing them in the high half of a float32 (subnormals kept)."""
    for w0 in range(0, words, BW):
        w = w0 + tl.arange(0, BW)
        mask = in_range[:, None] & (w < words)[None, :]
        src_addr = src[:, None] + (slot[:, None] * words + w[None, :]) * SRC_BYTES
        value = tl.load(src_addr.to(tl.pointer_type(SRC)), mask=mask)
        if BF16:
            value = (value.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        dst_addr = dst + (items[:, None].to(tl.int64) * words + w[None, :]) * DST_BYTES
        tl.store(dst_addr.to(tl.pointer_type(DST)), value.to(DST), mask=mask)


@triton.jit
def _widen(wbytes, K: tl.constexpr, KINDS: tl.constexpr, src, slot, dst, items, in_range, words,
           SRC: tl.constexpr, SRC_BYTES: tl.constexpr, DST: tl.constexpr, DST_BYTES: tl.constexpr,
           BW: tl.constexpr, BF16: tl.constexpr = False):
    """The copy of an entry widened by conversion kind K (``wbytes == -K``), compiled in only
    when the plan has such an entry (bit K of KINDS)."""
    if (KINDS >> K) & 1:
        if wbytes == -K:
            _copy_rows(src, slot, dst, items, in_range, words, SRC, SRC_BYTES, DST, DST_BYTES, BW, BF16)


@triton.jit(do_not_specialize=["n_items"])
def _gather_kernel(
    dst_base,                                                   # output block address (bytes)
    src_tab, words_tab, word_tab, dst_tab, set_tab,             # per-entry tables [E]
    slots_ptr,                                                  # [S, n] slot sets
    n_items,
    HAS_W8: tl.constexpr, HAS_W4: tl.constexpr, HAS_W2: tl.constexpr, HAS_W1: tl.constexpr,
    KINDS: tl.constexpr, BI: tl.constexpr, BW: tl.constexpr,
):
    entry = tl.program_id(1)
    items = tl.program_id(0) * BI + tl.arange(0, BI)
    in_range = items < n_items
    words = tl.load(words_tab + entry)
    wbytes = tl.load(word_tab + entry)
    src = tl.load(src_tab + entry)
    which = tl.load(set_tab + entry)
    slot = tl.load(slots_ptr + which * n_items + items, mask=in_range, other=0)
    base = tl.zeros([BI], tl.int64) + src
    dst = dst_base + tl.load(dst_tab + entry) * n_items
    # The word size varies by entry, so each program branches (uniformly: one entry per
    # program) to the copy through a pointer of its width. The HAS_W* flags leave out the
    # widths the plan never uses: a plan of one width compiles to a single copy loop.
    # An entry widened on the way out has ``wbytes`` = -(its conversion kind); KINDS has bit k
    # set when kind k occurs, so a plan without conversions compiles none of them.
    if HAS_W8:
        if wbytes == 8:
            _copy_rows(base, slot, dst, items, in_range, words, tl.int64, 8, tl.int64, 8, BW)
    if HAS_W4:
        if wbytes == 4:
            _copy_rows(base, slot, dst, items, in_range, words, tl.int32, 4, tl.int32, 4, BW)
    if HAS_W2:
        if wbytes == 2:
            _copy_rows(base, slot, dst, items, in_range, words, tl.int16, 2, tl.int16, 2, BW)
    if HAS_W1:
        if wbytes == 1:
            _copy_rows(base, slot, dst, items, in_range, words, tl.int8, 1, tl.int8, 1, BW)
    _widen(wbytes, 1, KINDS, base, slot, dst, items, in_range, words, tl.float32, 4, tl.float64, 8, BW)
    _widen(wbytes, 2, KINDS, base, slot, dst, items, in_range, words, tl.int16, 2, tl.float64, 8, BW, True)
    _widen(wbytes, 3, KINDS, base, slot, dst, items, in_range, words, tl.float16, 2, tl.float64, 8, BW)
    _widen(wbytes, 4, KINDS, base, slot, dst, items, in_range, words, tl.int16, 2, tl.float32, 4, BW, True)
    _widen(wbytes, 5, KINDS, base, slot, dst, items, in_range, words, tl.float16, 2, tl.float32, 4, BW)
    _widen(wbytes, 6, KINDS, base, slot, dst, items, in_range, words, tl.int32, 4, tl.int64, 8, BW)
    _widen(wbytes, 7, KINDS, base, slot, dst, items, in_range, words, tl.int16, 2, tl.int64, 8, BW)
    _widen(wbytes, 8, KINDS, base, slot, dst, items, in_range, words, tl.int8, 1, tl.int64, 8, BW)
    _widen(wbytes, 9, KINDS, base, slot, dst, items, in_range, words, tl.uint8, 1, tl.int64, 8, BW)
    _widen(wbytes, 10, KINDS, base, slot, dst, items, in_range, words, tl.int16, 2, tl.int32, 4, BW)
    _widen(wbytes, 11, KINDS, base, slot, dst, items, in_range, words, tl.int8, 1, tl.int32, 4, BW)
    _widen(wbytes, 12, KINDS, base, slot, dst, items, in_range, words, tl.uint8, 1, tl.int32, 4, BW)
    _widen(wbytes, 13, KINDS, base, slot, dst, items, in_range, words, tl.int8, 1, tl.int16, 2, BW)
    _widen(wbytes, 14, KINDS, base, slot, dst, items, in_range, words, tl.uint8, 1, tl.int16, 2, BW)


@dataclass
class GatherPlan:
    """Device tables for one layout of sources (see :func:`make_plan`)."""

    src: torch.Tensor
    words: torch.Tensor
    word_tab: torch.Tensor
    dst: torch.Tensor
    sets: torch.Tensor
    word_bytes: list[int]           # per entry: the width it is copied in (8, 4, 2 or 1 bytes),
    #                                 or -k for an entry widened by conversion kind k
    kinds: int                      # bit k set when some entry is widened by conversion kind k
    nbytes: list[int]               # per entry: bytes of one output row
    offsets: list[int]
    views: list[tuple[torch.dtype, tuple[int, ...]]]
    device: torch.device


def make_plan(entries: list[tuple]) -> GatherPlan:
    """entries: (source [rows, *shape] contiguous, slot set index) or (source, slot set index,
    dtype returned) for a source stored narrower (a pair of :data:`CONVERSIONS`). Built once per
    layout: it copies small tables to the device."""
    if not entries:
        raise ValueError("entries: expected at least one source")
    entries = [(e[0], e[1], e[2] if len(e) > 2 else e[0].dtype) for e in entries]
    device = entries[0][0].device
    nbytes, elems = [], []
    for src, _, out in entries:
        if not src.is_contiguous():
            raise ValueError("entries: sources must be contiguous")
        if out != src.dtype and (src.dtype, out) not in CONVERSIONS:
            raise ValueError(f"entries: no conversion from {src.dtype} to {out} (allowed: {CONVERSIONS})")
        elems.append(math.prod(src.shape[1:]))
        nbytes.append(elems[-1] * out.itemsize)
    # Per entry, the widest word that tiles its rows and is aligned at its source: row r starts
    # at data_ptr + r * n, so w must divide both. (The output side is 16-byte aligned.) A
    # widened entry moves element by element instead.
    word = [-(CONVERSIONS.index((s.dtype, out)) + 1) if out != s.dtype else
            next(w for w in (8, 4, 2, 1) if n % w == 0 and s.data_ptr() % w == 0)
            for n, (s, _, out) in zip(nbytes, entries)]
    # Each entry's region starts at offset * n bytes; 16-byte aligned offsets keep every output
    # view aligned for its dtype whatever n is.
    offsets, acc = [], 0
    for n in nbytes:
        offsets.append(acc)
        acc += -(-n // 16) * 16

    def table(values):
        return torch.tensor(values, dtype=torch.int64).to(device)

    return GatherPlan(
        src=table([s.data_ptr() for s, _, _ in entries]),
        words=table([n // w if w > 0 else e for n, w, e in zip(nbytes, word, elems)]),
        word_tab=table(word),
        dst=table(offsets),
        sets=table([k for _, k, _ in entries]),
        word_bytes=word,
        kinds=sum(1 << -w for w in set(word) if w < 0),
        nbytes=nbytes,
        offsets=offsets,
        views=[(out, tuple(s.shape[1:])) for s, _, out in entries],
        device=device,
    )


def gather(plan: GatherPlan, slot_sets: torch.Tensor) -> list[torch.Tensor]:
    """Copy every entry at its slot set. slot_sets: [S, n] int64 (contiguous). Returns one
    contiguous [n, *shape] tensor per entry, views into one block."""
    n = slot_sets.shape[1]
    block = torch.empty((plan.offsets[-1] + plan.nbytes[-1]) * n, dtype=torch.uint8, device=plan.device)
    grid = (triton.cdiv(n, BLOCK_ITEMS), len(plan.nbytes))
    _gather_kernel[grid](
        block.data_ptr(), plan.src, plan.words, plan.word_tab, plan.dst, plan.sets, slot_sets, n,
        HAS_W8=8 in plan.word_bytes, HAS_W4=4 in plan.word_bytes, HAS_W2=2 in plan.word_bytes,
        HAS_W1=1 in plan.word_bytes, KINDS=plan.kinds, BI=BLOCK_ITEMS, BW=BLOCK_WORDS,
    )
    out = []
    for (dtype, shape), nb, off in zip(plan.views, plan.nbytes, plan.offsets):
        out.append(block[off * n:(off + nb) * n].view(dtype).view(n, *shape))
    return out
