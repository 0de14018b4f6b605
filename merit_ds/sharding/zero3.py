"""ZeRO stage 3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter partitioned on its own.

What DeepSpeed records (``runtime/zero/stage3.py``, 0.19.8) and this adapter reads:

- ``fp16_groups[s]``: the parameters of sub-group ``s`` (``sub_group_size`` splits a param
  group into sub-groups; ``step()`` runs once per sub-group with only that sub-group's flat
  partition in its param group, the others ``[]``).
- per parameter: ``ds_shape`` (the true shape; ``p.shape`` is ``(0,)`` while partitioned) and
  ``partition_numel()`` = ``ceil(numel / world)``: rank ``r`` holds elements
  ``[r*pn, (r+1)*pn)``, the last rank zero-padded; a small parameter can have *no* real
  element on a rank.
- ``fp32_partitioned_groups_flat[s]``: this rank's pieces of the sub-group, concatenated.
- ``sub_group_process_groups[s]`` (else ``dp_process_group``): the group to reduce over.
"""

from __future__ import annotations

import torch.distributed as dist

from .errors import ShardingLayoutError
from merit_ds.optim.layout import PartitionLayout, layout_from_param_partitions

__all__ = ["zero3_layout"]


def zero3_layout(owner, flat) -> tuple[PartitionLayout, object, list]:
    """(layout, process group, parameters in stats order) of ``flat``, a ZeRO-3 fp32 sub-group
    partition."""
    index = next((i for i, t in enumerate(owner.fp32_partitioned_groups_flat) if t is flat), None)
    if index is None:
        raise ShardingLayoutError(
            "MERIT (ZeRO 3): the flat partition is not one of the optimizer's "
            "fp32_partitioned_groups_flat; cannot determine its layout."
        )
    if getattr(owner, "swap_optimizer", False):
        raise ShardingLayoutError(
            "MERIT (ZeRO 3): offload_optimizer.device=nvme (optimizer-state swapping) is not supported; "
            "use device=cpu."
        )
    groups = getattr(owner, "sub_group_process_groups", None)
    group = groups[index] if groups else owner.dp_process_group
    params = owner.fp16_groups[index]
    shapes = [tuple(p.ds_shape) for p in params]
    layout = layout_from_param_partitions(shapes, [int(p.partition_numel()) for p in params], dist.get_rank(group=group))
    if layout.partition_numel != flat.numel():
        raise ShardingLayoutError(
            f"MERIT (ZeRO 3): sub-group {index} partition has {flat.numel()} elements, "
            f"its parameters' partitions {layout.partition_numel}"
        )
    return layout, group, list(params)
