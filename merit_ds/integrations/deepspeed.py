"""MERIT by name in DeepSpeed's JSON config, and a pre-flight check of that config.

DeepSpeed builds the optimizer named in ``"optimizer": {"type": NAME}``: its built-ins, else
``getattr(torch.optim, NAME)`` (``runtime/engine.py:1985-1986`` accepts the name,
``:2548`` constructs it as ``torch_optimizer(model_parameters, **params)``). There is no
registry, and the lookup is case-sensitive. So ``import merit_ds`` sets
``torch.optim.MERIT = MERIT`` (:func:`register_json_name`), after which::

    "optimizer": {"type": "MERIT", "params": {"lr": 1e-3, "weight_decay": 0.1}},
    "zero_allow_untested_optimizer": true

in a config trains with sharded MERIT (the name must be spelled ``MERIT``). Two keys are
required by DeepSpeed for any optimizer it did not write: ``zero_allow_untested_optimizer``
under ZeRO (``engine.py:2298-2301``), and ``"zero_force_ds_cpu_optimizer": false`` with
``offload_optimizer`` (``engine.py:2342-2346``; accelerate instead silently swaps the optimizer
for DeepSpeedCPUAdam). :func:`check_config` reports both, with the fix, before DeepSpeed
starts.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Union

import torch

from merit_ds.optim import MERIT

from ._common import ds_forces_cpu_optimizer, ds_offloads_optimizer

__all__ = ["register_json_name", "check_config", "JSON_NAME", "MeritConfigError"]

JSON_NAME = "MERIT"


class MeritConfigError(ValueError):
    """A DeepSpeed config that cannot run MERIT as written; the message names the fix."""


def register_json_name() -> None:
    """Make ``"type": "MERIT"`` resolvable by DeepSpeed (``getattr(torch.optim, "MERIT")``)."""
    existing = getattr(torch.optim, JSON_NAME, None)
    if existing is not None and existing is not MERIT and getattr(existing, "__module__", "") != MERIT.__module__:
        raise RuntimeError(f"torch.optim.{JSON_NAME} is already taken by {existing!r}")
    setattr(torch.optim, JSON_NAME, MERIT)


def _load(config: Union[str, os.PathLike, Mapping[str, Any]]) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    with open(config) as f:
        return json.load(f)


def check_config(config: Union[str, os.PathLike, Mapping[str, Any]], *, client_optimizer: bool = False) -> None:
    """Raise :class:`MeritConfigError` if DeepSpeed would refuse (or silently replace) MERIT.

    ``config`` is the DeepSpeed config (dict or JSON path). The checks apply when the config
    names ``"MERIT"`` or when ``client_optimizer=True`` (a MERIT instance passed to
    ``deepspeed.initialize(optimizer=...)``). A no-op otherwise.
    """
    cfg = _load(config)
    opt = cfg.get("optimizer") or {}
    name = opt.get("type")
    if name is not None and name != JSON_NAME and name.lower() == JSON_NAME.lower():
        raise MeritConfigError(
            f'DeepSpeed looks optimizer names up case-sensitively: write "type": "{JSON_NAME}", not "{name}".'
        )
    if name != JSON_NAME and not client_optimizer:
        return
    zero = cfg.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0)
    if stage > 0 and not cfg.get("zero_allow_untested_optimizer", False):
        raise MeritConfigError(
            'MERIT under ZeRO needs "zero_allow_untested_optimizer": true at the top level of the DeepSpeed '
            "config (DeepSpeed only trusts its own optimizers by default; merit_ds makes MERIT exact under "
            "ZeRO 1/2/3)."
        )
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if stage > 0 and ds_offloads_optimizer(cfg) and ds_forces_cpu_optimizer(cfg):
        raise MeritConfigError(
            'MERIT with "offload_optimizer" needs "zero_force_ds_cpu_optimizer": false at the top level of the '
            "DeepSpeed config; otherwise DeepSpeed refuses MERIT (and accelerate silently replaces it with "
            "DeepSpeedCPUAdam)."
        )
    if offload == "nvme":
        raise MeritConfigError(
            "MERIT is not supported with offload_optimizer.device=nvme (optimizer-state swapping); use cpu."
        )
    if opt.get("params", {}).get("max_grad_norm") is not None:
        raise MeritConfigError('use DeepSpeed\'s "gradient_clipping", not optimizer.params.max_grad_norm')


register_json_name()
