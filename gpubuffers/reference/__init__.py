"""Pure-torch implementation of every hot operation: the CPU backend and the kernels' oracle.

One module per kernel module of :mod:`gpubuffers.kernels`: ``episode_index``, ``finals``,
``sampling``, ``returns``, ``priority``, ``gather`` (and ``rng``, the Philox stream the kernels draw from). None of them
imports triton, reads a device value on the host, or branches in Python on tensor contents, so
the same code runs on CUDA tensors without a host sync. The names below are the backend's ops, as
:mod:`gpubuffers.ops` dispatches them.
"""

from .. import layout
from ..layout import ENDED, HAS_FINAL, SENTINEL, TRUNCATED
from .episode_index import EpisodeIndex, add_step, advance, end_flags_of, record_ends, rows_of
from .finals import store_finals
from .gather import gather
from .priority import (PriorityTree, promote, sample_prioritized_transitions, sample_prioritized_windows,
                       update_priorities)
from .returns import gae, nstep
from .rng import philox4x32, philox_below, philox_uniform
from .sampling import (episode_choice, first_choice, live_span, pack_episodes, sample_episode_ends,
                       sample_transitions, sample_windows, slot_age, take, transition_links,
                       transition_ids, transition_slots, transitions, uniform_below, whole_episode_ends,
                       window_ends, window_slots, windows)

name = "torch"

__all__ = ["layout", "ENDED", "HAS_FINAL", "SENTINEL", "TRUNCATED", "EpisodeIndex", "add_step", "advance",
           "end_flags_of", "record_ends", "rows_of", "store_finals", "gae", "nstep", "gather", "philox4x32", "philox_below",
           "philox_uniform", "PriorityTree", "promote", "sample_prioritized_transitions",
           "sample_prioritized_windows", "update_priorities", "transition_ids",
           "episode_choice", "first_choice", "live_span", "pack_episodes", "sample_episode_ends",
           "sample_transitions", "sample_windows", "slot_age", "take", "transition_links",
           "transition_slots", "transitions", "uniform_below", "whole_episode_ends", "window_ends",
           "window_slots", "windows"]
