"""Prioritized replay (pure torch): a wide sum tree over the slots, its updates and its draws.

The reference of :mod:`gpubuffers.kernels.priority`, and the CPU backend. The tree is a ``fanout``-
ary tree whose leaves are the ring slots (``row * N + lane``, :mod:`gpubuffers.layout`):

- ``leaf`` [P0] float32: ``(priority + eps) ** alpha`` of each slot that can be drawn (a live
  transition whose successor row is written, not a reset row), 0 for every other slot;
- ``sums`` float64 and ``mins`` float32, the internal levels 1..D laid end to end: each node holds
  the sum of its ``fanout`` children and the smallest drawable leaf below it (``inf`` where none).

A node is always recomputed from its children, never adjusted by a difference, so rounding never
accumulates however many updates run; the sums are float64, so a slot whose priority is ``eps``
keeps a reachable share of the mass next to slots a billion times larger. An update of k slots
rewrites k leaves and then, level by level, the nodes above them: k * fanout * D work, done in
parallel per level, never a pass over the whole tree.

Draws descend from the root: at each level the first child whose running sum exceeds the
remaining mass, or, where rounding leaves the mass at or past the children's total, the last child
with mass; a child without mass is never entered, so a slot that cannot be drawn never is.

Transition ids: a sampler's ``"index"`` is ``absolute_row * N + lane`` (absolute rows count adds
since construction); its slot is ``index % (T * N)``. An update applies when its id is a drawable
transition now: at or after the oldest live row and before the newest (whose successor is not
written yet). An id whose row has been overwritten since it was sampled is ignored.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from ..layout import SENTINEL, absolute_row
from ..memory import full
from .episode_index import EpisodeIndex, rows_of
from .sampling import live_span, row_marks, take, transition_ids, transition_links, window_slots, wrap

#: Smallest int32: marks below any leaf's bits elect the last of repeated updates.
_CLAIM = -2**31

#: The int32 bits of float32 ``inf``.
_INF_BITS = 0x7F800000

#: Children per node, chosen with ``python -m bench.ops`` (update + draw of 4096 at 2**20 and
#: 2**24 slots for fan-outs 8 to 128): 16 and 32 are the fastest on the CPU, and 32 keeps the
#: tree one level shallower (4 levels at 2**20 slots, 6 at 2**26), one launch fewer per update
#: and per add on the Triton backend; a draw or an update reads one contiguous block per level.
FANOUT = 32


#: Sizes of ``torch.arange`` a tree keeps (batch sizes, lane counts): a loop whose batch size
#: changes every call (updating only some items of each sample) must not grow memory without end.
ARANGES = 32


@dataclass
class PriorityTree:
    """Sum tree of ``(priority + eps) ** alpha`` over ``capacity`` slots (see the module doc).

    leaf: [P0 + 1] float32, ``P0 = ceil(C / F) * F`` (slots past C stay 0; the element at
        ``spare = P0`` takes the writes of updates that do not apply and is never read).
    sums: [S] float64 and mins: [S] float32, levels 1..D: level l holds ``sizes[l]`` nodes at
        ``offsets[l]`` (index 0 is the leaf level), padded to a multiple of F below the root.
    maxp: [1] float32, the largest ``priority + eps`` applied so far (1 at first): new
        transitions enter with it.
    slots: [2N] int64 scratch: the slots an add rewrites (the new row and the one before it).
    """

    leaf: torch.Tensor
    sums: torch.Tensor
    mins: torch.Tensor
    maxp: torch.Tensor
    slots: torch.Tensor
    capacity: int
    fanout: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    alpha: float
    eps: float

    @classmethod
    def empty(cls, capacity: int, lanes: int, alpha: float, eps: float, device: torch.device,
              fanout: int = FANOUT) -> "PriorityTree":
        sizes, offsets = [capacity], [0]
        used = 0
        while sizes[-1] > 1:
            n = -(-sizes[-1] // fanout)
            offsets.append(used)
            sizes.append(n)
            used += n if n == 1 else -(-n // fanout) * fanout
        if len(sizes) == 1:  # a single slot still gets a root above it
            offsets.append(0)
            sizes.append(1)
            used = 1
        padded = -(-capacity // fanout) * fanout
        return cls(
            leaf=full((padded + 1,), 0, torch.float32, device),  # read at random slots: huge pages on the host
            sums=torch.zeros(used, dtype=torch.float64, device=device),
            mins=torch.full((used,), math.inf, dtype=torch.float32, device=device),
            maxp=torch.ones(1, dtype=torch.float32, device=device),
            slots=torch.zeros(2 * lanes, dtype=torch.int64, device=device),
            capacity=capacity, fanout=fanout, offsets=tuple(offsets), sizes=tuple(sizes),
            alpha=as_float32(alpha), eps=as_float32(eps),
        )

    def arange(self, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """``torch.arange(n)`` on the tree's device, kept for the first ``ARANGES`` sizes the
        calls ask for (read it, do not write). Later sizes get a fresh one each call: a kept
        tensor is never dropped, since a CUDA graph captured earlier may read it."""
        cache = self.__dict__.setdefault("_aranges", {})
        out = cache.get((n, dtype))
        if out is None:
            out = torch.arange(n, dtype=dtype, device=self.leaf.device)
            if len(cache) < ARANGES:
                cache[(n, dtype)] = out
        return out

    @property
    def spare(self) -> int:
        return self.leaf.shape[0] - 1

    @property
    def depth(self) -> int:
        """Internal levels D (the root is level D)."""
        return len(self.sizes) - 1

    def level(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, mins) of level ``l >= 1``, padded."""
        off = self.offsets[l]
        n = self.sizes[l]
        n = n if l == self.depth else -(-n // self.fanout) * self.fanout
        return self.sums[off:off + n], self.mins[off:off + n]

    @property
    def total(self) -> torch.Tensor:
        """[] float64: the mass of every drawable slot (the root)."""
        return self.sums[self.offsets[-1]]

    @property
    def smallest(self) -> torch.Tensor:
        """[] float32: the smallest drawable leaf (``inf`` when none)."""
        return self.mins[self.offsets[-1]]


def as_float32(value: float) -> float:
    """``value`` rounded to float32: the kernels receive Python floats as float32 scalars, so
    both backends use alpha, beta and eps at that precision (then compute in float64)."""
    return struct.unpack("f", struct.pack("f", float(value)))[0]


def leaf_value(q: torch.Tensor, alpha: float) -> torch.Tensor:
    """float32 ``q ** alpha`` for float32 ``q = priority + eps > 0``, as ``exp(alpha * log(q))``
    in float64 (the kernels form it the same way)."""
    return torch.exp(q.double().log() * alpha).float()


def _recompute(tree: PriorityTree, l: int, nodes: torch.Tensor | None) -> None:
    """Rewrite nodes of level ``l`` from their children: ``nodes`` [k] int64 (repeats harmless),
    or None for the whole level."""
    f = tree.fanout
    sums, mins = tree.level(l)
    if l == 1:  # children are leaves: float32 values, 0 where not drawable
        kids = tree.leaf[:-1].view(-1, f)
        if nodes is not None:
            kids = kids.index_select(0, nodes)
        ks, km = kids.sum(1, dtype=torch.float64), smallest_positive(kids)
    else:
        below_sum, below_min = tree.level(l - 1)
        ks, km = below_sum.view(-1, f), below_min.view(-1, f)
        if nodes is not None:
            ks, km = ks.index_select(0, nodes), km.index_select(0, nodes)
        ks, km = ks.sum(1, dtype=torch.float64), km.amin(1)
    if nodes is None:
        sums[:ks.shape[0]] = ks
        mins[:km.shape[0]] = km
    else:
        sums.scatter_(0, nodes, ks)
        mins.scatter_(0, nodes, km)


def smallest_positive(kids: torch.Tensor) -> torch.Tensor:
    """[k] float32: the smallest positive value of each row of ``kids`` [k, F] (float32, >= 0,
    not NaN), ``inf`` where none. Non-negative floats order as their int32 bits, so the minimum
    is taken over ``bits - 1`` with 0 (no mass) moved to the top of the positive ints."""
    top = (1 << 31) - 1
    low = kids.view(torch.int32).sub(1).bitwise_and_(top).amin(1)
    return torch.where(low == top, _INF_BITS, low + 1).view(torch.float32)


def refresh(tree: PriorityTree, slots: torch.Tensor) -> None:
    """Recompute, level by level, every node above ``slots`` [k] int64 (any slots below the leaf
    count; repeats are harmless: a node is rewritten with the sum of its children). A level with
    no more nodes than k is recomputed whole, which is less work than k blocks of children."""
    nodes = slots
    for l in range(1, tree.depth + 1):
        nodes = nodes.div(tree.fanout, rounding_mode="floor")
        _recompute(tree, l, None if tree.sizes[l] <= nodes.shape[0] else nodes)


def refresh_runs(tree: PriorityTree, first: torch.Tensor, length: int) -> None:
    """Recompute every node above the runs of ``length`` consecutive slots starting at
    ``first`` [r] int64 (device values: no host read)."""
    f, span = tree.fanout, 1
    for l in range(1, tree.depth + 1):
        span *= f
        count = -(-length // span) + 1  # nodes a run of `length` slots can touch at level l
        if tree.sizes[l] <= count * first.shape[0]:
            _recompute(tree, l, None)
            continue
        nodes = first.div(span, rounding_mode="floor")[:, None] + tree.arange(count)
        _recompute(tree, l, nodes.view(-1).clamp_(max=tree.sizes[l] - 1))


def update_keys(ix: EpisodeIndex, tree: PriorityTree, index: torch.Tensor,
                priority: torch.Tensor) -> torch.Tensor:
    """[k] int64 per update: its slot where it applies, else ``tree.spare`` (ignored).

    An update applies when ``index`` is a drawable transition now (at or after the oldest live
    row, before the newest, not a reset row) and ``priority`` is finite and >= 0.
    """
    lanes = ix.lanes
    live, oldest = live_span(ix)
    slot = index.remainder(tree.capacity)
    ok = (index >= oldest * lanes) & (index < (oldest + live - 1) * lanes) & torch.isfinite(priority) & (priority >= 0)
    ok &= take(ix.start, slot) != SENTINEL
    return torch.where(ok, slot, tree.spare)


def update_priorities(ix: EpisodeIndex, tree: PriorityTree, index: torch.Tensor,
                      priority: torch.Tensor) -> None:
    """Set the priority of the transitions ``index`` [k] int64 to ``priority`` [k] float32 (on
    the tree's device). Updates that do not apply are ignored (:func:`update_keys`); of repeated
    ids the last applies. The largest ``priority + eps`` of the updates that apply (repeats
    included) raises ``maxp``.

    The last of repeated slots is found without sorting: each update takes, over the int32 bits
    of its slot's leaf, the minimum with ``INT32_MIN + (k - 1 - position)``; leaves are
    non-negative floats (non-negative bits), so the minimum left there is the mark of the last
    update of that slot, which then writes the leaf; every other one writes the spare element.
    Every leaf touched is thus rewritten before anything reads it.
    """
    k = index.shape[0]
    keys = update_keys(ix, tree, index, priority)
    bits = tree.leaf.view(torch.int32)
    mark = (_CLAIM + k - 1) - tree.arange(k, torch.int32)  # INT32_MIN + (k - 1 - position)
    bits.scatter_reduce_(0, keys, mark, "amin")
    applies = keys < tree.capacity
    keep = (bits.index_select(0, keys) == mark) & applies
    q = torch.where(applies, priority + tree.eps, 1.0)  # finite for the log below
    tree.leaf.index_copy_(0, torch.where(keep, keys, tree.spare), leaf_value(q, tree.alpha))
    torch.maximum(tree.maxp, torch.where(applies, q, 0.0).max().reshape(1), out=tree.maxp)
    refresh(tree, torch.where(keep, keys, 0))


def promote(ix: EpisodeIndex, tree: PriorityTree) -> None:
    """Before the add whose row is ``state[STATE_ADDS] % T`` is counted: its slots leave the
    drawable set (the row is new, its successor unwritten) and the slots of the row before it
    enter at ``maxp ** alpha`` (reset rows excepted), then the nodes above both rows."""
    lanes = ix.lanes
    row, prev, _ = rows_of(ix)  # [1] each: the row being added, the one before
    lane = tree.arange(lanes)
    tree.slots[:lanes] = prev * lanes + lane
    tree.slots[lanes:] = row * lanes + lane
    top = leaf_value(tree.maxp, tree.alpha)
    before = torch.where(ix.start.index_select(0, prev)[0] != SENTINEL, top, 0.0)
    tree.leaf.index_copy_(0, tree.slots, torch.cat([before, torch.zeros_like(before)]))
    refresh_runs(tree, torch.cat([prev, row]) * lanes, lanes)


def descend(tree: PriorityTree, x: torch.Tensor, flat: int | None = None) -> torch.Tensor:
    """Slots at masses ``x`` (float64, any shape, in ``[0, total)``): at each level, the first
    child whose running sum exceeds the mass left; where rounding leaves none, the child at which
    the running sum reaches its total (a child with mass whenever the node has mass).

    Both cases are two searches and a minimum, as the kernel counts them: the number of running
    sums at or below the mass, capped by the number below the total (the children before the one
    where the sum reaches it). Below the total the cap never binds; at or past it, and in an
    empty node (total 0), the cap is the choice.

    flat: the level whose nodes are found in one search over its running sum instead of level
    by level from the root (the same nodes wherever the sums are exact; fewer, larger torch ops
    on the CPU); default the lowest level of at most 16 nodes per draw.
    """
    f = tree.fanout
    shape = x.shape
    x = x.reshape(-1)
    if flat is None:
        flat = next(l for l in range(1, tree.depth + 1) if tree.sizes[l] <= 16 * x.shape[0])
    if flat < tree.depth:
        level = tree.level(flat)[0][:tree.sizes[flat]]
        cum = level.cumsum(0)
        # An empty tree (total 0: nothing drawable yet) descends to the first child, as the
        # kernel does: the draw lands on a leaf of 0 and is returned invalid.
        node = torch.minimum(torch.searchsorted(cum, x, right=True), torch.searchsorted(cum, cum[-1:]))
        x = x - (cum.index_select(0, node) - level.index_select(0, node))
    else:
        node = torch.zeros_like(x, dtype=torch.int64)
    for l in range(flat - 1, -1, -1):
        below = tree.leaf[:-1] if l == 0 else tree.level(l)[0]
        c = below.view(-1, f).index_select(0, node)
        # Leaves are float32: cast, then sum in place (one float64 tile, not a cast and a sum).
        cum = c.double().cumsum_(1) if l == 0 else c.cumsum(1)
        first = torch.minimum(torch.searchsorted(cum, x[:, None], right=True),
                              torch.searchsorted(cum, cum[:, -1:].contiguous()))
        x = x - (cum.gather(1, first).squeeze(1) - c.gather(1, first).squeeze(1))
        node = node * f + first.squeeze(1)
    return node.view(shape)


def weights(tree: PriorityTree, leaf: torch.Tensor, beta: float) -> torch.Tensor:
    """float32 importance weights ``(leaf / smallest leaf) ** -beta`` of drawn slots' ``leaf``
    values (the largest weight is 1); 0 for a slot that cannot be drawn (leaf 0)."""
    leaf = leaf.double()
    smallest = tree.smallest.double()
    w = torch.exp((torch.where(leaf > 0, leaf, smallest) / smallest).log() * -as_float32(beta))
    return torch.where(leaf > 0, w, 0.0).float()


def stratified(tree: PriorityTree, u: torch.Tensor) -> torch.Tensor:
    """Masses for [B] uniforms in [0, 1): item i in the i-th of B equal-mass segments."""
    i = tree.arange(u.shape[0], torch.float64)
    return (i + u) * tree.total / u.shape[0]


def prioritized_transitions(ix: EpisodeIndex, tree: PriorityTree, u: torch.Tensor, next_step: bool,
                            final_rows: int, beta: float, links: bool = True) -> dict:
    """Transitions drawn in proportion to their leaves, one per equal-mass segment, from [B]
    uniforms: the dict of :func:`gpubuffers.reference.transitions` (``valid`` False only when
    nothing can be drawn) plus ``weight`` [B] float32."""
    rows, lanes = ix.start.shape
    slot = descend(tree, stratified(tree, u))
    row = absolute_row(slot.div(lanes, rounding_mode="floor"), live_span(ix)[1], rows)
    out = transition_links(ix, slot, row, final_rows, next_step) if links else row_marks(ix, slot, row)
    leaf = take(tree.leaf, slot)
    out.update(slot=slot, row=row, index=transition_ids(row, slot, lanes), valid=leaf > 0,
               weight=weights(tree, leaf, beta))
    return out


def prioritized_windows(ix: EpisodeIndex, tree: PriorityTree, u: torch.Tensor, length: int,
                        beta: float) -> dict:
    """Windows of ``length`` rows whose first slot is drawn in proportion to its leaf, from [B, M]
    uniforms (M proposals per item, i.i.d. over the whole mass: the first admissible is kept, so
    draws stay proportional among admissible windows). Returns the dict of
    :func:`gpubuffers.reference.windows` plus ``weight`` [B] (of the first slot; 0 where
    ``valid`` is False)."""
    rows, lanes = ix.start.shape
    total = rows * lanes
    first = descend(tree, u * tree.total)  # [B, M]
    live, oldest = live_span(ix)
    row = absolute_row(first.div(lanes, rounding_mode="floor"), oldest, rows)
    end = wrap(first + (length - 1) * lanes, total)
    ok = (take(tree.leaf, first) > 0) & (row + length - 1 < oldest + live) & (take(ix.start, end) <= row)
    j = ok.to(torch.uint8).argmax(1, keepdim=True)
    first, row, end = (t.gather(1, j).squeeze(1) for t in (first, row, end))
    valid = ok.any(1)
    slots = window_slots(end, length, rows, lanes)
    window_rows = row[:, None] + torch.arange(length, device=u.device)
    return {"slots": slots, "index": transition_ids(window_rows, first[:, None], lanes),
            "is_first": take(ix.start, slots) == window_rows,
            "is_last": take(ix.end_flags, slots) != 0, "valid": valid,
            "weight": torch.where(valid, weights(tree, take(tree.leaf, first), beta), 0.0)}


def sample_prioritized_transitions(ix: EpisodeIndex, tree: PriorityTree, rng, batch: int, next_step: bool,
                                   final_rows: int, beta: float, links: bool = True) -> dict:
    """:func:`prioritized_transitions` with uniforms from the buffer's generator."""
    u = torch.rand(batch, dtype=torch.float64, generator=rng.generator, device=tree.leaf.device)
    return prioritized_transitions(ix, tree, u, next_step, final_rows, beta, links)


def sample_prioritized_windows(ix: EpisodeIndex, tree: PriorityTree, rng, batch: int, tries: int,
                               length: int, beta: float) -> dict:
    """:func:`prioritized_windows` with uniforms from the buffer's generator."""
    u = torch.rand(batch, tries, dtype=torch.float64, generator=rng.generator, device=tree.leaf.device)
    return prioritized_windows(ix, tree, u, length, beta)
