"""Errors raised by the data layer.

Every message names the file (or directory) at fault, so that a user preparing
tens of billions of tokens knows what to fix without reading a traceback.
"""


class DataError(ValueError):
    """Bad or missing input data, a corrupt shard or manifest, or a mismatched state."""


class CorruptDataError(DataError):
    """A prepared file (shard, manifest, progress journal) is not what it claims to be."""


class EmptyCorpusError(DataError):
    """The corpus (or one of its files) holds no documents."""
