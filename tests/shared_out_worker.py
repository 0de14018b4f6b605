"""Rank worker for the shared ``--out`` check (tests/test_recipes_gpu_ready.py).

``probe OUT_BASE``: :func:`check_shared_out` directly, on two gloo ranks: first with the same
directory on both ranks (must pass, leave nothing behind), then with rank 1 looking at another
directory of another name (a node-local path: must raise the same UsageError on both ranks).
Rank 0 writes the outcomes to ``$MERIT_TEST_RESULT``.

``loop ARGS...``: the training loop's ``main`` (exit code, stderr as users see them), with the
check handed a different directory on rank 1 -- what a node-local ``--out`` looks like from the
second node: the same name, another directory.
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist


def probe(base: Path) -> None:
    from merit_ds.train.run_config import UsageError
    from merit_ds.train.shared_fs import check_shared_out

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for case, out in (("shared", base / "shared"), ("local", base / ("local" if rank == 0 else "local-node1"))):
        try:
            check_shared_out(out, rank, world)
            result[case] = None
        except UsageError as exc:
            result[case] = str(exc)
        dist.barrier()
        result[case + "_left"] = sorted(p.name for p in base.rglob("*"))
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump({"ranks": gathered}, f)
    dist.destroy_process_group()


def loop(argv) -> int:
    from merit_ds.train import loop as loop_mod

    real = loop_mod.check_shared_out

    def node_local(out, rank, world):
        return real(Path(f"{out}-node1") if rank == 1 else out, rank, world)

    loop_mod.check_shared_out = node_local
    return loop_mod.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        probe(Path(sys.argv[2]))
    else:
        from merit_ds.train.loop import exit_process

        exit_process(loop(sys.argv[2:]))  # as `python -m merit_ds.train` ends: no interpreter teardown
