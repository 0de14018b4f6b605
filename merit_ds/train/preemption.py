"""Preemption: SIGTERM (or SIGUSR1) ends the run after the current step with a checkpoint.

A cluster that takes the nodes back (SLURM preemption, ``scancel``, a time limit with
``--signal``) sends SIGTERM and, a grace period later, SIGKILL. Without a handler every step since
the last checkpoint is lost. With :class:`Preemption` installed:

1. the signal handler only sets a flag (nothing else is safe inside a handler);
2. after each optimizer step the ranks agree on it (:meth:`Preemption.requested`: one all-reduce
   MAX of one integer over a gloo group, so that on GPU it costs no device synchronisation):
   a signal that reaches the ranks at slightly different moments still stops them all after the
   same step;
3. the loop saves a checkpoint of that step synchronously (its metadata, rename and ``latest``
   done before anything else), and the run exits with :data:`EXIT_CODE` (143 = 128 + SIGTERM,
   what a process killed by SIGTERM reports), so a job scheduler sees a run that did not finish.

The next start with ``--resume auto`` continues from that checkpoint; the losses and weights are
bitwise those of an uninterrupted run (tests/test_preemption.py).

Bounded time: one step plus one checkpoint save. Both launchers give their ranks 30 s between
SIGTERM and SIGKILL (DeepSpeed's ``launch.py`` ``terminate_process_tree``; torchrun's
``close(timeout=30)``), which a GPT-2 Small/Medium step and ZeRO save fit on GPU nodes with local
NVMe or a parallel file system; ``launch/slurm.sbatch`` asks SLURM for the signal 120 s before
the time limit (``--signal=TERM@120``).
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["Preemption", "Preempted", "EXIT_CODE", "SIGNALS"]

#: Exit code of a preempted run (128 + SIGTERM).
EXIT_CODE = 128 + signal.SIGTERM
#: The signals that request a checkpoint-and-exit.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped early on a signal, after saving ``checkpoint`` (step ``step``)."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
                         "saved: run the same command again to resume from it (--resume auto)")


class Preemption:
    """Signal flag + agreement across ranks. Create it on every rank (collective when the world
    has more than one rank: it makes a gloo group); :meth:`close` restores the old handlers."""

    def __init__(self, signals=SIGNALS):
        self.received: Optional[int] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # the flag travels on CPU: on a gloo default group that one, else a gloo side group
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._world = dist.get_world_size() if dist.is_initialized() else 1

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def requested(self) -> Optional[int]:
        """The signal some rank received (every rank gets the same answer), or None. Collective."""
        local = self.received or 0
        if self._world > 1:
            flag = torch.tensor([local], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            local = int(flag.item())
        return local or None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
