"""Where each parameter of a group lies in one rank's flat partition, and the stats buffer.

Pure arithmetic (no collectives, no DeepSpeed), so it sits in the math layer, below both the
optimizers (whose one-device Triton path lays a group out as one-fragment partitions) and
:mod:`merit_ds.sharding`: the flavour adapters there (``zero12``, ``zero3``, ``bf16``) read
DeepSpeed's records and build a :class:`PartitionLayout` with the constructors below;
``merit_ds.sharding.step`` runs the optimizer's fragment rule on it.

ZeRO 1/2 and BF16_Optimizer flatten a whole param group and cut it into equal slices, one
per rank, anywhere -- also in the middle of a row::

    group flattened:   [ W1 (3x4) ......... | b1 (4) | W2 (2x5) ....... | pad ]
                         0                    12       16                 26..28
    world 2, 14 each:  [ rank 0: 0..14               )[ rank 1: 14..28             )

    rank 0 partition:  | W1 all 12 | b1[0:2] |         Fragment(W1, start 0,  n 12, at 0)
                                                       Fragment(b1, start 0,  n 2,  at 12)
    rank 1 partition:  | b1[2:4] | W2 all 10 | pad |   Fragment(b1, start 2,  n 2,  at 0)
                                                       Fragment(W2, start 0,  n 10, at 2)

ZeRO 3 cuts every parameter on its own into ``ceil(numel / world)`` pieces (the last rank
zero-padded) and concatenates this rank's pieces of a sub-group::

    W (3x3), world 2, 5 per rank:   rank 0: W.flat[0:5] = row 0, row 1[0:2]
                                    rank 1: W.flat[5:9] + 1 pad = row 1[2:3], row 2

A rank can own *no* element of a small parameter (``b (2,)`` at world 3: ranks 0, 1 own one
element each, rank 2 owns only padding). It still reserves that parameter's slots in the
statistics buffer (zeros) so that the buffer has the same layout on every rank.

The statistics buffer of a group (identical layout on every rank; dtype and per-parameter
size chosen by the optimizer's :class:`~merit_ds.optim.fragment_rule.FragmentRule`)::

    | param 0 stats | param 1 stats | ... | param P-1 stats | flag 0 | ... | flag P-1 |

    MERIT, matrix (R, C, *rest), K = prod(rest):  [ row|w| R*K | row|u| R*K | col|w| C*K | col|u| C*K ]
    MERIT, vector (or 0-d):                       [ max|w| | max|u| ]
    LAMB, any tensor:                             [ sum w^2 | sum u^2 ]   (float64)
    flag: 1.0 if this rank saw a non-finite gradient in the parameter, else 0.0

:class:`PartitionLayout` is the geometry (which fragments this rank holds; it is what the
adapters read from DeepSpeed, whatever the optimizer); :class:`StatsLayout` is the buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .formulas import row_pieces

__all__ = [
    "Fragment",
    "ParamSlots",
    "PartitionLayout",
    "StatsLayout",
    "stats_layout",
    "layout_from_offsets",
    "layout_from_fragments",
    "layout_from_param_partitions",
]


@dataclass(frozen=True)
class Fragment:
    """A contiguous run of one parameter's (row-major flattened) elements in the partition.

    Elements ``[param_start, param_start + numel)`` of parameter ``param_index`` (its index
    in the group, which is also its index in the stats buffer) lie at
    ``[partition_offset, partition_offset + numel)`` of this rank's flat partition.
    """

    param_index: int
    shape: tuple[int, ...]
    param_start: int
    numel: int
    partition_offset: int

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2

    def row_pieces(self) -> list[tuple[int, int, int, int]]:
        """This fragment split at row boundaries (:func:`merit_ds.optim.formulas.row_pieces`)."""
        return row_pieces(self.shape, self.param_start, self.numel)


@dataclass(frozen=True)
class ParamSlots:
    """Where one parameter's statistics lie in the buffer (offsets relative to the group's
    share of the buffer): ``size`` floats from ``offset``, and its non-finite flag."""

    shape: tuple[int, ...]
    offset: int
    size: int
    flag: int

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2


@dataclass(frozen=True)
class StatsLayout:
    """The statistics buffer of one group: a slot per parameter, then one flag each.

    The same on every rank (it depends only on the group's shapes and the optimizer's
    :attr:`~merit_ds.optim.fragment_rule.FragmentRule.stats_size`).
    """

    slots: tuple[ParamSlots, ...]
    buffer_numel: int


def stats_layout(shapes: Sequence[Sequence[int]], stats_size: Callable[[tuple[int, ...]], int]) -> StatsLayout:
    """Slots for parameters of ``shapes``, ``stats_size(shape)`` floats each, then the flags."""
    shapes = [tuple(int(d) for d in s) for s in shapes]
    sizes = [int(stats_size(s)) for s in shapes]
    total = sum(sizes)
    slots, offset = [], 0
    for i, (shape, size) in enumerate(zip(shapes, sizes)):
        slots.append(ParamSlots(shape, offset, size, total + i))
        offset += size
    return StatsLayout(tuple(slots), total + len(shapes))


@dataclass(frozen=True)
class PartitionLayout:
    """The geometry of one flat partition: the group's parameter shapes (in stats order, the
    same on every rank) and the fragments this rank holds, ordered by partition offset.
    ``partition_numel`` is the flat partition's length (fragments plus padding)."""

    shapes: tuple[tuple[int, ...], ...]
    fragments: tuple[Fragment, ...]
    partition_numel: int

    def fragments_of(self, param_index: int) -> list[Fragment]:
        return [f for f in self.fragments if f.param_index == param_index]


