"""Minimal multi-process launcher for the HF tests (to be folded into tests/_dist.py once the
zero branch lands it). Runs ``torchrun --nproc_per_node N script args`` or ``accelerate launch``
with the repository root on PYTHONPATH, offline, on the CPU accelerator."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", ACCELERATE_DISABLE_RICH="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd: list[str], timeout: int = 240, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 240, **env) -> subprocess.CompletedProcess:
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
           os.path.join(REPO, script), *args]
    return run(cmd, timeout=timeout, **env)


def accelerate_launch(launch_args: list[str], script: str, *args: str, timeout: int = 240, **env):
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--main_process_port", str(_free_port()), *launch_args,
           os.path.join(REPO, script), *args]
    return run(cmd, timeout=timeout, **env)
