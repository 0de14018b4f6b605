"""``python -m merit_ds.study`` / ``merit-ds study``: the large-batch study.

With no grid flags: the default CPU study (built-in KJV corpus, 3 optimizers x batches 8/32/128 x
5 lrs (MERIT, LAMB) or 6 (AdamW) x 2 seeds = 96 cells at 262,144 tokens each, GPT-2 2x64 over a
2,048-id vocabulary, sequences of 64; 84 of them took 29.6 min on 2 cores). ``--preset gpt2-small|gpt2-medium``: the GPU version (batches 480..6k, 48e9 tokens /
``--budget-divisor``). Re-running the same command continues a study (finished cells skipped,
interrupted ones redone). ``--report-only`` redraws the table, plots and report.
``--preset width-depth``: model families (wide 1x128, base 4x64, deep 7x48 at 200k non-embedding
parameters) x MERIT/AdamW x batches 8-64, steps to target and gradient diversity per family (24 cells,
~20 min on 2 shared cores); ``--families``/``--params`` make families an axis of any grid.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from merit_ds.optim import registry

from .grid import CONST, DEFAULT_STUDY, GPU_STUDY, WIDTH_DEPTH_STUDY, Grid, GridError, parse_list, parse_lrs, parse_schedules

__all__ = ["main", "build_parser", "grid_from_args"]


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m merit_ds.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="study directory (results.csv, plots, report.md, cells/)")
    p.add_argument("--preset", choices=["cpu", "width-depth", "gpt2-small", "gpt2-medium"], default="cpu",
                   help="cpu: the default CPU study; width-depth: model families at a fixed parameter count (CPU); "
                        "gpt2-*: the GPU-cluster study at the paper's batch sizes")
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
    p.add_argument("--lrs", default=None, help='peak lrs for all, or per optimizer: "merit=1e-2,3e-2;adamw=1e-3,3e-3"')
    p.add_argument("--seeds", default=None, help="e.g. 0,1")
    p.add_argument("--schedules", default=None,
                   help="batch-size schedules as a grid axis, separated by ';': 'const' (the constant batches of "
                        "--batch-sizes) and --batch-schedule specs, e.g. \"const;16@0,64@100000;ramp:16..64@0..100000\" "
                        "(default: const); every cell at the same token budget")
    p.add_argument("--tokens", type=float, default=None, help="token budget of every cell")
    p.add_argument("--budget-divisor", type=float, default=100.0, help="gpt2-* presets: tokens = 48e9 / this")
    p.add_argument("--model", default=None, help="model preset (tiny | gpt2-small | gpt2-medium)")
    p.add_argument("--model-override", action="append", default=None, metavar="KEY=VALUE")
    p.add_argument("--data", default=None, help="prepared data directory (default: the built-in KJV corpus, prepared into OUT/data)")
    p.add_argument("--vocab", type=int, default=None,
                   help="restrict the vocabulary to the VOCAB-1 most frequent ids of the data + one 'other' id (0: off)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None, help="largest micro-batch (default: study preset's)")
    p.add_argument("--eval-sequences", type=int, default=None)
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
    base = GPU_STUDY if gpu else (WIDTH_DEPTH_STUDY if args.preset == "width-depth" else DEFAULT_STUDY)
    optimizers = parse_list(args.optimizers, str, "optimizer") if args.optimizers else list(base["optimizers"])
    batches = [int(b) for b in parse_list(args.batch_sizes, int, "batch size")] if args.batch_sizes else list(base["batches"])
    if args.lrs is not None:
        lrs = parse_lrs(args.lrs, optimizers)
    else:
        # the preset's grid, else the optimizer's own registered grid for this kind of study
        kind = "gpu" if gpu else "cpu"
        own = {o: list(spec.study_lrs[kind]) for o in optimizers
               if (spec := registry.find(o)) is not None and kind in spec.study_lrs}
        missing = [o for o in optimizers if o not in base["lrs"] and o not in own]
        if missing:
            raise GridError(f"no default lr grid for {missing}: give --lrs")
        lrs = {o: list(base["lrs"][o]) if o in base["lrs"] else own[o] for o in optimizers}
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
                "zero_stage": args.zero_stage if args.zero_stage is not None else base["zero_stage"],
                "precision": args.precision, "warmup_fraction": args.warmup_fraction,
                "eval_points": 20, "diag_points": 20,
                "params": args.params if args.params is not None else base.get("params"),
                "head_dim": args.head_dim or base.get("head_dim"),
                "diversity_probe": args.diversity_probe if args.diversity_probe is not None else base.get("diversity_probe", 0),
                "lr_ref_batch": args.lr_ref_batch or (None if args.lrs else base.get("lr_ref_batch"))}
    families = parse_list(args.families, str, "family") if args.families else list(base.get("families", []))
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data" / "kjv"
    if vocab:
        settings["model_overrides"] = [o for o in overrides if not o.startswith("vocab_size=")] + [f"vocab_size={vocab}"]
        settings["data"] = str(out / "data" / f"vocab{vocab}" / "prepared")
    else:
        settings["data"] = str(data)
    if settings["seq_len"] is None:
        from merit_ds.train.presets import get_model_preset

        settings["seq_len"] = get_model_preset(model).seq_len
    schedules = parse_schedules(args.schedules) if args.schedules else [CONST]
    grid = Grid(optimizers, batches, lrs, seeds, tokens, settings, families, schedules)
    grid.check()  # every flag checked before anything is written under --out
    if prepare_data:
        from .data import prepare_kjv, restricted_vocab

        if not args.data:
            prepare_kjv(data)
        if vocab:
            grid.settings["vocab_info"] = restricted_vocab(data, out / "data" / f"vocab{vocab}", vocab)
    return grid


def _scale(grid: Grid) -> str:
    s = grid.settings
    info = s.get("vocab_info") or {}
    vocab = (f", vocabulary {info['vocab_size']} ids ({info['vocab_size'] - 1} most frequent of the corpus's "
             f"{info['distinct']} + 'other'; {100 * info['coverage']:.1f}% of tokens kept)") if info else ""
    fam = f", families {', '.join(grid.families)} at {int(s['params']):,} non-embedding parameters (head dim {s.get('head_dim') or 64})" if grid.families else ""
    return (f"model {s['model']} {' '.join(s['model_overrides'])}{fam}, sequences of {s['seq_len']}{vocab}, "
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
                              progress=not args.no_progress)
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
