"""MERIT's :class:`~merit_ds.optim.fragment_rule.FragmentRule`: its math on fragments.

Statistics of a parameter (``float32``; maxima are exact, reduced with MAX)::

    matrix (R, C, *rest), K = prod(rest):  [ row|w| R*K | row|u| R*K | col|w| C*K | col|u| C*K ]
    vector (or 0-d):                       [ max|w| | max|u| ]

A matrix's tensor maxima are the maxima of its reduced row maxima (exactly), so they take
no entries. Every number comes from :mod:`merit_ds.optim.formulas`, the same functions the
single-device paths use, on views of the partition: the sharded update equals single-device
MERIT bit for bit in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import formulas as F
from .fragment_rule import FragmentRule, Recorder
from .implementation import resolve_implementation

__all__ = ["MeritFragmentRule"]


def _matrix_slots(slot: Tensor, rows: int, cols: int, inner: int):
    r, c = rows * inner, cols * inner
    return slot.narrow(0, 0, r), slot.narrow(0, r, r), slot.narrow(0, 2 * r, c), slot.narrow(0, 2 * r + c, c)


class MeritFragmentRule(FragmentRule):
    name = "MERIT"
    reduce_op = "max"
    stats_dtype = torch.float32
    skip_unit = "parameter"
    clips = True

    def stats_size(self, shape) -> int:
        return F.stats_size(shape)

    def direction(self, m, v, w, group, step, out):
        return F.update_direction(m, v, w, group["eps"], group["weight_decay"], out=out)

    def fragment_statistics(self, shape, start, w, u, slot) -> None:
        if F.is_matrix(shape):
            rows, cols, inner = F.matrix_dims(shape)
            row_w, row_u, col_w, col_u = _matrix_slots(slot, rows, cols, inner)
            F.fragment_maxima_(w, start, cols, inner, row_w, col_w)
            F.fragment_maxima_(u, start, cols, inner, row_u, col_u)
        else:
            torch.maximum(slot, torch.stack([F.tensor_max(w), F.tensor_max(u)]), out=slot)

    def column_split_slots(self, shape, col_offset, full_cols):
        # [ row|w| R*K | row|u| R*K | col|w| C*K | col|u| C*K ]: rows stay (every TP rank holds
        # a piece of every row); this slice's columns go to their place among full_cols.
        rows, cols, inner = F.matrix_dims(shape)
        r, c, whole = rows * inner, cols * inner, full_cols * inner
        at = col_offset * inner
        size = 2 * r + 2 * whole
        return size, [(0, 0, 2 * r), (2 * r, 2 * r + at, c), (2 * r + c, 2 * r + whole + at, c)]

    # The fused form: MERIT's two-pass CPU kernel (merit_ds.optim.cpu_kernel), chosen by the
    # group's ``implementation`` exactly as on one device.
    def fused_available(self, flat, grad, state, group) -> bool:
        impl = resolve_implementation(group.get("implementation"), [flat], [grad], [state["exp_avg"]],
                                      [state["exp_avg_sq"]])
        return impl == "cpu_kernel"

    def fused_statistics(self, shape, start, w, g, m, v, group, step, slot) -> bool:
        from . import cpu_kernel

        return cpu_kernel.fragment_statistics(shape, start, w, g, m, v, group, slot)

    def fused_apply(self, shape, start, w, g, m, v, group, step, slot, lr, track=False):
        from . import cpu_kernel

        return cpu_kernel.fragment_apply(shape, start, w, g, m, v, group, cpu_kernel.ratio_tables(shape, slot), lr, track)

    def apply_fragment(
        self, shape, start, w, u, slot, *, group, lr, work: Optional[Tensor], record: Recorder
    ) -> None:
        if not F.is_matrix(shape):
            trust = F.vector_trust_ratio(slot[0], slot[1])
            if record is not None:
                record(trust, u)
            F.apply_update_(w, u, trust, lr)
            return
        rows, cols, inner = F.matrix_dims(shape)
        row_w, row_u, col_w, col_u = _matrix_slots(slot, rows, cols, inner)
        # The tensor maxima are the maxima of the row maxima, exactly (as on one device).
        max_w, max_u = row_w.max(), row_u.max()
        row_len = cols * inner
        for pos, length, row, col0 in F.row_pieces(shape, start, w.numel()):
            wp, up = w.narrow(0, pos, length), u.narrow(0, pos, length)
            if col0 == 0 and length % row_len == 0:  # whole rows: broadcast like one device
                n = length // row_len
                shape3 = (n, cols, inner)
                out = None if work is None else work.narrow(0, pos, length).view(shape3)
                trust = F.matrix_trust_ratio(
                    row_w.narrow(0, row * inner, n * inner).view(n, 1, inner),
                    row_u.narrow(0, row * inner, n * inner).view(n, 1, inner),
                    col_w.view(1, cols, inner),
                    col_u.view(1, cols, inner),
                    max_w,
                    max_u,
                    out=out,
                )
                if record is not None:
                    record(trust, up.view(shape3))
                F.apply_update_(wp.view(shape3), up.view(shape3), trust, lr)
            else:  # part of one row: per-element row/column maxima of the slice (all 1-D)
                if inner == 1:
                    rw, ru = row_w.narrow(0, row, 1), row_u.narrow(0, row, 1)
                else:
                    idx = torch.arange(col0, col0 + length, device=w.device) % inner + row * inner
                    rw, ru = row_w.index_select(0, idx), row_u.index_select(0, idx)
                trust = F.matrix_trust_ratio(
                    rw, ru, col_w.narrow(0, col0, length), col_u.narrow(0, col0, length), max_w, max_u
                )
                if record is not None:
                    record(trust, up)
                F.apply_update_(wp, up, trust, lr)
