"""Interim stand-in for merit_ds.data's loader (same interface and block order); removed on merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    pass


class TokenBlockLoader:
    def __init__(self, data, *, block_size, global_batch, micro_batch=None, rank=0, world_size=1, split="train",
                 seed=0, shuffle=True):
        p = Path(data)
        f = p / f"{split}.bin" if p.is_dir() else p
        if not f.exists():
            raise DataError(f"token data not found: {f}")
        self.tokens = np.memmap(f, dtype=np.uint16, mode="r")
        if global_batch % world_size:
            raise DataError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
        per_rank = global_batch // world_size
        self.micro_batch = micro_batch or per_rank
        if per_rank % self.micro_batch:
            raise DataError(f"global_batch / world_size = {per_rank} is not divisible by micro_batch {micro_batch}")
        self.block_size, self.global_batch, self.rank, self.world_size = block_size, global_batch, rank, world_size
        self.grad_accum = per_rank // self.micro_batch
        self.num_blocks = (len(self.tokens) - 1) // block_size
        if self.num_blocks < 1:
            raise DataError("no complete block: the split is shorter than block_size + 1 tokens")
        self.seed, self.shuffle, self.split = seed, shuffle, split
        self.fingerprint = f"bin:{f.resolve()}:{len(self.tokens)}"
        self.consumed = self.micro_step = 0

    def _perm(self, epoch):
        perm = np.arange(self.num_blocks)
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(perm)
        return perm

    def block_ids(self, start, micro_step):
        first = start + self.rank * (self.global_batch // self.world_size) + micro_step * self.micro_batch
        return np.array([self._perm(j // self.num_blocks)[j % self.num_blocks]
                         for j in range(first, first + self.micro_batch)])

    def blocks_to_tensors(self, ids):
        T = self.block_size
        rows = np.stack([np.asarray(self.tokens[b * T: b * T + T + 1]) for b in ids]).astype(np.int64)
        xy = torch.from_numpy(rows)
        return xy[:, :-1], xy[:, 1:]

    def get_batch(self, step, micro_step=0):
        return self.blocks_to_tensors(self.block_ids(step * self.global_batch, micro_step))

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.blocks_to_tensors(self.block_ids(self.consumed, self.micro_step))
        self.micro_step += 1
        if self.micro_step == self.grad_accum:
            self.micro_step, self.consumed = 0, self.consumed + self.global_batch
        return batch

    def state_dict(self):
        return {"consumed": self.consumed, "micro_step": self.micro_step, "data": self.fingerprint,
                "seed": self.seed, "block_size": self.block_size}

    def load_state_dict(self, state):
        for key, mine in (("data", self.fingerprint), ("seed", self.seed), ("block_size", self.block_size)):
            if state[key] != mine:
                raise DataError(f"loader state was saved with {key}={state[key]!r}, this loader has {mine!r}")
        self.consumed, self.micro_step = state["consumed"], state["micro_step"]
