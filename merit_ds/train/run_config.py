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
* optimizer: ``--optimizer`` (default ``merit``). A JSON whose ``"optimizer"`` section names an
  optimizer must name the same one (``MERIT``, ``ShardedLAMB``, ``AdamW``: see
  :data:`merit_ds.train.ds_config.JSON_TYPES`), else :class:`UsageError`.
* peak lr: ``--lr``, else the JSON's ``optimizer.params.lr``, else the optimizer's preset for the
  model, square-root scaled from its reference batch; :attr:`RunConfig.lr_origin` says which.
* other optimizer hyperparameters: the JSON's, the preset's for keys it leaves out.

How the optimizer reaches DeepSpeed (:attr:`RunConfig.client`):

* ``merit``: named in the JSON (DeepSpeed builds ``torch.optim.MERIT`` with our param groups),
  or, for a user JSON without an ``"optimizer"`` section, a client optimizer the loop builds;
* ``lamb``: always a client :class:`merit_ds.LAMB` built by the loop from the params (the JSON
  name ``ShardedLAMB`` need not be registered); the section is removed from the config;
* ``adamw``: always DeepSpeed's own ``AdamW`` (FusedAdam on GPU, DeepSpeedCPUAdam with offload,
  ``torch.optim.AdamW`` via ``"torch_adam": true`` on a CPU run without offload).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

from merit_ds.integrations._common import ds_offloads_optimizer

from .batch import BatchPlan, plan_batch
from .batch_schedule import (LR_RULES, BatchScheduleError, StepTable, build_step_table, parse_batch_schedule,
                             warmup_steps_by_tokens)
from .ds_config import JSON_TYPES, make_ds_config, set_batch
from .presets import (OPTIMIZER_LABELS, OPTIMIZERS, TOKEN_BUDGET, ModelPreset, OptimPreset, get_model_preset,
                      get_optim_preset, parse_batch, scaled_lr, warmup_steps)

__all__ = ["UsageError", "RunConfig", "resolve", "json_optimizer", "DEFAULT_BATCH", "CLIENT_KWARGS"]

DEFAULT_BATCH = {"tiny": 16, "gpt2-small": 480, "gpt2-medium": 480}

#: Keyword arguments a client optimizer built by the loop accepts from ``optimizer.params``.
CLIENT_KWARGS = {
    "merit": ("lr", "betas", "eps", "weight_decay"),
    "lamb": ("lr", "betas", "eps", "weight_decay", "max_trust_ratio", "bias_correction", "nonfinite_grads",
             "implementation"),
}


class UsageError(ValueError):
    """Bad input: reported as one clear line, exit code 2, nothing written."""


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
        return OPTIMIZER_LABELS[self.optimizer]


