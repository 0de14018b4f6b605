r"""One training loop for GPT-2 with MERIT, started by the deepspeed launcher or ``accelerate launch``.

    deepspeed [--num_gpus N | --hostfile H] --module merit_ds.train --model gpt2-small --global-batch 6k \
        --data DIR --out RUN --ds-config ds_configs/gpt2-small_b6144_zero2_bf16.json
    accelerate launch --config_file launch/accelerate_multi_node.yaml -m merit_ds.train ...same arguments...

Both launchers meet in :class:`Runner`: the model is wrapped by a DeepSpeed engine either way
(Accelerate builds it from its DeepSpeed plugin), so forward, checkpoints and diagnostics are
one code path; only backward/step goes through ``accelerator.backward`` under Accelerate.
Checkpoints are DeepSpeed's format under both.

Order of a run: process group -> batch arithmetic (printed; impossible combinations stop here)
-> data -> checkpoint found and validated (a corrupt or incompatible one stops here, before
anything is written; another world size goes through DeepSpeed's universal format) -> model
and engine -> MERIT verified as the optimizer that steps -> checkpoint loaded -> train: every step logs loss/lr/grad-norm; every ``--eval-every`` validation loss and
perplexity; every ``--diag-every`` the large-batch diagnostics; every ``--ckpt-every`` an
atomic checkpoint (keep-last-K) -> final eval, checkpoint, ``loss.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from merit_ds.integrations.deepspeed import MeritConfigError, check_config
from merit_ds.integrations.param_groups import merit_param_groups
from merit_ds.sharding import collective, reduce_trust_stats

from .batch import BatchConfigError, plan_batch
from .data_source import DataError, check_token_data, make_train_loader, make_val_loader
from .diagnostics import AttentionLogitProbe, GradientNoiseScale, lm_loss
from .export import export_after_training, record_run
from .ds_config import make_ds_config, set_batch
from .presets import (TOKEN_BUDGET, get_model_preset, get_optim_preset, gpt2_config, parse_batch, scaled_lr,
                      warmup_steps)
from .schedule import warmup_cosine
from .tracking import MetricsLog, make_trackers, plot_losses

__all__ = ["main", "parse_args"]

DEFAULT_BATCH = {"tiny": 16, "gpt2-small": 480, "gpt2-medium": 480}


class UsageError(ValueError):
    """Bad input: reported as one clear line, exit code 2, nothing written."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m merit_ds.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launcher", choices=["auto", "deepspeed", "accelerate"], default="auto",
                   help="auto: accelerate when started by `accelerate launch`, else deepspeed")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="tiny | gpt2-small | gpt2-medium")
    g.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="GPT2Config override, e.g. n_layer=2 (tests)")
    g.add_argument("--seq-len", type=int, default=None, help="default: the preset's (tiny 128, GPT-2 1024)")
    g.add_argument("--activation-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (engine.compile)")
    g = p.add_argument_group("batch and length")
    g.add_argument("--global-batch", default=None, help="sequences per step, or a preset: 480 1k 2k 4k 6k")
    g.add_argument("--micro-batch", type=int, default=None, help="sequences per forward per rank")
    g.add_argument("--tokens", type=float, default=None, help="token budget (GPT-2 default 48e9)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --tokens)")
    g = p.add_argument_group("optimizer and DeepSpeed")
    g.add_argument("--ds-config", "--deepspeed_config", dest="ds_config", default=None,
                   help="DeepSpeed JSON (ds_configs/); default: built from --zero-stage/--precision/--offload")
    g.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    g.add_argument("--offload", action="store_true", help="ZeRO-Offload the optimizer states to CPU")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--lr", type=float, default=None, help="peak lr (default: preset, sqrt-scaled with batch)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 2%% of the steps")
    g.add_argument("--min-lr-ratio", type=float, default=None, help="cosine floor (default 0.1)")
    g = p.add_argument_group("data, output, cadence")
    g.add_argument("--data", required=True, help="prepared data directory (python -m merit_ds.data prepare)")
    g.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, tensorboard/, loss.png")
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-sequences", type=int, default=None, help="validation sequences (default 4 x micro x world)")
    g.add_argument("--ckpt-every", type=int, default=100)
    g.add_argument("--keep-last", type=int, default=3)
    g.add_argument("--resume", default="auto", help="auto (latest in --out, if any) | never | PATH to a checkpoint")
    g.add_argument("--diag-every", type=int, default=10, help="diagnostics cadence (0: off)")
    g.add_argument("--tracker", default="tensorboard", help="tensorboard | wandb | tensorboard,wandb | none")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-export", action="store_true", help="skip the Hugging Face export to OUT/hf_model at the end")
    g.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# process group

