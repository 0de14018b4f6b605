"""Worker for test_registry.py: an optimizer registered by a third party (the entry point the test
puts on PYTHONPATH), named in DeepSpeed's JSON, under ZeRO-2 on 2 CPU ranks, against the same
optimizer on one process fed the same gradient, step by step (atol = rtol = 0).

Every rank sees the same batch, so the averaged gradient is exactly each rank's own (g + g) / 2 = g
in binary floating point, and the single-process reference computes it itself.
"""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import deepspeed
import merit_ds  # noqa: F401  (loads the entry point: the optimizer under test)
from merit_ds.optim import registry


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = registry.get("nbadam")
    assert getattr(torch.optim, spec.json_name) is spec.cls  # the JSON name DeepSpeed will look up
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    reference = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    params = dict(lr=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
    cfg = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": spec.json_name, "params": params},
           "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
           "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    basic = engine.optimizer.optimizer
    ref_opt = spec.cls(reference.parameters(), **{**params, "betas": tuple(params["betas"])})

    # the first matrix (7 x 5 = 35 elements of 66) is cut mid-row between the two ranks
    zero = engine.optimizer
    first = zero.params_in_partition[0][0]
    offset = zero.first_offset[0]
    split = {"rank": rank, "first_shape": list(first.shape), "first_offset": int(offset)}
    gathered = [None] * world
    dist.all_gather_object(gathered, split)

    diffs = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 5, generator=gen), torch.randn(4, 3, generator=gen)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        ref_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
        diffs.append(max(float((a.detach() - b.detach()).abs().max())
                         for a, b in zip(engine.module.parameters(), reference.parameters())))
    moved = max(float((a.detach() - b).abs().max()) for a, b in zip(reference.parameters(), initial))
    result = {"stepping": type(basic).__name__, "wrapper": type(zero).__name__, "splits": gathered, "diffs": diffs, "moved": moved}
    if rank == 0 and os.environ.get("MERIT_TEST_RESULT"):
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
