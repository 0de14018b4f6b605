"""A user's own training script: the optimizer comes from the JSON config's name, nothing else.

Launched by test_zero_json.py as ``deepspeed --num_gpus 2 zero_json_script.py --ds_config
ds_configs/examples/zero2_merit_fp32.json [more configs...]`` (``"type": "MERIT"`` or
``"ShardedLAMB"``). The only merit_ds line a user writes is ``import merit_ds``; the rest of
``merit_ds`` used below is test instrumentation.

Several configs run one after the other in the same process group (one launch). For each,
rank 0 writes a summary into the result JSON (keyed by the config's file name) and, when
``$MERIT_TEST_RECORD`` names a directory, ``<dir>/<config stem>.pt`` with the full fp32
weights before every step and after the last (``deepspeed.utils.safe_get_full_fp32_param``,
a collective under ZeRO 3) for the test's single-process reference.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import deepspeed
import merit_ds  # registers "MERIT"/"ShardedLAMB" for DeepSpeed's JSON config and the sharded step
from deepspeed.utils import safe_get_full_fp32_param
from merit_ds.sharding import collective
from zero_worker import VOCAB, Tiny

STEPS = 4

ap = argparse.ArgumentParser()
ap.add_argument("--ds_config", required=True, nargs="+")
ap.add_argument("--local_rank", type=int, default=0)
args, _ = ap.parse_known_args()
for path in args.ds_config:
    merit_ds.check_config(path)  # pre-flight: raises with the fix if a key is missing

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
record_dir = os.environ.get("MERIT_TEST_RECORD")
results = {}


def full_weights(model):
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in model.named_parameters()}


for path in args.ds_config:
    collective.counter.calls = 0
    torch.manual_seed(0)
    model = Tiny()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=path)
    losses, weights = [], []
    for step in range(STEPS):
        weights.append(full_weights(engine.module))
        g = torch.Generator().manual_seed(step * 100 + rank)
        x = torch.randint(0, VOCAB, (2, 5), generator=g)
        loss = engine(x, (x * 3 + 1) % VOCAB)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    weights.append(full_weights(engine.module))
    basic = engine.optimizer.optimizer
    name = os.path.basename(path)
    results[name] = dict(
        world=world,
        basic_optimizer=type(basic).__name__,
        wrapper=type(engine.optimizer).__name__,
        stats_all_reduces=collective.counter.calls,
        losses=losses,
        hyperparameters={k: basic.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay")},
        sharded_groups=len(basic.__dict__.get("_merit_layouts", {})),
    )
    if rank == 0 and record_dir:
        torch.save({"weights": weights}, os.path.join(record_dir, os.path.splitext(name)[0] + ".pt"))
    engine.destroy()
    dist.barrier()

if rank == 0:
    with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
        json.dump(results, f)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
