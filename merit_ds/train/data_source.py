"""The training loop's only door to the data: token-block loaders for train and validation.

The loader itself is :class:`merit_ds.data.sampler.TokenBlockLoader` (deterministic global
block order, rank-partitioned, checkpointable by the number of blocks consumed).
:func:`merit_ds.data.integrity.check_token_data` verifies every shard (sha256 against the
manifest, largest id against the model's vocabulary) once at start-up, shards divided among ranks.
"""

from __future__ import annotations

__all__ = ["make_train_loader", "make_val_loader", "ValidationSet", "DEFAULT_EVAL_SEQUENCES", "check_token_data",
           "DataError"]

from merit_ds.data.errors import DataError
from merit_ds.data.integrity import check_token_data  # noqa: F401  (checksums + vocabulary, before training)
from merit_ds.data.sampler import TokenBlockLoader
from merit_ds.data.shards import TokenShards, open_split

import numpy as np
import torch

# Validation blocks when --eval-sequences is not given: a fixed number, not a function of the world
# size or micro-batch (it used to be 4 x micro x world, so val loss jumped when a run resumed on
# another world size). Capped at the blocks the val split holds.
DEFAULT_EVAL_SEQUENCES = 128


def make_train_loader(data_dir, *, seq_len: int, global_batch: int, micro_batch: int, rank: int, world: int,
                      seed: int = 0):
    return TokenBlockLoader(data_dir, block_size=seq_len, global_batch=global_batch, micro_batch=micro_batch,
                            rank=rank, world_size=world, split="train", seed=seed, shuffle=True)


class ValidationSet:
    """A fixed validation set: blocks ``0 .. blocks - 1`` of the val split (``blocks`` =
    ``min(eval_sequences, blocks in the split)``), unshuffled, each counted exactly once.

    Rank ``r`` of ``world`` evaluates the contiguous slice ``[r*blocks//world, (r+1)*blocks//world)``
    in micro-batches of at most ``micro_batch`` sequences (the last one may be shorter; a rank may
    have none when ``world > blocks``). The set, and so the loss (token-weighted mean over all of
    it), does not depend on the world size or the micro-batch: only the order of float additions
    does. Nothing wraps: asking for more blocks than the split holds evaluates the whole split
    once (:attr:`capped` says so)."""

    def __init__(self, data, *, seq_len: int, eval_sequences: int, micro_batch: int, rank: int = 0, world: int = 1):
        if eval_sequences < 1 or micro_batch < 1 or not 0 <= rank < world:
            raise DataError(f"need eval_sequences >= 1, micro_batch >= 1, 0 <= rank < world; got "
                            f"{eval_sequences}, {micro_batch}, {rank}, {world}")
        self.tokens: TokenShards = data if isinstance(data, TokenShards) else open_split(data, "val")
        self.seq_len, self.micro_batch, self.rank, self.world = int(seq_len), int(micro_batch), int(rank), int(world)
        available = (len(self.tokens) - 1) // self.seq_len
        if available < 1:
            raise DataError(f"the val split holds {len(self.tokens)} tokens: not one block of {seq_len + 1}")
        self.requested = int(eval_sequences)
        self.blocks = min(self.requested, available)
        self.capped = self.blocks < self.requested
        self.first, self.stop = rank * self.blocks // world, (rank + 1) * self.blocks // world

    def block_ids(self) -> list:
        """This rank's block ids, each micro-batch a numpy array."""
        ids = np.arange(self.first, self.stop, dtype=np.int64)
        return [ids[i:i + self.micro_batch] for i in range(0, len(ids), self.micro_batch)]

    def batches(self):
        """This rank's micro-batches ``(x, y)`` (int64, shape ``(n <= micro_batch, seq_len)``)."""
        T = self.seq_len
        for ids in self.block_ids():
            rows = np.stack([self.tokens.read(int(b) * T, T + 1) for b in ids]).astype(np.int64)
            xy = torch.from_numpy(rows)
            yield xy[:, :-1], xy[:, 1:]

    def describe(self) -> str:
        note = f" (asked for {self.requested}: the val split holds only {self.blocks})" if self.capped else ""
        return f"validation: {self.blocks} fixed blocks of {self.seq_len} tokens{note}"


def make_val_loader(data_dir, *, seq_len: int, eval_sequences: int, micro_batch: int, rank: int, world: int):
    """The fixed validation set (:class:`ValidationSet`)."""
    return ValidationSet(data_dir, seq_len=seq_len, eval_sequences=eval_sequences, micro_batch=micro_batch,
                         rank=rank, world=world)
