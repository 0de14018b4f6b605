"""Release DeepSpeed's CPU shared-memory all-reduce buffer when a job ends.

On the CPU accelerator with every rank on one machine (``LOCAL_SIZE == world``), DeepSpeed
0.19.8's shm comm op (``deepspeed/ops/csrc/cpu/comm/shm.cpp``, ``shm_initialize``) creates one
POSIX shared-memory segment per rank::

    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>

and never unlinks it (its ``shared_close`` is not called on any path). The segments are tmpfs
pages: every finished or killed CPU job leaves 66 MiB per rank in RAM until reboot. A test
suite that launches a few hundred 2-rank jobs: a day of test runs left 15 GiB on a 24 GiB machine.

:func:`release_cpu_allreduce_buffer` unlinks this rank's segment. Call it once every rank has
passed its last collective (after a barrier): the peers' mappings stay valid after the unlink,
only the name goes. :func:`stale_buffers` lists segments by port (tests use it to clean up
after jobs that died before releasing theirs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["SHM_DIR", "BUFFER_PREFIX", "buffer_path", "release_cpu_allreduce_buffer", "stale_buffers"]

SHM_DIR = Path("/dev/shm")
BUFFER_PREFIX = "deepspeed_allreduce_buffer"  # shm.cpp: SHM_BUFFER_NAME


def buffer_path(rank: int, *, addr: Optional[str] = None, port: Optional[str] = None) -> Path:
    """The segment DeepSpeed created for ``rank`` (name as in ``shm_initialize``)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return SHM_DIR / f"{BUFFER_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_cpu_allreduce_buffer(rank: int) -> bool:
    """Unlink this rank's segment if DeepSpeed made one; True when something was removed."""
    try:
        buffer_path(rank).unlink()
    except (FileNotFoundError, PermissionError, OSError):
        return False
    return True


def stale_buffers(port: Optional[int | str] = None) -> list[Path]:
    """This user's segments (of one master port, or all)."""
    pattern = f"{BUFFER_PREFIX}_{os.getuid()}_*_{port}_*" if port is not None else f"{BUFFER_PREFIX}_{os.getuid()}_*"
    try:
        return sorted(SHM_DIR.glob(pattern))
    except OSError:
        return []
