"""Core workloads W1-W3: gpubuffers against the plain-torch ring and TorchRL, in one run.

W1 is timed twice, interleaved in one loop: the bare ``add(step, done)`` against the plain ring's
slice assignment, and the add the README's quickstart recommends (``terminated``, ``truncated``,
``final_obs``) against the plain ring storing what Stable-Baselines3's ``ReplayBuffer`` stores for
the same information (a copy of the true next observation of every step, and done/timeout flags).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from gpubuffers import ReplayBuffer

from .plain import PlainRing
from .timing import Timing, interleaved, measure, sync


@dataclass
class Row:
    workload: str
    provider: str
    timing: Timing
    items: int  # transitions per call
    nbytes: int  # bytes each call must move
    baseline: str = "plain ring"  # the provider of the same workload this row is compared with

    @property
    def per_s(self) -> float:
        return self.items / self.timing.median_s

    @property
    def gbps(self) -> float:
        return self.nbytes / self.timing.median_s / 1e9


def make_steps(lanes: int, device: torch.device, count: int = 8, p_end: float = 0.01, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    steps = []
    for _ in range(count):
        steps.append({
            "obs": torch.randn(lanes, 64, generator=g, device=device),
            "action": torch.randn(lanes, 12, generator=g, device=device),
            "reward": torch.randn(lanes, generator=g, device=device),
            "done": torch.rand(lanes, generator=g, device=device) < p_end,
        })
    return steps


def step_bytes(step: dict) -> int:
    return sum(v.numel() * v.element_size() for v in step.values())


W1_RECOMMENDED = "W1 add (recommended: terminated, truncated, final_obs)"
SB3_RING = "plain ring (SB3-style: next_obs copy, done, timeout)"


def make_endings(steps: list[dict], seed: int = 1) -> list[dict]:
    """For each step of :func:`make_steps`: ``terminated`` and ``truncated`` splitting its ``done``
    (half the ends are time-outs), the true ``final_obs`` [N, 64] that an auto-resetting
    environment returns in its extras, and ``next_obs`` (the next step's obs, already the reset
    observation where an episode ended)."""
    device = steps[0]["obs"].device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i, s in enumerate(steps):
        done = s["done"]
        truncated = done & (torch.rand(done.shape, generator=g, device=device) < 0.5)
        out.append({"terminated": done & ~truncated, "truncated": truncated,
                    "final_obs": torch.randn(s["obs"].shape, generator=g, device=device),
                    "next_obs": steps[(i + 1) % len(steps)]["obs"]})
    return out


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28, repeats: int = 10) -> float:
    """The device's copy bandwidth (GB/s, bytes read + written) on one large contiguous copy:
    the physical limit of any add or gather."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    return 2 * nbytes / t.median_s / 1e9


W2_NSTEP = "gpubuffers (n_step=3)"


