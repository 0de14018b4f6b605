"""The math layer: MERIT's formulas and the optimizer. Never imports torch.distributed."""

from .merit import MERIT, MeritStats, merit
from .trust_stats import PartialTrustStats, merge_trust_stats, partial_trust_stats, summarize_trust_stats

__all__ = ["MERIT", "MeritStats", "merit", "PartialTrustStats", "merge_trust_stats", "partial_trust_stats", "summarize_trust_stats"]
