"""MERIT (and LAMB) in the Hugging Face Trainer (transformers 5.23).

Two ways to ask the Trainer for MERIT; both get Hugging Face's decay/no-decay groups
(matrices decayed, biases and norms not) and work single-process, DDP and DeepSpeed::

    Trainer(..., optimizer_cls_and_kwargs=(MERIT, {"lr": 1e-2, "betas": (0.9, 0.95)}))

    register_trainer_optim()          # explicit, idempotent opt-in; then optim="merit",
    TrainingArguments(..., optim="merit", optim_args="eps=1e-6")   # or --optim merit

LAMB the same ways: ``optimizer_cls_and_kwargs=(merit_ds.LAMB, {...})``, or
``optim="sharded_lamb"`` after :func:`register_trainer_optim` (the name matches the JSON's
``"ShardedLAMB"`` and cannot collide with a future transformers ``"lamb"``), or
``"type": "ShardedLAMB"`` in the DeepSpeed JSON. Everything below said of MERIT holds for LAMB.

What the Trainer does wrong by itself, and what :func:`install_trainer_guard` (installed by
:func:`register_trainer_optim`, or on its own) does about it, at the moment the Trainer sets
up DeepSpeed (``transformers.trainer.deepspeed_init``):

* ``optimizers=(MERIT(...), sched)`` under DeepSpeed is silently discarded and AdamW trains
  (``integrations/deepspeed.py:658``): the guard raises :class:`DroppedOptimizerError`.
* a DeepSpeed JSON ``"optimizer": {"type": "MERIT"}`` makes the Trainer pass one flat list,
  every parameter decayed (``integrations/deepspeed.py:576``): the guard hands DeepSpeed the
  Trainer's own decay/no-decay groups instead.
* ZeRO-Offload without ``"zero_force_ds_cpu_optimizer": false`` makes Accelerate swap a
  client MERIT (``optimizer_cls_and_kwargs``, ``optim="merit"``) for DeepSpeedCPUAdam: the
  guard raises :class:`OffloadSwapError`. (MERIT named in the JSON is not swapped and needs
  no such key.)
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
from typing import Any, Optional

from ..optim import MERIT, ShardableOptimizer, registry
from ..optim.spec import parse_bool
from ._common import OffloadSwapError, ds_named_class, is_registered_class, json_name_of, refuse_offload_swap
from .param_groups import merit_param_groups

__all__ = [
    "register_trainer_optim",
    "install_trainer_guard",
    "merit_optimizer_kwargs_from_args",
    "optim_names",
    "TransformersInternalsChanged",
    "DroppedOptimizerError",
    "OffloadSwapError",
    "TESTED_TRANSFORMERS",
]

TESTED_TRANSFORMERS = "5.23"
OPTIM_NAME = "merit"


def optim_names() -> dict[str, tuple[str, type]]:
    """``optim=`` value -> (OptimizerNames member name, class) for every registered optimizer
    that offers one (:attr:`merit_ds.optim.spec.OptimizerSpec.hf_optim`): ``"merit"``,
    ``"sharded_lamb"``, ... (what :func:`register_trainer_optim` adds)."""
    return {s.hf_optim: (s.hf_optim.upper(), s.cls) for s in registry.specs() if s.hf_optim}


# optim_args keys every optim="<name>" understands where its class takes the argument (weight
# decay comes from --weight_decay, per group); a spec adds its own (hf_optim_args).
_COMMON_OPTIM_ARGS = {
    "beta1": ("betas", float),
    "beta2": ("betas", float),
    "eps": ("eps", float),
    "nonfinite_grads": ("nonfinite_grads", str),
    "implementation": ("implementation", str),
    "track_stats": ("track_stats", parse_bool),
}


def _optim_args_of(cls: type) -> dict:
    """The ``optim_args`` keys ``optim=<cls's name>`` accepts, with their parsers."""
    from .deepspeed import accepted_params

    spec = registry.by_class(cls)
    takes = set(accepted_params(cls))
    accepted = {k: parse for k, (arg, parse) in _COMMON_OPTIM_ARGS.items() if arg in takes}
    accepted.update(spec.hf_optim_args if spec is not None else {})
    return accepted


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


