"""The training loop's only door to the data: token-block loaders for train and validation.

The loader itself is :class:`merit_ds.data.sampler.TokenBlockLoader` (deterministic global
block order, rank-partitioned, checkpointable by the number of blocks consumed).
:func:`merit_ds.data.integrity.check_token_data` verifies every shard (sha256 against the
manifest, largest id against the model's vocabulary) once at start-up, shards divided among ranks.
"""

from __future__ import annotations

__all__ = ["make_train_loader", "make_val_loader", "check_token_data", "DataError"]

from merit_ds.data.errors import DataError
from merit_ds.data.integrity import check_token_data  # noqa: F401  (checksums + vocabulary, before training)
from merit_ds.data.sampler import TokenBlockLoader


def make_train_loader(data_dir, *, seq_len: int, global_batch: int, micro_batch: int, rank: int, world: int,
                      seed: int = 0):
    return TokenBlockLoader(data_dir, block_size=seq_len, global_batch=global_batch, micro_batch=micro_batch,
                            rank=rank, world_size=world, split="train", seed=seed, shuffle=True)


def make_val_loader(data_dir, *, seq_len: int, eval_sequences: int, micro_batch: int, rank: int, world: int):
    """Fixed validation set: the first ``eval_sequences`` blocks of the val split, unshuffled."""
    return TokenBlockLoader(data_dir, block_size=seq_len, global_batch=eval_sequences, micro_batch=micro_batch,
                            rank=rank, world_size=world, split="val", seed=0, shuffle=False)
