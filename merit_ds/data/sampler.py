"""Fixed-length blocks for training: deterministic, rank-partitioned, exactly resumable.

Blocks. A split of N tokens holds ``num_blocks = (N - 1) // T`` non-overlapping
blocks; block b is tokens ``[b*T, b*T + T + 1)`` (one extra token for the shifted
target), so x = block[:-1], y = block[1:]. Every token but the tail is used once
per epoch.

Global order. The blocks of epoch e are a permutation of range(num_blocks) drawn
from ``numpy.random.default_rng([seed, e])`` (identity when ``shuffle=False``).
Epochs are concatenated into one infinite global sequence; the sampler's whole
state is ``consumed``: how many blocks of that sequence earlier steps took.

Step, ranks, micro-batches. A step takes the next B (global batch) blocks;
rank r of w takes its contiguous slice, cut into micro-batches::

    global sequence:  ... | consumed ......................... consumed+B | ...
    ranks (w=2):            [ rank 0: B/2 blocks ][ rank 1: B/2 blocks ]
    micro-batches (m):      [m0 ][m1 ][m2 ]        [m0 ][m1 ][m2 ]

so no two ranks see the same block in a step, and
``micro_batch * T * grad_accum * world = B * T`` tokens per step.

Resume. ``consumed`` is counted in global blocks, independent of the world size
and of the micro-batch: a checkpoint taken after step k resumes at block k*B of
the same global order on any number of ranks. If the global batch changes too,
the run continues at the same block (nothing repeated or skipped); only the
grouping of later blocks into steps differs. The block size, seed, shuffle flag
and data must not change (checked: :class:`DataError`).
"""
from __future__ import annotations


import numpy as np
import torch

from .errors import DataError
from .shards import TokenShards, open_split

STATE_VERSION = 1


