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


def run_core(device: torch.device, lanes: int = 4096, capacity: int = 1 << 20, repeats: int = 20,
             with_torchrl: bool = True) -> list[Row]:
    rows = capacity // lanes
    steps = make_steps(lanes, device)
    data_steps = [{k: v for k, v in s.items() if k != "done"} for s in steps]
    buf = ReplayBuffer(capacity, lanes, device=device, done_marks="first", seed=0)
    plain = PlainRing(rows, lanes, steps[0], device)
    i = 0

    def add_ours():
        nonlocal i
        buf.add(data_steps[i % 8], steps[i % 8]["done"])
        i += 1

    j = 0

    def add_plain():
        nonlocal j
        plain.add(steps[j % 8])
        j += 1

    for _ in range(rows + 3):  # fill both rings and wrap the seam
        add_ours()
        add_plain()
    sync(device)
    out = []
    t = interleaved({"gpubuffers": add_ours, "plain ring": add_plain}, device, repeats=repeats, inner=5)
    nbytes = step_bytes(data_steps[0])
    out += [Row("W1 add", "plain ring", t["plain ring"], lanes, step_bytes(steps[0])),
            Row("W1 add", "gpubuffers", t["gpubuffers"], lanes, nbytes)]

    gen = torch.Generator(device=device).manual_seed(0)
    per_transition = (64 + 12 + 1) * 4
    t = interleaved({"gpubuffers": lambda: buf.sample(4096), "plain ring": lambda: plain.sample(4096, gen)},
                    device, repeats=repeats, inner=5)
    out += [Row("W2 sample(4096)", "plain ring", t["plain ring"], 4096, 4096 * (per_transition + 1)),
            Row("W2 sample(4096)", "gpubuffers", t["gpubuffers"], 4096, 4096 * (per_transition + 64 * 4))]

    seq_items = 256 * 32
    t = interleaved({"gpubuffers": lambda: buf.sample_sequences(256, 32),
                     "plain ring": lambda: plain.sample_sequences(256, 32, gen)}, device,
                    repeats=repeats, inner=3)
    out += [Row("W3 sequences(256, 32)", "plain ring", t["plain ring"], seq_items, seq_items * per_transition),
            Row("W3 sequences(256, 32)", "gpubuffers", t["gpubuffers"], seq_items, seq_items * per_transition)]
    if with_torchrl and importlib.util.find_spec("torchrl") is not None:
        rb = torchrl_slices(plain, device)
        out.append(Row("W3 sequences(256, 32)", "torchrl SliceSampler",
                       measure(rb.sample, device, repeats=max(5, repeats // 4), warmup=2),
                       seq_items, seq_items * per_transition))
    return out


def torchrl_slices(plain: PlainRing, device: torch.device):
    """TorchRL's SliceSampler (end_key, strict_length) over the same data, in its [env, time] layout."""
    import logging

    logging.getLogger("torchrl").setLevel(logging.WARNING)
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, SliceSampler, TensorDictReplayBuffer

    rows, lanes = plain.rows, plain.lanes
    s = plain.storage
    # The plain ring's flags are was_done; TorchRL's end_key marks the last row of an episode.
    last = torch.zeros_like(s["done"])
    last[:-1] = s["done"][1:]
    last[-1] = True
    td = TensorDict({"obs": s["obs"].transpose(0, 1), "action": s["action"].transpose(0, 1),
                     "reward": s["reward"].transpose(0, 1), ("next", "done"): last.transpose(0, 1)[..., None]},
                    batch_size=[lanes, rows], device=device)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(rows * lanes, ndim=2, device=device),
                                sampler=SliceSampler(slice_len=32, end_key=("next", "done"), strict_length=True),
                                batch_size=256 * 32)
    rb.extend(td)
    return rb


def ratio_table(rows: list[Row], device_name: str) -> str:
    lines = ["| workload | provider | ms/call (median) | min-max ms | M transitions/s | GB/s | vs plain ring | device |",
             "|---|---|---|---|---|---|---|---|"]
    plain = {r.workload: r.timing.median_s for r in rows if r.provider == "plain ring"}
    for r in rows:
        ratio = r.timing.median_s / plain[r.workload]
        lines.append(f"| {r.workload} | {r.provider} | {1e3 * r.timing.median_s:.3f} | "
                     f"{1e3 * r.timing.min_s:.3f}-{1e3 * r.timing.max_s:.3f} | {r.per_s / 1e6:.2f} | "
                     f"{r.gbps:.2f} | {ratio:.2f}x | {device_name} |")
    return "\n".join(lines)
