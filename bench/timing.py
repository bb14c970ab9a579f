"""Timing done right: sync before and after, warm-up excluded, medians of repeats with min/max."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 20,
            inner: int = 1) -> Timing:
    """Seconds per call of ``fn``: each repeat times ``inner`` calls between two syncs."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return Timing(statistics.median(samples), min(samples), max(samples), repeats)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3,
                repeats: int = 20, inner: int = 1, shuffle: bool = False) -> dict[str, Timing]:
    """Time several providers in alternation, so a slow phase of the machine hits them alike.

    shuffle: run the providers of each repeat in a fresh (seeded) random order, so that what one
    leaves behind (evicted caches, freed memory) falls on every other alike, not always on the
    one after it.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    rng = random.Random(0)
    for _ in range(repeats):
        if shuffle:
            rng.shuffle(order)
        for name, fn in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: Timing(statistics.median(v), min(v), max(v), repeats) for k, v in samples.items()}
