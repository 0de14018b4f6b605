"""``python -m merit_ds.study`` / ``merit-ds study``: the large-batch study.

With no grid flags: the default CPU study (issue #24; built-in KJV corpus): MERIT, LAMB, AdamW x
batches 8 and 64 x 4 lrs per (optimizer, batch) x 3 paired seeds = 72 cells of 512,000 tokens (250
steps at batch 64, 2,000 at 8), GPT-2 2x64 over a 2,048-id vocabulary, sequences of 32, validation
on 163,840 tokens (standard error <= 0.01 nats); ~41 min on 2 cores by docs/study.md's timing (up to
~92 min when other jobs load them).
``--preset cpu-quick``: the first default study (96 cells at 262,144 tokens, 32 steps at batch 128:
step-starved, so it needs --allow-short-cells). ``--preset gpt2-small|gpt2-medium``: the GPU version
(batches 480..6k, 48e9 tokens / ``--budget-divisor``). Re-running the same command continues a study
(finished cells skipped, interrupted ones redone; cells of another code version refused unless
--rerun-stale). ``--report-only`` redraws the table, plots and report.
``--preset width-depth``: model families (wide 1x128, base 4x64, deep 7x48 at 200k non-embedding
parameters) x MERIT/AdamW x batches 8-64, steps to target and gradient diversity per family (24 cells,
409,600 tokens: 100 steps at batch 64; ~20 min on 2 shared cores);
``--families``/``--params`` make families an axis of any grid.
A grid of two or more batch sizes with any cell under 100 optimizer steps is refused (one message
naming it and the fix) unless ``--allow-short-cells``; every report warns about such cells.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from merit_ds.optim import registry

from .data import KJV_VAL_FRACTION

from .grid import (CONST, CPU_QUICK_STUDY, DEFAULT_STUDY, GPU_STUDY, MIN_STEPS, WIDTH_DEPTH_STUDY, Grid, GridError,
                   check_min_steps, parse_list, parse_lrs, parse_schedules)

__all__ = ["main", "build_parser", "grid_from_args"]


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m merit_ds.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="study directory (results.csv, plots, report.md, cells/)")
    p.add_argument("--preset", choices=["cpu", "cpu-quick", "width-depth", "gpt2-small", "gpt2-medium"], default="cpu",
                   help="cpu: the default CPU study (batches 8 and 64, 250 steps at 64); cpu-quick: the first default "
                        "(batches 8-128 at 262,144 tokens: 32 steps at 128); width-depth: model families at a fixed "
                        "parameter count (CPU); gpt2-*: the GPU-cluster study at the paper's batch sizes")
    p.add_argument("--families", default=None, help="model families as a grid axis, e.g. wide,base,deep (with --params)")
    p.add_argument("--params", type=float, default=None, help="non-embedding parameters of every family")
    p.add_argument("--head-dim", type=int, default=None, help="families' widths are multiples of it (default 64)")
    p.add_argument("--diversity-probe", type=int, default=None,
                   help="gradient diversity from this many sequences per diagnostics step (default: 8 for width-depth, else 0)")
    p.add_argument("--lr-ref-batch", type=int, default=None,
                   help="the --lrs are at this batch, square-root scaled to each batch (one lr per batch)")
    p.add_argument("--optimizers", default=None,
                   help=f"comma-separated registered optimizers (default: the preset's; known: {','.join(registry.names())})")
    p.add_argument("--batch-sizes", default=None, help="global batches (sequences), e.g. 16,128")
    p.add_argument("--lrs", default=None, help='peak lrs for all, per optimizer: "merit=1e-2,3e-2;adamw=1e-3,3e-3", '
                                                'or per optimizer and batch: "merit@8=6e-3,1.2e-2;merit@64=2.5e-2,5e-2;adamw=1e-3"')
    p.add_argument("--add-lrs", default=None,
                   help='lrs added to the grid (the preset\'s or --lrs\'s), e.g. "merit@8=3e-3;adamw=3.2e-2" (no @: every '
                        'batch): widens a grid whose optimum sat on its edge; a resumed study runs only the new cells')
    p.add_argument("--seeds", default=None, help="e.g. 0,1")
    p.add_argument("--schedules", default=None,
                   help="batch-size schedules as a grid axis, separated by ';': 'const' (the constant batches of "
                        "--batch-sizes) and --batch-schedule specs, e.g. \"const;16@0,64@100000;ramp:16..64@0..100000\" "
                        "(default: const); every cell at the same token budget")
    p.add_argument("--tokens", type=float, default=None, help="token budget of every cell")
    p.add_argument("--budget-divisor", type=float, default=48.0,
                   help="gpt2-* presets: tokens = 48e9 / this (default 48: 1e9 tokens, 159 steps at batch 6144)")
    p.add_argument("--model", default=None, help="model preset (tiny | gpt2-small | gpt2-medium)")
    p.add_argument("--model-override", action="append", default=None, metavar="KEY=VALUE")
    p.add_argument("--data", default=None, help="prepared data directory (default: the built-in KJV corpus, prepared into OUT/data)")
    p.add_argument("--vocab", type=int, default=None,
                   help="restrict the vocabulary to the VOCAB-1 most frequent ids of the data + one 'other' id (0: off)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None, help="largest micro-batch (default: study preset's)")
    p.add_argument("--eval-sequences", type=int, default=None,
                   help="validation sequences of each cell's final loss (the cpu preset: 5,120, capped at the split)")
    p.add_argument("--curve-eval-sequences", type=int, default=None,
                   help="the first N of them for the validation curve (default: the preset's; cpu: 256; others: all)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of the built-in corpus's chapters in its val split (cpu: 0.15; cpu-quick and "
                        "width-depth: 0.02)")
    p.add_argument("--allow-short-cells", action="store_true",
                   help=f"run a grid even where a cell gets fewer than {MIN_STEPS} optimizer steps (refused "
                        f"otherwise; the report then warns)")
    p.add_argument("--rerun-stale", action="store_true",
                   help="a resumed study reruns, from scratch, finished cells that another code version produced "
                        "(refused otherwise: docs/study.md, 'Reproducibility')")
    p.add_argument("--warmup-fraction", type=float, default=0.02, help="warmup as a share of the budget (every batch)")
    p.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--shard", default=None, help="I/N: run cells I, I+N, ... (default from SLURM_ARRAY_TASK_ID/COUNT)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds: start no cell that would end after it")
    p.add_argument("--report-only", action="store_true", help="only (re)write results.csv, plots and report.md")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default 1 on the cpu preset: on a shared 2-core machine two "
                        "OpenMP threads per process made a step 10-50x slower whenever another job ran; 0: leave as is)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _set_threads(n: int, argv: list[str]) -> None:
    """OMP_NUM_THREADS=n for the whole process: every OpenMP runtime (torch's, the MERIT CPU kernel's)
    reads it when it starts, which may already have happened (``import merit_ds`` imports torch), so
    the process re-executes itself once with it set (torch.set_num_threads alone did not help)."""
    if os.environ.get("OMP_NUM_THREADS") == str(n):
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "merit_ds.study", *argv])


def _shard(text) -> tuple[int, int]:
    if text is None:
        if "SLURM_ARRAY_TASK_ID" in os.environ:
            lo = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            return int(os.environ["SLURM_ARRAY_TASK_ID"]) - lo, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise GridError(f"--shard expects I/N, got {text!r}") from None
    if not 0 <= i < n:
        raise GridError(f"--shard {text}: need 0 <= I < N")
    return i, n


def grid_from_args(args, *, prepare_data: bool = True) -> Grid:
    gpu = args.preset.startswith("gpt2")
    base = GPU_STUDY if gpu else {"width-depth": WIDTH_DEPTH_STUDY, "cpu-quick": CPU_QUICK_STUDY}.get(args.preset,
                                                                                                   DEFAULT_STUDY)
    optimizers = parse_list(args.optimizers, str, "optimizer") if args.optimizers else list(base["optimizers"])
    batches = [int(b) for b in parse_list(args.batch_sizes, int, "batch size")] if args.batch_sizes else list(base["batches"])
    if args.lrs is not None:
        lrs = parse_lrs(args.lrs, optimizers, batches)
    else:
        # the preset's grid, else the optimizer's own registered grid for this kind of study
        kind = "gpu" if gpu else "cpu"
        own = {o: list(spec.study_lrs[kind]) for o in optimizers
               if (spec := registry.find(o)) is not None and kind in spec.study_lrs}
        missing = [o for o in optimizers if o not in base["lrs"] and o not in own]
        if missing:
            raise GridError(f"no default lr grid for {missing}: give --lrs")
        lrs = {o: _preset_lrs(base["lrs"][o], batches, o) if o in base["lrs"] else own[o] for o in optimizers}
    if args.add_lrs:
        lrs = add_lrs(lrs, args.add_lrs, optimizers, batches)
    seeds = [int(s) for s in parse_list(args.seeds, int, "seed")] if args.seeds else list(base["seeds"])
    if args.tokens is not None:
        tokens = int(args.tokens)
    else:
        tokens = int(base["tokens"] / args.budget_divisor) if gpu else int(base["tokens"])
    model = args.model or (args.preset if gpu else base["model"])
    overrides = list(args.model_override if args.model_override is not None else ([] if gpu else base["model_overrides"]))
    vocab = args.vocab if args.vocab is not None else (0 if gpu else base["vocab"])
    settings = {"model": model, "model_overrides": overrides, "seq_len": args.seq_len or (None if gpu else base["seq_len"]),
                "micro_batch": args.micro_batch or base["micro_batch"],
                "eval_sequences": args.eval_sequences or base["eval_sequences"],
                "curve_eval_sequences": (args.curve_eval_sequences if args.curve_eval_sequences is not None
                                         else base.get("curve_eval_sequences")),
                "val_fraction": args.val_fraction if args.val_fraction is not None else base.get("val_fraction"),
                "zero_stage": args.zero_stage if args.zero_stage is not None else base["zero_stage"],
                "precision": args.precision, "warmup_fraction": args.warmup_fraction,
                "eval_points": 20, "diag_points": 20,
                "params": args.params if args.params is not None else base.get("params"),
                "head_dim": args.head_dim or base.get("head_dim"),
                "diversity_probe": args.diversity_probe if args.diversity_probe is not None else base.get("diversity_probe", 0),
                "lr_ref_batch": args.lr_ref_batch or (None if args.lrs else base.get("lr_ref_batch"))}
    families = parse_list(args.families, str, "family") if args.families else list(base.get("families", []))
    out = Path(args.out)
    vf = settings["val_fraction"]
    if args.data or vf is None or vf == KJV_VAL_FRACTION:  # the built-in corpus's usual split: the old paths
        settings["val_fraction"] = None
        tag = ""
    else:
        if not 0 < vf < 1:
            raise GridError(f"--val-fraction must be in (0, 1), got {vf}")
        tag = f"-val{vf:g}"
    data = Path(args.data) if args.data else out / "data" / f"kjv{tag}"
    if vocab:
        settings["model_overrides"] = [o for o in overrides if not o.startswith("vocab_size=")] + [f"vocab_size={vocab}"]
        settings["data"] = str(out / "data" / f"vocab{vocab}{tag}" / "prepared")
    else:
        settings["data"] = str(data)
    if settings["seq_len"] is None:
        from merit_ds.train.presets import get_model_preset

        settings["seq_len"] = get_model_preset(model).seq_len
    schedules = parse_schedules(args.schedules) if args.schedules else [CONST]
    grid = Grid(optimizers, batches, lrs, seeds, tokens, settings, families, schedules)
    grid.check()  # every flag checked before anything is written under --out
    if prepare_data and not getattr(args, "allow_short_cells", False):
        short = check_min_steps(grid, gpu=gpu)  # refused if the grid compares batch sizes
        if short:
            print(f"merit_ds.study: warning: cell {short[0][0].key} gets {short[0][1]} optimizer steps (< {MIN_STEPS}; "
                  f"{len(short)} such cell(s)); one batch size, so it runs; its report warns", file=sys.stderr)
    if prepare_data:
        from .data import prepare_kjv, restricted_vocab

        if not args.data:
            prepare_kjv(data, val_fraction=vf if tag else KJV_VAL_FRACTION)
        if vocab:
            grid.settings["vocab_info"] = restricted_vocab(data, out / "data" / f"vocab{vocab}{tag}", vocab)
    return grid


def add_lrs(lrs: dict, text: str, optimizers: list[str], batches: list[int]) -> dict:
    """``lrs`` with the lrs of ``text`` (``"opt@B=lr,lr;opt=lr"``; no ``@B``: every batch) added
    (sorted, repeats dropped); an optimizer's one grid becomes a per-batch grid where needed."""
    out = {o: ({b: list(v) for b, v in g.items()} if isinstance(g, dict) else list(g)) for o, g in lrs.items()}
    for part in str(text).split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise GridError(f"--add-lrs {text!r}: write optimizer@batch=lr,lr or optimizer=lr,lr, separated by ';'")
        name, values = (x.strip() for x in part.split("=", 1))
        opt, _, b = name.partition("@")
        if opt not in optimizers:
            raise GridError(f"--add-lrs names {opt!r}, which is not in the grid's optimizers {','.join(optimizers)}")
        try:
            targets = [int(b)] if b else list(batches)
        except ValueError:
            raise GridError(f"--add-lrs entry {part.strip()!r}: the batch after '@' must be an integer") from None
        if any(t not in batches for t in targets):
            raise GridError(f"--add-lrs {name}: batch {b} is not in the grid's batches {','.join(map(str, batches))}")
        new = parse_list(values, float, "lr")
        if any(lr <= 0 for lr in new):
            raise GridError(f"lrs must be positive ({opt}: {new})")
        grid = out[opt]
        if not isinstance(grid, dict) and b:
            grid = out[opt] = {bb: list(grid) for bb in batches}
        if isinstance(grid, dict):
            for t in targets:
                grid[t] = sorted(set(grid.get(t, [])) | set(new))
        else:
            out[opt] = sorted(set(grid) | set(new))
    return out


