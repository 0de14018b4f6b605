"""Small facts shared by the HF Trainer and Accelerate glue (no math, no heavy imports)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

# Where DeepSpeed reads these keys (deepspeed/runtime/zero/config.py, runtime/config.py).
_OFFLOAD_OFF = (None, "none", "None")


def ds_names_merit(ds_config: Mapping[str, Any]) -> bool:
    """True when a DeepSpeed JSON config's ``"optimizer"`` section names MERIT."""
    opt = ds_config.get("optimizer") or {}
    return str(opt.get("type", "")).lower() == "merit"


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
    """MERIT would be silently replaced by DeepSpeedCPUAdam under ZeRO-Offload."""


def refuse_offload_swap(ds_config: Mapping[str, Any], what: Optional[str] = "MERIT") -> None:
    """Raise if this config makes Accelerate (and so the HF Trainer) swap a client optimizer.

    Accelerate 1.15 (``accelerator.py:2374-2383``) replaces any client optimizer it does not
    know with ``DeepSpeedCPUAdam(adamw_mode=False)`` when the optimizer is offloaded, unless
    ``"zero_force_ds_cpu_optimizer": false``. Plain DeepSpeed raises in the same situation
    (``engine.py:2342-2346``). Either way the fix is the same key.
    """
    if ds_offloads_optimizer(ds_config) and ds_forces_cpu_optimizer(ds_config):
        raise OffloadSwapError(
            f"ZeRO-Offload ('offload_optimizer.device' is not 'none') with {what} as the optimizer "
            "needs '\"zero_force_ds_cpu_optimizer\": false' in the DeepSpeed config: without it "
            "Accelerate (and the HF Trainer) silently replace the optimizer with "
            "DeepSpeedCPUAdam (Adam, not MERIT) and plain DeepSpeed raises. Add the key to the "
            "top level of the DeepSpeed config."
        )
