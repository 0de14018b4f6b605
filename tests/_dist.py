"""Run a worker script as a real multi-process job on CPU and collect its JSON result.

For tests that need real ranks (DeepSpeed ZeRO, DDP, accelerate): the worker runs under
``torchrun`` (default) or the ``deepspeed`` launcher, on CPU (``DS_ACCELERATOR=cpu``, gloo),
with the repository root on ``PYTHONPATH`` (the venv's editable install may point at
another checkout), offline HF, one thread per rank, a fresh master port and a timeout.

The worker writes its result as JSON to the path in ``$MERIT_TEST_RESULT`` (rank 0 only,
usually); :func:`launch` returns it parsed, or raises ``AssertionError`` with the tail of
the job's output. Workers should call ``torch.distributed.destroy_process_group()`` before
exiting (an interpreter-exit abort otherwise hits ~1 run in 15).

Example::

    from _dist import launch
    result = launch(HERE / "zero_worker.py", nprocs=2, args=["--configs", "z2_fp32"])
    assert result["max_diff"] == 0.0

Process start-up and DeepSpeed init cost seconds each: batch several configurations into
one worker run rather than launching per configuration.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent

__all__ = ["launch", "free_port", "dist_env", "REPO_ROOT", "TESTS_DIR"]


def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(extra: Optional[Mapping[str, str]] = None) -> dict:
    """The environment for CPU ranks: repo on PYTHONPATH, CPU accelerator, offline, 1 thread."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(TESTS_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("MASTER_PORT", None)
    env.update(extra or {})
    return env


def launch(
    script: os.PathLike | str,
    nprocs: int,
    args: Iterable[str] = (),
    *,
    launcher: str = "torchrun",
    timeout: float = 300,
    env: Optional[Mapping[str, str]] = None,
    result_path: Optional[os.PathLike | str] = None,
    cwd: Optional[os.PathLike | str] = None,
) -> dict:
    """Run ``script`` on ``nprocs`` CPU ranks; return the JSON the worker wrote.

    ``launcher``: ``"torchrun"`` (``python -m torch.distributed.run``) or ``"deepspeed"``
    (the ``deepspeed`` console script with ``--num_gpus nprocs``, which gives that many CPU
    ranks). ``result_path`` defaults to a fresh temporary file, exported to the worker as
    ``MERIT_TEST_RESULT``.
    """
    port = free_port()
    if result_path is None:
        fd, result_path = tempfile.mkstemp(prefix="merit_result_", suffix=".json")
        os.close(fd)
        os.unlink(result_path)
    full_env = dist_env({"MERIT_TEST_RESULT": str(result_path), **(env or {})})
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}", "--nnodes=1",
               f"--master_port={port}", str(script), *args]
    elif launcher == "deepspeed":
        ds = Path(sys.executable).with_name("deepspeed")
        cmd = [sys.executable, str(ds), "--num_gpus", str(nprocs), "--master_port", str(port), str(script), *args]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    try:
        proc = subprocess.run(cmd, env=full_env, cwd=cwd or REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-6000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-6000:]
        raise AssertionError(f"{launcher} job timed out after {timeout}s: {cmd}\n{out}") from None
    tail = (proc.stdout[-4000:] + "\n--- stderr ---\n" + proc.stderr[-8000:])
    if proc.returncode != 0:
        raise AssertionError(f"{launcher} job failed (rc={proc.returncode}): {' '.join(cmd)}\n{tail}")
    if not os.path.exists(result_path):
        raise AssertionError(f"worker wrote no result to {result_path}\n{tail}")
    with open(result_path) as f:
        result = json.load(f)
    os.unlink(result_path)
    result.setdefault("_log_tail", tail)
    return result