def _build(shapes: Sequence[Sequence[int]], fragments: Iterable[Fragment], partition_numel: int) -> PartitionLayout:
    shapes = [tuple(int(d) for d in s) for s in shapes]
    frags = tuple(sorted((f for f in fragments if f.numel > 0), key=lambda f: f.partition_offset))
    end = 0
    for f in frags:
        total = math.prod(shapes[f.param_index])
        if f.shape != shapes[f.param_index]:
            raise ValueError(f"fragment shape {f.shape} != parameter shape {shapes[f.param_index]}")
        if not (0 <= f.param_start and f.param_start + f.numel <= total):
            raise ValueError(f"fragment {f} exceeds its parameter ({total} elements)")
        if f.partition_offset < end or f.partition_offset + f.numel > partition_numel:
            raise ValueError(f"fragment {f} overlaps another or exceeds the partition ({partition_numel})")
        end = f.partition_offset + f.numel
    return PartitionLayout(tuple(shapes), frags, int(partition_numel))


def layout_from_offsets(
    shapes: Sequence[Sequence[int]],
    flat_offsets: Sequence[int],
    partition_start: int,
    partition_numel: int,
) -> PartitionLayout:
    """Layout of ``[partition_start, partition_start + partition_numel)`` of a flat group.

    Parameter ``i`` (stats order) occupies ``[flat_offsets[i], flat_offsets[i] + numel_i)``
    of the flattened group (ZeRO 1/2 ``round_robin_bit16_offsets``, which already include
    ``parameter_alignment`` padding and the round-robin order: offsets are per parameter,
    so the stats order need not be the flatten order).
    """
    if len(shapes) != len(flat_offsets):
        raise ValueError("one flat offset per parameter is needed")
    end = partition_start + partition_numel
    frags = []
    for i, (shape, off) in enumerate(zip(shapes, flat_offsets)):
        numel = math.prod(shape)
        lo, hi = max(off, partition_start), min(off + numel, end)
        if lo < hi:
            frags.append(Fragment(i, tuple(shape), lo - off, hi - lo, lo - partition_start))
    return _build(shapes, frags, partition_numel)


def layout_from_fragments(
    shapes: Sequence[Sequence[int]],
    fragments: Iterable[tuple[int, int, int, int]],
    partition_numel: int,
) -> PartitionLayout:
    """Layout from explicit ``(param_index, param_start, numel, partition_offset)`` records
    (DeepSpeed's ``_hp_mapping``: ``lp_fragment_address`` and ``hp_fragment_address``)."""
    frags = [Fragment(i, tuple(shapes[i]), s, n, o) for i, s, n, o in fragments]
    return _build(shapes, frags, partition_numel)


def layout_from_param_partitions(
    shapes: Sequence[Sequence[int]],
    partition_numels: Sequence[int],
    rank: int,
) -> PartitionLayout:
    """ZeRO 3: every parameter ``i`` is cut on its own into ``partition_numels[i]``-element
    pieces, rank ``r`` holding ``[r*pn, (r+1)*pn)`` of it (the tail past ``numel`` is
    padding); this rank's pieces are concatenated in parameter order."""
    frags = []
    offset = 0
    for i, (shape, pn) in enumerate(zip(shapes, partition_numels)):
        numel = math.prod(shape)
        start = rank * pn
        real = max(0, min(pn, numel - start))
        if real > 0:
            frags.append(Fragment(i, tuple(shape), start, real, offset))
        offset += pn
    return _build(shapes, frags, offset)
