"""The contract between an optimizer's math and the shared sharded step.

Under DeepSpeed ZeRO an optimizer sees flat 1-D partitions that cut its tensors anywhere.
Any optimizer whose update is element-wise except for a few *statistics* of whole tensors
(row/column/tensor maxima for MERIT, norms for LAMB and LARS) can still compute the
single-device update there, if those statistics combine exactly (or to rounding) over
pieces: each rank computes partial statistics of the fragments it owns, one all-reduce
combines them, and each rank finishes its own fragments. :mod:`merit_ds.sharding` runs that
three-phase step for every optimizer; the optimizer describes its math with a
:class:`FragmentRule`::

    phase 1 (local)    u = rule.direction(m, v, w, ...)          over the whole partition
                       rule.fragment_statistics(shape, start, w, u, slot)   per fragment
    phase 2 (collect)  all_reduce(buffer, rule.reduce_op)        ONE per step() call
    phase 3 (local)    rule.apply_fragment(shape, start, w, u, slot, ...)   per fragment

A fragment is elements ``[start, start + n)`` of a parameter of ``shape`` flattened in
row-major order; ``slot`` is that parameter's ``rule.stats_size(shape)`` entries of the
statistics buffer, which starts at ``0`` on every rank (the identity of both ``max |.|`` and
``+``) and holds the statistics of the *whole* parameter after phase 2.

Adding an optimizer (LARS, say: per-tensor ``||w|| / ||g + wd*w||`` with momentum applied
after the ratio): write its formulas and its class on :class:`~merit_ds.optim.base.ShardableOptimizer`
(``_step_group`` for whole tensors), and a rule with ``reduce_op = "sum"``,
``stats_size = 2`` (sums of squares of w and of the direction), ``direction`` computing the
element-wise part, ``apply_fragment`` the ratio and the update; set ``fragment_rule`` on the
class. The layouts, the ZeRO/BF16 adapters, the collective, the non-finite agreement and
the checkpoints are shared and need no change. The math layer stays free of
``torch.distributed``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["FragmentRule", "Recorder"]

#: ``record(trust, u)``: called by :meth:`FragmentRule.apply_fragment` with the trust ratio
#: and the direction of a piece, before ``u`` is overwritten, when statistics are tracked.
Recorder = Optional[Callable[[Tensor, Tensor], None]]


class FragmentRule:
    """How an optimizer steps fragments of its parameters (subclass and fill in).

    Attributes:
        name: the optimizer's name, for messages.
        reduce_op: ``"max"`` or ``"sum"``: how partial statistics combine over ranks.
        stats_dtype: dtype of the statistics buffer (maxima are exact in float32; sums of
            squares are accumulated in float64).
        skip_unit: what a non-finite gradient skips under ``nonfinite_grads="skip"``:
            ``"parameter"`` (that parameter only) or ``"group"`` (every parameter of the
            partition's group: an optimizer with bias correction keeps one step count for
            the flat partition, so its parameters must step together).
        clips: whether the update clips ``s * u`` to [-1, 1] (tracked statistics count the
            clipped elements only then).
    """

    name: str = "?"
    clips: bool = False
    reduce_op: str = "max"
    stats_dtype: torch.dtype = torch.float32
    skip_unit: str = "parameter"

    def stats_size(self, shape: tuple[int, ...]) -> int:
        """Number of statistics (buffer entries) of a parameter of ``shape``."""
        raise NotImplementedError

    def direction(self, m: Tensor, v: Tensor, w: Tensor, group: dict, step: int, out: Tensor) -> Tensor:
        """The element-wise direction ``u`` from the (already updated) moments, into ``out``.

        ``step`` is the number of the step being taken (1 for the first), for bias correction.
        """
        raise NotImplementedError

    def fragment_statistics(self, shape: tuple[int, ...], start: int, w: Tensor, u: Tensor, slot: Tensor) -> None:
        """Combine the fragment's partial statistics into ``slot`` (in place)."""
        raise NotImplementedError

    def apply_fragment(
        self,
        shape: tuple[int, ...],
        start: int,
        w: Tensor,
        u: Tensor,
        slot: Tensor,
        *,
        group: dict,
        lr: float,
        work: Optional[Tensor],
        record: Recorder,
    ) -> None:
        """Update ``w`` (in place) from ``u`` and the whole parameter's statistics in ``slot``.

        ``u`` may be overwritten. ``work``: a free buffer of ``w``'s size, or ``None``.
        """
        raise NotImplementedError

    def column_split_slots(self, shape: tuple[int, ...], col_offset: int, full_cols: int):
        """Tensor parallelism, a slice of columns ``[col_offset, col_offset + shape[1])`` of a
        matrix with ``full_cols`` columns (:mod:`merit_ds.optim.tp_layout`): the whole matrix's
        slot size and ``[(local_entry, whole_entry, count), ...]`` placing this slice's entries
        in it. Default: statistics whose size does not depend on the shape (sums over the
        tensor) keep their place."""
        whole = tuple(shape[:1]) + (full_cols,) + tuple(shape[2:])
        size = self.stats_size(tuple(shape))
        if self.stats_size(whole) != size:
            raise NotImplementedError(f"{self.name}: no column placement for tensor-parallel slices")
        return size, [(0, 0, size)]

    # ---- optional fused form: the moments and u never materialised -------------------------
    # A rule whose device has a fused kernel may step fragments from (w, g, m, v) directly:
    # phase 1 computes the statistics without writing anything, phase 3 recomputes and writes
    # w, m, v of the fragments not skipped. No partition-sized scratch buffer is needed.
    def fused_available(self, flat: Tensor, grad: Tensor, state: dict, group: dict) -> bool:
        """Whether :meth:`fused_statistics` / :meth:`fused_apply` serve this partition."""
        return False

    def fused_statistics(self, shape, start, w, g, m, v, group: dict, step: int, slot: Tensor) -> bool:
        """Phase 1 of the fused form; returns whether some gradient element is not finite."""
        raise NotImplementedError

    def fused_apply(self, shape, start, w, g, m, v, group: dict, step: int, slot: Tensor, lr: float,
                    track: bool = False):
        """Phase 3 of the fused form: ``w``, ``m``, ``v`` updated in place; with ``track``,
        returns the fragment's :class:`~merit_ds.optim.trust_stats.PartialTrustStats`."""
        raise NotImplementedError
