"""The math layer: MERIT's and LAMB's formulas and optimizers, the fragment rules the sharding
layer runs them with, the partition layouts (pure arithmetic), and the optimizer registry.
Never imports torch.distributed, nor any other package of merit_ds."""

from . import registry
from .base import ShardableOptimizer
from .fragment_rule import FragmentRule
from .lamb import LAMB, lamb
from .merit import MERIT, merit
from .registry import register_optimizer
from .spec import OptimizerSpec, RecipeDefaults
from .trust_stats import MeritStats, PartialTrustStats, merge_trust_stats, partial_trust_stats, summarize_trust_stats

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
    "OptimizerSpec",
    "RecipeDefaults",
    "register_optimizer",
    "registry",
]