class BlockOrder:
    """The infinite global sequence of block ids: epoch permutations, concatenated."""

    def __init__(self, num_blocks: int, seed: int = 0, shuffle: bool = True):
        if num_blocks < 1:
            raise DataError("no complete block: the split is shorter than block_size + 1 tokens")
        self.num_blocks, self.seed, self.shuffle = int(num_blocks), int(seed), bool(shuffle)
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            dtype = np.int32 if self.num_blocks < 2**31 else np.int64  # 47M blocks -> 188 MB
            perm = np.arange(self.num_blocks, dtype=dtype)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(perm)
            self._epoch, self._perm = epoch, perm
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        """Block ids at global positions [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.num_blocks)
            n = min(count - done, self.num_blocks - offset)
            out[done:done + n] = self.permutation(epoch)[offset:offset + n]
            done += n
        return out


class TokenBlockLoader:
    """Iterator of this rank's micro-batches ``(x, y)``: int64 tensors of shape (micro_batch, block_size).

    Args:
        data: a prepared directory, nanoGPT directory / .bin file, or a :class:`TokenShards`.
        block_size: T, tokens per sequence.
        global_batch: B, sequences per optimizer step over all ranks.
        micro_batch: sequences per forward pass on one rank (default B / world_size: no accumulation).
        rank, world_size: this process's data-parallel coordinates.
        split: 'train' or 'val'.
        seed, shuffle: the global order (see module docstring).
        device: where tensors go (pinned + non_blocking for CUDA).

    Each ``next()`` returns the next micro-batch; after ``grad_accum`` of them the
    step is complete and ``consumed`` advances by B. Use it directly from a plain
    loop or under Accelerate/DeepSpeed, but do not pass it through
    ``accelerator.prepare``: it is already partitioned by rank.
    """

    def __init__(self, data, *, block_size: int, global_batch: int, micro_batch: int | None = None,
                 rank: int = 0, world_size: int = 1, split: str = "train", seed: int = 0,
                 shuffle: bool = True, device: str | torch.device | None = None, verify: bool = False):
        if block_size < 1 or global_batch < 1:
            raise DataError(f"block_size and global_batch must be >= 1, got {block_size}, {global_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if global_batch % world_size:
            raise DataError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
        per_rank = global_batch // world_size
        micro_batch = per_rank if micro_batch is None else micro_batch
        if micro_batch < 1 or per_rank % micro_batch:
            raise DataError(f"global_batch / world_size = {per_rank} is not divisible by micro_batch {micro_batch}")
        self.tokens: TokenShards = data if isinstance(data, TokenShards) else open_split(data, split, verify)
        self.block_size, self.global_batch, self.micro_batch = int(block_size), int(global_batch), int(micro_batch)
        self.rank, self.world_size, self.split = int(rank), int(world_size), split
        self.grad_accum = per_rank // micro_batch
        self.num_blocks = (len(self.tokens) - 1) // self.block_size
        self.order = BlockOrder(self.num_blocks, seed, shuffle)
        self.device = torch.device(device) if device is not None else None
        self.consumed = 0      # global blocks taken by completed steps
        self.micro_step = 0    # micro-batches of the current step already returned on this rank

    def set_global_batch(self, global_batch: int) -> None:
        """Change the global batch between two steps (a batch-size schedule): the micro-batch stays,
        ``grad_accum`` follows. The global sequence continues at ``consumed`` unchanged, so the next
        step takes the next ``global_batch`` blocks: nothing repeated, nothing skipped."""
        if self.micro_step:
            raise DataError(f"global batch changed in the middle of a step (micro_step {self.micro_step}): "
                            f"change it only between steps")
        if global_batch < 1 or global_batch % (self.micro_batch * self.world_size):
            raise DataError(f"global_batch {global_batch} is not a multiple of micro_batch {self.micro_batch} x "
                            f"world_size {self.world_size}")
        self.global_batch = int(global_batch)
        self.grad_accum = global_batch // (self.micro_batch * self.world_size)

    # --- sizes -------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Whole steps per epoch (an epoch's last partial step continues into the next epoch)."""
        return self.num_blocks // self.global_batch

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_blocks

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.block_size

    # --- random access -----------------------------------------------------------------------
    def block_ids(self, start: int, micro_step: int, order: BlockOrder | None = None) -> np.ndarray:
        """Global block ids of this rank's ``micro_step``-th micro-batch of the step starting at ``start``
        (``order``: another thread's copy of :attr:`order`, whose permutation cache is not thread-safe)."""
        first = start + self.rank * (self.global_batch // self.world_size) + micro_step * self.micro_batch
        return (order or self.order).take(first, self.micro_batch)

    def blocks_to_tensors(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        rows = np.stack([self.tokens.read(int(b) * T, T + 1) for b in ids]).astype(np.int64)
        xy = torch.from_numpy(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device is not None and self.device.type == "cuda":
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        elif self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def get_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Stateless: this rank's micro-batch for optimizer step ``step`` (global batch constant since step 0)."""
        if not 0 <= micro_step < self.grad_accum:
            raise IndexError(f"micro_step {micro_step} outside [0, {self.grad_accum})")
        return self.blocks_to_tensors(self.block_ids(step * self.global_batch, micro_step))

    # --- iteration ---------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.blocks_to_tensors(self.block_ids(self.consumed, self.micro_step))
        self.advance()
        return batch

    def advance(self) -> None:
        """Move the cursor past one micro-batch."""
        self.consumed, self.micro_step = self.position_after(self.consumed, self.micro_step)

    def position_after(self, consumed: int, micro_step: int) -> tuple[int, int]:
        """The cursor after the micro-batch at ``(consumed, micro_step)``: the next micro-step,
        or, after a step's last one, the next step (a global batch of sequences later)."""
        micro_step += 1
        if micro_step == self.grad_accum:
            return consumed + self.global_batch, 0
        return consumed, micro_step

    # --- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain-Python state for a checkpoint (same on every rank when saved at a step boundary)."""
        return {"version": STATE_VERSION, "consumed": self.consumed, "micro_step": self.micro_step,
                "num_blocks": self.num_blocks, "block_size": self.block_size, "seed": self.order.seed,
                "shuffle": self.order.shuffle, "data": self.tokens.fingerprint, "split": self.split,
                "global_batch": self.global_batch, "world_size": self.world_size, "micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off; see the module docstring for what may change."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"unknown loader state version {state.get('version')!r}")
        for key, mine in (("block_size", self.block_size), ("seed", self.order.seed),
                          ("shuffle", self.order.shuffle), ("num_blocks", self.num_blocks),
                          ("data", self.tokens.fingerprint), ("split", self.split)):
            if state[key] != mine:
                raise DataError(f"loader state was saved with {key}={state[key]!r}, this loader has {mine!r}: "
                                f"resuming would not continue the same block sequence")
        if state["micro_step"]:
            same = (state["global_batch"], state["world_size"], state["micro_batch"]) == (
                self.global_batch, self.world_size, self.micro_batch)
            if not same:
                raise DataError("loader state was saved in the middle of a step (micro_step "
                                f"{state['micro_step']}); resume it with the same global_batch, world_size "
                                "and micro_batch, or save at a step boundary")
        self.consumed, self.micro_step = int(state["consumed"]), int(state["micro_step"])
