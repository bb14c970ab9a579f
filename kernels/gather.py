"""Fused gather: one launch copies every leaf of a batch of slots into one output block.

Each entry is one leaf storage ``[T * N, *leaf_shape]`` read at one of several slot sets (the
sampled slots, or their successors for the ``next`` leaves), optionally from an alternative
source per item (the final-observation side table where an episode ended). Leaves of any dtype
and trailing shape are moved as machine words; outputs are contiguous views into one
preallocated block. The tables of source addresses and sizes are built once per layout and
stay on the device, so a launch reads nothing from the host but scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_ITEMS = 32
BLOCK_WORDS = 64
_WORDS = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}


@triton.jit
def _gather_kernel(
    dst_base,                                                   # output block address (bytes)
    src_tab, alt_tab, words_tab, dst_tab, set_tab,              # per-entry tables [E]
    slots_ptr, alt_slot_ptr, use_alt_ptr,                       # [S, n] slot sets, [n], [n]
    n_items,
    WORD: tl.constexpr, WORD_BYTES: tl.constexpr, HAS_ALT: tl.constexpr,
    BI: tl.constexpr, BW: tl.constexpr,
):
    entry = tl.program_id(1)
    items = tl.program_id(0) * BI + tl.arange(0, BI)
    in_range = items < n_items
    words = tl.load(words_tab + entry)
    src = tl.load(src_tab + entry)
    which = tl.load(set_tab + entry)
    slot = tl.load(slots_ptr + which * n_items + items, mask=in_range, other=0)
    base = tl.zeros([BI], tl.int64) + src
    if HAS_ALT:
        alt = tl.load(alt_tab + entry)
        use = (tl.load(use_alt_ptr + items, mask=in_range, other=0) != 0) & (alt != 0)
        base = tl.where(use, alt, base)
        slot = tl.where(use, tl.load(alt_slot_ptr + items, mask=in_range, other=0), slot)
    dst = dst_base + tl.load(dst_tab + entry) * n_items
    for w0 in range(0, words, BW):
        w = w0 + tl.arange(0, BW)
        mask = in_range[:, None] & (w < words)[None, :]
        src_addr = base[:, None] + (slot[:, None] * words + w[None, :]) * WORD_BYTES
        value = tl.load(src_addr.to(tl.pointer_type(WORD)), mask=mask)
        dst_addr = dst + (items[:, None].to(tl.int64) * words + w[None, :]) * WORD_BYTES
        tl.store(dst_addr.to(tl.pointer_type(WORD)), value, mask=mask)


@dataclass
class GatherPlan:
    """Device tables for one layout of sources (see :func:`make_plan`)."""

    src: torch.Tensor
    alt: torch.Tensor
    words: torch.Tensor
    dst: torch.Tensor
    sets: torch.Tensor
    word_bytes: int
    nbytes: list[int]
    offsets: list[int]
    views: list[tuple[torch.dtype, tuple[int, ...]]]
    device: torch.device


def make_plan(entries: list[tuple[torch.Tensor, torch.Tensor | None, int]]) -> GatherPlan:
    """entries: (source [rows, *shape] contiguous, alternative source of the same row layout or
    None, slot set index). Built once per layout: it copies small tables to the device."""
    if not entries:
        raise ValueError("entries: expected at least one source")
    device = entries[0][0].device
    nbytes = []
    for src, alt, _ in entries:
        if not src.is_contiguous() or (alt is not None and (not alt.is_contiguous() or alt.dtype != src.dtype
                                                            or alt.shape[1:] != src.shape[1:])):
            raise ValueError("entries: sources must be contiguous and alternatives of the same row layout")
        nbytes.append(math.prod(src.shape[1:]) * src.element_size())
    word = next(w for w in (8, 4, 2, 1) if all(n % w == 0 for n in nbytes)
                and all(s.data_ptr() % w == 0 for s, _, _ in entries))
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
        alt=table([0 if a is None else a.data_ptr() for _, a, _ in entries]),
        words=table([n // word for n in nbytes]),
        dst=table(offsets),
        sets=table([k for _, _, k in entries]),
        word_bytes=word,
        nbytes=nbytes,
        offsets=offsets,
        views=[(s.dtype, tuple(s.shape[1:])) for s, _, _ in entries],
        device=device,
    )


def gather(plan: GatherPlan, slot_sets: torch.Tensor, alt_slot: torch.Tensor | None = None,
           use_alt: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Copy every entry at its slot set. slot_sets: [S, n] int64 (contiguous); alt_slot [n]
    int64 and use_alt [n] bool select the alternative source per item. Returns one contiguous
    [n, *shape] tensor per entry, views into one block."""
    n = slot_sets.shape[1]
    block = torch.empty((plan.offsets[-1] + plan.nbytes[-1]) * n, dtype=torch.uint8, device=plan.device)
    has_alt = alt_slot is not None
    grid = (triton.cdiv(n, BLOCK_ITEMS), len(plan.nbytes))
    _gather_kernel[grid](
        block.data_ptr(), plan.src, plan.alt, plan.words, plan.dst, plan.sets,
        slot_sets, alt_slot if has_alt else slot_sets, use_alt.view(torch.int8) if has_alt else slot_sets,
        n, WORD=_WORDS[plan.word_bytes], WORD_BYTES=plan.word_bytes, HAS_ALT=has_alt,
        BI=BLOCK_ITEMS, BW=BLOCK_WORDS,
    )
    out = []
    for (dtype, shape), nb, off in zip(plan.views, plan.nbytes, plan.offsets):
        out.append(block[off * n:(off + nb) * n].view(dtype).view(n, *shape))
    return out
