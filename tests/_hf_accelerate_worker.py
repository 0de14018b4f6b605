"""Accelerate worker: a plain training loop, several scenarios in turn, rank 0 saves
``<out>/<scenario>.pt``. Launched by torchrun (the scenario builds its own DeepSpeedPlugin) or
by ``accelerate launch`` (``--from-launcher``: the launcher's config decides everything).

Scenarios: ``ddp_client``; ``z<stage>_client`` (MERIT instance); ``z<stage>_json`` (MERIT named in
the DeepSpeed config, DummyOptim + DummyScheduler); ``z2_offload`` (client + CPU offload);
``swap`` (offload without zero_force_ds_cpu_optimizer: false); ``z3_json_offload`` (named in the
JSON, offload, and no zero_force_ds_cpu_optimizer key: nothing to swap or refuse); ``plain_swap``
(as ``swap`` but through plain ``accelerator.prepare``: the guard armed by ``import merit_ds``
must refuse it); ``unguarded_swap`` (the same with the guard taken off: records what trains);
``adamw`` (AdamW prepared, then
verified); ``flat_json`` (DummyOptim(model.parameters()) with weight decay). A trailing
``_lamb`` (``z2_client_lamb``, ``z3_json_lamb``...) runs the same path with LAMB (client
``merit_ds.LAMB``; ``"type": "ShardedLAMB"`` in the JSON).
"""

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _hf_common import HP, WEIGHT_DECAY, full_weights, split_matrices, run_scenarios, tiny_gpt2, token_data  # noqa: E402

STEPS, MICRO, WARMUP = 4, 2, 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", required=True)
    parser.add_argument("--from-launcher", action="store_true")
    cli = parser.parse_args()

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler, InitProcessGroupKwargs
    from transformers import get_cosine_schedule_with_warmup

    from merit_ds import LAMB, MERIT
    from merit_ds.integrations.accelerate import merit_deepspeed_config, prepare_with_merit, scheduler_steps
    from merit_ds.integrations.param_groups import merit_param_groups
    from merit_ds.integrations.verify import assert_merit_is_stepping, unwrap_optimizer

    world = int(os.environ["WORLD_SIZE"])
    tokens = token_data(STEPS * MICRO * world)
    gloo = [InitProcessGroupKwargs(backend="gloo")]  # CPU: else DeepSpeed's batch-size assertion

    def accelerator_for(name, json_type):
        name = name[: -len("_lamb")] if name.endswith("_lamb") else name
        if cli.from_launcher:
            return Accelerator(kwargs_handlers=gloo)
        AcceleratorState._reset_state(reset_partial_state=True)
        if name.startswith("ddp"):
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
            return Accelerator(cpu=True, kwargs_handlers=gloo)
        stage = int(name[1]) if name[0] == "z" else 2
        json = name.endswith("json") or name.endswith("json_offload")
        offload = name.endswith("offload") or name.endswith("swap")
        cfg = merit_deepspeed_config(
            stage, micro_batch=MICRO, grad_accum=1, offload=offload,
            optimizer_params=dict(HP, weight_decay=WEIGHT_DECAY) if json else None, optimizer_type=json_type,
            train_batch_size=MICRO * world, gradient_clipping=0.0,  # the reference does not clip
        )
        if name.endswith("swap") or (json and offload):
            # swap: the client optimizer Accelerate would replace; json + offload: named in the
            # JSON, which needs no zero_force_ds_cpu_optimizer (DeepSpeed enforces it for clients only)
            cfg.pop("zero_force_ds_cpu_optimizer")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg), kwargs_handlers=gloo)

    def scenario(name):
        cls, json_type = (LAMB, "ShardedLAMB") if name.endswith("_lamb") else (MERIT, "MERIT")
        accelerator = accelerator_for(name, json_type)
        rank = accelerator.process_index
        model = tiny_gpt2()
        ds_cfg = getattr(accelerator.state.deepspeed_plugin, "deepspeed_config", None) or {}
        json = "optimizer" in ds_cfg
        if name == "flat_json":
            opt = DummyOptim(model.parameters())  # the trap: one group, all decayed
        elif json:
            opt = DummyOptim(merit_param_groups(model))  # decay group inherits the JSON's weight_decay
        elif name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=HP["lr"])
        else:
            opt = cls(merit_param_groups(model, WEIGHT_DECAY), **HP)
        if json:
            sched = DummyScheduler(opt, lr_scheduler_callable=lambda o: get_cosine_schedule_with_warmup(
                o, *scheduler_steps(accelerator, WARMUP, STEPS, deepspeed_scheduler=True)))
        else:
            sched = get_cosine_schedule_with_warmup(opt, *scheduler_steps(accelerator, WARMUP, STEPS))
        result = {"name": name, "world": world, "error": None, "weights": [], "lrs": []}
        try:
            if name == "adamw":
                model, opt, sched = accelerator.prepare(model, opt, sched)
                assert_merit_is_stepping(opt, accelerator.unwrap_model(model))
            if name.startswith("plain_"):  # what a user who never heard of prepare_with_merit writes
                model, opt, sched = accelerator.prepare(model, opt, sched)
                result["opt_type"] = type(unwrap_optimizer(opt)).__name__  # would be DeepSpeedCPUAdam
                raise AssertionError(f"accelerator.prepare let {result['opt_type']} through")
            if name == "unguarded_swap":  # negative control: the trap the guard closes is real
                from accelerate.accelerator import Accelerator as Acc

                guarded = Acc._prepare_deepspeed
                Acc._prepare_deepspeed = guarded.__wrapped__
                try:
                    model, opt, sched = accelerator.prepare(model, opt, sched)
                finally:
                    Acc._prepare_deepspeed = guarded
                inner = unwrap_optimizer(opt)
                result["opt_type"] = type(inner).__name__
                result["betas"] = list(inner.param_groups[0]["betas"])
                raise AssertionError("swapped")
            model, opt, sched = prepare_with_merit(accelerator, model, opt, sched)
            inner = unwrap_optimizer(opt)
            result["opt_type"] = type(inner).__name__
            result["split"] = split_matrices(accelerator.unwrap_model(model))
            for k in range(STEPS):
                result["lrs"].append(float(inner.param_groups[0]["lr"]))
                result["weights"].append(full_weights(accelerator.unwrap_model(model)))
                lo = (k * world + rank) * MICRO
                batch = tokens[lo:lo + MICRO]
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            result["weights"].append(full_weights(accelerator.unwrap_model(model)))
        except Exception as exc:
            result["error"], result["message"] = type(exc).__name__, str(exc)
            if os.environ.get("MERIT_DS_TEST_TRACEBACK"):
                traceback.print_exc()
        if rank == 0:
            torch.save(result, os.path.join(cli.out, f"{name}.pt"))
        accelerator.wait_for_everyone()

    run_scenarios(cli.scenarios, scenario)

if __name__ == "__main__":
    main()
