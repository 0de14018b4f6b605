"""Command line + DeepSpeed JSON -> one :class:`RunConfig`: what a run trains, with which
optimizer, batch plan, schedule and DeepSpeed config. Pure: no process group, no files read
(the JSON arrives as a dict), no model; unit-tested in ``tests/test_recipes_resolve.py``.

Precedence, per value:

* ZeRO stage and precision: the JSON's when ``--ds-config`` is given, else the flags.
* global batch: ``--global-batch``, else the JSON's ``train_batch_size``, else 480 (tiny: 16);
  micro-batch: ``--micro-batch``, else the JSON's, else the largest that divides.
* ``--batch-schedule`` (:mod:`.batch_schedule`): the global batch per step; it excludes
  ``--global-batch`` and a JSON ``train_batch_size``. The micro-batch is fixed for the whole run and
  must divide every phase's per-rank batch (default: the largest that does); the engine starts at the
  first phase's batch; :attr:`RunConfig.batch_table` lists every step's batch.
* optimizer: ``--optimizer`` (default ``merit``; any registered optimizer,
  :mod:`merit_ds.optim.registry`). A JSON whose ``"optimizer"`` section names an optimizer must
  name the same one (its registered ``json_name``: ``MERIT``, ``ShardedLAMB``, ``AdamW``, ...),
  else :class:`UsageError`.
* peak lr: ``--lr``, else the JSON's ``optimizer.params.lr``, else the optimizer's preset for the
  model, scaled from its reference batch by the optimizer's exponent (:func:`.presets.scaled_lr`);
  :attr:`RunConfig.lr_origin` says which.
* other optimizer hyperparameters: the JSON's, the preset's for keys it leaves out.

How the optimizer reaches DeepSpeed (:attr:`RunConfig.client`), by its spec's ``ds_route``:

* ``"json"`` (``merit``): named in the JSON (DeepSpeed builds ``torch.optim.MERIT`` with our param groups),
  or, for a user JSON without an ``"optimizer"`` section, a client optimizer the loop builds;
* ``"client"`` (``lamb``): always a client :class:`merit_ds.LAMB` built by the loop from the params (the JSON
  name ``ShardedLAMB`` need not be registered); the section is removed from the config;
* ``"deepspeed"`` (``adamw``): always DeepSpeed's own ``AdamW`` (FusedAdam on GPU, DeepSpeedCPUAdam with offload,
  ``torch.optim.AdamW`` via ``"torch_adam": true`` on a CPU run without offload).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

from merit_ds.integrations._common import ds_offloads_optimizer

from .batch import BatchPlan, plan_batch
from .batch_schedule import (LR_RULES, BatchScheduleError, StepTable, build_step_table, parse_batch_schedule,
                             warmup_steps_by_tokens)
from merit_ds.optim import registry

from .ds_config import make_ds_config, set_batch
from .presets import (TOKEN_BUDGET, lr_rule_note, optimizer_label, ModelPreset, OptimPreset, get_model_preset,
                      get_optim_preset, parse_batch, scaled_lr, warmup_steps)

__all__ = ["UsageError", "RunConfig", "resolve", "json_optimizer", "DEFAULT_BATCH", "collective_timeout",
           "DEFAULT_COLLECTIVE_TIMEOUT_MIN", "COLLECTIVE_TIMEOUT_ENV"]

DEFAULT_BATCH = {"tiny": 16, "gpt2-small": 480, "gpt2-medium": 480}

class UsageError(ValueError):
    """Bad input: reported as one clear line, exit code 2, nothing written."""


#: ``--collective-timeout``'s default, in minutes: how long a rank waits for the others in one
#: collective before the job stops. The longest legitimate wait in a run is minutes at most (rank 0
#: hashing a checkpoint to validate it at start-up or finalising the last one, a cold first compile
#: under ``--compile``, a universal re-shard): docs/recipes.md, "A rank fails or hangs".
DEFAULT_COLLECTIVE_TIMEOUT_MIN = 10.0
#: Replaces the default (the flag, when given, wins over it).
COLLECTIVE_TIMEOUT_ENV = "MERIT_DS_COLLECTIVE_TIMEOUT_MIN"


def collective_timeout(flag: Optional[str], environ: Optional[Mapping[str, str]] = None) -> timedelta:
    """``--collective-timeout MINUTES`` (a string as given, or None), else ``$MERIT_DS_COLLECTIVE_TIMEOUT_MIN``,
    else :data:`DEFAULT_COLLECTIVE_TIMEOUT_MIN`, as a timedelta; :class:`UsageError` unless a finite
    number of minutes of at least one second (fractions allowed: 0.5 is 30 s)."""
    environ = os.environ if environ is None else environ
    if flag is not None:
        text, where = str(flag), "--collective-timeout"
        fix = (f"pass a number of minutes, e.g. --collective-timeout 10, or leave the flag out for the default "
               f"({DEFAULT_COLLECTIVE_TIMEOUT_MIN:g})")
    elif environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip():
        text, where = environ[COLLECTIVE_TIMEOUT_ENV], f"{COLLECTIVE_TIMEOUT_ENV} (environment)"
        fix = (f"set it to a number of minutes, e.g. {COLLECTIVE_TIMEOUT_ENV}=10, or unset it for the default "
               f"({DEFAULT_COLLECTIVE_TIMEOUT_MIN:g})")
    else:
        return timedelta(minutes=DEFAULT_COLLECTIVE_TIMEOUT_MIN)
    try:
        minutes = float(text)
        if not math.isfinite(minutes) or minutes * 60 < 1:  # 0, negative, nan, inf, below the 1 s gloo can honour
            raise ValueError
        return timedelta(minutes=minutes)
    except (ValueError, OverflowError):
        raise UsageError(f"{where} must be a positive number of minutes (how long a rank waits for the others in one "
                         f"collective before the job stops; at least 1 second, fractions allowed), got {text!r}; "
                         f"{fix}. Nothing was written.") from None


@dataclass(frozen=True)
class RunConfig:
    launcher: str
    model: str
    preset: ModelPreset
    overrides: dict
    seq_len: int
    precision: str
    zero_stage: int
    offload: bool
    plan: BatchPlan
    optimizer: str            # merit | lamb | adamw
    optim: OptimPreset        # the optimizer's preset for the model
    lr: float
    lr_origin: str            # where the peak lr came from (printed in the banner)
    opt_params: dict          # hyperparameters the optimizer is built with (lr included)
    ds_config: dict           # what DeepSpeed / Accelerate get
    client: bool              # the loop builds the optimizer and hands it to DeepSpeed
    warmup: int
    floor: float
    ds_config_path: Optional[str] = None
    micro_note: str = ""      # how the micro-batch was re-planned against the config's (printed)
    family: Optional[object] = None  # .families.FamilyShape when --family chose the shape
    batch_table: Optional[StepTable] = None  # --batch-schedule: every step's global batch
    lr_rule: str = "tokens"   # how the lr follows a batch schedule (batch_schedule.LR_RULES)
    loss: str = "plain"       # lean | plain (--loss, lean_loss_wanted)

    def batch_at(self, step: int) -> int:
        """Global batch of optimizer step ``step`` (1-based)."""
        return self.batch_table.batch(step) if self.batch_table is not None else self.plan.global_batch

    def tokens_before(self, step: int) -> int:
        """Tokens trained by the steps before ``step``."""
        if self.batch_table is not None:
            return self.batch_table.tokens_before(step)
        return (step - 1) * self.plan.tokens_per_step

    @property
    def total_tokens(self) -> int:
        return self.tokens_before(self.plan.steps + 1)

    @property
    def label(self) -> str:
        return optimizer_label(self.optimizer)


def json_optimizer(type_name: str) -> str:
    """``--optimizer`` value for a DeepSpeed JSON ``"optimizer": {"type": ...}``, or UsageError."""
    from merit_ds.integrations.deepspeed import builtin_name_hint

    spec = registry.by_json_name(type_name)
    if spec is not None:
        return spec.name
    spec = registry.by_json_name(type_name, case_sensitive=False)
    if spec is not None and spec.ds_route == "deepspeed":
        return spec.name  # DeepSpeed compares its own names case-insensitively
    if spec is not None:
        raise UsageError(f'DeepSpeed looks optimizer names up case-sensitively: write "type": "{spec.json_name}", '
                         f'not "{type_name}"')
    hint = builtin_name_hint(type_name)
    if hint is not None:
        raise UsageError(hint)
    names = ", ".join(f'"{s.json_name}"' for s in registry.specs())
    raise UsageError(f"optimizer type {type_name!r}: merit_ds.train trains {', '.join(registry.names())} "
                     f"({names} in a DeepSpeed JSON; --optimizer chooses)")


def parse_overrides(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--model-override expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
    return out


def cpu_supports_fp16() -> bool:
    """DeepSpeed's own answer on a CPU run (its accelerator's ``is_fp16_supported``, on CPU:
    whether oneDNN has fp16 kernels here), the check its engine applies to an fp16 config."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def resolve(args, *, launcher: str, world: int, cpu: bool, base_cfg: Optional[dict] = None,
            gpu_mem_bytes: Optional[float] = None) -> RunConfig:
    """One run configuration from the parsed arguments and the ``--ds-config`` JSON (a dict).

    ``world``: the data-parallel world size the run will have; ``cpu``: no CUDA device;
    ``gpu_mem_bytes``: the GPU's memory, with which the micro-batch, when neither ``--micro-batch``
    nor the JSON gives one, is the largest the memory plan (:func:`.plan.fitting_micro_batch`) fits.
    Raises :class:`UsageError` (or :class:`~merit_ds.train.batch.BatchConfigError`) on bad input.

    One step per concern, in this order (so the first bad input found is the one reported): the
    model, the engine settings, the JSON's optimizer section, the batch schedule, the batch plan,
    the peak lr, the optimizer's hyperparameters, the DeepSpeed config, how the optimizer reaches
    DeepSpeed, the lr schedule.
    """
    optimizer = getattr(args, "optimizer", "merit")
    label = optimizer_label(optimizer)
    where = args.ds_config or "the DeepSpeed config"
    preset, optim, overrides, family, seq_len = _model(args, optimizer)
    zero_stage, precision, offload = _engine_settings(args, base_cfg, cpu)
    section = _json_optimizer_section(base_cfg, optimizer, where)
    schedule, lr_rule = _batch_schedule(args, base_cfg, where)
    fit = None
    if gpu_mem_bytes:
        def fit(per_rank):  # the planner's largest micro-batch for this GPU, this stage, this loss
            from .plan import fitting_micro_batch

            return fitting_micro_batch(preset, per_rank, seq_len, mem_bytes=gpu_mem_bytes, world=world,
                                       stage=zero_stage, precision=precision, offload=offload,
                                       activation_checkpointing=bool(getattr(args, "activation_checkpointing", False)),
                                       optimizer=optimizer, loss=lean_loss_wanted(getattr(args, "loss", "auto"), cpu))
    plan, table, micro_note = _batch_plan(args, base_cfg, world, seq_len, schedule, fit)
    json_params = dict((section or {}).get("params", {}))
    lr, lr_origin = _peak_lr(args, json_params, optim, plan, table, optimizer, where)
    opt_params = _optimizer_params(optim, json_params, lr)
    cfg = _ds_config(base_cfg, zero_stage, precision, offload, optim, optimizer, plan, cpu=cpu, where=where)
    cfg, client = _hand_optimizer_to_deepspeed(cfg, optimizer, opt_params, label, cpu=cpu, offload=offload,
                                               where=where)
    warmup, floor = _lr_schedule(args, plan, table, optim)
    return RunConfig(launcher=launcher, model=args.model, preset=preset, overrides=overrides, seq_len=seq_len,
                     precision=precision, zero_stage=zero_stage, offload=offload, plan=plan, optimizer=optimizer,
                     optim=optim, lr=lr, lr_origin=lr_origin, opt_params=opt_params, ds_config=cfg, client=client,
                     warmup=warmup, floor=floor, ds_config_path=args.ds_config, micro_note=micro_note, family=family,
                     batch_table=table, lr_rule=lr_rule, loss=lean_loss_wanted(getattr(args, "loss", "auto"), cpu))


