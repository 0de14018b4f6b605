"""Separate 1-D pieces of parameters, each its own tensor: megatron-core's DistributedOptimizer.

ZeRO hands an optimizer one flat partition per group (:mod:`.zero12`, :mod:`.zero3`); megatron-core's
DistributedOptimizer instead swaps each param group's parameters for *one fp32 tensor per
parameter*: the part of the flattened parameter this data-parallel rank owns
(``model_param.view(-1)[start:end]``, start and end from megatron-core's range map), which can
begin and end mid-row::

    W (5 x 4), flattened:  [ 0 ....... 7 | 8 ........ 19 ]
    DP rank 0 owns 0..8    piece_0 = W.flat[0:8]   (rows 0-1)
    DP rank 1 owns 8..20   piece_1 = W.flat[8:20]  (rows 2-4)

Each piece is a one-fragment partition of its parameter (:class:`Piece`): the same sharded step,
statistics slots and collective as ZeRO's, one :class:`~.step.ShardedGroupStep` per piece, all
pieces of one ``step()`` call reduced in ONE all-reduce. Whoever builds the wrapper (the
megatron-core factory, :mod:`merit_ds.megatron`) records each piece with :func:`attach_pieces`;
the group resolver (:func:`merit_ds.sharding.resolve_group`) finds them there. Tensor
parallelism composes as for ZeRO (:mod:`.tensor_parallel`): a dim-0 slice is placed among the
whole matrix's rows, a dim-1 slice's column statistics move to their place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from merit_ds.optim.layout import layout_from_fragments, stats_layout
from merit_ds.optim.tp_layout import TensorSplit, exchange_plan, globalize_rows

from .errors import ShardingLayoutError

__all__ = ["Piece", "attach_pieces", "pieces_stepper", "PiecesStep"]


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + numel)`` of a parameter of ``shape`` (this TP rank's slice),
    flattened row-major; ``split``: how that parameter is split across tensor-parallel ranks
    (``None``: not split); ``tp_rank``: this rank's tensor-parallel rank, ``None`` without
    tensor parallelism; ``process_group``: the data-parallel group the other pieces live on
    (with TP: all data x tensor ranks)."""

    shape: tuple
    start: int
    numel: int
    process_group: Any = None
    split: Optional[TensorSplit] = None
    tp_rank: Optional[int] = None


def attach_pieces(optimizer, pieces: dict, *, process_group=None, tp=None) -> None:
    """Record ``{piece tensor: (model parameter, Piece)}`` for the tensors an external wrapper put in
    ``optimizer``'s groups. ``process_group`` / ``tp``: the group the statistics are reduced over and
    the tensor-parallel group (:class:`~.tensor_parallel.TPGroup` or ``None``), for the parameters
    of which this rank holds no piece (it still reserves their statistics, as zeros)."""
    table = optimizer.__dict__.setdefault("_merit_pieces", {})
    for tensor, (param, piece) in pieces.items():
        if tensor.dim() != 1 or tensor.numel() != piece.numel:
            raise ShardingLayoutError(f"a piece must be the 1-D tensor of its {piece.numel} elements, got shape "
                                      f"{tuple(tensor.shape)}")
        table[id(tensor)] = (tensor, param, piece)
    optimizer._merit_pieces_context = (process_group, tp)


class PiecesStep:
    """The sharded steps of one group's pieces (run together with the other groups' pieces)."""

    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self) -> None:
        PiecesStep.run_many([self])

    @staticmethod
    def run_many(items: list["PiecesStep"]) -> None:
        from .step import run_sharded_steps

        run_sharded_steps([s for item in items for s in item.steps])


def pieces_stepper(optimizer, group: dict) -> Optional[PiecesStep]:
    """A stepper if every tensor of ``group`` is an attached piece; ``None`` if none is.

    One :class:`~.step.ShardedGroupStep` per parameter the group was built with, in that order,
    whether this rank holds a piece of it or not (an empty one then: zeros in the statistics,
    nothing to update), so that the statistics buffer has the same layout on every rank."""
    table = optimizer.__dict__.get("_merit_pieces")
    if optimizer.__dict__.get("_merit_pieces_context") is None:
        return None  # nothing attached: not a pieces optimizer
    # Every group of an attached optimizer is stepped here, an empty one too (this rank owns no
    # element of any of its parameters): the other ranks reserve its statistics, and so must this one.
    found = [table.get(id(p)) for p in group["params"]]
    if found and all(f is None for f in found):
        return None
    if any(f is None or f[0] is not p for f, p in zip(found, group["params"])):
        raise ShardingLayoutError("a param group mixes attached pieces with other tensors; attach every piece")
    from .step import ShardedGroupStep
    from .tensor_parallel import split_of

    process_group, tp = optimizer._merit_pieces_context
    mine = {id(param): (tensor, piece) for tensor, param, piece in found}
    rule = optimizer.fragment_rule
    cache = optimizer.__dict__.setdefault("_merit_piece_layouts", {})
    steps = []
    for param in optimizer.original_params(group):
        tensor, piece = mine.get(id(param), (None, None))
        if piece is None:  # another data-parallel rank owns all of this parameter
            import torch

            tensor = cache.get(("empty", id(param)), (None, None))[1]
            if tensor is None:
                tensor = torch.empty(0, dtype=torch.float32, device=param.device)
                cache[("empty", id(param))] = (param, tensor)
            piece = Piece(tuple(param.shape), 0, 0, process_group, split_of(param, tp) if tp is not None else None,
                          tp.rank if tp is not None else None)
        hit = cache.get(id(tensor))
        if hit is None or hit[0] is not tensor:
            frags = [(0, piece.start, piece.numel, 0)] if piece.numel else []
            layout = layout_from_fragments([piece.shape], frags, piece.numel)
            exchange = None
            if piece.tp_rank is not None:  # every piece then goes through the whole-matrix buffer
                layout = globalize_rows(layout, [piece.split])
                exchange = exchange_plan(stats_layout(layout.shapes, rule.stats_size), [piece.split], rule,
                                         tp_rank=piece.tp_rank)
            hit = cache[id(tensor)] = (tensor, layout, exchange)
        _, layout, exchange = hit
        steps.append(ShardedGroupStep(optimizer, group, tensor, layout, piece.process_group, "megatron-core pieces",
                                      exchange=exchange))
    return PiecesStep(steps)
