"""The training loop's optimizers: building the client one, checking which one steps.

``--optimizer NAME`` takes any registered optimizer (:mod:`merit_ds.optim.registry`; the
built-ins are ``merit``, ``lamb``, ``adamw``); :mod:`.run_config` decides how it reaches
DeepSpeed from its spec's ``ds_route``. What is checked before the first step:

* an optimizer with a fragment rule (MERIT, LAMB: exact under ZeRO through
  :mod:`merit_ds.sharding`): :func:`merit_ds.integrations.verify.assert_merit_is_stepping`
  (class, a sharding layout for every flat partition, decay split);
* any other (DeepSpeed's ``AdamW``: ``torch.optim.AdamW``, or FusedAdam / DeepSpeedCPUAdam in
  AdamW mode; an element-wise third-party optimizer): the spec's ``is_stepping`` (class and
  mode) and the decay split. Element-wise, so nothing about its sharding to check.

Trust-ratio diagnostics (``track_stats`` / ``partial_stats``) exist for optimizers whose spec
says ``trust_stats`` (MERIT, LAMB); the clip fraction for those that clip (MERIT).
"""

from __future__ import annotations

from typing import Any

import torch

from merit_ds.integrations.param_groups import check_decay_split
from merit_ds.integrations.verify import decay_groups, unwrap_optimizer
from merit_ds.optim import registry

from .run_config import RunConfig

__all__ = ["build_client_optimizer", "verify_optimizer_is_stepping", "describe_stepping", "records_trust_stats",
           "records_clip_fraction", "WrongOptimizerError"]


def records_trust_stats(optimizer: str) -> bool:
    """Whether optimizer ``optimizer`` records trust-ratio statistics when ``track_stats`` is on."""
    return registry.get(optimizer).trust_stats


def records_clip_fraction(optimizer: str) -> bool:
    """... and whether its clip fraction means something (its update is clipped)."""
    return registry.get(optimizer).clips


class WrongOptimizerError(RuntimeError):
    """The optimizer DeepSpeed/Accelerate step is not the one ``--optimizer`` chose."""


def build_client_optimizer(rc: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer the loop hands to DeepSpeed (``rc.client``), built from its spec's class."""
    spec = registry.get(rc.optimizer)
    params = dict(rc.opt_params)
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    return spec.cls(groups, **params)


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


def verify_optimizer_is_stepping(engine: Any, optimizer: str, model: torch.nn.Module | None = None):
    """Fail fast unless the optimizer DeepSpeed/Accelerate actually step is the chosen one,
    correctly sharded, with no bias/norm parameter decayed. Returns it (the basic optimizer)."""
    from merit_ds.integrations.verify import NotMeritError, assert_merit_is_stepping

    spec = registry.get(optimizer)
    model = engine.module if model is None else model
    if spec.sharded:  # class, a sharding layout per ZeRO partition, decay split
        try:
            return assert_merit_is_stepping(engine, model, expected=spec.cls)
        except NotMeritError as exc:
            raise WrongOptimizerError(f"--optimizer {optimizer}: {exc}") from exc
    basic = unwrap_optimizer(engine)
    if not spec.is_stepping(basic):
        raise WrongOptimizerError(f"--optimizer {optimizer}, but the optimizer stepping the weights is "
                                  f"{type(basic).__module__}.{type(basic).__qualname__} (wrappers: {_wrappers(engine)})")
    check_decay_split(decay_groups(engine), model)
    return basic


def describe_stepping(basic, optimizer: str) -> str:
    """``MERIT``, ``LAMB``, ``torch.optim.AdamW``, ``deepspeed FusedAdam (AdamW mode)`` ..."""
    cls = type(basic)
    if registry.get(optimizer).ds_route == "deepspeed":
        if cls.__module__.startswith("deepspeed"):
            mode = " (AdamW mode)" if getattr(basic, "adam_w_mode", False) else ""
            return f"deepspeed {cls.__name__}{mode}"
        return f"{cls.__module__.replace('torch.optim.adamw', 'torch.optim')}.{cls.__name__}"
    return cls.__name__