def _model(args, optimizer: str):
    """The model: its preset (and the optimizer's preset for it), the shape overrides
    (``--model-override``, ``--family``) and the sequence length."""
    try:
        preset = get_model_preset(args.model)
        optim = get_optim_preset(args.model, optimizer)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    overrides = parse_overrides(args.model_override)
    family = _family(args, overrides)
    if family is not None:
        overrides.update(family.overrides())
    seq_len = args.seq_len or overrides.get("n_positions", preset.seq_len)
    return preset, optim, overrides, family, seq_len


def _engine_settings(args, base_cfg: Optional[dict], cpu: bool):
    """ZeRO stage, precision and offload: the DeepSpeed config's own choices when there is one,
    else the flags (``--precision auto``: fp32 on CPU, bf16 on GPU)."""
    precision = args.precision if args.precision != "auto" else ("fp32" if cpu else "bf16")
    if base_cfg is not None:
        from merit_ds.integrations.deepspeed import misspelled_keys

        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            value = base_cfg.get(key)
            if value is not None and value != "auto" and (isinstance(value, bool) or not isinstance(value, int)):
                raise UsageError(f'{args.ds_config or "the DeepSpeed config"}: {key} must be a whole number of sequences '
                                 f'or "auto", got {value!r} ({type(value).__name__}); write "{key}": '
                                 f'{value if not isinstance(value, str) else value.strip(chr(34))} without quotes')
        typos = misspelled_keys(base_cfg)
        if typos:  # DeepSpeed would run without the section, silently
            raise UsageError(f"{args.ds_config or 'the DeepSpeed config'}: " + "; ".join(
                f'"{key}" is not a DeepSpeed key (did you mean "{near}"?)' for key, near in typos))
        zero_stage = int(base_cfg.get("zero_optimization", {}).get("stage", 0))
        precision = "bf16" if base_cfg.get("bf16", {}).get("enabled") else "fp32"
        offload = ds_offloads_optimizer(base_cfg)
    else:
        zero_stage, offload = args.zero_stage, bool(args.offload)
    return zero_stage, precision, offload


