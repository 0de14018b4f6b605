"""The optimizer registry: every optimizer merit_ds can train, looked up by any of its names.

One :class:`~merit_ds.optim.spec.OptimizerSpec` per optimizer; every consumer (the DeepSpeed
JSON name, the HF Trainer's ``optim=``, ``--optimizer``, the study, the planner, reports) reads
it here, so adding an optimizer is one module (its class and its ``SPEC``) plus one call::

    from merit_ds.optim import register_optimizer
    register_optimizer(SPEC)

(from ``merit_ds.optim``, not ``merit_ds``: entry points load while ``import merit_ds`` runs).
A third-party package makes the same call, or names a function (or the spec itself) under the
entry-point group ``merit_ds.optimizers`` in its package metadata, which ``import merit_ds``
loads in every process (so a ``deepspeed``-launched worker knows the optimizer too)::

    [project.entry-points."merit_ds.optimizers"]
    lars = "my_package.lars:SPEC"

Integrations that must act on each new optimizer (DeepSpeed's ``torch.optim.<json_name>``, the
HF Trainer's names) subscribe with :func:`on_register`; this module imports nothing above the
math layer.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .spec import OptimizerSpec, RecipeDefaults

__all__ = ["OptimizerSpec", "RecipeDefaults", "register_optimizer", "get", "find", "specs", "names",
           "by_json_name", "by_hf_optim", "by_class", "on_register", "register_builtins", "load_entry_points",
           "UnknownOptimizerError", "ENTRY_POINT_GROUP"]

#: The package-metadata entry-point group third-party optimizers register under.
ENTRY_POINT_GROUP = "merit_ds.optimizers"

_specs: dict[str, OptimizerSpec] = {}
_listeners: list[Callable[[OptimizerSpec], None]] = []
_lock = threading.RLock()


class UnknownOptimizerError(ValueError):
    """A name no registered optimizer goes by; the message lists the ones that exist."""


def register_optimizer(spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
    """Make ``spec`` known to every part of merit_ds; returns it. Idempotent for the same spec.

    Raises ValueError if the spec is inconsistent (:meth:`OptimizerSpec.validate`) or if its
    ``name``, ``json_name`` or ``hf_optim`` is taken by another optimizer (``replace=True``
    replaces an optimizer of the same ``name``)."""
    if not isinstance(spec, OptimizerSpec):
        raise TypeError(f"register_optimizer takes an OptimizerSpec, got {type(spec).__name__}")
    spec.validate()
    with _lock:
        old = _specs.get(spec.name)
        if old == spec:
            return old
        if old is not None and not replace:
            raise ValueError(f"an optimizer named {spec.name!r} is already registered ({old.cls.__module__}."
                             f"{old.cls.__qualname__}); pass replace=True to replace it")
        for other in _specs.values():
            if other.name == spec.name:
                continue
            if other.json_name.lower() == spec.json_name.lower():
                raise ValueError(f"optimizer {spec.name!r}: DeepSpeed JSON name {spec.json_name!r} is taken by "
                                 f"{other.name!r}")
            if spec.hf_optim is not None and other.hf_optim == spec.hf_optim:
                raise ValueError(f"optimizer {spec.name!r}: HF optim name {spec.hf_optim!r} is taken by {other.name!r}")
        _specs[spec.name] = spec
        listeners = list(_listeners)
    for listener in listeners:
        listener(spec)
    return spec


def on_register(listener: Callable[[OptimizerSpec], None]) -> None:
    """Call ``listener(spec)`` for every optimizer registered so far and every later one."""
    with _lock:
        if listener in _listeners:
            return
        _listeners.append(listener)
        current = list(_specs.values())
    for spec in current:
        listener(spec)


def specs() -> tuple[OptimizerSpec, ...]:
    """Every registered optimizer, in registration order (the built-ins first)."""
    with _lock:
        return tuple(_specs.values())


def names() -> tuple[str, ...]:
    """The ``--optimizer`` names, in registration order (the first is the default)."""
    return tuple(s.name for s in specs())


def find(name: str) -> Optional[OptimizerSpec]:
    """The spec named ``name`` (``--optimizer`` spelling), or None."""
    with _lock:
        return _specs.get(name)


def get(name: str) -> OptimizerSpec:
    """The spec named ``name``; :class:`UnknownOptimizerError` listing the registered names."""
    spec = find(name)
    if spec is None:
        raise UnknownOptimizerError(f"unknown optimizer {name!r}; choose one of {', '.join(names())} (others are "
                                    "added with merit_ds.register_optimizer or the 'merit_ds.optimizers' entry points)")
    return spec


def by_json_name(json_name: str, *, case_sensitive: bool = True) -> Optional[OptimizerSpec]:
    """The spec whose DeepSpeed ``"type"`` is ``json_name``, or None."""
    for spec in specs():
        if spec.json_name == json_name or (not case_sensitive and spec.json_name.lower() == str(json_name).lower()):
            return spec
    return None


def by_hf_optim(value: str) -> Optional[OptimizerSpec]:
    """The spec offered as ``TrainingArguments(optim=value)``, or None."""
    for spec in specs():
        if spec.hf_optim is not None and spec.hf_optim == value:
            return spec
    return None


def by_class(cls_or_optimizer) -> Optional[OptimizerSpec]:
    """The spec of an optimizer class or instance (the most derived registered class wins), or None."""
    cls = cls_or_optimizer if isinstance(cls_or_optimizer, type) else type(cls_or_optimizer)
    hits = [s for s in specs() if isinstance(s.cls, type) and issubclass(cls, s.cls)]
    if not hits:
        return None
    return min(hits, key=lambda s: cls.__mro__.index(s.cls))


def register_builtins() -> None:
    """Register merit_ds's own optimizers: MERIT (the default), LAMB, and DeepSpeed's AdamW as
    the baseline. Idempotent."""
    from .adamw import SPEC as ADAMW
    from .lamb import SPEC as LAMB
    from .merit import SPEC as MERIT

    for spec in (MERIT, LAMB, ADAMW):
        register_optimizer(spec)


def load_entry_points() -> list[str]:
    """Load third-party optimizers from the ``merit_ds.optimizers`` entry points; returns their
    names. An entry point names an :class:`OptimizerSpec` (registered) or a function (called:
    it registers what it wants). A broken entry point raises an ImportError naming it."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, OptimizerSpec):
                register_optimizer(obj)
            elif callable(obj):
                obj()
            else:
                raise TypeError(f"it names a {type(obj).__name__}, not an OptimizerSpec or a function")
        except Exception as exc:  # noqa: BLE001 - re-raised with the entry point named
            dist = getattr(getattr(ep, "dist", None), "name", "?")
            raise ImportError(f"merit_ds: the optimizer entry point {ep.name!r} = {ep.value!r} (package {dist}) "
                              f"failed to load: {type(exc).__name__}: {exc}. Fix or uninstall that package.") from exc
        loaded.append(ep.name)
    return loaded



def _unregister(name: str) -> None:
    """Forget optimizer ``name`` (for tests that register a throw-away optimizer; listeners are not
    told, so names they installed elsewhere, e.g. ``torch.optim.<json_name>``, stay)."""
    with _lock:
        _specs.pop(name, None)
