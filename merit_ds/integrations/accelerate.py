"""MERIT (or LAMB) with Hugging Face Accelerate (1.15), with or without its DeepSpeed plugin.

Two ways to use MERIT under ``Accelerator(deepspeed_plugin=...)``::

    # client optimizer
    opt = MERIT(merit_param_groups(model, weight_decay=0.1), lr=1e-2)
    model, opt, dl, sched = prepare_with_merit(accelerator, model, opt, dl, sched)

    # named in the DeepSpeed JSON: "optimizer": {"type": "MERIT", "params": {...}}
    opt = DummyOptim(merit_param_groups(model))     # groups, NOT model.parameters()
    sched = DummyScheduler(opt, lr_scheduler_callable=make_sched)
    model, opt, dl, sched = prepare_with_merit(accelerator, model, opt, dl, sched)

LAMB the same way: ``LAMB(merit_param_groups(model, 0.1), lr=...)`` as the client optimizer,
or ``"type": "ShardedLAMB"`` in the JSON with ``DummyOptim`` (:func:`merit_deepspeed_config`
with ``optimizer_type="ShardedLAMB"``). :func:`prepare_checked` is the general name of
:func:`prepare_with_merit` (the same function).

:func:`prepare_with_merit` is ``accelerator.prepare`` between two checks: before, it refuses
the configuration in which Accelerate silently swaps MERIT for DeepSpeedCPUAdam
(``accelerator.py:2374-2383``: ZeRO-Offload without ``"zero_force_ds_cpu_optimizer": false``);
after, :func:`merit_ds.integrations.verify.assert_merit_is_stepping` confirms the optimizer
that was asked for (the client instance's class, or the class the JSON names) steps the
weights, sharded, with biases and norms undecayed.

Schedules: Accelerate wraps a plain torch scheduler in ``AcceleratedScheduler``, which steps it
``num_processes`` times per optimizer update (``scheduler.py``, unless ``split_batches``).
Build such a scheduler with :func:`scheduler_steps` (warmup and total multiplied by that
factor). A ``DummyScheduler(lr_scheduler_callable=...)`` is stepped by DeepSpeed once per
update: build it with the plain step counts.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from ..optim import ShardableOptimizer
from ._common import OffloadSwapError, json_names, ds_named_class, json_name_of, refuse_offload_swap
from .deepspeed import check_config
from .param_groups import merit_param_groups
from .verify import NotMeritError, assert_merit_is_stepping

__all__ = [
    "prepare_with_merit",
    "prepare_checked",
    "check_before_prepare",
    "scheduler_step_factor",
    "scheduler_steps",
    "merit_deepspeed_config",
    "merit_param_groups",
    "OffloadSwapError",
    "install_accelerate_guard",
]


def merit_deepspeed_config(
    stage: int,
    *,
    micro_batch: int | str = "auto",
    grad_accum: int | str = "auto",
    offload: bool = False,
    optimizer_params: Optional[dict] = None,
    gradient_clipping: float | str = 1.0,
    optimizer_type: str = "MERIT",
    **extra: Any,
) -> dict:
    """A DeepSpeed config dict for MERIT or LAMB (for ``DeepSpeedPlugin(hf_ds_config=...)`` or a
    JSON file).

    ``optimizer_params`` given: the config names ``optimizer_type`` (``"MERIT"`` or
    ``"ShardedLAMB"``: ``"optimizer": {"type": optimizer_type, "params": optimizer_params}``;
    use ``DummyOptim``); None: the client-optimizer form (``optimizer_type`` unused).
    Always sets ``zero_allow_untested_optimizer`` (DeepSpeed refuses a non-Adam optimizer
    under ZeRO otherwise) and, with ``offload``, ``offload_optimizer: cpu`` plus
    ``zero_force_ds_cpu_optimizer: false`` (without it a *client* MERIT/LAMB is swapped by
    Accelerate or refused by DeepSpeed; the JSON-named form does not need it, and it is harmless
    there).
    ``gradient_clipping`` is always written: DeepSpeed 0.19.8 clips at 1.0 when the key is absent
    (``runtime/constants.py:203``), which is easy to miss; ``0.0`` disables clipping, ``"auto"``
    lets the HF Trainer fill in ``max_grad_norm``.
    """
    if optimizer_type not in json_names():
        raise ValueError(f"optimizer_type must be one of {sorted(json_names())}, got {optimizer_type!r}")
    zero: dict[str, Any] = {"stage": int(stage)}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }
    if offload:
        cfg["zero_force_ds_cpu_optimizer"] = False
    if optimizer_params is not None:
        cfg["optimizer"] = {"type": optimizer_type, "params": dict(optimizer_params)}
    cfg["gradient_clipping"] = gradient_clipping
    cfg.update(extra)
    return cfg


def _ds_config(accelerator) -> Optional[dict]:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.deepspeed_config


def check_before_prepare(accelerator, optimizer: Any) -> type:
    """Refuse, before ``prepare``, what would make something other than the asked-for optimizer
    train; return the merit_ds class expected to step (MERIT, LAMB).

    * client ``MERIT``/``LAMB`` + ZeRO-Offload without ``zero_force_ds_cpu_optimizer: false``
      (Accelerate would swap in DeepSpeedCPUAdam): :class:`OffloadSwapError`;
    * ``DummyOptim`` with a DeepSpeed config that names neither ``MERIT`` nor ``ShardedLAMB``,
      or without DeepSpeed: :class:`NotMeritError`;
    * anything :func:`merit_ds.integrations.deepspeed.check_config` refuses (missing
      ``zero_allow_untested_optimizer``, nvme offload, ``"type": "merit"`` misspelled,
      ``"type": "lamb"`` (DeepSpeed's FusedLamb)...).
    """
    from accelerate.utils import DummyOptim

    cfg = _ds_config(accelerator)
    if isinstance(optimizer, ShardableOptimizer):
        what = json_name_of(optimizer)
        if cfg is not None and "optimizer" in cfg:
            raise NotMeritError(
                f"a client {type(optimizer).__name__} optimizer was passed but the DeepSpeed config has an "
                f"'optimizer' section ({cfg['optimizer'].get('type')}); Accelerate requires DummyOptim then. "
                f"Remove the section or name {what} there and pass DummyOptim(merit_param_groups(model))."
            )
        if cfg is not None:
            refuse_offload_swap(cfg, type(optimizer).__name__)  # the Accelerate-specific silent swap, named as such
            check_config(cfg, client_optimizer=optimizer)
        return type(optimizer)
    if isinstance(optimizer, DummyOptim):
        if cfg is not None:
            check_config(cfg)  # spelling of the name, ZeRO/offload keys (merit_ds.integrations.deepspeed)
        named_cls = None if cfg is None else ds_named_class(cfg)
        if named_cls is None:
            named = None if cfg is None else (cfg.get("optimizer") or {}).get("type")
            raise NotMeritError(
                f"DummyOptim given but the DeepSpeed config names optimizer {named!r}, not one of {sorted(json_names())}"
            )
        return named_cls
    raise NotMeritError(
        f"expected a merit_ds optimizer ({', '.join(c.__name__ for c in json_names().values())}) or accelerate "
        f"DummyOptim, got {type(optimizer).__name__}"
    )


def prepare_with_merit(accelerator, *objects: Any, check_decay: bool = True):
    """``accelerator.prepare(*objects)`` with the optimizer checked before and after (see module doc).

    Exactly one of ``objects`` must be a merit_ds optimizer (MERIT, LAMB) or a DummyOptim (the
    DeepSpeed config then names ``MERIT`` or ``ShardedLAMB``); the model (an ``nn.Module``) is
    used for the weight-decay check when ``check_decay``. Returns what ``prepare`` returns.
    Also available as :func:`prepare_checked`.
    """
    from accelerate.utils import DummyOptim

    optimizers = [o for o in objects if isinstance(o, (torch.optim.Optimizer, DummyOptim))]
    if len(optimizers) != 1:
        raise ValueError(f"prepare_with_merit needs exactly one optimizer among the objects, got {len(optimizers)}")
    models = [o for o in objects if isinstance(o, torch.nn.Module)]
    expected = check_before_prepare(accelerator, optimizers[0])
    prepared = accelerator.prepare(*objects)
    prepared_tuple = prepared if isinstance(prepared, tuple) else (prepared,)
    prepared_opt = prepared_tuple[[i for i, o in enumerate(objects) if o is optimizers[0]][0]]
    assert_merit_is_stepping(prepared_opt, models[0] if (check_decay and models) else None, expected=expected)
    return prepared


prepare_checked = prepare_with_merit


# ---------------------------------------------------------------------------------------------
# The guard around plain accelerator.prepare (armed by `import merit_ds`)
# ---------------------------------------------------------------------------------------------
def _refuse_client_swap(accelerator, args) -> None:
    """Raise :class:`OffloadSwapError` where Accelerate would swap a client MERIT/LAMB."""
    clients = [a for a in args if isinstance(a, ShardableOptimizer)]
    if not clients:
        return
    plugin = getattr(accelerator, "deepspeed_plugin", None) or getattr(accelerator.state, "deepspeed_plugin", None)
    cfg = getattr(plugin, "deepspeed_config", None)
    if cfg is None:
        return
    refuse_offload_swap(cfg, type(clients[0]).__name__)


def install_accelerate_guard(module=None) -> None:
    """Wrap ``accelerate.accelerator.Accelerator._prepare_deepspeed`` so that plain
    ``accelerator.prepare(model, MERIT(...), ...)`` under ZeRO-Offload without
    ``"zero_force_ds_cpu_optimizer": false`` raises :class:`OffloadSwapError` instead of
    training with DeepSpeedCPUAdam (``accelerator.py:2374-2383``, ``map_pytorch_optim_to_deepspeed``).

    ``import merit_ds`` arms it (:mod:`merit_ds.integrations.trainer_guard_hook`), without
    importing accelerate. Idempotent; no effect on runs without a client MERIT/LAMB (a
    JSON-named one arrives as ``DummyOptim`` and is never swapped). ``module``: the
    ``accelerate.accelerator`` module (imported if None).
    """
    if module is None:
        from accelerate import accelerator as module
    cls = getattr(module, "Accelerator", None)
    current = getattr(cls, "_prepare_deepspeed", None)
    if current is None:
        raise RuntimeError("accelerate.accelerator.Accelerator._prepare_deepspeed is missing")
    if getattr(current, "__merit_ds_guard__", False):
        return

    @functools.wraps(current)
    def guarded(self, *args):
        _refuse_client_swap(self, args)
        return current(self, *args)

    guarded.__merit_ds_guard__ = True
    cls._prepare_deepspeed = guarded
    prepare = cls.prepare
    if not getattr(prepare, "__merit_ds_guard__", False):
        @functools.wraps(prepare)
        def prepare_guarded(self, *args, **kwargs):
            _warn_decayed_norms(args)
            return prepare(self, *args, **kwargs)

        prepare_guarded.__merit_ds_guard__ = True
        cls.prepare = prepare_guarded


def _warn_decayed_norms(args) -> None:
    """Plain ``accelerator.prepare(model, MERIT(...), ...)``: warn if MERIT/LAMB decays norm weights."""
    from .param_groups import warn_decayed_norms

    models = [a for a in args if isinstance(a, torch.nn.Module)]
    for opt in (a for a in args if isinstance(a, ShardableOptimizer)):
        for model in models:
            warn_decayed_norms(model, [(g.get("weight_decay", 0.0), opt.original_params(g)) for g in opt.param_groups],
                               type(opt).__name__, "accelerator.prepare")


def scheduler_step_factor(accelerator, *, deepspeed_scheduler: bool = False) -> int:
    """How many times Accelerate steps a prepared scheduler per optimizer update.

    ``num_processes`` for a plain torch scheduler (``AcceleratedScheduler`` without
    ``split_batches``), 1 with ``split_batches``, when the scheduler is not stepped with the
    optimizer, or for a scheduler DeepSpeed steps itself (``deepspeed_scheduler=True``:
    ``DummyScheduler`` or a DeepSpeed ``lr_schedules`` class).
    """
    if deepspeed_scheduler or accelerator.split_batches or not accelerator.step_scheduler_with_optimizer:
        return 1
    return accelerator.num_processes


def scheduler_steps(accelerator, *steps: int, deepspeed_scheduler: bool = False) -> tuple[int, ...]:
    """``steps`` (warmup, total, ...) in the scheduler's own count under Accelerate.

    ``get_cosine_schedule_with_warmup(opt, *scheduler_steps(acc, warmup, total))`` then gives
    the intended lr at every optimizer update on any number of processes.
    """
    factor = scheduler_step_factor(accelerator, deepspeed_scheduler=deepspeed_scheduler)
    return tuple(int(s) * factor for s in steps)
