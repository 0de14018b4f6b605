"""LAMB's :class:`~merit_ds.optim.fragment_rule.FragmentRule`: its math on fragments.

Statistics of a parameter, any shape (``float64``, reduced with SUM)::

    [ sum w^2 | sum u^2 ]

Each rank adds the sums of squares of the fragments it owns (squares rounded in fp32 as on
one device, accumulated in float64); after the ``all_reduce(SUM)`` every rank holds the
whole tensor's sums, equal to the single-device sums up to float64 summation order (~1e-16
relative), and computes the same ratio (:func:`~merit_ds.optim.lamb_formulas.lamb_trust_ratio`).
The direction ``u`` is element-wise and bitwise the single-device one.
"""

from __future__ import annotations

import torch

from . import lamb_formulas as L
from .fragment_rule import FragmentRule

__all__ = ["LambFragmentRule"]


class LambFragmentRule(FragmentRule):
    name = "LAMB"
    reduce_op = "sum"
    stats_dtype = torch.float64
    skip_unit = "group"  # one step count per flat partition: bias correction needs it

    def stats_size(self, shape) -> int:
        return 2

    def direction(self, m, v, w, group, step, out):
        beta1, beta2 = group["betas"]
        bc1, bc2_sqrt = L.bias_corrections(step, beta1, beta2, group["bias_correction"])
        return L.lamb_direction(m, v, w, group["eps"], group["weight_decay"], bc1, bc2_sqrt, out=out)

    def fragment_statistics(self, shape, start, w, u, slot) -> None:
        slot += torch.stack([L.sum_of_squares(w), L.sum_of_squares(u)]).to(slot.device)

    def apply_fragment(self, shape, start, w, u, slot, *, group, lr, work, record) -> None:
        ratio = L.lamb_trust_ratio(slot[0], slot[1], group["max_trust_ratio"], w.dtype)
        if record is not None:
            record(ratio, u)
        L.apply_scaled_update_(w, u, ratio, lr)
