from setuptools import setup

setup(
    name="gpubuffers",
    version="0.1.0",
    description="A GPU-resident replay buffer for vectorized, auto-resetting RL environments",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["gpubuffers", "gpubuffers.kernels"],
    # The Triton kernels live in the top-level folder kernels/ and install as gpubuffers.kernels:
    # a top-level module named "kernels" would collide with an existing package of that name.
    package_dir={"gpubuffers": "gpubuffers", "gpubuffers.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # tqdm and matplotlib: the examples' smoke tests require their progress bars and PNG curves.
        # pytest-xdist: the test command runs the suite on two worker processes.
        # torchrl: n-step returns and prioritized draws are checked against its MultiStep and
        # PrioritizedSampler.
        "test": ["pytest", "pytest-xdist", "hypothesis", "pytest-benchmark", "gymnasium>=1.0", "tensordict",
                 "torchrl", "mujoco", "imageio", "safetensors", "minari>=0.5", "pyarrow", "tqdm", "matplotlib"],
        # ReplayBuffer.save / ReplayBuffer.load write and read safetensors files.
        "checkpoint": ["safetensors"],
        # Export to and import from Minari datasets (gpubuffers.offline), stored as Arrow files.
        "minari": ["minari>=0.5", "pyarrow", "gymnasium>=1.0"],
        "bench": ["matplotlib", "pytest-benchmark", "torchrl", "tensordict"],
        # The examples' progress bars and learning curves (they run without them too), and the
        # MuJoCo simulator behind gymnasium's HalfCheetah-v5 (examples/td3.py --env halfcheetah).
        "examples": ["matplotlib", "tqdm", "gymnasium>=1.0", "mujoco", "imageio"],
    },
)