def json_optimizer(type_name: str) -> str:
    """``--optimizer`` value for a DeepSpeed JSON ``"optimizer": {"type": ...}``, or UsageError."""
    for name, json_name in JSON_TYPES.items():
        if type_name == json_name or (name == "adamw" and type_name.lower() == "adamw"):
            return name
    for json_name in ("MERIT", "ShardedLAMB"):
        if type_name.lower() == json_name.lower():
            raise UsageError(f'DeepSpeed looks optimizer names up case-sensitively: write "type": "{json_name}", '
                             f'not "{type_name}"')
    if type_name.lower() == "lamb":
        raise UsageError(f"optimizer type {type_name!r}: DeepSpeed's built-in Lamb (FusedLamb) computes its trust "
                         f"ratios per ZeRO partition, not per tensor; merit_ds's exact LAMB is named \"ShardedLAMB\" "
                         f"(or leave the section out and pass --optimizer lamb)")
    if type_name.lower() == "adam":
        raise UsageError('optimizer type "Adam": the AdamW baseline is named "AdamW" (decoupled weight decay)')
    names = ", ".join(f'"{n}"' for n in JSON_TYPES.values())
    raise UsageError(f"optimizer type {type_name!r}: merit_ds.train trains {', '.join(OPTIMIZERS)} "
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


def resolve(args, *, launcher: str, world: int, cpu: bool, base_cfg: Optional[dict] = None) -> RunConfig:
    """One run configuration from the parsed arguments and the ``--ds-config`` JSON (a dict).

    ``world``: the data-parallel world size the run will have; ``cpu``: no CUDA device.
    Raises :class:`UsageError` (or :class:`~merit_ds.train.batch.BatchConfigError`) on bad input.
    """
    optimizer = getattr(args, "optimizer", "merit")
    label = OPTIMIZER_LABELS.get(optimizer, optimizer)
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
    precision = args.precision if args.precision != "auto" else ("fp32" if cpu else "bf16")
    where = args.ds_config or "the DeepSpeed config"

    # --- the DeepSpeed config's own choices -----------------------------------------------------
    section = None
    if base_cfg is not None:
        zero_stage = int(base_cfg.get("zero_optimization", {}).get("stage", 0))
        precision = "bf16" if base_cfg.get("bf16", {}).get("enabled") else "fp32"
        offload = ds_offloads_optimizer(base_cfg)
        section = base_cfg.get("optimizer")
        if section is not None:
            named = json_optimizer(str(section.get("type", "")))
            if named != optimizer:
                raise UsageError(f"{where} names optimizer {section.get('type')!r} ({named}) but --optimizer is "
                                 f"{optimizer}: pass --optimizer {named}, or a config for {optimizer} "
                                 f"(\"type\": \"{JSON_TYPES[optimizer]}\", or no \"optimizer\" section)")
    else:
        zero_stage, offload = args.zero_stage, bool(args.offload)

    # --- batch arithmetic --------------------------------------------------------------------------
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
    try:
        global_batch = parse_batch(args.global_batch) if args.global_batch else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if schedule is not None:
        global_batch = schedule.first_batch
    if global_batch is None and base_cfg and isinstance(base_cfg.get("train_batch_size"), int):
        global_batch = base_cfg["train_batch_size"]
    global_batch = global_batch or DEFAULT_BATCH[args.model]
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
    if base_cfg is not None:
        base_cfg = {k: v for k, v in base_cfg.items()
                    if k not in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")}
    if args.tokens is None and args.steps is None:
        tokens, steps = (TOKEN_BUDGET, None) if args.model != "tiny" else (None, 200)
    else:
        tokens, steps = (int(args.tokens) if args.tokens is not None else None), args.steps
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

    # --- peak lr and where it came from -------------------------------------------------------------
    json_params = dict((section or {}).get("params", {}))
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
                  f"; sqrt-scaled from batch {optim.batch_ref} to {plan.global_batch}")
        if table is not None:
            scaled += " (the schedule's first batch)"
        lr_origin = f"preset {args.model}/{optimizer}: {optim.lr_ref:g} at batch {optim.batch_ref}, {optim.lr_source}{scaled}"
    if not math.isfinite(lr) or lr < 0:
        raise UsageError(f"peak lr {lr!r} ({lr_origin}) must be a finite number >= 0")
    # keys the JSON leaves out take the preset's values (what the banner prints is what steps)
    opt_params = {"betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
                  **json_params, "lr": lr}

    # --- the config DeepSpeed gets ----------------------------------------------------------------
    cfg = base_cfg if base_cfg is not None else make_ds_config(zero_stage, precision, offload=offload, optim=optim,
                                                               optimizer=optimizer)
    cfg = set_batch(cfg, plan.global_batch, plan.micro_batch, plan.grad_accum)
    if cpu and (cfg.get("fp16") or {}).get("enabled") in (True, "true", "True") and not cpu_supports_fp16():
        # DeepSpeed's engine raises a bare "Type fp16 is not supported on your device" here
        # (engine.py: fp16_enabled() and not is_fp16_supported()); say it before the engine is built.
        raise UsageError(f"{where} enables fp16, which DeepSpeed's CPU accelerator refuses on this CPU (no oneDNN "
                         'fp16 kernels): use "bf16": {"enabled": true} (or fp32: no fp16/bf16 section)')
    if optimizer == "merit":
        client = "optimizer" not in cfg
        if not client:
            cfg = dict(cfg, optimizer={"type": JSON_TYPES["merit"], "params": opt_params})
    elif optimizer == "lamb":
        client = True
        cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
    else:  # adamw: DeepSpeed's own; on CPU without offload its FusedAdam would be a JIT build, torch's is exact
        client = False
        if cpu and not offload:
            opt_params.setdefault("torch_adam", True)
        cfg = dict(cfg, optimizer={"type": JSON_TYPES["adamw"], "params": opt_params})
    if client:
        unknown = sorted(set(opt_params) - set(CLIENT_KWARGS[optimizer]))
        if unknown:
            raise UsageError(f"{where}: optimizer.params {unknown} are not arguments of {label} "
                             f"(accepted: {', '.join(CLIENT_KWARGS[optimizer])})")
    if optimizer in ("merit", "lamb"):  # the keys DeepSpeed demands before stepping an optimizer it did not write
        from merit_ds.integrations.deepspeed import MeritConfigError, check_config
        from merit_ds.optim import LAMB, MERIT

        try:
            check_config(cfg, client_optimizer={"merit": MERIT, "lamb": LAMB}[optimizer] if client else False)
        except MeritConfigError as exc:
            raise UsageError(f"DeepSpeed config: {exc}") from None

    if args.warmup_steps is not None or table is None:
        warmup = args.warmup_steps if args.warmup_steps is not None else warmup_steps(plan.steps, optim.warmup_fraction)
    else:
        warmup = warmup_steps_by_tokens(table, optim.warmup_fraction)  # a share of the tokens, not of the steps
    floor = args.min_lr_ratio if args.min_lr_ratio is not None else optim.min_lr_ratio
    return RunConfig(launcher=launcher, model=args.model, preset=preset, overrides=overrides, seq_len=seq_len,
                     precision=precision, zero_stage=zero_stage, offload=offload, plan=plan, optimizer=optimizer,
                     optim=optim, lr=lr, lr_origin=lr_origin, opt_params=opt_params, ds_config=cfg, client=client,
                     warmup=warmup, floor=floor, ds_config_path=args.ds_config, micro_note=micro_note, family=family,
                     batch_table=table, lr_rule=lr_rule)


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
