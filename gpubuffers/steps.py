"""What every buffer's ``add`` shares: checking arguments and one step against the stored layout.

:class:`~gpubuffers.ReplayBuffer` and :class:`~gpubuffers.RolloutBuffer` take the same step
format (a nested dict or TensorDict of leaves ``[N, *leaf_shape]``, numpy accepted, stored
detached), the same episode flags and the same errors; both check an add here before writing
anything. Checks read metadata only (type, shape, dtype, device), never tensor values, so they
cost no host sync.
"""

from __future__ import annotations

import math
import numbers
import random
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from .specs import (RESERVED_KEYS, LeafSpec, as_tensor, check_leaf, check_mask, flatten, storable)

DONE_MARKS = ("first", "last")
AUTORESET = ("same_step", "next_step")


def positive_int(value: Any, name: str, limit: int | None = None) -> int:
    """A positive int (numpy integers accepted, floats and bools refused), at most ``limit``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    value = int(value)
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    if limit is not None and value > limit:
        raise ValueError(f"{name}: expected a positive int of at most {limit}, got {value}")
    return value


def real(value: Any, name: str, low: float, high: float, *, open_low: bool = False) -> float:
    """A real number in ``[low, high]`` (``(low, high]`` when ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    bound = "(" if open_low else "["
    if not (low < value if open_low else low <= value) or not value <= high:
        raise ValueError(f"{name}: expected a float in {bound}{low}, {high}], got {value}")
    return value


def seed_or_fresh(seed: Any, name: str = "seed") -> int:
    """An int64 seed; ``None`` takes one from the operating system, which leaves the caller's
    torch random stream untouched."""
    if seed is None:
        return random.SystemRandom().getrandbits(62)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name}: expected an int or None, got {type(seed).__name__}")
    seed = int(seed)
    if not -2**63 <= seed < 2**63:
        raise ValueError(f"{name}: expected an int in [-2**63, 2**63) (int64), got {seed}")
    return seed


def conventions(done_marks: Any, autoreset: Any) -> tuple[bool, bool]:
    """(marks_last, next_step) from the two episode conventions, checked."""
    if done_marks not in DONE_MARKS:
        raise ValueError(f"done_marks: expected one of {DONE_MARKS}, got {done_marks!r}")
    if autoreset not in AUTORESET:
        raise ValueError(f"autoreset: expected one of {AUTORESET}, got {autoreset!r}")
    return done_marks == "last", autoreset == "next_step"


def leaves_under(key: str, specs: Mapping[str, Any]) -> list[str]:
    """Leaf paths named by ``key``: the leaf itself or every leaf of the subtree ``key/...``."""
    return [p for p in specs if p == key or p.startswith(key + "/")]


#: The narrowings ``storage_dtypes`` allows: returned (added) dtype -> the dtypes it may be stored
#: in. Floats round to nearest even (float16 overflows to inf past 65504; bfloat16 keeps float32's
#: range with 8 significant bits); integers keep every value in the stored type's range and wrap
#: the others modulo 2**bits, as ``Tensor.to`` does. Bool and complex leaves are not narrowed.
NARROWINGS: dict[torch.dtype, tuple[torch.dtype, ...]] = {
    torch.float64: (torch.float32, torch.bfloat16, torch.float16),
    torch.float32: (torch.bfloat16, torch.float16),
    torch.int64: (torch.int32, torch.int16, torch.int8, torch.uint8),
    torch.int32: (torch.int16, torch.int8, torch.uint8),
    torch.int16: (torch.int8, torch.uint8),
}


