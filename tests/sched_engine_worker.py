"""A batch change through the DeepSpeed engine's own API equals an engine configured for the new
accumulation (run by tests/test_batch_schedule_ds.py under torchrun, 1 or 2 CPU ranks).

For each ZeRO stage:

* A: built at micro 2 x grad-accum 1; 2 steps; then the training loop's ``Runner.set_global_batch``
  (``engine.set_train_batch_size`` + explicit accumulation boundaries) to grad-accum 4; step 3.
* R (reference): built at grad-accum 4 from its JSON, loads A's checkpoint taken after step 2,
  takes step 3 on the same micro-batches with DeepSpeed's own (managed) boundary.
* N (negative control): like A but only ``set_train_batch_size``, DeepSpeed's managed boundary:
  its micro-step counter (2 after two grad-accum-1 steps) puts the boundary after the second
  micro-batch of step 3, not the fourth.

Result: per stage, the largest |A - R| and |N - R| over every full fp32 parameter after step 3,
and the three step-3 losses.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param

from merit_ds.optim import MERIT
from merit_ds.train.launcher import Runner

MICRO, VOCAB, T = 2, 48, 8


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 24)
        self.hidden = nn.Linear(24, 40)
        self.out = nn.Linear(40, VOCAB)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(self.emb(x))))


def micro_batch(step: int, micro: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(0, VOCAB, (MICRO, T + 1), generator=g)


def loss_of(engine, tokens):
    logits = engine(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def build(stage: int, world: int, accum: int):
    torch.manual_seed(0)
    model = TinyLM()
    opt = MERIT(model.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    cfg = {"train_batch_size": MICRO * accum * world, "train_micro_batch_size_per_gpu": MICRO,
           "gradient_accumulation_steps": accum, "zero_optimization": zero, "gradient_clipping": 1.0,
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def runner_for(engine) -> Runner:
    r = Runner.__new__(Runner)  # the loop's Runner, without starting a process group again
    r.launcher, r.accelerator, r.micro, r.engine = "deepspeed", None, None, engine
    return r


def step(engine, runner, step_no: int, accum: int, rank: int) -> float:
    total = 0.0
    for m in range(accum):
        loss = loss_of(engine, micro_batch(step_no, m, rank))
        if runner is None:
            engine.backward(loss)
            engine.step()
        else:
            runner.backward_step(loss)
        total += float(loss)
    return total / accum


def full_params(engine) -> list[torch.Tensor]:
    return [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()]


def run_stage(stage: int, rank: int, world: int, ckpt_dir: str) -> dict:
    a = build(stage, world, 1)
    ra = runner_for(a)
    for s in (1, 2):
        step(a, ra, s, 1, rank)
    a.save_checkpoint(ckpt_dir, tag=f"z{stage}")
    ra.set_global_batch(MICRO * 4 * world)
    assert a.gradient_accumulation_steps() == 4 and a.train_batch_size() == MICRO * 4 * world
    loss_a = step(a, ra, 3, 4, rank)
    pa = full_params(a)

    r = build(stage, world, 4)
    r.load_checkpoint(ckpt_dir, tag=f"z{stage}")
    loss_r = step(r, None, 3, 4, rank)
    pr = full_params(r)

    n = build(stage, world, 1)
    for s in (1, 2):
        step(n, None, s, 1, rank)
    n.set_train_batch_size(MICRO * 4 * world)  # the engine's API alone, its managed boundary
    loss_n = step(n, None, 3, 4, rank)
    pn = full_params(n)
    for e in (a, r, n):
        e.destroy() if hasattr(e, "destroy") else None
    return {"max_diff_a_r": max(float((x - y).abs().max()) for x, y in zip(pa, pr)),
            "max_diff_n_r": max(float((x - y).abs().max()) for x, y in zip(pn, pr)),
            "changed": max(float((x - y).abs().max()) for x, y in zip(pa, full_params_init())),
            "loss_a": loss_a, "loss_r": loss_r, "loss_n": loss_n}


def full_params_init() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach().clone() for p in TinyLM().parameters()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [tempfile.mkdtemp(prefix="sched_ckpt_") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    results = {str(s): run_stage(s, rank, world, box[0]) for s in args.stages}
    if rank == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump({"world": world, "stages": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as zero_worker.py: skip a teardown that can abort after several engines


if __name__ == "__main__":
    main()
