"""The math layer: MERIT's formulas and the optimizer. Never imports torch.distributed."""

from .merit import MERIT, MeritStats, merit

__all__ = ["MERIT", "MeritStats", "merit"]