def check_storage_dtypes(value: Any) -> dict[str, torch.dtype]:
    """The constructor's ``storage_dtypes``: a mapping of leaf names to torch dtypes (``None``:
    every leaf stored as added)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"storage_dtypes: expected a dict of leaf names to torch dtypes, got "
                        f"{type(value).__name__}")
    stored = set(d for ds in NARROWINGS.values() for d in ds)
    out = {}
    for k, d in value.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"storage_dtypes: expected leaf names as keys, got {k!r}")
        if not isinstance(d, torch.dtype):
            raise TypeError(f"storage_dtypes['{k}']: expected a torch.dtype, got {d!r}")
        if d not in stored:
            raise ValueError(f"storage_dtypes['{k}']: a leaf can be stored in one of "
                             f"{sorted(map(str, stored))}, got {d}")
        out[k] = d
    return out


def narrowed(storage_dtypes: Mapping[str, torch.dtype], specs: Mapping[str, LeafSpec],
             keep: Sequence[str] = ()) -> dict[str, torch.dtype]:
    """The leaves stored narrower than they are added, ``{path: stored dtype}``, from the
    constructor's ``storage_dtypes`` (a key names a leaf or a subtree) checked against the specs
    of the first add; ``keep`` lists leaves that must stay as added (the reward leaf)."""
    out: dict[str, torch.dtype] = {}
    named: dict[str, str] = {}
    for key, d in storage_dtypes.items():
        paths = leaves_under(key, specs)
        if not paths:
            raise ValueError(f"storage_dtypes: {key!r} names no leaf of the step (leaves: {sorted(specs)})")
        for p in paths:
            if p in named:
                raise ValueError(f"storage_dtypes: the leaf {p!r} is named twice (by {named[p]!r} and {key!r})")
            named[p] = key
            have = specs[p].dtype
            if d == have:
                continue
            if d not in NARROWINGS.get(have, ()):
                allowed = NARROWINGS.get(have)
                raise ValueError(f"storage_dtypes['{key}']: the leaf {p!r} is added as {have}, which can "
                                 f"be stored as " + (f"one of {[str(a) for a in allowed]}" if allowed
                                                     else "itself only") + f"; got {d}")
            if p in keep:
                raise ValueError(f"storage_dtypes['{key}']: the leaf {p!r} is the reward_key leaf, summed "
                                 f"into returns; it is kept as added ({have})")
            out[p] = d
    return out


def scalar_leaf(specs: Mapping[str, LeafSpec], key: str, name: str, instead: str) -> str:
    """Check that ``key`` names a real leaf with one value per lane (``[N]`` or ``[N, 1]``);
    ``name`` is the argument that named it, ``instead`` what the user may do otherwise."""
    spec = specs.get(key)
    if spec is None:
        raise ValueError(f"{name}: {key!r} names no leaf of the step (leaves: {sorted(specs)}); "
                         f"name the leaf, or {instead}")
    if math.prod(spec.shape) != 1 or len(spec.shape) > 1:
        raise ValueError(f"{name}: the leaf {key!r} has per-lane shape {spec.shape}; expected a "
                         f"scalar per lane ([N] or [N, 1]): name a scalar leaf, or {instead}")
    if spec.dtype.is_complex:
        raise TypeError(f"{name}: the leaf {key!r} has dtype {spec.dtype}; expected a real "
                        f"(float, integer or bool) leaf")
    return key


class Layout(NamedTuple):
    """The stored layout an add is checked against; ``specs``/``shapes`` are None before the
    first add, ``device`` None until given or taken from a first step."""

    lanes: int
    single: bool
    device: torch.device | None
    specs: dict[str, LeafSpec] | None
    shapes: dict[str, torch.Size] | None

    @property
    def batch(self) -> tuple[int, ...]:
        return () if self.single else (self.lanes,)


class Lanes:
    """What both buffers share: the lanes, the device and the leaf layout every add is checked
    against (set by the subclass's constructor and its first add)."""

    _lanes: int
    _single: bool
    _device: torch.device | None
    _specs: dict[str, LeafSpec] | None
    _shapes: dict[str, torch.Size] | None

    @property
    def num_envs(self) -> int | None:
        """Lanes N; None for a single environment."""
        return None if self._single else self._lanes

    @property
    def device(self) -> torch.device | None:
        """Storage device (``None`` until the first add when it was not given)."""
        return self._device

    @property
    def specs(self) -> dict[str, LeafSpec] | None:
        """Per-leaf layout (``"a/b"`` paths), known after the first add."""
        return None if self._specs is None else dict(self._specs)

    def _layout(self) -> Layout:
        return Layout(self._lanes, self._single, self._device, self._specs, self._shapes)

    def _installed(self, specs: dict[str, LeafSpec], device: torch.device,
                   storage: dict[str, torch.Tensor], backend: str | None) -> dict[str, Any]:
        """The attributes a first add installs in any buffer: its ops, the leaves ``[T, N, ...]``
        and their flat views ``[T * N, ...]``, the checked shapes, the device and the specs."""
        from . import ops

        batch = () if self._single else (self._lanes,)
        return {"_ops": ops.backend(device, backend), "_storage": storage,
                "_flat": {p: t.view(-1, *specs[p].shape) for p, t in storage.items()},
                "_shapes": {p: torch.Size(batch + s.shape) for p, s in specs.items()},
                "_device": device, "_specs": specs}


class Step(NamedTuple):
    """One add, checked and converted: leaves ``[1 or N, *shape]`` (detached), flags [N] bool."""

    flat: dict[str, torch.Tensor]
    done: torch.Tensor | None
    terminated: torch.Tensor | None
    truncated: torch.Tensor | None
    specs: dict[str, LeafSpec]      # the layout's, or the new one a first add sets
    device: torch.device


def check_step(lay: Layout, step: Any, done: Any, terminated: Any, truncated: Any,
               reserved: frozenset[str] = RESERVED_KEYS) -> Step:
    """Check one add against ``lay`` (a first add, ``lay.specs is None``, sets the specs from
    its own leaves, refusing ``reserved`` top-level names) and convert it; raises before
    anything is written. ``done`` may be None when ``terminated`` is given."""
    batch = lay.batch
    device = lay.device
    flat = flatten(step, "step")
    if device is None:
        device = next((v.device for v in flat.values() if isinstance(v, torch.Tensor)),
                      torch.device("cpu"))
    for p, v in flat.items():
        if type(v) is not torch.Tensor:
            v = as_tensor(v, f"step['{p}']", device)
        flat[p] = v.detach() if v.requires_grad else v
    specs = lay.specs if lay.specs is not None else new_specs(flat, batch, reserved)
    if flat.keys() != specs.keys():
        missing = sorted(set(specs) - set(flat))
        extra = sorted(set(flat) - set(specs))
        raise ValueError(f"step: expected leaves {sorted(specs)}, got {sorted(flat)} "
                         f"(missing {missing}, unexpected {extra})")
    shapes = lay.shapes
    for p, v in flat.items():
        spec = specs[p]
        if shapes is None or v.shape != shapes[p] or v.dtype != spec.dtype or v.device != device:
            check_leaf(v, f"step['{p}']", batch, spec, device)
    if done is None and terminated is None:
        raise TypeError("done: expected the episode flags [N] bool, or terminated= (and "
                        "truncated=) to derive them from; got neither")
    flags = [None if v is None else check_mask(v, n, batch, device)
             for v, n in ((done, "done"), (terminated, "terminated"), (truncated, "truncated"))]
    lanes = (lay.lanes,)
    if lay.single:
        flat = {p: v.reshape(1, *specs[p].shape) for p, v in flat.items()}
    done, terminated, truncated = (None if t is None else t.reshape(lanes) for t in flags)
    return Step(flat, done, terminated, truncated, specs, device)


def new_specs(flat: Mapping[str, torch.Tensor], batch: tuple[int, ...],
              reserved: frozenset[str] = RESERVED_KEYS) -> dict[str, LeafSpec]:
    """The layout a first add sets: per leaf its per-lane shape and dtype."""
    specs = {}
    for p, v in flat.items():
        top = p.split("/")[0]
        if top in reserved:
            raise ValueError(f"step: leaf name {top!r} is reserved for sample outputs "
                             f"(reserved: {sorted(reserved)})")
        if tuple(v.shape[:len(batch)]) != batch:
            raise ValueError(f"step['{p}']: expected a leading lane dimension of {batch[0]} "
                             f"(num_envs), got shape {tuple(v.shape)}")
        if not storable(v.dtype):
            raise TypeError(f"step['{p}']: expected a dtype of 1, 2, 4 or 8 bytes (or "
                            f"complex128), got {v.dtype}")
        specs[p] = LeafSpec(tuple(v.shape[len(batch):]), v.dtype)
    return specs


def lane_values(value: Any, name: str, lay: Layout, device: torch.device) -> torch.Tensor:
    """A real value per lane (``[N]`` or ``[N, 1]``; ``[]`` or ``[1]`` for a single environment),
    numpy or requires-grad accepted, as [N] float32 on ``device``, detached."""
    value = as_tensor(value, name, device)
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected a real (float or integer) tensor, got {value.dtype}")
    shapes = [(), (1,)] if lay.single else [(lay.lanes,), (lay.lanes, 1)]
    if tuple(value.shape) not in shapes:
        raise ValueError(f"{name}: expected shape {' or '.join(map(str, shapes))}, got "
                         f"{tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
    return value.detach().reshape(lay.lanes).to(torch.float32)

