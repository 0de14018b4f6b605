"""merit_ds: the MERIT optimizer, exact under DeepSpeed ZeRO, for large-batch LM training.

``from merit_ds import MERIT`` gives the optimizer. Importing ``merit_ds`` runs
:func:`_install` once, which is everything the import registers (read it there):

- the optimizer registry (:mod:`merit_ds.optim.registry`): MERIT, LAMB and DeepSpeed's AdamW,
  then any third-party optimizer under the ``merit_ds.optimizers`` entry points;
- the sharded step (:mod:`merit_ds.sharding`): a merit_ds optimizer wrapped by DeepSpeed ZeRO
  1/2/3 or BF16_Optimizer computes the single-device update from its flat partitions;
- DeepSpeed's JSON names: ``torch.optim.<json_name>`` for every registered optimizer DeepSpeed
  does not implement itself, so ``"optimizer": {"type": "MERIT"}`` (``"ShardedLAMB"``) works
  (:mod:`merit_ds.integrations.deepspeed`);
- the guards (:mod:`merit_ds.integrations.trainer_guard_hook`): a Trainer that would silently
  drop or swap MERIT under DeepSpeed raises instead; plain ``accelerator.prepare`` that would
  swap a client MERIT/LAMB for DeepSpeedCPUAdam under ZeRO-Offload raises instead; a DeepSpeed
  config that misspells our optimizers fails with the fix before the engine is built (none of
  transformers, accelerate, deepspeed is imported by this).

New optimizers: :func:`register_optimizer` (one call; see docs/optimizer.md, "Adding an
optimizer").
"""

from .optim import LAMB, MERIT, MeritStats, OptimizerSpec, RecipeDefaults, lamb, merit, register_optimizer
from .optim import registry as _registry


def _install() -> None:
    """Everything ``import merit_ds`` registers, in one place; called once, below."""
    from . import sharding
    from .integrations import deepspeed as _deepspeed
    from .integrations import trainer_guard_hook

    _registry.register_builtins()           # MERIT (the default), LAMB, AdamW
    sharding.install()                      # ZeRO / BF16_Optimizer partitions -> the sharded step
    _deepspeed.install_json_names()         # torch.optim.<json_name>, now and for later registrations
    trainer_guard_hook.arm()                # HF Trainer, Accelerate, deepspeed.initialize guards
    _registry.load_entry_points()           # third-party optimizers (package metadata)


_install()

from .integrations.deepspeed import check_config  # noqa: E402
from .sharding import ShardingLayoutError, attach  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MERIT", "MeritStats", "merit", "LAMB", "lamb", "attach", "check_config", "ShardingLayoutError",
           "OptimizerSpec", "RecipeDefaults", "register_optimizer", "__version__"]
