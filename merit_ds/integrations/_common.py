"""Small facts shared by the DeepSpeed, HF Trainer and Accelerate glue (no math, no heavy imports).

The names merit_ds's optimizers go by in a DeepSpeed JSON config come from the optimizer
registry (:func:`json_names`), so every entry path recognises the same ones.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..optim import ShardableOptimizer, registry

# Where DeepSpeed reads these keys (deepspeed/runtime/zero/config.py, runtime/config.py).
_OFFLOAD_OFF = (None, "none", "None")

def json_names() -> dict[str, type]:
    """``"optimizer": {"type": NAME}`` -> merit_ds class, for every registered optimizer that
    merit_ds (not DeepSpeed) implements. DeepSpeed first compares the name case-insensitively
    with its built-ins (``lamb`` is its CUDA-only FusedLamb), then looks it up case-sensitively
    on ``torch.optim``; so LAMB goes by ``ShardedLAMB``."""
    return {s.json_name: s.cls for s in registry.specs() if s.ds_route != "deepspeed"}


def json_name_of(cls_or_optimizer: Any) -> str:
    """The JSON name of a registered optimizer class or instance (``MERIT``, ``ShardedLAMB``)."""
    spec = registry.by_class(cls_or_optimizer)
    if spec is None or spec.ds_route == "deepspeed":
        cls = cls_or_optimizer if isinstance(cls_or_optimizer, type) else type(cls_or_optimizer)
        raise KeyError(f"{cls.__name__} has no DeepSpeed JSON name in merit_ds")
    return spec.json_name


def ds_optimizer_type(ds_config: Mapping[str, Any]) -> Optional[str]:
    """The ``"type"`` of a DeepSpeed config's ``"optimizer"`` section, or None."""
    return (ds_config.get("optimizer") or {}).get("type")


def ds_named_class(ds_config: Mapping[str, Any]) -> Optional[type]:
    """The merit_ds class a DeepSpeed config's ``"optimizer"`` section names, or None.

    Matches case-insensitively (``"merit"`` -> MERIT), so that callers go on to
    :func:`merit_ds.integrations.deepspeed.check_config`, which refuses the wrong case with
    the right spelling, instead of treating the config as not ours.
    """
    spec = registry.by_json_name(str(ds_optimizer_type(ds_config) or ""), case_sensitive=False)
    return None if spec is None or spec.ds_route == "deepspeed" else spec.cls


def ds_names_merit(ds_config: Mapping[str, Any]) -> bool:
    """True when a DeepSpeed JSON config's ``"optimizer"`` section names a merit_ds optimizer
    (``MERIT``, ``ShardedLAMB``, ..., any case). Kept under its old name; see :func:`ds_named_class`."""
    return ds_named_class(ds_config) is not None


def is_sharded_optimizer_class(cls: Any) -> bool:
    """A merit_ds optimizer class (MERIT, LAMB, any ShardableOptimizer, or a subclass)."""
    return isinstance(cls, type) and issubclass(cls, ShardableOptimizer)


def is_registered_class(cls: Any) -> bool:
    """A class of an optimizer registered with merit_ds that merit_ds implements (MERIT, LAMB, a
    third-party registration; not DeepSpeed's own AdamW)."""
    if not isinstance(cls, type):
        return False
    spec = registry.by_class(cls)
    return spec is not None and spec.ds_route != "deepspeed"


def ds_offloads_optimizer(ds_config: Mapping[str, Any]) -> bool:
    """True when ZeRO offloads the optimizer (``offload_optimizer.device`` is cpu/nvme)."""
    zero = ds_config.get("zero_optimization") or {}
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    return device not in _OFFLOAD_OFF


def ds_forces_cpu_optimizer(ds_config: Mapping[str, Any]) -> bool:
    """DeepSpeed's ``zero_force_ds_cpu_optimizer`` (default True, ``runtime/config.py``).

    Read with plain truthiness, exactly as DeepSpeed (``engine.py:2344``) and Accelerate
    (``accelerator.py:2376``) do: only a JSON ``false`` turns it off; the *string* ``"false"``
    is truthy there, so it counts as on here too.
    """
    return bool(ds_config.get("zero_force_ds_cpu_optimizer", True))


class OffloadSwapError(RuntimeError):
    """A client MERIT/LAMB would be silently replaced by DeepSpeedCPUAdam under ZeRO-Offload."""


def refuse_offload_swap(ds_config: Mapping[str, Any], what: Optional[str] = "MERIT") -> None:
    """Raise if this config makes Accelerate (and so the HF Trainer) swap a *client* optimizer.

    Accelerate 1.15 (``accelerator.py:2374-2383``) replaces any client optimizer it does not
    know with ``DeepSpeedCPUAdam(adamw_mode=False)`` when the optimizer is offloaded, unless
    ``"zero_force_ds_cpu_optimizer": false``. Plain DeepSpeed raises in the same situation
    (``engine.py:2342-2346``). Either way the fix is the same key. (An optimizer *named in the
    JSON* is neither swapped nor refused: both checks apply to client optimizers only.)
    """
    if ds_offloads_optimizer(ds_config) and ds_forces_cpu_optimizer(ds_config):
        raise OffloadSwapError(
            f"ZeRO-Offload ('offload_optimizer.device' is not 'none') with a client {what} optimizer "
            "needs '\"zero_force_ds_cpu_optimizer\": false' in the DeepSpeed config: without it "
            f"Accelerate (and the HF Trainer) silently replace the optimizer with "
            f"DeepSpeedCPUAdam (Adam, not {what}) and plain DeepSpeed raises. Add the key to the "
            "top level of the DeepSpeed config, or name the optimizer in the config's \"optimizer\" "
            "section (with DummyOptim) instead of passing an instance: that path is neither swapped nor "
            "refused."
        )
