"""Tensor parallelism in the statistics buffer: where a rank's slice of a split matrix puts
its partial statistics so that ONE all-reduce over the data- x tensor-parallel ranks yields
the whole matrix's statistics on every rank.

Pure arithmetic (no collectives, no framework): the adapter
:mod:`merit_ds.sharding.tensor_parallel` learns from DeepSpeed AutoTP or Megatron which
parameters are split, along which dimension and where this rank's slice starts, and calls
the two functions below.

Tensor parallelism cuts a matrix ``W (R, C)`` into slices, one per TP rank::

    column-parallel (split dim 0: q/k/v, gate/up, lm_head)    row-parallel (split dim 1: o, down)

        TP rank 0  [ rows 0 .. r1       ]                       TP 0      TP 1
        TP rank 1  [ rows r1 .. R       ]                     [ cols    | cols    ]
                                                              [ 0 .. c1 | c1 .. C ]

A slice's row maxima are whole rows' maxima under a column-parallel split (each row lies on
one TP rank) and partial under a row-parallel one; its column maxima the other way round.
Two placements make the all-reduce exact (MAX of maxima, SUM of sums: both combine over
disjoint pieces):

1. **Split along dim 0: the slice *is* rows ``[offset, offset + R_local)`` of the whole
   matrix**, contiguous in row-major order. :func:`globalize_rows` rewrites the layout so
   that the parameter has the whole matrix's shape and every fragment starts
   ``offset * C * K`` later. The statistics slot is then the whole matrix's: the slice writes
   its own rows, the other TP ranks' rows stay 0, its column maxima meet the other ranks'
   in the same entries. Nothing else changes: every step form (per fragment, CPU kernel,
   Triton) sees an ordinary fragment of a larger matrix, and the tensor maxima (the maxima of
   the row maxima) come out whole.
2. **Split along dim 1: the slice's column statistics move to their place in the whole
   matrix's slot** (:func:`exchange_plan`: an index from the local buffer into a larger
   buffer that is reduced instead). Its row statistics stay where they are: every TP rank
   holds a piece of every row, so the same entries must meet.

A parameter that is not split (embeddings, norms, a row-parallel bias) is the same on every
TP rank. Under MAX its statistics may meet themselves; under SUM they would be counted once
per TP rank, so only TP rank 0 contributes them (:attr:`StatsExchange.silent`).

Where a framework orders the slices differently (DeepSpeed AutoTP cuts fused q/k/v weights
per sub-parameter, so a rank's rows are not one contiguous block of the original matrix),
the placement is still exact: MERIT's ratios depend on an element's row, its column and the
whole matrix, not on the order of rows or columns, and sums do not depend on order at all.
Only the slices' sizes must be right, and disjoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .layout import Fragment, PartitionLayout, StatsLayout, _build, stats_layout

__all__ = ["TensorSplit", "globalize_rows", "full_shapes", "StatsExchange", "exchange_plan"]


@dataclass(frozen=True)
class TensorSplit:
    """How a parameter is split across the tensor-parallel group, seen from one TP rank.

    ``dim``: the split dimension (0 or 1); ``offset``: where this rank's slice starts along
    it; ``full``: the whole extent along it (the sum of every TP rank's slice).
    """

    dim: int
    offset: int
    full: int

    def __post_init__(self):
        if self.dim not in (0, 1):
            raise ValueError(f"tensor-parallel split along dim {self.dim}: only 0 and 1 are supported")
        if not (0 <= self.offset < self.full):
            raise ValueError(f"slice offset {self.offset} outside the split dimension's {self.full}")


def full_shapes(shapes: Sequence[Sequence[int]], splits: Sequence[Optional[TensorSplit]]) -> list[tuple[int, ...]]:
    """The whole (unsplit) shape of every parameter."""
    out = []
    for shape, split in zip(shapes, splits):
        shape = tuple(int(d) for d in shape)
        if split is not None:
            if split.dim >= len(shape):
                raise ValueError(f"a {len(shape)}-d parameter {shape} cannot be split along dim {split.dim}")
            if split.offset + shape[split.dim] > split.full:
                raise ValueError(f"slice {shape} at offset {split.offset} exceeds the split extent {split.full}")
            shape = shape[: split.dim] + (split.full,) + shape[split.dim + 1 :]
        out.append(shape)
    return out


def globalize_rows(layout: PartitionLayout, splits: Sequence[Optional[TensorSplit]]) -> PartitionLayout:
    """``layout`` with every dim-0-split parameter given its whole shape and its fragments
    moved to the slice's rows (placement 1 of the module docstring). Other parameters are
    unchanged. ``splits[i]``: parameter ``i``'s split (``None``: not split)."""
    if len(splits) != len(layout.shapes):
        raise ValueError(f"{len(splits)} splits for {len(layout.shapes)} parameters")
    whole = full_shapes(layout.shapes, splits)
    shapes = [w if s is not None and s.dim == 0 else tuple(local) for w, s, local in zip(whole, splits, layout.shapes)]
    frags = []
    for f in layout.fragments:
        split = splits[f.param_index]
        if split is not None and split.dim == 0:
            row_numel = math.prod(f.shape[1:])
            f = Fragment(f.param_index, shapes[f.param_index], f.param_start + split.offset * row_numel, f.numel,
                         f.partition_offset)
        frags.append(f)
    return _build(shapes, frags, layout.partition_numel)


@dataclass(frozen=True)
class StatsExchange:
    """Where each entry of one group's local statistics buffer goes in the buffer that is
    all-reduced (``to_global[i]``: the position of local entry ``i``; injective), how long that
    buffer is, and which local entries contribute zeros (``silent``: a replicated parameter's
    sums on TP ranks other than 0)."""

    to_global: torch.Tensor  # int64, one per local entry
    global_numel: int
    silent: torch.Tensor  # int64 local indices (may be empty)


def exchange_plan(
    local: StatsLayout,
    splits: Sequence[Optional[TensorSplit]],
    rule,
    *,
    tp_rank: int,
) -> StatsExchange:
    """The :class:`StatsExchange` of a group whose local statistics layout is ``local`` (built
    from :func:`globalize_rows`'s shapes: dim-0 slices already whole).

    Dim-1 slices get their whole matrix's slot from ``rule.column_split_slots`` (the rule
    knows which of its entries index columns); everything else keeps its slot's size.
    Flags keep their order after the slots.
    """
    if len(splits) != len(local.slots):
        raise ValueError(f"{len(splits)} splits for {len(local.slots)} parameters")
    index = torch.empty(local.buffer_numel, dtype=torch.int64)
    silent = []
    base = 0
    silence = rule.reduce_op == "sum" and tp_rank != 0
    for slot, split in zip(local.slots, splits):
        if split is not None and split.dim == 1:
            size, segments = rule.column_split_slots(slot.shape, split.offset, split.full)
        else:
            size, segments = slot.size, [(0, 0, slot.size)]
            if split is None and silence:
                silent.extend(range(slot.offset, slot.offset + slot.size))
        covered = 0
        for lo, go, n in segments:
            if not (0 <= lo and lo + n <= slot.size and 0 <= go and go + n <= size):
                raise ValueError(f"{rule.name}: column segment {(lo, go, n)} outside slot {slot.size} -> {size}")
            index[slot.offset + lo : slot.offset + lo + n] = torch.arange(base + go, base + go + n)
            covered += n
        if covered != slot.size:
            raise ValueError(f"{rule.name}: column segments cover {covered} of {slot.size} entries")
        base += size
    flags = len(local.slots)
    index[local.buffer_numel - flags :] = torch.arange(base, base + flags)
    return StatsExchange(index, base + flags, torch.tensor(silent, dtype=torch.int64))


def combine(exchanges: Sequence[StatsExchange]) -> StatsExchange:
    """The exchanges of consecutive groups' buffers as one (one collective per step call)."""
    if len(exchanges) == 1:
        return exchanges[0]
    index, silent, local_base, global_base = [], [], 0, 0
    for ex in exchanges:
        index.append(ex.to_global + global_base)
        silent.append(ex.silent + local_base)
        local_base += ex.to_global.numel()
        global_base += ex.global_numel
    return StatsExchange(torch.cat(index), global_base, torch.cat(silent))


__all__.append("combine")
