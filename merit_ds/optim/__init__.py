"""The math layer: MERIT's and LAMB's formulas and optimizers, and the fragment rules the
sharding layer runs them with. Never imports torch.distributed."""

from .base import ShardableOptimizer
from .fragment_rule import FragmentRule
from .lamb import LAMB, lamb
from .merit import MERIT, MeritStats, merit
from .trust_stats import PartialTrustStats, merge_trust_stats, partial_trust_stats, summarize_trust_stats

__all__ = [
    "MERIT",
    "MeritStats",
    "merit",
    "LAMB",
    "lamb",
    "ShardableOptimizer",
    "FragmentRule",
    "PartialTrustStats",
    "merge_trust_stats",
    "partial_trust_stats",
    "summarize_trust_stats",
]
