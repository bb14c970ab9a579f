"""Benchmarks of gpubuffers: ``python -m bench`` (see ``python -m bench --help``)."""

from __future__ import annotations

import csv
import os


def write_rows(folder: str, name: str, rows: list[dict], prov: dict) -> str:
    """``<folder>/<name>``: one CSV row per dict (floats to 4 significant digits), each with the
    run's provenance; returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*rows[0], *prov])
        for r in rows:
            w.writerow([f"{v:.4g}" if isinstance(v, float) else v for v in r.values()] + list(prov.values()))
    return path
