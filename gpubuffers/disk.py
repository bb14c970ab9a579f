"""Files of a ``storage="disk"`` ReplayBuffer: one memory-mapped file per leaf and per index
tensor, and a small JSON header, in one folder.

Layout of the folder::

    gpubuffers.json      header: format, version, settings, leaf specs, file table, counters
    leaf-<k>.bin         leaf k (sorted leaf paths) [rows * N, *shape], its side table after it
    index-<name>.bin     episode index: start, end_flags, ret, final_idx, fin_head, state, begun
    stats-rows.bin       per-row episode sums [T, 3] float64; stats-totals.bin [3]
    .lock                held (flock) by the process that adds

Crash safety on a ring that overwrites itself. The header is replaced atomically (temporary file,
fsync, rename, fsync of the folder) and only after every mapped file was flushed (msync), so the
rows it counts (``adds``) are on disk. Before the rows after it may overwrite older rows, it
records how far they can reach: ``floor = adds + flush_every - T``, the oldest row that stays
readable (the next ``flush_every`` adds overwrite rows below it), and the buffer flushes again
within ``flush_every`` adds. A reopened buffer keeps the rows ``[max(adds - T, floor), adds)`` of
its header, all flushed and none overwritten since; what a killed writer added after its last
flush is gone, and so are at most the ``flush_every`` oldest rows that were being reclaimed.
Final observations follow the same rule: each lane stores at most one per add, so a reopened
lane counts ``flush_every`` more than its header says, and a final observation older than that
margin is reported ``next_valid=False`` rather than read from a side-table row that may have been
reused. A clean :meth:`ReplayBuffer.close` records the exact counters (nothing reclaimed).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .checkpoint import dtype_name, specs_header
from .layout import SENTINEL, STATE_SIZE

#: The default flush interval writes at least this many bytes of rows per flush (or rows // 64
#: adds if that is more, at most rows // 2): a flush is a sync of the files plus three fsyncs.
FLUSH_BYTES = 64 << 20

HEADER = "gpubuffers.json"
LOCK = ".lock"
FORMAT = "gpubuffers-disk"
VERSION = 1

#: Index files: name -> (dtype, shape as a function of (rows, lanes)).
INDEX_FILES = {
    "index-start": (torch.int64, lambda t, n: (t, n)),
    "index-end_flags": (torch.uint8, lambda t, n: (t, n)),
    "index-ret": (torch.float32, lambda t, n: (t, n)),
    "index-final_idx": (torch.int32, lambda t, n: (t, n)),
    "index-fin_head": (torch.int64, lambda t, n: (n,)),
    "index-state": (torch.int64, lambda t, n: (STATE_SIZE,)),
    "index-begun": (torch.int64, lambda t, n: (1,)),
    "stats-rows": (torch.float64, lambda t, n: (t, 3)),
    "stats-totals": (torch.float64, lambda t, n: (3,)),
}


@dataclass
class Files:
    """The mapped files of one disk buffer in one process."""

    path: str
    writable: bool
    maps: dict[str, Any] = field(default_factory=dict)   # name -> np.memmap
    lock_fd: int | None = None
    header: dict[str, Any] = field(default_factory=dict)  # as last written (or read)
    index_mapped: bool = True  # the index tensors are the files' (else private copies)

    def map(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], mode: str) -> torch.Tensor:
        """The tensor ``[*shape]`` of ``dtype`` over ``<name>.bin`` (``mode``: numpy memmap's
        ``"w+"`` creates it zero-filled, ``"r+"`` writes through, ``"r"`` reads only)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        file = os.path.join(self.path, f"{name}.bin")
        if mode != "w+":
            have = os.path.getsize(file)
            if have != nbytes:
                raise ValueError(f"path: {file!r} holds {have} bytes, the header's layout needs {nbytes}")
        mm = np.memmap(file, dtype=np.uint8, mode=mode, shape=(nbytes,))
        self.maps[name] = mm
        with warnings.catch_warnings():  # a read-only map: the buffer never writes through it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(mm)
        return flat.view(dtype).view(shape)

    def sync(self) -> None:
        """msync every writable map: their pages are on disk when this returns."""
        for mm in self.maps.values():
            if mm.mode != "r":
                mm.flush()

    def discard(self) -> None:
        """Remove the files of a buffer whose creation failed, and let go of the folder."""
        for name in list(self.maps):
            try:
                os.remove(os.path.join(self.path, f"{name}.bin"))
            except FileNotFoundError:
                pass
        try:
            os.remove(os.path.join(self.path, HEADER))
        except FileNotFoundError:
            pass
        self.close()

    def close(self) -> None:
        self.maps.clear()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def __getstate__(self) -> dict[str, Any]:
        # Another process maps the files again (read only): see ReplayBuffer.__setstate__.
        return {"path": self.path, "writable": False, "maps": {}, "lock_fd": None, "header": self.header,
                "index_mapped": self.index_mapped}


def leaf_files(specs: dict) -> dict[str, str]:
    """Leaf path -> file name (paths may hold ``/``; files are numbered in sorted path order)."""
    return {p: f"leaf-{k}" for k, p in enumerate(sorted(specs))}


def read_header(path: str) -> dict[str, Any]:
    """The header of the disk buffer at ``path``; a ValueError when there is none, or it is of
    another format or a newer version."""
    file = os.path.join(path, HEADER)
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a folder holding a disk buffer")
    if not os.path.exists(file):
        raise ValueError(f"path: {path!r} holds no gpubuffers disk buffer (no {HEADER}); "
                         f"found {sorted(os.listdir(path))[:8]}")
    try:
        with open(file) as f:
            header = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"path: {file!r} is not a readable gpubuffers header ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"path: {file!r} is not a gpubuffers disk buffer header "
                         f"(format {header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("version")
    if version != VERSION:
        raise ValueError(f"path: {file!r} has version {version!r}; this gpubuffers reads version {VERSION}"
                         + (" (written by a newer gpubuffers: upgrade)" if isinstance(version, int)
                            and version > VERSION else ""))
    return header


