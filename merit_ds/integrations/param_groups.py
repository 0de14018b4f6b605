"""Weight-decay grouping for MERIT (and LAMB, the same groups): matrices decayed, biases and norms not.

The grouping is Hugging Face's own (``Trainer.get_decay_parameter_names``: everything except
parameters of LayerNorm modules and names matching bias/norm patterns); it is never
recomputed here. The same groups serve every path:

* HF Trainer: the Trainer builds them itself for ``optimizer_cls_and_kwargs`` / ``optim="merit"``
  (``"sharded_lamb"``);
  :mod:`merit_ds.integrations.hf_trainer` rebuilds them for the one path where the Trainer
  does not (a DeepSpeed JSON ``"optimizer"`` section, where it passes one flat list).
* Accelerate / plain DeepSpeed: ``DummyOptim(merit_param_groups(model, wd))`` or
  ``deepspeed.initialize(model_parameters=merit_param_groups(model, wd))``; DeepSpeed builds the
  JSON-named optimizer with these groups, and a group's ``"weight_decay": 0.0`` overrides the
  JSON's ``weight_decay``.

:func:`check_decay_split` is the loud half: given what an optimizer really holds, it raises when
a bias or norm is decayed (e.g. ``DummyOptim(model.parameters())`` with ``weight_decay > 0``).
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

from torch import nn

__all__ = ["decay_parameter_names", "merit_param_groups", "check_decay_split", "DecaySplitError",
           "warn_decayed_norms"]


class DecaySplitError(ValueError):
    """Weight decay would be applied to biases or norm parameters."""


def decay_parameter_names(model: nn.Module, trainer=None) -> set[str]:
    """Names of the parameters that get weight decay, as Hugging Face decides them.

    ``trainer``: a ``transformers.Trainer`` whose (possibly overridden)
    ``get_decay_parameter_names`` is used; without it, ``Trainer.get_decay_parameter_names`` is
    called unbound (it does not use ``self`` in transformers 5.23).
    """
    if trainer is not None:
        return set(trainer.get_decay_parameter_names(model))
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def merit_param_groups(
    model: nn.Module, weight_decay: Optional[float] = None, *, trainer=None, **group_options
) -> list[dict]:
    """Two param groups: HF's decay parameters, then the rest with ``weight_decay=0.0``.

    ``weight_decay=None`` leaves the first group without the key, so it inherits the
    optimizer's default (the DeepSpeed JSON's ``weight_decay`` on the JSON path). Extra
    ``group_options`` (``lr``, ``betas``...) go into both groups. Only parameters with
    ``requires_grad`` are included; empty groups are dropped.
    """
    names = decay_parameter_names(model, trainer)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if name in names else no_decay).append(p)
    first = {"params": decay, **group_options}
    if weight_decay is not None:
        first["weight_decay"] = float(weight_decay)
    groups = [first, {"params": no_decay, **group_options, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def check_decay_split(
    groups: Iterable[tuple[float, Iterable[nn.Parameter]]], model: nn.Module, *, trainer=None
) -> None:
    """Raise :class:`DecaySplitError` if a group with ``weight_decay > 0`` holds a parameter
    that Hugging Face's grouping exempts from decay (a bias, a LayerNorm weight...).

    ``groups``: ``(weight_decay, original_parameters)`` per optimizer group, as read by
    :func:`merit_ds.integrations.verify.decay_groups` from a plain or ZeRO-wrapped optimizer.
    """
    names = decay_parameter_names(model, trainer)
    name_of = {id(p): n for n, p in model.named_parameters()}
    bad = []
    for wd, params in groups:
        if float(wd) > 0:
            bad += [name_of.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in params if name_of.get(id(p)) not in names]
    if bad:
        shown = ", ".join(bad[:6]) + (f", ... ({len(bad)} in all)" if len(bad) > 6 else "")
        raise DecaySplitError(
            f"weight decay > 0 is applied to parameters that must not be decayed: {shown}. "
            "This happens when the optimizer receives one flat parameter list, e.g. "
            "DummyOptim(model.parameters()) with a DeepSpeed JSON 'optimizer' section. Pass "
            "merit_ds.integrations.param_groups.merit_param_groups(model) instead "
            "(DummyOptim(params=...) or deepspeed.initialize(model_parameters=...))."
        )


def _norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of normalization modules (LayerNorm, RMSNorm, GroupNorm, BatchNorm,
    ...: any module class whose name contains "Norm", as HF's grouping treats them)."""
    out = set()
    for mod_name, mod in model.named_modules():
        if "norm" in type(mod).__name__.lower():
            for p_name, _ in mod.named_parameters(recurse=False):
                out.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return out


_warned: set = set()


def warn_decayed_norms(model: nn.Module, groups: Iterable[tuple[float, Iterable[nn.Parameter]]], what: str,
                       where: str) -> list[str]:
    """One :class:`UserWarning` naming the normalization weights that a trust-ratio optimizer
    (``what``: MERIT, LAMB) would decay, or nothing; returns their names.

    ``groups``: ``(weight_decay, parameters)`` per param group. Hugging Face's grouping, the recipes
    and the MERIT paper's setup exempt biases and normalization weights from decay; decaying a
    LayerNorm gain pulls it toward 0 for no regularisation benefit. A typical cause: a hand-written
    no-decay list such as ``["bias", "LayerNorm.weight"]``, which misses GPT-2's
    ``ln_1``/``ln_2``/``ln_f``. Once per model, optimizer class and entry path."""
    norms = _norm_parameter_names(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    hit = sorted({name_of[id(p)] for wd, params in groups if float(wd) > 0 for p in params
                  if id(p) in name_of and name_of[id(p)] in norms})
    key = (id(model), what, where)
    if hit and key not in _warned:
        _warned.add(key)
        shown = ", ".join(hit[:6]) + (f", ... ({len(hit)} in all)" if len(hit) > 6 else "")
        warnings.warn(f"{what} ({where}): weight decay > 0 on normalization weights {shown}; Hugging Face's "
                      "grouping and the recipes exempt them (a hand-written no-decay list such as "
                      "['bias', 'LayerNorm.weight'] misses GPT-2's ln_1/ln_2/ln_f). Group them without decay: "
                      "merit_ds.integrations.param_groups.merit_param_groups(model).", UserWarning, stacklevel=3)
    return hit
