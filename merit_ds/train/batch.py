"""Batch arithmetic: micro_batch x grad_accum x data-parallel world = global batch.

    tokens per step = global batch (sequences) x sequence length
    steps           = ceil(token budget / tokens per step)   (the budget is reached, never cut)

    48e9 tokens at 6144 x 1024 (6,291,456 tokens/step):  7,630 steps
    48e9 tokens at  480 x 1024 (  491,520 tokens/step): 97,657 steps

Impossible combinations raise :class:`BatchConfigError` (a ``ValueError``) saying what to change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

__all__ = ["BatchConfigError", "BatchPlan", "plan_batch", "divisors"]


class BatchConfigError(ValueError):
    """A batch/world/token-budget combination that cannot be trained."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int      # sequences per optimizer step
    micro_batch: int       # sequences per forward/backward per rank
    grad_accum: int        # micro-batches per rank per optimizer step
    world: int             # data-parallel ranks
    seq_len: int
    steps: int             # optimizer steps
    token_budget: Optional[int]

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    def describe(self) -> str:
        lines = [
            f"batch: micro_batch {self.micro_batch} x grad_accum {self.grad_accum} x world {self.world}"
            f" = global batch {self.global_batch:,} sequences",
            f"       {self.global_batch:,} x seq_len {self.seq_len} = {self.tokens_per_step:,} tokens/step",
        ]
        if self.token_budget is not None:
            lines.append(f"       ceil({self.token_budget:,} tokens / {self.tokens_per_step:,}) = {self.steps:,} steps"
                         f" ({self.total_tokens:,} tokens)")
        else:
            lines.append(f"       {self.steps:,} steps x {self.tokens_per_step:,} = {self.total_tokens:,} tokens")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_step"] = self.tokens_per_step
        d["total_tokens"] = self.total_tokens
        return d


def _nearest_multiples(value: int, unit: int) -> str:
    lo = (value // unit) * unit
    hi = lo + unit
    return ", ".join(str(x) for x in (lo, hi) if x > 0)


def plan_batch(global_batch: int, world: int, seq_len: int, *, micro_batch: Optional[int] = None,
               grad_accum: Optional[int] = None, token_budget: Optional[int] = None,
               max_steps: Optional[int] = None) -> BatchPlan:
    """Resolve micro-batch / grad-accum for a global batch on ``world`` data-parallel ranks.

    Give ``micro_batch`` (grad_accum derived), ``grad_accum`` (micro derived), both (checked),
    or neither (micro = per-rank batch, grad_accum 1). Give ``token_budget`` or ``max_steps``.
    """
    for name, v in (("global batch", global_batch), ("world size", world), ("sequence length", seq_len)):
        if not isinstance(v, int) or v <= 0:
            raise BatchConfigError(f"{name} must be a positive integer, got {v!r}")
    if global_batch % world:
        raise BatchConfigError(
            f"global batch {global_batch} sequences is not divisible by the data-parallel world size {world}: "
            f"every rank must get the same number of sequences. Use a global batch that is a multiple of "
            f"{world} (nearest: {_nearest_multiples(global_batch, world)}) or a world size dividing {global_batch} "
            f"(e.g. {', '.join(str(d) for d in divisors(global_batch) if d > 1)[:80]}).")
    per_rank = global_batch // world
    if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch <= 0):
        raise BatchConfigError(f"micro batch must be a positive integer, got {micro_batch!r}")
    if grad_accum is not None and (not isinstance(grad_accum, int) or grad_accum <= 0):
        raise BatchConfigError(f"grad_accum must be a positive integer, got {grad_accum!r}")
    if micro_batch is None and grad_accum is None:
        micro_batch, grad_accum = per_rank, 1
    elif micro_batch is None:
        if per_rank % grad_accum:
            raise BatchConfigError(
                f"{per_rank} sequences per rank (global {global_batch} / world {world}) is not divisible by "
                f"grad_accum {grad_accum}; valid grad_accum: {divisors(per_rank)}")
        micro_batch = per_rank // grad_accum
    elif grad_accum is None:
        if per_rank % micro_batch:
            raise BatchConfigError(
                f"{per_rank} sequences per rank (global {global_batch} / world {world}) is not divisible by "
                f"micro batch {micro_batch}; valid micro batches: {divisors(per_rank)}")
        grad_accum = per_rank // micro_batch
    elif micro_batch * grad_accum * world != global_batch:
        raise BatchConfigError(
            f"micro batch {micro_batch} x grad_accum {grad_accum} x world {world} = "
            f"{micro_batch * grad_accum * world}, not the global batch {global_batch}")

    tokens_per_step = global_batch * seq_len
    if (token_budget is None) == (max_steps is None):
        raise BatchConfigError("give exactly one of a token budget or a number of steps")
    if token_budget is not None:
        if token_budget < tokens_per_step:
            raise BatchConfigError(
                f"token budget {token_budget:,} is smaller than one optimizer step "
                f"({global_batch} sequences x {seq_len} tokens = {tokens_per_step:,} tokens): "
                f"raise the budget or lower the global batch")
        steps = math.ceil(token_budget / tokens_per_step)
    else:
        if not isinstance(max_steps, int) or max_steps <= 0:
            raise BatchConfigError(f"steps must be a positive integer, got {max_steps!r}")
        steps = max_steps
    return BatchPlan(global_batch, micro_batch, grad_accum, world, seq_len, steps, token_budget)
