"""Helpers for packed episode batches."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .specs import flatten, unflatten

#: Per-episode entries of a packed batch; every other tensor with ``num_rows`` rows is a leaf.
EPISODE_KEYS = ("cu_seqlens", "length", "lane", "episode_return", "truncated", "valid", "num_rows")


def pad_episodes(batch: Mapping[str, Any], max_len: int | None = None) -> dict[str, Any]:
    """Turn a packed batch from :meth:`ReplayBuffer.sample_episodes` into padded ``[B, max_len, ...]``.

    Rows past an episode's length are zero and ``mask`` [B, max_len] is False there; episodes
    longer than ``max_len`` are cut to their first ``max_len`` rows. ``max_len=None`` uses the
    longest episode of the batch, which reads that length on the host (a sync on CUDA).
    Per-episode entries (``length``, ``lane``, ``episode_return``, ``truncated``, ``valid``) are
    passed through.
    """
    cu = batch["cu_seqlens"]
    length = batch["length"]
    if max_len is None:
        max_len = max(int(length.max()), 1)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len: expected a positive int or None, got {max_len!r}")
    per_row = {k: v for k, v in batch.items() if k not in EPISODE_KEYS}
    leaves = flatten(per_row, "batch")
    t = torch.arange(max_len, device=cu.device)
    mask = t[None, :] < length[:, None]
    num_rows = batch["mask"].shape[0]
    idx = (cu[:-1, None] + t[None, :]).clamp_max_(num_rows - 1)
    out = {}
    for path, value in leaves.items():
        if path == "mask":
            continue
        gathered = value.index_select(0, idx.reshape(-1)).view(*idx.shape, *value.shape[1:])
        keep = mask.view(*mask.shape, *[1] * (value.dim() - 1))
        out[path] = torch.where(keep, gathered, torch.zeros((), dtype=value.dtype, device=value.device))
    out = unflatten(out)
    out["mask"] = mask
    for k in ("length", "lane", "episode_return", "truncated", "valid"):
        if k in batch:
            out[k] = batch[k]
    return out