def merit_optimizer_kwargs_from_args(
    lr: float, betas, eps: float, optim_args: dict[str, str], cls: type = MERIT
) -> dict[str, Any]:
    """``cls``'s (MERIT's, LAMB's) constructor kwargs from the Trainer's ``learning_rate``,
    ``adam_beta1/2``, ``adam_epsilon`` and ``optim_args`` (``"beta2=0.95,eps=1e-6"``;
    ``optim_args`` win). LAMB also takes ``max_trust_ratio`` (a number or ``none``) and
    ``bias_correction`` (``true``/``false``)."""
    accepted = _optim_args_of(cls)
    spec = registry.by_class(cls)
    optim_name = spec.hf_optim if spec is not None and spec.hf_optim else cls.__name__
    unknown = set(optim_args) - set(accepted)
    if unknown:
        raise ValueError(
            f"optim_args {sorted(unknown)} are not understood by optim='{optim_name}'; accepted: "
            f"{sorted(accepted)} (weight decay comes from --weight_decay, lr from --learning_rate)"
        )
    parsed = {k: accepted[k](v) for k, v in optim_args.items()}
    beta1, beta2 = betas
    takes = set(_accepted(cls))
    kwargs: dict[str, Any] = {"lr": lr}
    if "betas" in takes:
        kwargs["betas"] = (parsed.pop("beta1", beta1), parsed.pop("beta2", beta2))
    if "eps" in takes:
        kwargs["eps"] = parsed.pop("eps", eps)
    kwargs.update(parsed)
    return kwargs


def _accepted(cls: type) -> list[str]:
    from .deepspeed import accepted_params

    return accepted_params(cls)


def _handler_for(cls: type):
    def handler(ctx) -> tuple[type, dict[str, Any]]:
        """The ``_OPTIMIZER_HANDLERS`` entry for ``optim="merit"`` / ``"sharded_lamb"`` / ..."""
        kwargs = merit_optimizer_kwargs_from_args(
            ctx.optimizer_kwargs["lr"], ctx.adam_kwargs["betas"], ctx.adam_kwargs["eps"], ctx.optim_args, cls
        )
        return cls, kwargs

    handler.__merit_ds_class__ = cls
    return handler


def register_trainer_optim() -> None:
    """Opt in to ``TrainingArguments(optim="merit")`` / ``--optim merit``, ``optim="sharded_lamb"``
    and every other registered optimizer's ``hf_optim`` name (now, and for optimizers registered
    later). Idempotent.

    Adds ``OptimizerNames.MERIT`` (value ``"merit"``), ``OptimizerNames.SHARDED_LAMB`` (value
    ``"sharded_lamb"``), ... to transformers' closed optimizer enum and handlers to its private
    dispatch table, after checking both are what transformers ``5.23`` has; raises
    :class:`TransformersInternalsChanged` otherwise. Also installs :func:`install_trainer_guard`.
    Call it before building ``TrainingArguments`` or an ``HfArgumentParser`` (the parser lists
    the enum's values when it is built).
    """
    _internals()  # checked before anything is touched
    registry.on_register(_register_hf_name)
    install_trainer_guard()


def _register_hf_name(spec) -> None:
    """Add ``spec.hf_optim`` to transformers' OptimizerNames and its handler table."""
    if not spec.hf_optim:
        return
    names, handlers = _internals()
    value, member_name, cls = spec.hf_optim, spec.hf_optim.upper(), spec.cls
    taken = names._member_map_.get(member_name)
    if taken is not None and taken.value != value:
        raise _internals_error(f"OptimizerNames.{member_name} already exists with value {taken.value!r}")
    member = names._value2member_map_.get(value)
    if member is None:
        member = str.__new__(names, value)
        member._name_ = member_name
        member._value_ = value
        member._sort_order_ = len(names._member_names_)
        type.__setattr__(names, member_name, member)
        names._member_map_[member_name] = member
        names._value2member_map_[value] = member
        names._member_names_.append(member_name)
    if names(value) is not member or getattr(names, member_name) is not member or member not in list(names):
        raise _internals_error("adding a member to OptimizerNames did not take effect")
    current = handlers.get(member)
    if getattr(current, "__merit_ds_class__", None) is not cls:
        handlers[member] = _handler_for(cls)


