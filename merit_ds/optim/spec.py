"""What merit_ds needs to know about an optimizer, in one record: :class:`OptimizerSpec`.

Every consumer of an optimizer by name reads its spec from :mod:`.registry` and names no
optimizer by hand: DeepSpeed's JSON (``json_name``), the HF Trainer (``hf_optim``), the
training loop's ``--optimizer`` and the study's ``--optimizers`` (``name``), banners and plots
(``label``, ``color``), the recipes (``recipe_defaults``), the planner (``gpu_scratch_bytes``,
:meth:`OptimizerSpec.stats_bytes`), the diagnostics (``trust_stats``, ``clips``). A leaf
module (pure data, no imports from the rest of merit_ds), so that each optimizer module can
declare its own spec::

    SPEC = OptimizerSpec(name="merit", label="MERIT", cls=MERIT, json_name="MERIT", ...)

and :func:`merit_ds.optim.registry.register_optimizer` makes it known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["OptimizerSpec", "RecipeDefaults", "DS_ROUTES", "DEEPSPEED_BUILTIN_NAMES", "parse_bool",
           "parse_optional_float"]

#: How ``merit_ds.train`` hands an optimizer to DeepSpeed (:attr:`OptimizerSpec.ds_route`).
DS_ROUTES = ("json", "client", "deepspeed")

#: Names DeepSpeed 0.19 resolves itself, compared case-insensitively, before it looks at
#: ``torch.optim`` (``deepspeed.runtime.config.DEEPSPEED_OPTIMIZERS``; a test asserts this copy
#: still covers it): a merit_ds optimizer registered under one of these would never be built.
DEEPSPEED_BUILTIN_NAMES = frozenset({
    "adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon",
})


@dataclass(frozen=True)
class RecipeDefaults:
    """An optimizer's hyperparameters for one model preset, at a reference global batch
    (sequences). ``lr_source`` says where ``lr_ref`` comes from (paper value, measurement or
    estimate); the training loop prints it in its banner. The recipes scale ``lr_ref`` to other
    batches as ``(B / batch_ref) ** lr_batch_exponent`` (:func:`merit_ds.train.presets.scaled_lr`):
    0.5 is the square-root rule; the built-in optimizers carry the exponent the CPU study measured
    (``lr_exponent_source`` says where it comes from)."""

    lr_ref: float
    batch_ref: int
    lr_source: str
    lr_batch_exponent: float = 0.5
    lr_exponent_source: str = "the square-root rule for Adam-type methods (Malladi et al. 2022)"
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.02


def parse_bool(text: str) -> bool:
    """``"true"``/``"false"`` (any case) from an ``optim_args`` string; KeyError otherwise."""
    return {"true": True, "false": False}[text.lower()]


def parse_optional_float(text: str) -> Optional[float]:
    """A number, or ``"none"`` for None, from an ``optim_args`` string."""
    return None if text.lower() == "none" else float(text)


def _no_scratch(partition_numel: int) -> float:
    return 0.0


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer, as every part of merit_ds sees it.

    Attributes:
        name: lower-case name for ``--optimizer`` (``merit_ds.train``, ``merit-ds plan``) and the
            study's ``--optimizers`` (``"merit"``).
        label: how banners, plots and reports name it (``"MERIT"``).
        cls: the ``torch.optim.Optimizer`` subclass. A subclass of
            :class:`~merit_ds.optim.base.ShardableOptimizer` with a ``fragment_rule`` is exact
            under ZeRO through :mod:`merit_ds.sharding`; any other element-wise optimizer is exact
            there by itself.
        json_name: the DeepSpeed JSON's ``"optimizer": {"type": json_name}``. merit_ds sets
            ``torch.optim.<json_name>`` (DeepSpeed's lookup) unless ``ds_route == "deepspeed"``.
        recipe_defaults: model preset name -> :class:`RecipeDefaults`.
        hf_optim: ``TrainingArguments(optim=...)`` value added by
            :func:`merit_ds.integrations.hf_trainer.register_trainer_optim` (None: not offered).
        hf_optim_args: ``optim_args`` keys it accepts beyond ``beta1``, ``beta2``, ``eps``,
            ``nonfinite_grads``, ``implementation``, ``track_stats`` (each with its parser from
            the string form); the common keys are offered only where ``cls`` takes them.
        client_kwargs: the keys of a config's ``"optimizer": {"params"}`` the training loop may
            pass to ``cls`` when it builds the optimizer itself.
        ds_route: how ``merit_ds.train`` hands it to DeepSpeed: ``"json"`` (named in the config;
            built by the loop only when the user's config has no ``"optimizer"`` section),
            ``"client"`` (always built by the loop and passed to ``deepspeed.initialize``),
            ``"deepspeed"`` (DeepSpeed's own implementation of ``json_name``).
        cpu_json_params: params added (if absent) on a CPU run without offload (DeepSpeed's
            AdamW: ``torch_adam``, torch's exact AdamW instead of a JIT-built kernel).
        trust_stats: records trust-ratio statistics (``track_stats``: diagnostics).
        clips: its update is clipped to [-1, 1] (the clip fraction means something).
        gpu_scratch_bytes: GPU bytes of the optimizer's own work memory for a partition of
            ``n`` elements (the planner's model; 0 for none).
        study_lrs: default peak-lr grids of the study presets (``"cpu"``, ``"gpu"``); an
            optimizer without one joins a study only with ``--lrs``.
        color: matplotlib colour in plots (None: the default cycle).
        is_instance: ``is_instance(optimizer)``: whether the optimizer DeepSpeed actually steps
            is this one (default: ``isinstance(optimizer, cls)``). DeepSpeed's AdamW route needs
            its own (FusedAdam / DeepSpeedCPUAdam in AdamW mode).
    """

    name: str
    label: str
    cls: type
    json_name: str
    recipe_defaults: Mapping[str, RecipeDefaults]
    hf_optim: Optional[str] = None
    hf_optim_args: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)
    client_kwargs: Sequence[str] = ("lr", "betas", "eps", "weight_decay")
    ds_route: str = "json"
    cpu_json_params: Mapping[str, Any] = field(default_factory=dict)
    trust_stats: bool = False
    clips: bool = False
    gpu_scratch_bytes: Callable[[int], float] = _no_scratch
    study_lrs: Mapping[str, Sequence[float]] = field(default_factory=dict)
    color: Optional[str] = None
    is_instance: Optional[Callable[[Any], bool]] = None

    @property
    def fragment_rule(self):
        """The :class:`~merit_ds.optim.fragment_rule.FragmentRule` the sharded step runs, or None
        (an element-wise optimizer, exact on flat partitions as it is)."""
        return getattr(self.cls, "fragment_rule", None)

    @property
    def sharded(self) -> bool:
        """Whether its update needs statistics of whole tensors, combined across shards by
        :mod:`merit_ds.sharding` (then ``cls`` must be a ShardableOptimizer)."""
        return self.fragment_rule is not None

    def stats_bytes(self, shapes: Sequence[Sequence[int]]) -> int:
        """Bytes of the statistics all-reduce per ``step()`` for a param group of ``shapes``:
        the rule's entries per parameter plus one non-finite flag each
        (:mod:`merit_ds.optim.layout`), 0 for an element-wise optimizer."""
        rule = self.fragment_rule
        if rule is None:
            return 0
        import torch

        itemsize = torch.empty((), dtype=rule.stats_dtype).element_size()
        return itemsize * sum(int(rule.stats_size(tuple(s))) + 1 for s in shapes)

    def is_stepping(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` (the basic optimizer under any wrappers) is this one."""
        if self.is_instance is not None:
            return bool(self.is_instance(optimizer))
        return isinstance(optimizer, self.cls)

    def defaults_for(self, model: str) -> RecipeDefaults:
        """The recipe defaults for model preset ``model`` (ValueError naming the presets it has)."""
        try:
            return self.recipe_defaults[model]
        except KeyError:
            raise ValueError(f"optimizer {self.name!r} has no recipe defaults for model preset {model!r}; "
                             f"it has {sorted(self.recipe_defaults)}") from None

    def validate(self) -> None:
        """Raise ValueError if the spec cannot work (checked at registration)."""
        import torch

        if not (self.name and self.name == self.name.lower() and self.name.replace("_", "").replace("-", "").isalnum()):
            raise ValueError(f"optimizer name {self.name!r}: lower-case letters, digits, '-' and '_' only")
        if "," in self.name or "=" in self.name or ";" in self.name:
            raise ValueError(f"optimizer name {self.name!r} may not contain ',', '=' or ';' (study --lrs syntax)")
        if not (isinstance(self.cls, type) and issubclass(self.cls, torch.optim.Optimizer)):
            raise ValueError(f"optimizer {self.name!r}: cls must be a torch.optim.Optimizer subclass, got {self.cls!r}")
        if self.ds_route not in DS_ROUTES:
            raise ValueError(f"optimizer {self.name!r}: ds_route must be one of {DS_ROUTES}, got {self.ds_route!r}")
        if self.ds_route != "deepspeed":
            if not self.json_name.isidentifier():
                raise ValueError(f"optimizer {self.name!r}: json_name {self.json_name!r} must be a Python identifier "
                                 "(DeepSpeed looks it up as an attribute of torch.optim)")
            if self.json_name.lower() in DEEPSPEED_BUILTIN_NAMES:
                raise ValueError(f"optimizer {self.name!r}: json_name {self.json_name!r} is one of DeepSpeed's own "
                                 "optimizer names (compared case-insensitively), so DeepSpeed would build its own; "
                                 "choose another name")
        if self.sharded:
            from .base import ShardableOptimizer

            if not issubclass(self.cls, ShardableOptimizer):
                raise ValueError(f"optimizer {self.name!r} has a fragment_rule but {self.cls.__name__} is not a "
                                 "ShardableOptimizer: the sharding layer could not take over its flat partitions")
        for model, d in self.recipe_defaults.items():
            if not (d.lr_ref > 0 and math.isfinite(d.lr_ref) and d.batch_ref > 0):
                raise ValueError(f"optimizer {self.name!r}: recipe defaults for {model!r} need lr_ref > 0 and batch_ref > 0")
