"""Arms the HF Trainer guard at ``import merit_ds``, without importing transformers.

The traps the guard closes (:mod:`merit_ds.integrations.hf_trainer`) hit users who never call
anything of ours beyond ``from merit_ds import MERIT``: ``Trainer(optimizers=(MERIT(...), s))``
under DeepSpeed trains with AdamW, and MERIT under ZeRO-Offload is swapped for
DeepSpeedCPUAdam, both silently. So ``import merit_ds`` calls :func:`arm`: if
``transformers.trainer`` is already imported the guard is installed now, otherwise a one-shot
import hook installs it right after that module loads (transformers imports it lazily, on
first use of ``transformers.Trainer``). The guard changes nothing for runs without MERIT.

If the guard cannot be installed (a transformers version whose internals differ), the import
of transformers still succeeds and a warning says so. ``MERIT_DS_NO_TRAINER_GUARD=1`` disarms.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import warnings

__all__ = ["arm"]

_TARGET = "transformers.trainer"


def _install_quietly() -> None:
    try:
        from .hf_trainer import install_trainer_guard

        install_trainer_guard()
    except Exception as exc:  # never break `import transformers` for a safety net
        warnings.warn(f"merit_ds could not install its HF Trainer guard: {exc}", RuntimeWarning, stacklevel=2)


class _InstallAfterExec(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _install_quietly()

    def __getattr__(self, name):  # get_source, get_filename... for inspect and friends
        return getattr(self._inner, name)


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        _disarm_hook()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _InstallAfterExec(spec.loader)
        return spec


_HOOK = _TrainerImportHook()


def _disarm_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def arm() -> None:
    """Install the Trainer guard now or as soon as ``transformers.trainer`` is imported."""
    if os.environ.get("MERIT_DS_NO_TRAINER_GUARD", "0") not in ("", "0"):
        return
    if _TARGET in sys.modules:
        _install_quietly()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
