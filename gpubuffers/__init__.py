"""gpubuffers: a GPU-resident replay buffer for vectorized, auto-resetting environments.

Importing this package never imports triton and never touches a GPU.
"""

from .buffer import ReplayBuffer
from .dataset import BufferDataset
from .episodes import pad_episodes
from .memory import capacity_for
from .rollout import RolloutBuffer
from .specs import LeafSpec

__version__ = "0.1.0"
__all__ = ["ReplayBuffer", "RolloutBuffer", "BufferDataset", "pad_episodes", "capacity_for", "LeafSpec", "__version__"]
