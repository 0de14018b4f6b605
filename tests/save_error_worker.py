"""Rank worker: Trainer.save when rank 0's checkpoint finalisation raises. Every rank must raise
the same CheckpointSaveError (none left waiting): from save itself, and with background=True from
finish_save (save returns first). argv: OUT_DIR."""

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

    real_finalize = ckpt.finalize
    ckpt.finalize = broken_finalize
    engine = SimpleNamespace(save_checkpoint=lambda root, tag, client_state, save_latest: None)
    fake = SimpleNamespace(runner=SimpleNamespace(rank=rank, world=dist.get_world_size()), step=3, engine=engine,
                           client_state=lambda: {}, _pending=None)
    fake.finish_save = lambda: trainer_mod.Trainer.finish_save(fake)
    # in the foreground: save raises; in the background: save returns, the next sync point raises
    results = []
    for background in (False, True):
        try:
            trainer_mod.Trainer.save(fake, out, {"world": 2}, keep_last=1, background=background)
            results.append("returned")
            trainer_mod.Trainer.finish_save(fake)
            results.append("no error")
        except trainer_mod.CheckpointSaveError as exc:
            results.append(str(exc))
    # a full disk on rank 1 only, inside DeepSpeed's save: every rank raises the same one-line error
    import errno

    ckpt.finalize = real_finalize
    (out / "latest").parent.mkdir(parents=True, exist_ok=True)

    def full_disk(root, tag, client_state, save_latest):
        Path(root, tag).mkdir(parents=True, exist_ok=True)
        (Path(root, tag) / f"part_{rank}.pt").write_bytes(b"x")
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    fake.engine = SimpleNamespace(save_checkpoint=full_disk)
    fake.step = 4
    try:
        trainer_mod.Trainer.save(fake, out, {"world": 2}, keep_last=1)
        results.append("no error")
    except trainer_mod.CheckpointSaveError as exc:
        results.append(str(exc))
    dist.barrier()  # rank 0 removes the partial save before it raises; look after it has
    results.append("tmp left" if (out / ".tmp-step_00000004").exists() else "tmp removed")
    result = "\n".join(results)
    (out.parent / f"rank{rank}.txt").write_text(result)
    dist.barrier()
    if rank == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump({f"rank{r}": (out.parent / f"rank{r}.txt").read_text() for r in range(2)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
