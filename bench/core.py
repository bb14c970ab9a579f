"""Core workloads W1-W3: gpubuffers against the plain-torch ring and TorchRL, in one run."""

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
    baseline: str = "plain ring"

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


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28, repeats: int = 10) -> float:
    """The device's copy bandwidth (GB/s, bytes read + written) on one large contiguous copy:
    the physical limit of any add or gather."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    return 2 * nbytes / t.median_s / 1e9


def run_core(device: torch.device, lanes: int = 4096, capacity: int = 1 << 20, repeats: int = 20,
             with_torchrl: bool = True, workloads: tuple[str, ...] = ("W1", "W2", "W3")) -> list[Row]:
    """W1 add, W2 uniform transitions, W3 sequences for every provider, interleaved in one run."""
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
    sync(device)
    out = []
    if "W1" in workloads:
        fns = {name: adder(buf) for name, buf in bufs.items()}
        fns["plain ring"] = add_plain
        t = interleaved(fns, device, repeats=repeats, inner=5)
        out += [Row("W1 add", k, v, lanes, step_bytes(steps[0] if k == "plain ring" else data_steps[0]))
                for k, v in t.items()]

    gen = torch.Generator(device=device).manual_seed(0)
    per_transition = (64 + 12 + 1) * 4
    if "W2" in workloads:
        fns = {name: (lambda b=buf: b.sample(4096)) for name, buf in bufs.items()}
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
    """W3 over capacity (cost should not grow with it) and W1 over the number of lanes."""
    points = []
    for cap in capacities:
        for r in run_core(device, lanes=4096, capacity=cap, repeats=repeats, with_torchrl=False, workloads=("W3",)):
            points.append({"sweep": "W3 capacity", "x": cap, "provider": r.provider, "ms": 1e3 * r.timing.median_s})
    for lanes in lane_counts:
        for r in run_core(device, lanes=lanes, capacity=max(1 << 20, 4 * lanes), repeats=repeats,
                          with_torchrl=False, workloads=("W1",)):
            points.append({"sweep": "W1 lanes", "x": lanes, "provider": r.provider,
                           "ms": 1e3 * r.timing.median_s, "per_s": r.per_s})
    return points


def ratio_table(rows: list[Row], device_name: str) -> str:
    lines = ["| workload | provider | ms/call (median) | min-max ms | M transitions/s | GB/s | vs plain ring | vs TorchRL | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    plain = {r.workload: r.timing.median_s for r in rows if r.provider == "plain ring"}
    torchrl = {r.workload: r.timing.median_s for r in rows if r.provider.startswith("torchrl")}
    for r in rows:
        ratio = r.timing.median_s / plain[r.workload]
        vs_rl = f"{torchrl[r.workload] / r.timing.median_s:.1f}x faster" if r.workload in torchrl \
            and not r.provider.startswith("torchrl") else ""
        lines.append(f"| {r.workload} | {r.provider} | {1e3 * r.timing.median_s:.3f} | "
                     f"{1e3 * r.timing.min_s:.3f}-{1e3 * r.timing.max_s:.3f} | {r.per_s / 1e6:.2f} | "
                     f"{r.gbps:.2f} | {ratio:.2f}x | {vs_rl} | {device_name} |")
    return "\n".join(lines)
