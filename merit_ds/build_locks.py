"""Stale build locks of torch C++ extensions: found at start-up and named, before they hang a run.

torch builds a C++ extension (DeepSpeed's ``cpu_adam`` and ``deepspeed_shm_comm``, MERIT's CPU
kernel) on its first use, and checks the build is current on every later load, each time under a
``lock`` file in the extension's build folder; every other process that needs the extension
waits for that file to go away, with no message and no time limit. A process killed while it
builds or loads (a timed-out job, a Ctrl-C during start-up: seen here when a test run was
stopped while a job loaded ``deepspeed_shm_comm``) leaves the file behind, and every later run
that needs the extension hangs silently right after start-up. Layout (``TORCH_EXTENSIONS_DIR`` replaces the first two levels when set)::

    ~/.cache/torch_extensions/            torch.utils.cpp_extension.get_default_build_root()
        py311_cpu/                        one folder per Python and accelerator
            cpu_adam/lock                 <- present only while a build runs, or left by a killed one
            merit_ds_cpu_kernel_<hash>/

:func:`warn_stale_build_locks` (called by ``merit_ds.train`` and ``merit_ds.run`` on each node's
first rank, before this job builds anything) names every lock older than any build
(:data:`STALE_AFTER_S`) with the fix, and a younger one with a note (another job may be building;
or a run just killed during its build left it). It never removes a lock it did not take: another
user's, job's or node's build (a shared home directory) may own it (MERIT's own kernel, whose
build merit_ds runs, clears its own stale lock: ``merit_ds/optim/cpu_kernel.py``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

__all__ = ["STALE_AFTER_S", "first_rank_of_node", "stale_build_locks", "warn_stale_build_locks"]

#: A build of any extension merit_ds uses takes 1-3 minutes on 2 CPU cores; a lock this old was
#: left by a killed build.
STALE_AFTER_S = 600.0


def first_rank_of_node() -> bool:
    """Whether this process is its node's first rank, by the launcher's variable: torchrun and the
    deepspeed launcher (``LOCAL_RANK``), Open MPI (``OMPI_COMM_WORLD_LOCAL_RANK``), MPICH and Intel
    MPI (``MPI_LOCALRANKID``), SLURM's srun (``SLURM_LOCALID``). None set: a lone process."""
    for var in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        value = os.environ.get(var)
        if value not in (None, ""):
            return value == "0"
    return True


def _build_root() -> Path:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def stale_build_locks(min_age_s: float = STALE_AFTER_S, root: Path | None = None) -> list[tuple[Path, float]]:
    """``(lock, age in seconds)`` for every extension build lock under ``root`` (torch's build
    root by default) older than ``min_age_s``, oldest first. Reads only; an unreadable root gives []."""
    root = _build_root() if root is None else Path(root)
    now = time.time()
    found = []
    # <root>/<ext>/lock (TORCH_EXTENSIONS_DIR) and <root>/<pyXY_acc>/<ext>/lock (the default)
    for pattern in ("*/lock", "*/*/lock"):
        try:
            candidates = list(root.glob(pattern))
        except OSError:
            continue
        for lock in candidates:
            try:
                age = now - lock.stat().st_mtime
            except OSError:  # released meanwhile
                continue
            if age > min_age_s:
                found.append((lock, age))
    return sorted(found, key=lambda item: -item[1])


def warn_stale_build_locks(min_age_s: float = STALE_AFTER_S, stream=None) -> list[Path]:
    """One line on stderr per build lock: a stale one (older than ``min_age_s``) as a warning, a
    younger one as a note; what, where, the fix. Returns the stale locks named."""
    stream = sys.stderr if stream is None else stream
    everything = stale_build_locks(0.0)
    stale = [(lock, age) for lock, age in everything if age > min_age_s]
    for lock, age in everything:
        ext = lock.parent.name
        if age > min_age_s:
            stream.write(f"merit_ds: warning: a torch C++ extension build lock is {age / 60:.0f} min old: {lock}. "
                         f"A build killed midway leaves it, and any run that needs the '{ext}' extension waits for "
                         f"it forever without a message. If no build is running (on this machine, or on another "
                         f"node sharing this directory), remove it: rm {lock}\n")
        else:
            stream.write(f"merit_ds: note: a torch C++ extension build lock is {age:.0f} s old: {lock}. Another job "
                         f"may be building '{ext}' (this run waits for it); if a run was just killed during that "
                         f"build and none is running now, remove it (rm {lock}) or this run waits forever\n")
    stream.flush()
    return [lock for lock, _ in stale]
