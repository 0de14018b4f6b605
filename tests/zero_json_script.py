"""A user's own training script: MERIT comes from the JSON config's name, nothing else.

Launched by test_zero_json.py as ``deepspeed --num_gpus 2 zero_json_script.py --ds_config
ds_configs/examples/zero2_merit_fp32.json``. The only merit_ds line a user writes is ``import merit_ds``.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import deepspeed
import merit_ds  # registers "MERIT" for DeepSpeed's JSON config and the sharded step
from merit_ds.sharding import collective
from zero_worker import VOCAB, Tiny

ap = argparse.ArgumentParser()
ap.add_argument("--ds_config", required=True)
ap.add_argument("--local_rank", type=int, default=0)
args, _ = ap.parse_known_args()
merit_ds.check_config(args.ds_config)  # pre-flight: raises with the fix if a key is missing

deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = Tiny()
engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=args.ds_config)
rank, world = dist.get_rank(), dist.get_world_size()
losses = []
for step in range(4):
    g = torch.Generator().manual_seed(step * 100 + rank)
    x = torch.randint(0, VOCAB, (2, 5), generator=g)
    loss = engine(x, (x * 3 + 1) % VOCAB)
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
result = dict(
    world=world,
    basic_optimizer=type(engine.optimizer.optimizer).__name__,
    wrapper=type(engine.optimizer).__name__,
    stats_all_reduces=collective.counter.calls,
    losses=losses,
    hyperparameters={k: engine.optimizer.optimizer.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay")},
    sharded_groups=len(engine.optimizer.optimizer.__dict__.get("_merit_layouts", {})),
)
if rank == 0:
    with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
        json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