def _json_optimizer_section(base_cfg: Optional[dict], optimizer: str, where: str) -> Optional[dict]:
    """The DeepSpeed config's ``"optimizer"`` section (None without one); it must name the
    optimizer ``--optimizer`` chose."""
    section = None
    if base_cfg is not None:
        section = base_cfg.get("optimizer")
        if section is not None:
            named = json_optimizer(str(section.get("type", "")))
            if named != optimizer:
                raise UsageError(f"{where} names optimizer {section.get('type')!r} ({named}) but --optimizer is "
                                 f"{optimizer}: pass --optimizer {named}, or a config for {optimizer} "
                                 f"(\"type\": \"{registry.get(optimizer).json_name}\", or no \"optimizer\" section)")
    return section


def _batch_schedule(args, base_cfg: Optional[dict], where: str):
    """``--batch-schedule`` parsed (None without one) and its lr rule; the schedule excludes every
    other source of the global batch."""
    schedule_text = getattr(args, "batch_schedule", None)
    lr_rule = getattr(args, "batch_schedule_lr", None) or "tokens"
    schedule = None
    if lr_rule not in LR_RULES:
        raise UsageError(f"--batch-schedule-lr {lr_rule!r}: choose from {', '.join(LR_RULES)}")
    if schedule_text:
        try:
            schedule = parse_batch_schedule(schedule_text)
        except BatchScheduleError as exc:
            raise UsageError(str(exc)) from None
        if args.global_batch:
            raise UsageError(f"--global-batch {args.global_batch} and --batch-schedule {schedule_text!r} both set the "
                             f"global batch: give one (a constant batch is --batch-schedule {args.global_batch}@0)")
        if base_cfg and base_cfg.get("train_batch_size") not in (None, "auto"):
            raise UsageError(f"{where} sets train_batch_size={base_cfg['train_batch_size']!r} but --batch-schedule "
                             f"{schedule_text!r} sets the global batch per step: remove the key (or set it to "
                             f'"auto"), or drop --batch-schedule')
    elif getattr(args, "batch_schedule_lr", None):
        raise UsageError("--batch-schedule-lr applies only with --batch-schedule")
    return schedule, lr_rule