def _detect_launcher(choice: str) -> str:
    if choice != "auto":
        return choice
    return "accelerate" if any(k.startswith("ACCELERATE_") for k in os.environ) else "deepspeed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """`python -m merit_ds.train` without a launcher: a world of one (not MPI discovery on 29500)."""
    launched = "RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_RANK" in os.environ
    if not launched:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


class Runner:
    """What differs between the launchers: process group, engine construction, backward/step."""

    def __init__(self, launcher: str):
        self.launcher = launcher
        self.accelerator = None
        if launcher == "deepspeed":
            import deepspeed

            _single_process_env()
            deepspeed.init_distributed(auto_mpi_discovery=True)
            # NCCL stages broadcast_object_list on the current device: pick this rank's GPU before
            # the first one (_agree); a no-op on DeepSpeed's CPU accelerator. (Accelerate's state
            # sets the device itself when it starts the process group.)
            deepspeed.get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.cpu = not torch.cuda.is_available()

    def init_accelerator(self, ds_cfg: dict):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        handlers = [InitProcessGroupKwargs(backend="gloo")] if self.cpu else []
        plugin = DeepSpeedPlugin(hf_ds_config=ds_cfg)
        self.accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def build(self, model, groups, ds_cfg: dict, client_optimizer):
        if self.launcher == "deepspeed":
            import deepspeed

            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=groups, optimizer=client_optimizer, config=ds_cfg)
            self.engine, self.optimizer = engine, optimizer
        else:
            from accelerate.utils import DummyOptim

            # the plugin was built before the checkpoint was resolved; only "checkpoint" may change
            self.accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = ds_cfg.get("checkpoint", {})
            opt = client_optimizer if client_optimizer is not None else DummyOptim(groups)
            engine, optimizer = self.accelerator.prepare(model, opt)
            self.engine, self.optimizer = engine, optimizer
        return self.engine

    def backward_step(self, loss) -> None:
        """One micro-batch's backward; DeepSpeed steps (clip, MERIT, zero_grad) at the boundary."""
        if self.accelerator is None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def micro_context(self):
        if self.accelerator is None:
            import contextlib
            return contextlib.nullcontext()
        return self.accelerator.accumulate(self.engine)

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()  # FIELD_NOTES: avoids rare aborts at interpreter exit


# ----------------------------------------------------------------------------------------------
# MERIT's guarantees come from the integration layer: the JSON name and the exact ZeRO step
# are registered by ``import merit_ds``; the config check and the stepping check are its own.

def verify_merit_is_stepping(engine) -> None:
    """Fail fast unless the optimizer DeepSpeed/Accelerate actually step is MERIT, sharded
    correctly, with no bias/norm parameter decayed."""
    from merit_ds.integrations.verify import assert_merit_is_stepping

    assert_merit_is_stepping(engine, engine.module)


# ----------------------------------------------------------------------------------------------

