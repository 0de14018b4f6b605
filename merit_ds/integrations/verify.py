"""Confirm, after ``accelerator.prepare`` / ``deepspeed.initialize`` / ``Trainer.train`` setup,
that the optimizer actually stepping the weights is MERIT (or LAMB, or whichever merit_ds
optimizer is expected), sharded correctly, with the intended weight-decay split.

The wrappers between a user's handle and the optimizer that steps the weights::

    Trainer.optimizer / Accelerate's AcceleratedOptimizer / DeepSpeedOptimizerWrapper
        .optimizer -> DeepSpeedEngine.optimizer (or a ZeRO optimizer directly)
            ZeRO 1/2: DeepSpeedZeroOptimizer   groups: bit16_groups[i]          (flat partitions)
            ZeRO 3:   DeepSpeedZeroOptimizer_Stage3  fp16_groups[sub] -> sub_group_to_group_id
            bf16:     BF16_Optimizer           groups: bf16_groups[i]
                .optimizer -> the basic optimizer (must be the expected merit_ds optimizer)

Each of these holds the next one in ``.optimizer``. The original (model) parameters of each
basic-optimizer group are read from the ZeRO optimizer's records, never recomputed.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..optim import MERIT, ShardableOptimizer
from .param_groups import check_decay_split

__all__ = ["unwrap_optimizer", "assert_merit_is_stepping", "assert_optimizer_is_stepping", "decay_groups",
           "NotMeritError"]


class NotMeritError(RuntimeError):
    """The optimizer that steps the weights is not (a correctly sharded) MERIT, or not the
    merit_ds optimizer that was expected (LAMB...)."""


def _chain(obj: Any) -> list:
    """``obj`` and everything reachable through ``.optimizer`` (engine -> ZeRO -> basic)."""
    chain, seen = [obj], {id(obj)}
    while True:
        nxt = getattr(chain[-1], "optimizer", None)
        if nxt is None or id(nxt) in seen or isinstance(chain[-1], ShardableOptimizer):
            return chain
        chain.append(nxt)
        seen.add(id(nxt))


def unwrap_optimizer(engine_or_optimizer: Any) -> torch.optim.Optimizer:
    """The innermost optimizer: the one whose ``step()`` changes the weights."""
    return _chain(engine_or_optimizer)[-1]


def _describe(chain: list) -> str:
    return " -> ".join(type(x).__name__ for x in chain)


def _zero_wrapper(chain: list) -> Optional[Any]:
    for obj in chain:
        if any(hasattr(obj, a) for a in ("bit16_groups", "bf16_groups", "sub_group_to_group_id")):
            return obj
    return None


def decay_groups(engine_or_optimizer: Any) -> list[tuple[float, list[torch.nn.Parameter]]]:
    """``(weight_decay, original model parameters)`` for every group of the stepping optimizer."""
    chain = _chain(engine_or_optimizer)
    basic, wrapper = chain[-1], _zero_wrapper(chain)
    groups = basic.param_groups
    if wrapper is None:
        return [(g["weight_decay"], list(g["params"])) for g in groups]
    if hasattr(wrapper, "sub_group_to_group_id"):  # ZeRO 3: sub-groups of original groups
        per_group: dict[int, list] = {}
        for sub, params in enumerate(wrapper.fp16_groups):
            per_group.setdefault(wrapper.sub_group_to_group_id[sub], []).extend(params)
        return [(groups[gid]["weight_decay"], ps) for gid, ps in sorted(per_group.items())]
    originals = getattr(wrapper, "bit16_groups", None) or getattr(wrapper, "bf16_groups")
    if len(originals) != len(groups):
        raise NotMeritError(
            f"cannot match {len(groups)} optimizer groups to {len(originals)} ZeRO groups in {type(wrapper).__name__}"
        )
    return [(g["weight_decay"], list(ps)) for g, ps in zip(groups, originals)]


def _flat_groups(wrapper: Any, basic: ShardableOptimizer) -> list[dict]:
    """The groups the basic optimizer will step, each holding one flat partition.

    ZeRO 1/2 and BF16_Optimizer keep them in ``basic.param_groups`` at all times; ZeRO 3 puts
    one sub-group's ``fp32_partitioned_groups_flat[s]`` into its group only during ``step()``,
    so those are rebuilt here from the same records.
    """
    if hasattr(wrapper, "sub_group_to_group_id"):
        return [
            {**basic.param_groups[wrapper.sub_group_to_group_id[s]], "params": [flat]}
            for s, flat in enumerate(wrapper.fp32_partitioned_groups_flat)
        ]
    return [g for g in basic.param_groups if g["params"]]


def _check_sharding(wrapper: Any, basic: ShardableOptimizer) -> None:
    """Every flat-partition group must have a layout from :mod:`merit_ds.sharding`."""
    what = type(basic).__name__
    try:
        from ..sharding import ShardingLayoutError, layout_of
    except ImportError as exc:
        raise NotMeritError(
            f"{what} runs under {type(wrapper).__name__} (ZeRO flat partitions) but merit_ds.sharding "
            f"is not available: {what} would treat each flat partition as one vector and compute "
            "wrong trust ratios."
        ) from exc
    for i, group in enumerate(_flat_groups(wrapper, basic)):
        try:
            layout_of(basic, group)
        except ShardingLayoutError as exc:
            raise NotMeritError(
                f"flat partition {i} of {what} under {type(wrapper).__name__} has no sharding layout: {exc}"
            ) from exc


def _names(expected: tuple[type, ...]) -> str:
    return " or ".join(f"{c.__module__.split('.')[0]}.{c.__qualname__}" for c in expected)


def assert_merit_is_stepping(
    engine_or_optimizer: Any,
    model: Optional[torch.nn.Module] = None,
    *,
    trainer=None,
    expected: Union[type, tuple[type, ...]] = MERIT,
) -> ShardableOptimizer:
    """Raise :class:`NotMeritError` unless ``expected`` (default MERIT; e.g. ``merit_ds.LAMB``,
    or a tuple of classes) is the optimizer stepping ``model``'s weights.

    Accepts a ``DeepSpeedEngine``, a ZeRO optimizer, Accelerate's wrapped optimizer, a Trainer's
    ``optimizer`` or a plain optimizer. Checks, in order:

    1. the innermost optimizer is an instance of ``expected`` (not AdamW, not
       DeepSpeedCPUAdam, not the other merit_ds optimizer);
    2. under ZeRO, every flat-partition group has a layout from :mod:`merit_ds.sharding`;
    3. with ``model``: no bias or norm parameter sits in a group with ``weight_decay > 0``
       (Hugging Face's grouping, see :mod:`merit_ds.integrations.param_groups`).

    Returns the optimizer instance. :func:`assert_optimizer_is_stepping` is the same function.
    """
    expected = expected if isinstance(expected, tuple) else (expected,)
    chain = _chain(engine_or_optimizer)
    basic = chain[-1]
    if not isinstance(basic, expected):
        raise NotMeritError(
            f"the optimizer stepping the weights is {type(basic).__module__}.{type(basic).__qualname__}, "
            f"not {_names(expected)} (wrappers: {_describe(chain)}). See merit_ds's docs/integrations.md, 'Traps, "
            "and what merit_ds does about each'."
        )
    wrapper = _zero_wrapper(chain)
    if wrapper is not None:
        _check_sharding(wrapper, basic)
    if model is not None:
        check_decay_split(decay_groups(engine_or_optimizer), model, trainer=trainer)
    return basic


assert_optimizer_is_stepping = assert_merit_is_stepping
