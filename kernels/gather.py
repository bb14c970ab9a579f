"""Fused gather: one launch copies every leaf of a batch of slots into one output block.

Each entry is one leaf storage ``[rows, *leaf_shape]`` read at one of several slot sets (the
sampled slots, or their successors for the ``next`` leaves, whose sources extend past the ring
into the final-observation side table). Leaves of any dtype and trailing shape are moved as
machine words; outputs are contiguous views into one
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


@triton.jit(do_not_specialize=["n_items"])
def _gather_kernel(
    dst_base,                                                   # output block address (bytes)
    src_tab, words_tab, dst_tab, set_tab,                       # per-entry tables [E]
    slots_ptr,                                                  # [S, n] slot sets
    n_items,
    WORD: tl.constexpr, WORD_BYTES: tl.constexpr, BI: tl.constexpr, BW: tl.constexpr,
):
    entry = tl.program_id(1)
    items = tl.program_id(0) * BI + tl.arange(0, BI)
    in_range = items < n_items
    words = tl.load(words_tab + entry)
    src = tl.load(src_tab + entry)
    which = tl.load(set_tab + entry)
    slot = tl.load(slots_ptr + which * n_items + items, mask=in_range, other=0)
    base = tl.zeros([BI], tl.int64) + src
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
    words: torch.Tensor
    dst: torch.Tensor
    sets: torch.Tensor
    word_bytes: int
    nbytes: list[int]
    offsets: list[int]
    views: list[tuple[torch.dtype, tuple[int, ...]]]
    device: torch.device


def make_plan(entries: list[tuple[torch.Tensor, int]]) -> GatherPlan:
    """entries: (source [rows, *shape] contiguous, slot set index). Built once per layout: it
    copies small tables to the device."""
    if not entries:
        raise ValueError("entries: expected at least one source")
    device = entries[0][0].device
    nbytes = []
    for src, _ in entries:
        if not src.is_contiguous():
            raise ValueError("entries: sources must be contiguous")
        nbytes.append(math.prod(src.shape[1:]) * src.element_size())
    word = next(w for w in (8, 4, 2, 1) if all(n % w == 0 for n in nbytes)
                and all(s.data_ptr() % w == 0 for s, _ in entries))
    # Each entry's region starts at offset * n bytes; 16-byte aligned offsets keep every output
    # view aligned for its dtype whatever n is.
    offsets, acc = [], 0
    for n in nbytes:
        offsets.append(acc)
        acc += -(-n // 16) * 16

    def table(values):
        return torch.tensor(values, dtype=torch.int64).to(device)

    return GatherPlan(
        src=table([s.data_ptr() for s, _ in entries]),
        words=table([n // word for n in nbytes]),
        dst=table(offsets),
        sets=table([k for _, k in entries]),
        word_bytes=word,
        nbytes=nbytes,
        offsets=offsets,
        views=[(s.dtype, tuple(s.shape[1:])) for s, _ in entries],
        device=device,
    )


def gather(plan: GatherPlan, slot_sets: torch.Tensor) -> list[torch.Tensor]:
    """Copy every entry at its slot set. slot_sets: [S, n] int64 (contiguous). Returns one
    contiguous [n, *shape] tensor per entry, views into one block."""
    n = slot_sets.shape[1]
    block = torch.empty((plan.offsets[-1] + plan.nbytes[-1]) * n, dtype=torch.uint8, device=plan.device)
    grid = (triton.cdiv(n, BLOCK_ITEMS), len(plan.nbytes))
    _gather_kernel[grid](
        block.data_ptr(), plan.src, plan.words, plan.dst, plan.sets, slot_sets, n,
        WORD=_WORDS[plan.word_bytes], WORD_BYTES=plan.word_bytes, BI=BLOCK_ITEMS, BW=BLOCK_WORDS,
    )
    out = []
    for (dtype, shape), nb, off in zip(plan.views, plan.nbytes, plan.offsets):
        out.append(block[off * n:(off + nb) * n].view(dtype).view(n, *shape))
    return out
