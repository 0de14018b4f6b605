"""One cell of the study: one training run, in this process, through the training layer's public
parts (:func:`merit_ds.train.loop.configure`, ``make_loaders``, ``build_engine``,
:class:`merit_ds.train.trainer.Trainer`): the very code ``python -m merit_ds.train`` runs, without a
launcher start-up per cell. The process group is started once (:class:`merit_ds.train.launcher.Runner`)
and reused by every cell; each cell builds its own model, optimizer and DeepSpeed engine.

What a cell records comes from the loop's own metrics: the final validation loss and its standard
error over blocks (``Trainer.evaluate``), the validation curve (every ``eval_every`` steps, at the
same token counts for every batch size), the max attention logit and the gradient noise scale (the
diagnostics steps of ``Trainer.train_step``), and the training loss of step 1 (the same for every
optimizer and lr of a seed and batch: the pairing, tested).

Two validation sets when ``settings["curve_eval_sequences"]`` is set (the default study): the curve
is measured on the first ``curve_eval_sequences`` blocks of the val split (cheap, 21 times per cell)
and the final loss once on all ``eval_sequences`` blocks (sized for a standard error <= 0.01 nats);
otherwise the final loss is the curve's last point, on the one set.

Pairing: a cell's seed is the loop's ``--seed``, which fixes the initial weights
(``torch.manual_seed`` right before the model is built) and the global order of training blocks
(``numpy.random.default_rng([seed, epoch])``); neither depends on the optimizer, lr or batch, so the
cells of one seed start from the same weights and read the same sequences in the same order (a
larger batch groups more of them per step).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CellSpec", "cell_args", "run_cell", "DivergedError"]


class DivergedError(FloatingPointError):
    pass


@dataclass(frozen=True)
class CellSpec:
    """Everything a cell's training run depends on (the study-wide part is in ``settings``)."""

    optimizer: str
    batch: int          # constant cells: the batch; schedule cells: the schedule's last batch
    lr: float
    seed: int
    family: str = ""  # a --family shape at the study's --params ("" = the study's model as it is)
    schedule: str = "const"  # or a --batch-schedule in canonical form

    @property
    def key(self) -> str:
        family = f"{self.family}_" if self.family else ""
        if self.schedule == "const":
            return f"{family}{self.optimizer}_b{self.batch}_lr{self.lr:.3g}_s{self.seed}"
        return f"{family}{self.optimizer}_{schedule_slug(self.schedule)}_lr{self.lr:.3g}_s{self.seed}"


def schedule_slug(spec: str) -> str:
    """A directory-name form of a canonical schedule, one-to-one: 16@0,ramp:16..64@0..100000 ->
    sched-16at0_ramp16-64at0-100000."""
    return "sched-" + spec.replace("ramp:", "ramp").replace("..", "-").replace("@", "at").replace(",", "_")


