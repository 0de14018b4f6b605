"""The launcher shim: what differs between starting the loop with the deepspeed launcher and with
``accelerate launch`` (process group, engine construction, backward/step), so that everything else
is one code path. The model is wrapped by a DeepSpeed engine either way (Accelerate builds it from
its DeepSpeed plugin); only backward/step goes through ``accelerator.backward`` under Accelerate.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from merit_ds.integrations.deepspeed_shm import release_cpu_allreduce_buffer

__all__ = ["Runner", "detect_launcher", "rank0_print", "visible_nvidia_gpus", "cpu_torch_on_gpu_node",
           "use_collective_timeout", "fault_from_env", "TEST_FAULT_ENV"]


def detect_launcher(choice: str) -> str:
    """``--launcher``: ``auto`` is accelerate when ``accelerate launch`` started us, else deepspeed."""
    if choice != "auto":
        return choice
    return "accelerate" if any(k.startswith("ACCELERATE_") for k in os.environ) else "deepspeed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """`python -m merit_ds.train` without a launcher: a world of one (not MPI discovery on 29500)."""
    launched = "RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_RANK" in os.environ
    if not launched:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def rank0_print(runner, *a) -> None:
    """Print on rank 0 only (every rank runs the same code; one copy of each line is enough)."""
    if runner.rank == 0:
        print(*a, flush=True)


def visible_nvidia_gpus() -> int:
    """GPUs the NVIDIA driver lists (``/proc/driver/nvidia/gpus``), whether or not torch can use them."""
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return sum(1 for _ in gpus.iterdir()) if gpus.is_dir() else 0
    except OSError:
        return 0


def cpu_torch_on_gpu_node() -> Optional[str]:
    """Why this run must not start, or None: GPUs are visible but this torch cannot use them (a CPU
    build, or a CUDA build too old for the driver), so DeepSpeed would quietly fall back to its CPU
    accelerator and gloo and train on the CPU. ``MERIT_DS_ALLOW_CPU=1`` lets it."""
    n = visible_nvidia_gpus()
    if not n or torch.cuda.is_available() or os.environ.get("MERIT_DS_ALLOW_CPU", "0") not in ("", "0"):
        return None
    return (f"{n} NVIDIA GPU(s) are visible (/proc/driver/nvidia/gpus) but torch {torch.__version__} cannot use them "
            f"(torch.version.cuda is {torch.version.cuda}): this run would train on the CPU. Install torch's CUDA "
            "build (README, 'On a GPU cluster'), or set MERIT_DS_ALLOW_CPU=1 to train on the CPU anyway")


def use_collective_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the timeout of every process group this process creates from now on.

    ``init_process_group(timeout=...)`` sets it for the default group only: torch gives a group made
    later by ``new_group`` without a timeout its backend's default (30 min for gloo, 10 for NCCL),
    not the default group's. DeepSpeed runs ZeRO's gradient reductions on such a group (its clone
    of the world group, ``deepspeed.utils.groups._clone_world_group``), and the preemption flag
    travels on another (:mod:`.preemption`); so the defaults ``new_group`` reads are set here,
    before any group exists (tests/test_fail_fast.py: a hung peer ends the job at this timeout)."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout


#: Test-only fault injection: ``RANK:STEP:KIND`` makes that rank fail in that optimizer step (at its
#: first backward): ``raise`` (RuntimeError), ``oom`` (torch.OutOfMemoryError, as a GPU's would be)
#: or ``hang`` (sleeps forever). Read by :func:`fault_from_env`, used only in :meth:`Runner.backward_step`.
TEST_FAULT_ENV = "MERIT_DS_TEST_FAIL_AT"
_FAULT_KINDS = ("raise", "oom", "hang")


def fault_from_env(environ=None) -> Optional[tuple[int, int, str]]:
    """``(rank, step, kind)`` from ``$MERIT_DS_TEST_FAIL_AT``, or None when unset."""
    from .run_config import UsageError

    text = (os.environ if environ is None else environ).get(TEST_FAULT_ENV, "").strip()
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or parts[2] not in _FAULT_KINDS:
        raise UsageError(f"{TEST_FAULT_ENV}={text!r} (environment, a test hook): expected RANK:STEP:KIND with KIND "
                         f"one of {', '.join(_FAULT_KINDS)}, e.g. 1:5:raise; unset it to train normally")
    return int(parts[0]), int(parts[1]), parts[2]


def _inject_fault(rank: int, step: int, kind: str) -> None:
    # the moment goes to stdout (not the one-line error on stderr): tests time the other ranks from it
    print(f"{TEST_FAULT_ENV}: rank {rank} {kind} at step {step}, unix time {time.time():.3f}", flush=True)
    if kind == "hang":
        while True:  # like a rank stuck in a kernel: no signal handler wakes it up to report
            time.sleep(3600)
    if kind == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {TEST_FAULT_ENV} "
                                     f"at step {step})")
    raise RuntimeError(f"injected failure ({TEST_FAULT_ENV} at step {step})")


class Runner:
    """What differs between the launchers: process group, engine construction, backward/step.

    ``timeout``: how long a collective waits for the other ranks before it raises (``--collective-timeout``,
    :func:`.run_config.collective_timeout`); None leaves the libraries' defaults."""

    fault: Optional[tuple] = None  # (rank, step, kind) of $MERIT_DS_TEST_FAIL_AT (tests build Runners without __init__)
    timeout: Optional[timedelta] = None

    def __init__(self, launcher: str, timeout: Optional[timedelta] = None):
        self.launcher = launcher
        self.accelerator = None
        self.timeout = timeout
        self.fault = fault_from_env()
        if timeout is not None:
            use_collective_timeout(timeout)
        if launcher == "deepspeed":
            import deepspeed

            single_process_env()
            deepspeed.init_distributed(auto_mpi_discovery=True, **({"timeout": timeout} if timeout else {}))
            # NCCL stages broadcast_object_list on the current device: pick this rank's GPU before
            # the first one (loop._agree); a no-op on DeepSpeed's CPU accelerator. (Accelerate's state
            # sets the device itself when it starts the process group.)
            deepspeed.get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.cpu = not torch.cuda.is_available()
        self.micro = None  # micro-batches of the current step, once a batch schedule set the boundary

    def init_accelerator(self, ds_cfg: dict):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        timeout = {"timeout": self.timeout} if self.timeout is not None else {}
        handlers = ([InitProcessGroupKwargs(backend="gloo", **timeout)] if self.cpu else
                    [InitProcessGroupKwargs(**timeout)] if timeout else [])
        plugin = DeepSpeedPlugin(hf_ds_config=ds_cfg)
        self.accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def build(self, model, groups, ds_cfg: dict, client_optimizer):
        if self.launcher == "deepspeed":
            import deepspeed

            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=groups, optimizer=client_optimizer, config=ds_cfg)
            self.engine, self.optimizer = engine, optimizer
        else:
            from accelerate.utils import DummyOptim

            # the plugin was built before the checkpoint was resolved; only "checkpoint" may change
            self.accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = ds_cfg.get("checkpoint", {})
            opt = client_optimizer if client_optimizer is not None else DummyOptim(groups)
            engine, optimizer = self.accelerator.prepare(model, opt)
            self.engine, self.optimizer = engine, optimizer
        return self.engine

    def set_global_batch(self, global_batch: int) -> None:
        """A batch schedule's next batch, between two steps: DeepSpeed's own
        ``engine.set_train_batch_size`` (grad-accum = batch / (micro x world); the micro-batch and the
        engine stay). The engine's managed boundary is ``(micro_steps + 1) % grad_accum == 0`` over
        every micro-step since start (and ``micro_steps`` restarts at 0 on resume), which a changed
        grad-accum would misplace; so from here on the boundary is set explicitly per micro-batch
        (``set_gradient_accumulation_boundary``, the engine's API for that; Accelerate does the same
        from its own counter, restarted here)."""
        self.engine.set_train_batch_size(global_batch)
        self.micro = 0
        if self.accelerator is not None:
            self.accelerator.gradient_accumulation_steps = self.engine.gradient_accumulation_steps()
            self.accelerator.step = 0

    def backward_step(self, loss) -> None:
        """One micro-batch's backward; DeepSpeed steps (clip, optimizer, zero_grad) at the boundary."""
        if self.fault is not None and self.fault[:2] == (self.rank, self.engine.global_steps + 1):
            _inject_fault(*self.fault)
        if self.accelerator is None:
            if self.micro is not None:
                self.micro += 1
                boundary = self.micro == self.engine.gradient_accumulation_steps()
                self.engine.set_gradient_accumulation_boundary(boundary)
                if boundary:
                    self.micro = 0
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def micro_context(self):
        if self.accelerator is None:
            import contextlib
            return contextlib.nullcontext()
        return self.accelerator.accumulate(self.engine)

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            # every rank is past its last collective: DeepSpeed's CPU shm buffer can go (it
            # never unlinks it itself; integrations/deepspeed_shm.py)
            release_cpu_allreduce_buffer(dist.get_rank())
            # avoids rare aborts at interpreter exit (docs/design/field_notes.md, 'DeepSpeed on CPU');
            # the collection as merit_ds/run.py does (measured there, with the barrier, not here alone)
            dist.destroy_process_group()
            gc.collect()
