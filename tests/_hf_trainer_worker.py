"""Trainer worker: run with torchrun (2 processes, gloo). Scenarios run one after the other in
the same process group; rank 0 saves ``<out>/<scenario>.pt``. The first scenario, ``cli``,
trains with the TrainingArguments parsed from this command line (``--optim merit``).

    torchrun --nproc_per_node 2 tests/_hf_trainer_worker.py --out DIR --scenarios cli,cls \
        --output_dir DIR/run --optim merit --optim_args eps=1e-6 ... (see test_hf_trainer.py)
"""

import dataclasses
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _hf_common import HP, LMDataset, full_weights, split_matrices, run_scenarios, tiny_gpt2, token_data  # noqa: E402

STEPS, MICRO = 3, 2
CLIP = 0.05  # small enough that every step clips


@dataclasses.dataclass
class ScriptArgs:
    out: str
    scenarios: str


def ds_config(stage, *, offload=False, force_flag=True, json_merit=False, json_type="MERIT"):
    from merit_ds.integrations.accelerate import merit_deepspeed_config

    cfg = merit_deepspeed_config(
        stage, offload=offload, gradient_clipping="auto", optimizer_type=json_type,
        optimizer_params=dict(lr="auto", betas="auto", eps="auto", weight_decay="auto") if json_merit else None,
    )
    cfg["train_batch_size"] = "auto"
    if offload and not force_flag:
        cfg.pop("zero_force_ds_cpu_optimizer")
    return cfg


def main():
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    def configure_state(deepspeed: bool):
        # One configured state per scenario, before its TrainingArguments (docs/design/field_notes.md,
        # 'Trainer on 2 CPU processes: the process state comes first'):
        # DDP over gloo needs cpu=True (MULTI_CPU); DeepSpeed needs ACCELERATE_USE_DEEPSPEED.
        AcceleratorState._reset_state(reset_partial_state=True)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true" if deepspeed else "false"
        if "WORLD_SIZE" in os.environ:
            PartialState(cpu=not deepspeed, backend="gloo")
        else:  # plain `python worker.py`: one process, no process group
            PartialState(cpu=True)

    configure_state(False)

    from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

    from merit_ds import LAMB, MERIT
    from merit_ds.integrations.hf_trainer import MeritCheckCallback, register_trainer_optim
    from merit_ds.integrations.verify import decay_groups, unwrap_optimizer

    register_trainer_optim()  # before the parser: it lists the enum's values
    script, cli_args = HfArgumentParser((ScriptArgs, TrainingArguments)).parse_args_into_dataclasses()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens = token_data(STEPS * MICRO * world)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    class Record(TrainerCallback):
        def __init__(self):
            self.weights, self.lrs, self.decay = [], [], None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            names = {id(p): n for n, p in model.named_parameters()}
            self.decay = [(float(wd), sorted(names[id(p)] for p in ps)) for wd, ps in decay_groups(optimizer)]
            self.opt_type = type(unwrap_optimizer(optimizer)).__name__
            self.split = split_matrices(model)

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            self.weights.append(full_weights(model))
            self.lrs.append(float(unwrap_optimizer(optimizer).param_groups[0]["lr"]))

        def on_train_end(self, args, state, control, model=None, **kw):
            self.weights.append(full_weights(model))

    def scenario(name):
        args = cli_args
        kwargs = {}
        configured = dict(accelerator_config={"use_configured_state": True})
        configure_state(name.startswith("ds"))
        # A trailing "_lamb" asks for LAMB instead of MERIT, by the same path.
        lamb = name.endswith("_lamb")
        base = name[: -len("_lamb")] if lamb else name
        cls, optim_name = (LAMB, "sharded_lamb") if lamb else (MERIT, "merit")
        if base == "cli" and lamb:
            args = dataclasses.replace(cli_args, optim=optim_name, **configured)
        if base in ("cls", "clip"):
            args = dataclasses.replace(cli_args, optim="adamw_torch", use_cpu=True, **configured)
            if base == "clip":
                args = dataclasses.replace(args, max_grad_norm=CLIP, **configured)
            kwargs["optimizer_cls_and_kwargs"] = (cls, dict(HP))
        elif base.startswith("ds"):
            # ds<stage>_<cls|json|dropped|offload|swap|cli|clip>[_lamb]
            stage, kind = int(base[2]), base.split("_", 1)[1]
            cfg = ds_config(stage, offload=kind in ("offload", "swap"), force_flag=kind != "swap",
                            json_merit=kind == "json", json_type="ShardedLAMB" if lamb else "MERIT")
            optim = optim_name if kind in ("json", "cli") else "adamw_torch"
            clip = CLIP if kind == "clip" else cli_args.max_grad_norm  # "auto" -> gradient_clipping
            args = dataclasses.replace(cli_args, deepspeed=cfg, optim=optim, use_cpu=False, max_grad_norm=clip,
                                       **configured)
            if kind == "dropped":
                model = tiny_gpt2()
                kwargs["optimizers"] = (cls(model.parameters(), **HP), None)
            elif kind == "cli":
                pass  # optim="merit"/"sharded_lamb", DeepSpeed config without "optimizer"
            else:
                kwargs["optimizer_cls_and_kwargs"] = (cls, dict(HP))
            if kind == "json":
                kwargs.pop("optimizer_cls_and_kwargs", None)
        record = Record()
        callbacks = [record, MeritCheckCallback(cls)]
        model = tiny_gpt2()
        trainer = Trainer(model=model, args=args, train_dataset=LMDataset(tokens), callbacks=callbacks, **kwargs)
        result = {"name": name, "world": world, "error": None}
        try:
            trainer.train()
        except Exception as exc:  # recorded for the test to assert on
            result["error"] = type(exc).__name__
            result["message"] = str(exc)
            if os.environ.get("MERIT_DS_TEST_TRACEBACK"):
                traceback.print_exc()
        result.update(weights=record.weights, lrs=record.lrs, decay=record.decay,
                      opt_type=getattr(record, "opt_type", None), split=getattr(record, "split", None))
        if rank == 0:
            torch.save(result, os.path.join(script.out, f"{name}.pt"))

    run_scenarios(script.scenarios, scenario)

if __name__ == "__main__":
    main()
