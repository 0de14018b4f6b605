"""merit_ds optimizers under DeepSpeed ZeRO: partition layouts, the statistics buffer, the
one collective -- shared by every optimizer (MERIT, LAMB, ...).

:func:`install` (called by ``import merit_ds``) registers :func:`resolve_group` with
:meth:`merit_ds.optim.ShardableOptimizer.register_group_resolver`; from then on a MERIT or
LAMB whose groups DeepSpeed replaced with flat partitions runs the sharded step
(:mod:`.step`) with the optimizer's fragment rule, automatically.

Modules: :mod:`merit_ds.optim.layout` (pure: fragments, stats-buffer slots; in the math
layer, which uses it too), :mod:`.zero12`,
:mod:`.zero3`, :mod:`.bf16` (one adapter per DeepSpeed flavour, reading its records),
:mod:`.resolve` (chooses the adapter), :mod:`.collective` (the all-reduce), :mod:`.step`,
:mod:`.stats` (trust-ratio diagnostics over ranks, outside the step).
"""

from merit_ds.optim.base import ShardableOptimizer

from . import collective
from .errors import ShardingLayoutError
from merit_ds.optim.layout import Fragment, ParamSlots, PartitionLayout, StatsLayout
from .resolve import attach, layout_of, resolve_group
from .stats import reduce_trust_stats



def install() -> None:
    """Make every ShardableOptimizer step its flat (ZeRO) partitions through :func:`resolve_group`.
    Idempotent."""
    if resolve_group not in ShardableOptimizer._group_resolvers:
        ShardableOptimizer.register_group_resolver(resolve_group)


__all__ = ["install", "reduce_trust_stats", "attach", "layout_of", "resolve_group", "collective", "ShardingLayoutError", "Fragment", "ParamSlots", "PartitionLayout", "StatsLayout"]
