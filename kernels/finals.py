"""Final observations on ``add``: reserve side-table rows for the episodes the add ended and
write their final observations there, moving the ended lanes' bytes only.

Mirrors :func:`gpubuffers.reference.store_finals`, except that lanes whose episode did not end
write nothing (the reference writes them to the scratch row, which nothing reads): an add where
few episodes end moves few bytes. Work O(N) for the bookkeeping, no host sync.

Graph-safe: the end row comes from the device cursor ``state[STATE_ADDS]`` (read before the
add's ``advance``), never from the host, so a captured CUDA graph replays correctly.

Launches: one per next leaf, the first also doing the bookkeeping. A step typically has one next
leaf ("obs"), so the typical add costs one launch. Each program owns a block of lanes and, in
the first launch, reads a lane's ``fin_head``, writes ``final_idx[end_row]`` and the advanced
``fin_head``, then copies the lane's row, so no other program can see the counter half-updated
(a grid split over words as well would race on it). The later launches, stream-ordered after the
first, find the advanced counter and write row ``(fin_head - 1) % final_rows``, the one the
first launch reserved. Fusing every leaf into one launch would need their addresses in a device
table rebuilt on each add (the values are new tensors every step; copying a table from pageable
host memory synchronizes the stream) or a kernel signature per leaf count; a separate
bookkeeping launch writing a row tensor would cost a launch more on the typical add.

Rows move as machine words: the largest of 8/4/2/1 bytes dividing the per-lane row bytes and
both tensors' addresses; offsets are int64. A program whose lanes all continue their episodes
skips the copy loop altogether.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..layout import FINAL_IDX_MASK, STATE_ADDS

#: (words per lane up to which the tile is used, lanes per program, words per step): narrow rows
#: spread a tile over many lanes, wide rows over the words of a few.
TILES = ((1, 512, 1), (8, 128, 8), (None, 32, 64))
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


@triton.jit(do_not_specialize=["rows", "lag", "lanes", "final_rows", "words"])
def _store_finals_kernel(
    side_ptr, value_ptr,                        # [final_rows + 1, N, words], [N, words] (words)
    final_idx_ptr, fin_head_ptr,                # index [T, N] int32, [N] int64 (in place)
    state_ptr, ended_ptr,                       # cursors [STATE_SIZE] int64; [N] int8
    rows, lag, lanes, final_rows, words,        # sizes; the end row is ``lag`` rows before the add's
    ADDS: tl.constexpr, MASK: tl.constexpr, BOOKKEEP: tl.constexpr, BL: tl.constexpr, BW: tl.constexpr,
):
    lane = tl.program_id(0).to(tl.int64) * BL + tl.arange(0, BL)
    in_range = lane < lanes
    ended = (tl.load(ended_ptr + lane, mask=in_range, other=0) != 0) & in_range
    head = tl.load(fin_head_ptr + lane, mask=in_range, other=0)
    if BOOKKEEP:
        # The row comes from the device cursor, so a captured graph writes a new row each replay.
        adds = tl.load(state_ptr + ADDS)
        end_row = (adds + rows - lag) % rows
        tl.store(final_idx_ptr + end_row * lanes + lane, (head & MASK).to(tl.int32), mask=in_range)
        tl.store(fin_head_ptr + lane, head + ended.to(tl.int64), mask=in_range)
        taken = head
    else:
        taken = head - 1  # the first launch advanced the counter past the reserved row
    pos = tl.where(ended, taken, 0) % final_rows
    dst = (pos * lanes + lane) * words
    src = lane * words
    # Nothing to copy unless one of the block's lanes ended.
    n = tl.where(tl.max(ended.to(tl.int32), axis=0) > 0, words, 0)
    for w0 in range(0, n, BW):
        w = w0 + tl.arange(0, BW)
        mask = ended[:, None] & (w < words)[None, :]
        value = tl.load(value_ptr + (src[:, None] + w[None, :]), mask=mask)
        tl.store(side_ptr + (dst[:, None] + w[None, :]), value, mask=mask)


def word_bytes(row_bytes: int, *tensors: torch.Tensor) -> int:
    """The largest of 8/4/2/1 dividing ``row_bytes`` and every tensor's address."""
    return next(w for w in (8, 4, 2, 1) if row_bytes % w == 0 and all(t.data_ptr() % w == 0 for t in tensors))