def _parse_overrides(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--model-override expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
    return out


def _rank0_print(runner, *a):
    if runner.rank == 0:
        print(*a, flush=True)


def _agree(runner, error: str | None) -> str | None:
    """Rank 0 decides (it checked the files); every rank learns the verdict."""
    if not dist.is_initialized() or runner.world == 1:
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _mean_over_ranks(local_sum: float, local_count: int) -> float:
    """Mean over every rank of values summed locally (every rank counts ``local_count`` of them)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local_sum / local_count
    total = torch.tensor([local_sum], dtype=torch.float64)
    collective.all_reduce(total)  # on the backend's device: NCCL takes no CPU tensors
    return float(total[0]) / (local_count * dist.get_world_size())


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def run(args) -> int:
    launcher = _detect_launcher(args.launcher)
    import importlib.util

    for kind in args.tracker.split(","):
        if kind not in ("tensorboard", "wandb", "none"):
            raise UsageError(f"unknown tracker {kind!r}: use tensorboard, wandb, tensorboard,wandb or none")
        if kind != "none" and importlib.util.find_spec(kind) is None:
            raise UsageError(f"--tracker {kind} needs the {kind} package (pip install {kind}), or use --tracker none")
    runner = Runner(launcher)
    preset = get_model_preset(args.model)
    optim = get_optim_preset(args.model)
    overrides = _parse_overrides(args.model_override)
    seq_len = args.seq_len or overrides.get("n_positions", preset.seq_len)
    precision = args.precision if args.precision != "auto" else ("fp32" if runner.cpu else "bf16")

    # --- the DeepSpeed config and the batch arithmetic ------------------------------------------
    if args.ds_config is None and launcher == "accelerate" and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        args.ds_config = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]  # named in the accelerate YAML
    if args.ds_config:
        try:
            base_cfg = json.loads(Path(args.ds_config).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read DeepSpeed config {args.ds_config}: {exc}") from None
        zero_stage = int(base_cfg.get("zero_optimization", {}).get("stage", 0))
        precision = "bf16" if base_cfg.get("bf16", {}).get("enabled") else "fp32"
    else:
        base_cfg, zero_stage = None, args.zero_stage
    global_batch = parse_batch(args.global_batch) if args.global_batch else None
    if global_batch is None and base_cfg and isinstance(base_cfg.get("train_batch_size"), int):
        global_batch = base_cfg["train_batch_size"]
    global_batch = global_batch or DEFAULT_BATCH[args.model]
    micro = args.micro_batch
    if micro is None and base_cfg and isinstance(base_cfg.get("train_micro_batch_size_per_gpu"), int):
        micro = base_cfg["train_micro_batch_size_per_gpu"]
    if args.tokens is None and args.steps is None:
        tokens, steps = (TOKEN_BUDGET, None) if args.model != "tiny" else (None, 200)
    else:
        tokens, steps = (int(args.tokens) if args.tokens is not None else None), args.steps
    if launcher == "accelerate":
        # Accelerate needs the DeepSpeed config (with batch sizes) before it starts the process
        # group; the world size it will have is in the launcher's environment.
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        plan = plan_batch(global_batch, world_env, seq_len, micro_batch=micro, token_budget=tokens, max_steps=steps)
    else:
        plan = plan_batch(global_batch, runner.world, seq_len, micro_batch=micro, token_budget=tokens, max_steps=steps)
    lr = args.lr
    if lr is None and base_cfg and "optimizer" in base_cfg:
        lr = base_cfg["optimizer"].get("params", {}).get("lr")
    lr = lr if lr is not None else scaled_lr(optim, plan.global_batch)
    cfg = base_cfg if base_cfg is not None else make_ds_config(zero_stage, precision, offload=args.offload, optim=optim)
    cfg = set_batch(cfg, plan.global_batch, plan.micro_batch, plan.grad_accum)
    if "optimizer" in cfg:
        opt_type = cfg["optimizer"].get("type", "")
        if opt_type.upper() != "MERIT":
            raise UsageError(f"{args.ds_config} names optimizer {opt_type!r}; merit_ds.train trains with MERIT")
        opt_params = dict(cfg["optimizer"].get("params", {}))
        opt_params["lr"] = lr
        cfg = dict(cfg, optimizer={"type": "MERIT", "params": opt_params})
    else:
        opt_params = {"lr": lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    # A config without an "optimizer" section gets MERIT as a client optimizer built here.
    client_optimizer = "optimizer" not in cfg
    try:
        check_config(cfg, client_optimizer=client_optimizer)
    except MeritConfigError as exc:
        raise UsageError(f"DeepSpeed config: {exc}") from None
    if launcher == "accelerate":
        runner.init_accelerator(cfg)
        if runner.world != plan.world:
            raise UsageError(f"accelerate started {runner.world} processes, WORLD_SIZE said {plan.world}")
    rank, world = runner.rank, runner.world
    warmup = args.warmup_steps if args.warmup_steps is not None else warmup_steps(plan.steps, optim.warmup_fraction)
    floor = args.min_lr_ratio if args.min_lr_ratio is not None else optim.min_lr_ratio
    _rank0_print(runner, f"merit_ds.train: launcher {launcher}, {world} ranks, ZeRO {zero_stage}, {precision}, "
                         f"model {args.model} ({preset.description})")
    _rank0_print(runner, plan.describe())
    _rank0_print(runner, f"schedule: MERIT peak lr {lr:.4g} ({optim.lr_source}; sqrt-scaled from batch {optim.batch_ref}), "
                         f"warmup {warmup} steps, cosine to {floor} x peak; betas {tuple(opt_params.get('betas', optim.betas))}, "
                         f"weight decay {opt_params.get('weight_decay')}, clip {cfg.get('gradient_clipping')}")

    # --- data -------------------------------------------------------------------------------------
    eval_sequences = args.eval_sequences or 4 * plan.micro_batch * world
    try:
        train_loader = make_train_loader(args.data, seq_len=seq_len, global_batch=plan.global_batch,
                                         micro_batch=plan.micro_batch, rank=rank, world=world, seed=args.seed)
        val_loader = make_val_loader(args.data, seq_len=seq_len, eval_sequences=eval_sequences,
                                     micro_batch=plan.micro_batch, rank=rank, world=world)
        check_token_data(args.data, gpt2_config(preset, **overrides).vocab_size, rank=rank, world=world)
    except DataError as exc:
        raise UsageError(f"data: {exc}") from None

    # --- resume ------------------------------------------------------------------------------------
    out = Path(args.out)
    ckpt_root = out / "checkpoints"
    overrides.setdefault("n_positions", seq_len)
    run_info = {"model": args.model, "model_config": {k: v for k, v in sorted(gpt2_config(preset, **overrides).to_dict().items())
                                                      if k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")},
                "seq_len": seq_len, "global_batch": plan.global_batch, "micro_batch": plan.micro_batch,
                "world": world, "zero_stage": zero_stage, "precision": precision, "launcher": launcher,
                # the lr schedule is part of the trajectory: a different length/peak would silently
                # continue under the checkpoint's schedule (LambdaLR restores its factor object)
                "schedule": {"steps": plan.steps, "warmup": warmup, "floor": floor, "lr": lr},
                "data": getattr(getattr(train_loader, "tokens", None), "fingerprint", None) or
                train_loader.state_dict().get("data")}
    error, resume_from, load_from = None, None, None
    if rank == 0:
        try:
            if args.resume == "never":
                if ckpt_root.exists() and any(ckpt_root.glob("step_*")):
                    raise ckpt.CheckpointError(f"{ckpt_root} already holds checkpoints and --resume never was given: "
                                               f"refusing to overwrite them; use another --out or --resume auto")
            elif args.resume == "auto":
                resume_from = ckpt.latest_checkpoint(ckpt_root)
            else:
                resume_from = Path(args.resume)
            if resume_from is not None:
                saved_world = ckpt.validate(resume_from, run_info, allow_world_change=True)["run"]["world"]
                if saved_world != world and zero_stage > 0:
                    # ZeRO files are per rank: re-shard through DeepSpeed's universal format (MERIT
                    # keeps the state keys it needs), converted once into this run's directory.
                    load_from = ckpt.universal_copy(resume_from, ckpt_root / "universal")
                    _rank0_print(runner, f"world size {saved_world} -> {world}: resuming through the universal "
                                         f"checkpoint {load_from}")
        except ckpt.CheckpointError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - rank 0 alone would raise and leave its peers waiting
            error = f"cannot use checkpoint {resume_from or ckpt_root}: {type(exc).__name__}: {exc}"
    error = _agree(runner, error)
    if error:
        raise UsageError(error)
    box = [str(resume_from) if resume_from else None, str(load_from) if load_from else None]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    resume_from = Path(box[0]) if box[0] else None
    load_from = Path(box[1]) if box[1] else resume_from
    if load_from is not None and load_from != resume_from:
        cfg = dict(cfg, checkpoint=dict(cfg.get("checkpoint", {}), load_universal=True))

    # --- model, engine, MERIT --------------------------------------------------------------------
    torch.manual_seed(args.seed)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt2_config(preset, **overrides))
    n_params = sum(p.numel() for p in model.parameters())
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Hugging Face's decay grouping (no decay on biases and LayerNorms), read, not recomputed.
    groups = merit_param_groups(model, float(opt_params.get("weight_decay", optim.weight_decay)))
    client = None
    if client_optimizer:
        from merit_ds.optim import MERIT

        client = MERIT(groups, lr=opt_params["lr"], betas=tuple(opt_params.get("betas", optim.betas)),
                       eps=opt_params.get("eps", optim.eps), weight_decay=opt_params.get("weight_decay", 0.0))
    engine = runner.build(model, groups, cfg, client)
    verify_merit_is_stepping(engine)
    basic = engine.basic_optimizer
    _rank0_print(runner, f"optimizer: {type(engine.optimizer).__name__} -> MERIT verified stepping "
                         f"(merit_ds.integrations.verify); {n_params:,} parameters")
    if args.compile:
        engine.compile()
    scheduler = warmup_cosine(basic, warmup, plan.steps, floor)
    probe = AttentionLogitProbe(engine.module)
    gns = GradientNoiseScale()

    start_step = 0
    if resume_from is not None:
        load_path, client_state = engine.load_checkpoint(str(load_from.parent), tag=load_from.name,
                                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None or "merit_ds" not in (client_state or {}):
            raise UsageError(f"DeepSpeed could not load {load_from}")
        state = client_state["merit_ds"]
        start_step = int(state["step"])
        try:
            train_loader.load_state_dict(state["loader"])
        except DataError as exc:
            raise UsageError(f"checkpoint {resume_from} does not match the data: {exc}") from None
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        if "gns" in state:  # checkpoints written before the noise scale's EMAs were saved lack it
            gns.load_state_dict(state["gns"])
        _rank0_print(runner, f"resumed from {resume_from} at step {start_step}")

    # --- outputs (only now: every check above passed) --------------------------------------------
    metrics = MetricsLog(out / "metrics.jsonl")
    trackers = []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(dict(run_info, steps=plan.steps, lr=lr, warmup=warmup, floor=floor,
                                                      tokens_per_step=plan.tokens_per_step, ds_config=cfg), indent=1))
        metrics.truncate_after(start_step)
        record_run(out, model.config, args.data, getattr(args, "optimizer", "MERIT"))  # for merit-ds export
        trackers = make_trackers(args.tracker, out, out.name, dict(run_info, lr=lr, steps=plan.steps))

    def log(record: dict, step: int) -> None:
        if rank == 0:
            metrics.write(record)
            for t in trackers:
                t.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step)

    def evaluate() -> dict:
        engine.eval()
        total = 0.0
        with torch.no_grad():
            for k in range(val_loader.grad_accum):
                x, y = val_loader.get_batch(0, k)
                total += float(lm_loss(engine(input_ids=x.to(engine.device)).logits, y.to(engine.device)))
        engine.train()
        loss = _mean_over_ranks(total, val_loader.grad_accum)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def save(step: int) -> None:
        # client_state lands in rank 0's model-states file: the loader position and scheduler are
        # the same on every rank; the RNG state is rank 0's (the recipes use no dropout and a
        # deterministic data order, so nothing in the loop draws random numbers).
        tag = ckpt.tag_for(step)
        state = {"step": step, "loader": train_loader.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": _rng_state(), "gns": gns.state_dict()}
        if rank == 0:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            # a save killed earlier (maybe at another world size) leaves files DeepSpeed would not
            # overwrite, and finalize would checksum them in
            shutil.rmtree(ckpt_root / f".tmp-{tag}", ignore_errors=True)
        if world > 1:
            dist.barrier()
        engine.save_checkpoint(str(ckpt_root), tag=f".tmp-{tag}", client_state={"merit_ds": state}, save_latest=False)
        if world > 1:
            dist.barrier()
        if rank == 0:
            ckpt.finalize(ckpt_root, f".tmp-{tag}", tag, run_info, step)
            ckpt.prune(ckpt_root, args.keep_last)
        if world > 1:
            dist.barrier()

    # --- train -------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=plan.steps, initial=start_step, disable=rank != 0 or args.no_progress, unit="step",
               dynamic_ncols=True, mininterval=1.0)
    engine.train()
    t_last = time.perf_counter()
    last_saved = start_step if resume_from is not None else -1
    for step in range(start_step + 1, plan.steps + 1):
        diag = args.diag_every > 0 and (step % args.diag_every == 0 or step == 1)
        if diag:  # trust-ratio statistics of this step only (recorded inside MERIT's step)
            basic.partial_stats.clear()
            basic.track_stats = True
        lr_now = basic.param_groups[0]["lr"]
        loss_sum = 0.0
        first = None
        for micro_step in range(plan.grad_accum):
            x, y = next(train_loader)
            x, y = x.to(engine.device), y.to(engine.device)
            if first is None:
                first = (x, y)
            if diag and micro_step == 0:
                probe.arm()
            with runner.micro_context():
                loss = lm_loss(engine(input_ids=x).logits, y)
                if diag and micro_step == 0:
                    max_logit = probe.collect()
                runner.backward_step(loss)
            loss_sum += float(loss.detach())
        scheduler.step()
        train_loss = _mean_over_ranks(loss_sum, plan.grad_accum)
        now = time.perf_counter()
        record = {"step": step, "loss": train_loss, "lr": lr_now, "tokens": step * plan.tokens_per_step,
                  "step_time_s": now - t_last}
        t_last = now
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if diag:
            record["max_attn_logit"] = max_logit
            basic.track_stats = False
            summary = reduce_trust_stats(basic)  # 5 scalars per rank; every rank joins
            if summary:
                record.update(summary)
            noise = gns.measure(engine.module, *first, world) if zero_stage < 3 else None
            if noise:
                record.update(noise)
        if args.eval_every > 0 and step % args.eval_every == 0 and step != plan.steps:
            record.update(evaluate())
        log(record, step)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr_now:.2e}", **(
            {"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at step {step}; last good checkpoint: "
                                     f"{ckpt.latest_checkpoint(ckpt_root) if ckpt_root.exists() else None}")
        if args.ckpt_every > 0 and step % args.ckpt_every == 0:
            save(step)
            last_saved = step
    bar.close()
    final = evaluate()
    log({"step": plan.steps, **final}, plan.steps)
    _rank0_print(runner, f"final: val loss {final['val_loss']:.4f}, perplexity {final['val_ppl']:.2f}")
    if last_saved != plan.steps:
        save(plan.steps)
    _rank0_print(runner, f"checkpoint: {ckpt_root / ckpt.tag_for(plan.steps)}")
    if not args.no_export:  # every rank: the probe forward is collective under ZeRO 3
        export_after_training(engine, data=args.data, run=out, seq_len=seq_len)  # prints "exported: DIR"
    if rank == 0:
        for t in trackers:
            t.finish()
        if not args.no_plot:
            png = plot_losses(metrics.read(), out / "loss.png",
                              f"{args.model} + MERIT, ZeRO {zero_stage}, batch {plan.global_batch} x {seq_len}, {world} ranks")
            print(f"plot: {png}", flush=True)
    runner.close()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, BatchConfigError) as exc:
        # Every rank reports (a launcher may stop rank 0 before it prints a peer's error).
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        print(f"merit_ds.train: error{f' (rank {rank})' if rank else ''}: {exc}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2


def exit_process(rc: int) -> None:
    """End a finished run without the interpreter teardown.

    Everything is written, flushed and fsynced (checkpoints, metrics, trackers) and the process
    group is destroyed; what is left is teardown, where a communication library's thread can still
    abort the process ("terminate called without an active exception", ~1 in 15 CPU runs) and turn
    a finished run into a failure for the launcher. MPI (mpirun) is finalized first, as it expects.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(rc)