def _batch_plan(args, base_cfg: Optional[dict], world: int, seq_len: int, schedule, fit=None):
    """The batch arithmetic: global batch, micro-batch and budget -> the :class:`BatchPlan`, and
    under a batch schedule its step table. Returns ``(plan, table or None, micro_note)``."""
    global_batch = _global_batch(args, base_cfg, schedule)
    micro, micro_note = _micro_batch(args, base_cfg, world, global_batch, schedule, fit)
    tokens, steps = _budget(args)
    table = None
    if schedule is not None:
        try:
            schedule.check_divisible(micro * world, micro, world)
            table = build_step_table(schedule, seq_len, token_budget=tokens, max_steps=steps)
        except BatchScheduleError as exc:
            raise UsageError(str(exc)) from None
        # the plan describes the first phase (what the engine is built with) and the whole run's steps
        plan = plan_batch(global_batch, world, seq_len, micro_batch=micro, max_steps=table.steps)
        plan = BatchPlan(**{**plan.__dict__, "token_budget": tokens})
    else:
        plan = plan_batch(global_batch, world, seq_len, micro_batch=micro, token_budget=tokens, max_steps=steps)
    return plan, table, micro_note


def _global_batch(args, base_cfg: Optional[dict], schedule) -> int:
    """``--global-batch``, else the schedule's first batch, else the JSON's ``train_batch_size``,
    else the model's default."""
    try:
        global_batch = parse_batch(args.global_batch) if args.global_batch else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if schedule is not None:
        global_batch = schedule.first_batch
    if global_batch is None and base_cfg and isinstance(base_cfg.get("train_batch_size"), int):
        global_batch = base_cfg["train_batch_size"]
    return global_batch or DEFAULT_BATCH[args.model]


