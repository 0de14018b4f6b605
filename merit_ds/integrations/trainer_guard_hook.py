"""Arms the HF Trainer and Accelerate guards at ``import merit_ds``, without importing
transformers or accelerate.

The traps the guards close hit users who never call anything of ours beyond
``from merit_ds import MERIT`` (or ``LAMB``):

* HF Trainer (:mod:`merit_ds.integrations.hf_trainer`): ``Trainer(optimizers=(MERIT(...), s))``
  under DeepSpeed trains with AdamW, and a client MERIT under ZeRO-Offload is swapped for
  DeepSpeedCPUAdam, both silently;
* Accelerate (:func:`merit_ds.integrations.accelerate.install_accelerate_guard`): plain
  ``accelerator.prepare(model, MERIT(...), ...)`` under ZeRO-Offload without
  ``"zero_force_ds_cpu_optimizer": false`` trains with DeepSpeedCPUAdam, silently;
* DeepSpeed (:func:`merit_ds.integrations.deepspeed.install_initialize_check`): a JSON naming
  ``"merit"`` (wrong case) or giving MERIT a params key it does not take fails deep inside
  ``deepspeed.initialize`` with a bare message; the check reports it first, with the fix.

So ``import merit_ds`` calls :func:`arm`: for each target module (``transformers.trainer``,
``accelerate.accelerator``, ``deepspeed``) already imported the guard is installed now, otherwise a one-shot
import hook installs it right after that module loads. The guards change nothing for runs
without MERIT/LAMB.

If a guard cannot be installed (a library version whose internals differ), the import of that
library still succeeds and a warning says so. ``MERIT_DS_NO_TRAINER_GUARD=1`` /
``MERIT_DS_NO_ACCELERATE_GUARD=1`` / ``MERIT_DS_NO_DEEPSPEED_CHECK=1`` disarm one of them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
import warnings

__all__ = ["arm"]

_TARGET = "transformers.trainer"
_ACCELERATE_TARGET = "accelerate.accelerator"


def _install_trainer(module) -> None:
    from .hf_trainer import install_trainer_guard

    install_trainer_guard()


def _install_accelerate(module) -> None:
    from .accelerate import install_accelerate_guard

    install_accelerate_guard(module)


def _install_deepspeed_check(module) -> None:
    from .deepspeed import install_initialize_check

    install_initialize_check(module)


# module name -> (installer, what, environment variable that disarms it)
_TARGETS = {
    _TARGET: (_install_trainer, "HF Trainer", "MERIT_DS_NO_TRAINER_GUARD"),
    _ACCELERATE_TARGET: (_install_accelerate, "Accelerate", "MERIT_DS_NO_ACCELERATE_GUARD"),
    "deepspeed": (_install_deepspeed_check, "deepspeed.initialize config check", "MERIT_DS_NO_DEEPSPEED_CHECK"),
}


def _disabled(name: str) -> bool:
    return os.environ.get(_TARGETS[name][2], "0") not in ("", "0")


def _install_quietly(name: str = _TARGET) -> None:
    install, what, _ = _TARGETS[name]
    try:
        install(sys.modules.get(name))
    except Exception as exc:  # never break the library's import for a safety net
        warnings.warn(f"merit_ds could not install its {what} guard: {exc}", RuntimeWarning, stacklevel=2)


class _InstallAfterExec(importlib.abc.Loader):
    def __init__(self, inner, name):
        self._inner = inner
        self._name = name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _HOOK.pending.discard(self._name)
        if not _HOOK.pending:
            _disarm_hook()
        _install_quietly(self._name)

    def __getattr__(self, name):  # get_source, get_filename... for inspect and friends
        return getattr(self._inner, name)


class _GuardImportHook(importlib.abc.MetaPathFinder):
    """Wraps the loader of each pending module so that its guard is installed right after the
    module executes. A target stays pending until it has actually been executed: libraries
    probe for optional packages with ``importlib.util.find_spec`` (transformers does for
    deepspeed) without importing them, and a probe must not use the hook up."""

    def __init__(self):
        self.pending: set[str] = set()
        self._local = threading.local()  # per thread: the names this hook is resolving right now

    def find_spec(self, fullname, path, target=None):
        finding = self._local.__dict__.setdefault("finding", set())
        if fullname not in self.pending or fullname in finding:
            return None
        finding.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders' answer (this one steps aside)
        finally:
            finding.discard(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _InstallAfterExec(spec.loader, fullname)
        return spec


_HOOK = _GuardImportHook()


def _disarm_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def arm() -> None:
    """Install each guard now or as soon as its target module is imported."""
    for name in _TARGETS:
        if _disabled(name):
            continue
        if name in sys.modules:
            _install_quietly(name)
        else:
            _HOOK.pending.add(name)
    if _HOOK.pending and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
