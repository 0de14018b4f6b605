"""An unmodified DeepSpeed script: ``deepspeed.initialize`` with a JSON config that names the
optimizer, and no ``import merit_ds``. test_run.py starts it under the ``deepspeed`` launcher
with ``--module merit_ds.run`` (and plainly, as a negative control). Writes the basic
optimizer's class and whether merit_ds's sharded step ran to $MERIT_TEST_RESULT (rank 0)."""

import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("config")
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=args.config)
    for step in range(2):
        g = torch.Generator().manual_seed(step + 10 * dist.get_rank())
        x, y = torch.randn(2, 7, generator=g), torch.randn(2, 3, generator=g)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
    basic = engine.basic_optimizer
    if dist.get_rank() == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump({"optimizer": type(basic).__name__, "sharded_partitions": len(basic.__dict__.get("_merit_layouts", {})),
                       "steps": sorted({float(s["step"]) for s in basic.state.values()})}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
