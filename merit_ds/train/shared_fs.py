"""Start-up check that ``--out`` is one directory for every rank (a filesystem all nodes share).

Checkpoints are written per rank into ``--out`` and finalised by rank 0 (:mod:`.checkpoint`);
a node-local ``--out`` (``/tmp/run`` on every node, a local scratch disk) trains happily and
only fails at the first resume, when the other nodes' files are not where rank 0 looks -- days
later. So at start-up, before anything is built:

1. rank 0 creates ``--out`` if needed and writes a file holding a fresh random nonce;
2. the nonce's file name and value are broadcast; every rank reads the file from *its*
   ``--out``;
3. every rank's verdict (read the nonce / missing / another value / unreadable) is gathered, so
   every rank raises the same :class:`~.run_config.UsageError` naming the ranks and hosts that
   do not see rank 0's directory.

With node-local ranks this catches a node-local path: the ranks on the other nodes find no file.
The probe file is removed, and ``--out`` too if the check created it and it is still empty (a
run refused later leaves nothing behind). A world of one has nothing to check.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from .run_config import UsageError

__all__ = ["check_shared_out", "PROBE_PREFIX"]

PROBE_PREFIX = ".merit_ds_shared_probe-"


def _read(probe: Path, nonce: str) -> Optional[str]:
    """``None`` when this rank sees rank 0's file, else what it sees instead."""
    try:
        seen = probe.read_text()
    except FileNotFoundError:
        return "not there"
    except OSError as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None if seen == nonce else "a different nonce (another directory of the same name)"


def check_shared_out(out: Path, rank: int, world: int) -> None:
    """Every rank must call it (collective). Raises :class:`UsageError` on every rank alike."""
    if world == 1:
        return
    out = Path(out)
    header = [None, None, False, str(out)]  # probe name, nonce, created-by-the-check, rank 0's path
    if rank == 0:
        try:
            created = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            nonce = secrets.token_hex(16)
            name = f"{PROBE_PREFIX}{nonce[:8]}"
            with open(out / name, "w") as f:
                f.write(nonce)
                f.flush()
                os.fsync(f.fileno())  # on a network filesystem: visible to the other nodes' reads
            header = [name, nonce, created, str(out)]
        except OSError as exc:
            header = [None, f"rank 0 cannot write into --out {out}: {type(exc).__name__}: {exc}", False, str(out)]
    dist.broadcast_object_list(header, src=0)
    name, nonce, created, out0 = header
    if name is None:
        raise UsageError(nonce)
    verdict = _read(out / name, nonce)
    verdicts = [None] * world
    dist.all_gather_object(verdicts, (verdict, socket.gethostname()))
    if rank == 0:  # every rank has read it: the probe (and a directory made for it) can go
        (out / name).unlink(missing_ok=True)
        if created:
            try:
                out.rmdir()  # only if still empty
            except OSError:
                pass
    bad = [(r, host, v) for r, (v, host) in enumerate(verdicts) if v is not None]
    if bad:
        where = "; ".join(f"rank {r} on {host}: {v}" for r, host, v in bad)
        raise UsageError(
            f"--out {out0} is not one directory shared by every rank: rank 0 wrote a probe file there, and {where}. "
            f"Checkpoints are written per rank and finalised by rank 0, so a node-local --out would fail only at "
            f"resume: use a path on a filesystem every node mounts (NFS, Lustre, GPFS, ...)")
