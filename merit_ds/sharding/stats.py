"""MERIT's trust-ratio summary over all ranks: five scalars per rank, one ``all_gather``.

The sharded step (:mod:`.step`) leaves on each rank, when ``track_stats`` is on, a
:class:`~merit_ds.optim.trust_stats.PartialTrustStats` per parameter fragment it owns;
unsharded MERIT leaves one per parameter. :func:`reduce_trust_stats` merges this rank's
entries, gathers every rank's five numbers and merges those (the pure
:func:`~merit_ds.optim.trust_stats.merge_trust_stats`: sums, min, max)::

    rank r:  partial_stats {(flat, i): P_ri}  --merge-->  [count, sum, min, max, clipped]_r
    all_gather over the group  -->  merge over r  -->  min / mean / max of s, clip fraction

Called on diagnostics steps only, by every rank of the group, outside ``step()`` (whose one
collective stays the statistics ``all_reduce(MAX)``). No matrix ever travels.

Without ZeRO every rank holds the same (replicated) statistics; gathering them counts every
element ``world`` times, which leaves min, max and both fractions unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from merit_ds.optim.trust_stats import PartialTrustStats, merge_trust_stats, summarize_trust_stats

from . import collective

__all__ = ["reduce_trust_stats", "local_trust_stats"]


def local_trust_stats(optimizer) -> PartialTrustStats:
    """This rank's statistics: the merge of ``optimizer.partial_stats`` (no communication)."""
    return merge_trust_stats(getattr(optimizer, "partial_stats", {}).values())


def _pack(stats: PartialTrustStats) -> torch.Tensor:
    # float64 holds the integer counts exactly (< 2**53) and the float32/64 extremes bit for bit
    return torch.stack([t.to(device="cpu", dtype=torch.float64) for t in stats])


def _unpack(packed: torch.Tensor) -> PartialTrustStats:
    count, ratio_sum, lo, hi, clipped = packed.unbind()
    return PartialTrustStats(count.to(torch.int64), ratio_sum, lo, hi, clipped.to(torch.int64))


def _all_gather(packed: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's packed statistics (one ``all_gather`` of 5 floats per rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [packed]
    device = collective.collective_device(group)
    local = packed.to(device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return [t.cpu() for t in out]


def reduce_trust_stats(optimizer, process_group=None) -> Optional[dict]:
    """Trust-ratio summary of the optimizer's last tracked step over all elements and ranks.

    Returns ``{"trust_ratio_min", "trust_ratio_mean", "trust_ratio_max", "clip_fraction"}``
    (Python floats; ``None`` if no element was tracked on any rank). ``process_group``: the
    group the partitions are spread over (the data-parallel group; default: the world).
    A collective when ``torch.distributed`` is initialised: every rank of the group calls it.
    """
    gathered = _all_gather(_pack(local_trust_stats(optimizer)), process_group)
    return summarize_trust_stats(merge_trust_stats(_unpack(t) for t in gathered))
