"""Which of MERIT's implementations steps a group of tensors (:func:`resolve_implementation`).

A leaf of the math layer: the optimizer (:mod:`.merit`) and its sharded rule
(:mod:`.merit_fragments`) both ask it, and it asks the kernels (:mod:`.cpu_kernel`,
:mod:`.segmented_triton`) whether they can run; none of those imports the optimizer back.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import foreach_supported

__all__ = ["IMPLEMENTATIONS", "resolve_implementation"]

IMPLEMENTATIONS = ("single_tensor", "foreach", "fused", "compiled", "triton")


def resolve_implementation(implementation: Optional[str], params: list, *tensors: list) -> str:
    """The path that runs: ``"single_tensor"``, ``"foreach"``, ``"cpu_kernel"`` (the C++
    kernel), ``"compiled"`` (torch.compile) or ``"triton"`` (asked for by name only; a
    ``ValueError`` where the tensors are not fp32 contiguous tensors the kernels can run on).

    ``None`` picks the fastest correct path measured on each device (docs/optimizer.md, "Speed"):
    the CPU kernel for fp32 contiguous CPU tensors when it builds, else ``"foreach"``.
    ``"fused"`` is the device's fused kernel: the CPU kernel (``"foreach"`` if it cannot be
    built or a tensor is not fp32/contiguous) on CPU, ``torch.compile`` elsewhere. ``params``
    and each of ``tensors`` (grads, moments) are lists of tensors, index by index.
    """
    if any(isinstance(t, Tensor) for t in (params, *tensors)):
        raise TypeError("resolve_implementation takes lists of tensors")
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"unknown implementation {implementation!r}")
    if implementation == "triton":
        from . import segmented_triton

        bad = [tuple(t.shape) for ts in zip(params, *tensors) for t in ts
               if t.dtype != torch.float32 or not t.is_contiguous() or not segmented_triton.available(t.device)]
        if bad:
            why = segmented_triton._import_error() or "they need fp32 contiguous tensors on a CUDA device"
            raise ValueError(f"implementation='triton' cannot step these tensors ({why}; e.g. shape {bad[0]}): "
                             "use the default implementation")
        return "triton"
    on_cpu = all(p.device.type == "cpu" for p in params)
    if implementation in (None, "fused") and on_cpu:
        from . import cpu_kernel

        if all(cpu_kernel.supports(*ts) for ts in zip(params, *tensors)) and cpu_kernel.available():
            return "cpu_kernel"
        return "foreach"
    if implementation == "fused":
        return "compiled"
    if implementation is None:
        return "foreach" if foreach_supported(params) else "single_tensor"
    return implementation
