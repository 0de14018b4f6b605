"""merit_ds optimizers under DeepSpeed ZeRO: partition layouts, the statistics buffer, the
one collective -- shared by every optimizer (MERIT, LAMB, ...).

Importing this package registers :func:`resolve_group` with
:meth:`merit_ds.optim.ShardableOptimizer.register_group_resolver`; from then on a MERIT or
LAMB whose groups DeepSpeed replaced with flat partitions runs the sharded step
(:mod:`.step`) with the optimizer's fragment rule, automatically.

Modules: :mod:`.layout` (pure: fragments, stats-buffer slots), :mod:`.zero12`,
:mod:`.zero3`, :mod:`.bf16` (one adapter per DeepSpeed flavour, reading its records),
:mod:`.resolve` (chooses the adapter), :mod:`.collective` (the all-reduce), :mod:`.step`,
:mod:`.stats` (trust-ratio diagnostics over ranks, outside the step).
"""

from merit_ds.optim.base import ShardableOptimizer

from . import collective
from .errors import ShardingLayoutError
from .layout import Fragment, ParamSlots, PartitionLayout, StatsLayout
from .resolve import attach, layout_of, resolve_group
from .stats import reduce_trust_stats

ShardableOptimizer.register_group_resolver(resolve_group)

__all__ = ["reduce_trust_stats", "attach", "layout_of", "resolve_group", "collective", "ShardingLayoutError", "Fragment", "ParamSlots", "PartitionLayout", "StatsLayout"]
