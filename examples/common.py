"""What the example agents share: options, the phase timer, the learning curve and its files."""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_option(text: str) -> torch.device:
    """``--device``: a torch device that this machine has. Anything else is an argparse error
    naming ``--device``, what it expects and what it got, before any tensor is made."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:0, got {text!r}") \
            from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"expected a device this machine has, got {text!r}, but torch sees "
                                             f"no CUDA device here (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"expected a CUDA device index below {count} (this machine's CUDA "
                                             f"device count), got {text!r}")
        return device
    try:  # other backends (mps, xpu, ...): make one tensor there and read it back
        torch.zeros(1, device=device).cpu()
    except Exception as e:  # noqa: BLE001 - each backend raises its own kind
        raise argparse.ArgumentTypeError(f"expected a device this machine has, got {text!r} "
                                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return device


def arguments(doc: str, target: float, minutes: float) -> argparse.ArgumentParser:
    """The options every agent takes; each adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device_option, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N, ... (a device this machine has)")
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


def per_step(phases: dict[str, float], env_steps: int, num_envs: int) -> dict[str, float]:
    """Wall time per environment step of each phase and of their total: microseconds per
    vectorized step (one ``env.step`` of all ``num_envs`` lanes, ``<phase>_us_per_step``) and per
    lane-step (one lane's share, ``<phase>_us_per_lane_step``), from the phases' total seconds
    over ``env_steps`` lane-steps."""
    totals = {**phases, "total": sum(phases.values())}
    vector_steps = env_steps / num_envs
    out = {}
    for k, v in totals.items():
        out[f"{k}_us_per_step"] = round(1e6 * v / vector_steps, 2)
    for k, v in totals.items():
        out[f"{k}_us_per_lane_step"] = round(1e6 * v / env_steps, 4)
    return out


class Curve:
    """The learning curve: one row per report (environment steps, wall time, mean return, the
    phase times so far, in total seconds and per environment step), a progress bar (tqdm when
    installed) or a printed line, and the stop rule."""

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
                          **{f"{k}_s": round(v, 4) for k, v in timer.total.items()},
                          **per_step(timer.total, env_steps, self.args.num_envs)})
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
        last = rows[-1]
        return {"rows": rows, "mean_return": last["mean_return"], "wall_s": last["wall_s"],
                "env_steps": last["env_steps"], "num_envs": self.args.num_envs, "phases": dict(timer.total),
                "per_step": per_step(timer.total, last["env_steps"], self.args.num_envs)}


PHASE_NAMES = {"sim": "simulation", "act": "acting", "add": "add", "returns": "compute_returns",
               "sample": "sampling", "learn": "learning", "total": "total"}


def summary(out: dict) -> str:
    """The final printout of an agent's run (``Curve.finish``'s summary): the mean return, the
    environment steps and wall time, and each phase's wall time per environment step."""
    n, steps = out["num_envs"], out["env_steps"]
    lines = [f"mean return {out['mean_return']:.1f} after {steps:,} environment steps ({steps // n:,} steps of "
             f"{n} lanes) in {out['wall_s']:.1f} s",
             f"{'wall time per environment step':<32}{'us per step':>14}{'us per lane-step':>18}{'share':>8}"]
    total = out["per_step"]["total_us_per_step"]
    for k in [*out["phases"], "total"]:
        us = out["per_step"][f"{k}_us_per_step"]
        lines.append(f"  {PHASE_NAMES.get(k, k):<30}{us:>14,.1f}{out['per_step'][f'{k}_us_per_lane_step']:>18.4f}"
                     f"{us / total if total else 0:>8.1%}")
    return "\n".join(lines)


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
