"""Trust-ratio statistics that combine exactly across pieces of a tensor.

MERIT's diagnostics summarise the element-wise trust ratio s of a step (min / mean / max)
and the fraction of elements whose update s*u hit the [-1, 1] clip. Under ZeRO every rank
sees only fragments of each parameter, so a summary must be built from per-fragment
pieces. :class:`PartialTrustStats` is such a piece: five numbers whose combination over any
split of the elements is the statistic of the whole (sums add, minima take the min, maxima
the max)::

    rank 0: | W1 tail | b1 |        rank 1: | W2 ... | W3 head |
              p00       p01                   p10      p11

    merge_trust_stats([p00, p01, p10, p11])  ==  the statistics over all elements
      count, ratio_sum, clipped: summed      (count and clipped exact: integers)
      ratio_min, ratio_max:      min / max   (exact: the same floats as on one device)
      mean = ratio_sum / count               (float64 sum: order-dependent in the last bits)

The empty piece (a rank owning no element) is the identity: count 0, sum 0, min +inf,
max -inf, clipped 0. Pure math: no ``torch.distributed`` here; the cross-rank gather lives
in :mod:`merit_ds.sharding.stats`.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["PartialTrustStats", "partial_trust_stats", "merge_trust_stats", "summarize_trust_stats", "empty_trust_stats"]


class MeritStats(NamedTuple):
    """Per-parameter diagnostics of the last step (0-d tensors; read with ``float()``).

    ``clip_fraction``: fraction of elements where |s*u| > 1 (the update hit the clip).
    ``ratio_min/mean/max``: summary of the element-wise trust ratio s.
    """

    clip_fraction: Tensor
    ratio_min: Tensor
    ratio_mean: Tensor
    ratio_max: Tensor


class PartialTrustStats(NamedTuple):
    """Trust-ratio statistics over some elements of a step (0-d tensors).

    ``count``: number of elements (int64); ``ratio_sum``: sum of s (float64);
    ``ratio_min`` / ``ratio_max``: extremes of s (the ratio's dtype; float64 after a merge,
    which is exact); ``clipped``: number of elements with |s*u| > 1 (int64).
    """

    count: Tensor
    ratio_sum: Tensor
    ratio_min: Tensor
    ratio_max: Tensor
    clipped: Tensor

    def to_merit_stats(self):
        """The per-parameter :class:`~merit_ds.optim.MeritStats` view of these statistics
        (float32; clip fraction 0 and mean NaN over no element)."""
        n = self.count.double()
        f32 = torch.float32  # MeritStats are float32 whatever the parameter's dtype
        return MeritStats(
            clip_fraction=(self.clipped.double() / n).to(f32) if int(self.count) else self.ratio_min.new_zeros((), dtype=f32),
            ratio_min=self.ratio_min.to(f32),
            ratio_mean=(self.ratio_sum / n).to(f32),
            ratio_max=self.ratio_max.to(f32),
        )


def empty_trust_stats(device: Optional[torch.device] = None) -> PartialTrustStats:
    """The identity of :func:`merge_trust_stats` (statistics over no element)."""
    kw = dict(device=device)
    return PartialTrustStats(
        torch.zeros((), dtype=torch.int64, **kw),
        torch.zeros((), dtype=torch.float64, **kw),
        torch.full((), math.inf, dtype=torch.float64, **kw),
        torch.full((), -math.inf, dtype=torch.float64, **kw),
        torch.zeros((), dtype=torch.int64, **kw),
    )


def partial_trust_stats(trust: Tensor, u: Tensor, *, clipping: bool = True) -> PartialTrustStats:
    """Statistics of the elements of ``u`` under the trust ratio ``trust``.

    ``trust`` broadcasts to ``u`` (a scalar for vectors, full-size or a broadcast shape for
    matrices). Call it with the tensors the update uses, before
    :func:`~merit_ds.optim.formulas.apply_update_` overwrites ``u``: ``|trust * u| > 1`` is
    then exactly the set of elements the update clips. ``clipping=False`` for an optimizer
    whose update is not clipped (LAMB): ``clipped`` is then 0.
    """
    n = u.numel()
    if n == 0:
        return empty_trust_stats(u.device)
    if clipping:
        clipped = torch.count_nonzero((u * trust).abs_() > 1)
    else:
        clipped = torch.zeros((), dtype=torch.int64, device=u.device)
    if trust.numel() == n:
        ratio_sum = trust.sum(dtype=torch.float64)
    else:
        ratio_sum = trust.expand_as(u).sum(dtype=torch.float64)
    return PartialTrustStats(torch.tensor(n, dtype=torch.int64, device=u.device), ratio_sum, trust.min(), trust.max(), clipped)


def merge_trust_stats(parts: Iterable[PartialTrustStats]) -> PartialTrustStats:
    """Combine statistics over disjoint sets of elements into those of their union (exact
    for count, min, max and clipped; ``ratio_sum`` in float64)."""
    parts = list(parts)
    if not parts:
        return empty_trust_stats()
    device = parts[0].count.device
    col = lambda i, dtype: torch.stack([p[i].to(device=device, dtype=dtype) for p in parts])  # noqa: E731
    return PartialTrustStats(
        col(0, torch.int64).sum(),
        col(1, torch.float64).sum(),
        col(2, torch.float64).min(),
        col(3, torch.float64).max(),
        col(4, torch.int64).sum(),
    )


def summarize_trust_stats(stats: PartialTrustStats) -> Optional[dict]:
    """``{"trust_ratio_min", "trust_ratio_mean", "trust_ratio_max", "clip_fraction"}`` as
    Python floats, or ``None`` when the statistics cover no element."""
    n = int(stats.count)
    if n == 0:
        return None
    return {
        "trust_ratio_min": float(stats.ratio_min),
        "trust_ratio_mean": float(stats.ratio_sum) / n,
        "trust_ratio_max": float(stats.ratio_max),
        "clip_fraction": int(stats.clipped) / n,
    }