# ---------------------------------------------------------------------------------------------
# The guard around the Trainer's DeepSpeed setup
# ---------------------------------------------------------------------------------------------
def _asked_client_class(trainer) -> Optional[type]:
    """The merit_ds class the Trainer was asked to build itself (``optimizer_cls_and_kwargs`` or
    ``optim="merit"``/``"sharded_lamb"``), or None."""
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None)
    if cls_and_kwargs is not None:
        cls = cls_and_kwargs[0]
        return cls if is_registered_class(cls) else None
    spec = registry.by_hf_optim(str(getattr(trainer.args.optim, "value", trainer.args.optim)))
    return None if spec is None else spec.cls


def _guarded_deepspeed_init(original, trainer, num_training_steps, inference=False, **kwargs):
    if inference:
        return original(trainer, num_training_steps, inference=inference, **kwargs)
    config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
    if isinstance(trainer.optimizer, ShardableOptimizer) or is_registered_class(type(trainer.optimizer)):
        what = type(trainer.optimizer).__name__
        cls_name = "merit_ds." + what if type(trainer.optimizer).__module__.startswith("merit_ds.") else what
        spec = registry.by_class(trainer.optimizer)
        hf_name = f"optim={spec.hf_optim!r}" if spec is not None and spec.hf_optim else "optim=<its name>"
        raise DroppedOptimizerError(
            f"Trainer(optimizers=({what}(...), scheduler)) does not work with DeepSpeed: transformers "
            "discards the optimizer instance (and the scheduler) and trains with "
            f"{'the JSON optimizer' if 'optimizer' in config else 'AdamW'} instead. Pass "
            f"Trainer(..., optimizer_cls_and_kwargs=({cls_name}, {{'lr': ...}})) or use "
            f"{hf_name} (merit_ds.integrations.hf_trainer.register_trainer_optim()), or "
            f"name it in the DeepSpeed JSON ('optimizer': {{'type': '{json_name_of(trainer.optimizer)}'}})."
        )
    json_cls = ds_named_class(config)
    asked = _asked_client_class(trainer)
    if json_cls is not None or asked is not None:
        from .deepspeed import check_config

        # The name spelled as DeepSpeed looks it up ("lamb" is DeepSpeed's FusedLamb: explained),
        # ZeRO/offload keys present.
        check_config(config)
    if "optimizer" in config and asked is not None:
        named = (config.get("optimizer") or {}).get("type")
        explicit = getattr(trainer, "optimizer_cls_and_kwargs", None) is not None
        if json_cls is None or explicit or not issubclass(json_cls, asked):
            # The JSON's optimizer wins (DummyOptim); the Trainer would silently ignore the request.
            optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
            raise ValueError(
                f"the DeepSpeed config names optimizer {named!r} and the Trainer was asked for {asked.__name__} "
                f"({'optimizer_cls_and_kwargs' if explicit else 'optim=' + optim}): DeepSpeed builds the "
                "JSON's optimizer and the Trainer silently ignores "
                f"{'the class and its kwargs' if explicit else 'optim'}. Remove the 'optimizer' section "
                f"from the DeepSpeed config, or name {json_name_of(asked)} there (with its params) and drop "
                "optimizer_cls_and_kwargs."
            )
    if "optimizer" not in config and asked is not None:
        refuse_offload_swap(config, asked.__name__)  # the client path is the one Accelerate swaps
    optimizer, lr_scheduler = original(trainer, num_training_steps, inference=inference, **kwargs)
    if json_cls is not None:
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
    MERIT stops before its first step. ``MeritCheckCallback(merit_ds.LAMB)`` (also spelled
    ``OptimizerCheckCallback(merit_ds.LAMB)``) expects LAMB instead."""

    def __init__(self, expected: type = MERIT):
        self.expected = expected

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from .verify import assert_merit_is_stepping

        opt = assert_merit_is_stepping(optimizer, model, expected=self.expected)
        # optimizer_cls_and_kwargs=(MERIT, {...}) ignores args.learning_rate: say so.
        initial = {float(g.get("initial_lr", g["lr"])) for g in opt.param_groups}
        if initial and initial != {float(args.learning_rate)}:
            warnings.warn(
                f"{type(opt).__name__}'s initial lr {sorted(initial)} differs from TrainingArguments.learning_rate="
                f"{args.learning_rate}: with optimizer_cls_and_kwargs the Trainer uses the lr in the "
                "kwargs and ignores learning_rate.",
                UserWarning,
                stacklevel=2,
            )


OptimizerCheckCallback = MeritCheckCallback
__all__ += ["MeritCheckCallback", "OptimizerCheckCallback"]
