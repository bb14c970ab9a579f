"""W7: transitions per GB, and sampling from narrow storage, for an Isaac-style step.

The step: ``obs`` float32[64], a privileged ``critic`` obs float32[128] (asymmetric actor-critic),
``action`` float32[12], a reward, terminated/truncated flags and the final observations of both
obs at episode ends. gpubuffers stores each row once (the next obs is the next row, or the side
table at an episode's end) plus its episode index; with ``storage_dtypes`` both obs in bfloat16.
The baseline is the FastTD3-style layout: every leaf float32 (flags int64), and the next actor and
critic observations stored again beside the current ones. Sampling is ``sample(4096)`` with both
next obs, against ``randint`` + ``index_select`` of every tensor of the FastTD3-style ring.
"""

from __future__ import annotations

import torch

from gpubuffers import ReplayBuffer

from .core import Row
from .plain import PlainRing
from .timing import interleaved

OBS, CRITIC, ACT, BATCH = 64, 128, 12, 4096
FASTTD3 = "FastTD3-style ring (float32, next obs stored)"
W7 = f"W7 sample({BATCH}) with next obs (Isaac-style step)"


def fasttd3_example(lanes: int, device: torch.device) -> dict[str, torch.Tensor]:
    f32 = dict(dtype=torch.float32, device=device)
    return {"obs": torch.zeros(lanes, OBS, **f32), "critic": torch.zeros(lanes, CRITIC, **f32),
            "action": torch.zeros(lanes, ACT, **f32), "reward": torch.zeros(lanes, **f32),
            "done": torch.zeros(lanes, dtype=torch.int64, device=device),
            "truncation": torch.zeros(lanes, dtype=torch.int64, device=device),
            "next_obs": torch.zeros(lanes, OBS, **f32), "next_critic": torch.zeros(lanes, CRITIC, **f32)}


def resident_bytes(buf: ReplayBuffer) -> int:
    """What the buffer keeps allocated: storage, side tables, index, statistics."""
    nb = buf.nbytes()
    return nb["total"] - nb["scratch"]


def run_memory(device: torch.device, lanes: int = 4096, capacity: int = 1 << 20,
               repeats: int = 20) -> tuple[list[Row], list[str]]:
    rows = capacity // lanes
    g = torch.Generator(device=device).manual_seed(0)
    bufs = {
        "gpubuffers (bf16 obs)": ReplayBuffer(capacity, lanes, device=device, done_marks="last", seed=0,
                                              next_keys=("obs", "critic"),
                                              storage_dtypes={"obs": torch.bfloat16, "critic": torch.bfloat16}),
        "gpubuffers (float32)": ReplayBuffer(capacity, lanes, device=device, done_marks="last", seed=0,
                                             next_keys=("obs", "critic")),
    }
    for i in range(rows + 3):  # fill and wrap every ring
        ends = torch.rand(lanes, generator=g, device=device) < 0.01
        trunc = ends & (torch.rand(lanes, generator=g, device=device) < 0.5)
        step = {"obs": torch.randn(lanes, OBS, generator=g, device=device),
                "critic": torch.randn(lanes, CRITIC, generator=g, device=device),
                "action": torch.randn(lanes, ACT, generator=g, device=device),
                "reward": torch.randn(lanes, generator=g, device=device)}
        final = {"obs": torch.randn(lanes, OBS, generator=g, device=device),
                 "critic": torch.randn(lanes, CRITIC, generator=g, device=device)}
        for buf in bufs.values():
            buf.add(step, terminated=ends & ~trunc, truncated=trunc, final_obs=final)
    plain = PlainRing(rows, lanes, fasttd3_example(lanes, device), device)
    for t in plain.storage.values():
        if t.is_floating_point():
            t.normal_(generator=g)
    plain.total = rows + 3
    gen = torch.Generator(device=device).manual_seed(1)
    fns = {name: (lambda b=buf: b.sample(BATCH)) for name, buf in bufs.items()}
    fns[FASTTD3] = lambda: plain.sample(BATCH, gen)
    timings = interleaved(fns, device, repeats=repeats, shuffle=True)
    out = []
    for name, t in timings.items():
        if name == FASTTD3:
            item = sum(v[0, 0].numel() * v.element_size() for v in plain.storage.values())
        else:
            st = bufs[name].storage
            item = sum(st[k][0, 0].numel() * st[k].element_size() for k in [*st, "obs", "critic"])
        out.append(Row(W7, name, t, BATCH, BATCH * item, baseline=FASTTD3))
    theirs = sum(t.numel() * t.element_size() for t in plain.storage.values())
    layout = [{"provider": FASTTD3, "bytes_per_transition": theirs / capacity, "index_bytes_per_transition": 0.0,
               "scratch_bytes_per_transition": 0.0}]
    for name, buf in bufs.items():
        nb = buf.nbytes()
        layout.append({"provider": name, "bytes_per_transition": resident_bytes(buf) / capacity,
                       "index_bytes_per_transition": nb["index"] / capacity,
                       "scratch_bytes_per_transition": nb["scratch"] / capacity})
    for r in layout:
        r["transitions_per_gb"] = 1e9 / r["bytes_per_transition"]
        r["vs_fasttd3"] = r["transitions_per_gb"] / layout[0]["transitions_per_gb"]
    lines = [f"W7 layout, {capacity} transitions ({lanes} lanes x {rows} rows): bytes kept per transition "
             f"(storage, side tables, episode index, statistics) and transitions per GB:"]
    for r in layout:
        lines.append(f"- {r['provider']}: {r['bytes_per_transition']:.1f} B, {r['transitions_per_gb'] / 1e6:.2f} M "
                     f"per GB, {r['vs_fasttd3']:.2f}x the FastTD3-style layout"
                     + (f" (episode index {r['index_bytes_per_transition']:.1f} B of it; sample_episodes' "
                        f"scratch {r['scratch_bytes_per_transition']:.0f} B more while it runs)"
                        if r["provider"] != FASTTD3 else ""))
    base = timings[FASTTD3].median_s
    for name in bufs:
        lines.append(f"- W7 sample({BATCH}) {name}: {timings[name].median_s / base:.2f}x the FastTD3-style "
                     f"ring's time (same run)")
    return out, layout, lines
