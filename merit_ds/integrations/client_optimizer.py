"""A client optimizer must not silently win over the optimizer the DeepSpeed JSON names.

DeepSpeed builds the JSON's ``"optimizer"`` only when ``deepspeed.initialize`` gets no
``optimizer=``: a client optimizer wins and the JSON entry is never read
(``runtime/engine.py`` ``_configure_optimizer``, docs/design/field_notes.md). A script that
always builds its own (Megatron-DeepSpeed's ``pretrain_gpt.py`` passes Adam with its
``lr_scheduler`` and ``mpu``) would then train Adam while its config says ``"MERIT"``.

Inside ``deepspeed.initialize`` (armed by ``import merit_ds``, :func:`resolve`):

- the JSON names a merit_ds optimizer and the client optimizer is that class: nothing to do;
- another client optimizer: :class:`~merit_ds.integrations.deepspeed.MeritConfigError`
  naming both, with the two fixes (drop ``optimizer=``, or drop the JSON entry);
- opted in (``MERIT_DS_REPLACE_CLIENT_OPTIMIZER=1``, set by ``python -m merit_ds.run
  --replace-client-optimizer``): the client optimizer is replaced by the JSON's optimizer,
  built on the client's own param groups (:func:`replacement_groups`), and a passed
  ``lr_scheduler`` is re-pointed to it; one line says so.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

__all__ = ["ENV", "resolve", "replacement_groups", "replace"]

#: The opt-in: replace a client optimizer by the JSON's merit_ds optimizer.
ENV = "MERIT_DS_REPLACE_CLIENT_OPTIMIZER"

#: Keys of a param group that describe the group, not the client optimizer's hyperparameters:
#: kept as they are (Megatron's scheduler reads ``lr_mult``/``wd_mult`` every step and writes
#: ``lr``/``weight_decay``).
_ALWAYS_KEPT = ("params", "lr", "weight_decay")


def _named_spec(cfg: Mapping[str, Any]):
    from merit_ds.optim import registry

    from ._common import json_names

    name = (cfg.get("optimizer") or {}).get("type") if isinstance(cfg, Mapping) else None
    if name is None or name not in json_names():
        return None
    return registry.by_json_name(name)


def _describe(optimizer) -> str:
    if isinstance(optimizer, type):
        return optimizer.__name__
    if callable(optimizer) and not hasattr(optimizer, "param_groups"):
        return f"a callable ({getattr(optimizer, '__name__', type(optimizer).__name__)})"
    return type(optimizer).__name__


def replacement_groups(client) -> list[dict]:
    """The client's param groups for the replacement: the same parameters in the same groups,
    each group's ``lr``, ``weight_decay`` and every key that is not one of the client
    optimizer's own hyperparameters (``lr_mult``, ``wd_mult``, ``name``, ``initial_lr`` ...);
    the client's ``betas``/``eps``/... are dropped so the JSON's ``params`` apply."""
    own = set(getattr(client, "defaults", {}) or {}) - set(_ALWAYS_KEPT)
    return [{k: v for k, v in g.items() if k not in own} for g in client.param_groups]


def replace(client, cls, json_params: Mapping[str, Any], lr_scheduler=None):
    """``cls(replacement_groups(client), **json_params)``; ``lr_scheduler.optimizer`` re-pointed."""
    optimizer = cls(replacement_groups(client), **dict(json_params))
    if lr_scheduler is not None and hasattr(lr_scheduler, "optimizer"):
        lr_scheduler.optimizer = optimizer
    return optimizer


def resolve(cfg: Optional[Mapping[str, Any]], bound: dict) -> bool:
    """Check (and, opted in, fix) a ``deepspeed.initialize`` call's client optimizer against the
    JSON. ``bound``: the call's arguments by name, modified in place on replacement. Returns
    whether the optimizer was replaced."""
    from .deepspeed import MeritConfigError

    client = bound.get("optimizer")
    spec = _named_spec(cfg) if cfg is not None else None
    if client is None or spec is None or isinstance(client, spec.cls):
        return False
    json_name = cfg["optimizer"]["type"]
    if os.environ.get(ENV, "") not in ("1", "true", "True"):
        raise MeritConfigError(
            f'the DeepSpeed config names "optimizer": {{"type": "{json_name}"}}, but deepspeed.initialize also got '
            f"optimizer={_describe(client)}, and DeepSpeed silently uses the client optimizer (the JSON entry is never "
            f"read). Fix one of: drop optimizer= from the call (DeepSpeed then builds {json_name} from the JSON); or drop "
            f'the "optimizer" entry from the JSON to train {_describe(client)}. For a script that always builds its own '
            f"(Megatron-DeepSpeed), run it under python -m merit_ds.run --replace-client-optimizer (or set {ENV}=1): "
            f"{json_name} is then built on the script's own param groups.")
    if not hasattr(client, "param_groups"):
        raise MeritConfigError(
            f"{ENV}=1 replaces a client optimizer instance by {json_name}, but deepspeed.initialize got "
            f"optimizer={_describe(client)} (not an instance): drop optimizer= instead.")
    scheduler = bound.get("lr_scheduler")
    new = replace(client, spec.cls, (cfg["optimizer"].get("params") or {}), scheduler)
    bound["optimizer"] = new
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        sizes = ", ".join(str(len(g["params"])) for g in new.param_groups)
        moved = f"; lr_scheduler {type(scheduler).__name__} now drives it" if scheduler is not None else ""
        print(f"merit_ds: replaced the client optimizer {type(client).__name__} by {json_name} from the DeepSpeed "
              f"config, on its {len(new.param_groups)} param groups ({sizes} tensors; per-group lr/weight_decay and "
              f"other keys kept){moved} [{ENV}=1]", flush=True)
    return True
