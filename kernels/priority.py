"""Prioritized replay on the device: sum-tree updates and proportional draws.

Mirrors :mod:`gpubuffers.reference.priority` (the tree layout, the rules and their reasons are
documented there). Updates run as a fixed sequence of launches with no host read: the leaves
(elect the last of repeated slots, write), then one launch per tree level, each rewriting
the nodes above the touched slots from their children; a launch boundary is the barrier that
lets a level read the one below it complete. Draws descend the tree in one launch per sampler,
one [BLOCK, F] tile of children per level, and describe what they drew as the uniform samplers
do (:func:`gpubuffers.kernels.sampling.links`). Randomness is Philox at the offset the device
cursors hold, so a CUDA graph replays with new draws.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import SENTINEL, STATE_ADDS, STATE_OFFSET
from .sampling import BLOCK, live_span, links, store_transitions, transition_dict, transition_outputs, uniform, window_outputs

_SENTINEL = tl.constexpr(SENTINEL)
_ADDS = tl.constexpr(STATE_ADDS)
_OFFSET = tl.constexpr(STATE_OFFSET)
_CLAIM = tl.constexpr(-2**31)

#: Items per program of the draw kernels: each holds a [DRAW_BLOCK, F] float64 tile of children
#: per level, which a smaller block keeps in registers.
DRAW_BLOCK = 32


@triton.jit(do_not_specialize=["count", "rows", "lanes", "capacity", "spare"])
def _elect_kernel(
    keys_ptr, bits_ptr,                        # outputs: [k] keys, the leaves as int32
    index_ptr, prio_ptr, start_ptr, state_ptr,  # inputs
    count, rows, lanes, capacity, spare,
    BLOCK_: tl.constexpr,
):
    """Per update: its slot where it applies, else ``spare`` (reference.update_keys); then the
    minimum of its mark ``INT32_MIN + (k - 1 - j)`` over the leaf's bits (reference
    .update_priorities): the last update of each slot leaves its mark there."""
    j = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = j < count
    live, oldest, _ = live_span(state_ptr, rows)
    adds = oldest + live
    index = tl.load(index_ptr + j, mask=mask, other=-1)
    p = tl.load(prio_ptr + j, mask=mask, other=-1.0)
    slot = index % capacity  # index >= 0 wherever ok holds
    ok = mask & (index >= oldest * lanes) & (index < (adds - 1) * lanes)
    ok = ok & (p >= 0) & (p < float("inf"))  # NaN fails both
    ok = ok & (tl.load(start_ptr + slot, mask=ok, other=_SENTINEL) != _SENTINEL)
    key = tl.where(ok, slot, spare)
    tl.store(keys_ptr + j, key, mask=mask)
    tl.atomic_min(bits_ptr + key, (count - 1 - j) + _CLAIM, mask=mask)


@triton.jit(do_not_specialize=["count", "capacity", "spare", "alpha", "eps"])
def _write_kernel(
    leaf_ptr, maxp_ptr, nodes_ptr,          # outputs: leaves, [1] largest priority, [k] slots touched
    bits_ptr, keys_ptr, prio_ptr,           # inputs
    count, capacity, spare, alpha, eps,
    BLOCK_: tl.constexpr,
):
    """The elected update of each leaf writes ``(p + eps) ** alpha``; the others write the
    spare. ``nodes`` gets the slot of each applied update, else 0 (harmless to refresh)."""
    j = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = j < count
    key = tl.load(keys_ptr + j, mask=mask, other=0)
    applies = mask & (key < capacity)
    keep = applies & (tl.load(bits_ptr + key, mask=mask, other=0) == (count - 1 - j) + _CLAIM)
    q = tl.load(prio_ptr + j, mask=applies, other=1.0) + eps
    q = tl.where(applies, q, 1.0)
    value = tl.exp(tl.log(q.to(tl.float64)) * alpha).to(tl.float32)
    tl.store(leaf_ptr + tl.where(keep, key, spare), value, mask=mask)
    tl.atomic_max(maxp_ptr + tl.zeros([BLOCK_], tl.int32), q, mask=applies)
    tl.store(nodes_ptr + j, tl.where(keep, key, 0), mask=mask)


@triton.jit(do_not_specialize=["rows", "lanes", "alpha"])
def _promote_kernel(
    leaf_ptr, slots_ptr,                     # outputs: leaves, [2N] slots touched
    start_ptr, state_ptr, maxp_ptr,          # inputs
    rows, lanes, alpha,
    BLOCK_: tl.constexpr,
):
    """The row being added leaves the drawable set; the row before it enters at maxp ** alpha
    (reset rows excepted) (reference.promote)."""
    lane = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = lane < lanes
    adds = tl.load(state_ptr + _ADDS)
    row = adds % rows
    prev = (adds + rows - 1) % rows
    here = row * lanes + lane
    there = prev * lanes + lane
    top = tl.exp(tl.log(tl.load(maxp_ptr).to(tl.float64)) * alpha).to(tl.float32)
    drawable = tl.load(start_ptr + there, mask=mask, other=_SENTINEL) != _SENTINEL
    tl.store(leaf_ptr + there, tl.where(drawable, top, 0.0), mask=mask)
    tl.store(leaf_ptr + here, tl.zeros([BLOCK_], tl.float32), mask=mask)
    tl.store(slots_ptr + lane, there, mask=mask)
    tl.store(slots_ptr + lanes + lane, here, mask=mask)


@triton.jit(do_not_specialize=["count", "span", "size", "below_off", "level_off"])
def _refresh_kernel(
    sums_ptr, mins_ptr,                     # outputs: the internal levels
    leaf_ptr, slots_ptr,                    # inputs: leaves, [count] slots (unless WHOLE)
    count, span, size, below_off, level_off,
    F: tl.constexpr, LEAVES: tl.constexpr, WHOLE: tl.constexpr, BLOCK_: tl.constexpr,
):
    """Rewrite nodes of one level from their F children: the nodes ``slots // span`` (an entry
    equal to the one before it is skipped), or with WHOLE the ``count`` nodes of the level.
    LEAVES: the children are leaves (float32, 0 where not drawable)."""
    j = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = j < count
    if WHOLE:
        node = j.to(tl.int64)
    else:
        node = tl.load(slots_ptr + j, mask=mask, other=0) // span
        before = tl.load(slots_ptr + j - 1, mask=mask & (j > 0), other=-1)
        mask = mask & ((j == 0) | (before // span != node))
        node = tl.minimum(node, size - 1)
    kids = node[:, None] * F + tl.arange(0, F)[None, :]
    if LEAVES:
        c = tl.load(leaf_ptr + kids, mask=mask[:, None], other=0.0)
        s = tl.sum(c.to(tl.float64), axis=1)
        m = tl.min(tl.where(c > 0, c, float("inf")), axis=1)
    else:
        s = tl.sum(tl.load(sums_ptr + below_off + kids, mask=mask[:, None], other=0.0), axis=1)
        m = tl.min(tl.load(mins_ptr + below_off + kids, mask=mask[:, None], other=float("inf")), axis=1)
    tl.store(sums_ptr + level_off + node, s, mask=mask)
    tl.store(mins_ptr + level_off + node, m, mask=mask)


@triton.jit
def _descend(leaf_ptr, sums_ptr, offs_ptr, x, mask, DEPTH: tl.constexpr, F: tl.constexpr,
             BLOCK_: tl.constexpr):
    """Slots at masses x [BLOCK] (reference.descend from the root): per level, the first child
    whose running sum exceeds the mass left, else the child where the sum reaches its total."""
    node = tl.zeros([BLOCK_], tl.int64)
    cols = tl.arange(0, F)
    for i in tl.static_range(DEPTH):
        level = DEPTH - 1 - i  # the children's level
        kids = node[:, None] * F + cols[None, :]
        if level == 0:
            c = tl.load(leaf_ptr + kids, mask=mask[:, None], other=0.0).to(tl.float64)
        else:
            off = tl.load(offs_ptr + level)
            c = tl.load(sums_ptr + off + kids, mask=mask[:, None], other=0.0)
        cum = tl.cumsum(c, axis=1)
        last = tl.max(cum, axis=1)
        a = tl.sum((cum <= x[:, None]).to(tl.int32), axis=1)
        b = tl.sum((cum < last[:, None]).to(tl.int32), axis=1)
        first = tl.minimum(a, b)
        pick = cols[None, :] == first[:, None]
        x = x - (tl.sum(tl.where(pick, cum, 0.0), axis=1) - tl.sum(tl.where(pick, c, 0.0), axis=1))
        node = node * F + first.to(tl.int64)
    return node


@triton.jit
def _weight(leaf_ptr, slot, smallest, beta, mask):
    """(leaf / smallest) ** -beta in float64 as exp, 0 where the leaf cannot be drawn
    (reference.weights); also returns the leaf."""
    leaf = tl.load(leaf_ptr + slot, mask=mask, other=0.0).to(tl.float64)
    w = tl.exp(tl.log(tl.where(leaf > 0, leaf, smallest) / smallest) * -beta)
    return tl.where(leaf > 0, w, 0.0).to(tl.float32), leaf


@triton.jit(do_not_specialize=["seed", "batch", "rows", "lanes", "total", "final_rows", "root", "beta"])
def _transitions_kernel(
    slots_ptr, row_ptr, index_ptr, weight_ptr, masks_ptr,    # outputs: [2, B], [B] x 3, [6, B]
    leaf_ptr, sums_ptr, mins_ptr, offs_ptr,                  # tree
    end_flags_ptr, start_ptr, final_idx_ptr, fin_head_ptr, state_ptr,   # index, cursors
    seed, batch, rows, lanes, total, final_rows, root, beta,
    DEPTH: tl.constexpr, F: tl.constexpr, NEXT_STEP: tl.constexpr, HAS_FINAL: tl.constexpr,
    BLOCK_: tl.constexpr,
):
    """Stratified proportional transitions (reference.prioritized_transitions)."""
    item = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = item < batch
    live, oldest, _ = live_span(state_ptr, rows)
    mass = tl.load(sums_ptr + root)
    u = uniform(seed, tl.load(state_ptr + _OFFSET) + item.to(tl.int64))
    x = (item.to(tl.float64) + u) * mass / batch
    slot = _descend(leaf_ptr, sums_ptr, offs_ptr, x, mask, DEPTH, F, BLOCK_)
    row = oldest + ((slot // lanes - oldest) % rows + rows) % rows  # layout.absolute_row
    w, leaf = _weight(leaf_ptr, slot, tl.load(mins_ptr + root).to(tl.float64), beta, mask)
    is_first = tl.load(start_ptr + slot, mask=mask, other=0) == row
    succ, is_last, terminated, truncated, next_valid = links(
        start_ptr, end_flags_ptr, final_idx_ptr, fin_head_ptr, slot, mask, lanes, total, final_rows,
        NEXT_STEP, HAS_FINAL, BLOCK_)
    tl.store(weight_ptr + item, w, mask=mask)
    store_transitions(slots_ptr, row_ptr, index_ptr, masks_ptr, item, mask, batch, lanes, slot, succ, row,
                      leaf > 0, is_first, is_last, terminated, truncated, next_valid)


@triton.jit(do_not_specialize=["seed", "batch", "tries", "rows", "lanes", "total", "length", "root", "beta"])
def _windows_kernel(
    slots_ptr, first_ptr, last_ptr, valid_ptr, index_ptr, weight_ptr,  # [B, L] x 3, [B], [B, L], [B]
    leaf_ptr, sums_ptr, mins_ptr, offs_ptr,                            # tree
    start_ptr, end_flags_ptr, state_ptr,                               # index, cursors
    seed, batch, tries, rows, lanes, total, length, root, beta,
    DEPTH: tl.constexpr, F: tl.constexpr, BLOCK_: tl.constexpr,
):
    """Windows whose first slot is drawn in proportion to its leaf, the first admissible of
    ``tries`` i.i.d. proposals (reference.prioritized_windows)."""
    item = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    mask = item < batch
    live, oldest, _ = live_span(state_ptr, rows)
    adds = oldest + live
    mass = tl.load(sums_ptr + root)
    offset = tl.load(state_ptr + _OFFSET)
    span = tl.zeros([], tl.int64) + (length - 1)
    best = tl.zeros([BLOCK_], tl.int64)
    best_row = tl.zeros([BLOCK_], tl.int64)
    found = tl.zeros([BLOCK_], tl.int1)
    for m in range(tries):
        u = uniform(seed, offset + item.to(tl.int64) * tries + m)
        first = _descend(leaf_ptr, sums_ptr, offs_ptr, u * mass, mask, DEPTH, F, BLOCK_)
        row = oldest + ((first // lanes - oldest) % rows + rows) % rows  # layout.absolute_row
        end = (first + span * lanes) % total
        ok = (tl.load(leaf_ptr + first, mask=mask, other=0.0) > 0) & (row + span < adds)
        ok = ok & (tl.load(start_ptr + end, mask=mask, other=0) <= row)
        take = (ok & (found == 0)) | (m == 0)
        best = tl.where(take, first, best)
        best_row = tl.where(take, row, best_row)
        found = found | ok
    w, _ = _weight(leaf_ptr, best, tl.load(mins_ptr + root).to(tl.float64), beta, mask)
    tl.store(valid_ptr + item, found.to(tl.int8), mask=mask)
    tl.store(weight_ptr + item, tl.where(found, w, 0.0), mask=mask)
    lane = best % lanes
    out = item.to(tl.int64) * length
    for j in range(length):
        ahead = tl.zeros([], tl.int64) + j  # int64: j * lanes may pass 2**31
        slot = (best + ahead * lanes) % total
        first = tl.load(start_ptr + slot, mask=mask, other=0) == best_row + ahead
        last = tl.load(end_flags_ptr + slot, mask=mask, other=0) != 0
        tl.store(slots_ptr + out + j, slot, mask=mask)
        tl.store(index_ptr + out + j, (best_row + ahead) * lanes + lane, mask=mask)
        tl.store(first_ptr + out + j, first.to(tl.int8), mask=mask)
        tl.store(last_ptr + out + j, last.to(tl.int8), mask=mask)


# ---------------------------------------------------------------- launchers

def _offsets(tree) -> torch.Tensor:
    """[D + 1] int64 level offsets on the device, cached on the tree."""
    offs = getattr(tree, "_device_offsets", None)
    if offs is None:
        offs = torch.tensor(tree.offsets, dtype=torch.int64, device=tree.leaf.device)
        tree._device_offsets = offs
    return offs


def refresh(tree, slots: torch.Tensor) -> None:
    """Rewrite every node above ``slots`` [k] (as reference.refresh: a level with no more nodes
    than k is rewritten whole), one launch per level."""
    count = slots.shape[0]
    span = 1
    for l in range(1, tree.depth + 1):
        span *= tree.fanout
        whole = tree.sizes[l] <= count
        n = tree.sizes[l] if whole else count
        _refresh_kernel[(triton.cdiv(n, BLOCK),)](
            tree.sums, tree.mins, tree.leaf, slots, n, span, tree.sizes[l],
            tree.offsets[l - 1] if l > 1 else 0, tree.offsets[l],
            F=tree.fanout, LEAVES=l == 1, WHOLE=whole, BLOCK_=BLOCK)


def update_priorities(start: torch.Tensor, state: torch.Tensor, tree, index: torch.Tensor,
                      priority: torch.Tensor) -> None:
    """reference.update_priorities in 2 + D launches: elect, write, then the levels."""
    rows, lanes = start.shape
    count = index.shape[0]
    keys = torch.empty(count, dtype=torch.int64, device=index.device)
    nodes = torch.empty(count, dtype=torch.int64, device=index.device)
    bits = tree.leaf.view(torch.int32)
    grid = (triton.cdiv(count, BLOCK),)
    _elect_kernel[grid](keys, bits, index, priority, start, state, count, rows, lanes, tree.capacity,
                        tree.spare, BLOCK_=BLOCK)
    _write_kernel[grid](tree.leaf, tree.maxp, nodes, bits, keys, priority, count, tree.capacity,
                        tree.spare, tree.alpha, tree.eps, BLOCK_=BLOCK)
    refresh(tree, nodes)


def promote(start: torch.Tensor, state: torch.Tensor, tree) -> None:
    """reference.promote: one launch for the leaves of the two rows, then the levels."""
    rows, lanes = start.shape
    _promote_kernel[(triton.cdiv(lanes, BLOCK),)](tree.leaf, tree.slots, start, state, tree.maxp, rows,
                                                  lanes, tree.alpha, BLOCK_=BLOCK)
    refresh(tree, tree.slots)


def transitions(start, end_flags, final_idx, fin_head, state, tree, seed: int, batch: int,
                next_step: bool, final_rows: int, beta: float) -> dict:
    """Stratified proportional transitions and their links, in one launch."""
    rows, lanes = start.shape
    slots, row, index, masks = transition_outputs(batch, start.device)
    weight = torch.empty(batch, dtype=torch.float32, device=start.device)
    _transitions_kernel[(triton.cdiv(batch, DRAW_BLOCK),)](
        slots, row, index, weight, masks.view(torch.int8), tree.leaf, tree.sums, tree.mins,
        _offsets(tree), end_flags, start, final_idx, fin_head, state,
        seed, batch, rows, lanes, rows * lanes, max(final_rows, 1), tree.offsets[-1], beta,
        DEPTH=tree.depth, F=tree.fanout, NEXT_STEP=next_step, HAS_FINAL=final_rows > 0, BLOCK_=DRAW_BLOCK)
    out = transition_dict(slots, row, index, masks)
    out["weight"] = weight
    return out


def windows(start, end_flags, state, tree, seed: int, batch: int, tries: int, length: int,
            beta: float) -> dict:
    """Proportional windows: ``slots``, ``index``, ``is_first``, ``is_last`` [B, L], ``valid``
    and ``weight`` [B], in one launch."""
    rows, lanes = start.shape
    slots, index, first, last, valid = window_outputs(batch, length, start.device)
    weight = torch.empty(batch, dtype=torch.float32, device=start.device)
    _windows_kernel[(triton.cdiv(batch, DRAW_BLOCK),)](
        slots, first.view(torch.int8), last.view(torch.int8), valid.view(torch.int8), index, weight,
        tree.leaf, tree.sums, tree.mins, _offsets(tree), start, end_flags, state,
        seed, batch, tries, rows, lanes, rows * lanes, length, tree.offsets[-1], beta,
        DEPTH=tree.depth, F=tree.fanout, BLOCK_=DRAW_BLOCK)
    return {"slots": slots, "index": index, "is_first": first, "is_last": last, "valid": valid,
            "weight": weight}
