"""ShardedReplayBuffer: one buffer shard per rank of a torch.distributed process group.

Each rank (one process per GPU under ``torchrun``, or per CPU worker on gloo) holds the shard of
its own environments' lanes on its own device and adds to it with no communication. Sampling is
local (a rank learns from its own lanes: data-parallel training) or global: B items per rank,
uniform over the union of every rank's shard, the rows fetched from their owners with one
``all_to_all_single``. Statistics are summed over the group with one ``all_reduce``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from .buffer import MAX_BATCH, ReplayBuffer
from .specs import flatten, unflatten
from .steps import positive_int

SCOPES = ("local", "global")

#: Window proposals asked for each unfilled item per round of a global ``sample_sequences``.
PROPOSALS_PER_ROUND = 4


class ShardedReplayBuffer:
    """A :class:`~gpubuffers.ReplayBuffer` shard per rank of ``group`` (default: the world).

    Args:
        capacity: transitions held by this rank's shard (per rank: the group holds
            ``capacity * world_size``).
        num_envs: this rank's lanes.
        group: the process group (``torch.distributed.init_process_group`` must have run).
        seed: rank r seeds its shard with ``seed + r`` (``None``: a fresh seed per rank).
        **options: any :class:`~gpubuffers.ReplayBuffer` option, the same on every rank.

    Collective calls (``scope="global"``, ``episode_stats(scope="global")``) must be made by
    every rank of the group, in the same order, like any torch.distributed collective. A global
    call first checks (once per kind of call) that every rank's leaves and settings agree, and
    raises the same ValueError on every rank when they do not, instead of hanging.
    """

    def __init__(self, capacity: int, num_envs: int | None, *, group: Any = None, seed: int | None = None,
                 **options: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedReplayBuffer: call torch.distributed.init_process_group first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed: expected an int or None, got {seed!r}")
            seed = seed + self.rank
        self.local = ReplayBuffer(capacity, num_envs, seed=seed, **options)
        self._schemas: dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]] = {}
        self._empty_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ local
    def add(self, *args: Any, **kwargs: Any) -> None:
        """:meth:`ReplayBuffer.add` on this rank's shard; no communication."""
        self.local.add(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.local)

    @property
    def capacity(self) -> int:
        """Transitions this rank's shard holds at most."""
        return self.local.capacity

    @property
    def device(self) -> torch.device | None:
        return self.local.device

    def __repr__(self) -> str:
        return f"ShardedReplayBuffer(rank={self.rank}/{self.world_size}, local={self.local!r})"

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, *, scope: str = "local", **options: Any) -> dict[str, Any]:
        """``scope="local"``: :meth:`ReplayBuffer.sample` of this rank's shard. ``"global"``: B
        transitions uniform over every rank's drawable transitions (those whose successor is
        written), each with what the owner's ``sample`` returns (``n_step``/``gamma`` pass
        through; ``index`` is the owner's transition id) and ``rank`` [B] int64, the owner; items
        come grouped by owner rank. Ranks weigh by their drawable rows times lanes, so under
        ``autoreset="next_step"`` a shard's reset rows count too (its owner draws around them). Per call the group exchanges each rank's drawable count and
        per-owner request counts (8 bytes per rank each), then every item's bytes once (the
        sum of its leaves' and flags' sizes), and reads the counts on the host (the split sizes
        of the exchange): on CUDA that is one sync.

        Prioritized shards (``priority_alpha=...``): items are drawn in proportion to their
        priority over the whole group (owners in proportion to their shards' priority mass,
        all-gathered with their smallest priority, 16 bytes per rank; each owner draws its
        share by priority), and ``weight`` is normalized over the group: by the largest weight
        of any rank's stored data, that is, from the group's smallest priority. Feed the new
        priorities back with :meth:`update_priorities` and the sample's ``rank``."""
        scope = self._scope(scope)
        if scope == "local":
            return self.local.sample(batch_size, **options)
        batch_size = positive_int(batch_size, "batch_size", MAX_BATCH)
        schema = self._schema(("transitions", sorted(options.items())), lambda buf: buf.sample(1, **options), 2)
        device, buf = self._device(), self.local
        if buf.priority_alpha is not None:
            return self._sample_prioritized(batch_size, options, schema, device)
        sizes = self._proposals("sample", 2, device)
        owner = torch.multinomial(sizes.to(torch.float64), batch_size, replacement=True,
                                  generator=self._generator(device))
        width = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in schema)
        received = self._exchange(owner, lambda n: buf.sample(n, **options), schema, width, device)
        out = unflatten(_unpack(received, schema))
        out["rank"] = torch.sort(owner).values
        return out

    def _sample_prioritized(self, batch_size: int, options: dict[str, Any], schema, device: torch.device) -> dict[str, Any]:
        buf = self.local
        beta = buf._beta(options.get("priority_beta"))
        mine = torch.tensor([0.0, math.inf], dtype=torch.float64, device=device)
        if buf.index is not None and buf.num_adds >= 2:
            mine = torch.stack([buf._tree.total.double(), buf._tree.smallest.double()])
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        table = torch.stack(parts)  # [world, (mass, smallest leaf)]
        mass = table[:, 0]
        if not bool(mass.sum() > 0):
            raise ValueError("sample: no rank holds a transition with a priority to draw yet")
        smallest = torch.where(mass > 0, table[:, 1], math.inf).min()
        owner = torch.multinomial(mass, batch_size, replacement=True, generator=self._generator(device))
        width = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in schema)
        received = self._exchange(owner, lambda n: buf.sample(n, **options), schema, width, device)
        out = unflatten(_unpack(received, schema))
        rank = torch.sort(owner).values
        # The owner's weights are (leaf / its smallest leaf) ** -beta; over the group the
        # smallest leaf is the group's: the factor (its smallest / the group's) ** -beta.
        factor = torch.exp(torch.log(table[rank, 1] / smallest) * -beta)
        out["weight"] = (out["weight"].double() * factor).float()
        out["rank"] = rank
        return out

    def update_priorities(self, index: Any, priority: Any, *, rank: Any = None, check: bool = False) -> None:
        """``rank=None``: :meth:`ReplayBuffer.update_priorities` of this rank's shard (ids from a
        local sample). With ``rank`` (a global sample's ``"rank"``): collective; each id and its
        priority go to their owner with ``all_to_all_single`` (12 bytes per item, after the
        per-owner counts), which applies them, and the largest priority applied so far becomes
        the group's on every rank (an ``all_reduce``), so that new transitions everywhere enter
        with it. A call that a rank refuses raises the same ValueError on every rank."""
        buf = self.local
        if rank is None:
            buf.update_priorities(index, priority, check=check)
            return
        device = self._device()
        problem, parts = None, None
        try:
            if buf.priority_alpha is None:
                raise ValueError("update_priorities: the shards sample uniformly (priority_alpha=None)")
            if buf.index is None:
                raise ValueError("update_priorities: this rank's shard is empty")
            parts = [torch.as_tensor(v, device=device).detach().reshape(-1) for v in (index, priority, rank)]
            index_t, priority_t, rank_t = parts
            if any(t.dtype.is_floating_point or t.dtype == torch.bool for t in (index_t, rank_t)):
                raise TypeError("index, rank: expected integer tensors (a global sample's 'index' and 'rank')")
            if not (index_t.numel() == priority_t.numel() == rank_t.numel()):
                raise ValueError(f"priority, rank: expected one per index ({index_t.numel()}), got "
                                 f"{priority_t.numel()} and {rank_t.numel()}")
            if rank_t.numel() and bool(((rank_t < 0) | (rank_t >= self.world_size)).any()):
                raise ValueError(f"rank: expected ranks in [0, {self.world_size})")
            if check and not bool((torch.isfinite(priority_t) & (priority_t >= 0)).all()):
                raise ValueError("priority: expected finite values >= 0")
        except (TypeError, ValueError) as err:
            problem = f"{type(err).__name__}: {err}"
        flag = torch.tensor([problem is not None], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if int(flag):
            problems: list[Any] = [None] * self.world_size
            dist.all_gather_object(problems, problem, group=self.group)
            raise ValueError("update_priorities: " + "; ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p))
        index_t, priority_t, rank_t = parts
        order = torch.argsort(rank_t, stable=True)
        counts_to = torch.bincount(rank_t, minlength=self.world_size)
        counts_from = torch.empty_like(counts_to)
        dist.all_to_all_single(counts_from, counts_to, group=self.group)
        sent, got = counts_to.tolist(), counts_from.tolist()
        ids = torch.empty(sum(got), dtype=torch.int64, device=device)
        dist.all_to_all_single(ids, index_t.to(torch.int64)[order].contiguous(), output_split_sizes=got,
                               input_split_sizes=sent, group=self.group)
        values = torch.empty(sum(got), dtype=torch.float32, device=device)
        dist.all_to_all_single(values, priority_t.to(torch.float32)[order].contiguous(), output_split_sizes=got,
                               input_split_sizes=sent, group=self.group)
        buf.update_priorities(ids, values)
        dist.all_reduce(buf._tree.maxp, op=dist.ReduceOp.MAX, group=self.group)

    def sample_sequences(self, batch_size: int, length: int, *, scope: str = "local",
                         **options: Any) -> dict[str, Any]:
        """``scope="local"``: :meth:`ReplayBuffer.sample_sequences` of this rank's shard.
        ``"global"``: B windows uniform over every rank's admissible windows, with ``rank`` [B]:
        in rounds, each still-unfilled item asks ``PROPOSALS_PER_ROUND`` (4) proposals of owners
        drawn in proportion to their window proposals (live rows - L + 1, times their lanes), the
        owners answer with each proposal and its admissibility (9 bytes), the item keeps its first
        admissible one, and the ranks agree with an ``all_reduce`` whether any item is left; after
        ``max_proposals`` proposals per item the items left come back ``valid=False``, as locally.
        Then one exchange sends each owner the proposals kept (8 bytes each) and brings back their
        windows' bytes."""
        scope = self._scope(scope)
        if scope == "local":
            return self.local.sample_sequences(batch_size, length, **options)
        batch_size = positive_int(batch_size, "batch_size", MAX_BATCH)
        length = positive_int(length, "length")
        if options:
            raise TypeError(f"sample_sequences: scope='global' takes no options, got {sorted(options)}")
        schema = self._schema(("sequences", length), lambda buf: buf.sample_sequences(1, length), length)
        device, buf = self._device(), self.local
        sizes = self._proposals("sample_sequences", length, device).to(torch.float64)
        gen = self._generator(device)
        width = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in schema)
        answer = [("proposal", (), torch.int64), ("ok", (), torch.bool)]
        owner = torch.zeros(batch_size, dtype=torch.int64, device=device)
        chosen = torch.zeros(batch_size, dtype=torch.int64, device=device)
        pending = torch.arange(batch_size, device=device)
        m = PROPOSALS_PER_ROUND
        for _ in range(-(-buf.max_proposals // m)):
            # m proposals for each pending item, owners drawn by their proposal counts; the owners
            # answer with the proposal and its admissibility (9 bytes each).
            k = pending.numel()
            asked = (torch.multinomial(sizes, k * m, replacement=True, generator=gen) if k
                     else torch.zeros(0, dtype=torch.int64, device=device))
            got = self._exchange(asked, lambda n: dict(zip(("proposal", "ok"), buf._window_proposals(n, length))),
                                 answer, 9, device)
            back = torch.empty_like(got)
            back[torch.argsort(asked, stable=True)] = got
            found = _unpack(back, answer)
            ok = found["ok"].view(k, m)
            pick = ok.to(torch.uint8).argmax(1)  # the first admissible (the first one if none)
            at = torch.arange(k, device=device) * m + pick
            owner[pending] = asked[at]
            chosen[pending] = found["proposal"][at]
            pending = pending[~ok.any(1)]
            left = torch.tensor([pending.numel()], dtype=torch.int64, device=device)
            dist.all_reduce(left, group=self.group)
            if int(left) == 0:
                break
        # Each owner returns the chosen windows (unfilled items: their first proposal, valid=False).
        order = torch.argsort(owner, stable=True)
        result = torch.empty((batch_size, width), dtype=torch.uint8, device=device)
        result[order] = self._exchange(owner, lambda proposals: buf._windows_at(proposals, length), schema, width,
                                       device, payload=chosen[order])
        rank = owner
        out = unflatten(_unpack(result, schema))
        out["rank"] = rank
        return out

    def sample_episodes(self, batch_size: int, max_rows: int | None = None, *,
                        scope: str = "local") -> dict[str, Any]:
        """``scope="local"``: :meth:`ReplayBuffer.sample_episodes` of this rank's shard.
        ``"global"``: B whole episodes uniform over every rank's finished episodes, packed as
        locally (``cu_seqlens``, ``mask``, per-episode ``length``, ``lane``, ``episode_return``,
        ``truncated``, ``valid``, per-row leaves, ``is_first``, ``is_last``, ``index``), with
        ``rank`` [B]; episodes come grouped by owner. ``max_rows`` (default: every row received)
        is this rank's row budget: episodes past it are dropped whole (``valid=False``, length
        0), as locally. Per call the group all-gathers each rank's episode count (8 bytes per
        rank), exchanges per-owner episode and row counts (8 bytes per rank each), then each
        episode's entries and each of its rows' bytes once; the counts are read on the host."""
        scope = self._scope(scope)
        if scope == "local":
            return self.local.sample_episodes(batch_size, max_rows)
        batch_size = positive_int(batch_size, "batch_size", MAX_BATCH)
        if max_rows is not None:
            max_rows = positive_int(max_rows, "max_rows", MAX_BATCH)
        device, buf = self._device(), self.local
        rows_schema = self._schema("episode rows", lambda b: _episode_parts(b.sample_episodes(1))[1], 1)
        eps_schema = self._schema("episode entries", lambda b: _episode_parts(b.sample_episodes(1))[0], 1)
        mine = (buf.num_episodes.to(device).reshape(1) if buf.index is not None
                else torch.zeros(1, dtype=torch.int64, device=device))
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        sizes = torch.cat(parts)
        if int(sizes.sum()) == 0:
            raise ValueError("sample_episodes: no rank holds a finished episode yet")
        owner = torch.multinomial(sizes.to(torch.float64), batch_size, replacement=True,
                                  generator=self._generator(device))
        # Each owner samples what it was asked for once; its episodes and their rows travel in
        # two exchanges of the same order.
        counts_to = torch.bincount(owner, minlength=self.world_size)
        counts_from = torch.empty_like(counts_to)
        dist.all_to_all_single(counts_from, counts_to, group=self.group)
        wanted, served = counts_to.tolist(), counts_from.tolist()
        e_width = sum(math.prod(sh) * dt.itemsize for _, sh, dt in eps_schema)
        r_width = sum(math.prod(sh) * dt.itemsize for _, sh, dt in rows_schema)
        if sum(served):
            drawn = buf.sample_episodes(sum(served))
            entries, rows = _episode_parts(drawn)
            cu = drawn["cu_seqlens"]
            ends = torch.tensor([0, *itertools.accumulate(served)], device=device)
            rows_to = (cu[ends[1:]] - cu[ends[:-1]])  # rows per destination
            e_packed, r_packed = _pack(entries, eps_schema), _pack(rows, rows_schema)[:int(cu[-1])]
        else:
            rows_to = torch.zeros(self.world_size, dtype=torch.int64, device=device)
            e_packed = torch.empty((0, e_width), dtype=torch.uint8, device=device)
            r_packed = torch.empty((0, r_width), dtype=torch.uint8, device=device)
        rows_from = torch.empty_like(rows_to)
        dist.all_to_all_single(rows_from, rows_to, group=self.group)
        e_in = torch.empty((batch_size, e_width), dtype=torch.uint8, device=device)
        dist.all_to_all_single(e_in, e_packed, output_split_sizes=wanted, input_split_sizes=served, group=self.group)
        got_rows = rows_from.tolist()
        r_in = torch.empty((sum(got_rows), r_width), dtype=torch.uint8, device=device)
        dist.all_to_all_single(r_in, r_packed, output_split_sizes=got_rows, input_split_sizes=rows_to.tolist(),
                               group=self.group)
        out = _unpack(e_in, eps_schema)
        length = out["length"]
        total = r_in.shape[0]
        budget = total if max_rows is None else max_rows
        valid = out["valid"] & (torch.cumsum(length, 0) <= budget)
        kept = int((length * valid).sum())  # the kept episodes are a prefix (lengths are positive)
        width = max(budget, 1) if max_rows is None else max_rows
        r_all = torch.zeros((width, r_width), dtype=torch.uint8, device=device)
        r_all[:kept] = r_in[:kept]
        flat = _unpack(r_all, rows_schema)
        cu = torch.zeros(batch_size + 1, dtype=torch.int64, device=device)
        torch.cumsum(length * valid, 0, out=cu[1:])
        mask = torch.arange(width, device=device) < cu[-1]
        flat["index"] = torch.where(mask, flat["index"], -1)
        for key in ("is_first", "is_last"):
            flat[key] = flat[key] & mask
        result = unflatten({p: t for p, t in flat.items()})
        result.update({k: v for k, v in out.items() if k != "length"})
        result.update(length=length * valid, valid=valid, cu_seqlens=cu, mask=mask, num_rows=cu[-1],
                      rank=torch.sort(owner).values)
        if "truncated" in result:
            result["truncated"] = result["truncated"] & valid
        return result

    def episode_stats(self, last_rows: int | None = None, *, scope: str = "local") -> dict[str, torch.Tensor]:
        """:meth:`ReplayBuffer.episode_stats` of this rank's shard, or (``scope="global"``) of
        every rank's together: one ``all_reduce`` of the three sums (24 bytes), every rank
        receiving the same figures."""
        scope = self._scope(scope)
        if scope == "local":
            return self.local.episode_stats(last_rows)
        self._schema("stats")  # the same leaves and settings everywhere
        buf = self.local
        if buf.index is None:
            if last_rows is not None:
                positive_int(last_rows, "last_rows")
            sums = torch.zeros(3, dtype=torch.float64, device=self._device())
        else:
            sums = buf._episode_sums(last_rows).clone()
        dist.all_reduce(sums, group=self.group)
        out = buf._stats_of(sums)
        if buf.reward_key is not None and "mean_return" not in out:  # an empty shard
            out["mean_return"] = torch.where(sums[0] > 0, sums[2] / sums[0], math.nan)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Every rank writes its shard to ``path/rank<r>.gpub`` (:meth:`ReplayBuffer.save`:
        atomic, checksummed) and rank 0 writes ``path/shards.json`` (world size, each rank's
        capacity and lanes); collective: returns once every rank has written."""
        os.makedirs(path, exist_ok=True)
        self.local.save(os.path.join(path, f"rank{self.rank}.gpub"))
        layout = [None] * self.world_size
        dist.all_gather_object(layout, {"capacity": self.local.capacity, "num_envs": self.local.num_envs},
                               group=self.group)
        if self.rank == 0:
            tmp = os.path.join(path, "shards.json.tmp")
            with open(tmp, "w") as f:
                json.dump({"format": 1, "world_size": self.world_size, "shards": layout}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(path, "shards.json"))
        dist.barrier(group=self.group)

    @classmethod
    def load(cls, path: str | os.PathLike, *, group: Any = None,
             device: str | torch.device | None = None) -> "ShardedReplayBuffer":
        """The shards :meth:`save` wrote, one per rank of ``group`` (collective). A group of
        another size, or a shard whose capacity or lanes differ from the layout saved, raises the
        same ValueError on every rank, naming what differs."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedReplayBuffer: call torch.distributed.init_process_group first")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        problem, local = None, None
        try:
            with open(os.path.join(path, "shards.json")) as f:
                saved = json.load(f)
            if saved.get("format") != 1:
                problem = f"{path}: shards format {saved.get('format')!r}, this version reads 1"
            elif saved["world_size"] != world:
                problem = (f"{path}: saved by {saved['world_size']} ranks, this group has {world}; "
                           f"restart with {saved['world_size']} processes")
            else:
                local = ReplayBuffer.load(os.path.join(path, f"rank{rank}.gpub"), device=device)
                want = saved["shards"][rank]
                have = {"capacity": local.capacity, "num_envs": local.num_envs}
                if have != want:
                    problem = f"{path}: rank {rank}'s shard holds {have}, the layout saved says {want}"
        except (OSError, ValueError, KeyError) as err:
            problem = f"{path}: rank {rank}: {type(err).__name__}: {err}"
        problems: list[Any] = [None] * world
        dist.all_gather_object(problems, problem, group=group)
        found = [p for p in problems if p]
        if found:
            raise ValueError("ShardedReplayBuffer.load: " + "; ".join(dict.fromkeys(found)))
        buf = cls.__new__(cls)
        buf.group, buf.rank, buf.world_size, buf.local = group, rank, world, local
        buf._schemas, buf._empty_generator = {}, None
        return buf

    # ------------------------------------------------------------------ helpers
    def _proposals(self, what: str, span: int, device: torch.device) -> torch.Tensor:
        """[world] int64: each rank's uniform proposals of ``span`` consecutive rows (``span=2``:
        transitions whose successor is written), all-gathered; read on the host once (the split
        sizes of the exchange need it anyway) to refuse a group with none."""
        if self.local.priority_alpha is not None:
            raise ValueError(f"{what}: global windows are drawn uniformly over the shards; a prioritized "
                             f"buffer draws its windows with scope='local'")
        buf = self.local
        mine = torch.zeros(1, dtype=torch.int64, device=device)
        if buf.index is not None and span <= buf.rows:
            mine = (buf.index.state[:1].clamp(max=buf.rows) - span + 1).clamp(min=0) * buf._lanes
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        sizes = torch.cat(parts)
        if int(sizes.sum()) == 0:
            raise ValueError(f"{what}: no rank holds {span} rows yet")
        return sizes

    def _generator(self, device: torch.device) -> torch.Generator:
        """The shard's own generator (draws of owners advance its stream); a fixed one while the
        shard is empty."""
        if self.local.index is not None:
            return self.local._rng.generator
        if self._empty_generator is None:
            self._empty_generator = torch.Generator(device=device)
            self._empty_generator.manual_seed(self.rank)
        return self._empty_generator

    def _exchange(self, owner: torch.Tensor, draw, schema, width: int, device: torch.device,
                  payload: torch.Tensor | None = None) -> torch.Tensor:
        """Items for ``owner`` [n] (each item's owning rank): request counts go out, every rank
        draws what it was asked for with ``draw(count)`` (with ``payload``, [n] int64 in owner
        order, ``draw(the payloads it was sent)``), and the packed items come back grouped by
        owner ([n, width] uint8, in the order of ``torch.sort(owner)``)."""
        counts_to = torch.bincount(owner, minlength=self.world_size)
        counts_from = torch.empty_like(counts_to)
        dist.all_to_all_single(counts_from, counts_to, group=self.group)
        wanted, served = counts_to.tolist(), counts_from.tolist()
        request: Any = sum(served)
        if payload is not None:
            request = torch.empty(sum(served), dtype=torch.int64, device=device)
            dist.all_to_all_single(request, payload, output_split_sizes=served, input_split_sizes=wanted,
                                   group=self.group)
        if sum(served):
            packed = _pack(flatten(draw(request), "sample"), schema)
        else:
            packed = torch.empty((0, width), dtype=torch.uint8, device=device)
        received = torch.empty((owner.numel(), width), dtype=torch.uint8, device=device)
        dist.all_to_all_single(received, packed, output_split_sizes=wanted, input_split_sizes=served,
                               group=self.group)
        return received

    def _scope(self, scope: Any) -> str:
        if scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
        return scope

    def _device(self) -> torch.device:
        return self.local.device or torch.device("cpu")

    def _schema(self, kind: Any, probe=None, adds_needed: int = 2) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Each rank's leaves and settings, checked to agree (once per kind of call), and the
        layout of one item that ``probe(local buffer)`` samples: (path, shape, dtype) per output
        tensor (none for ``probe=None``)."""
        key = repr(kind)
        if key in self._schemas:
            return self._schemas[key]
        buf = self.local
        mine = {"settings": (buf.done_marks, buf.autoreset, buf.next_keys,
                             buf.reward_key, buf.priority_alpha,
                             sorted((k, str(v)) for k, v in buf.storage_dtypes.items())),
                "specs": None if buf.specs is None else sorted((p, s.shape, str(s.dtype)) for p, s in buf.specs.items()),
                "item": None, "error": None}
        if probe is not None and buf.num_adds >= adds_needed:
            try:
                mine["item"] = _probe(buf, probe)
            except (TypeError, ValueError) as err:
                mine["error"] = f"{type(err).__name__}: {err}"
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        for name in ("settings", "specs"):
            seen = {repr(e[name]) for e in everyone if e[name] is not None}
            if len(seen) > 1:
                ranks = {r: e[name] for r, e in enumerate(everyone)}
                raise ValueError(f"ShardedReplayBuffer: the ranks' {name} differ: {ranks}")
        errors = {r: e["error"] for r, e in enumerate(everyone) if e["error"]}
        if errors:
            raise ValueError(f"sample: refused on ranks {errors}")
        items = [e["item"] for e in everyone if e["item"] is not None]
        if probe is None:
            schema: list = []
        elif not items:
            raise ValueError(f"sample: no rank holds enough rows yet ({adds_needed} adds)")
        else:
            schema = [(p, tuple(shape), getattr(torch, dtype)) for p, shape, dtype in items[0]]
        settled = all(e["specs"] is not None for e in everyone)
        if settled and (probe is None or len(items) == self.world_size):
            self._schemas[key] = schema  # every rank has allocated: nothing can change any more
        return schema


def _probe(buf: ReplayBuffer, draw) -> list[tuple[str, tuple[int, ...], str]]:
    """The layout of one item ``draw(buf)`` samples, drawn and then undone (the generator and
    cursors are put back, so the shard's stream is unchanged)."""
    gen, ix = buf._rng.generator, buf.index
    generator_state, cursors, offset = gen.get_state(), ix.state.clone(), buf._rng.offset
    try:
        out = flatten(draw(buf), "sample")
    finally:
        gen.set_state(generator_state)
        ix.state.copy_(cursors)
        buf._rng.offset = offset
    return [(p, tuple(t.shape[1:]), str(t.dtype).removeprefix("torch.")) for p, t in out.items()]


def _episode_parts(batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A packed episode batch split into per-episode entries [B] and per-row tensors [rows]."""
    from .episodes import EPISODE_KEYS

    entries = {k: batch[k] for k in ("length", "lane", "episode_return", "truncated", "valid") if k in batch}
    rows = {p: t for p, t in flatten({k: v for k, v in batch.items()
                                      if k not in EPISODE_KEYS and k != "mask"}, "sample").items()}
    return entries, rows


def _pack(flat: dict[str, torch.Tensor], schema) -> torch.Tensor:
    """[B, item bytes] uint8: each item's tensors' bytes side by side, in schema order."""
    parts = []
    for path, _, dtype in schema:
        t = flat[path]
        if t.dtype != dtype:
            raise ValueError(f"sample: {path!r} is {t.dtype} here and {dtype} on another rank")
        parts.append(t.contiguous().reshape(t.shape[0], -1).view(torch.uint8))
    return torch.cat(parts, 1) if parts else torch.empty((0, 0), dtype=torch.uint8)


def _offset_of(schema, name: str) -> int:
    """Byte offset of the (one-byte) tensor ``name`` in a packed item."""
    at = 0
    for path, shape, dtype in schema:
        if path == name:
            return at
        at += math.prod(shape) * dtype.itemsize
    raise KeyError(name)


def _unpack(packed: torch.Tensor, schema) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for path, shape, dtype in schema:
        width = math.prod(shape) * dtype.itemsize
        # A fresh [n, width] copy: a column slice may keep the packed row stride (n == 1), which
        # a view to a wider dtype refuses.
        part = packed.new_empty((packed.shape[0], width)).copy_(packed[:, at:at + width])
        out[path] = part.view(dtype).reshape(packed.shape[0], *shape)
        at += width
    return out
