"""ZeRO stage 1/2 (``DeepSpeedZeroOptimizer``): one flat fp32 slice per param group per rank.

What DeepSpeed records (``runtime/zero/stage_1_and_2.py``, 0.19.8) and this adapter reads:

- ``bit16_groups[i]``: the group's trainable parameters (the objects MERIT was built with);
  their order is the stats-buffer order, the same on every rank.
- ``round_robin_bit16_groups[i]`` / ``round_robin_bit16_offsets[i]``: the flatten order and
  each parameter's offset in the flat group, ``parameter_alignment`` padding included.
- ``partition_size[i]``: rank ``r`` owns ``[r*ps, (r+1)*ps)`` of the flat group;
  ``single_partition_of_fp32_groups[i]`` is that slice in fp32 (what MERIT steps).
- ``real_dp_process_group[i]``: the group to reduce over.

The ZeRO optimizer links itself to the parameters (``p._zero_optimizer``) only under
CPU offload (``_create_optimizer_mapping``, stage_1_and_2.py:748-749), so without offload
(and without :func:`merit_ds.attach`) the layout is read from the parameters themselves
(:func:`flat_group_layout`): every trainable parameter is a view into DeepSpeed's flat bit16
group buffer (``_update_model_bit16_weights``), so ``p.storage_offset()`` *is* its offset in
the flattened group, in the order and with the padding DeepSpeed actually used.

The per-parameter ``_hp_mapping`` records the same fragments, except under
``round_robin_gradients`` without alignment padding: DeepSpeed then accumulates offsets in
the un-reordered order and the mapping is wrong (``safe_get_full_fp32_param`` returns other
parameters' values; ``_link_all_hp_params`` passes the true offsets only when
``round_robin_bit16_padding`` is non-zero, stage_1_and_2.py:834-840). The offsets used here
are right in every case; the mapping is a cross-check wherever it is trustworthy.
"""

from __future__ import annotations

import torch.distributed as dist

from .errors import ShardingLayoutError
from merit_ds.optim.layout import PartitionLayout, layout_from_offsets

__all__ = ["zero12_layout", "flat_group_layout"]


def zero12_layout(owner, flat) -> tuple[PartitionLayout, object, list]:
    """(layout, process group, parameters in stats order) of ``flat``, one of ``owner``'s fp32
    partitions."""
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
    return layout, group, list(params)


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


def flat_group_layout(params, flat, process_group, *, reordered_ok: bool) -> PartitionLayout:
    """Layout of ``flat`` (this rank's equal slice of a flattened group) from the params.

    ``params``: the group's trainable parameters in stats order, each a view into the flat
    bit16 group buffer; ``process_group``: the data-parallel group (``p._dp_group``).
    ``reordered_ok``: whether DeepSpeed may have flattened in another order than ``params``
    (ZeRO 1/2 ``round_robin_gradients``); if not, a disagreement with ``_hp_mapping`` raises.
    """
    storages = {p.untyped_storage().data_ptr() for p in params}
    shapes = [tuple(p.shape) for p in params]
    rank = dist.get_rank(group=process_group)
    size = flat.numel()
    theirs = {}
    for i, p in enumerate(params):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            theirs[i] = (i, int(lp.start), int(lp.numel), int(hp.start))
    if len(storages) != 1:
        # Not views of one flat buffer (offloaded parameter storage, say): DeepSpeed's
        # _hp_mapping is then the only record; it is exact unless the group was reordered.
        if reordered_ok:
            raise ShardingLayoutError(
                "MERIT (ZeRO 1/2): cannot verify the flatten order (parameters are not views of one flat "
                "buffer) and round_robin_gradients makes DeepSpeed's _hp_mapping unreliable. Set "
                "round_robin_gradients=false or call merit_ds.attach(optimizer, engine)."
            )
        from merit_ds.optim.layout import layout_from_fragments

        return layout_from_fragments(shapes, theirs.values(), size)
    base = min(p.storage_offset() for p in params)
    offsets = [p.storage_offset() - base for p in params]
    layout = layout_from_offsets(shapes, offsets, rank * size, size)
    ours = {(f.param_index, f.param_start, f.numel, f.partition_offset) for f in layout.fragments}
    if ours != set(theirs.values()) and not reordered_ok:
        raise ShardingLayoutError(
            f"MERIT: fragment layout from the parameters' place in DeepSpeed's flat buffer disagrees with "
            f"DeepSpeed's _hp_mapping (ours {sorted(ours)[:3]}..., DeepSpeed {sorted(theirs.values())[:3]}...); "
            f"cannot determine the layout. Call merit_ds.attach(optimizer, engine)."
        )
    return layout