def _cadence(steps: int, points: int) -> int:
    return max(1, steps // points)


def cell_args(cell: CellSpec, s: dict, out: Path) -> list[str]:
    """The ``python -m merit_ds.train`` arguments of this cell (what its log records, too)."""
    if cell.schedule == "const":
        batch, micro = ["--global-batch", str(cell.batch)], min(cell.batch, int(s["micro_batch"]))
    else:  # one micro-batch for every phase: the largest divisor of their gcd within the study's micro-batch
        from merit_ds.train.batch_schedule import parse_batch_schedule

        common = parse_batch_schedule(cell.schedule).quantum
        batch = ["--batch-schedule", cell.schedule]
        micro = max(d for d in range(1, min(common, int(s["micro_batch"])) + 1) if common % d == 0)
    args = ["--model", s["model"], "--data", str(s["data"]), "--out", str(out),
            "--optimizer", cell.optimizer, *batch, "--lr", repr(cell.lr),
            "--seed", str(cell.seed), "--tokens", str(int(s["tokens"])),
            "--micro-batch", str(micro),
            "--eval-sequences", str(s["eval_sequences"]), "--tracker", "none", "--resume", "never",
            "--ckpt-every", "0", "--no-plot", "--no-export", "--no-progress",
            "--zero-stage", str(s["zero_stage"]), "--precision", s["precision"]]
    if s.get("seq_len"):
        args += ["--seq-len", str(s["seq_len"])]
    for kv in s.get("model_overrides", []):
        args += ["--model-override", kv]
    if cell.family:
        args += ["--family", cell.family, "--params", str(int(s["params"])), "--head-dim", str(int(s.get("head_dim") or 64))]
    args += ["--diversity-probe", str(int(s.get("diversity_probe") or 0))]
    return args


def run_cell(cell: CellSpec, s: dict, out: Path, runner, log) -> dict:
    """Train one cell; return its results row (``diverged`` set when the loss became non-finite)."""
    import torch

    from merit_ds.train import loop
    from merit_ds.train.batch_schedule import warmup_steps_by_tokens
    from merit_ds.train.presets import warmup_steps
    from merit_ds.train.trainer import Trainer

    t0 = time.perf_counter()
    args = loop.parse_args(cell_args(cell, s, out))
    # the schedule's steps depend on the batch: resolve once to learn them, then fix the warmup
    # as the same share of the token budget for every batch size
    rc = loop.configure(args, runner, "deepspeed")
    if rc.batch_table is None:
        args.warmup_steps = warmup_steps(rc.plan.steps, float(s["warmup_fraction"]))
    else:  # the same share of the tokens (not of the steps) as every constant-batch cell
        args.warmup_steps = warmup_steps_by_tokens(rc.batch_table, float(s["warmup_fraction"]))
    rc = loop.configure(args, runner, "deepspeed")
    steps = rc.plan.steps
    eval_every = _cadence(steps, int(s["eval_points"]))
    diag_every = _cadence(steps, int(s["diag_points"]))
    with contextlib.redirect_stdout(log):
        loop.print_banner(runner, rc)
        train_loader, val_loader = loop.make_loaders(args, rc, runner.rank, runner.world)
        engine, basic = loop.build_engine(args, rc, runner, rc.ds_config)
    trainer = Trainer(engine, runner, basic, rc.optimizer, train_loader, val_loader, steps=steps,
                      warmup=rc.warmup, floor=rc.floor, tokens_per_step=rc.plan.tokens_per_step,
                      zero_stage=rc.zero_stage, diversity_probe=args.diversity_probe, batch_table=rc.batch_table,
                      lr_rule=rc.lr_rule)
    metrics = out / "metrics.jsonl"
    curve, max_logit, noise, diverged = [], -math.inf, [], False
    diversity = []  # (step, delta, n * delta, extrapolated bound)
    full_val, curve_n = val_loader, int(s.get("curve_eval_sequences") or 0)
    if curve_n and curve_n < full_val.blocks:  # the curve on the first curve_n blocks, the final loss on all
        from merit_ds.train.data_source import make_val_loader

        trainer.val_loader = make_val_loader(args.data, seq_len=rc.seq_len, eval_sequences=curve_n,
                                             micro_batch=rc.plan.micro_batch, rank=runner.rank, world=runner.world)
    step1_loss, last_eval = math.nan, {}
    first = trainer.evaluate()
    curve.append((0, first["val_loss"]))
    engine.train()
    with open(metrics, "w") as mf:
        for step in range(1, steps + 1):
            record = trainer.train_step(diagnostics=step % diag_every == 0 or step == 1)
            if step == 1:
                step1_loss = record["loss"]
            if step % eval_every == 0 or step == steps:
                if math.isfinite(record["loss"]):
                    last_eval = trainer.evaluate()
                    record.update(last_eval)
                    curve.append((step, record["val_loss"]))
            mf.write(json.dumps(record) + "\n")
            mf.flush()
            if record.get("max_attn_logit") is not None and math.isfinite(record["max_attn_logit"]):
                max_logit = max(max_logit, record["max_attn_logit"])
            if record.get("gns_b_noise") is not None and math.isfinite(record["gns_b_noise"]):
                noise.append((step, record["gns_b_noise"]))
            if record.get("gdiv_delta") is not None:
                diversity.append((step, record["gdiv_delta"], record["gdiv_bound"], record["gdiv_bound_data"]))
            if not math.isfinite(record["loss"]):
                diverged = True
                print(f"step {step}: training loss {record['loss']}: diverged, cell stopped", file=log, flush=True)
                break
            if step % eval_every == 0 or step == steps:
                print(f"step {step}/{steps} loss {record['loss']:.4f} val {record.get('val_loss', math.nan):.4f} "
                      f"lr {record['lr']:.3g} max_attn_logit {max_logit:.1f}", file=log, flush=True)
        final, final_se, val_blocks = math.inf, math.nan, full_val.blocks
        if not diverged and trainer.val_loader is not full_val:
            trainer.val_loader = full_val
            last = trainer.evaluate()
            final, final_se = last["val_loss"], last.get("val_loss_se", math.nan)
            mf.write(json.dumps({"step": steps, "final_val_loss": final, "final_val_loss_se": final_se,
                                 "val_blocks": last["val_blocks"]}) + "\n")
        elif not diverged:
            final, final_se = curve[-1][1], last_eval.get("val_loss_se", math.nan)
    curve_blocks = curve_n if curve_n and curve_n < full_val.blocks else full_val.blocks
    # the noise scale: the EMA's value over the second half of training (early steps are transients)
    late = [b for st, b in noise if st > steps // 2] or [b for _, b in noise]
    late_div = [d for d in diversity if d[0] > steps // 2] or diversity

    def median(values):  # NaN-free median (the extrapolated bound is NaN when the probe cannot resolve G)
        values = sorted(v for v in values if math.isfinite(v))
        return float(values[len(values) // 2]) if values else math.nan
    row = {"optimizer": cell.optimizer, "batch": cell.batch, "schedule": cell.schedule, "lr": cell.lr, "seed": cell.seed,
           "tokens": int(s["tokens"]), "tokens_trained": rc.total_tokens, "steps": steps,
           "seq_len": rc.seq_len, "warmup": rc.warmup, "final_val_loss": final, "final_val_se": final_se,
           "val_blocks": val_blocks, "curve_blocks": curve_blocks, "step1_loss": step1_loss,
           "n_params": sum(p.numel() for p in engine.module.parameters()),
           "max_attn_logit": max_logit if math.isfinite(max_logit) else math.nan,
           "gns_b_noise": float(sorted(late)[len(late) // 2]) if late else math.nan,
           "diverged": int(diverged), "wall_s": round(time.perf_counter() - t0, 2),
           "family": cell.family, "n_layer": engine.module.config.n_layer, "n_embd": engine.module.config.n_embd,
           "gdiv_delta": median(d[1] for d in late_div), "gdiv_bound": median(d[2] for d in late_div),
           "gdiv_bound_data": median(d[3] for d in late_div),
           "val_curve": ";".join(f"{st}:{v:.7g}" for st, v in curve)}
    getattr(train_loader, "close", lambda: None)()  # the prefetching loader's worker thread
    del trainer, engine, basic, train_loader, val_loader
    gc.collect()
    torch.manual_seed(0)
    return row
