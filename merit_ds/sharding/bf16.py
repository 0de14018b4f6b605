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
from merit_ds.optim.layout import PartitionLayout
from .zero12 import flat_group_layout

__all__ = ["hp_mapping_layout"]


def _is_optimized(p) -> bool:
    try:
        from deepspeed.runtime.utils import is_optimized_parameter

        return is_optimized_parameter(p)
    except ImportError:  # pragma: no cover
        return p.requires_grad and p.numel() > 0


def hp_mapping_layout(optimizer, group, flat) -> tuple[PartitionLayout, object, str, list]:
    """(layout, process group, flavour, parameters in stats order) of ``flat`` from ``group``'s original parameters.

    Serves BF16_Optimizer, and ZeRO 1/2 when the ZeRO optimizer left no back-link (no CPU
    offload): both flatten the group into one buffer the parameters are views of, and cut
    equal slices. ZeRO 1/2 parameters carry ``param_idx_in_group`` (stage_1_and_2.py:430);
    only there can the flatten order differ from the group order (round robin).
    """
    params = [p for p in optimizer.original_params(group) if _is_optimized(p)]
    if not params or not all(hasattr(p, "_hp_mapping") for p in params):
        raise ShardingLayoutError(
            "MERIT: the group's parameters carry no DeepSpeed _hp_mapping; cannot determine the layout of its "
            "flat partition. Call merit_ds.attach(optimizer, engine)."
        )
    zero12 = all(getattr(p, "param_idx_in_group", None) is not None for p in params)
    layout = flat_group_layout(params, flat, params[0]._dp_group, reordered_ok=zero12)
    return layout, params[0]._dp_group, "zero1/2" if zero12 else "bf16", params
