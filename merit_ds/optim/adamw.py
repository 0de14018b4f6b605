"""AdamW, the baseline: DeepSpeed's own implementation, registered so that every comparison
(``--optimizer adamw``, the study, the planner) runs it on the same machinery as MERIT and LAMB.

DeepSpeed builds it from ``"optimizer": {"type": "AdamW"}``: FusedAdam (multi-tensor CUDA
kernel) on GPU, DeepSpeedCPUAdam under ``offload_optimizer``, ``torch.optim.AdamW`` with
``"torch_adam": true`` (what ``merit_ds.train`` adds on a CPU run without offload). Element-wise,
so exact on ZeRO's flat partitions by itself; there is no merit_ds class. The recipe numbers'
sources are in merit_ds/train/presets.py's docstring.
"""

from __future__ import annotations

from typing import Any

import torch

from .spec import OptimizerSpec, RecipeDefaults

__all__ = ["SPEC", "is_adamw"]

# DeepSpeed's AdamW-capable classes (deepspeed/ops/adam), by name: importing deepspeed here would
# cost seconds for every user of the math layer.
_DS_ADAM_CLASSES = ("FusedAdam", "DeepSpeedCPUAdam", "ZenFlowCPUAdam")


def is_adamw(optimizer: Any) -> bool:
    """Whether ``optimizer`` steps AdamW: ``torch.optim.AdamW``, or one of DeepSpeed's Adam classes
    in AdamW mode (decoupled weight decay)."""
    if isinstance(optimizer, torch.optim.AdamW):
        return True
    cls = type(optimizer)
    if cls.__module__.startswith("deepspeed.ops.adam") and cls.__name__ in _DS_ADAM_CLASSES:
        return bool(getattr(optimizer, "adam_w_mode", False))
    return False


_PAPER = ("paper value: GPT-3 table 2.1 / nanoGPT train_gpt2 / Sophia's AdamW baseline, "
          "lr {lr} at batch 480 x 1024")

#: The recipes' lr-vs-batch exponent: lr(B) = lr_ref (B / batch_ref) ** exponent. Measured by the CPU
#: study (docs/study/results.csv: best lr at batch 8 and 64 on a sqrt(2)-spaced grid, 3 seeds, a
#: 233k-parameter GPT-2 over 512,000 tokens): 0.0 with 95% interval [-0.17, 0.17]; extrapolated from there to
#: GPT-2 Small/Medium at 480-6k (docs/study.md, 'The recipes' lr rule').
_BATCH_EXPONENT = 0.0
_EXPONENT_SOURCE = "measured: CPU study, batch 8 -> 64, alpha 0.0 [-0.17, 0.17]; extrapolated beyond"


def _recipe(**kw) -> RecipeDefaults:
    return RecipeDefaults(lr_batch_exponent=_BATCH_EXPONENT, lr_exponent_source=_EXPONENT_SOURCE, **kw)


SPEC = OptimizerSpec(
    name="adamw",
    label="AdamW",
    cls=torch.optim.AdamW,
    json_name="AdamW",
    recipe_defaults={
        "tiny": _recipe(lr_ref=3e-3, batch_ref=16, eps=1e-8,
                        lr_source="measured: CPU sweep, GPT-2 4x128 on KJV, batch 16 (docs/design/field_notes.md)"),
        "gpt2-small": _recipe(lr_ref=6e-4, batch_ref=480, eps=1e-8, lr_source=_PAPER.format(lr="6e-4")),
        "gpt2-medium": _recipe(lr_ref=3e-4, batch_ref=480, eps=1e-8, lr_source=_PAPER.format(lr="3e-4")),
    },
    ds_route="deepspeed",
    # on CPU without offload DeepSpeed's FusedAdam would be a JIT build; torch's AdamW is exact
    cpu_json_params={"torch_adam": True},
    study_lrs={"cpu": (5e-4, 1e-3, 2e-3, 5e-3, 1.2e-2, 3e-2), "gpu": (1.5e-4, 3e-4, 6e-4, 1.2e-3, 2.4e-3)},
    color="tab:blue",
    is_instance=is_adamw,
)
