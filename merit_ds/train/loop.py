r"""One training loop for GPT-2 with MERIT (or the LAMB / AdamW baselines: ``--optimizer``), started by
the deepspeed launcher or ``accelerate launch``.

    deepspeed [--num_gpus N | --hostfile H] --module merit_ds.train --model gpt2-small --global-batch 6k \
        --data DIR --out RUN --ds-config ds_configs/gpt2-small_b6144_zero1_bf16.json
    accelerate launch --config_file launch/accelerate_multi_node.yaml -m merit_ds.train ...same arguments...

Both launchers meet in :class:`.launcher.Runner`: the model is wrapped by a DeepSpeed engine either
way (Accelerate builds it from its DeepSpeed plugin), so forward, checkpoints and diagnostics are
one code path; only backward/step goes through ``accelerator.backward`` under Accelerate.
Checkpoints are DeepSpeed's format under both.

This module is the command line (:func:`parse_args`, :func:`main`, :func:`exit_process`) and the
wiring: the parts, in the order :func:`run` builds them (each can be read, and tested, alone):

    configure           arguments + JSON -> RunConfig (:func:`.run_config.resolve`, pure: batch
                        arithmetic, optimizer, lr and where it came from; impossible combinations
                        stop here); print_banner
    make_loaders        train/val token-block loaders; every shard verified (checksums, vocabulary);
                        the train loader prefetched by a worker thread (--prefetch)
    check_shared_out    --out is one directory for every rank (:mod:`.shared_fs`), else stop here
    describe_run        what a checkpoint records about the run
    locate_checkpoint   found and validated on rank 0, verdict on every rank (a corrupt or
                        incompatible one stops here, before anything is written; another world
                        size goes through DeepSpeed's universal format)
    build_engine        model, optimizer on HF's decay groups, engine; the chosen optimizer
                        verified as the one that steps (:mod:`.optimizers`)
    Trainer             (:mod:`.trainer`) resume, train_step, evaluate, save
    outputs             run.json, metrics.jsonl and the trackers (:class:`.metrics.RunLog`), the
                        throughput meter (:class:`.metrics.Throughput`)

then the loop itself, :meth:`.trainer.Trainer.train`: every step logs loss/lr/grad-norm; every
``--eval-every`` validation loss and perplexity; every ``--diag-every`` the large-batch diagnostics;
every ``--ckpt-every`` an atomic checkpoint (keep-last-K; rank 0 hashes it in the background) ->
:func:`.finish.finish_run`: final eval, checkpoint, Hugging Face export (OUT/hf_model), ``loss.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from merit_ds.build_locks import first_rank_of_node, warn_stale_build_locks
from merit_ds.data.prefetch import PrefetchLoader
from merit_ds.integrations.param_groups import merit_param_groups

from .batch import BatchConfigError
from .data_source import DEFAULT_EVAL_SEQUENCES, DataError, check_token_data, make_train_loader, make_val_loader

#: In the run directory: the token data's sizes and modification times at its last full check.
VERIFIED_DATA = "verified_data.json"
from .export import record_run
from .finish import finish_run
from .launcher import Runner, cpu_torch_on_gpu_node, detect_launcher, rank0_print
from .metrics import RunLog, Throughput
from .preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from .preemption import Preempted, Preemption
from .optimizers import build_client_optimizer, describe_stepping, verify_optimizer_is_stepping
from .presets import gpt2_config, optimizer_names
from .run_config import (COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_MIN, RunConfig, UsageError,
                         collective_timeout, lean_loss_wanted, resolve)
from .shared_fs import check_shared_out
from .tracking import MetricsLog, make_trackers
from .trainer import CheckpointSaveError, LoopConfig, Trainer

__all__ = ["main", "parse_args"]


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
    g.add_argument("--loss", default="auto", choices=("auto", "lean", "plain"),
                   help="the LM loss: lean (output projection and cross-entropy chunked over tokens: no "
                        "full-vocabulary fp32 logits), plain, or auto (default: lean on CUDA, plain on the CPU)")
    g.add_argument("--compile", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile the model (engine.compile): auto (default) compiles on CUDA and not on the "
                        "CPU; --compile alone is on")
    g.add_argument("--family", default=None,
                   help="a shape at a fixed non-embedding parameter count (with --params): wide (d/L 128), base (32), "
                        "deep (8) or L<layers>; replaces the preset's n_layer/n_embd/n_head (merit_ds/train/families.py)")
    g.add_argument("--params", type=float, default=None, help="non-embedding parameters of --family, e.g. 85e6")
    g.add_argument("--head-dim", type=int, default=64, help="--family widths are multiples of this (n_head = width / it)")
    g = p.add_argument_group("batch and length")
    g.add_argument("--global-batch", default=None, help="sequences per step, or a preset: 480 1k 2k 4k 6k")
    g.add_argument("--micro-batch", type=int, default=None, help="sequences per forward per rank")
    g.add_argument("--batch-schedule", default=None, metavar="SPEC",
                   help="global batch by tokens trained, instead of --global-batch: '16@0,64@200000' (16 sequences "
                        "from token 0, 64 from token 200,000), 'ramp:16..128@0..500000' (linear, rounded toward the "
                        "start to multiples of gcd(16, 128)), or both mixed; the micro-batch stays, grad-accum follows")
    g.add_argument("--batch-schedule-lr", default=None, choices=["tokens", "sqrt"],
                   help="lr under --batch-schedule: tokens (default: the warmup-cosine schedule by tokens, whatever "
                        "the batch) | sqrt (also x sqrt(batch / first batch))")
    g.add_argument("--tokens", type=float, default=None, help="token budget (GPT-2 default 48e9)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --tokens)")
    g = p.add_argument_group("optimizer and DeepSpeed")
    g.add_argument("--optimizer", choices=list(optimizer_names()), default="merit",
                   help=f"{' | '.join(optimizer_names())}: any optimizer in merit_ds's registry (the first is the "
                        "default; merit_ds.optim.registry), each with its own lr preset; adamw is DeepSpeed's AdamW "
                        "(FusedAdam on GPU, DeepSpeedCPUAdam with offload, torch.optim.AdamW on CPU)")
    g.add_argument("--ds-config", "--deepspeed_config", dest="ds_config", default=None,
                   help="DeepSpeed JSON (ds_configs/); default: built from --zero-stage/--precision/--offload")
    g.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3],
                   help="without --ds-config (default 1, the recipes' stage: the fewest bytes sent per step once "
                        "there are micro-batches to accumulate; `merit-ds plan` recommends one for your cluster)")
    g.add_argument("--offload", action="store_true", help="ZeRO-Offload the optimizer states to CPU")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--lr", type=float, default=None,
                   help="peak lr (default: the DeepSpeed JSON's, else the optimizer's preset, scaled with the batch by "
                        "the optimizer's measured exponent; the banner says how)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 2%% of the steps")
    g.add_argument("--min-lr-ratio", type=float, default=None, help="cosine floor (default 0.1)")
    g.add_argument("--collective-timeout", default=None, metavar="MINUTES",
                   help="how long a rank waits for the others in one collective (a peer out of memory, hung or gone) "
                        "before it stops with one line; fractions allowed, e.g. 0.5 (default: "
                        f"${COLLECTIVE_TIMEOUT_ENV}, else {DEFAULT_COLLECTIVE_TIMEOUT_MIN:g}; docs/recipes.md)")
    g = p.add_argument_group("data, output, cadence")
    g.add_argument("--data", required=True, help="prepared data directory (python -m merit_ds.data prepare)")
    g.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, tensorboard/, loss.png")
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--verify", choices=("changed", "full"), default="changed",
                   help="at start-up, re-hash the token shards and the checkpoint to resume only where their size or "
                        "modification time changed since their last full check (changed, default), or everything (full)")
    g.add_argument("--eval-sequences", type=int, default=None, help=f"validation blocks: a fixed set, the same at every world size and micro-batch "
                        f"(default: the model preset's, 2048 for the GPT-2 recipes (standard error <= 0.01 nats), "
                        f"{DEFAULT_EVAL_SEQUENCES} for tiny; capped at the val split)")
    g.add_argument("--prefetch", type=int, default=2,
                   help="micro-batches a worker thread reads ahead while the device computes (pinned memory on "
                        "CUDA); 0: read in the loop. Resume is exact either way (default 2)")
    g.add_argument("--ckpt-every", type=int, default=100)
    g.add_argument("--keep-last", type=int, default=3)
    g.add_argument("--resume", default="auto", help="auto (latest in --out, if any) | never | PATH to a checkpoint")
    # 100: a diagnostics step costs up to one extra step (the noise scale's passes at grad_accum 1,
    # the batch-480 recipes); every 10 steps that was ~10% of training (benchmarks/bench_diag_cost.py)
    g.add_argument("--diag-every", type=int, default=100,
                   help="diagnostics cadence in steps (0: off; also at step 1; diagnostics steps are log steps; "
                        "default 100: a diagnostics step costs ~1.75 extra steps at batch 480, so diagnostics and "
                        "eval together take ~2%% of training; see docs/diagnostics.md)")
    g.add_argument("--diversity-probe", type=int, default=8,
                   help="gradient diversity on diagnostics steps from per-example gradients of up to this many of each "
                        "rank's sequences of the step (0: off)")
    g.add_argument("--log-every", type=int, default=1,
                   help="log interval in steps: loss (mean over the interval), grad norm, step time, tokens/s, MFU, "
                        "peak memory; between log steps the loss stays on the device (default 1)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense FLOP/s per device for MFU, in TFLOP/s (default: from the GPU's name, A100/H100/H200 "
                        "bf16; none on CPU)")
    g.add_argument("--tracker", default="tensorboard", help="tensorboard | wandb | tensorboard,wandb | none")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-export", action="store_true", help="skip the Hugging Face export to OUT/hf_model at the end")
    g.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _agree(runner, error: str | None) -> str | None:
    """Rank 0 decides (it checked the files); every rank learns the verdict."""
    if not dist.is_initialized() or runner.world == 1:
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_ds_config(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read DeepSpeed config {path}: {exc}") from None


def _check_trackers(spec: str) -> None:
    import importlib.util

    for kind in spec.split(","):
        if kind not in ("tensorboard", "wandb", "none"):
            raise UsageError(f"unknown tracker {kind!r}: use tensorboard, wandb, tensorboard,wandb or none")
        if kind != "none" and importlib.util.find_spec(kind) is None:
            raise UsageError(f"--tracker {kind} needs the {kind} package (pip install {kind}), or use --tracker none")


def configure(args, runner: Runner, launcher: str) -> RunConfig:
    """Arguments + the ``--ds-config`` JSON -> the run configuration (:func:`.run_config.resolve`);
    under Accelerate also starts its state, which needs the resolved DeepSpeed config."""
    if args.ds_config is None and launcher == "accelerate" and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        args.ds_config = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]  # named in the accelerate YAML
    base_cfg = load_ds_config(args.ds_config) if args.ds_config else None
    # Accelerate needs the DeepSpeed config (with batch sizes) before it starts the process group;
    # the world size it will have is in the launcher's environment.
    world = int(os.environ.get("WORLD_SIZE", "1")) if launcher == "accelerate" else runner.world
    gpu_mem = None if runner.cpu else torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    rc = resolve(args, launcher=launcher, world=world, cpu=runner.cpu, base_cfg=base_cfg, gpu_mem_bytes=gpu_mem)
    if launcher == "accelerate":
        runner.init_accelerator(rc.ds_config)
        if runner.world != rc.plan.world:
            raise UsageError(f"accelerate started {runner.world} processes, WORLD_SIZE said {rc.plan.world}")
    return rc


def compile_wanted(choice: str, cpu: bool) -> bool:
    """``--compile``: on, off, or auto: on CUDA (where dynamo's fused kernels pay for the compile
    time; benchmarks/gpu_smoke.sh's training section measures eager against compiled), off on the
    CPU (compile time there exceeds a short run's saving; docs/recipes.md)."""
    return choice == "on" or (choice == "auto" and not cpu)


def device_line(runner: Runner, rc: RunConfig) -> str:
    """Where this run computes, in one line: device, collective backend, precision, world, ZeRO
    stage, micro-batch x accumulation (a CPU run on a GPU node is visible at a glance)."""
    if runner.cpu:
        device = f"cpu ({torch.get_num_threads()} threads per rank)"
    else:
        index = torch.cuda.current_device()
        device = f"cuda:{index} ({torch.cuda.get_device_name(index)}, torch {torch.__version__}, CUDA {torch.version.cuda})"
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    return (f"device: {device}; backend {backend}; {rc.precision}; world {runner.world}; ZeRO {rc.zero_stage}; "
            f"micro-batch {rc.plan.micro_batch} x accumulation {rc.plan.grad_accum}; loss {rc.loss}")


def print_banner(runner: Runner, rc: RunConfig) -> None:
    p = rc.opt_params
    rank0_print(runner, f"merit_ds.train: launcher {rc.launcher}, {runner.world} ranks, ZeRO {rc.zero_stage}, "
                        f"{rc.precision}, model {rc.model} ({rc.preset.description}), optimizer {rc.label}")
    rank0_print(runner, device_line(runner, rc))
    if rc.family is not None:
        rank0_print(runner, rc.family.describe())
    if rc.batch_table is None:
        rank0_print(runner, rc.plan.describe())
    else:
        rank0_print(runner, describe_schedule(rc))
    if rc.micro_note:
        rank0_print(runner, rc.micro_note)
    rank0_print(runner, f"schedule: {rc.label} peak lr {rc.lr:.4g} ({rc.lr_origin}), warmup {rc.warmup} steps, "
                        f"cosine to {rc.floor} x peak; betas {tuple(p['betas'])}, eps {p['eps']}, weight decay "
                        f"{p['weight_decay']} (matrices only), clip {rc.ds_config.get('gradient_clipping')}")


def describe_schedule(rc: RunConfig) -> str:
    """The banner's batch lines under --batch-schedule: every phase, its steps and grad-accum."""
    t, p = rc.batch_table, rc.plan
    unit = p.micro_batch * p.world
    lines = [f"batch schedule {t.schedule.spec}: micro_batch {p.micro_batch} x world {p.world} fixed, grad_accum "
             f"per phase; a step takes the batch of the token count it starts at"]
    for ph in t.phases():
        levels = ", ".join(f"{b:,} (grad_accum {b // unit}) x {n:,} steps" for b, n in ph["levels"])
        lines.append(f"  {ph['phase']}: steps {ph['first_step']:,}-{ph['first_step'] + ph['steps'] - 1:,}: {levels}")
    budget = f"budget {p.token_budget:,} tokens reached in " if p.token_budget is not None else ""
    lines.append(f"  {budget}{t.steps:,} steps, {t.total_tokens:,} tokens; lr by tokens"
                 + (" x sqrt(batch / first batch)" if rc.lr_rule == "sqrt" else " (not scaled with the batch)"))
    return "\n".join(lines)


def make_loaders(args, rc: RunConfig, rank: int, world: int):
    eval_sequences = args.eval_sequences or rc.preset.eval_sequences
    try:
        train_loader = make_train_loader(args.data, seq_len=rc.seq_len, global_batch=rc.plan.global_batch,
                                         micro_batch=rc.plan.micro_batch, rank=rank, world=world, seed=args.seed)
        val_loader = make_val_loader(args.data, seq_len=rc.seq_len, eval_sequences=eval_sequences,
                                     micro_batch=rc.plan.micro_batch, rank=rank, world=world)
        # The ids the data may hold: the tokenizer's (the preset pads the embedding to a multiple of
        # 64 with ids no tokenizer produces), or the whole embedding if the user set vocab_size.
        vocab = gpt2_config(rc.preset, **model_overrides(rc)).vocab_size
        if "vocab_size" not in model_overrides(rc):
            vocab = min(vocab, rc.preset.token_vocab)
        verified = check_token_data(args.data, vocab, rank=rank, world=world, full=args.verify == "full",
                                    verified_record=Path(args.out) / VERIFIED_DATA, write_record=False)
        # written once --out is known to be the run directory (check_shared_out): nothing in --out before
        args.verified_data = None if verified["skipped"] else (vocab, verified["max_id"])
        if verified["skipped"] and rank == 0:
            print(f"data: {verified['shards']} shards unchanged (sizes, modification times) since their last full "
                  f"check ({Path(args.out) / VERIFIED_DATA}); --verify full re-reads them", flush=True)
    except DataError as exc:
        raise UsageError(f"data: {exc}") from None
    if args.prefetch < 0:
        raise UsageError(f"--prefetch must be >= 0, got {args.prefetch}")
    if args.prefetch:  # the same batches, read while the previous micro-batch computes
        train_loader = PrefetchLoader(train_loader, depth=args.prefetch)
    return train_loader, val_loader


def model_overrides(rc: RunConfig) -> dict:
    return {"n_positions": rc.seq_len, **rc.overrides}


def describe_run(rc: RunConfig, world: int, train_loader) -> dict:
    """What a checkpoint records about the run (:data:`.checkpoint.COMPATIBLE_KEYS` must match)."""
    config = gpt2_config(rc.preset, **model_overrides(rc)).to_dict()
    return {"model": rc.model, "optimizer": rc.optimizer,
            "model_config": {k: v for k, v in sorted(config.items())
                             if k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")},
            "seq_len": rc.seq_len, "global_batch": rc.plan.global_batch, "micro_batch": rc.plan.micro_batch,
            "world": world, "zero_stage": rc.zero_stage, "precision": rc.precision, "launcher": rc.launcher,
            # the lr schedule is part of the trajectory: a different length/peak would silently
            # continue under the checkpoint's schedule (LambdaLR restores its factor object)
            "schedule": {"steps": rc.plan.steps, "warmup": rc.warmup, "floor": rc.floor, "lr": rc.lr,
                         # only with a batch schedule, so constant-batch checkpoints stay compatible
                         **({"batch_schedule": rc.batch_table.schedule.spec, "lr_rule": rc.lr_rule}
                            if rc.batch_table is not None else {})},
            "data": getattr(getattr(train_loader, "tokens", None), "fingerprint", None) or
            train_loader.state_dict().get("data")}


def locate_checkpoint(resume: str, ckpt_root: Path, run_info: dict, runner: Runner, args_verify: str = "full"):
    """``(resume_from, load_from)``: the validated checkpoint to resume (or ``None``) and what to
    load (itself, or its universal copy at another world size). Rank 0 checks the files; every
    rank gets the verdict, so a bad checkpoint is the same clear error everywhere."""
    world = runner.world
    error, resume_from, load_from = None, None, None
    if runner.rank == 0:
        try:
            if resume == "never":
                if ckpt_root.exists() and any(ckpt_root.glob("step_*")):
                    raise ckpt.CheckpointError(f"{ckpt_root} already holds checkpoints and --resume never was given: "
                                               f"refusing to overwrite them; use another --out or --resume auto")
            elif resume == "auto":
                resume_from, note = ckpt.auto_resume_point(ckpt_root)
                if note:
                    rank0_print(runner, note)
            else:
                resume_from = Path(resume)
                ckpt.refuse_going_back(resume_from, ckpt_root)
            if resume_from is not None:
                checksums = True if args_verify == "full" else "changed"
                saved_world = ckpt.validate(resume_from, run_info, allow_world_change=True,
                                            checksums=checksums)["run"]["world"]
                if saved_world != world and run_info["zero_stage"] > 0:
                    # ZeRO files are per rank: re-shard through DeepSpeed's universal format (the
                    # optimizers keep the state keys it needs), converted once into this run's directory.
                    load_from = ckpt.universal_copy(resume_from, ckpt_root / "universal")
                    rank0_print(runner, f"world size {saved_world} -> {world}: resuming through the universal "
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
    return resume_from, load_from


def build_engine(args, rc: RunConfig, runner: Runner, ds_config: dict):
    """The model (seeded), the chosen optimizer on HF's decay groups, the DeepSpeed engine; the
    optimizer that steps is verified to be the chosen one. Returns ``(engine, basic optimizer)``."""
    torch.manual_seed(args.seed)
    from transformers import GPT2LMHeadModel

    if lean_loss_wanted(args.loss, runner.cpu) == "lean":  # the loss inside the engine's forward
        from .lean_loss import lean_loss_model_class

        model = lean_loss_model_class(GPT2LMHeadModel)(gpt2_config(rc.preset, **model_overrides(rc)))
    else:
        model = GPT2LMHeadModel(gpt2_config(rc.preset, **model_overrides(rc)))
    n_params = sum(p.numel() for p in model.parameters())
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Hugging Face's decay grouping (no decay on biases and LayerNorms), read, not recomputed; the
    # same two groups for every optimizer (a group's weight_decay overrides the JSON's).
    groups = merit_param_groups(model, float(rc.opt_params["weight_decay"]))
    client = build_client_optimizer(rc, groups) if rc.client else None
    engine = runner.build(model, groups, ds_config, client)
    basic = verify_optimizer_is_stepping(engine, rc.optimizer)
    rank0_print(runner, f"optimizer: {type(engine.optimizer).__name__} -> {describe_stepping(basic, rc.optimizer)} "
                        f"verified stepping; {n_params:,} parameters")
    if compile_wanted(args.compile, runner.cpu):
        engine.compile()
    return engine, basic


def run(args) -> int:
    if first_rank_of_node():  # once per node: a stale build lock would hang DeepSpeed's set-up
        warn_stale_build_locks()
    launcher = detect_launcher(args.launcher)
    _check_trackers(args.tracker)
    refusal = cpu_torch_on_gpu_node()  # before DeepSpeed picks its CPU accelerator behind our back
    if refusal:
        raise UsageError(refusal)
    runner = Runner(launcher, collective_timeout(args.collective_timeout))
    rc = configure(args, runner, launcher)
    rank, world, plan = runner.rank, runner.world, rc.plan
    print_banner(runner, rc)
    train_loader, val_loader = make_loaders(args, rc, rank, world)
    rank0_print(runner, val_loader.describe())

    # --- a checkpoint to resume: found and validated before anything is built or written -------------
    out = Path(args.out)
    # a node-local --out would fail only at the first resume: refuse it now, on every rank
    check_shared_out(out, rank, world)
    if rank == 0 and getattr(args, "verified_data", None) is not None:
        from merit_ds.data.integrity import write_verified_record

        write_verified_record(out / VERIFIED_DATA, args.data, *args.verified_data)
    ckpt_root = out / "checkpoints"
    run_info = describe_run(rc, world, train_loader)
    resume_from, load_from = locate_checkpoint(args.resume, ckpt_root, run_info, runner, args.verify)
    cfg = rc.ds_config
    if load_from is not None and load_from != resume_from:
        cfg = dict(cfg, checkpoint=dict(cfg.get("checkpoint", {}), load_universal=True))

    engine, basic = build_engine(args, rc, runner, cfg)
    trainer = Trainer(engine, runner, basic, rc.optimizer, train_loader, val_loader, steps=plan.steps,
                      warmup=rc.warmup, floor=rc.floor, tokens_per_step=plan.tokens_per_step, zero_stage=rc.zero_stage,
                      diversity_probe=args.diversity_probe, batch_table=rc.batch_table, lr_rule=rc.lr_rule,
                      lean_loss=rc.loss == "lean")
    start_step = 0
    if resume_from is not None:
        start_step = trainer.resume(load_from, resume_from)
        rank0_print(runner, f"resumed from {resume_from} at step {start_step}")

    # --- outputs (only now: every check above passed) --------------------------------------------
    metrics = MetricsLog(out / "metrics.jsonl")
    trackers = []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(dict(run_info, steps=plan.steps, lr=rc.lr, warmup=rc.warmup,
                                                      floor=rc.floor, tokens_per_step=plan.tokens_per_step,
                                                      batch_schedule=None if rc.batch_table is None else {
                                                          "spec": rc.batch_table.schedule.spec, "lr_rule": rc.lr_rule,
                                                          "segments": rc.batch_table.segments,
                                                          "total_tokens": rc.batch_table.total_tokens},
                                                      ds_config=cfg), indent=1))
        metrics.truncate_after(start_step)
        record_run(out, engine.module.config, args.data, rc.label)  # for merit-ds export
        trackers = make_trackers(args.tracker, out, out.name, dict(run_info, lr=rc.lr, steps=plan.steps))

    log = RunLog(metrics, trackers, rank)

    # --- train, then the end of the run ----------------------------------------------------------------
    loop_cfg = LoopConfig(ckpt_root=ckpt_root, run_info=run_info, seq_len=rc.seq_len, log_every=args.log_every,
                          diag_every=args.diag_every, eval_every=args.eval_every, ckpt_every=args.ckpt_every,
                          keep_last=args.keep_last, progress=not args.no_progress, count_graphs=compile_wanted(args.compile, runner.cpu))
    meter = Throughput.for_run(rc, world, args.peak_tflops, engine.device)
    preemption = Preemption()  # SIGTERM / SIGUSR1: checkpoint after the current step, exit 143
    try:
        trainer.train(loop_cfg, meter, log, preemption)
    except Preempted as stop:
        if isinstance(train_loader, PrefetchLoader):
            train_loader.close()
        if rank == 0:
            log.finish()  # the trackers flushed and closed; metrics.jsonl is written record by record
        sys.stderr.write(f"merit_ds.train: {stop}\n" if rank == 0 else "")
        sys.stderr.flush()
        runner.close()
        return PREEMPTED_EXIT_CODE
    finally:
        preemption.close()
    finish_run(trainer, loop_cfg, meter, log, args, rc)
    runner.close()
    return 0


#: Exit codes of a failed run: this rank raised (its own error: out of memory, a bug, a non-finite
#: loss), or a collective failed under it because another rank stopped or hung (``--collective-timeout``).
EXIT_FAILED, EXIT_PEER_GONE = 1, 3


def main(argv=None) -> int:
    args = parse_args(argv)
    rc = None
    try:
        rc = _run_reporting_errors(args)
        return rc
    finally:
        # DeepSpeed's CPU all-reduce segment of this rank (66 MiB in /dev/shm that DeepSpeed never
        # unlinks), on every way out: done, refused, preempted, or failed
        from merit_ds.integrations.deepspeed_shm import release_cpu_allreduce_buffer

        release_cpu_allreduce_buffer(int(os.environ.get("RANK", "0")))
        if rc in (EXIT_FAILED, EXIT_PEER_GONE) and dist.is_initialized() and dist.get_world_size() > 1:
            # the process group is broken: leave now, not in a teardown that can wait for the peers
            # (destroy_process_group, a communicator's destructor, MPI_Finalize, exit handlers)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)


def _run_reporting_errors(args) -> int:
    try:
        return run(args)
    except (UsageError, BatchConfigError, CheckpointSaveError) as exc:
        # Every rank reports (a launcher may stop rank 0 before it prints a peer's error).
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        # one write() per message: ranks share the launcher's stderr pipe, and print() writes the
        # text and its newline separately, so two ranks' messages could land on one line
        sys.stderr.write(f"merit_ds.train: error{f' (rank {rank})' if rank else ''}: {exc}\n")
        sys.stderr.flush()
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    except Exception as exc:  # noqa: BLE001 - any other failure: one line per rank, the traceback to a file
        return _report_failure(args, exc)


def _report_failure(args, exc: Exception) -> int:
    """One line on stderr for a rank that failed, the traceback to its log file; returns the exit code.

    A collective that failed because another rank stopped or hung (:func:`_peer_failure`): that
    rank's output says why; this one says so (:data:`EXIT_PEER_GONE`). Anything else is this rank's
    own failure (:data:`EXIT_FAILED`): its type and first line. Both name the last good checkpoint
    and how to resume; :func:`main` then ends the process without waiting for the peers."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    _finish_pending_checkpoint(args)
    last = _last_good_checkpoint(args)
    log = _write_traceback(args, exc, rank)
    where = f" Stack trace: {log}." if log else ""
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "(no message)"
    if last is None:
        resume = "No checkpoint was saved before it: the same command starts again from step 0."
    elif args.resume == "auto":
        resume = "Run the same command again to resume from it (--resume auto)."
    else:
        resume = "Run the same command with --resume auto to resume from it."
    if _peer_failure(exc):
        # a collective failed because another rank is gone (killed, out of memory, its node lost) or
        # hung past --collective-timeout: its own output says why
        sys.stderr.write(f"merit_ds.train: error (rank {rank}): another rank stopped while this one waited for it in a "
                         f"collective ({first}); see that rank's output for why. Checkpoints already saved are intact; "
                         f"last good checkpoint: {last or 'none'}. {resume}{where}\n")
        sys.stderr.flush()
        return EXIT_PEER_GONE
    first = first.split("; last good checkpoint:")[0]  # a message that names one (a non-finite loss): ours is newer
    hint = ""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in first.lower():
        hint = ("Out of memory: a smaller --micro-batch keeps the global batch (more gradient accumulation); "
                "--activation-checkpointing saves more. ")
    sys.stderr.write(f"merit_ds.train: error (rank {rank} of {world}): {type(exc).__name__}: {first}; last good "
                     f"checkpoint: {last or 'none'}. {hint}{resume}{where}\n")
    sys.stderr.flush()
    if dist.is_initialized() and world == 1:
        dist.destroy_process_group()  # no peer to wait for: an in-process caller may start again
    return EXIT_FAILED


def _finish_pending_checkpoint(args) -> None:
    """Rank 0 completes the checkpoint it is finalising in the background (hashing, metadata,
    ``latest``: :class:`.trainer._Finaliser`, a thread of that name) before it reports: every rank
    had written its files of that step, so it is good, and local work, bounded by the timeout."""
    import threading

    try:
        limit = collective_timeout(args.collective_timeout).total_seconds()
    except UsageError:
        limit = DEFAULT_COLLECTIVE_TIMEOUT_MIN * 60
    for thread in threading.enumerate():
        if thread.name.startswith("merit_ds-finalise-") and thread is not threading.current_thread():
            thread.join(limit)


def _last_good_checkpoint(args):
    """The newest complete checkpoint of the run (what ``--resume auto`` takes), else the one it
    resumed from (``--resume PATH``), else None."""
    try:
        done = ckpt.complete_checkpoints(Path(args.out) / "checkpoints")
    except OSError:
        done = []
    if done:
        return done[0]
    return Path(args.resume) if args.resume not in ("auto", "never") else None


def _write_traceback(args, exc: BaseException, rank: int):
    """Append ``exc``'s traceback to ``OUT/logs/error_rank<R>.log`` (or, before ``--out`` exists, a
    file in the temporary directory); its path, or None if it cannot be written."""
    import datetime
    import socket
    import tempfile
    import traceback

    out = Path(args.out)
    path = (out / "logs" / f"error_rank{rank}.log" if out.is_dir() else
            Path(tempfile.gettempdir()) / f"merit_ds_train_error_rank{rank}_{os.getpid()}.log")
    try:
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as f:
            f.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} rank {rank}, host "
                    f"{socket.gethostname()}, pid {os.getpid()}\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    except OSError:
        return None
    return path


#: What gloo and NCCL say when the other end of a collective has gone away, or did not answer within
#: the collective timeout (gloo: "Timed out waiting 30000ms for recv operation"; NCCL's watchdog).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted", "Socket Timeout", "connection refused", "Timed out waiting",
              "collective operation timeout", "failed to recv, got 0 bytes")


def _peer_failure(exc: BaseException) -> bool:
    text = str(exc)
    return any(marker.lower() in text.lower() for marker in _PEER_GONE)


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
