"""ReplayBuffer: time-major ring storage with a device episode index."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch

from . import checkpoint, disk, layout, lockstep, memory, ops, reference
from .layout import STATE_ADDS, STATE_OFFSET, TRUNCATED
from .reference import EpisodeIndex, PriorityTree, live_span, take, transition_ids, transition_links
from .specs import LeafSpec, as_tensor, carrier, check_leaf, flatten, resolve_device, unflatten
from .steps import (Lanes, check_step, check_storage_dtypes, conventions, leaves_under, narrowed,
                    new_specs, positive_int, real, scalar_leaf, seed_or_fresh)

#: Largest batch a sampler draws: the kernels number items with 32-bit program offsets.
MAX_BATCH = 2**31 - 1

#: Where a CPU buffer keeps its tensors: ``"memory"`` (private to the process) or ``"shared"``
#: (shared memory, read live by DataLoader worker processes).
STORAGE_KINDS = ("memory", "shared", "disk")

#: Adds a CUDA buffer keeps staged for its host mirror before it waits for the oldest copy.
MIRROR_PENDING = 64

#: Default exponent of the importance weights of prioritized samples (Schaul et al. 2016).
DEFAULT_BETA = 0.4


class _Step(NamedTuple):
    """One add, checked and converted: what the commit writes, and cannot fail on."""

    flat: dict[str, torch.Tensor]         # leaf path -> [1 or N, *shape], detached
    done: torch.Tensor | None             # [N] bool, or None: terminated | truncated
    terminated: torch.Tensor | None       # [N] bool
    truncated: torch.Tensor | None        # [N] bool
    reward: torch.Tensor | None           # [N] float32
    finals: dict[str, torch.Tensor] | None  # next leaf path -> [N, *shape]
    layout: dict[str, Any] | None         # the storage allocated by the first add
    mirrored: Any = None                  # the mirror's own _Step, or (event, its add's arguments) staged
    follows: bool = False                 # a mirror's step that copies its buffer's index rows


def _stored(values: dict[str, torch.Tensor], narrow: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """``values`` by leaf path, each converted to its storage dtype where ``narrow`` names one."""
    return {p: v.to(narrow[p]) if p in narrow else v for p, v in values.items()}


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is capturing a graph (a host query, no sync)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


#: The range of ``priority_eps``: from the smallest normal float32 (a priority of 0 keeps a
#: reachable share), to a bound under 2**103, half the spacing of float32 at its largest values,
#: so that ``priority + eps`` of any finite float32 priority rounds to a finite float32.
PRIORITY_EPS = (2.0 ** -126, 1e30)


class ReplayBuffer(Lanes):
    """A ring of ``capacity`` transitions from ``num_envs`` auto-resetting environments.

    Every leaf is stored as one preallocated tensor ``[T, N, *leaf_shape]`` with
    ``T = capacity // N`` rows (``capacity`` is rounded down to a multiple of ``N``), allocated
    on the first :meth:`add` from that step's shapes and dtypes, on ``device`` (default: the
    device of that step's tensors). When the ring is full the oldest row is overwritten.

    Args:
        capacity: transitions held at most (rounded down to ``T * N``; at least 2 rows).
        num_envs: number of lanes N; ``None`` is a single environment whose leaves carry no
            batch dimension and whose ``done`` is a Python bool or 0-d tensor.
        device: storage device; ``None`` takes the device of the first step's tensors. A device
            named without an index (``"cuda"``) means the current one (``cuda:0``).
        done_marks: ``"first"``: ``done[n]`` says this row follows the end of an episode
            (the ``was_done`` reading of CleanRL and rsl_rl); ``"last"``: this row is the last
            of its episode (the ``terminated | truncated`` returned by ``env.step``).
        autoreset: ``"same_step"`` (Isaac Lab, SB3, Brax): the row after an episode's end
            starts the next episode; ``"next_step"`` (gymnasium >= 1.0): the row after an
            episode's end is a reset row that holds the final observation and belongs to no
            episode.
        next_keys: leaves whose successor value samples return under ``"next"`` (``()`` for none).
        seed: seed of the sampling streams, an int in ``[-2**63, 2**63)``; ``None`` takes one
            from the operating system (the global torch random stream is left untouched).
        reward_key: the leaf summed into episode returns, of shape ``[N]`` or ``[N, 1]`` (a
            scalar per lane); the first add raises if the step has no such scalar leaf.
            ``None``: returns are not tracked, and ``episode_stats`` and ``sample_episodes`` carry
            no return.
        final_obs_capacity: final observations kept (default ``capacity // 8``, enough while
            episodes average 8 rows or more), as a ring per lane of ``ceil(final_obs_capacity / N)``
            rows (at least 2); when a lane ends more episodes while their transitions are still
            live, its oldest final observations are dropped and reported through ``next_valid``.
        max_proposals: uniform proposals per sampled item for the samplers that reject
            (sequences, ``next_step`` transitions); an item whose proposals are all rejected is
            returned with ``valid=False``.
        backend: ``"torch"`` (pure torch) or ``"triton"`` (kernels); default: triton for CUDA
            tensors when it is installed, else torch, unless ``GPUBUFFERS_BACKEND`` says otherwise.
        priority_alpha: ``None`` samples uniformly. A float in (0, 1] makes :meth:`sample` and
            :meth:`sample_sequences` draw in proportion to ``(priority + priority_eps) **
            priority_alpha`` (proportional prioritized replay) and return importance weights;
            priorities are set with :meth:`update_priorities`, and each new transition enters
            at the largest priority applied so far (1 before any update).
        priority_eps: added to every priority, so that no transition becomes unreachable: a
            float from the smallest normal float32 (about 1.2e-38; smaller ones round to 0 or
            to numbers a GPU may flush to 0) to 1e30 (beyond it ``priority + eps`` could
            overflow float32).
        storage_dtypes: leaves stored in a narrower dtype, ``{leaf or subtree name: dtype}``
            (``{"obs": torch.bfloat16}``): the ring (and side table) hold that dtype, ``add``
            converts each row as it writes it, and samples return the dtype the leaf was added
            in, widened inside the gather. Allowed: float64 -> float32, bfloat16 or float16;
            float32 -> bfloat16 or float16; int64/int32/int16 -> a narrower signed int or uint8
            (:data:`gpubuffers.steps.NARROWINGS`). Floats round to nearest; integers outside the
            stored range wrap, so name an integer leaf only when its values fit. Nothing is
            narrowed that is not named; the ``reward_key`` leaf is never narrowed.
        check_finite: ``add`` raises a ValueError naming the leaf and the lanes when a floating
            leaf (or final observation) holds NaN or Inf, also one that overflows to Inf in its
            storage dtype, before writing anything. This reads values (a host sync on CUDA): a
            debugging aid, off by default, when NaN and Inf are stored as given.
        storage: ``"memory"`` (default): tensors private to this process, on any device.
            ``"shared"``: a CPU buffer whose rings, episode index, side tables and cursors live
            in shared memory, so that :class:`~gpubuffers.BufferDataset` worker processes
            (``DataLoader(num_workers=k)``, fork or spawn) sample the live buffer, with its later
            adds, without copies; the process that built the buffer is the one that adds.
        mirror: another, empty ``ReplayBuffer`` (same ``num_envs``, ``done_marks``,
            ``autoreset``, ``next_keys`` and ``reward_key``, at least as many rows per lane; its
            own device, capacity, storage, storage dtypes and priorities) that every :meth:`add`
            also writes, checked with this buffer's add so that a rejected call changes neither.
            Its episode index, final observations and statistics are its own, as if the same
            steps had been added to it directly. From a CUDA buffer to a CPU mirror the rows are
            copied on a side stream into pinned memory and written to the mirror once the copy
            has landed, a few adds later, with no host sync on the add path (:meth:`sync_mirror`
            waits for all of them); otherwise the mirror's add runs within this one. Between
            two CPU buffers that have had the same adds since both were empty, the mirror copies
            this buffer's new index rows, sums and final-obs entries instead of computing them
            again (the same values: rows are absolute); a load into either, or an add made to the
            mirror directly, ends that for good. Add only through this buffer.
    """

    def __init__(self, capacity: int, num_envs: int | None = None, *,
                 device: str | torch.device | None = None, done_marks: str = "first",
                 autoreset: str = "same_step", next_keys: Sequence[str] = ("obs",),
                 seed: int | None = None, reward_key: str | None = "reward",
                 final_obs_capacity: int | None = None, max_proposals: int = 32,
                 backend: str | None = None, priority_alpha: float | None = None,
                 priority_eps: float = 1e-6, storage_dtypes: Mapping[str, torch.dtype] | None = None,
                 check_finite: bool = False, storage: str = "memory", path: Any = None,
                 flush_every: int | None = None, overwrite: bool = False,
                 mirror: "ReplayBuffer | None" = None) -> None:
        capacity = positive_int(capacity, "capacity")
        lanes = 1 if num_envs is None else positive_int(num_envs, "num_envs")
        if capacity // lanes > layout.MAX_ROWS:
            raise ValueError(f"capacity: expected at most {layout.MAX_ROWS} rows per lane, got "
                             f"{capacity // lanes} ({capacity} // num_envs={lanes})")
        if capacity // lanes < 2:
            raise ValueError(f"capacity: expected at least 2 rows per lane (>= {2 * lanes} for "
                             f"num_envs={lanes}), got {capacity}")
        marks_last, next_step = conventions(done_marks, autoreset)
        if (isinstance(next_keys, (str, bytes)) or not isinstance(next_keys, Sequence)
                or not all(isinstance(k, str) and k for k in next_keys)):
            raise TypeError(f"next_keys: expected a sequence of leaf names (() for none), "
                            f"got {next_keys!r}")
        seed = seed_or_fresh(seed)
        if reward_key is not None and (not isinstance(reward_key, str) or not reward_key):
            raise TypeError(f"reward_key: expected a leaf name or None, got {reward_key!r}")
        if final_obs_capacity is not None:
            final_obs_capacity = positive_int(final_obs_capacity, "final_obs_capacity")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS} or None, got {backend!r}")
        if priority_alpha is not None:
            priority_alpha = real(priority_alpha, "priority_alpha", 0.0, 1.0, open_low=True)
        priority_eps = real(priority_eps, "priority_eps", *PRIORITY_EPS)
        self.storage_dtypes = check_storage_dtypes(storage_dtypes)
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite: expected a bool, got {check_finite!r}")
        self.check_finite = check_finite
        if storage not in STORAGE_KINDS:
            raise ValueError(f"storage: expected one of {STORAGE_KINDS}, got {storage!r}")
        self.storage_kind = storage
        if storage == "disk":
            if path is None:
                raise ValueError("path: storage='disk' needs the folder to write the buffer's files in")
            if priority_alpha is not None:
                raise ValueError("priority_alpha: a disk buffer is uniform (it is a dataset that workers "
                                 "and later processes read); keep prioritized replay in a memory buffer")
            if not isinstance(overwrite, bool):
                raise TypeError(f"overwrite: expected a bool, got {overwrite!r}")
            self._path = disk.check_new(path, overwrite)
            rows = capacity // lanes
            #: Adds between flushes; None until the first add sets the default (see ``flush_every``).
            self.flush_every = (None if flush_every is None
                                else positive_int(flush_every, "flush_every", max(1, rows // 2)))
        else:
            for name, value in (("path", path), ("flush_every", flush_every)):
                if value is not None:
                    raise ValueError(f"{name}: only for storage='disk', got {value!r} with storage={storage!r}")
            self._path = None
            self.flush_every = None
        self._overwrite = overwrite
        #: Disk storage: the mapped files (None until the first add allocates them).
        self._disk: disk.Files | None = None
        self._flushed_at = 0  # adds covered by the header
        self._pending: list[tuple[Any, _Step]] = []
        #: Counts what replaces the index other than an add (a load, a reopen, a close): a mirror
        #: follows its buffer's index only while neither count has moved since it was attached.
        self._epoch = 0
        self._lockstep: tuple[int, int] | None = None
        self._mirror_stream = None
        #: On a worker's view (:meth:`_reader`): the owner's episode index, read live.
        self._source: EpisodeIndex | None = None
        #: Shared storage: [1] int64, adds begun (counted before an add writes anything; the
        #: index's ``state`` counts them once all is written), what worker views compare against.
        self._begun: torch.Tensor | None = None
        self._narrow: dict[str, torch.dtype] = {}
        self.priority_alpha = priority_alpha
        self.priority_eps = priority_eps
        self._tree: PriorityTree | None = None
        self._rows = capacity // lanes
        self._lanes = lanes
        self._single = num_envs is None
        self._device = None if device is None else resolve_device(device)
        if self._device is not None:
            self._check_storage_device(self._device)
        self._marks_last = marks_last
        self._next_step = next_step
        self.done_marks = done_marks
        self.autoreset = autoreset
        self.next_keys = tuple(next_keys)
        self.reward_key = reward_key
        self.max_proposals = positive_int(max_proposals, "max_proposals")
        self._final_rows = layout.final_rows(final_obs_capacity, self.capacity, lanes)
        self._seed = seed
        self._backend = backend
        self._specs: dict[str, LeafSpec] | None = None
        self._storage: dict[str, torch.Tensor] = {}
        self._flat: dict[str, torch.Tensor] = {}
        self._final: dict[str, torch.Tensor] = {}
        self._next_src: dict[str, torch.Tensor] = {}
        self._next_leaves: list[str] = []
        self._episode_ends: tuple[torch.Tensor, torch.Tensor] | None = None  # per add: (eligible, cumsum)
        self._episode_rows = 1       # host power of two >= the longest whole stored episode
        self._episode_rows_at = -1   # num_adds when _episode_rows was last brought up to date
        self._ix: EpisodeIndex | None = None
        self._rng: ops.Rng | None = None
        self._ops = None
        self._total = 0
        self._floor = 0  # host copy of state[STATE_FLOOR]
        self._shapes: dict[str, torch.Size] | None = None
        self._reward_tracked = False
        self._row_stats: torch.Tensor | None = None
        self._stat_totals: torch.Tensor | None = None
        self.mirror = self._check_mirror(mirror)

    # ------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        """Transitions held at most: ``T * N``."""
        return self._rows * self._lanes

    @property
    def rows(self) -> int:
        """Rows per lane, T."""
        return self._rows

    @property
    def storage(self) -> dict[str, torch.Tensor]:
        """The ring tensors ``[T, N, *leaf_shape]`` by leaf path, in their storage dtype (read
        them, do not write)."""
        return dict(self._storage)

    @property
    def index(self) -> EpisodeIndex | None:
        """The device episode index (read it, do not write)."""
        return self._ix

    @property
    def num_adds(self) -> int:
        """Rows added since construction."""
        return self._total

    @property
    def live_rows(self) -> int:
        """Rows per lane that can be sampled: the newest T, none below a reopened disk buffer's
        floor (see :meth:`open`)."""
        return layout.live_span(self._total, self._rows, self._floor)[0]

    @property
    def oldest_row(self) -> int:
        """Absolute row (add number) of the oldest live row."""
        return layout.live_span(self._total, self._rows, self._floor)[1]

    def __len__(self) -> int:
        """Transitions stored (live slots)."""
        return self.live_rows * self._lanes

    @property
    def num_episodes(self) -> torch.Tensor:
        """[] int64 on the device: finished episodes whose rows are all still stored
        (what :meth:`sample_episodes` draws from). Reading it as a Python int syncs."""
        if self._ix is None:
            return torch.zeros((), dtype=torch.int64)
        return self._episode_cumsum()[1][-1].clone()

    def episode_stats(self, last_rows: int | None = None) -> dict[str, torch.Tensor]:
        """Statistics of the episodes that ended in the newest ``last_rows`` rows (default: all
        live rows), as device tensors, without a host sync.

        Returns ``count`` [] int64, ``mean_length`` and ``mean_return`` [] float64 (NaN while
        none has ended; no ``mean_return`` when ``reward_key=None``); lengths and returns count
        whole episodes, also those whose first rows were overwritten. Per-row sums kept as rows
        are written make the whole buffer O(1) and a window O(last_rows), whatever N.
        """
        return self._stats_of(self._episode_sums(last_rows))

    def _episode_sums(self, last_rows: int | None) -> torch.Tensor:
        """[3] float64 on the device: episodes ended in the newest ``last_rows`` rows (default:
        all live rows), the sum of their lengths, the sum of their returns."""
        if self._ix is None:
            raise ValueError("episode_stats: the buffer is empty; add steps first")
        if last_rows is not None:
            last_rows = positive_int(last_rows, "last_rows")
        if last_rows is None or last_rows >= self._rows:
            return self._stat_totals  # every live row
        # The newest last_rows rows, counted back from the device cursor (graph-safe); rows
        # before the first add hold no sums.
        adds = self._ix.state[STATE_ADDS]
        back = torch.arange(1, last_rows + 1, device=self._device)
        sums = self._row_stats.index_select(0, (adds - back) % self._rows)
        return torch.where((adds - back >= 0)[:, None], sums, 0.0).sum(0)

    def _stats_of(self, sums: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`episode_stats` from its three sums."""
        count = sums[0]
        nan = torch.full((), math.nan, dtype=torch.float64, device=sums.device)
        some = count > 0
        out = {"count": count.round().long(), "mean_length": torch.where(some, sums[1] / count, nan)}
        if self._reward_tracked:
            out["mean_return"] = torch.where(some, sums[2] / count, nan)
        return out

    # ------------------------------------------------------------------ memory
    def nbytes(self, step: Any = None) -> dict[str, Any]:
        """Bytes the buffer holds: ``{"leaves": {path: bytes of its ring (and side table)},
        "index": the episode index, "priority": the priority tree (0 when uniform), "stats": the
        per-row episode sums, "scratch": the largest sampling temporaries that grow with
        capacity (``sample_episodes``' tables), "total": all of them}``. With ``step`` (an
        example step as :meth:`add` takes it) the figures for that layout, before anything is
        allocated; without, the buffer's own (after the first add)."""
        if step is None:
            if self._specs is None:
                raise ValueError("nbytes: the buffer is empty; add a step first, or pass an example step")
            return self._footprint(self._specs)
        flat = {p: as_tensor(v, f"step['{p}']", None) for p, v in flatten(step, "step").items()}
        specs = new_specs(flat, () if self._single else (self._lanes,))
        if self._specs is not None and specs != self._specs:
            raise ValueError(f"step: its leaves {specs} differ from this buffer's {self._specs}")
        return self._footprint(specs)

    def _footprint(self, specs: dict[str, LeafSpec]) -> dict[str, Any]:
        """:meth:`nbytes` of a layout, counted from the same constructors the allocation runs,
        on the meta device (no memory)."""
        rows, lanes = self._rows, self._lanes
        reward = self._reward_leaf(specs)
        narrow = narrowed(self.storage_dtypes, specs, [reward or ""])
        next_leaves = {p for k in self.next_keys for p in leaves_under(k, specs)}
        extended = layout.next_source_rows(rows, self._final_rows, not self._next_step)
        leaves = {p: (extended if p in next_leaves else rows) * lanes * math.prod(sp.shape)
                  * narrow.get(p, sp.dtype).itemsize for p, sp in specs.items()}
        meta = torch.device("meta")
        ix = EpisodeIndex.empty(rows, lanes, meta)
        index = memory.nbytes([ix.start, ix.end_flags, ix.ret, ix.final_idx, ix.fin_head, ix.state])
        priority = 0
        if self.priority_alpha is not None:
            tree = PriorityTree.empty(rows * lanes, lanes, self.priority_alpha, self.priority_eps, meta)
            priority = memory.nbytes([tree.leaf, tree.sums, tree.mins, tree.maxp])
        stats = (rows + 1) * 3 * 8
        scratch = rows * lanes * memory.SCRATCH_BYTES_PER_SLOT
        return {"leaves": leaves, "index": index, "priority": priority, "stats": stats, "scratch": scratch,
                "total": sum(leaves.values()) + index + priority + stats + scratch}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (see :mod:`gpubuffers.checkpoint`): ``{"header":
        settings, leaf specs and counters, "tensors": the live rows, the episode index, side
        tables, statistics, priorities and random state}``; tensors are views where they can be."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into this buffer, built with the same settings (a
        ValueError names any that differ; nothing changes then). Afterwards adds and samples
        continue exactly as they would have in the saved buffer, on the same backend and device
        kind; across device kinds the Philox stream (Triton backend) continues, and the torch
        generator (reference backend) restarts from the seed."""
        checkpoint.load_state_dict(self, state)

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to ``path`` (safetensors + a JSON header, checksummed, written
        atomically: a crash leaves the previous file at ``path`` intact)."""
        checkpoint.save(self, path)

    @classmethod
    def load(cls, path: str, device: str | torch.device | None = None,
             storage: str = "memory") -> "ReplayBuffer":
        """A buffer restored from a :meth:`save` file, on ``device`` (default: the kind of
        device it was saved from; the CPU for ``storage="shared"``), its tensors kept as
        ``storage`` says (``"shared"``: for DataLoader worker processes). A damaged file, a newer
        format or a checksum that does not match raises a ValueError."""
        return checkpoint.load(cls, path, device, storage)

    # ------------------------------------------------------------------ disk storage
    def _disk_counters(self, adds: int, floor: int, fin_head: list[int], clean: bool, offset: int) -> dict[str, Any]:
        return {"adds": adds, "floor": floor, "fin_head": fin_head, "clean": clean, "rng_offset": offset,
                "flush_every": self.flush_every, "episode_rows": self._episode_rows}

    def _check_disk_writer(self, what: str) -> None:
        if self.storage_kind != "disk":
            raise ValueError(f"{what}: only a storage='disk' buffer has files; this one has "
                             f"storage={self.storage_kind!r}")
        if self._disk is not None and not self._disk.writable:
            raise ValueError(f"{what}: this disk buffer was opened read-only; "
                             f"ReplayBuffer.open(path, writable=True) to add to it")

    def flush(self) -> None:
        """``storage="disk"``: put every row added so far on disk (msync), then the header that
        counts them (atomic rename): a process killed after ``flush`` returns reopens with all of
        them but the ``flush_every`` oldest, which the next adds may be overwriting (see
        :mod:`gpubuffers.disk`). Runs by itself every ``flush_every`` adds."""
        self._check_disk_writer("flush")
        if self._disk is not None:
            self._write_header(clean=False)

    def close(self) -> None:
        """``storage="disk"``: flush and record the exact counters (a reopen keeps every live
        row), then unmap the files and let go of the folder; the object is empty afterwards
        (``ReplayBuffer.open`` reads the folder again). Also what ``with`` does on exit. A no-op
        for other storages and for read-only opens (they only unmap)."""
        if self._disk is None:
            return
        if self._disk.writable:
            self._write_header(clean=True)
        self._disk.close()
        self._epoch += 1
        self.__dict__.update(_disk=None, _ix=None, _storage={}, _flat={}, _final={}, _next_src={},
                             _row_stats=None, _stat_totals=None, _begun=None, _specs=None, _ops=None,
                             _episode_ends=None, _total=0, _floor=0, _source=None)

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _write_header(self, clean: bool) -> None:
        self._disk.sync()
        adds = self._total
        floor = max(adds - self._rows + (0 if clean else self.flush_every), self._floor, 0)
        disk.write_header(self._disk, self._disk_counters(adds, floor, self._ix.fin_head.tolist(), clean,
                                                          self._rng.offset))
        self._flushed_at = adds

    @classmethod
    def open(cls, path: Any, writable: bool = False, *, seed: int | None = None) -> "ReplayBuffer":
        """The disk buffer in the folder ``path`` (a ``storage="disk"`` buffer's files), on the CPU.

        ``writable=False`` (default): read only, the rows its header counts (what was flushed
        when it was opened); sample it here or through ``BufferDataset`` workers. ``writable=True``:
        keep adding (one writer at a time: the folder is locked). Rows that a killed writer added
        after its last flush are gone, and so are at most the ``flush_every`` oldest rows, which
        were being reclaimed (``oldest_row`` says where the live rows begin). A writable open
        ends the episodes still running at the last row there, as truncations without a final
        observation (``next_valid=False``); the next add starts a new episode in every lane.
        ``seed``: the sampling stream's seed (default: the buffer's). A folder that holds no disk
        buffer, or one of another format or version, is a ValueError.
        """
        if not isinstance(writable, bool):
            raise TypeError(f"writable: expected a bool, got {writable!r}")
        path = disk.folder(path)
        header = disk.read_header(path)
        settings = dict(header["settings"])
        settings["storage_dtypes"] = {k: checkpoint.DTYPES[d] for k, d in settings.get("storage_dtypes", {}).items()}
        if seed is not None:
            settings["seed"] = seed
        buf = cls(**settings, device="cpu")
        counters = header["counters"]
        buf.storage_kind, buf._path, buf.flush_every = "disk", path, counters["flush_every"]
        specs = {p: LeafSpec(tuple(sp["shape"]), checkpoint.DTYPES[sp["dtype"]]) for p, sp in header["specs"].items()}
        files, whole, index = disk.attach(path, header, writable, checkpoint.DTYPES, "map" if writable else "copy")
        try:
            buf.__dict__.update(buf._attached(specs, torch.device("cpu"), files, whole, index))
            with torch.no_grad():
                buf._reopen(counters, writable)
        except BaseException:
            files.close()
            raise
        return buf

    def _reopen(self, counters: dict[str, Any], writable: bool) -> None:
        """Bring the index of an opened disk buffer to its header: the counters, the floor, a
        margin on the final-observation counters, no sums outside the live rows; writable: the
        running episodes cut at the last row, the next add a restart, and a new header."""
        self._epoch += 1
        ix, rows, lanes = self._ix, self._rows, self._lanes
        adds, floor, clean = counters["adds"], counters["floor"], counters["clean"]
        if len(counters["fin_head"]) != lanes:
            raise ValueError(f"path: the header counts final observations for {len(counters['fin_head'])} "
                             f"lanes, the buffer has {lanes}")
        margin = 0 if clean else self.flush_every  # finals a killed writer may have stored per lane
        ix.fin_head.copy_(torch.tensor(counters["fin_head"], dtype=torch.int64) + margin)
        offset = counters["rng_offset"]
        state = [0] * layout.STATE_SIZE
        state[STATE_ADDS], state[STATE_OFFSET] = adds, offset
        state[layout.STATE_FLOOR], state[layout.STATE_RESTART] = floor, adds
        ix.state.copy_(torch.tensor(state, dtype=torch.int64))
        if writable:
            self._begun.fill_(adds)  # a reader's is the writer's, read live
        self._total, self._floor, self._flushed_at = adds, floor, adds
        self._rng.offset = offset
        self._episode_rows = counters.get("episode_rows", 1)
        if adds > 0:
            prev = (adds - 1) % rows
            if not self._marks_last:
                # In first mode the last row's end arrives with the next add: one that a killed
                # writer made after its flush is not counted.
                ix.end_flags[prev] = 0
                self._row_stats[prev] = 0.0
            live, oldest = layout.live_span(adds, rows, floor)
            dead = (torch.arange(rows) - oldest) % rows >= live
            self._row_stats[dead] = 0.0
            if writable:
                start, flags = ix.start[prev], ix.end_flags[prev]
                running = (start != layout.SENTINEL) & (flags == 0)
                ix.end_flags[prev] = torch.where(running, layout.ENDED | TRUNCATED, flags)
                self._row_stats[prev] += torch.stack([
                    running.sum().double(), torch.where(running, adds - start, 0).sum().double(),
                    torch.where(running, ix.ret[prev], 0.0).sum(dtype=torch.float64)])
            self._stat_totals.copy_(self._row_stats.sum(0))
        if writable:
            self._write_header(clean=False)

    def __repr__(self) -> str:
        return (f"ReplayBuffer(capacity={self.capacity}, num_envs={self.num_envs}, rows={self._rows}, "
                f"done_marks={self.done_marks!r}, autoreset={self.autoreset!r}, "
                f"device={self._device}, adds={self._total}"
                f"{'' if self.priority_alpha is None else f', priority_alpha={self.priority_alpha}'}"
                f"{'' if self.storage_kind == 'memory' else f', storage={self.storage_kind!r}'})")

    # ------------------------------------------------------------------ worker processes
    def _check_storage_device(self, device: torch.device) -> None:
        if self.storage_kind != "memory" and device.type != "cpu":
            what = "shared memory" if self.storage_kind == "shared" else "memory-mapped files"
            raise ValueError(f"device: storage={self.storage_kind!r} holds CPU tensors ({what} "
                             f"that worker processes map), got {device}; keep {device.type} buffers in "
                             f"storage='memory' and sample them on the device (mirror=... copies their "
                             f"rows into a {self.storage_kind} buffer)")

    def __getstate__(self) -> dict[str, Any]:
        # The ops are a module or a kernel table: found again from the device where unpickled.
        # A generator travels as its state bytes (a generator pickles its state as a tensor, which
        # a multiprocessing pickler cannot send).
        state = self.__dict__.copy()
        state["_ops"] = None
        if self._disk is not None:
            # Memory-mapped tensors travel as their files, mapped again where unpickled.
            state.update(_storage={}, _flat={}, _final={}, _next_src={})
            state["_begun"] = None
            if self._disk.index_mapped:
                state.update(_ix=None, _row_stats=None, _stat_totals=None)
        # A mirror is written by the process that adds; copies elsewhere only read.
        state.update(mirror=None, _pending=[], _mirror_stream=None)
        rng = self._rng
        if rng is not None:
            state["_rng"] = (rng.generator.device, bytes(rng.generator.get_state().numpy()), rng.seed, rng.offset)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        files = self._disk
        if files is not None:
            mode = "map" if files.index_mapped else "skip"
            files, whole, index = disk.attach(files.path, files.header, False, checkpoint.DTYPES, mode)
            self.__dict__.update(self._leaf_attrs(self._specs, self._device, whole), _disk=files,
                                 _begun=index["index-begun"])
            if mode == "map":
                attached = self._attached(self._specs, self._device, files, whole, index)
                self.__dict__.update({k: attached[k] for k in ("_ix", "_row_stats", "_stat_totals", "_begun")})
        if self._rng is not None:
            device, generator_state, seed, offset = self._rng
            gen = torch.Generator(device=device)
            gen.set_state(torch.frombuffer(bytearray(generator_state), dtype=torch.uint8))
            self._rng = ops.Rng(gen, seed, offset)
        if self._device is not None and self._specs is not None:
            self._ops = ops.backend(self._device, self._backend)

    def _reader(self, seed: int) -> "ReplayBuffer":
        """A read-only view of this ``storage="shared"`` buffer for a process that samples it
        while this one adds (a DataLoader worker): the same shared tensors, a private copy of the
        cursors that :meth:`_read_batch` brings up to date before each batch, and its own random
        stream from ``seed`` (the owner's generator and Philox offset are never advanced)."""
        if self.storage_kind == "memory":
            raise RuntimeError("the buffer was built with storage='memory': a worker process would "
                               "sample a copy and miss the adds made after it started")
        if self._ix is None:
            raise RuntimeError("the buffer's shared storage is allocated by its first add: add a "
                               "step before workers start")
        if self._tree is not None:
            raise RuntimeError("a prioritized buffer (priority_alpha=...) is sampled by the process "
                               "that updates its priorities: sample it there (num_workers=0)")
        seed = int(seed) & (2**63 - 1)
        view = copy.copy(self)
        view._source = self._ix if self._source is None else self._source
        view._ix = dataclasses.replace(self._ix, state=self._ix.state.clone(),
                                       fin_head=self._ix.fin_head.clone())
        view._ix.state[STATE_OFFSET] = 0
        gen = torch.Generator(device=self._device)
        gen.manual_seed(seed)
        view._rng = ops.Rng(gen, seed)
        view._episode_ends = None
        view._episode_rows_at = -1
        return view

    def _refresh(self) -> None:
        """A view's snapshot of the owner's cursors: rows added, then final observations stored
        per lane (in the order the owner advances them, so no end is seen before its row)."""
        src, ix = self._source, self._ix
        ix.state[STATE_ADDS:STATE_ADDS + 1].copy_(src.state[STATE_ADDS:STATE_ADDS + 1])
        ix.fin_head.copy_(src.fin_head)
        total = int(ix.state[STATE_ADDS])
        if total != self._total:
            self._total = total
            self._episode_ends = None

    def _read_batch(self, kind: str, batch_size: int, length: int | None = None,
                    **options: Any) -> dict[str, Any]:
        """One batch on a view, read like a sequence lock: sample from a snapshot of the owner's
        cursors (``a0`` rows added, ``h0`` final observations per lane), gather, then read how
        many adds the owner has begun (``b1``) and mark ``valid=False`` every item that may have
        been overwritten meanwhile: those whose first row is at most ``b1 - 1 - T`` (the adds
        ``a0 .. b1 - 1`` write the slots of rows ``a0 - T .. b1 - 1 - T``), and those whose
        successor is a final observation in a side-table row that the at most ``b1 - a0`` final
        observations stored per lane since the snapshot may reuse. Episodes so marked also leave
        ``mask``, and their ``index`` becomes -1."""
        self._refresh()
        lanes, succ = self._lanes, None
        if kind == "transitions":
            out, succ = self._sample(batch_size, options.pop("n_step", 1), options.pop("gamma", None),
                                     options.pop("priority_beta", None))
            if options:
                raise TypeError(f"sample: unexpected options {sorted(options)}")
            first = out["index"]
        elif kind == "sequences":
            out = self.sample_sequences(batch_size, length, **options)
            first = out["index"][:, 0]
        else:
            out = self.sample_episodes(batch_size, **options)
            starts = out["cu_seqlens"][:-1].clamp(max=out["index"].shape[0] - 1)
            first = out["index"][starts]
        begun = int(self._begun[0])
        torn = first.div(lanes, rounding_mode="floor") <= begun - 1 - self._rows
        if succ is not None and self._final:
            ring, k = self._rows * lanes, self._final_rows
            lane = out["index"] % lanes
            table_row = (succ - ring).div(lanes, rounding_mode="floor")
            head = self._ix.fin_head[lane]
            counter = head - 1 - (head - 1 - table_row) % k  # the kept counter stored in that row
            reused = counter + k <= head + (begun - self._total) - 1
            torn |= (succ >= ring) & out["next_valid"] & reused
        out["valid"] = out["valid"] & ~torn
        if kind == "episodes":
            rows = torch.arange(out["mask"].shape[0], device=self._device)
            episode = torch.searchsorted(out["cu_seqlens"][1:], rows, right=True)
            keep = out["mask"] & ~torn[episode.clamp(max=batch_size - 1)]
            out["mask"] = keep
            out["index"] = torch.where(keep, out["index"], -1)
        return out

    # ------------------------------------------------------------------ add
    def add(self, step: Any, done: Any = None, *, terminated: Any = None, truncated: Any = None,
            final_obs: Any = None) -> None:
        """Write one row: the same step of every lane.

        step: (nested) dict or TensorDict of leaves ``[N, *leaf_shape]`` (``[*leaf_shape]`` for
            a single environment); numpy arrays are converted. Values are stored detached: a
            leaf that requires grad never links the buffer to the autograd graph.
        done: [N] bool (integer 0/1 accepted) read as ``done_marks`` says; may be left out when
            ``terminated`` is given, and is then ``terminated | truncated``.
        terminated: [N] bool, the episodes that the flags close ended by termination. Pass it
            with ``truncated`` as ``env.step`` returns them: a lane with both set is a
            termination (termination takes precedence, as in gymnasium and SB3).
        truncated: [N] bool, the episodes that the flags close ended by truncation (a time
            limit), not termination; default all False. Without ``terminated``, a lane flagged
            ``truncated`` is taken as truncated only: pass ``truncated & ~terminated`` then.
        final_obs: for ``autoreset="same_step"``: the true final observation of the episodes
            that the flags close with this add, as a tensor (one next key) or a dict by next
            key, ``[N, *leaf_shape]``; rows of lanes whose episode did not end are ignored.

        In ``done_marks="first"`` the flags, ``terminated``, ``truncated`` and ``final_obs``
        describe the episode that ended on the previous row (they arrive one add late).
        The whole call is checked and converted before anything is written: a rejected call
        leaves the buffer exactly as it was.
        """
        prepared = self._prepare(step, done, terminated, truncated, final_obs)
        with torch.no_grad():
            self._commit(prepared)

    def _prepare(self, step: Any, done: Any, terminated: Any, truncated: Any, final_obs: Any) -> _Step:
        """Check and convert one add; allocate the storage on the first. Writes nothing to the
        buffer: every failure of an add happens here."""
        if self._source is not None:
            raise RuntimeError("add: this is a worker's read-only view of a shared buffer; add in "
                               "the process that built the buffer")
        if self._disk is not None and not self._disk.writable:
            raise RuntimeError("add: this disk buffer is open read-only; ReplayBuffer.open(path, "
                               "writable=True) to add to it")
        lay = self._layout()
        st = check_step(lay, step, done, terminated, truncated)
        specs, device = st.specs, st.device
        if self._specs is None:
            self._check_storage_device(device)
            missing = [k for k in self.next_keys if not leaves_under(k, specs)]
            if missing:
                raise ValueError(f"next_keys: {missing} are not leaves of the step (leaves: {sorted(specs)})")
        finals = None
        if final_obs is not None:
            finals = self._check_final(final_obs, specs, lay.batch, device)
        given = st.flat
        reward_leaf = self._reward_leaf(specs)
        reward = None
        if reward_leaf is not None:
            reward = st.flat[reward_leaf].reshape(self._lanes)
            if reward.dtype != torch.float32:
                reward = reward.to(torch.float32)
        if finals is not None:
            finals = {k: v.detach().reshape(self._lanes, *specs[k].shape) for k, v in finals.items()}
        given_finals = finals
        narrow = self._narrow if self._specs is not None else narrowed(self.storage_dtypes, specs,
                                                                        [reward_leaf or ""])
        flat = st.flat
        if narrow:
            flat = _stored(flat, narrow)
            if finals is not None:
                finals = _stored(finals, narrow)
        if self.check_finite:
            self._check_finite(st.flat, flat, "step")
            if finals is not None:
                self._check_finite(finals, finals, "final_obs")
        new_layout = self._allocate(specs, device) if self._specs is None else None
        mirrored = None
        if self.mirror is not None:
            mirrored = self._mirror_prepare(given, st, given_finals, device)
        return _Step(flat, st.done, st.terminated, st.truncated, reward, finals, new_layout, mirrored)

    def _check_finite(self, given: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], what: str) -> None:
        """``check_finite``: raise for the first floating leaf with NaN or Inf (as given, or once
        converted to its storage dtype), naming the lanes (reads values: a host sync)."""
        for p, v in stored.items():
            if not v.dtype.is_floating_point:
                continue
            bad = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(1)
            if bool(bad.any()):
                lanes = bad.nonzero().flatten().tolist()
                shown = lanes[:8] + (["..."] if len(lanes) > 8 else [])
                given_bad = not bool(torch.isfinite(given[p]).all())
                how = "holds NaN or Inf" if given_bad else f"overflows to Inf when stored as {v.dtype}"
                raise ValueError(f"{what}['{p}']: {how} at lanes {shown} ({len(lanes)} of "
                                 f"{v.shape[0]}); check_finite=True refuses it (nothing was written)")

    def _commit(self, st: _Step, source: "ReplayBuffer | None" = None, ended: torch.Tensor | None = None) -> None:
        """Write a prepared add: storage row, episode index, side table, statistics, priorities,
        cursors. With ``source`` (``st.follows``: this is that buffer's mirror, in lockstep, and
        ``ended`` its add's ended lanes), the index rows, sums and final-obs entries are copied
        from ``source``, whose own ops for the same add have just run and whose cursors have not
        yet advanced.
        Only writes into memory that exists and tensors whose shapes and dtypes were checked;
        every row it writes is read from the device cursors (graph-safe), except in lockstep,
        which runs on CPU tensors only and takes its rows from the host count."""
        if st.layout is not None:
            self.__dict__.update(st.layout)
        ix, ops_ = self._ix, self._ops
        if self._begun is not None:
            self._begun.add_(1)
        leaves = [] if st.finals is None else list(st.finals)
        sides, values = [self._final[k] for k in leaves], [st.finals[k] for k in leaves]
        if source is None:
            row = ix.state[STATE_ADDS:STATE_ADDS + 1] % self._rows
            for p, v in st.flat.items():
                carrier(self._storage[p]).index_copy_(0, row, carrier(v)[None])
            ended = ops_.add_step(ix, st.done, st.terminated, st.truncated, st.finals is not None, st.reward,
                                  self._marks_last, self._next_step)
            ops_.record_ends(ix, self._row_stats, self._stat_totals, ended, self._marks_last)
            if st.finals is not None:
                ops_.store_finals(ix, ended, self._marks_last, self._final_rows, sides, values)
        else:  # CPU tensors (see _follows): rows from the host count
            for p, v in st.flat.items():
                self._storage[p][self._total % self._rows] = v
            lockstep.copy_step(ix, self._row_stats, self._stat_totals, source._ix, source._row_stats,
                               self._total, self._marks_last)
            if st.finals is not None:
                lockstep.copy_finals(ix, source._ix, ended, self._total, self._marks_last, self._final_rows,
                                     sides, values)
        if self._tree is not None:
            ops_.promote(ix, self._tree)
        follows = isinstance(st.mirrored, _Step) and st.mirrored.follows
        if follows:
            self.mirror._commit(st.mirrored, self, ended)  # before this index advances: it reads its rows
        ops_.advance(ix)
        self._total += 1
        self._episode_ends = None
        if self._disk is not None and self._total - self._flushed_at >= self.flush_every:
            self._write_header(clean=False)  # before the next add may overwrite a flushed row
        if st.mirrored is not None and not follows:
            self._mirror_commit(st.mirrored)

    # ------------------------------------------------------------------ mirror
    def _check_mirror(self, mirror: Any) -> "ReplayBuffer | None":
        if mirror is None:
            return None
        if not isinstance(mirror, ReplayBuffer):
            raise TypeError(f"mirror: expected a gpubuffers.ReplayBuffer, got {type(mirror).__name__}")
        for name in ("num_envs", "done_marks", "autoreset", "next_keys", "reward_key"):
            mine, theirs = getattr(self, name), getattr(mirror, name)
            if mine != theirs:
                raise ValueError(f"mirror: its {name}={theirs!r} differs from this buffer's {name}={mine!r}")
        if mirror.rows < self._rows:
            raise ValueError(f"mirror: expected at least this buffer's {self._rows} rows per lane "
                             f"(capacity >= {self.capacity}), got {mirror.rows} (capacity {mirror.capacity})")
        if mirror.num_adds or mirror._ix is not None:
            raise ValueError(f"mirror: expected an empty buffer, got one with {mirror.num_adds} adds "
                             f"(its episodes would run on into this buffer's)")
        if mirror._source is not None:
            raise ValueError("mirror: a worker's read-only view cannot be added to")
        self._lockstep = (self._epoch, mirror._epoch)
        return mirror

    def _follows(self, device: torch.device) -> bool:
        """Whether the mirror's next add may copy this buffer's index rows (:meth:`_commit`,
        :mod:`gpubuffers.lockstep`): both on the CPU, and in lockstep (both were empty when the
        first add came, and every add since went to both, nothing else replacing either index)."""
        mirror = self.mirror
        return (mirror._specs is not None and self._ix is not None and device.type == "cpu"
                and mirror.device == device and self._lockstep == (self._epoch, mirror._epoch)
                and mirror._total == self._total)

    def _mirror_prepare(self, given: dict[str, torch.Tensor], st: Any, finals: dict[str, torch.Tensor] | None,
                        device: torch.device) -> Any:
        """The mirror's checked add of the same step (as given, before any narrowing): its own
        ``_Step``; or, when the step is staged from CUDA into pinned host memory on a side stream,
        ``(event, the mirror's add arguments)``, checked and written once the copy has landed.
        Deferring the check is safe there: the mirror's leaves were set by the same first add as
        this buffer's (which runs synchronously), so what this buffer accepted the mirror accepts,
        except for a finite check, which waits for the copy and runs now."""
        mirror = self.mirror
        if self._follows(device):
            # The step this buffer accepted, in the mirror's storage dtypes; its index rows are
            # copied from this buffer's at commit, not computed again.
            flat = _stored(given, mirror._narrow)
            stored = None if finals is None else _stored(finals, mirror._narrow)
            if mirror.check_finite:
                mirror._check_finite(given, flat, "step")
                if stored is not None:
                    mirror._check_finite(stored, stored, "final_obs")
            nested = None if mirror.mirror is None else mirror._mirror_prepare(given, st, finals, device)
            return _Step(flat, st.done, st.terminated, st.truncated, None, stored, None, nested, True)
        single = self._single
        flags = (st.done, st.terminated, st.truncated)
        target = mirror.device
        staged = device.type == "cuda" and target is not None and target.type == "cpu"
        tensors = [*given.values(), *(f for f in flags if f is not None), *(finals or {}).values()]
        event = None
        if staged:
            # Copy after the work queued so far, and make later work wait for the copy, so that
            # the caller may overwrite its tensors in place right after add returns.
            current = torch.cuda.current_stream(device)
            if self._mirror_stream is None:
                self._mirror_stream = torch.cuda.Stream(device)
            side = self._mirror_stream
            side.wait_stream(current)
            with torch.cuda.stream(side):
                host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                        for t in tensors]
                for t in tensors:
                    t.record_stream(side)
                event = torch.cuda.Event()
                event.record(side)
            current.wait_stream(side)
            tensors = host
        elif target is not None and target != device:
            tensors = [t.to(target) for t in tensors]
        # A single environment's leaves and flags go back to their unbatched shapes.
        it = iter(t[0] if single else t for t in tensors)
        step = unflatten({p: next(it) for p in given})
        done, terminated, truncated = (None if f is None else next(it) for f in flags)
        final_obs = None if finals is None else unflatten({k: next(it) for k in finals})
        args = (step, done, terminated, truncated, final_obs)
        if event is not None and (mirror._specs is None or mirror.check_finite):
            event.synchronize()  # the mirror's first add (it allocates) or its finite check reads values
            event = None
        return mirror._prepare(*args) if event is None else (event, args)

    def _mirror_commit(self, mirrored: Any) -> None:
        if isinstance(mirrored, _Step):
            self.sync_mirror()  # rows staged earlier go first
            self.mirror._commit(mirrored)
            return
        self._pending.append(mirrored)
        self._drain(wait=len(self._pending) > MIRROR_PENDING)

    def _drain(self, wait: bool = False) -> None:
        """Write staged rows whose copy has landed to the mirror, in order; with ``wait``, at
        least the oldest (waiting for it)."""
        while self._pending:
            event, args = self._pending[0]
            if wait:
                event.synchronize()
                wait = False
            elif not event.query():
                return
            self._pending.pop(0)
            mirror = self.mirror
            mirror._commit(mirror._prepare(*args))

    def sync_mirror(self) -> None:
        """Wait for every row staged for the mirror and write it there (a host sync on CUDA;
        a no-op without a mirror or when the mirror's add runs within :meth:`add`)."""
        while self._pending:
            self._drain(wait=True)

    def _reward_leaf(self, specs: dict[str, LeafSpec]) -> str | None:
        """The leaf whose values are summed into returns, or None when returns are not tracked."""
        if self.reward_key is None:
            return None
        return scalar_leaf(specs, self.reward_key, "reward_key",
                           "pass reward_key=None to store episodes without returns")

    def _check_final(self, final_obs: Any, specs: dict[str, LeafSpec], batch: tuple[int, ...],
                     device: torch.device) -> dict[str, torch.Tensor]:
        if self._next_step:
            raise ValueError("final_obs: not used with autoreset='next_step', where the reset row "
                             "after an episode's end already holds its final observation")
        leaves = [p for k in self.next_keys for p in leaves_under(k, specs)]
        if not leaves:
            raise ValueError("final_obs: next_keys is empty, so no final observation is kept")
        if isinstance(final_obs, Mapping) or type(final_obs).__module__.startswith("tensordict"):
            finals = flatten(final_obs, "final_obs")
            if set(finals) != set(leaves) and len(self.next_keys) == 1 and leaves != [self.next_keys[0]]:
                # The value of the single next key, itself a nested dict.
                finals = {f"{self.next_keys[0]}/{p}": v for p, v in finals.items()}
        elif leaves == list(self.next_keys[:1]):
            finals = {leaves[0]: final_obs}
        else:
            raise TypeError(f"final_obs: expected a dict of the leaves {leaves}, "
                            f"got {type(final_obs).__name__}")
        if set(finals) != set(leaves):
            raise ValueError(f"final_obs: expected keys {sorted(leaves)}, got {sorted(finals)}")
        out = {}
        for k, v in finals.items():
            v = as_tensor(v, f"final_obs['{k}']", device)
            check_leaf(v, f"final_obs['{k}']", batch, specs[k], device)
            out[k] = v
        return out

    def _allocate(self, specs: dict[str, LeafSpec], device: torch.device) -> dict[str, Any]:
        """Allocate the storage, index and side tables of a first add; returns the attributes
        the commit installs. An allocation that fails raises a ValueError saying how much was
        asked for, for what, and what to lower; nothing is kept."""
        rows, lanes = self._rows, self._lanes
        next_leaves = [p for k in self.next_keys for p in leaves_under(k, specs)]
        # Under same_step, each next leaf's final-obs side table (a ring of final_rows rows per
        # lane, plus a scratch row) follows its ring in the same allocation, so one gather at one
        # index reads the successor wherever it lives.
        same_step = not self._next_step
        sizes = {p: layout.next_source_rows(rows, self._final_rows, same_step) if p in next_leaves
                 else rows for p in specs}
        narrow = narrowed(self.storage_dtypes, specs, [self._reward_leaf(specs) or ""])
        stored = {p: narrow.get(p, s.dtype) for p, s in specs.items()}
        need = self._footprint(specs)
        leaf_bytes = need["leaves"]
        total_bytes = need["total"] - need["scratch"]
        biggest = sorted(leaf_bytes.items(), key=lambda kv: -kv[1])[:4]
        listed = ", ".join(f"{p!r}: {n:,} B" for p, n in biggest)
        others = (f"episode index {need['index']:,} B"
                  + (f", priorities {need['priority']:,} B" if need["priority"] else ""))
        lower = (f"lower capacity{', final_obs_capacity' if same_step and next_leaves else ''}, store "
                 f"smaller leaves (storage_dtypes=), or size it with gpubuffers.capacity_for")
        free = memory.free_bytes(device, shared=self.storage_kind == "shared")
        if self.storage_kind == "disk":
            where = self._path
            while not os.path.isdir(where):
                where = os.path.dirname(where)
            free = shutil.disk_usage(where).free
        if free is not None and total_bytes > free:
            raise ValueError(f"capacity: {total_bytes:,} bytes asked for on {device} for capacity="
                             f"{self.capacity} ({rows} rows x {lanes} lanes), and {free:,} bytes are free; "
                             f"largest leaves {listed}; {others}; {lower}")
        if self.storage_kind == "disk":
            given, every = self.flush_every, self.flush_every
            if every is None:  # rows // 64, or 64 MiB of rows if that is more; at most rows // 2
                row_bytes = -(-sum(leaf_bytes.values()) // rows)
                every = max(1, min(rows // 2, max(rows // 64, -(-disk.FLUSH_BYTES // row_bytes))))
            files, whole, index = disk.create(self._path, self._overwrite, checkpoint.settings_of(self), specs, narrow,
                                              sizes, rows, lanes)
            try:
                self.flush_every = every
                attrs = self._attached(specs, device, files, whole, index)
                disk.write_header(files, self._disk_counters(0, 0, [0] * lanes, clean=True, offset=0))
            except BaseException:
                self.flush_every = given
                files.discard()
                raise
            return attrs
        try:
            # Storage private to this process goes on huge pages on the host (memory.full); shared
            # memory is allocated apart, by share_memory_ below.
            private = self.storage_kind == "memory"
            whole = {p: memory.full((sizes[p] * lanes, *s.shape), 0, stored[p], device) if private
                     else torch.zeros((sizes[p] * lanes, *s.shape), dtype=stored[p], device=device)
                     for p, s in specs.items()}
            ix = EpisodeIndex.empty(rows, lanes, device)
            row_stats = torch.zeros(rows, 3, dtype=torch.float64, device=device)
            stat_totals = torch.zeros(3, dtype=torch.float64, device=device)
            tree = None
            if self.priority_alpha is not None:
                tree = PriorityTree.empty(rows * lanes, lanes, self.priority_alpha, self.priority_eps, device)
            begun = None
            if self.storage_kind == "shared":
                begun = torch.zeros(1, dtype=torch.int64).share_memory_()
                ix_tensors = [getattr(ix, f.name) for f in dataclasses.fields(ix) if f.name != "zeros"]
                tree_tensors = [] if tree is None else [tree.leaf, tree.sums, tree.mins, tree.maxp, tree.slots]
                for t in (*whole.values(), *ix_tensors, *ix.zeros, row_stats, stat_totals, *tree_tensors):
                    t.share_memory_()
        except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
            raise ValueError(
                f"capacity: cannot allocate {total_bytes:,} bytes on {device} for capacity="
                f"{self.capacity} ({rows} rows x {lanes} lanes; largest leaves {listed}; {others}); "
                f"{lower}") from err
        gen = torch.Generator(device=device)
        gen.manual_seed(self._seed)
        return {**self._leaf_attrs(specs, device, whole), "_ix": ix, "_tree": tree, "_rng": ops.Rng(gen, self._seed),
                "_row_stats": row_stats, "_stat_totals": stat_totals, "_begun": begun}

    def _leaf_attrs(self, specs: dict[str, LeafSpec], device: torch.device,
                    whole: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The attributes over the leaves' whole allocations (ring, then a next leaf's side table)."""
        rows, lanes = self._rows, self._lanes
        next_leaves = [p for k in self.next_keys for p in leaves_under(k, specs)]
        storage = {p: t[:rows * lanes].view(rows, lanes, *specs[p].shape) for p, t in whole.items()}
        return {
            **self._installed(specs, device, storage, self._backend),
            "_next_leaves": next_leaves,
            "_next_src": {p: whole[p] for p in next_leaves},
            "_final": ({p: whole[p][rows * lanes:].view(self._final_rows + 1, lanes, *specs[p].shape)
                        for p in next_leaves} if not self._next_step else {}),
            "_reward_tracked": self._reward_leaf(specs) is not None,
            "_narrow": narrowed(self.storage_dtypes, specs, [self._reward_leaf(specs) or ""]),
        }

    def _attached(self, specs: dict[str, LeafSpec], device: torch.device, files: Any,
                  whole: dict[str, torch.Tensor], index: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The attributes of a disk buffer over its mapped (or, in a reader, private) tensors."""
        ix = EpisodeIndex(start=index["index-start"], end_flags=index["index-end_flags"], ret=index["index-ret"],
                          final_idx=index["index-final_idx"], fin_head=index["index-fin_head"],
                          state=index["index-state"],
                          zeros=(torch.zeros((), dtype=torch.uint8), torch.zeros((), dtype=torch.float32)))
        gen = torch.Generator(device=device)
        gen.manual_seed(self._seed)
        return {**self._leaf_attrs(specs, device, whole), "_ix": ix, "_tree": None,
                "_rng": ops.Rng(gen, self._seed, int(ix.state[STATE_OFFSET])),
                "_row_stats": index["stats-rows"], "_stat_totals": index["stats-totals"],
                "_begun": index["index-begun"], "_disk": files}

    # ------------------------------------------------------------------ sampling
    def _check_batch(self, batch_size: Any) -> int:
        return positive_int(batch_size, "batch_size", MAX_BATCH)

    def _gather(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every leaf at ``slots`` (any shape): ``[*slots.shape, *leaf_shape]``."""
        specs = self._specs
        entries = [(t, 0, specs[p].dtype) for p, t in self._flat.items()]
        return dict(zip(self._flat, self._ops.gather(entries, (slots,))))

    def _beta(self, priority_beta: Any) -> float | None:
        """The weight exponent of a prioritized sample (None for a uniform buffer)."""
        if self.priority_alpha is None:
            if priority_beta is not None:
                raise ValueError(f"priority_beta: the buffer samples uniformly (priority_alpha=None), "
                                 f"got priority_beta={priority_beta!r}; construct it with "
                                 f"priority_alpha= to draw by priority")
            return None
        if priority_beta is None:
            return DEFAULT_BETA
        return real(priority_beta, "priority_beta", 0.0, 1.0)

    def sample(self, batch_size: int, *, n_step: int = 1, gamma: float | None = None,
               priority_beta: float | None = None) -> dict[str, Any]:
        """B transitions whose successor row has been written: uniform over live slots, or with
        ``priority_alpha`` in proportion to their priority (one draw per equal-mass segment, the
        items in segment order, that is by ring slot).

        Returns every leaf at ``[B, *leaf_shape]``, and
          ``next``: {key: [B, *leaf_shape]} the successor of each ``next_keys`` leaf: the next
            row inside the episode, else the episode's final observation;
          ``next_valid`` [B] bool: False where that successor is unknown (an episode ended and
            its final observation was not given or was dropped) and where ``valid`` is False;
          ``is_first``, ``is_last``, ``terminated``, ``truncated`` [B] bool;
          ``valid`` [B] bool: False for items whose proposals were all rejected (only possible
            with ``autoreset="next_step"``, or prioritized when nothing can be drawn);
          ``index`` [B] int64 transition id ``absolute_row * N + lane`` (absolute rows count
            adds since construction; the ring slot is ``index % capacity``), what
            :meth:`update_priorities` takes;
          ``weight`` [B] float32 (prioritized only): importance weights ``(N * P(i)) **
            -priority_beta`` divided by the largest over the stored transitions (that of the
            smallest priority), so every weight is in (0, 1]; ``priority_beta`` defaults to 0.4.

        With ``gamma`` (required when ``n_step > 1``), each transition at row t covers a segment
        of k = min(n_step, rows left in its episode counting t, rows whose successor is written)
        rows, and the sample also has ``return`` [B] float32 (sum of gamma^i * reward[t + i],
        i < k, from the ``reward_key`` leaf, which stays one-step under its own name),
        ``n_steps`` [B] int64 (k), ``discount`` [B] float32 (gamma^k, 0 where the episode
        terminated within the k rows) and ``target_valid`` [B] bool (``(next_valid |
        terminated) & valid``); ``next``, ``next_valid``, ``terminated`` and ``truncated`` then describe
        the segment's last row, so ``target = return + discount * V(next)`` wherever
        ``target_valid``.
        """
        return self._sample(batch_size, n_step, gamma, priority_beta)[0]

    def _sample(self, batch_size: Any, n_step: Any, gamma: Any, priority_beta: Any
                ) -> tuple[dict[str, Any], torch.Tensor]:
        """:meth:`sample`, and the extended-source slot of each item's successor."""
        batch_size = self._check_batch(batch_size)
        n_step = positive_int(n_step, "n_step", self._rows)
        if gamma is not None:
            gamma = real(gamma, "gamma", 0.0, 1.0)
        elif n_step > 1:
            raise ValueError(f"gamma: n_step={n_step} needs the discount gamma to sum the rewards")
        beta = self._beta(priority_beta)
        if self.live_rows < 2:
            raise ValueError(f"sample: needs at least 2 live rows (a transition is complete once the "
                             f"next row is written), the buffer has {self.live_rows}")
        if gamma is not None and not self._reward_tracked:
            raise ValueError("gamma: n-step returns sum the reward_key leaf, and this buffer has "
                             "reward_key=None")
        final_rows = 0 if self._next_step else self._final_rows
        # With n-step segments, the links that matter are those of each segment's last row.
        first_links = gamma is None
        if beta is None:
            tries = self.max_proposals if self._next_step else 1
            links = self._ops.sample_transitions(self._ix, self._rng, batch_size, tries, self._next_step,
                                                 final_rows, first_links)
        else:
            links = self._ops.sample_prioritized_transitions(self._ix, self._tree, self._rng, batch_size,
                                                             self._next_step, final_rows, beta, first_links)
        slot, valid, index = links["slot"], links["valid"], links["index"]
        is_first, is_last = links["is_first"], links.get("is_last")
        weight = links.get("weight")
        read: dict[str, torch.Tensor] = {}
        if gamma is not None:
            links = self._ops.nstep(self._ix, slot, links["row"], self._flat[self.reward_key].view(-1),
                                    n_step, float(gamma), final_rows, self._next_step)
            if is_last is None:  # the reference read the first rows' end flags with the segments
                is_last = links["first_is_last"]
            if "first_reward" in links:  # and their rewards (the reward leaf is never narrowed)
                spec = self._specs[self.reward_key]
                read[self.reward_key] = links["first_reward"].view(slot.shape[0], *spec.shape).to(spec.dtype)
        # One gather for the leaves and the next leaves (successor row, or side table at an end).
        specs = self._specs
        leaves = [p for p in self._flat if p not in read]
        entries = ([(self._flat[p], 0, specs[p].dtype) for p in leaves]
                   + [(self._next_src[p], 1, specs[p].dtype) for p in self._next_leaves])
        values = self._ops.gather(entries, (slot, links["succ"]))
        got = dict(zip(leaves, values))
        out: dict[str, Any] = {p: read[p] if p in read else got[p] for p in self._flat}
        nxt = dict(zip(self._next_leaves, values[len(leaves):]))
        out = unflatten(out)
        out["next"] = unflatten(nxt)
        # An item whose proposals were all rejected has no successor and no target.
        next_valid = links["next_valid"] if valid is None else links["next_valid"] & valid
        out["next_valid"] = next_valid
        out["is_first"] = is_first
        out["is_last"] = is_last
        out["terminated"] = links["terminated"]
        out["truncated"] = links["truncated"]
        out["valid"] = torch.ones_like(is_last) if valid is None else valid
        out["index"] = index
        if weight is not None:
            out["weight"] = weight
        if gamma is not None:
            out["return"] = links["return"]
            out["n_steps"] = links["n_steps"]
            out["discount"] = links["discount"]
            target_valid = next_valid | links["terminated"]
            out["target_valid"] = target_valid if valid is None else target_valid & valid
        return out, links["succ"]

    def sample_sequences(self, batch_size: int, length: int, *,
                         priority_beta: float | None = None) -> dict[str, Any]:
        """B windows of ``length`` consecutive rows of one lane, inside one episode and inside
        live data, uniform over all such windows; the cost does not grow with capacity. With
        ``priority_alpha``, a window's first slot is drawn in proportion to its priority (the
        R2D2 convention: update with ``index[:, 0]``) and windows that are not admissible are
        rejected, so draws stay proportional among admissible windows; a window then starts on
        a row whose successor is written.

        Returns every leaf at ``[B, L, *leaf_shape]``, and ``is_first``, ``is_last`` [B, L]
        bool, ``valid`` [B] bool (False for items whose ``max_proposals`` proposals all crossed
        an episode boundary; their data is not a window of one episode), ``index`` [B, L]
        transition ids (as :meth:`sample`), and when prioritized ``weight`` [B] float32 (of the
        first slot, as :meth:`sample`; 0 where ``valid`` is False).
        """
        batch_size = self._check_batch(batch_size)
        length = positive_int(length, "length")
        if length > self._rows:
            raise ValueError(f"length: expected at most T={self._rows} rows per lane, got {length}")
        beta = self._beta(priority_beta)
        if self.live_rows < length:
            raise ValueError(f"length: no window of {length} rows fits in the {self.live_rows} "
                             f"live rows; add more steps first")
        return self._windows(batch_size, length, beta, self.max_proposals)

    def _window_proposals(self, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` uniform window proposals of ``length`` rows (as :func:`reference.window_ends`
        takes them) from the buffer's generator, and whether each is admissible."""
        live, oldest = live_span(self._ix)
        proposals = reference.uniform_below(self._rng, (count, 1), (live - length + 1) * self._lanes)
        return proposals[:, 0], reference.window_ends(self._ix, proposals, oldest, length)[2]

    def _windows_at(self, proposals: torch.Tensor, length: int) -> dict[str, Any]:
        """The windows of :meth:`sample_sequences` at given proposals [B] (from
        :meth:`_window_proposals`, the cursors unchanged since)."""
        return self._window_batch(reference.windows(self._ix, proposals[:, None], live_span(self._ix)[1], length))

    def _windows(self, batch_size: int, length: int, beta: float | None, tries: int) -> dict[str, Any]:
        """:meth:`sample_sequences` (checked arguments) with ``tries`` proposals per item."""
        if beta is None:
            win = self._ops.sample_windows(self._ix, self._rng, batch_size, tries, length)
        else:
            win = self._ops.sample_prioritized_windows(self._ix, self._tree, self._rng, batch_size,
                                                       tries, length, beta)
        return self._window_batch(win)

    def _window_batch(self, win: dict[str, Any]) -> dict[str, Any]:
        """A :meth:`sample_sequences` batch from drawn windows: every leaf at their slots, their
        flags and ids, and the weights of prioritized draws."""
        out: dict[str, Any] = unflatten(self._gather(win["slots"]))
        for key in ("is_first", "is_last", "valid", "index", "weight"):
            if key in win:
                out[key] = win[key]
        return out

    def update_priorities(self, index: Any, priority: Any, *, check: bool = False) -> None:
        """Set the priority of the transitions ``index`` (a sample's ``"index"``; for sequences
        ``index[:, 0]``) to ``priority`` (finite values >= 0; ``priority_eps`` is added), on the
        device with no host sync.

        index: integer tensor (or array) of transition ids, any shape; priority: real tensor or
            array of as many elements, on any device (copied to the buffer's), detached.
        An id whose transition has been overwritten since it was sampled (the ring wrapped past
        it), or that names no drawable transition (the newest row, a reset row), changes
        nothing; so does a negative or non-finite priority (one beyond float32's range is
        infinite once stored as float32), unless ``check=True``, which raises a ValueError for
        it (reading the values: a host sync). Of repeated ids in one call the
        last one applies. The largest ``priority + priority_eps`` applied so far is what new
        transitions enter with.
        """
        if self.priority_alpha is None:
            raise ValueError("update_priorities: the buffer samples uniformly (priority_alpha=None); "
                             "construct it with priority_alpha= to draw by priority")
        if self._ix is None:
            raise ValueError("update_priorities: the buffer is empty; add steps and sample first")
        device = self._device
        index = as_tensor(index, "index", device)
        priority = as_tensor(priority, "priority", device)
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"index: expected an integer tensor of transition ids, got {index.dtype}")
        if priority.dtype.is_complex or priority.dtype == torch.bool:
            raise TypeError(f"priority: expected a real tensor, got {priority.dtype}")
        if index.numel() != priority.numel():
            raise ValueError(f"priority: expected {index.numel()} values (one per index, index shape "
                             f"{tuple(index.shape)}), got shape {tuple(priority.shape)}")
        if index.numel() > MAX_BATCH:
            raise ValueError(f"index: expected at most {MAX_BATCH} ids, got {index.numel()}")
        index = index.detach().reshape(-1).to(device=device, dtype=torch.int64).contiguous()
        if check:  # the values as given, before float32 rounds any beyond its range to inf
            given = priority.detach().reshape(-1).to(device=device, dtype=torch.float64)
            bad = ~(torch.isfinite(given) & (given >= 0) & (given <= torch.finfo(torch.float32).max))
            if bool(bad.any()):
                first = int(bad.to(torch.uint8).argmax())
                raise ValueError(f"priority: expected finite values >= 0 that float32 holds (at most "
                                 f"{torch.finfo(torch.float32).max:.8g}), got {given[first].item()} at position {first}")
        priority = priority.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
        if index.numel() == 0:
            return
        with torch.no_grad():
            self._ops.update_priorities(self._ix, self._tree, index, priority)

    def sample_episodes(self, batch_size: int, max_rows: int | None = None) -> dict[str, Any]:
        """B finished episodes whose rows are all stored, uniform over such episodes, packed.

        Episodes cut by the seam (their first rows overwritten) and the unfinished episode of
        each lane are not drawn. Rows are packed end to end, in draw order, into ``max_rows``
        rows. By default ``max_rows = B * L``, L the longest whole stored episode rounded up to
        a power of two and never shrinking, so nothing is ever dropped; finding L reads one
        number from the device after each add (a host sync on CUDA): pass ``max_rows`` for a
        fixed shape with no sync (CUDA graphs, the hot loop). With a ``max_rows`` too small for
        the draws, episodes are kept in draw order up to the first that does not fit, and it
        and every later one come back with ``valid=False`` and length 0 (as do all B when no
        finished episode is stored). Drawing is exact (no rejection): the first call after an
        add counts the eligible episodes in one pass over the index, O(capacity); each draw is
        then O(log capacity).

        Returns every leaf at ``[max_rows, *leaf_shape]``, ``cu_seqlens`` [B + 1] int64
        (episode b is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``), ``length``, ``lane``,
        ``episode_return`` [B] (absent when ``reward_key=None``), ``truncated`` [B] bool,
        ``valid`` [B] bool, ``mask`` [max_rows] bool (rows that belong to an episode),
        ``is_first``, ``is_last`` [max_rows], ``index`` [max_rows] transition ids (as
        :meth:`sample`; -1 outside ``mask``), ``num_rows`` [] int64. Episodes are drawn uniformly
        also when the buffer is prioritized.
        :func:`gpubuffers.pad_episodes` turns it into ``[B, L, ...]``.
        """
        batch_size = self._check_batch(batch_size)
        if max_rows is not None:
            max_rows = positive_int(max_rows, "max_rows", MAX_BATCH)
        if self.live_rows == 0:
            raise ValueError("sample_episodes: the buffer is empty; add steps first")
        if max_rows is None:
            max_rows = batch_size * self._longest_episode()
        ix = self._ix
        end_slot, valid = self._ops.sample_episode_ends(ix, self._episode_cumsum()[1], self._rng, batch_size)
        packed = self._ops.pack_episodes(ix, end_slot, valid, max_rows)
        out: dict[str, Any] = unflatten(self._gather(packed["slot"]))
        flags = take(ix.end_flags, end_slot)
        out["cu_seqlens"] = packed["cu_seqlens"]
        out["length"] = packed["length"]
        out["lane"] = packed["lane"]
        if self._reward_tracked:
            out["episode_return"] = take(ix.ret, end_slot)
        out["truncated"] = packed["valid"] & ((flags & TRUNCATED) != 0)
        out["valid"] = packed["valid"]
        out["mask"] = packed["mask"]
        out["is_first"] = packed["is_first"]
        out["is_last"] = packed["is_last"]
        out["num_rows"] = packed["cu_seqlens"][-1]
        out["index"] = self._row_ids(packed["slot"], packed["mask"])
        return out

    def episodes(self) -> Iterator[dict[str, Any]]:
        """Every finished episode whose rows are all stored (what :meth:`sample_episodes` draws
        from), oldest end first (ties by lane), one dict each: the leaves at ``[L, ...]`` in the
        dtypes they were added in, ``next`` {the next leaves of the episode's last row: its
        final observation} with ``next_valid`` (False when it was not given or was dropped,
        or under ``next_step`` while its reset row is not written yet), ``length``, ``lane``,
        ``terminated``, ``truncated`` (Python values), ``episode_return`` (float, with a
        ``reward_key``) and ``index`` [L] transition ids.

        Host-side and reading the index on the host (syncs on CUDA): for export and inspection,
        not the training loop. Adding to the buffer while iterating raises a RuntimeError at the
        next episode.
        """
        if self._ix is None:
            return
        ix, rows, lanes, adds = self._ix, self._rows, self._lanes, self._total
        slots = self._episode_cumsum()[0].nonzero().flatten()
        oldest = self.oldest_row
        end_row = oldest + (slots.div(lanes, rounding_mode="floor") - oldest) % rows
        order = torch.argsort(end_row * lanes + slots % lanes).tolist()
        final_rows = 0 if self._next_step else self._final_rows
        links = transition_links(ix, slots, end_row, final_rows, self._next_step)
        valid = links["next_valid"] & (end_row + 1 < adds) if self._next_step else links["next_valid"]
        specs = self._specs
        for k in order:
            if self._total != adds:
                raise RuntimeError("episodes: the buffer was added to while iterating; iterate again")
            slot, last = int(slots[k]), int(end_row[k])
            lane, first = slot % lanes, int(ix.start.view(-1)[slot])
            absolute = torch.arange(first, last + 1, device=self._device)
            out: dict[str, Any] = unflatten(self._gather((absolute % rows) * lanes + lane))
            entries = [(self._next_src[p], 0, specs[p].dtype) for p in self._next_leaves]
            nxt = self._ops.gather(entries, (links["succ"][k:k + 1],)) if entries else []
            flags = int(ix.end_flags.view(-1)[slot])
            out["next"] = unflatten({p: v[0] for p, v in zip(self._next_leaves, nxt)})
            out["next_valid"] = bool(valid[k])
            out["length"] = last - first + 1
            out["lane"] = lane
            out["truncated"] = bool(flags & TRUNCATED)
            out["terminated"] = not out["truncated"]
            if self._reward_tracked:
                out["episode_return"] = float(ix.ret.view(-1)[slot])
            out["index"] = absolute * lanes + lane
            yield out

    def _row_ids(self, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Transition ids of packed rows at ``slot`` (-1 where ``mask`` is False), their absolute
        rows read from the device cursor."""
        row = layout.absolute_row(slot.div(self._lanes, rounding_mode="floor"), live_span(self._ix)[1],
                                  self._rows)
        return torch.where(mask, transition_ids(row, slot, self._lanes), -1)

    def _longest_episode(self) -> int:
        """A power of two at least the longest whole stored episode, never shrinking: read from
        the device once per add at most (the one host sync of ``sample_episodes``' default)."""
        if self._episode_rows_at != self._total:
            ix, oldest = self._ix, self.oldest_row
            eligible = self._episode_cumsum()[0].view_as(ix.start)
            end_row = oldest + (torch.arange(self._rows, device=self._device)[:, None] - oldest) % self._rows
            longest = int(torch.where(eligible, end_row + 1 - ix.start, 0).max())
            self._episode_rows = max(self._episode_rows, 1 << max(longest - 1, 0).bit_length())
            self._episode_rows_at = self._total
        return self._episode_rows

    def _episode_cumsum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([T * N] bool slots that end a whole live episode, [T * N] their cumulative count),
        built once per add and shared by the draws and the default row budget. A call captured in
        a CUDA graph builds its own and keeps none: each replay must count the episodes of the rows
        added since (eagerly or by the graph), not read what the host had counted at capture."""
        capturing = _capturing(self._device)
        if self._episode_ends is not None and not capturing:
            return self._episode_ends
        ends = self._ops.whole_episode_ends(self._ix)
        pair = (ends, torch.cumsum(ends, 0))
        if not capturing:
            self._episode_ends = pair
        return pair
