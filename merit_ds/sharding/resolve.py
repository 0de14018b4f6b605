"""The one place that decides how a MERIT param group is stepped under DeepSpeed.

Registered with :meth:`MERIT.register_group_resolver` when :mod:`merit_ds` is imported, so
sharded MERIT needs no extra user call on any entry path (the user's own
``deepspeed.initialize``, the JSON config name, accelerate, the HF Trainer):

- a group holding the parameters MERIT was built with (or nothing) -> ``None``: MERIT's
  ordinary step;
- a group holding something else (DeepSpeed swapped in a flat fp32 partition) -> a
  :class:`~merit_ds.sharding.step.ShardedGroupStep` whose layout comes from the wrapper that
  owns the partition, found through the original parameters' back-links
  (``_z3_optimizer`` for ZeRO 3; ``_zero_optimizer`` for ZeRO 1/2 under CPU offload), or
  given explicitly with :func:`attach`; otherwise (ZeRO 1/2 without offload,
  BF16_Optimizer) read from the parameters themselves: their ``_hp_mapping`` and their
  place in DeepSpeed's flat buffer (:func:`merit_ds.sharding.zero12.flat_group_layout`);
- anything else -> :class:`ShardingLayoutError`. Never a silent fallback to treating the
  partition as one vector.

Layouts are computed once per partition tensor and cached on the optimizer.
"""

from __future__ import annotations

from typing import Any, Optional

from . import tensor_parallel
from .bf16 import hp_mapping_layout
from .pieces import pieces_stepper
from .errors import ShardingLayoutError
from .step import ShardedGroupStep
from .zero3 import zero3_layout
from .zero12 import zero12_layout

__all__ = ["resolve_group", "attach", "layout_of"]


def attach(optimizer, owner) -> None:
    """Tell ``optimizer`` (a MERIT) which DeepSpeed wrapper partitions it.

    ``owner`` is a ``DeepSpeedEngine`` or its ``engine.optimizer`` (ZeRO 1/2/3 optimizer or
    BF16_Optimizer). Rarely needed: the wrapper is found automatically through the
    parameters; the one case it is not is a ZeRO 1/2 rank that owns no element of any
    parameter of any group (a pathologically small model) under ``round_robin_gradients``.
    """
    wrapper = getattr(owner, "optimizer", None) if _kind(owner) is None else owner
    if wrapper is None or _kind(wrapper) is None:
        raise TypeError(f"merit_ds.attach: expected a DeepSpeedEngine or its ZeRO/BF16 optimizer, got {type(owner)}")
    if getattr(wrapper, "optimizer", None) is not optimizer:
        raise ValueError("merit_ds.attach: that DeepSpeed optimizer does not wrap this MERIT instance")
    optimizer._merit_ds_owner = wrapper
    optimizer.__dict__.pop("_merit_layouts", None)


def _kind(obj) -> Optional[str]:
    """Which adapter serves a DeepSpeed wrapper (by class, imported lazily)."""
    try:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:  # pragma: no cover
        return None
    if isinstance(obj, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(obj, DeepSpeedZeroOptimizer):
        return "zero1/2"
    if isinstance(obj, BF16_Optimizer):
        return "bf16"
    return None


def _find_owner(optimizer) -> tuple[str, Any]:
    owner = getattr(optimizer, "_merit_ds_owner", None)
    if owner is not None:
        return _kind(owner), owner
    originals = [p for ps in optimizer._original_params.values() for p in ps]
    for p in originals:
        z3 = getattr(p, "_z3_optimizer", None)
        if z3 is not None and getattr(z3, "optimizer", None) is optimizer:
            return "zero3", z3
    for p in originals:
        z12 = getattr(p, "_zero_optimizer", None)
        if z12 is not None and getattr(z12, "optimizer", None) is optimizer:
            return "zero1/2", z12
    if any(hasattr(p, "_hp_mapping") for p in originals):
        return "hp_mapping", None
    raise ShardingLayoutError(
        "MERIT was handed tensors it was not constructed with (DeepSpeed flat partitions?) and "
        "cannot find the DeepSpeed optimizer that made them. Construct MERIT with the model's "
        "parameters and pass it to deepspeed.initialize(optimizer=...), or call "
        "merit_ds.attach(optimizer, engine) after deepspeed.initialize. MERIT never treats a "
        "flat partition as one vector: that would compute wrong trust ratios."
    )


def layout_of(optimizer, group: dict):
    """(layout, process group, source, tensor-parallel exchange or None) of a group holding
    one flat partition (cached)."""
    params = group["params"]
    if len(params) != 1 or params[0].dim() != 1:
        raise ShardingLayoutError(
            f"MERIT: param group holds {len(params)} tensor(s) it was not constructed with "
            f"(shapes {[tuple(p.shape) for p in params][:4]}); expected one flat DeepSpeed partition."
        )
    flat = params[0]
    cache = optimizer.__dict__.setdefault("_merit_layouts", {})
    hit = cache.get(id(flat))
    if hit is not None and hit[0] is flat:
        return hit[1:]
    kind, owner = _find_owner(optimizer)
    if kind == "zero3":
        layout, pg, params = zero3_layout(owner, flat)
    elif kind == "zero1/2":
        layout, pg, params = zero12_layout(owner, flat)
    elif kind in ("bf16", "hp_mapping"):
        layout, pg, kind, params = hp_mapping_layout(optimizer, group, flat)
    else:  # pragma: no cover
        raise ShardingLayoutError(f"MERIT: unsupported DeepSpeed wrapper {type(owner)}")
    exchange = None
    tp = tensor_parallel.sharded_tp(optimizer, params, layout, pg, kind)
    if tp is not None:  # the slices of split matrices placed in the whole matrices' statistics
        layout, pg, exchange = tp
        kind = f"{kind} + tensor-parallel"
    cache[id(flat)] = (flat, layout, pg, kind, exchange)
    return layout, pg, kind, exchange


def _shape_preserving_copies(optimizer, group: dict) -> bool:
    """Whether the group holds one same-shaped copy per original parameter, in order.

    DeepSpeed without ZeRO (fp16 / bf16, ``FP16_UnfusedOptimizer``) hands the optimizer fp32
    master copies of each parameter with its shape: MERIT's ordinary step is exact there.
    """
    try:
        originals = optimizer.original_params(group)
    except KeyError:
        return False
    params = group["params"]
    return len(params) == len(originals) and all(
        tuple(p.shape) == tuple(o.shape) and p.numel() > 0 for p, o in zip(params, originals)
    )


def resolve_group(optimizer, group: dict) -> Optional[ShardedGroupStep]:
    """MERIT group resolver: a sharded stepper for flat partitions, else ``None``."""
    params = group["params"]
    stepper = pieces_stepper(optimizer, group)  # pieces a wrapper attached (megatron-core)
    if stepper is not None:
        return stepper
    if not params or all(optimizer.is_original(p) for p in params):
        return tensor_parallel.whole_param_stepper(optimizer, group)  # None without tensor parallelism
    if _shape_preserving_copies(optimizer, group):
        return tensor_parallel.whole_param_stepper(optimizer, group, optimizer.original_params(group))
    layout, pg, kind, exchange = layout_of(optimizer, group)
    return ShardedGroupStep(optimizer, group, params[0], layout, pg, kind, exchange=exchange)