def tile(words: int) -> tuple[int, int]:
    """(lanes per program, words per step) for rows of ``words`` words."""
    return next((bl, bw) for most, bl, bw in TILES if most is None or words <= most)


def _as_words(t: torch.Tensor, word: int) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat tensor of ``word``-byte integers."""
    return t.reshape(-1).view(torch.uint8).view(_WORDS[word])


def store_finals(final_idx: torch.Tensor, fin_head: torch.Tensor, state: torch.Tensor, ended: torch.Tensor,
                 marks_last: bool, final_rows: int, sides: Sequence[torch.Tensor],
                 values: Sequence[torch.Tensor]) -> None:
    """Store the final observations of the ``ended`` lanes ([N] bool), whose episodes end at the
    row the add writes (``marks_last``) or the row before it, that row being read from the cursor
    ``state[STATE_ADDS]`` on the device: ``final_idx[end_row] = fin_head`` (its low 31 bits;
    [T, N] int32 and [N] int64, in place; every lane's entry is written), ``fin_head += ended``, and for each pair of
    ``sides`` (contiguous [final_rows + 1, N, *shape], written in place) and ``values``
    ([N, *shape], same dtype, any strides) ``side[fin_head % final_rows, lane] = value[lane]``
    for ended lanes only."""
    rows, lanes = final_idx.shape
    for name, t, shape, dtype in (("final_idx", final_idx, (rows, lanes), torch.int32),
                                  ("fin_head", fin_head, (lanes,), torch.int64)):
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {shape}")
    if state.dtype != torch.int64 or state.dim() != 1 or not state.is_contiguous():
        raise ValueError(f"state: expected a 1-d int64 tensor of cursors, got {state.dtype} {tuple(state.shape)}")
    if tuple(ended.shape) != (lanes,) or ended.dtype != torch.bool:
        raise ValueError(f"ended: expected bool [{lanes}], got {ended.dtype} {tuple(ended.shape)}")
    if len(sides) != len(values):
        raise ValueError(f"sides, values: expected as many of each, got {len(sides)} and {len(values)}")
    copies = []
    for i, (side, value) in enumerate(zip(sides, values)):
        shape = tuple(side.shape[2:])
        if tuple(side.shape[:2]) != (final_rows + 1, lanes) or not side.is_contiguous():
            raise ValueError(f"sides[{i}]: expected a contiguous tensor [{final_rows + 1}, {lanes}, ...], "
                             f"got {tuple(side.shape)}")
        if value.dtype != side.dtype or tuple(value.shape) != (lanes, *shape):
            raise ValueError(f"values[{i}]: expected {side.dtype} {(lanes, *shape)}, "
                             f"got {value.dtype} {tuple(value.shape)}")
        # The kernel reads lane n's row at n * row bytes: a strided value (a slice) is packed.
        value = value.contiguous()
        row_bytes = math.prod(shape) * side.element_size()
        word = word_bytes(row_bytes, side, value)
        copies.append((_as_words(side, word), _as_words(value, word), row_bytes // word))
    if not copies:  # bookkeeping only
        copies.append((fin_head, fin_head, 0))
    ended = ended.contiguous().view(torch.int8)
    for k, (side, value, words) in enumerate(copies):
        block_lanes, block_words = tile(words)
        grid = (triton.cdiv(lanes, block_lanes),)
        _store_finals_kernel[grid](
            side, value, final_idx, fin_head, state, ended,
            rows, 0 if marks_last else 1, lanes, final_rows, words,
            ADDS=STATE_ADDS, MASK=FINAL_IDX_MASK, BOOKKEEP=k == 0, BL=block_lanes, BW=block_words,
        )
