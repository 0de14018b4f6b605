"""Worker for test_zero_checkpoint.py: save / resume / re-shard MERIT's (or, with
``--optimizer lamb``, LAMB's) ZeRO checkpoints.

``--mode save --dir D --stages 1 2 3``: for each stage, train SAVE_AT steps, save a
checkpoint (tag ``z{stage}``), train to TOTAL steps (the uninterrupted run); then build a
fresh engine, ``load_checkpoint`` and train the same steps again: the weights must equal
the uninterrupted run bit for bit. Rank 0 also stores, per stage, the full fp32 weights and
moments at the save point and the uninterrupted weights after step SAVE_AT + 1 in
``D/reference_z{stage}.pt`` for re-sharded resumes.

``--mode universal --dir D --stages 2``: at any world size, load the universal checkpoint
``D/z{stage}_universal`` (made by ``ds_to_universal``), compare weights and moments with the
saved ones, take two steps and compare each with the uninterrupted run, and record every state's
step count (ZeRO-3's universal load gives every sub-group's state ONE step tensor: a step
advancing it in place would count once per sub-group, which LAMB's bias correction shows at
the second step).

Every rank sees the same global batch of GLOBAL samples per step, split evenly across ranks,
so runs at different world sizes train on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

import deepspeed
import merit_ds  # noqa: F401
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from merit_ds.optim import LAMB, MERIT
from zero_worker import HP, VOCAB, Tiny

warnings.filterwarnings("ignore")
GLOBAL, SAVE_AT, TOTAL = 6, 2, 4
OPTIMIZER = {"merit": MERIT, "lamb": LAMB}
OPT_CLS = MERIT  # set from --optimizer


def config(stage, world, universal=False):
    c = {
        "train_batch_size": GLOBAL,
        "train_micro_batch_size_per_gpu": GLOBAL // world,
        "gradient_accumulation_steps": 1,
        # ZeRO-3: several sub-groups (small sub_group_size), so that a load can share state among them
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, "sub_group_size": 64},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if universal:
        c["checkpoint"] = {"load_universal": True}
    return c


def engine_for(stage, world, universal=False):
    torch.manual_seed(0)
    model = Tiny()
    opt = OPT_CLS(model.parameters(), **HP)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage, world, universal))
    return engine, model


def train(engine, steps, start):
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, VOCAB, (GLOBAL, 5), generator=g)
        y = (x * 3 + 1) % VOCAB
        n = GLOBAL // world
        loss = engine(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
        engine.backward(loss)
        engine.step()


def full_weights(model):
    return {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}


def full_moments(model, engine):
    # DeepSpeed links the per-parameter views of optimizer state lazily, at the first step
    # after construction or load; link them now to read the state right after a load.
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    return {
        n: (safe_get_full_optimizer_state(p, "exp_avg").clone(), safe_get_full_optimizer_state(p, "exp_avg_sq").clone())
        for n, p in model.named_parameters()
    }


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def save_mode(args, res):
    world = dist.get_world_size()
    for stage in args.stages:
        engine, model = engine_for(stage, world)
        train(engine, SAVE_AT, 0)
        engine.save_checkpoint(args.dir, tag=f"z{stage}")
        at_save, moments = full_weights(model), full_moments(model, engine)
        train(engine, 1, SAVE_AT)
        one_after = full_weights(model)
        train(engine, TOTAL - SAVE_AT - 1, SAVE_AT + 1)
        uninterrupted = full_weights(model)
        del engine
        engine, model = engine_for(stage, world)
        engine.load_checkpoint(args.dir, tag=f"z{stage}")
        loaded = full_weights(model)
        loaded_moments = full_moments(model, engine)
        train(engine, TOTAL - SAVE_AT, SAVE_AT)
        res[f"z{stage}"] = dict(
            load_diff=max_diff(loaded, at_save),
            moments_diff=max(max_diff({k: v[i] for k, v in loaded_moments.items()}, {k: v[i] for k, v in moments.items()}) for i in (0, 1)),
            resume_diff=max_diff(full_weights(model), uninterrupted),
            moved=max_diff(uninterrupted, at_save),
        )
        if dist.get_rank() == 0:
            torch.save(dict(at_save=at_save, moments=moments, one_after=one_after, two_after=uninterrupted),
                       os.path.join(args.dir, f"reference_z{stage}.pt"))


def universal_mode(args, res):
    world = dist.get_world_size()
    for stage in args.stages:
        ref = torch.load(os.path.join(args.dir, f"reference_z{stage}.pt"))
        engine, model = engine_for(stage, world, universal=True)
        engine.load_checkpoint(args.dir, tag=f"z{stage}_universal")
        loaded, moments = full_weights(model), full_moments(model, engine)
        train(engine, 1, SAVE_AT)
        step_diff = max_diff(full_weights(model), ref["one_after"])
        train(engine, 1, SAVE_AT + 1)
        assert SAVE_AT + 2 == TOTAL  # two_after is the uninterrupted run's end
        state = engine.optimizer.optimizer.state  # the MERIT / LAMB instance under ZeRO's wrapper
        res[f"z{stage}"] = dict(
            load_diff=max_diff(loaded, ref["at_save"]),
            moments_diff=max(max_diff({k: v[i] for k, v in moments.items()}, {k: v[i] for k, v in ref["moments"].items()}) for i in (0, 1)),
            step_diff=step_diff,
            step2_diff=max_diff(full_weights(model), ref["two_after"]),
            step_counts=sorted({float(s["step"]) for s in state.values() if "step" in s}),
            shared_step_tensors=len({id(s["step"]) for s in state.values() if "step" in s}) < len(state),
            moved=max_diff(ref["one_after"], ref["at_save"]),
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["save", "universal"], required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--stages", nargs="+", type=int, required=True)
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZER), default="merit")
    args = ap.parse_args()
    global OPT_CLS
    OPT_CLS = OPTIMIZER[args.optimizer]
    deepspeed.init_distributed(dist_backend="gloo")
    res = {}
    (save_mode if args.mode == "save" else universal_mode)(args, res)
    if dist.get_rank() == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump({"world": dist.get_world_size(), "stages": res}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see zero_worker.py


if __name__ == "__main__":
    main()