def run_core(device: torch.device, lanes: int = 4096, capacity: int = 1 << 20, repeats: int = 20,
             with_torchrl: bool = True,
             workloads: tuple[str, ...] = ("W1", "W1r", "W2", "W3")) -> list[Row]:
    """W1 add (bare; "W1r": the recommended add), W2 uniform transitions, W3 sequences for every
    provider, interleaved in one run (W1 and W1r in one loop)."""
    rows = capacity // lanes
    steps = make_steps(lanes, device)
    data_steps = [{k: v for k, v in s.items() if k != "done"} for s in steps]
    bufs = {"gpubuffers": ReplayBuffer(capacity, lanes, device=device, done_marks="first", seed=0)}
    if device.type == "cuda":
        # The pure-torch backend on the same device, to show what the kernels add.
        bufs["gpubuffers[torch]"] = ReplayBuffer(capacity, lanes, device=device, done_marks="first",
                                                 seed=0, backend="torch")
    plain = PlainRing(rows, lanes, steps[0], device)
    counter = {"i": 0}

    def adder(buf):
        def add():
            i = counter["i"] = counter["i"] + 1
            buf.add(data_steps[i % 8], steps[i % 8]["done"])
        return add

    def add_plain():
        i = counter["i"] = counter["i"] + 1
        plain.add(steps[i % 8])

    for i in range(rows + 3):  # fill every ring and wrap the seam
        for buf in bufs.values():
            buf.add(data_steps[i % 8], steps[i % 8]["done"])
        plain.add(steps[i % 8])

    fns: dict = {}
    out = []
    if "W1" in workloads:
        fns.update({name: adder(buf) for name, buf in bufs.items()})
        fns["plain ring"] = add_plain
    if "W1r" in workloads:
        # The quickstart's add (Isaac Lab style, done_marks="last"), on buffers of their own, and
        # the same information the Stable-Baselines3 way: the true next obs (the final obs where
        # an episode ended, as SB3's off-policy loop substitutes it) copied for every step, plus
        # the done and timeout flags.
        ends = make_endings(steps)
        rec = {name: ReplayBuffer(capacity, lanes, device=device, done_marks="last", seed=0,
                                  backend=None if name == "gpubuffers" else "torch") for name in bufs}
        sb3 = PlainRing(rows, lanes, {**steps[0], "next_obs": steps[0]["obs"],
                                      "timeout": steps[0]["done"]}, device)

        def add_rec(buf, i):
            e = ends[i % 8]
            buf.add(data_steps[i % 8], terminated=e["terminated"], truncated=e["truncated"],
                    final_obs=e["final_obs"])

        def add_sb3(i):
            s, e = steps[i % 8], ends[i % 8]
            sb3.add_with_next(data_steps[i % 8], e["next_obs"], s["done"], e["truncated"], e["final_obs"])

        for i in range(rows + 3):
            for buf in rec.values():
                add_rec(buf, i)
            add_sb3(i)

        def rec_adder(buf):
            def add():
                counter["i"] += 1
                add_rec(buf, counter["i"])
            return add

        def sb3_adder():
            counter["i"] += 1
            add_sb3(counter["i"])

        fns.update({(W1_RECOMMENDED, name): rec_adder(buf) for name, buf in rec.items()})
        fns[(W1_RECOMMENDED, SB3_RING)] = sb3_adder
    sync(device)
    if fns:
        t = interleaved(fns, device, repeats=repeats, inner=5)
        data_bytes = step_bytes(data_steps[0])
        # Expected bytes of the final observations of the lanes that end per add.
        final_bytes = round(float(sum(s["done"].sum() for s in steps)) / len(steps)) * 64 * 4
        for k, v in t.items():
            if isinstance(k, tuple):
                w, name = k
                if name == SB3_RING:  # step, done, next obs, timeout
                    out.append(Row(w, name, v, lanes, step_bytes(steps[0]) + lanes * (64 * 4 + 1),
                                   baseline=SB3_RING))
                else:  # step, terminated, truncated, the ended lanes' final obs
                    out.append(Row(w, name, v, lanes, data_bytes + 2 * lanes + final_bytes, baseline=SB3_RING))
            else:
                out.append(Row("W1 add", k, v, lanes, step_bytes(steps[0]) if k == "plain ring" else data_bytes))

    gen = torch.Generator(device=device).manual_seed(0)
    per_transition = (64 + 12 + 1) * 4
    if "W2" in workloads:
        fns = {name: (lambda b=buf: b.sample(4096)) for name, buf in bufs.items()}
        # n-step targets (return, discount, the segment's last successor) in the same loop.
        fns[W2_NSTEP] = lambda: bufs["gpubuffers"].sample(4096, n_step=3, gamma=0.99)
        fns["plain ring"] = lambda: plain.sample(4096, gen)
        t = interleaved(fns, device, repeats=repeats, inner=5)
        out += [Row("W2 sample(4096)", k, v, 4096,
                    4096 * (per_transition + (1 if k == "plain ring" else 64 * 4))) for k, v in t.items()]
        if with_torchrl and importlib.util.find_spec("torchrl") is not None:
            rb = torchrl_buffer(plain, device, slices=False)
            out.append(Row("W2 sample(4096)", "torchrl RandomSampler",
                           measure(rb.sample, device, repeats=max(5, repeats // 2), warmup=2),
                           4096, 4096 * per_transition))

    seq_items = 256 * 32
    if "W3" in workloads:
        fns = {name: (lambda b=buf: b.sample_sequences(256, 32)) for name, buf in bufs.items()}
        fns["plain ring"] = lambda: plain.sample_sequences(256, 32, gen)
        t = interleaved(fns, device, repeats=repeats, inner=3)
        out += [Row("W3 sequences(256, 32)", k, v, seq_items, seq_items * per_transition) for k, v in t.items()]
        if with_torchrl and importlib.util.find_spec("torchrl") is not None:
            rb = torchrl_buffer(plain, device, slices=True)
            out.append(Row("W3 sequences(256, 32)", "torchrl SliceSampler",
                           measure(rb.sample, device, repeats=max(5, repeats // 4), warmup=2),
                           seq_items, seq_items * per_transition))
    return out


W4 = "W4 update(4096) + sample(4096), prioritized"
W4_TORCHRL = "torchrl PrioritizedSampler"


def run_w4(device: torch.device, capacities: tuple[int, ...] = (1 << 20, 1 << 24), lanes: int = 4096,
           repeats: int = 20, with_torchrl: bool = True) -> list[Row]:
    """W4 at each capacity: one call sets the priorities of the previous sample's 4096 transitions
    and draws 4096 more (prioritized, alpha 0.6, beta 0.4, with the data and next observations),
    for gpubuffers and TorchRL's PrioritizedSampler over the same data, interleaved."""
    steps = make_steps(lanes, device)
    data_steps = [{k: v for k, v in s.items() if k != "done"} for s in steps]
    gen = torch.Generator(device=device).manual_seed(1)
    prios = [torch.rand(4096, generator=gen, device=device) * 4 for _ in range(8)]
    per_transition = (64 + 12 + 1) * 4
    out = []
    for cap in capacities:
        buf = ReplayBuffer(cap, lanes, device=device, seed=0, priority_alpha=0.6)
        for i in range(cap // lanes + 3):
            buf.add(data_steps[i % 8], steps[i % 8]["done"])
        state = {"s": buf.sample(4096), "i": 0}

        def ours():
            state["i"] += 1
            buf.update_priorities(state["s"]["index"], prios[state["i"] % 8])
            state["s"] = buf.sample(4096)

        fns = {"gpubuffers": ours}
        if with_torchrl and importlib.util.find_spec("torchrl") is not None:
            rb = torchrl_prioritized(buf, device)
            trl = {"s": rb.sample(), "i": 0}

            def theirs():
                trl["i"] += 1
                rb.update_priority(trl["s"]["index"], prios[trl["i"] % 8])
                trl["s"] = rb.sample()

            fns[W4_TORCHRL] = theirs
        t = interleaved(fns, device, repeats=repeats, shuffle=True)
        out += [Row(f"{W4} at 2^{cap.bit_length() - 1}", k, v, 4096, 4096 * per_transition,
                    baseline=W4_TORCHRL if W4_TORCHRL in fns else "gpubuffers") for k, v in t.items()]
    return out


def torchrl_prioritized(buf: ReplayBuffer, device: torch.device):
    """TorchRL's prioritized buffer (LazyTensorStorage, PrioritizedSampler alpha 0.6 beta 0.4,
    batch 4096) holding the same transitions as ``buf``."""
    import logging

    logging.getLogger("torchrl").setLevel(logging.WARNING)
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, PrioritizedSampler, TensorDictReplayBuffer

    cap = buf.capacity
    s = buf.storage
    td = TensorDict({k: s[k].reshape(cap, *s[k].shape[2:]) for k in ("obs", "action", "reward")},
                    batch_size=[cap], device=device)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(cap, device=device),
                                sampler=PrioritizedSampler(cap, alpha=0.6, beta=0.4), batch_size=4096)
    rb.extend(td)
    return rb


def speed_words(ratio: float, digits: int = 2) -> str:
    """A time ratio (theirs / ours) in words: ``1.25x faster``, ``0.88x (slower)``."""
    return f"{ratio:.{digits}f}x faster" if ratio >= 1 else f"{ratio:.{digits}f}x (slower)"


def w4_lines(rows: list[Row]) -> list[str]:
    """gpubuffers against TorchRL at each capacity, and its own growth over capacity."""
    ours = {r.workload: r.timing.median_s for r in rows if r.workload.startswith("W4") and r.provider == "gpubuffers"}
    theirs = {r.workload: r.timing.median_s for r in rows if r.workload.startswith("W4") and r.provider == W4_TORCHRL}
    lines = [f"- {w}: {speed_words(theirs[w] / t)} than TorchRL" for w, t in ours.items() if w in theirs]
    if len(ours) > 1:
        (w0, t0), (w1, t1) = list(ours.items())[0], list(ours.items())[-1]
        lines.append(f"- gpubuffers from {w0.rsplit(' ', 1)[-1]} to {w1.rsplit(' ', 1)[-1]}: {t1 / t0:.2f}x the time")
    return lines


def torchrl_buffer(plain: PlainRing, device: torch.device, slices: bool):
    """TorchRL over the same data in its [env, time] layout: LazyTensorStorage with RandomSampler
    (batch 4096) or SliceSampler (end_key, strict_length; 256 slices of 32)."""
    import logging

    logging.getLogger("torchrl").setLevel(logging.WARNING)
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, RandomSampler, SliceSampler, TensorDictReplayBuffer

    rows, lanes = plain.rows, plain.lanes
    s = plain.storage
    # The plain ring's flags are was_done; TorchRL's end_key marks the last row of an episode.
    last = torch.zeros_like(s["done"])
    last[:-1] = s["done"][1:]
    last[-1] = True
    td = TensorDict({"obs": s["obs"].transpose(0, 1), "action": s["action"].transpose(0, 1),
                     "reward": s["reward"].transpose(0, 1), ("next", "done"): last.transpose(0, 1)[..., None]},
                    batch_size=[lanes, rows], device=device)
    if slices:
        sampler, batch = SliceSampler(slice_len=32, end_key=("next", "done"), strict_length=True), 256 * 32
    else:
        sampler, batch = RandomSampler(), 4096
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(rows * lanes, ndim=2, device=device),
                                sampler=sampler, batch_size=batch)
    rb.extend(td)
    return rb


def sweeps(device: torch.device, capacities: list[int], lane_counts: list[int], repeats: int) -> list[dict]:
    """W3 and W4 over capacity (cost should not grow with it) and W1 over the number of lanes."""
    points = []
    for cap in capacities:
        for r in run_core(device, lanes=4096, capacity=cap, repeats=repeats, with_torchrl=False, workloads=("W3",)):
            points.append({"sweep": "W3 capacity", "x": cap, "provider": r.provider, "ms": 1e3 * r.timing.median_s})
    for cap in capacities:
        for r in run_w4(device, capacities=(cap,), repeats=repeats, with_torchrl=False):
            points.append({"sweep": "W4 capacity", "x": cap, "provider": r.provider, "ms": 1e3 * r.timing.median_s})
    for lanes in lane_counts:
        for r in run_core(device, lanes=lanes, capacity=max(1 << 20, 4 * lanes), repeats=repeats,
                          with_torchrl=False, workloads=("W1",)):
            points.append({"sweep": "W1 lanes", "x": lanes, "provider": r.provider,
                           "ms": 1e3 * r.timing.median_s, "per_s": r.per_s})
    return points


def nstep_overhead(rows: list[Row]) -> str | None:
    """sample(4096, n_step=3) over sample(4096) of the same buffer, from the same W2 loop."""
    t = {r.provider: r.timing.median_s for r in rows if r.workload == "W2 sample(4096)"}
    if W2_NSTEP not in t:
        return None
    return f"W2, sample(4096, n_step=3, gamma=0.99) over sample(4096): {t[W2_NSTEP] / t['gpubuffers']:.2f}x"


def baseline_ratio(r: Row, rows: list[Row]) -> float:
    """Median time of ``r`` over that of its baseline provider (``r.baseline``) in the same workload."""
    base = {(x.workload, x.provider): x.timing.median_s for x in rows}
    return r.timing.median_s / base[(r.workload, r.baseline)]


def w1_overhead(rows: list[Row]) -> list[str]:
    """The recommended add over the bare add, per provider, from the same interleaved W1 loop."""
    bare = {r.provider: r.timing.median_s for r in rows if r.workload == "W1 add"}
    bare[SB3_RING] = bare.get("plain ring")
    return [f"- {r.provider}: {r.timing.median_s / bare[r.provider]:.2f}x the time of "
            f"{'the plain ring' if r.provider == SB3_RING else 'its bare add'}"
            for r in rows if r.workload == W1_RECOMMENDED and bare.get(r.provider)]


def ratio_table(rows: list[Row], device_name: str) -> str:
    """"vs plain ring" is each row's time over its baseline's (the plain ring, or for the
    recommended add the SB3-style plain ring) in the same workload."""
    lines = ["| workload | provider | ms/call (median) | min-max ms | M transitions/s | GB/s | vs plain ring | vs TorchRL | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    torchrl = {r.workload: r.timing.median_s for r in rows if r.provider.startswith("torchrl")}
    for r in rows:
        ratio = baseline_ratio(r, rows)
        vs_rl = speed_words(torchrl[r.workload] / r.timing.median_s, 1) if r.workload in torchrl \
            and not r.provider.startswith("torchrl") else ""
        lines.append(f"| {r.workload} | {r.provider} | {1e3 * r.timing.median_s:.3f} | "
                     f"{1e3 * r.timing.min_s:.3f}-{1e3 * r.timing.max_s:.3f} | {r.per_s / 1e6:.2f} | "
                     f"{r.gbps:.2f} | {ratio:.2f}x | {vs_rl} | {device_name} |")
    return "\n".join(lines)
