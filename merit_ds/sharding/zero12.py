"""ZeRO stage 1/2 (``DeepSpeedZeroOptimizer``): one flat fp32 slice per param group per rank.

What DeepSpeed records (``runtime/zero/stage_1_and_2.py``, 0.19.8) and this adapter reads:

- ``bit16_groups[i]``: the group's trainable parameters (the objects MERIT was built with);
  their order is the stats-buffer order, the same on every rank.
- ``round_robin_bit16_groups[i]`` / ``round_robin_bit16_offsets[i]``: the flatten order and
  each parameter's offset in the flat group, ``parameter_alignment`` padding included.
- ``partition_size[i]``: rank ``r`` owns ``[r*ps, (r+1)*ps)`` of the flat group;
  ``single_partition_of_fp32_groups[i]`` is that slice in fp32 (what MERIT steps).
- ``real_dp_process_group[i]``: the group to reduce over.

The per-parameter ``_hp_mapping`` records the same fragments, except under
``round_robin_gradients`` without alignment padding: DeepSpeed then accumulates offsets in
the un-reordered order and the mapping is wrong (``safe_get_full_fp32_param`` returns other
parameters' values). The offsets above are the ones DeepSpeed flattens with, so they are
right in every case; the mapping is used as a cross-check where it is trustworthy.
"""

from __future__ import annotations

import torch.distributed as dist

from .errors import ShardingLayoutError
from .layout import PartitionLayout, layout_from_offsets

__all__ = ["zero12_layout"]


def zero12_layout(owner, flat) -> tuple[PartitionLayout, object, int]:
    """(layout, process group, group index) of ``flat``, one of ``owner``'s fp32 partitions."""
    index = _index_of(owner.single_partition_of_fp32_groups, flat)
    if index is None:
        raise ShardingLayoutError(
            "MERIT (ZeRO 1/2): the flat partition is not one of the ZeRO optimizer's "
            "single_partition_of_fp32_groups; cannot determine its layout."
        )
    group = owner.real_dp_process_group[index]
    rank = dist.get_rank(group=group)
    size = int(owner.partition_size[index])
    params = owner.bit16_groups[index]
    flatten_order = owner.round_robin_bit16_groups[index]
    offsets = {id(p): int(o) for p, o in zip(flatten_order, owner.round_robin_bit16_offsets[index])}
    metas = {id(p): m for p, m in zip(flatten_order, owner.round_robin_bit16_meta[index])}
    if set(offsets) != {id(p) for p in params}:
        raise ShardingLayoutError("MERIT (ZeRO 1/2): flatten order and parameter list disagree")
    shapes = [tuple(metas[id(p)].shape) for p in params]
    if flat.numel() != size:
        raise ShardingLayoutError(f"MERIT (ZeRO 1/2): partition has {flat.numel()} elements, expected {size}")
    layout = layout_from_offsets(shapes, [offsets[id(p)] for p in params], rank * size, size)
    if not getattr(owner, "round_robin_gradients", False):
        _cross_check(layout, params)
    return layout, group, index


def _cross_check(layout: PartitionLayout, params) -> None:
    """Our fragments must equal DeepSpeed's ``_hp_mapping`` records wherever those exist."""
    ours = {(f.param_index, f.param_start, f.numel, f.partition_offset) for f in layout.fragments}
    theirs = set()
    for i, p in enumerate(params):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            theirs.add((i, int(lp.start), int(lp.numel), int(hp.start)))
    if theirs and ours != theirs:
        raise ShardingLayoutError(
            f"MERIT (ZeRO 1/2): fragment layout disagrees with DeepSpeed's _hp_mapping "
            f"(ours {sorted(ours)[:4]}..., DeepSpeed {sorted(theirs)[:4]}...)"
        )


def _index_of(tensors, flat):
    for i, t in enumerate(tensors):
        if t is flat:
            return i
    return None
