"""Compile every Triton kernel ahead of time for real GPU targets, without a GPU.

Run in a process without TRITON_INTERPRET (the interpreter replaces jitted functions). Each
kernel is compiled for every constexpr branch, once with its integer arguments as runtime
scalars and once with them specialized to 1 (as Triton's launcher may do), down to cubin
with the ptxas that ships with triton. Prints one line per variant: ``OK name`` or
``FAIL name: error``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys

assert "TRITON_INTERPRET" not in os.environ, "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gpubuffers.kernels import episode_index, finals, gather, priority, returns, sampling  # noqa: E402

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]


def variants(pointers, ints, flags, fixed):
    """(signature, constexprs) for every flag combination, ints as scalars and as constexpr 1."""
    for values in itertools.product((False, True), repeat=len(flags)):
        for ones in (False, True):
            sig = dict(pointers)
            consts = dict(fixed)
            for name, kind in ints.items():
                sig[name] = "constexpr" if ones else kind
                if ones:
                    consts[name] = 1
            for name, value in zip(flags, values):
                sig[name] = "constexpr"
                consts[name] = value
            for name in fixed:
                sig[name] = "constexpr"
            yield f"{dict(zip(flags, values))} ones={ones}", sig, consts


KERNELS = [
    ("add_step", episode_index._add_step_kernel,
     {"start_ptr": "*i64", "end_flags_ptr": "*u8", "ret_ptr": "*fp32", "ended_ptr": "*i8",
      "state_ptr": "*i64", "done_ptr": "*i8", "term_ptr": "*i8", "trunc_ptr": "*i8", "reward_ptr": "*fp32"},
     {"rows": "i32", "lanes": "i32"},
     ["MARKS_LAST", "NEXT_STEP", "HAS_DONE", "HAS_TERM", "HAS_TRUNC", "HAS_REWARD"],
     {"SENTINEL_": episode_index.SENTINEL, "ADDS": episode_index.STATE_ADDS,
      "RESTART": episode_index.STATE_RESTART, "FINAL_BIT": 4, "BLOCK_": episode_index.BLOCK}),
    ("record_ends", episode_index._record_ends_kernel,
     {"stats_ptr": "*fp64", "totals_ptr": "*fp64", "start_ptr": "*i64", "ret_ptr": "*fp32", "ended_ptr": "*i8",
      "state_ptr": "*i64"},
     {"rows": "i32", "lanes": "i32"}, ["MARKS_LAST"],
     {"ADDS": episode_index.STATE_ADDS, "BLOCK_": episode_index.BLOCK}),
    ("transitions", sampling._transitions_kernel,
     {"slots_ptr": "*i64", "row_ptr": "*i64", "index_ptr": "*i64", "masks_ptr": "*i8", "start_ptr": "*i64",
      "end_flags_ptr": "*u8", "final_idx_ptr": "*i32", "fin_head_ptr": "*i64", "state_ptr": "*i64"},
     {"seed": "i64", "batch": "i32", "tries": "i32", "rows": "i32", "lanes": "i32", "total": "i64",
      "final_rows": "i32"},
     ["NEXT_STEP", "HAS_FINAL"], {"BLOCK_": sampling.BLOCK}),
    ("nstep", returns._nstep_kernel,
     {"n_ptr": "*i64", "ret_ptr": "*fp32", "disc_ptr": "*fp32", "succ_ptr": "*i64", "masks_ptr": "*i8",
      "slot_ptr": "*i64", "row_ptr": "*i64", "reward_ptr": "*fp32", "start_ptr": "*i64", "end_flags_ptr": "*u8",
      "final_idx_ptr": "*i32", "fin_head_ptr": "*i64", "state_ptr": "*i64"},
     {"gamma": "fp64", "batch": "i32", "n_step": "i32", "lanes": "i32", "total": "i64", "final_rows": "i32"},
     ["NEXT_STEP", "HAS_FINAL"], {"ADDS": returns.STATE_ADDS, "BLOCK_": returns.BLOCK}),
    ("gae", returns._gae_kernel,
     {"adv_ptr": "*fp32", "ret_ptr": "*fp32", "reward_ptr": "*fp32", "value_ptr": "*fp32", "final_ptr": "*fp32",
      "flags_ptr": "*u8", "start_ptr": "*i64", "tail_flags_ptr": "*u8", "tail_final_ptr": "*fp32",
      "last_value_ptr": "*fp32", "gamma": "fp32", "gamma_lam": "fp32"},
     {"rows": "i32", "lanes": "i32"}, ["NEXT_STEP"],
     {"SENTINEL_": returns.SENTINEL, "ENDED_": returns.ENDED, "TRUNCATED_": returns.TRUNCATED,
      "HAS_FINAL_": returns.HAS_FINAL, "BLOCK_": returns.GAE_BLOCK}),
    ("windows", sampling._windows_kernel,
     {"slots_ptr": "*i64", "index_ptr": "*i64", "first_ptr": "*i8", "last_ptr": "*i8", "valid_ptr": "*i8",
      "start_ptr": "*i64", "end_flags_ptr": "*u8", "state_ptr": "*i64"},
     {"seed": "i64", "batch": "i32", "tries": "i32", "rows": "i32", "lanes": "i32", "total": "i64",
      "length": "i32"},
     [], {"BLOCK_": sampling.BLOCK}),
    ("episodes", sampling._episodes_kernel,
     {"slot_ptr": "*i64", "valid_ptr": "*i8", "cum_ptr": "*i64", "state_ptr": "*i64"},
     {"seed": "i64", "batch": "i32", "size": "i64", "steps": "i32"},
     [], {"BLOCK_": sampling.BLOCK}),
    # One kernel for every word width: each HAS_W* combination keeps the branches of the widths
    # a plan uses (all off compiles too, as an empty copy).
    ("gather", gather._gather_kernel,
     {"dst_base": "i64", "src_tab": "*i64", "words_tab": "*i64", "word_tab": "*i64", "dst_tab": "*i64",
      "set_tab": "*i64", "slots_ptr": "*i64"},
     {"n_items": "i32"}, ["HAS_W8", "HAS_W4", "HAS_W2", "HAS_W1"],
     {"BI": gather.BLOCK_ITEMS, "BW": gather.BLOCK_WORDS, "KINDS": 0}),
    # Every widening conversion (storage_dtypes) compiled in, beside plain copies or not.
    ("gather widening", gather._gather_kernel,
     {"dst_base": "i64", "src_tab": "*i64", "words_tab": "*i64", "word_tab": "*i64", "dst_tab": "*i64",
      "set_tab": "*i64", "slots_ptr": "*i64"},
     {"n_items": "i32"}, ["HAS_W4"],
     {"BI": gather.BLOCK_ITEMS, "BW": gather.BLOCK_WORDS, "HAS_W8": False, "HAS_W2": False, "HAS_W1": False,
      "KINDS": sum(1 << k for k in range(1, len(gather.CONVERSIONS) + 1))}),
]

# Prioritized replay: the update launches, the level refresh, and the two samplers.
_TREE = {"leaf_ptr": "*fp32", "sums_ptr": "*fp64", "mins_ptr": "*fp32", "offs_ptr": "*i64"}
KERNELS += [
    ("priority elect", priority._elect_kernel,
     {"keys_ptr": "*i64", "bits_ptr": "*i32", "index_ptr": "*i64", "prio_ptr": "*fp32", "start_ptr": "*i64",
      "state_ptr": "*i64"},
     {"count": "i32", "rows": "i32", "lanes": "i32", "capacity": "i64", "spare": "i64"}, [],
     {"BLOCK_": priority.BLOCK}),
    ("priority write", priority._write_kernel,
     {"leaf_ptr": "*fp32", "maxp_ptr": "*fp32", "nodes_ptr": "*i64", "bits_ptr": "*i32", "keys_ptr": "*i64",
      "prio_ptr": "*fp32", "alpha": "fp32", "eps": "fp32"},
     {"count": "i32", "capacity": "i64", "spare": "i64"}, [], {"BLOCK_": priority.BLOCK}),
    ("priority promote", priority._promote_kernel,
     {"leaf_ptr": "*fp32", "slots_ptr": "*i64", "start_ptr": "*i64", "state_ptr": "*i64", "maxp_ptr": "*fp32",
      "alpha": "fp32"},
     {"rows": "i32", "lanes": "i32"}, [], {"BLOCK_": priority.BLOCK}),
    ("priority refresh", priority._refresh_kernel,
     {"sums_ptr": "*fp64", "mins_ptr": "*fp32", "leaf_ptr": "*fp32", "slots_ptr": "*i64"},
     {"count": "i32", "span": "i64", "size": "i64", "below_off": "i64", "level_off": "i64"},
     ["LEAVES", "WHOLE"], {"F": 32, "BLOCK_": priority.BLOCK}),
    ("priority transitions", priority._transitions_kernel,
     {"slots_ptr": "*i64", "row_ptr": "*i64", "index_ptr": "*i64", "weight_ptr": "*fp32", "masks_ptr": "*i8",
      **_TREE, "end_flags_ptr": "*u8", "start_ptr": "*i64", "final_idx_ptr": "*i32", "fin_head_ptr": "*i64",
      "state_ptr": "*i64", "beta": "fp32"},
     {"seed": "i64", "batch": "i32", "rows": "i32", "lanes": "i32", "total": "i64", "final_rows": "i32",
      "root": "i64"},
     ["NEXT_STEP", "HAS_FINAL"], {"DEPTH": 5, "F": 32, "BLOCK_": priority.DRAW_BLOCK}),
    ("priority windows", priority._windows_kernel,
     {"slots_ptr": "*i64", "first_ptr": "*i8", "last_ptr": "*i8", "valid_ptr": "*i8", "index_ptr": "*i64",
      "weight_ptr": "*fp32", **_TREE, "start_ptr": "*i64", "end_flags_ptr": "*u8", "state_ptr": "*i64",
      "beta": "fp32"},
     {"seed": "i64", "batch": "i32", "tries": "i32", "rows": "i32", "lanes": "i32", "total": "i64",
      "length": "i32", "root": "i64"},
     [], {"DEPTH": 5, "F": 32, "BLOCK_": priority.DRAW_BLOCK}),
]

# store_finals: one kernel per word size (its typed side/value pointers) and tile shape.
KERNELS += [
    (f"store_finals word={size} BL={bl} BW={bw}", finals._store_finals_kernel,
     {"side_ptr": f"*i{8 * size}", "value_ptr": f"*i{8 * size}", "final_idx_ptr": "*i32",
      "fin_head_ptr": "*i64", "state_ptr": "*i64", "ended_ptr": "*i8"},
     {"rows": "i32", "lag": "i32", "lanes": "i32", "final_rows": "i32", "words": "i32"},
     ["BOOKKEEP"], {"ADDS": finals.STATE_ADDS, "MASK": finals.FINAL_IDX_MASK, "BL": bl, "BW": bw})
    for size in (8, 4, 2, 1) for _, bl, bw in finals.TILES
]


def jobs(archs: list[int]) -> list[tuple[int, int, int]]:
    """(target, kernel, variant) positions of every compilation for ``archs``."""
    return [(t, k, v) for t, target in enumerate(TARGETS) if target.arch in archs
            for k, kernel in enumerate(KERNELS) for v, _ in enumerate(variants(*kernel[2:]))]


def compile_one(job: tuple[int, int, int]) -> tuple[bool, str]:
    """Compile one variant to cubin: (ok, its report line)."""
    t, k, v = job
    target, (name, fn, pointers, ints, flags, fixed) = TARGETS[t], KERNELS[k]
    label, sig, consts = list(variants(pointers, ints, flags, fixed))[v]
    sig = {a: sig[a] for a in fn.arg_names}  # the kernel's own argument order
    try:
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        return True, f"OK {name} sm_{target.arch} {label}"
    except Exception as e:  # report every failure, not only the first
        return False, f"FAIL {name} sm_{target.arch} {label}: {type(e).__name__}: {str(e)[:400]}"


def main() -> int:
    """Compile every kernel variant for the architectures given as arguments (``90 80``; default
    both), on every core (each compilation is independent)."""
    archs = [int(a) for a in sys.argv[1:]] or [t.arch for t in TARGETS]
    todo = jobs(archs)
    workers = min(len(todo), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(compile_one, todo, chunksize=1)
    else:
        results = [compile_one(job) for job in todo]
    for _, line in results:
        print(line)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
