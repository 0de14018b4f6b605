"""The three optimizers of the training loop: building the client one, checking which one steps.

``--optimizer merit|lamb|adamw`` (:mod:`.run_config` decides how each reaches DeepSpeed):

* ``merit``, ``lamb``: :class:`merit_ds.MERIT`, :class:`merit_ds.LAMB` (exact under ZeRO through
  :mod:`merit_ds.sharding`), checked by :func:`merit_ds.integrations.verify.assert_merit_is_stepping`
  (class, a sharding layout for every flat partition, decay split);
* ``adamw``: DeepSpeed's ``AdamW``: ``torch.optim.AdamW``, or DeepSpeed's FusedAdam /
  DeepSpeedCPUAdam in AdamW mode (decoupled weight decay); checked here (class and mode, decay
  split). Element-wise, so nothing about its sharding to check.

Trust-ratio diagnostics (``track_stats`` / ``partial_stats``) exist for MERIT and LAMB
(:data:`TRUST_STATS`); MERIT's clip fraction is MERIT-only (LAMB does not clip its update).
"""

from __future__ import annotations

from typing import Any

import torch

from merit_ds.integrations.param_groups import check_decay_split
from merit_ds.integrations.verify import decay_groups, unwrap_optimizer

from .run_config import RunConfig

__all__ = ["build_client_optimizer", "verify_optimizer_is_stepping", "describe_stepping", "TRUST_STATS",
           "CLIP_FRACTION", "WrongOptimizerError"]

#: Optimizers that record trust-ratio statistics when ``track_stats`` is on.
TRUST_STATS = ("merit", "lamb")
#: ... and those for which the clip fraction means something.
CLIP_FRACTION = ("merit",)

_DS_ADAMW = ("FusedAdam", "DeepSpeedCPUAdam", "ZenFlowCPUAdam")


class WrongOptimizerError(RuntimeError):
    """The optimizer DeepSpeed/Accelerate step is not the one ``--optimizer`` chose."""


def build_client_optimizer(rc: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer the loop hands to DeepSpeed (``rc.client``): MERIT or LAMB."""
    from merit_ds.optim import LAMB, MERIT

    cls = {"merit": MERIT, "lamb": LAMB}[rc.optimizer]
    params = dict(rc.opt_params)
    params["betas"] = tuple(params["betas"])
    return cls(groups, **params)


def _chain(obj: Any) -> list:
    """``obj`` and everything reachable through ``.optimizer`` (engine -> ZeRO -> basic)."""
    chain, seen = [obj], {id(obj)}
    while True:
        nxt = getattr(chain[-1], "optimizer", None)
        if nxt is None or id(nxt) in seen:
            return chain
        chain.append(nxt)
        seen.add(id(nxt))


def _wrappers(engine: Any) -> str:
    return " -> ".join(type(x).__name__ for x in _chain(engine))


def _is_adamw(opt: Any) -> bool:
    cls = type(opt)
    if isinstance(opt, torch.optim.AdamW):
        return True
    if cls.__module__.startswith("deepspeed.ops.adam") and cls.__name__ in _DS_ADAMW:
        return bool(getattr(opt, "adam_w_mode", False))
    return False


def verify_optimizer_is_stepping(engine: Any, optimizer: str, model: torch.nn.Module | None = None):
    """Fail fast unless the optimizer DeepSpeed/Accelerate actually step is the chosen one,
    correctly sharded, with no bias/norm parameter decayed. Returns it (the basic optimizer)."""
    from merit_ds.integrations.verify import NotMeritError, assert_merit_is_stepping
    from merit_ds.optim import LAMB, MERIT

    model = engine.module if model is None else model
    if optimizer in ("merit", "lamb"):  # class, a sharding layout per ZeRO partition, decay split
        try:
            return assert_merit_is_stepping(engine, model, expected={"merit": MERIT, "lamb": LAMB}[optimizer])
        except NotMeritError as exc:
            raise WrongOptimizerError(f"--optimizer {optimizer}: {exc}") from exc
    if optimizer != "adamw":
        raise ValueError(f"unknown optimizer {optimizer!r}")
    basic = unwrap_optimizer(engine)
    if not _is_adamw(basic):
        raise WrongOptimizerError(f"--optimizer adamw, but the optimizer stepping the weights is "
                                  f"{type(basic).__module__}.{type(basic).__qualname__} (wrappers: {_wrappers(engine)})")
    check_decay_split(decay_groups(engine), model)
    return basic


def describe_stepping(basic, optimizer: str) -> str:
    """``MERIT``, ``LAMB``, ``torch.optim.AdamW``, ``deepspeed FusedAdam (AdamW mode)`` ..."""
    cls = type(basic)
    if optimizer == "adamw":
        if cls.__module__.startswith("deepspeed"):
            return f"deepspeed {cls.__name__} (AdamW mode)"
        return f"torch.optim.{cls.__name__}"
    return cls.__name__
