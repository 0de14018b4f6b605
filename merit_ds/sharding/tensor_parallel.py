"""Tensor parallelism: which parameters a framework split, and the sharded step that keeps
MERIT and LAMB exact over them (the placement arithmetic is :mod:`merit_ds.optim.tp_layout`).

What is read, never guessed from shapes:

- **the tensor-parallel group**: DeepSpeed's ``deepspeed.utils.groups``, else megatron-core's
  ``parallel_state`` when it is initialised. A Megatron-style
  ``mpu`` passed to ``deepspeed.initialize`` is stored there as ``groups.mpu`` (engine.py
  ``_configure_distributed_model``); its ``get_tensor_model_parallel_group/rank/world_size``
  are used. DeepSpeed AutoTP training (``"tensor_parallel": {"autotp_size": N}``) builds its
  own group, ``groups.get_tensor_model_parallel_group()``.
- **which parameters are split, and how**: DeepSpeed AutoTP's layers record on each parameter
  ``ds_autotp_universal_checkpoint_meta`` (``module_inject/layers.py``: ``partition_dim``,
  ``partition_sizes`` per TP rank, ``replicated``). Megatron's layers set
  ``tensor_model_parallel = True`` and ``partition_dim`` (0: column-parallel, 1:
  row-parallel), with equal slices (Megatron's ``divide`` asserts divisibility). Anything
  else is replicated across the TP group.

Two ways a split parameter reaches the optimizer::

    ZeRO 1/2 (and DeepSpeed's bf16 optimizer)      no ZeRO (stage 0)
    flat partition of TP-local slices              whole TP-local slices
      -> layout from the ZeRO adapters               -> one "partition" per split parameter
      -> rows of dim-0 slices placed in the whole       (the slice itself, its own state)
         matrix (globalize_rows)                     -> same placement
      -> ONE all-reduce over data x tensor ranks     -> ONE all-reduce over the TP group
         (the world: replaces the data-parallel one)    (replicated parameters: the ordinary step)

Refused, with the reason: pipeline parallelism, sequence parallelism, expert (MoE)
parameters, ZeRO stage 3 under tensor parallelism, a split along a dimension other than 0/1,
a parameter marked tensor-parallel whose split cannot be read.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch.distributed as dist

from merit_ds.optim.layout import PartitionLayout, layout_from_offsets, stats_layout
from merit_ds.optim.tp_layout import TensorSplit, exchange_plan, globalize_rows

from .errors import ShardingLayoutError

__all__ = ["TPGroup", "current", "split_of", "sharded_tp", "whole_param_stepper", "AUTOTP_META"]

#: The attribute DeepSpeed AutoTP layers record each parameter's split in
#: (``deepspeed.checkpoint.constants.DS_AUTOTP_UC_META``).
AUTOTP_META = "ds_autotp_universal_checkpoint_meta"


@dataclass(frozen=True)
class TPGroup:
    """This rank's tensor-parallel group: the process group, its rank in it and its size;
    ``source`` names where it came from (for messages)."""

    group: Any
    rank: int
    size: int
    source: str


def _refuse(what: str, fix: str) -> None:
    raise ShardingLayoutError(f"merit_ds: {what} is not supported yet (the trust ratios would not be exact). {fix}")


def _mpu_size(mpu, name: str) -> int:
    fn = getattr(mpu, name, None)
    try:
        return int(fn()) if callable(fn) else 1
    except Exception:  # an mpu whose group was never initialised
        return 1


def current() -> Optional[TPGroup]:
    """The tensor-parallel group DeepSpeed knows of, or ``None`` (no TP, or TP size 1).

    Raises :class:`ShardingLayoutError` for a layout that is not exact yet (pipeline or
    sequence parallelism in the ``mpu``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    # (never imports a framework: this runs at every step of every optimizer)
    found = _deepspeed_tp() if "deepspeed" in sys.modules else None
    if found is None and "megatron.core.parallel_state" in sys.modules:
        found = _megatron_tp()
    return found


def _megatron_tp() -> Optional[TPGroup]:
    """megatron-core's tensor-parallel group (its ``parallel_state``), when initialised."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    if ps.get_pipeline_model_parallel_world_size() > 1:
        _refuse("pipeline parallelism (megatron-core's pipeline-model-parallel size > 1)",
                "Run with pipeline-model-parallel size 1.")
    size = ps.get_tensor_model_parallel_world_size()
    if size <= 1:
        return None
    return TPGroup(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), size, "megatron-core")


def _deepspeed_tp() -> Optional[TPGroup]:
    from deepspeed.utils import groups

    mpu = getattr(groups, "mpu", None)
    if mpu is not None and mpu is not groups:
        if _mpu_size(mpu, "get_pipeline_model_parallel_world_size") > 1:
            _refuse("pipeline parallelism (the mpu's pipeline-parallel size > 1)",
                    "Run with pipeline-parallel size 1, or use AdamW for this run.")
        if hasattr(mpu, "initialize_sequence_parallel") or _mpu_size(mpu, "get_sequence_parallel_world_size") > 1:
            _refuse("sequence parallelism (the mpu has a sequence-parallel group)",
                    "Run with sequence-parallel size 1, or use AdamW for this run.")
        size = _mpu_size(mpu, "get_tensor_model_parallel_world_size")
        if size <= 1:
            return None
        return TPGroup(mpu.get_tensor_model_parallel_group(), int(mpu.get_tensor_model_parallel_rank()), size, "the mpu")
    if getattr(groups, "_TENSOR_MODEL_PARALLEL_GROUP", None) is None:
        return None
    group = groups.get_tensor_model_parallel_group()
    size = dist.get_world_size(group=group)
    if size <= 1:
        return None
    return TPGroup(group, dist.get_rank(group=group), size, "DeepSpeed AutoTP")


def _name(p) -> str:
    return f"parameter of shape {tuple(getattr(p, 'ds_shape', p.shape))}"


def split_of(p, tp: TPGroup) -> Optional[TensorSplit]:
    """How ``p`` (this rank's slice) is split across ``tp``; ``None`` if it is replicated."""
    if getattr(p, "allreduce", True) is False:  # DeepSpeed MoE marks expert parameters so
        _refuse("expert parallelism (a DeepSpeed MoE expert parameter)", "Use AdamW for MoE models for now.")
    if getattr(p, "sequence_parallel", False):
        _refuse("sequence parallelism (a parameter marked sequence_parallel)", "Turn sequence parallelism off.")
    meta = getattr(p, AUTOTP_META, None)
    shape = tuple(p.shape)
    if isinstance(meta, dict) and ("partition_dim" in meta or "replicated" in meta):
        dim = meta.get("partition_dim")
        if meta.get("replicated") or dim is None:
            return None
        sizes = meta.get("partition_sizes")
        if not sizes or len(sizes) != tp.size or int(sizes[tp.rank]) != shape[dim]:
            raise ShardingLayoutError(
                f"merit_ds: DeepSpeed AutoTP split a {_name(p)} along dim {dim} but records partition_sizes "
                f"{sizes} for {tp.size} TP ranks (rank {tp.rank}); cannot place its slice. This layer layout "
                f"(sub-parameter splits?) is not supported yet: use AdamW, or keep that layer unsplit.")
        sizes = [int(x) for x in sizes]
        return TensorSplit(int(dim), sum(sizes[: tp.rank]), sum(sizes))
    if getattr(p, "tensor_model_parallel", False):
        dim = getattr(p, "partition_dim", None)
        if dim not in (0, 1) or dim >= p.dim():
            raise ShardingLayoutError(
                f"merit_ds: a {_name(p)} is marked tensor_model_parallel with partition_dim={dim!r}; only 0 "
                f"(column-parallel) and 1 (row-parallel) are supported.")
        local = shape[dim]
        return TensorSplit(int(dim), tp.rank * local, tp.size * local)
    return None


def _combined_group(dp_group, tp: TPGroup):
    """The group of all data- x tensor-parallel ranks: the world, checked."""
    world = dist.get_world_size()
    dp = dist.get_world_size(group=dp_group)
    if dp * tp.size != world:
        _refuse(f"a layout with data-parallel size {dp} x tensor-parallel size {tp.size} != world size {world} "
                f"(pipeline or expert parallelism?)", "Run with data x tensor parallelism only.")
    return dist.group.WORLD


def sharded_tp(optimizer, params: Sequence, layout: PartitionLayout, dp_group, kind: str):
    """Tensor parallelism for a ZeRO partition: ``(layout, process group, exchange)``, or
    ``None`` when no TP group is active. ``params``: the group's parameters in stats order."""
    tp = current()
    if tp is None:
        return None
    if kind == "zero3":  # (before reading splits: ZeRO-3 parameters are empty (0,) tensors here)
        _refuse("ZeRO stage 3 with tensor parallelism", 'Use "stage": 1 or 2 with tensor parallelism.')
    splits = [split_of(p, tp) for p in params]
    whole = globalize_rows(layout, splits)
    local = stats_layout(whole.shapes, optimizer.fragment_rule.stats_size)
    exchange = exchange_plan(local, splits, optimizer.fragment_rule, tp_rank=tp.rank)
    return whole, _combined_group(dp_group, tp), exchange


class WholeParamTPStep:
    """A group of whole TP-local slices (no ZeRO): split parameters through the sharded step
    (one per parameter, all reduced in one collective over the TP group), replicated ones
    through the optimizer's ordinary step."""

    def __init__(self, optimizer, group: dict, replicated: list, steps: list):
        self.optimizer, self.group, self.replicated, self.steps = optimizer, group, replicated, steps

    def __call__(self) -> None:
        WholeParamTPStep.run_many([self])

    @staticmethod
    def run_many(items: list["WholeParamTPStep"]) -> None:
        from .step import run_sharded_steps

        for item in items:
            if item.replicated:
                item.optimizer._step_group({**item.group, "params": item.replicated})
        run_sharded_steps([s for item in items for s in item.steps])


def whole_param_stepper(optimizer, group: dict, originals: Optional[list] = None) -> Optional[WholeParamTPStep]:
    """The stepper of a group of whole parameters (no ZeRO) under tensor parallelism, or
    ``None`` (no TP group, or nothing in the group is split). ``originals``: the model
    parameters the group's tensors stand for, position by position (DeepSpeed's fp16/bf16
    wrapper without ZeRO hands out fp32 copies), default the group's own."""
    tp = current()
    if tp is None:
        return None
    params = list(group["params"])
    originals = params if originals is None else originals
    splits = [split_of(o, tp) for o in originals]
    if all(s is None for s in splits):
        return None
    from .step import ShardedGroupStep

    rule = optimizer.fragment_rule
    cache = optimizer.__dict__.setdefault("_merit_tp_steps", {})
    steps, replicated = [], []
    for p, split in zip(params, splits):
        if split is None:
            replicated.append(p)
            continue
        hit = cache.get(id(p))
        if hit is None or hit[0] is not p:
            local = layout_from_offsets([tuple(p.shape)], [0], 0, p.numel())
            whole = globalize_rows(local, [split])
            exchange = exchange_plan(stats_layout(whole.shapes, rule.stats_size), [split], rule, tp_rank=tp.rank)
            hit = cache[id(p)] = (p, whole, exchange)
        _, whole, exchange = hit
        steps.append(ShardedGroupStep(optimizer, group, p.detach().view(-1), whole, tp.group, "tensor-parallel",
                                      param=p, exchange=exchange))
    return WholeParamTPStep(optimizer, group, replicated, steps)