def folder(path: Any) -> str:
    """``path`` as an absolute folder path; a TypeError for anything but a str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a folder path (str or os.PathLike), got {type(path).__name__}")
    return os.path.abspath(os.fspath(path))


def check_new(path: Any, overwrite: bool) -> str:
    """The folder a new disk buffer will write: absent, empty, or (with ``overwrite``) holding
    a disk buffer. Anything else is a ValueError; nothing is written here."""
    path = folder(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a file; a disk buffer is a folder")
    if os.path.isdir(path):
        entries = sorted(os.listdir(path))
        if entries:
            if HEADER not in entries:
                raise ValueError(f"path: {path!r} holds other files ({entries[:8]}); give a new or empty "
                                 f"folder for a disk buffer")
            header = read_header(path)
            if not overwrite:
                raise ValueError(f"path: {path!r} already holds a disk buffer "
                                 f"({header['counters']['adds']} adds); reopen it with "
                                 f"ReplayBuffer.open(path, writable=True), or pass overwrite=True to replace it")
            ours = {HEADER, LOCK} | {f"{n}.bin" for n in header.get("files", {})}
            foreign = [e for e in entries if e not in ours]
            if foreign:
                raise ValueError(f"path: {path!r} holds a disk buffer and other files ({foreign[:8]}); "
                                 f"overwrite=True replaces only a folder that holds a disk buffer alone")
    return path


def lock(path: str, writable: bool) -> int | None:
    """Take the folder's writer lock (non-blocking); a ValueError when another process holds it."""
    if not writable:
        return None
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"path: another process is adding to the disk buffer at {path!r} "
                         f"(it holds {LOCK}); open it with writable=False to read it") from None
    return fd


def create(path: str, overwrite: bool, settings: dict[str, Any], specs: dict, narrow: dict,
           sizes: dict[str, int], rows: int, lanes: int) -> tuple[Files, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Create the files of a new disk buffer: (files, whole leaf tensors by path, index tensors by
    file name). The header is written by the first flush."""
    check_new(path, overwrite)
    os.makedirs(path, exist_ok=True)
    fd = lock(path, True)
    files = Files(path, True, lock_fd=fd)
    if os.path.exists(os.path.join(path, HEADER)):  # overwrite: the header goes first, then the rest
        old = read_header(path)
        os.remove(os.path.join(path, HEADER))
        for name in old.get("files", {}):
            try:
                os.remove(os.path.join(path, f"{name}.bin"))
            except FileNotFoundError:
                pass
    names = leaf_files(specs)
    whole = {p: files.map(names[p], narrow.get(p, s.dtype), (sizes[p] * lanes, *s.shape), "w+")
             for p, s in specs.items()}
    index = {name: files.map(name, dtype, shape(rows, lanes), "w+") for name, (dtype, shape) in INDEX_FILES.items()}
    index["index-start"].fill_(SENTINEL)
    files.header = {
        "format": FORMAT, "version": VERSION, "settings": settings,
        "specs": specs_header(specs, narrow),
        "files": {**{names[p]: {"leaf": p, "shape": [sizes[p] * lanes, *s.shape],
                                "dtype": dtype_name(narrow.get(p, s.dtype))} for p, s in specs.items()},
                  **{name: {"shape": list(shape(rows, lanes)), "dtype": dtype_name(dtype)}
                     for name, (dtype, shape) in INDEX_FILES.items()}},
    }
    return files, whole, index


def attach(path: str, header: dict[str, Any], writable: bool, dtypes: dict[str, torch.dtype],
           index: str) -> tuple[Files, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map the files the header lists: (files, whole leaf tensors by path, index tensors by file
    name). ``writable``: written through (this process takes the folder's lock); else read only.
    ``index``: ``"map"`` the index files too (a writer, or a worker of a live writer), ``"copy"``
    them into private shared memory (a reader, which brings them to its header), or ``"skip"``
    them; the count of adds begun is mapped in every case (a reader checks its items against a
    writer that is still adding)."""
    files = Files(path, writable, lock_fd=lock(path, writable), header=header, index_mapped=index == "map")
    whole, tensors = {}, {}
    try:
        for name, f in header["files"].items():
            dtype, shape = dtypes[f["dtype"]], tuple(f["shape"])
            mode = "r+" if writable else "r"
            if "leaf" in f:
                whole[f["leaf"]] = files.map(name, dtype, shape, mode)
            elif index == "map" or name == "index-begun":  # adds begun: always read live
                tensors[name] = files.map(name, dtype, shape, mode)
            elif index == "copy":
                tensors[name] = files.map(name, dtype, shape, "r").clone().share_memory_()
                files.maps.pop(name, None)
    except FileNotFoundError as err:
        files.close()
        raise ValueError(f"path: {path!r} lacks a file its header lists ({err.filename})") from err
    except BaseException:
        files.close()
        raise
    return files, whole, tensors


def write_header(files: Files, counters: dict[str, Any]) -> None:
    """Replace the header atomically with ``counters`` (after :meth:`Files.sync`)."""
    header = dict(files.header, counters=counters)
    final = os.path.join(files.path, HEADER)
    tmp = f"{final}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(header, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dfd = os.open(files.path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    files.header = header
