"""2-rank worker for tests/test_diversity.py: gradient diversity over ranks (plain process group,
then a DeepSpeed ZeRO-3 engine) vs one process on the union of the ranks' examples."""

import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from merit_ds.train.diversity import GradientDiversity, diversity_from_sums
from test_diversity import direct_sums, small_gpt2


def reference(model, x, y):
    sq, total = direct_sums(model, x, y)
    return diversity_from_sums(sq, float(total.pow(2).sum()), x.size(0))


def main():
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (6, 16), generator=g)
    y = (x + 1) % 64
    mine = slice(3 * rank, 3 * rank + 3)  # distinct examples per rank
    result = {}
    model = small_gpt2(seed=0)
    result["plain"] = GradientDiversity(probe=3).measure(model, x[mine], y[mine], zero_stage=0)
    if rank == 0:
        result["single"] = reference(model, x, y)
        result["rank0_alone"] = reference(model, x[:3], y[:3])
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
           "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    model3 = small_gpt2(seed=0)
    engine, *_ = deepspeed.initialize(model=model3, optimizer=torch.optim.AdamW(model3.parameters(), lr=1e-3),
                                      config=cfg)
    partitioned = all(p.numel() == 0 or p.ds_numel != p.numel() for p in engine.module.parameters())
    result["zero3"] = GradientDiversity(probe=3).measure(engine.module, x[mine], y[mine], zero_stage=3)
    still = all(p.numel() == 0 or p.ds_numel != p.numel() for p in engine.module.parameters())
    result["n"] = [result["plain"]["gdiv_n"], result["zero3"]["gdiv_n"]]
    result["partitioned_before_after"] = [partitioned, still]
    if rank == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
