"""BufferDataset: a thin IterableDataset that yields batches sampled on the buffer's device."""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import IterableDataset, get_worker_info

KINDS = ("transitions", "sequences", "episodes")


class BufferDataset(IterableDataset):
    """Yields ``buffer.sample*`` batches, forever or ``num_batches`` times per iteration.

    Each batch is exactly what the matching sampler returns (``kind="transitions"``:
    :meth:`~gpubuffers.ReplayBuffer.sample`, ``"sequences"``: ``sample_sequences(batch_size,
    length)``, ``"episodes"``: ``sample_episodes``), on the buffer's device, with no copy beyond
    the sample. The dataset holds the buffer, not a snapshot: adds made between batches are
    visible to the next batch. Use it directly (``for batch in ds``) or through
    ``DataLoader(ds, batch_size=None)``.

    Worker processes (``DataLoader(ds, batch_size=None, num_workers=k)``) need a CPU buffer built
    with ``storage="shared"``, allocated (one add made) before the loader starts. Every worker
    samples the whole live buffer, sees the rows the training loop adds after it started, and
    draws its own stream (seeded from the loader's worker seed, so a loader given a seeded
    ``generator`` repeats its batches). A worker reads while the training loop may overwrite the
    oldest rows: items it read while they were being overwritten come back with ``valid=False``
    (mask by ``valid``; their data means nothing). ``num_batches`` is split among the workers.
    A prioritized buffer is sampled where its priorities are updated (``num_workers=0``).
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
        self._left_behind: str | None = None

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("len(BufferDataset): the dataset yields forever; pass num_batches")
        return self.num_batches

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for a spawned worker: a buffer in private memory would arrive as a copy (all of
        # it), which the worker would refuse anyway; it stays behind and the worker says why.
        state = self.__dict__.copy()
        buf = self.buffer
        if buf is not None and buf.storage_kind == "memory":
            state["buffer"] = None
            device = buf.device
            state["_left_behind"] = "cuda" if device is not None and device.type == "cuda" else "memory"
        return state

    def sample(self) -> dict[str, Any]:
        """One batch, as the matching buffer sampler returns it."""
        buf = self.buffer
        if buf is None:
            raise RuntimeError("BufferDataset: this copy was pickled without its buffer (a buffer "
                               "with storage='memory' is not sent to other processes)")
        if self.kind == "transitions":
            return buf.sample(self.batch_size, **self.sampler_options)
        if self.kind == "sequences":
            return buf.sample_sequences(self.batch_size, self.length, **self.sampler_options)
        return buf.sample_episodes(self.batch_size, **self.sampler_options)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:
            produced = 0
            while self.num_batches is None or produced < self.num_batches:
                yield self.sample()
                produced += 1
            return
        view = self._worker_view(info.seed)
        count = None
        if self.num_batches is not None:
            count = self.num_batches // info.num_workers + (info.id < self.num_batches % info.num_workers)
        produced = 0
        while count is None or produced < count:
            yield view._read_batch(self.kind, self.batch_size, self.length, **dict(self.sampler_options))
            produced += 1

    def _worker_view(self, seed: int) -> Any:
        buf = self.buffer
        device = None if buf is None else buf.device
        where = self._left_behind or ("cuda" if device is not None and device.type == "cuda" else None)
        if where == "cuda":
            raise RuntimeError("BufferDataset: use DataLoader(..., num_workers=0) for a CUDA buffer: "
                               "sampling on the device is already cheaper than a worker hop")
        if where == "memory" or buf.storage_kind == "memory":
            raise RuntimeError("BufferDataset: worker processes need a buffer built with "
                               "storage='shared' or storage='disk' (a buffer with storage='memory' would be a copy "
                               "that misses the training loop's adds); or use num_workers=0")
        try:
            return buf._reader(seed)
        except RuntimeError as err:
            raise RuntimeError(f"BufferDataset: {err}") from None
