"""DeepSpeed's ``BF16_Optimizer`` (bf16 weights + fp32 gradient accumulation, ZeRO 1).

It flattens each param group and cuts equal slices like ZeRO 1, keeps the fp32 slice in
``fp32_groups_flat_partition[i]`` and steps all groups in ONE ``step()`` call (so the sharded
step reduces the statistics of all groups in one collective). It leaves no link from the
parameters back to itself, but links every parameter ``p`` of group ``i`` with
``p._hp_mapping`` (``utils/tensor_fragment.py``): ``lp_fragment_address`` (start, numel in
the parameter) and ``hp_fragment_address`` (offset in this rank's fp32 slice), ``None`` when
another rank owns it, and ``p._dp_group``. The group's parameters are the trainable ones
MERIT was built with, in order (``is_optimized_parameter``); DeepSpeed swaps each group's
``params`` for the slice in place, so group ``i`` of MERIT is group ``i`` of the wrapper.
"""

from __future__ import annotations

from .errors import ShardingLayoutError
from .layout import PartitionLayout, layout_from_fragments

__all__ = ["hp_mapping_layout"]


def _is_optimized(p) -> bool:
    try:
        from deepspeed.runtime.utils import is_optimized_parameter

        return is_optimized_parameter(p)
    except ImportError:  # pragma: no cover
        return p.requires_grad and p.numel() > 0


def hp_mapping_layout(optimizer, group, flat) -> tuple[PartitionLayout, object]:
    """(layout, process group) of ``flat`` from the ``_hp_mapping`` of ``group``'s originals."""
    params = [p for p in optimizer.original_params(group) if _is_optimized(p)]
    if not params or not all(hasattr(p, "_hp_mapping") for p in params):
        raise ShardingLayoutError("MERIT (bf16): the group's parameters carry no DeepSpeed _hp_mapping")
    storage = flat.untyped_storage().data_ptr()
    frags = []
    for i, p in enumerate(params):
        mapping = p._hp_mapping
        if mapping is None:
            continue
        if mapping.hp_fragment.untyped_storage().data_ptr() != storage:
            raise ShardingLayoutError(
                "MERIT (bf16): a parameter's _hp_mapping points into another partition than the one "
                "being stepped; cannot determine the layout (pass the engine to merit_ds.attach)."
            )
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        frags.append((i, int(lp.start), int(lp.numel), int(hp.start)))
    layout = layout_from_fragments([tuple(p.shape) for p in params], frags, flat.numel())
    return layout, params[0]._dp_group
