"""Run a grid: resumable, one directory and one log per cell, ``results.csv`` rewritten after each.

``OUT/study.json``   what every cell shares (token budget, model, data, sequence length, ...): a
                     re-run with another budget or setting into the same OUT is refused, so a
                     table never mixes cells of different budgets
``OUT/cells/KEY/``   ``cell.log``, ``metrics.jsonl`` (the loop's records) and, once finished,
                     ``row.json``; a directory without ``row.json`` is an interrupted cell: redone
``OUT/results.csv``  one row per finished cell (:data:`COLUMNS`)

``shard=(i, n)``: this process runs cells ``i, i+n, ...`` (a SLURM array task, or one worker per
GPU); finished cells are skipped whoever ran them, and any worker can rewrite ``results.csv``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from .cell import CellSpec, run_cell
from .grid import Grid, GridError

__all__ = ["COLUMNS", "run_grid", "collect_results", "write_results", "study_identity"]

COLUMNS = ["optimizer", "batch", "schedule", "lr", "seed", "tokens", "tokens_trained", "steps", "seq_len", "warmup",
           "final_val_loss", "max_attn_logit", "gns_b_noise", "diverged", "wall_s", "val_curve",
           "family", "n_layer", "n_embd", "gdiv_delta", "gdiv_bound", "gdiv_bound_data"]


def study_identity(grid: Grid) -> dict:
    s = grid.settings
    return {"tokens": int(grid.tokens), "model": s.get("model"), "model_overrides": list(s.get("model_overrides", [])),
            "seq_len": s.get("seq_len"), "data": str(s.get("data")), "warmup_fraction": s.get("warmup_fraction"),
            "eval_sequences": s.get("eval_sequences"), "micro_batch": s.get("micro_batch"),
            "zero_stage": s.get("zero_stage"), "precision": s.get("precision"),
            **{k: s[k] for k in ("params", "head_dim", "diversity_probe", "lr_ref_batch") if s.get(k)}}


def _check_identity(out: Path, grid: Grid) -> None:
    path = out / "study.json"
    mine = study_identity(grid)
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs.get("tokens") != mine["tokens"]:
            raise GridError(f"{out} holds a study at a budget of {theirs.get('tokens'):,} tokens; this grid's is "
                            f"{mine['tokens']:,}: cells of different budgets are never mixed (use another --out)")
        diff = sorted(k for k in mine if theirs.get(k) != mine[k])
        if diff:
            raise GridError(f"{out} holds a study with other settings ({', '.join(f'{k}: {theirs.get(k)!r} != {mine[k]!r}' for k in diff)}); "
                            f"use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(mine, indent=1))
        os.replace(tmp, path)


def collect_results(out: Path) -> list[dict]:
    """Rows of every finished cell in ``out`` (sorted), all at the study's budget."""
    out = Path(out)
    budget = json.loads((out / "study.json").read_text())["tokens"] if (out / "study.json").exists() else None
    rows = []
    for f in sorted((out / "cells").glob("*/row.json")):
        row = json.loads(f.read_text())
        if budget is not None and int(row["tokens"]) != budget:
            raise GridError(f"{f} was trained at {row['tokens']} tokens, the study at {budget}: refusing to mix budgets")
        rows.append(row)
    for r in rows:  # rows written before the schedules axis existed are constant-batch cells
        r.setdefault("schedule", "const")
    rows.sort(key=lambda r: (r.get("family", ""), r["optimizer"], r["schedule"] != "const", r["schedule"], r["batch"],
                             r["lr"], r["seed"]))
    return rows


def write_results(out: Path, rows: list[dict]) -> Path:
    path = Path(out) / "results.csv"
    tmp = path.with_name(f".results.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)
    return path


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="cell", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def run_grid(grid: Grid, out: Path, *, shard: tuple[int, int] = (0, 1), time_limit: float | None = None,
             progress: bool = True, cell_fn=None, runner=None) -> dict:
    """Run this shard's unfinished cells. ``cell_fn(cell, settings, cell_dir, runner, log) -> row``
    (default :func:`.cell.run_cell`; tests pass a stand-in). Returns counts."""
    out = Path(out)
    grid.check()
    _check_identity(out, grid)
    cells = grid.cells()
    index, count = shard
    mine = [c for i, c in enumerate(cells) if i % count == index]
    done = {c.key for c in cells if (out / "cells" / c.key / "row.json").exists()}
    todo = [c for c in mine if c.key not in done]
    counts = {"cells": len(cells), "shard": len(mine), "skipped": len(mine) - len(todo), "run": 0, "redone": 0,
              "failed": 0, "stopped": 0}
    if todo and cell_fn is None:
        cell_fn = run_cell
        if runner is None:
            from merit_ds.train.launcher import Runner

            runner = Runner("deepspeed")  # one process group for every cell
    bar = _progress(len(cells), len(done), progress)
    t_start = time.monotonic()
    for n, cell in enumerate(todo):
        elapsed = time.monotonic() - t_start
        if time_limit is not None and n and elapsed + elapsed / n > time_limit:
            counts["stopped"] = len(todo) - n
            print(f"merit_ds.study: time limit: {counts['stopped']} cells left for a re-run", file=sys.stderr)
            break
        cdir = out / "cells" / cell.key
        if cdir.exists():  # no row.json: an interrupted cell, redone from scratch
            shutil.rmtree(cdir)
            counts["redone"] += 1
        cdir.mkdir(parents=True)
        bar.set_description(cell.key)
        with open(cdir / "cell.log", "w") as log:
            print(f"cell {cell.key}: {json.dumps(study_identity(grid))}", file=log, flush=True)
            try:
                row = cell_fn(cell, dict(grid.settings, tokens=int(grid.tokens)), cdir, runner, log)
            except Exception:  # noqa: BLE001 - one broken cell must not end the study; it stays unfinished
                traceback.print_exc(file=log)
                counts["failed"] += 1
                print(f"merit_ds.study: cell {cell.key} failed (see {cdir / 'cell.log'}); a re-run retries it",
                      file=sys.stderr)
                bar.update(1)
                continue
            print(f"finished: {json.dumps(row)}", file=log, flush=True)
        tmp = cdir / "row.json.tmp"
        tmp.write_text(json.dumps(row))
        os.replace(tmp, cdir / "row.json")
        counts["run"] += 1
        write_results(out, collect_results(out))
        bar.update(1)
    bar.close()
    write_results(out, collect_results(out))
    return counts
