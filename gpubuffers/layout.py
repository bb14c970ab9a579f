"""The one place for slot and side-table arithmetic, the end-flag bits and the reset sentinel.

Terms: T rows per lane, N lanes. Absolute row ``a`` (the add number) of lane ``n`` lives at ring
slot ``(a % T) * N + n`` of every ``[T, N, ...]`` ring, viewed flat as ``[T * N, ...]``.

Under ``autoreset="same_step"`` each next leaf's final-observation side table follows its ring in
the same allocation: ``final_rows`` rows per lane plus one scratch row, so a successor (the next
row's slot inside an episode, or the side-table row of the episode's final obs at its end)
addresses one extended source of ``(T + final_rows + 1) * N`` slots.

The reference (pure torch) and the Triton kernels read these numbers from here.
"""

from __future__ import annotations

#: ``start`` of a reset row (``autoreset="next_step"``): larger than any row, so no window can
#: contain it and no episode owns it.
SENTINEL = 1 << 60

# Bits of ``end_flags`` at the last slot of an episode; 0 elsewhere.
ENDED = 1       #: the slot ends its episode
TRUNCATED = 2   #: ... by truncation (a time limit), not termination
HAS_FINAL = 4   #: ... and the episode's final observation was stored in the side table


def final_rows(final_obs_capacity: int | None, capacity: int, lanes: int) -> int:
    """Side-table rows per lane: ``ceil(final_obs_capacity / N)`` (default ``capacity // 8``),
    at least 2."""
    return max(2, -(-(final_obs_capacity or capacity // 8) // lanes))


def next_source_rows(rows: int, final_rows: int, same_step: bool) -> int:
    """Rows per lane of a next leaf's extended source: the ring, then (``same_step`` only) the
    side table and its scratch row."""
    return rows + (final_rows + 1 if same_step else 0)


def scratch_row(final_rows: int) -> int:
    """The side-table row that absorbs the writes of lanes whose episode did not end."""
    return final_rows


#: ``final_idx`` keeps the low 31 bits of a lane's final-obs counter (int32: 4 bytes per slot
#: instead of 8); :func:`final_counter` recovers the whole counter from the lane's ``fin_head``.
FINAL_IDX_MASK = (1 << 31) - 1

#: Rows per lane at most: a live slot's counter is then fewer than 2**31 behind ``fin_head`` (a
#: lane stores at most one final obs per add), which is what :func:`final_counter` needs.
MAX_ROWS = FINAL_IDX_MASK


def final_lag(fin_head, stored):
    """How many final observations the lane has stored since the one whose counter's low 31 bits
    are ``stored`` (an end slot's ``final_idx``), the lane having stored ``fin_head`` so far: in
    ``[0, 2**31)``; that final observation is still in the side table while the lag is at most
    ``final_rows``. Works on ints and tensors alike (the kernels inline the same)."""
    return (fin_head - stored) & FINAL_IDX_MASK


def final_counter(fin_head, stored):
    """The final-obs counter whose low 31 bits are ``stored``: the largest such counter not above
    ``fin_head``, never negative (``fin_head - final_lag``)."""
    return fin_head - final_lag(fin_head, stored)


def final_slot(total: int, final_idx, lane, final_rows: int, lanes: int):
    """Extended-source slot of the final obs stored as the lane's ``final_idx``-th: side-table
    row ``final_idx % final_rows``, after the ``total = T * N`` ring slots. Works on ints and
    tensors alike (the kernels inline the same expression)."""
    return total + (final_idx % final_rows) * lanes + lane


# The cursors a CUDA graph must see advance live in a small int64 device tensor, ``state``, kept
# with the episode index and advanced by the ops themselves; host copies are for checks only.
STATE_ADDS = 0     #: rows added so far: the absolute row of the next add
STATE_OFFSET = 1   #: the Philox counter offset of the next in-kernel draw
STATE_FLOOR = 2    #: no row below it is live (0, or set when a disk buffer reopens; see live_span)
STATE_RESTART = 3  #: the add that starts an episode in every lane (0, or the first add after a reopen)
STATE_SIZE = 4


def ring_rows(adds, rows: int):
    """(ring row the next add writes, ring row of the newest row) after ``adds`` adds; ints or
    int64 tensors alike (the kernels inline the same)."""
    return adds % rows, (adds + rows - 1) % rows


def absolute_row(ring_row, oldest, rows: int):
    """Absolute row of a live ``ring_row``, the oldest live absolute row being ``oldest``; ints
    or int64 tensors alike (the kernels inline the same, with a non-negative remainder)."""
    return oldest + (ring_row - oldest) % rows


def live_span(adds, rows: int, floor=0):
    """(live rows, oldest live absolute row) after ``adds`` adds: the newest ``rows`` rows, none
    below ``floor`` (a reopened disk buffer's first rows that may have been overwritten when its
    writer stopped); ints or int64 tensors alike."""
    if hasattr(adds, "clamp"):
        floor = floor if hasattr(floor, "clamp") else adds.new_tensor(floor)
        oldest = (adds - rows).clamp(min=0).maximum(floor).minimum(adds)
    else:
        oldest = min(max(adds - rows, 0, floor), adds)
    return adds - oldest, oldest
