"""What tests/_dist.py does not cover for the HF tests: ``accelerate launch`` and a plain
one-process ``python worker.py``, with the same environment (:func:`_dist.dist_env`).
Multi-process torchrun jobs use :func:`_dist.launch` directly."""

from __future__ import annotations

import os
import subprocess
import sys

from _dist import REPO_ROOT, dist_env, free_port

BIN = os.path.dirname(sys.executable)


def _run(cmd: list[str], timeout: int, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dist_env(env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_python(script: str, *args: str, timeout: int = 240, **env) -> subprocess.CompletedProcess:
    """``python script args`` in one process (no process group)."""
    return _run([sys.executable, str(REPO_ROOT / script), *args], timeout, {k: str(v) for k, v in env.items()})


def accelerate_launch(launch_args: list[str], script: str, *args: str, timeout: int = 240, **env):
    """``accelerate launch [launch_args] script args``, exactly as a user types it."""
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--main_process_port", str(free_port()), *launch_args,
           str(REPO_ROOT / script), *args]
    return _run(cmd, timeout, {k: str(v) for k, v in env.items()})
