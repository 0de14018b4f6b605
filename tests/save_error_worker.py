"""Rank worker: Trainer.save when rank 0's checkpoint finalisation raises. Every rank must raise
the same CheckpointSaveError (none left waiting). argv: OUT_DIR."""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist

from merit_ds.train import checkpoint as ckpt
from merit_ds.train import trainer as trainer_mod


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(sys.argv[1])

    def broken_finalize(*a, **k):
        raise OSError("disk full (simulated)")

    ckpt.finalize = broken_finalize
    engine = SimpleNamespace(save_checkpoint=lambda root, tag, client_state, save_latest: None)
    fake = SimpleNamespace(runner=SimpleNamespace(rank=rank, world=dist.get_world_size()), step=3, engine=engine,
                           client_state=lambda: {})
    try:
        trainer_mod.Trainer.save(fake, out, {"world": 2}, keep_last=1)
        result = "no error"
    except trainer_mod.CheckpointSaveError as exc:
        result = str(exc)
    (out.parent / f"rank{rank}.txt").write_text(result)
    dist.barrier()
    if rank == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump({f"rank{r}": (out.parent / f"rank{r}.txt").read_text() for r in range(2)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