def _micro_batch(args, base_cfg: Optional[dict], world: int, global_batch: int, schedule, fit=None):
    """The micro-batch (None: the plan's largest that divides) and a note when it differs from
    the JSON's. Returns ``(micro, micro_note)``."""
    # The JSON's micro-batch (and grad-accum) were planned for one cluster shape: they are a hint,
    # not a constraint. --micro-batch wins; else the JSON's micro-batch if it divides this world's
    # per-rank batch; else the largest divisor below it (no more memory per GPU than planned).
    # Either way the JSON's micro/accum keys give way to the plan (printed at start-up).
    micro, micro_note = args.micro_batch, ""
    json_micro = base_cfg.get("train_micro_batch_size_per_gpu") if base_cfg else None
    per_rank = global_batch // world if world > 0 and global_batch % world == 0 else None
    if schedule is not None:
        # one micro-batch for the whole run: it must divide every per-rank batch the schedule takes
        common = schedule.quantum
        per_rank = common // world if world > 0 and common % world == 0 else None
        if per_rank is None:
            raise UsageError(f"batch schedule {schedule.spec!r}: the batches it takes have no common multiple of "
                             f"the world size {world} (their gcd is {common}): every step's batch must split evenly "
                             f"over the ranks; use sizes that are multiples of {world}")
        if micro is None and json_micro is None:
            micro = per_rank
    if micro is not None and isinstance(json_micro, int) and json_micro != micro:
        micro_note = f"micro-batch {micro} from --micro-batch (the config says {json_micro})"
    if micro is None and isinstance(json_micro, int):
        micro = json_micro
        if per_rank is not None and per_rank % json_micro:
            micro = max(d for d in range(1, min(json_micro, per_rank) + 1) if per_rank % d == 0)
            micro_note = (f"micro-batch re-planned for {world} ranks: the config's {json_micro} does not divide "
                          f"{per_rank} sequences per rank; using {micro} x grad_accum {per_rank // micro}")
    if micro is None and fit is not None and per_rank is not None:
        micro, planned = fit(per_rank)
        if micro is None:
            raise UsageError(f"no micro-batch of the {per_rank} sequences per GPU fits this GPU by the memory plan "
                             f"(micro-batch 1 needs {planned / 2**30:.1f} GiB; merit-ds plan shows the terms): use a "
                             f"higher ZeRO stage, --activation-checkpointing, or more GPUs")
        micro_note = (f"micro-batch {micro} x grad_accum {per_rank // micro}: the largest the memory plan fits on this "
                      f"GPU ({planned / 2**30:.1f} GiB planned; --micro-batch overrides)")
    return micro, micro_note


