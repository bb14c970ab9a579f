"""Memory figures: free memory of a device, and the largest capacity that fits a budget; host
allocations on huge pages."""

from __future__ import annotations

import math
import mmap
import os
from typing import Any

import torch

from .layout import MAX_ROWS
from .specs import flatten, resolve_device
from .steps import positive_int, real

#: Bytes per slot of the temporaries that grow with capacity: ``sample_episodes`` keeps a table
#: of the slots that end a whole episode (bool) and their running count (int64), and its default
#: row budget makes two int64 tables while it looks for the longest episode.
SCRATCH_BYTES_PER_SLOT = 1 + 8 + 2 * 8


def free_bytes(device: torch.device, shared: bool = False) -> int | None:
    """Bytes free on ``device`` now: the CUDA driver's figure, the kernel's ``MemAvailable`` for
    the CPU (with ``shared``, also no more than the space left in ``/dev/shm``, where shared
    memory lives); None where it cannot be known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if shared:
        try:
            fs = os.statvfs("/dev/shm")
            shm = fs.f_bavail * fs.f_frsize
            free = shm if free is None else min(free, shm)
        except OSError:
            pass
    return free


#: Host tensors of at least this many bytes get their own memory, advised onto transparent huge
#: pages before their first write (NumPy advises its arrays from the same size): a sample reads
#: rows at random across GBs of storage, and 2 MiB pages make each read far less likely to miss
#: the TLB.
HUGE_PAGE_MIN = 4 << 20


def host_full(shape: tuple[int, ...], value: float | int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.full`` on the CPU; a tensor of :data:`HUGE_PAGE_MIN` bytes or more lives in an
    anonymous mapping of its own with ``madvise(MADV_HUGEPAGE)`` (Linux), so that its pages are
    fresh when the advice is given (memory the allocator hands out again was faulted in on small
    pages already). Where THP is off (``/sys/kernel/mm/transparent_hugepage/enabled`` is
    ``never``), the kernel has no such advice or the mapping fails, it is plain ``torch.full``."""
    numel = math.prod(shape)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if numel * dtype.itemsize < HUGE_PAGE_MIN or advice is None:
        return torch.full(shape, value, dtype=dtype)
    try:
        # Private, as malloc's memory is: a forked process gets its own copy on write.
        area = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    except OSError:
        return torch.full(shape, value, dtype=dtype)
    try:
        area.madvise(advice)
    except OSError:  # a kernel without THP: small pages
        pass
    # The tensor holds the mapping (a buffer export) for as long as its storage lives.
    return torch.frombuffer(area, dtype=dtype, count=numel).view(shape).fill_(value)


def full(shape: tuple[int, ...], value: float | int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.full``, through :func:`host_full` on the CPU."""
    if device.type == "cpu":
        return host_full(shape, value, dtype)
    return torch.full(shape, value, dtype=dtype, device=device)


def nbytes(tensors) -> int:
    """Bytes of the given tensors (meta tensors too)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def capacity_for(step_example: Any, num_envs: int | None, budget_bytes: int | None = None,
                 device: str | torch.device | None = None, fraction: float = 0.8, **buffer_options) -> int:
    """The largest capacity (a multiple of ``num_envs``) of a ``ReplayBuffer(capacity, num_envs,
    **buffer_options)`` whose storage, side tables, episode index, priorities, statistics and
    sampling scratch (:meth:`ReplayBuffer.nbytes` ``["total"]``) fit in ``budget_bytes``.

    step_example: one step as :meth:`ReplayBuffer.add` takes it (its shapes and dtypes count,
        not its values; meta tensors work).
    budget_bytes: default ``fraction`` of the memory free on ``device`` now (default: the device
        of the example's tensors, or ``buffer_options["device"]``).
    At most ``layout.MAX_ROWS`` rows per lane, whatever the budget. Raises a ValueError when not
    even 2 rows per lane fit.
    """
    from .buffer import ReplayBuffer

    for k in ("capacity", "num_envs"):
        if k in buffer_options:
            raise TypeError(f"capacity_for: unexpected buffer option {k!r} (it is what is computed, or "
                            f"an argument of its own)")
    fraction = real(fraction, "fraction", 0.0, 1.0, open_low=True)
    lanes = 1 if num_envs is None else positive_int(num_envs, "num_envs")

    def total(rows: int) -> int | float:
        if rows > MAX_ROWS:  # more rows per lane than a buffer may hold: never fits
            return math.inf
        return ReplayBuffer(rows * lanes, num_envs, **buffer_options).nbytes(step_example)["total"]

    if budget_bytes is None:
        dev = device if device is not None else buffer_options.get("device")
        if dev is None:
            dev = next((v.device for v in flatten(step_example, "step_example").values()
                        if isinstance(v, torch.Tensor)), torch.device("cpu"))
        dev = resolve_device(dev, "device")
        free = free_bytes(dev)
        if free is None:
            raise ValueError(f"budget_bytes: the free memory of {dev} cannot be known; pass budget_bytes")
        budget_bytes = int(free * fraction)
    elif isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes: expected a positive int or None, got {budget_bytes!r}")
    lo = 2
    low = total(lo)
    if low > budget_bytes:
        raise ValueError(f"budget_bytes: {budget_bytes:,} bytes holds not even 2 rows of {lanes} lanes "
                         f"({low:,} bytes)")
    # The footprint is affine in the rows but for rounding (side-table rows per lane, tree
    # padding): bracket from the slope, then bisect.
    per_row = max(1, total(lo + 64) - low) / 64
    hi = max(lo + 1, int((budget_bytes - low) / per_row * 1.1) + lo + 2)
    hi = min(hi, MAX_ROWS + 1)
    while total(hi) <= budget_bytes:
        hi = min(hi * 2, MAX_ROWS + 1)
    while hi - lo > 1:  # total(lo) fits, total(hi) does not
        mid = (lo + hi) // 2
        if total(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo * lanes


__all__ = ["capacity_for", "free_bytes", "SCRATCH_BYTES_PER_SLOT"]
