"""The plain-torch ring: the simplest code a user would write, the floor any buffer should approach.

Time-major ring tensors written by slice assignment (``add_with_next`` also stores a copy of the
next observation and done/timeout flags, as Stable-Baselines3 does); transitions drawn with
``randint`` and ``index_select`` (no next observation); sequences drawn by rejection, checking
the ``done`` flags of every row of each proposed window.
"""

from __future__ import annotations

import torch


class PlainRing:
    def __init__(self, rows: int, lanes: int, example: dict[str, torch.Tensor], device: torch.device):
        self.rows, self.lanes, self.device = rows, lanes, device
        self.storage = {k: torch.zeros((rows, *v.shape), dtype=v.dtype, device=device) for k, v in example.items()}
        self.flat = {k: v.view(rows * lanes, *v.shape[2:]) for k, v in self.storage.items()}
        self.total = 0

    def add(self, step: dict[str, torch.Tensor]) -> None:
        row = self.total % self.rows
        for k, v in step.items():
            self.storage[k][row] = v
        self.total += 1

    def add_with_next(self, step: dict[str, torch.Tensor], next_obs: torch.Tensor, done: torch.Tensor,
                      timeout: torch.Tensor, final_obs: torch.Tensor | None = None) -> None:
        """What Stable-Baselines3's ``ReplayBuffer.add`` stores: the step, a copy of the true next
        observation and the done and timeout flags, every step. With ``final_obs`` (an
        auto-resetting env's extras), the stored next obs is ``final_obs`` on the ``done`` lanes,
        as SB3's off-policy loop substitutes ``terminal_observation``. The ring must have been
        built with ``next_obs``, ``done`` and ``timeout`` leaves."""
        row = self.total % self.rows
        for k, v in step.items():
            self.storage[k][row] = v
        if final_obs is None:
            self.storage["next_obs"][row] = next_obs
        else:
            torch.where(done[:, None], final_obs, next_obs, out=self.storage["next_obs"][row])
        self.storage["done"][row] = done
        self.storage["timeout"][row] = timeout
        self.total += 1

    @property
    def live(self) -> int:
        return min(self.total, self.rows)

    def sample(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        oldest = self.total - self.live
        k = torch.randint(0, self.live * self.lanes, (batch,), generator=gen, device=self.device)
        slot = (k + oldest * self.lanes) % (self.rows * self.lanes)
        return {name: t.index_select(0, slot) for name, t in self.flat.items()}

    def sample_sequences(self, batch: int, length: int, gen: torch.Generator, tries: int = 32,
                         done_key: str = "done") -> dict[str, torch.Tensor]:
        """Windows whose rows after the first carry no ``done`` (was_done) flag."""
        n, rows = self.lanes, self.rows
        oldest = self.total - self.live
        k = torch.randint(0, (self.live - length + 1) * n, (batch, tries), generator=gen, device=self.device)
        first = (k + oldest * n) % (rows * n)
        slots = (first[..., None] + n * torch.arange(length, device=self.device)) % (rows * n)
        done = self.flat[done_key][slots[..., 1:]]
        ok = ~done.any(-1)
        j = ok.to(torch.uint8).argmax(1)
        chosen = slots[torch.arange(batch, device=self.device), j]
        out = {name: t.index_select(0, chosen.view(-1)).view(batch, length, *t.shape[1:])
               for name, t in self.flat.items()}
        out["valid"] = ok.any(1)
        return out
