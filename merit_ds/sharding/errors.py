"""Errors of the sharding layer."""


class ShardingLayoutError(RuntimeError):
    """MERIT was handed flat partitions whose layout it cannot determine.

    Raised instead of ever treating a flat partition as one vector (which would compute one
    trust ratio over a rank-dependent mix of parameters: silently wrong training).
    """