def lean_loss_wanted(choice: str, cpu: bool) -> str:
    """``--loss``: ``lean`` (chunked output projection + cross-entropy, :mod:`.lean_loss`), ``plain``,
    or ``auto``: lean on CUDA, where the full-vocabulary fp32 logits cost gigabytes; plain on the
    CPU, whose runs (the demo, the studies, the tests' references) keep their exact numbers."""
    if choice not in ("auto", "lean", "plain"):
        raise UsageError(f"--loss must be auto, lean or plain, got {choice!r}")
    return choice if choice != "auto" else ("plain" if cpu else "lean")


def _budget(args):
    """``(tokens, steps)``: the token budget or the step count (GPT-2 default: 48e9 tokens; tiny: 200 steps)."""
    if args.tokens is None and args.steps is None:
        tokens, steps = (TOKEN_BUDGET, None) if args.model != "tiny" else (None, 200)
    else:
        tokens, steps = (int(args.tokens) if args.tokens is not None else None), args.steps
    return tokens, steps


def _peak_lr(args, json_params: dict, optim: OptimPreset, plan: BatchPlan, table, optimizer: str, where: str):
    """The peak lr and where it came from: ``--lr``, else the JSON's, else the optimizer's preset
    scaled to the (first) batch by its exponent (:func:`.presets.scaled_lr`)."""
    if args.lr is not None:
        lr, lr_origin = float(args.lr), "--lr"
    elif json_params.get("lr") is not None:
        lr_origin = f"from {where}"
        try:  # a number, or a string Python reads as one; "auto" (an HF template's) and true are not
            if isinstance(json_params["lr"], bool):
                raise TypeError("a boolean")
            lr = float(json_params["lr"])
        except (TypeError, ValueError):
            raise UsageError(f'{where}: "optimizer": {{"params": {{"lr": {json.dumps(json_params["lr"])}}}}} is not a '
                             "number; give the peak lr there or with --lr (the loop fills no \"auto\" values)") from None
    else:
        lr = scaled_lr(optim, plan.global_batch)
        scaled = ("" if plan.global_batch == optim.batch_ref else
                  f"; at batch {plan.global_batch}: {lr_rule_note(optim)} ({optim.lr_exponent_source})")
        if table is not None:
            scaled += " (the schedule's first batch)"
        lr_origin = f"preset {args.model}/{optimizer}: {optim.lr_ref:g} at batch {optim.batch_ref}, {optim.lr_source}{scaled}"
    if not math.isfinite(lr) or lr < 0:
        raise UsageError(f"peak lr {lr!r} ({lr_origin}) must be a finite number >= 0")
    return lr, lr_origin


