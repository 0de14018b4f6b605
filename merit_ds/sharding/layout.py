"""Where each parameter of a group lies in one rank's flat partition, and the stats buffer.

Pure bookkeeping (no collectives, no DeepSpeed): the flavour adapters (:mod:`.zero12`,
:mod:`.zero3`, :mod:`.bf16`) read DeepSpeed's records and build a :class:`PartitionLayout`
with the constructors below; :mod:`.step` runs MERIT on it.

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

The statistics buffer of a group (identical layout on every rank, ``float32``)::

    | param 0 stats | param 1 stats | ... | param P-1 stats | flag 0 | ... | flag P-1 |

    matrix (R, C, *rest), K = prod(rest):  [ row|w| R*K | row|u| R*K | col|w| C*K | col|u| C*K ]
    vector (or 0-d):                       [ max|w| | max|u| ]
    flag: 1.0 if this rank saw a non-finite gradient in the parameter, else 0.0

A matrix's tensor maxima are the maxima of its reduced row maxima (exactly), so they take no
slots. After the ``all_reduce(MAX)`` every rank holds the whole-matrix statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "Fragment",
    "ParamSlots",
    "PartitionLayout",
    "layout_from_offsets",
    "layout_from_fragments",
    "layout_from_param_partitions",
    "matrix_dims",
]


def matrix_dims(shape: Sequence[int]) -> tuple[int, int, int]:
    """(R, C, K) of a parameter viewed as ``(R, C, K)`` with ``K = prod(shape[2:])``."""
    return int(shape[0]), int(shape[1]), int(math.prod(shape[2:]))


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
        """Split the fragment at row boundaries (matrices only).

        Returns ``(offset_in_fragment, length, first_row, first_col_in_row)`` per piece,
        where a piece is either a partial row (``length < C*K`` or unaligned start) or a run
        of whole rows (``first_col_in_row == 0`` and ``length`` a multiple of ``C*K``)::

            fragment  [ ....head.... | ====== whole rows ====== | ..tail.. ]
                        row i, col a   rows i+1 .. i+r            row i+r+1, col 0
        """
        _, cols, inner = matrix_dims(self.shape)
        row_len = cols * inner
        pieces = []
        pos = 0
        while pos < self.numel:
            row, col0 = divmod(self.param_start + pos, row_len)
            if col0 == 0 and self.numel - pos >= row_len:
                length = (self.numel - pos) // row_len * row_len
            else:
                length = min(row_len - col0, self.numel - pos)
            pieces.append((pos, length, row, col0))
            pos += length
        return pieces


@dataclass(frozen=True)
class ParamSlots:
    """Where one parameter's statistics lie in the buffer (offsets relative to the layout)."""

    shape: tuple[int, ...]
    offset: int
    flag: int

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2

    @property
    def size(self) -> int:
        return stats_size(self.shape)


def stats_size(shape: Sequence[int]) -> int:
    """Number of floats a parameter of this shape takes in the buffer (flag excluded)."""
    if len(shape) >= 2:
        rows, cols, inner = matrix_dims(shape)
        return 2 * (rows + cols) * inner
    return 2


@dataclass(frozen=True)
class PartitionLayout:
    """The layout of one flat partition: the group's parameters, this rank's fragments.

    ``slots[i]`` is parameter ``i``'s place in the stats buffer (the same on every rank);
    ``fragments`` the pieces of parameters this rank holds, ordered by partition offset.
    ``partition_numel`` is the flat partition's length (fragments plus padding).
    """

    slots: tuple[ParamSlots, ...]
    fragments: tuple[Fragment, ...]
    partition_numel: int
    buffer_numel: int

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(s.shape for s in self.slots)

    def fragments_of(self, param_index: int) -> list[Fragment]:
        return [f for f in self.fragments if f.param_index == param_index]


def _build(shapes: Sequence[Sequence[int]], fragments: Iterable[Fragment], partition_numel: int) -> PartitionLayout:
    shapes = [tuple(int(d) for d in s) for s in shapes]
    offset = 0
    offsets = []
    for shape in shapes:
        offsets.append(offset)
        offset += stats_size(shape)
    slots = tuple(ParamSlots(shape, off, offset + i) for i, (shape, off) in enumerate(zip(shapes, offsets)))
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
    return PartitionLayout(slots, frags, int(partition_numel), offset + len(shapes))


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
