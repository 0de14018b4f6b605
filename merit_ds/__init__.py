"""merit_ds: the MERIT optimizer, exact under DeepSpeed ZeRO, for large-batch LM training.

``from merit_ds import MERIT`` gives the optimizer. Importing ``merit_ds`` also

- registers the sharded step (:mod:`merit_ds.sharding`): a MERIT wrapped by DeepSpeed ZeRO
  1/2/3 or BF16_Optimizer computes the single-device update from its flat partitions;
- makes ``"optimizer": {"type": "MERIT"}`` (``"ShardedLAMB"``) work in DeepSpeed's JSON config
  by setting ``torch.optim.MERIT`` (``torch.optim.ShardedLAMB``) (:mod:`merit_ds.integrations.deepspeed`);
- arms the HF Trainer guard (:mod:`merit_ds.integrations.trainer_guard_hook`): a Trainer that
  would silently drop or swap MERIT under DeepSpeed raises instead; and the Accelerate guard:
  plain ``accelerator.prepare`` that would swap a client MERIT/LAMB for DeepSpeedCPUAdam under
  ZeRO-Offload raises instead (neither transformers nor accelerate is imported by this).

All of the above holds for ``LAMB`` too (JSON name ``"ShardedLAMB"``).
"""

from .optim import LAMB, MERIT, MeritStats, lamb, merit
from . import sharding  # noqa: E402  (registers the group resolver)
from .integrations.deepspeed import check_config
from .sharding import ShardingLayoutError, attach
from .integrations import trainer_guard_hook as _trainer_guard_hook

_trainer_guard_hook.arm()

__version__ = "0.1.0"
__all__ = ["MERIT", "MeritStats", "merit", "LAMB", "lamb", "attach", "check_config", "ShardingLayoutError", "__version__"]
