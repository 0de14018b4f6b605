"""Stale build locks of torch C++ extensions: found at start-up and named, before they hang a run.

torch builds a C++ extension (DeepSpeed's ``cpu_adam`` and ``deepspeed_shm_comm``, MERIT's CPU
kernel) on its first use, under a ``lock`` file in the extension's build folder; every other
process that needs the extension waits for that file to go away, with no message and no time
limit. A process killed while it builds (a timed-out job, a Ctrl-C during the first step) leaves
the file behind, and every later run that needs the extension hangs silently right after
start-up. Layout (``TORCH_EXTENSIONS_DIR`` replaces the first two levels when set)::

    ~/.cache/torch_extensions/            torch.utils.cpp_extension.get_default_build_root()
        py311_cpu/                        one folder per Python and accelerator
            cpu_adam/lock                 <- present only while a build runs, or left by a killed one
            merit_ds_cpu_kernel_<hash>/

:func:`warn_stale_build_locks` (called by ``merit_ds.train`` and ``merit_ds.run`` on each node's
first rank) names every lock older than any build (:data:`STALE_AFTER_S`) with the fix. It never
removes a lock it did not take: another user's or another job's build may own it (MERIT's own
kernel, whose build merit_ds runs, clears its own stale lock: ``merit_ds/optim/cpu_kernel.py``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

__all__ = ["STALE_AFTER_S", "stale_build_locks", "warn_stale_build_locks"]

#: A build of any extension merit_ds uses takes 1-3 minutes on 2 CPU cores; a lock this old was
#: left by a killed build.
STALE_AFTER_S = 600.0


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
    """One line on stderr per stale lock: what, where, the fix. Returns the locks named."""
    stream = sys.stderr if stream is None else stream
    locks = stale_build_locks(min_age_s)
    for lock, age in locks:
        stream.write(f"merit_ds: warning: a torch C++ extension build lock is {age / 60:.0f} min old: {lock}. "
                     f"A build killed midway leaves it, and any run that needs the '{lock.parent.name}' extension "
                     f"waits for it forever without a message. If no build is running on this machine, remove it: "
                     f"rm {lock}\n")
    stream.flush()
    return [lock for lock, _ in locks]