def _preset_lrs(lrs, batches: list[int], optimizer: str):
    """A preset's lr grid for these batches: a list as it is; a per-batch grid at those of these
    batches it has (another batch's grid comes from --add-lrs or --lrs; :meth:`Grid.check` says so)."""
    if not isinstance(lrs, dict):
        return list(lrs)
    return {b: list(lrs[b]) for b in batches if b in lrs}


def _scale(grid: Grid) -> str:
    s = grid.settings
    info = s.get("vocab_info") or {}
    vocab = (f", vocabulary {info['vocab_size']} ids ({info['vocab_size'] - 1} most frequent of the corpus's "
             f"{info['distinct']} + 'other'; {100 * info['coverage']:.1f}% of tokens kept)") if info else ""
    fam = f", families {', '.join(grid.families)} at {int(s['params']):,} non-embedding parameters (head dim {s.get('head_dim') or 64})" if grid.families else ""
    val = (f", validation {s['eval_sequences']:,} sequences ({s['curve_eval_sequences']:,} for the curve)"
           if s.get("curve_eval_sequences") else f", validation {s['eval_sequences']:,} sequences")
    return (f"model {s['model']} {' '.join(s['model_overrides'])}{fam}, sequences of {s['seq_len']}{vocab}{val}, "
            f"ZeRO {s['zero_stage']}, world 1 per cell, warmup {s['warmup_fraction']:.0%} of the budget, "
            f"cosine to 0.1 x peak, clip 1.0, wd 0.1 (matrices)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    threads = args.threads if args.threads is not None else (0 if args.preset.startswith("gpt2") else 1)
    if threads:
        _set_threads(threads, argv)
    try:
        grid = grid_from_args(args, prepare_data=not args.report_only)
        out = Path(args.out)
        if not args.report_only:
            from .runner import run_grid

            counts = run_grid(grid, out, shard=_shard(args.shard), time_limit=args.time_limit,
                              progress=not args.no_progress, rerun_stale=args.rerun_stale)
            print(f"merit_ds.study: {counts}", file=sys.stderr)
        from .report import report_from_csv
        from .runner import collect_results, write_results

        rows = collect_results(out)
        if not rows:
            failed = 0 if args.report_only else counts["failed"]
            print("merit_ds.study: no finished cells yet" + (f"; error: {failed} cell(s) failed (their cell.log says "
                  "why); run the same command again to retry them" if failed else ""), file=sys.stderr)
            return 1 if failed else 0
        write_results(out, rows)
        wall = sum(float(r["wall_s"]) for r in rows)
        done = len(rows)
        total = len(grid.cells())
        report, plots, _ = report_from_csv(out / "results.csv", out, scale=_scale(grid),
                                           command="python -m merit_ds.study " + shlex.join(argv),
                                           wall=f"{wall / 60:.1f} min summed over {done} of {total} cells")
        print(f"merit_ds.study: {report} ({done}/{total} cells), plots: {', '.join(p.name for p in plots)}")
        failed = 0 if args.report_only else counts["failed"]
        if failed:  # the report covers the finished cells; the study itself is not done
            print(f"merit_ds.study: error: {failed} cell(s) failed (their cell.log says why); the report covers the "
                  f"{done} finished; run the same command again to retry them", file=sys.stderr)
            return 1
        return 0
    except GridError as exc:
        print(f"merit_ds.study: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
