"""BufferDataset: a thin IterableDataset that yields batches sampled on the buffer's device."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

KINDS = ("transitions", "sequences", "episodes")


class BufferDataset(IterableDataset):
    """Yields ``buffer.sample*`` batches, forever or ``num_batches`` times per iteration.

    Each batch is exactly what the matching sampler returns (``kind="transitions"``:
    :meth:`~gpubuffers.ReplayBuffer.sample`, ``"sequences"``: ``sample_sequences(batch_size,
    length)``, ``"episodes"``: ``sample_episodes``), on the buffer's device, with no copy beyond
    the sample. The dataset holds the buffer, not a snapshot: adds made between batches are
    visible to the next batch. Use it directly (``for batch in ds``) or through
    ``DataLoader(ds, batch_size=None)`` with ``num_workers=0``.
    """

    def __init__(self, buffer: Any, batch_size: int, *, kind: str = "transitions",
                 length: int | None = None, num_batches: int | None = None,
                 **sampler_options: Any) -> None:
        from .buffer import ReplayBuffer
        from .steps import positive_int

        if not isinstance(buffer, ReplayBuffer):
            raise TypeError(f"buffer: expected a gpubuffers.ReplayBuffer, got {type(buffer).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        if kind == "sequences":
            if length is None:
                raise ValueError("length: kind='sequences' needs the window length, got None")
            length = positive_int(length, "length")
        elif length is not None:
            raise ValueError(f"length: only used with kind='sequences', got length={length} "
                             f"with kind={kind!r}")
        self.buffer = buffer
        self.batch_size = positive_int(batch_size, "batch_size")
        self.kind = kind
        self.length = length
        self.num_batches = None if num_batches is None else positive_int(num_batches, "num_batches")
        self.sampler_options = sampler_options

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("len(BufferDataset): the dataset yields forever; pass num_batches")
        return self.num_batches

    def sample(self) -> dict[str, Any]:
        """One batch, as the matching buffer sampler returns it."""
        buf = self.buffer
        if self.kind == "transitions":
            return buf.sample(self.batch_size, **self.sampler_options)
        if self.kind == "sequences":
            return buf.sample_sequences(self.batch_size, self.length, **self.sampler_options)
        return buf.sample_episodes(self.batch_size, **self.sampler_options)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            where = buf_device = self.buffer.device
            if buf_device is not None and torch.device(where).type == "cuda":
                why = ("CUDA tensors do not cross worker processes, and sampling on the device "
                       "is already cheaper than a worker hop")
            else:
                why = ("a worker would sample its own copy of the buffer and miss the adds made "
                       "by the training loop")
            raise RuntimeError(f"BufferDataset: use DataLoader(..., num_workers=0): {why}")
        produced = 0
        while self.num_batches is None or produced < self.num_batches:
            yield self.sample()
            produced += 1
