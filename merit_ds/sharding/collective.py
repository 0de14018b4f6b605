"""The one collective of the sharded step: the statistics buffer's all-reduce (MAX for
MERIT's maxima, SUM for LAMB's sums of squares).

Kept in one place so that the count is easy to see (and to assert: :data:`counter`), and so
that the device rule lives once: the buffer is built next to the optimizer's flat partition
(CPU under ZeRO-Offload) and must meet the collective on the device its backend serves
(NCCL: the accelerator; gloo: the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["all_reduce", "all_reduce_stats", "collective_device", "counter", "CollectiveCounter"]


@dataclass
class CollectiveCounter:
    """How many statistics all-reduces ran in this process (tests assert one per step())."""

    calls: int = 0
    floats: int = 0


counter = CollectiveCounter()


def collective_device(group=None) -> torch.device:
    """The device a tensor must be on for a collective over ``group``."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo":
        return torch.device("cpu")
    try:  # DeepSpeed knows the accelerator (cuda, xpu, hpu, npu, ...)
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    except Exception:  # pragma: no cover - DeepSpeed is a hard dependency in practice
        return torch.device("cuda", torch.cuda.current_device())


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """``dist.all_reduce`` of ``tensor`` on :func:`collective_device`, result back in ``tensor``.

    For every other reduction of the training loop and the diagnostics (losses, attention
    logits, noise-scale gradients): they are built on the CPU or the model's device, and NCCL
    takes accelerator tensors only. Not counted in :data:`counter` (that counts the step's
    statistics all-reduce).
    """
    device = collective_device(group)
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(work, op=op, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_stats(buffer: torch.Tensor, op: str, group=None) -> torch.Tensor:
    """The sharded step's statistics all-reduce: element-wise ``op`` (``"max"`` or ``"sum"``)
    of ``buffer`` over ``group``; returns it on ``buffer``'s device.

    With a world of one this is still a (trivial) collective; it is never skipped, so every
    rank issues exactly the same sequence of collectives.
    """
    reduce_op = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op]
    device = collective_device(group)
    work = buffer if buffer.device == device else buffer.to(device)
    dist.all_reduce(work, op=reduce_op, group=group)
    counter.calls += 1
    counter.floats += work.numel()
    if work is not buffer:
        buffer.copy_(work)
    return buffer