def _optimizer_params(optim: OptimPreset, json_params: dict, lr: float) -> dict:
    """The hyperparameters the optimizer is built with: the JSON's, the preset's for keys it
    leaves out (what the banner prints is what steps), the peak lr."""
    return {"betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            **json_params, "lr": lr}


def _ds_config(base_cfg: Optional[dict], zero_stage: int, precision: str, offload: bool, optim: OptimPreset,
               optimizer: str, plan: BatchPlan, *, cpu: bool, where: str) -> dict:
    """The config DeepSpeed gets, before the optimizer is placed in it: the JSON (its
    micro-batch/grad-accum keys give way to the plan) or one built from the flags, with the plan's
    batch sizes. An fp16 config DeepSpeed's CPU accelerator would refuse stops here."""
    if base_cfg is not None:
        base_cfg = {k: v for k, v in base_cfg.items()
                    if k not in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")}
    cfg = base_cfg if base_cfg is not None else make_ds_config(zero_stage, precision, offload=offload, optim=optim,
                                                               optimizer=optimizer)
    cfg = set_batch(cfg, plan.global_batch, plan.micro_batch, plan.grad_accum)
    if cpu and (cfg.get("fp16") or {}).get("enabled") in (True, "true", "True") and not cpu_supports_fp16():
        # DeepSpeed's engine raises a bare "Type fp16 is not supported on your device" here
        # (engine.py: fp16_enabled() and not is_fp16_supported()); say it before the engine is built.
        raise UsageError(f"{where} enables fp16, which DeepSpeed's CPU accelerator refuses on this CPU (no oneDNN "
                         'fp16 kernels): use "bf16": {"enabled": true} (or fp32: no fp16/bf16 section)')
    return cfg


def _hand_optimizer_to_deepspeed(cfg: dict, optimizer: str, opt_params: dict, label: str, *, cpu: bool,
                                 offload: bool, where: str):
    """How the optimizer reaches DeepSpeed (see the module docstring): named in the config, or a
    client optimizer the loop builds (``client``); the config checked for what DeepSpeed demands
    before stepping an optimizer it did not write. Returns ``(cfg, client)``; may add
    ``torch_adam`` to ``opt_params``."""
    spec = registry.get(optimizer)
    if spec.ds_route == "json":
        client = "optimizer" not in cfg
        if not client:
            cfg = dict(cfg, optimizer={"type": spec.json_name, "params": opt_params})
    elif spec.ds_route == "client":
        client = True
        cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
    else:  # DeepSpeed's own (AdamW); cpu_json_params: on CPU without offload its FusedAdam would be a JIT build
        client = False
        if cpu and not offload:
            for key, value in spec.cpu_json_params.items():
                opt_params.setdefault(key, value)
        cfg = dict(cfg, optimizer={"type": spec.json_name, "params": opt_params})
    if client:
        unknown = sorted(set(opt_params) - set(spec.client_kwargs))
        if unknown:
            raise UsageError(f"{where}: optimizer.params {unknown} are not arguments of {label} "
                             f"(accepted: {', '.join(spec.client_kwargs)})")
    if client:  # the values, by the optimizer's own rules (a JSON-named one: check_config below)
        from merit_ds.integrations.deepspeed import optimizer_value_error

        error = optimizer_value_error(spec.cls, opt_params)
        if error:
            raise UsageError(f"{where}: {label}'s hyperparameters: {error}")
    if spec.ds_route != "deepspeed":  # the keys DeepSpeed demands before stepping an optimizer it did not write
        from merit_ds.integrations.deepspeed import MeritConfigError, check_config

        try:
            check_config(cfg, client_optimizer=spec.cls if client else False)
        except MeritConfigError as exc:
            raise UsageError(f"DeepSpeed config: {exc}") from None
    return cfg, client


def _lr_schedule(args, plan: BatchPlan, table, optim: OptimPreset):
    """``(warmup, floor)`` of the warmup-cosine schedule: ``--warmup-steps`` (default a share of
    the steps; under a batch schedule, the same share of the tokens) and ``--min-lr-ratio``."""
    if args.warmup_steps is not None or table is None:
        warmup = args.warmup_steps if args.warmup_steps is not None else warmup_steps(plan.steps, optim.warmup_fraction)
    else:
        warmup = warmup_steps_by_tokens(table, optim.warmup_fraction)  # a share of the tokens, not of the steps
    floor = args.min_lr_ratio if args.min_lr_ratio is not None else optim.min_lr_ratio
    return warmup, floor


def _family(args, overrides: dict):
    """The shape ``--family F --params N`` asks for (:mod:`.families`), or None."""
    name, params = getattr(args, "family", None), getattr(args, "params", None)
    if name is None and params is None:
        return None
    if name is None or params is None:
        raise UsageError("--family and --params go together (e.g. --family wide --params 2e5)")
    clash = sorted(k for k in ("n_layer", "n_embd", "n_head") if k in overrides)
    if clash:
        raise UsageError(f"--family sets the shape; drop --model-override {', '.join(clash)}")
    from .families import FamilyError, solve_shape

    try:
        return solve_shape(name, params, head_dim=getattr(args, "head_dim", 64))
    except FamilyError as exc:
        raise UsageError(str(exc)) from None
