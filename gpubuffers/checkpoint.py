"""Checkpoints of a ReplayBuffer: everything an exact resume needs, as tensors plus a JSON header.

``state_dict`` holds the stored rows that are live (a buffer that has not wrapped yet gives only
its written rows), the episode index, the final-observation side tables (their rows that hold
entries: without the scratch row that nothing reads, and before any lane's ring wraps only the
rows written so far), the per-row statistics, the priority tree where present (the leaves of
live slots, and the internal levels), the host counters, the constructor settings and the
random state of both backends (the torch generator's state, and the Philox seed and offset the
kernels draw from). States of format 1, which hold the side tables and the tree's leaves whole,
load too.

``load_state_dict`` checks everything before it writes anything: the format, the settings, the
leaf specs, the counters, and the name, shape and dtype of every tensor against this buffer's
layout (derived on the meta device, so an empty buffer allocates nothing for a state it refuses).
A refused state raises a ValueError (a TypeError for a value that is not a tensor or a number)
naming what differs, and leaves the buffer as it was. ``save``
writes it as one safetensors file (every tensor as raw bytes, its shape and dtype in the header,
a SHA-256 of the bytes to catch corruption), atomically: a temporary file in the same folder,
fsync, rename, fsync of the folder (a save killed midway leaves its temporary folder, which the
next save to that path removes). Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import torch

from .layout import FINAL_IDX_MASK, SENTINEL, STATE_FLOOR
from .reference import EpisodeIndex, PriorityTree
from .specs import LeafSpec, resolve_device
from .steps import leaves_under, narrowed

#: The format this code writes, and those it reads. Format 2 writes the side tables' rows that
#: hold entries and the tree's leaves of live slots only; format 1 held both whole.
FORMAT = 2
READS = (1, 2)
_KEY = "gpubuffers"

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.complex64, torch.complex128,
    *(getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
      if hasattr(torch, n)))}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def specs_header(specs: dict, narrow: dict) -> dict[str, Any]:
    """Leaf specs as JSON values: shape, dtype and (where narrowed) the stored dtype."""
    return {p: {"shape": list(s.shape), "dtype": dtype_name(s.dtype),
                **({"stored": dtype_name(narrow[p])} if p in narrow else {})} for p, s in specs.items()}


def settings_of(buf) -> dict[str, Any]:
    """The constructor settings of ``buf`` as JSON values (what a checkpoint or a disk buffer's
    header records, and ``ReplayBuffer(**settings)`` takes back)."""
    return {"capacity": buf.capacity, "num_envs": buf.num_envs, "done_marks": buf.done_marks,
            "autoreset": buf.autoreset, "next_keys": list(buf.next_keys), "seed": buf._seed,
            "reward_key": buf.reward_key, "final_obs_capacity": buf._final_rows * buf._lanes,
            "max_proposals": buf.max_proposals, "backend": buf._backend,
            "priority_alpha": buf.priority_alpha, "priority_eps": buf.priority_eps,
            "storage_dtypes": {k: dtype_name(d) for k, d in buf.storage_dtypes.items()},
            "check_finite": buf.check_finite}


def state_dict(buf) -> dict[str, Any]:
    """``{"header": {...}, "tensors": {name: tensor}}`` of ``buf`` (tensors on its device, not
    copies where a view suffices: save or clone before the buffer moves on)."""
    if buf._ix is None:
        raise ValueError("state_dict: the buffer is empty (nothing was added yet); there is nothing to save")
    live = min(buf._total, buf.rows)  # rows written (a reopened disk buffer's floor travels in the state)
    ix, tree = buf._ix, buf._tree
    tensors = {f"storage/{p}": t[:live] for p, t in buf._storage.items()}
    if buf._final:
        # The side tables' rows that hold entries: lane n writes row fin_head[n] % final_rows, so
        # before a lane's ring wraps only rows below the largest counter hold any (a host read:
        # checkpoints are not the hot path). The scratch row, which nothing reads, stays home.
        written = min(buf._final_rows, int(ix.fin_head.max()))
        tensors.update({f"final/{p}": t[:written] for p, t in buf._final.items()})
    tensors.update({"index/start": ix.start[:live], "index/end_flags": ix.end_flags[:live],
                    "index/ret": ix.ret[:live], "index/final_idx": ix.final_idx[:live],
                    "index/fin_head": ix.fin_head, "index/state": ix.state,
                    "stats/rows": buf._row_stats[:live], "stats/totals": buf._stat_totals,
                    "rng/generator": buf._rng.generator.get_state()})
    if tree is not None:
        # Slots past the live rows have no mass (leaf 0); the spare element is never read.
        tensors.update({"tree/leaf": tree.leaf[:live * buf._lanes], "tree/sums": tree.sums, "tree/mins": tree.mins,
                        "tree/maxp": tree.maxp})
    header = {
        "format": FORMAT,
        "settings": settings_of(buf),
        "specs": specs_header(buf._specs, buf._narrow),
        "counters": {"adds": buf._total, "episode_rows": buf._episode_rows, "rng_offset": buf._rng.offset,
                     "generator_device": buf._rng.generator.device.type},
        "device": buf._device.type,
    }
    return {"header": header, "tensors": tensors}


def load_state_dict(buf, sd: dict[str, Any]) -> None:
    """Restore ``sd`` (from :func:`state_dict`, or read by :func:`load`) into ``buf``, which must
    have been built with the same settings; allocates on ``buf``'s device when it is empty. A
    state that does not match raises a ValueError naming what differs and leaves ``buf`` as it
    was: everything is checked before anything is allocated or written."""
    header, tensors = _checked(sd)
    settings, specs, counters = _header_parts(header)
    mine = {"capacity": buf.capacity, "num_envs": buf.num_envs, "done_marks": buf.done_marks,
            "autoreset": buf.autoreset, "next_keys": list(buf.next_keys), "reward_key": buf.reward_key,
            "final_obs_capacity": buf._final_rows * buf._lanes, "priority_alpha": buf.priority_alpha,
            "priority_eps": buf.priority_eps,
            "storage_dtypes": {k: dtype_name(d) for k, d in buf.storage_dtypes.items()}}
    for k, v in mine.items():
        if settings.get(k, {} if k == "storage_dtypes" else None) != v:
            raise ValueError(f"state_dict: saved with {k}={settings.get(k)!r}, this buffer has {k}={v!r}")
    if buf._specs is not None and buf._specs != specs:
        differ = sorted(p for p in set(specs) | set(buf._specs) if specs.get(p) != buf._specs.get(p))
        raise ValueError(f"state_dict: saved leaves differ from this buffer's at {differ}: saved "
                         f"{ {p: specs.get(p) for p in differ} }, here { {p: buf._specs.get(p) for p in differ} }")
    live = min(counters["adds"], buf.rows)
    first = next((t for t in tensors.values() if isinstance(t, torch.Tensor)), None)
    device = buf._device if buf._device is not None else first.device if first is not None else torch.device("cpu")
    _check_tensors(buf, specs, tensors, counters, live, device)
    fresh = buf._allocate(specs, device) if buf._specs is None else None
    with torch.no_grad():
        if fresh is not None:
            buf.__dict__.update(fresh)
        _restore(buf, tensors, live)
    buf._seed = settings["seed"]
    buf._rng.seed = settings["seed"]
    buf._rng.offset = counters["rng_offset"]
    if counters["generator_device"] == buf._rng.generator.device.type:
        buf._rng.generator.set_state(tensors["rng/generator"].cpu())
    else:  # generator states do not carry across device types: restart the stream from the seed
        buf._rng.generator.manual_seed(settings["seed"])
    buf._total = counters["adds"]
    buf._epoch += 1  # a mirror no longer follows this index (nor one that this index mirrors)
    buf._floor = int(buf._ix.state[STATE_FLOOR])
    if buf._begun is not None:
        buf._begun.fill_(counters["adds"])
    buf._episode_rows = counters["episode_rows"]
    buf._episode_rows_at = -1
    buf._episode_ends = None


def _header_parts(header: dict) -> tuple[dict, dict[str, LeafSpec], dict]:
    """(settings, leaf specs, counters) of a state's header, each checked for the fields and
    types that loading reads."""
    parts = {}
    for key in ("settings", "specs", "counters"):
        if not isinstance(header.get(key), dict):
            raise ValueError(f"state_dict: the header's {key!r} is missing or not a dict "
                             f"(got {type(header.get(key)).__name__})")
        parts[key] = header[key]
    settings, counters = parts["settings"], parts["counters"]
    if type(settings.get("seed")) is not int:
        raise ValueError(f"state_dict: settings['seed'] must be an int, got {settings.get('seed')!r}")
    for key in ("adds", "episode_rows", "rng_offset"):
        v = counters.get(key)
        if type(v) is not int or v < 0:
            raise ValueError(f"state_dict: counters[{key!r}] must be an int >= 0, got {v!r}")
    if not isinstance(counters.get("generator_device"), str):
        raise ValueError(f"state_dict: counters['generator_device'] must be a device type such as 'cpu' "
                         f"or 'cuda', got {counters.get('generator_device')!r}")
    specs = {}
    for p, s in parts["specs"].items():
        shape, dtype = (s.get("shape"), s.get("dtype")) if isinstance(s, dict) else (None, None)
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)) or dtype not in DTYPES:
            raise ValueError(f"state_dict: the spec of leaf {p!r} must be {{'shape': [ints >= 0], 'dtype': "
                             f"one of {sorted(DTYPES)}}}, got {s!r}")
        specs[p] = LeafSpec(tuple(shape), DTYPES[dtype])
    if not specs:
        raise ValueError("state_dict: the header's 'specs' lists no leaves")
    return settings, specs, counters


def _check_tensors(buf, specs: dict[str, LeafSpec], tensors: dict, counters: dict, live: int,
                   device: torch.device) -> None:
    """Every tensor a state of ``live`` rows must hold for ``buf``'s settings and ``specs``, with
    its shape and dtype, and no other; the layout comes from the meta device (nothing is
    allocated). Raises a ValueError (TypeError for a non-tensor) naming the first that differs."""
    rows, lanes = buf._rows, buf._lanes
    meta = torch.device("meta")
    ix = EpisodeIndex.empty(rows, lanes, meta)
    narrow = narrowed(buf.storage_dtypes, specs, [buf._reward_leaf(specs) or ""])
    want: dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]] = {
        f"storage/{p}": ((live, lanes, *s.shape), (narrow.get(p, s.dtype),)) for p, s in specs.items()}
    for name in ("start", "end_flags", "ret"):
        t = getattr(ix, name)
        want[f"index/{name}"] = ((live, *t.shape[1:]), (t.dtype,))
    # final_idx: int32 (earlier files: whole int64 counters); state: earlier files hold fewer.
    want["index/final_idx"] = ((live, lanes), (ix.final_idx.dtype, torch.int64))
    want["index/fin_head"] = (tuple(ix.fin_head.shape), (ix.fin_head.dtype,))
    want["index/state"] = ((None,), (ix.state.dtype,))
    want["stats/rows"] = ((live, 3), (torch.float64,))
    want["stats/totals"] = ((3,), (torch.float64,))
    want["rng/generator"] = ((None,), (torch.uint8,))
    finals = [] if buf._next_step else [p for k in buf.next_keys for p in leaves_under(k, specs)]
    for p in finals:
        want[f"final/{p}"] = ((None, lanes, *specs[p].shape), (narrow.get(p, specs[p].dtype),))
    tree = None
    if buf.priority_alpha is not None:
        tree = PriorityTree.empty(rows * lanes, lanes, buf.priority_alpha, buf.priority_eps, meta)
        want["tree/leaf"] = ((None,), (tree.leaf.dtype,))
        for name in ("sums", "mins", "maxp"):
            t = getattr(tree, name)
            want[f"tree/{name}"] = (tuple(t.shape), (t.dtype,))
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise ValueError(f"state_dict: tensors do not match this buffer's layout: "
                         + (f"missing {missing}" if missing else "")
                         + ("; " if missing and extra else "") + (f"unexpected {extra}" if extra else ""))
    for name, (shape, dtypes) in want.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict: tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        fits = t.dim() == len(shape) and all(w is None or w == d for w, d in zip(shape, t.shape))
        if not fits or t.dtype not in dtypes:
            shown = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ")"
            raise ValueError(f"state_dict: tensors[{name!r}] must have shape {shown} and dtype "
                             f"{' or '.join(map(str, dtypes))}, got {tuple(t.shape)} {t.dtype}")
    if tensors["index/state"].shape[0] > ix.state.shape[0]:
        raise ValueError(f"state_dict: tensors['index/state'] holds {tensors['index/state'].shape[0]} counters, "
                         f"at most {ix.state.shape[0]} expected")
    if finals:
        fin = tensors["index/fin_head"]
        need = min(buf._final_rows, int(fin.max())) if fin.numel() else 0
        for p in finals:
            got = tensors[f"final/{p}"].shape[0]
            if not need <= got <= buf._final_rows + 1:  # format 1 holds the scratch row too
                span = f"{need}" if need == buf._final_rows else f"{need} to {buf._final_rows}"
                raise ValueError(f"state_dict: 'final/{p}' holds {got} rows, expected {span} rows of the "
                                 f"final-observation side table (at least the rows its counters have written)")
    if tree is not None and tensors["tree/leaf"].shape[0] not in (live * lanes, tree.leaf.shape[0]):
        raise ValueError(f"state_dict: 'tree/leaf' holds {tensors['tree/leaf'].shape[0]} leaves, expected the "
                         f"{live * lanes} of the live slots (or all {tree.leaf.shape[0]})")
    if counters["generator_device"] == device.type:
        try:
            torch.Generator(device=device).set_state(tensors["rng/generator"].cpu())
        except RuntimeError as err:
            raise ValueError(f"state_dict: 'rng/generator' is not a {device.type} generator state ({err})") from err


def _restore(buf, tensors: dict[str, torch.Tensor], live: int) -> None:
    """Copy a checked state in; rows past the live ones return to their state before any add (a
    buffer that held more rows than the checkpoint keeps none of them)."""
    ix, tree = buf._ix, buf._tree
    for t in (*buf._storage.values(), ix.end_flags, ix.ret, ix.final_idx, buf._row_stats):
        t[live:].zero_()
    ix.start[live:].fill_(SENTINEL)
    for p, t in buf._storage.items():
        t[:live].copy_(tensors[f"storage/{p}"])
    for p, t in buf._final.items():
        saved = tensors[f"final/{p}"][:buf._final_rows]
        t[:saved.shape[0]].copy_(saved)
        t[saved.shape[0]:buf._final_rows].zero_()
    for name in ("start", "end_flags", "ret"):
        getattr(ix, name)[:live].copy_(tensors[f"index/{name}"])
    # final_idx keeps the counters' low 31 bits (int32); earlier files hold them whole (int64).
    ix.final_idx[:live].copy_(tensors["index/final_idx"] & FINAL_IDX_MASK)
    ix.fin_head.copy_(tensors["index/fin_head"])
    # Files from before the floor and restart cursors hold the first two (the others are 0 there).
    saved = tensors["index/state"]
    ix.state.zero_()
    ix.state[:saved.shape[0]].copy_(saved)
    buf._row_stats[:live].copy_(tensors["stats/rows"])
    buf._stat_totals.copy_(tensors["stats/totals"])
    if tree is not None:
        leaf = tensors["tree/leaf"]  # the live slots' (format 1: every leaf and the spare)
        tree.leaf.zero_()
        tree.leaf[:leaf.shape[0]].copy_(leaf)
        for name in ("sums", "mins", "maxp"):
            getattr(tree, name).copy_(tensors[f"tree/{name}"])


def _checked(sd: Any) -> tuple[dict, dict]:
    if not isinstance(sd, dict) or set(sd) != {"header", "tensors"}:
        raise TypeError("state_dict: expected the dict that ReplayBuffer.state_dict() returns "
                        "({'header': ..., 'tensors': ...})")
    header, tensors = sd["header"], sd["tensors"]
    if not isinstance(header, dict) or not isinstance(tensors, dict):
        raise TypeError(f"state_dict: 'header' and 'tensors' must be dicts, got {type(header).__name__} "
                        f"and {type(tensors).__name__}")
    version = header.get("format")
    if version not in READS:
        raise ValueError(f"state_dict: format version {version!r}; this gpubuffers reads versions {list(READS)}"
                         + (" (written by a newer gpubuffers: upgrade)" if isinstance(version, int)
                            and version > FORMAT else ""))
    return header, tensors


def save(buf, path: str | os.PathLike) -> None:
    """Write ``buf``'s state to ``path`` atomically (see the module doc)."""
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError("save: checkpoints are safetensors files; pip install safetensors "
                          "(or gpubuffers[checkpoint])") from err
    sd = state_dict(buf)
    raw, shapes = {}, {}
    digest = hashlib.sha256()
    for name in sorted(sd["tensors"]):
        t = sd["tensors"][name].detach().contiguous().cpu()
        shapes[name] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
        b = t.reshape(-1).view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)
        digest.update(b.numpy().tobytes())
        raw[name] = b
    header = dict(sd["header"], tensors=shapes, sha256=digest.hexdigest())
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    # Written in a private folder beside the target (safetensors' own temporary files land there
    # too), then renamed over it. A save killed midway leaves that folder: the next save to this
    # path removes it (saves to one path are not concurrent).
    for name in os.listdir(folder):
        if name.startswith(f".{base}.") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    work = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
    os.makedirs(work)
    try:
        tmp = os.path.join(work, base)
        save_file(raw, tmp, metadata={_KEY: json.dumps(header)})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read(path: str | os.PathLike, device: str | torch.device | None = None) -> dict[str, Any]:
    """The state dict stored at ``path``, its tensors on ``device`` (default CPU), after checking
    the file's format version and checksum."""
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise ImportError("load: checkpoints are safetensors files; pip install safetensors "
                          "(or gpubuffers[checkpoint])") from err
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            raw = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors reports a damaged file with its own error types
        raise ValueError(f"path: {path!r} is not a readable gpubuffers checkpoint ({err})") from err
    if _KEY not in meta:
        raise ValueError(f"path: {path!r} is a safetensors file without a gpubuffers header")
    header = json.loads(meta[_KEY])
    _checked({"header": header, "tensors": {}})
    shapes = header.pop("tensors")
    expected = header.pop("sha256")
    if set(shapes) != set(raw):
        raise ValueError(f"path: {path!r} lists tensors {sorted(shapes)} but holds {sorted(raw)}")
    digest = hashlib.sha256()
    for name in sorted(raw):
        digest.update(raw[name].numpy().tobytes())
    if digest.hexdigest() != expected:
        raise ValueError(f"path: {path!r} is corrupted: the checksum of its tensor bytes does not match")
    dev = torch.device("cpu") if device is None else resolve_device(device)
    tensors = {}
    for name, b in raw.items():
        meta_t = shapes[name]
        t = b.view(DTYPES[meta_t["dtype"]]).reshape(meta_t["shape"]) if b.numel() else \
            torch.zeros(meta_t["shape"], dtype=DTYPES[meta_t["dtype"]])
        tensors[name] = t if name == "rng/generator" else t.to(dev)
    return {"header": header, "tensors": tensors}


def load(cls, path: str | os.PathLike, device: str | torch.device | None = None, storage: str = "memory"):
    """A new ``cls`` (ReplayBuffer) restored from ``path`` onto ``device`` (default: the kind of
    device it was saved from, ``"cuda"`` meaning the current one), with ``storage`` (a shared
    buffer, for worker processes, on the CPU)."""
    sd = read(path)
    header = sd["header"]
    if device is None and storage != "memory":
        device = "cpu"
    dev = resolve_device(header["device"] if device is None else device)
    settings = dict(header["settings"])
    settings["storage_dtypes"] = {k: DTYPES[d] for k, d in settings.get("storage_dtypes", {}).items()}
    buf = cls(**settings, device=dev, storage=storage)
    load_state_dict(buf, sd)
    return buf
