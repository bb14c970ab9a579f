"""What the example agents share: options, the phase timer, the learning curve and its files."""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def arguments(doc: str, target: float, minutes: float) -> argparse.ArgumentParser:
    """The options every agent takes; each adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-envs", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=target, help="stop once the mean return reaches it")
    p.add_argument("--max-minutes", type=float, default=minutes, help="stop after this much wall time")
    p.add_argument("--out", default=RESULTS, help="folder of the CSV and PNG")
    p.add_argument("--quiet", action="store_true")
    return p


class Timer:
    """Wall seconds per phase; synchronizes CUDA at phase borders so each phase owns its work."""

    def __init__(self, device: torch.device, phases: tuple[str, ...]):
        self.device = device
        self.total = dict.fromkeys(phases, 0.0)
        self._t = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.total[phase] += now - self._t
        self._t = now


class Curve:
    """The learning curve: one row per report (environment steps, wall time, mean return, the
    phase times so far), a progress bar (tqdm when installed) or a printed line, and the stop rule."""

    def __init__(self, args: argparse.Namespace, total: int):
        self.args = args
        self.rows: list[dict] = []
        self.began = time.perf_counter()
        self.bar = None
        if not args.quiet:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="it")
            except ImportError:
                pass

    def record(self, it: int, env_steps: int, mean_return: float, timer: Timer, **extra) -> bool:
        """Add a row after iteration ``it`` (1-based); True when training should stop."""
        wall = time.perf_counter() - self.began
        self.rows.append({"iteration": it, "env_steps": env_steps, **extra, "wall_s": round(wall, 3),
                          "mean_return": round(mean_return, 2),
                          **{f"{k}_s": round(v, 4) for k, v in timer.total.items()}})
        line = f"it {it} steps {env_steps} return {mean_return:.1f} ({env_steps / wall:,.0f} steps/s)"
        if self.bar is not None:
            self.bar.set_postfix_str(line)
            self.bar.update(it - self.bar.n)
        elif not self.args.quiet:
            print(line, flush=True)
        return mean_return >= self.args.target or wall > 60 * self.args.max_minutes

    def finish(self, name: str, title: str, timer: Timer) -> dict:
        """Write ``<out>/<name>.csv`` and ``.png`` (matplotlib when installed); the run's summary."""
        if self.bar is not None:
            self.bar.close()
        rows = self.rows
        write_curve(self.args.out, name, rows, title, "mean episode return", {None: "mean_return"})
        return {"rows": rows, "mean_return": rows[-1]["mean_return"], "wall_s": rows[-1]["wall_s"],
                "phases": dict(timer.total)}


def write_curve(out: str, name: str, rows: list[dict], title: str, ylabel: str, series: dict,
                log: bool = False) -> None:
    """``<out>/<name>.csv`` of ``rows``, and ``.png`` (matplotlib when installed) of the columns
    ``series`` ({label or None: column}) against ``env_steps``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["env_steps"] for r in rows]
    for label, column in series.items():
        ax.plot(steps, [r[column] for r in rows], marker="." if len(series) == 1 else None, label=label)
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()
    ax.set_xlabel("environment steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=100)
    plt.close(fig)


class Returns:
    """Returns of the episodes the environment ends, summed on the device (no host sync per
    step); ``mean()`` reads the last ``window`` iterations' episodes once per iteration."""

    def __init__(self, num_envs: int, device: torch.device, window: int = 5):
        self.running = torch.zeros(num_envs, device=device)
        self.sums = torch.zeros(2, device=device)
        self.window: list[tuple[float, float]] = []
        self.size = window
        self.last = float("nan")

    def step(self, reward: torch.Tensor, done: torch.Tensor) -> None:
        self.running += reward
        self.sums += torch.stack([torch.where(done, self.running, 0.0).sum(), done.sum()])
        self.running = torch.where(done, 0.0, self.running)

    def mean(self) -> float:
        total, count = self.sums.tolist()  # one host read per iteration, for the log
        self.sums.zero_()
        self.window = (self.window + [(total, count)])[-self.size:]
        episodes = sum(c for _, c in self.window)
        if episodes:
            self.last = sum(r for r, _ in self.window) / episodes
        return self.last

    @property
    def episodes(self) -> int:
        return int(self.window[-1][1]) if self.window else 0
