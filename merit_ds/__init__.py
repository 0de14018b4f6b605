"""merit_ds: the MERIT optimizer, exact under DeepSpeed ZeRO, for large-batch LM training.

``from merit_ds import MERIT`` gives the optimizer.
"""

from .optim import MERIT, MeritStats, merit

__version__ = "0.1.0"
__all__ = ["MERIT", "MeritStats", "merit", "__version__"]
