"""MERIT in the Hugging Face Trainer (transformers 5.23).

Two ways to ask the Trainer for MERIT; both get Hugging Face's decay/no-decay groups
(matrices decayed, biases and norms not) and work single-process, DDP and DeepSpeed::

    Trainer(..., optimizer_cls_and_kwargs=(MERIT, {"lr": 1e-2, "betas": (0.9, 0.95)}))

    register_trainer_optim()          # explicit, idempotent opt-in; then optim="merit",
    TrainingArguments(..., optim="merit", optim_args="eps=1e-6")   # or --optim merit

What the Trainer does wrong by itself, and what :func:`install_trainer_guard` (installed by
:func:`register_trainer_optim`, or on its own) does about it, at the moment the Trainer sets
up DeepSpeed (``transformers.trainer.deepspeed_init``):

* ``optimizers=(MERIT(...), sched)`` under DeepSpeed is silently discarded and AdamW trains
  (``integrations/deepspeed.py:658``): the guard raises :class:`DroppedOptimizerError`.
* a DeepSpeed JSON ``"optimizer": {"type": "MERIT"}`` makes the Trainer pass one flat list,
  every parameter decayed (``integrations/deepspeed.py:576``): the guard hands DeepSpeed the
  Trainer's own decay/no-decay groups instead.
* ZeRO-Offload without ``"zero_force_ds_cpu_optimizer": false`` makes Accelerate swap MERIT
  for DeepSpeedCPUAdam: the guard raises :class:`OffloadSwapError`.
* a DeepSpeed JSON ``"optimizer"`` section wins over ``optimizer_cls_and_kwargs`` and
  ``optim="merit"``, silently: the guard raises when MERIT was asked for and the JSON names
  another optimizer, or when both the JSON and ``optimizer_cls_and_kwargs`` name MERIT (the
  kwargs would be ignored).

The Trainer's optimizer names are a closed enum (``OptimizerNames``) with private dispatch
(``trainer_optimizer._OPTIMIZER_HANDLERS``). :func:`register_trainer_optim` checks both before
touching them and raises :class:`TransformersInternalsChanged` naming the installed
transformers version if they changed.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

from ..optim import MERIT
from ._common import OffloadSwapError, ds_names_merit, refuse_offload_swap
from .param_groups import merit_param_groups

__all__ = [
    "register_trainer_optim",
    "install_trainer_guard",
    "merit_optimizer_kwargs_from_args",
    "TransformersInternalsChanged",
    "DroppedOptimizerError",
    "OffloadSwapError",
    "TESTED_TRANSFORMERS",
]

TESTED_TRANSFORMERS = "5.23"
OPTIM_NAME = "merit"
# optim_args keys understood by optim="merit" (weight decay comes from --weight_decay, per group).
_OPTIM_ARGS = {
    "beta1": float,
    "beta2": float,
    "eps": float,
    "nonfinite_grads": str,
    "implementation": str,
    "track_stats": lambda s: {"true": True, "false": False}[s.lower()],
}


class TransformersInternalsChanged(RuntimeError):
    """A transformers internal that the registration relies on is missing or different."""


class DroppedOptimizerError(ValueError):
    """Under DeepSpeed, the Trainer would discard ``optimizers=(MERIT(...), ...)``."""


def _internals_error(what: str) -> TransformersInternalsChanged:
    import transformers

    return TransformersInternalsChanged(
        f"merit_ds cannot register optim='{OPTIM_NAME}' with transformers {transformers.__version__}: {what}. "
        f"This registration relies on private Trainer internals verified with transformers "
        f"{TESTED_TRANSFORMERS}. Use Trainer(..., optimizer_cls_and_kwargs=(merit_ds.MERIT, {{...}})) "
        "instead: it needs no registration."
    )


def _internals():
    """The enum, the handler registry and the context type, each checked for what we use."""
    try:
        from transformers import trainer as trainer_mod
        from transformers import trainer_optimizer as topt
        from transformers.training_args import OptimizerNames
    except ImportError as exc:  # pragma: no cover - depends on the installed version
        raise _internals_error(f"import failed ({exc})") from exc
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not isinstance(getattr(OptimizerNames, attr, None), (dict, list)):
            raise _internals_error(f"OptimizerNames has no {attr} (not a standard Enum any more)")
    if not issubclass(OptimizerNames, str):
        raise _internals_error("OptimizerNames is not a str Enum any more")
    handlers = getattr(topt, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        raise _internals_error("transformers.trainer_optimizer._OPTIMIZER_HANDLERS is missing")
    if getattr(trainer_mod, "_OPTIMIZER_HANDLERS", None) is not handlers:
        raise _internals_error("Trainer no longer dispatches through trainer_optimizer._OPTIMIZER_HANDLERS")
    ctx_cls = getattr(topt, "OptimizerContext", None)
    fields = {f.name for f in dataclasses.fields(ctx_cls)} if dataclasses.is_dataclass(ctx_cls) else set()
    missing = {"args", "optimizer_kwargs", "adam_kwargs", "optim_args"} - fields
    if missing:
        raise _internals_error(f"OptimizerContext lacks {sorted(missing)}")
    return OptimizerNames, handlers


def merit_optimizer_kwargs_from_args(lr: float, betas, eps: float, optim_args: dict[str, str]) -> dict[str, Any]:
    """MERIT's constructor kwargs from the Trainer's ``learning_rate``, ``adam_beta1/2``,
    ``adam_epsilon`` and ``optim_args`` (``"beta2=0.95,eps=1e-6"``; ``optim_args`` win)."""
    unknown = set(optim_args) - set(_OPTIM_ARGS)
    if unknown:
        raise ValueError(
            f"optim_args {sorted(unknown)} are not understood by optim='{OPTIM_NAME}'; accepted: "
            f"{sorted(_OPTIM_ARGS)} (weight decay comes from --weight_decay, lr from --learning_rate)"
        )
    parsed = {k: _OPTIM_ARGS[k](v) for k, v in optim_args.items()}
    beta1, beta2 = betas
    kwargs = {
        "lr": lr,
        "betas": (parsed.pop("beta1", beta1), parsed.pop("beta2", beta2)),
        "eps": parsed.pop("eps", eps),
        **parsed,
    }
    return kwargs


def _merit_handler(ctx) -> tuple[type, dict[str, Any]]:
    """The ``_OPTIMIZER_HANDLERS`` entry for ``optim="merit"``."""
    kwargs = merit_optimizer_kwargs_from_args(
        ctx.optimizer_kwargs["lr"], ctx.adam_kwargs["betas"], ctx.adam_kwargs["eps"], ctx.optim_args
    )
    return MERIT, kwargs


def register_trainer_optim() -> None:
    """Opt in to ``TrainingArguments(optim="merit")`` and ``--optim merit``. Idempotent.

    Adds ``OptimizerNames.MERIT`` (value ``"merit"``) to transformers' closed optimizer enum and
    a handler to its private dispatch table, after checking both are what transformers
    ``5.23`` has; raises :class:`TransformersInternalsChanged` otherwise. Also installs
    :func:`install_trainer_guard`. Call it before building ``TrainingArguments`` or an
    ``HfArgumentParser`` (the parser lists the enum's values when it is built).
    """
    names, handlers = _internals()
    member = names._value2member_map_.get(OPTIM_NAME)
    if member is None:
        member = str.__new__(names, OPTIM_NAME)
        member._name_ = "MERIT"
        member._value_ = OPTIM_NAME
        member._sort_order_ = len(names._member_names_)
        type.__setattr__(names, "MERIT", member)
        names._member_map_["MERIT"] = member
        names._value2member_map_[OPTIM_NAME] = member
        names._member_names_.append("MERIT")
    if names(OPTIM_NAME) is not member or names.MERIT is not member or member not in list(names):
        raise _internals_error("adding a member to OptimizerNames did not take effect")
    handlers[member] = _merit_handler
    install_trainer_guard()


# ---------------------------------------------------------------------------------------------
# The guard around the Trainer's DeepSpeed setup
# ---------------------------------------------------------------------------------------------
def _asks_for_merit_client(trainer) -> bool:
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None)
    if cls_and_kwargs is not None:
        cls = cls_and_kwargs[0]
        return isinstance(cls, type) and issubclass(cls, MERIT)
    return str(getattr(trainer.args.optim, "value", trainer.args.optim)) == OPTIM_NAME


def _guarded_deepspeed_init(original, trainer, num_training_steps, inference=False, **kwargs):
    if inference:
        return original(trainer, num_training_steps, inference=inference, **kwargs)
    config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
    if isinstance(trainer.optimizer, MERIT):
        raise DroppedOptimizerError(
            "Trainer(optimizers=(MERIT(...), scheduler)) does not work with DeepSpeed: transformers "
            "discards the optimizer instance (and the scheduler) and trains with "
            f"{'the JSON optimizer' if 'optimizer' in config else 'AdamW'} instead. Pass "
            "Trainer(..., optimizer_cls_and_kwargs=(merit_ds.MERIT, {'lr': ...})) or use "
            "optim='merit' (merit_ds.integrations.hf_trainer.register_trainer_optim()), or name "
            "MERIT in the DeepSpeed JSON ('optimizer': {'type': 'MERIT'})."
        )
    json_merit = ds_names_merit(config)
    if "optimizer" in config and _asks_for_merit_client(trainer):
        named = (config.get("optimizer") or {}).get("type")
        explicit = getattr(trainer, "optimizer_cls_and_kwargs", None) is not None
        if not json_merit or explicit:
            # The JSON's optimizer wins (DummyOptim); the Trainer would silently ignore the request.
            raise ValueError(
                f"the DeepSpeed config names optimizer {named!r} and the Trainer was asked for MERIT "
                f"({'optimizer_cls_and_kwargs' if explicit else 'optim=merit'}): DeepSpeed builds the "
                "JSON's optimizer and the Trainer silently ignores "
                f"{'the class and its kwargs' if explicit else 'optim'}. Remove the 'optimizer' section "
                "from the DeepSpeed config, or name MERIT there (with its params) and drop "
                "optimizer_cls_and_kwargs."
            )
    if json_merit:
        from .deepspeed import check_config

        check_config(config)  # "MERIT" spelled as DeepSpeed looks it up, ZeRO/offload keys present
    if "optimizer" not in config and _asks_for_merit_client(trainer):
        refuse_offload_swap(config)  # the client path is the one Accelerate swaps
    optimizer, lr_scheduler = original(trainer, num_training_steps, inference=inference, **kwargs)
    if json_merit:
        # The Trainer passes DummyOptim(params=flat list): every parameter decayed. Give
        # DeepSpeed the Trainer's own groups; the decay group inherits the JSON weight_decay.
        optimizer.params = merit_param_groups(trainer.model, trainer=trainer)
    return optimizer, lr_scheduler


def install_trainer_guard() -> None:
    """Wrap ``transformers.trainer.deepspeed_init`` with the checks listed in the module
    docstring. Idempotent; has no effect on runs that do not involve MERIT."""
    from transformers import trainer as trainer_mod

    current = getattr(trainer_mod, "deepspeed_init", None)
    if current is None:
        raise _internals_error("transformers.trainer.deepspeed_init is missing")
    if getattr(current, "__merit_ds_guard__", False):
        return
    guarded = functools.wraps(current)(lambda *a, **k: _guarded_deepspeed_init(current, *a, **k))
    guarded.__merit_ds_guard__ = True
    trainer_mod.deepspeed_init = guarded


# ---------------------------------------------------------------------------------------------
# Verification at the start of training
# ---------------------------------------------------------------------------------------------
def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class MeritCheckCallback(_trainer_callback_base()):
    """``Trainer(..., callbacks=[MeritCheckCallback()])``: at ``on_train_begin`` (after the
    Trainer's DeepSpeed/Accelerate setup) run
    :func:`merit_ds.integrations.verify.assert_merit_is_stepping` on the Trainer's optimizer and
    model, so a run that would step with anything but correctly sharded, correctly decayed
    MERIT stops before its first step."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from .verify import assert_merit_is_stepping

        merit = assert_merit_is_stepping(optimizer, model)
        # optimizer_cls_and_kwargs=(MERIT, {...}) ignores args.learning_rate: say so.
        initial = {float(g.get("initial_lr", g["lr"])) for g in merit.param_groups}
        if initial and initial != {float(args.learning_rate)}:
            warnings.warn(
                f"MERIT's initial lr {sorted(initial)} differs from TrainingArguments.learning_rate="
                f"{args.learning_rate}: with optimizer_cls_and_kwargs the Trainer uses the lr in the "
                "kwargs and ignores learning_rate.",
                UserWarning,
                stacklevel=2,
            )


__all__.append("MeritCheckCallback")
