"""DeepSpeed JSON configs for the recipes, built from :mod:`merit_ds.train.presets`.

``ds_configs/generate.py`` writes every committed JSON with :func:`make_ds_config`; the training
loop builds the same dict when no ``--ds-config`` is given and fills in the batch keys.

The optimizer is named in the ``"optimizer"`` section by its registered JSON name
(:attr:`merit_ds.optim.spec.OptimizerSpec.json_name`); for the built-ins:

* ``"MERIT"`` (``merit_ds.integrations.deepspeed`` registers the name on ``import merit_ds``);
* ``"ShardedLAMB"``: :class:`merit_ds.LAMB` (``merit_ds.train`` builds it as a client optimizer
  from the section's params, so the loop needs nothing registered under that name);
* ``"AdamW"``: DeepSpeed's own, which picks the implementation for the device: FusedAdam
  (multi-tensor CUDA kernel) on GPU, DeepSpeedCPUAdam under ``offload_optimizer`` (5x faster
  than torch AdamW on CPU, docs/design/field_notes.md); ``merit_ds.train`` adds ``"torch_adam": true``
  (``torch.optim.AdamW``) on a CPU run without offload.

ZeRO needs ``zero_allow_untested_optimizer`` for any optimizer that is not DeepSpeed's Adam
family, and with ``offload_optimizer`` DeepSpeed (and Accelerate, and the HF Trainer) would
otherwise replace a client optimizer by DeepSpeedCPUAdam or refuse it, so MERIT and LAMB offload
configs set ``zero_force_ds_cpu_optimizer: false``. AdamW configs need neither.
"""

from __future__ import annotations

from typing import Optional

from .batch import BatchConfigError
from merit_ds.optim import registry

from .presets import OptimPreset

__all__ = ["make_ds_config", "set_batch", "BATCH_KEYS"]

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def make_ds_config(stage: int, precision: str, *, offload: bool = False, optim: Optional[OptimPreset] = None,
                   lr: Optional[float] = None, global_batch: Optional[int] = None,
                   micro_batch: Optional[int] = None, optimizer: str = "merit") -> dict:
    """One DeepSpeed config. ``precision``: ``"bf16"`` (GPU) or ``"fp32"`` (CPU, or exactness);
    ``optimizer``: a registered name (``"merit"``, ``"lamb"``, ``"adamw"``, ...)."""
    spec = registry.find(optimizer)
    if spec is None:
        raise ValueError(f"optimizer must be one of {sorted(registry.names())}, got {optimizer!r}")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if offload and stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    if optim is None:  # betas, eps, decay of the lineage (an optimizer without GPT-2 defaults: its first preset's)
        optim = spec.recipe_defaults.get("gpt2-small") or next(iter(spec.recipe_defaults.values()))
    cfg: dict = {}
    if global_batch is not None:
        cfg["train_batch_size"] = int(global_batch)
    if micro_batch is not None:
        cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    # No lr in a generic config: merit_ds.train sets the preset's batch-scaled lr (a fixed lr here
    # would silently apply GPT-2's value to every model); recipe configs carry theirs.
    params = {"lr": float(lr)} if lr is not None else {}
    params.update({"betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay})
    cfg["optimizer"] = {"type": spec.json_name, "params": params}
    cfg["gradient_clipping"] = optim.grad_clip
    cfg["bf16"] = {"enabled": precision == "bf16"}
    if precision == "bf16" and stage > 0:
        # Accumulate gradients over the micro-steps in fp32, not bf16 (DeepSpeed's default is the
        # model dtype). DeepSpeed 0.19.8: ZeRO-1 (no offload) -> BF16_Optimizer, an unpartitioned
        # fp32 gradient buffer (4 Psi bytes per GPU on top of the 2 Psi bf16 grads); ZeRO-2/3 ->
        # an fp32 gradient partition (4 Psi / Nd instead of the bf16 one's 2 Psi / Nd). Without
        # ZeRO DeepSpeed refuses the mix, so stage 0 keeps bf16 accumulation.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    zero: dict = {"stage": stage}
    if stage in (1, 2):
        # contiguous_gradients/overlap_comm are DeepSpeed's throughput defaults for stage 2;
        # round_robin_gradients stays off: it reorders parameters inside the flat partition.
        zero.update({"contiguous_gradients": True, "overlap_comm": stage == 2, "round_robin_gradients": False})
    if stage == 3:
        zero.update({"contiguous_gradients": True, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True})
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    cfg["zero_optimization"] = zero
    ours = spec.ds_route != "deepspeed"  # DeepSpeed's own optimizers (AdamW) need neither key
    if stage > 0 and ours:
        cfg["zero_allow_untested_optimizer"] = True
    if offload and ours:
        cfg["zero_force_ds_cpu_optimizer"] = False
    cfg["steps_per_print"] = 10 ** 9     # the training loop does its own logging
    cfg["wall_clock_breakdown"] = False
    return cfg


def set_batch(cfg: dict, global_batch: int, micro_batch: int, grad_accum: int) -> dict:
    """Fill the three batch keys; refuse a config whose own values disagree with the batch plan."""
    want = dict(zip(BATCH_KEYS, (global_batch, micro_batch, grad_accum)))
    for key, value in want.items():
        if key in cfg and cfg[key] not in (value, "auto"):
            raise BatchConfigError(f"DeepSpeed config has {key}={cfg[key]!r} but the batch plan needs {value} "
                             f"(micro_batch {micro_batch} x grad_accum {grad_accum} x world = {global_batch}); "
                             f"fix the config or the command line")
    out = dict(cfg)
    out.update(want)
    return out
