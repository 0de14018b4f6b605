"""Run a grid: resumable, one directory and one log per cell, ``results.csv`` rewritten after each.

``OUT/study.json``   what every cell shares (token budget, model, data, sequence length, ...): a
                     re-run with another budget or setting into the same OUT is refused, so a
                     table never mixes cells of different budgets
``OUT/cells/KEY/``   ``cell.log``, ``metrics.jsonl`` (the loop's records) and, once finished,
                     ``row.json``; a directory without ``row.json`` is an interrupted cell: redone
``OUT/results.csv``  one row per finished cell (:data:`COLUMNS`), each with the code version that
                     produced it (``code_version``: :func:`merit_ds.study.version.code_version`'s
                     key; ``code_commit``: the git commit, ``+dirty`` when the package differed from it)

Reproducibility: a resumed study **refuses** finished cells that another code version produced
(one message: how many, an example with both versions, the fix), and with ``rerun_stale``
(``--rerun-stale``) redoes them from scratch instead; cells from before versions were recorded
count as another version. So every row of one study's ``results.csv`` comes from one code version,
unless a report-only run collects rows someone copied in (the report then warns).

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
from .version import code_version

__all__ = ["COLUMNS", "run_grid", "collect_results", "write_results", "study_identity", "stale_cells"]

COLUMNS = ["optimizer", "batch", "schedule", "lr", "seed", "tokens", "tokens_trained", "steps", "seq_len", "warmup",
           "final_val_loss", "max_attn_logit", "gns_b_noise", "diverged", "wall_s", "val_curve",
           "family", "n_layer", "n_embd", "gdiv_delta", "gdiv_bound", "gdiv_bound_data",
           "final_val_se", "val_blocks", "curve_blocks", "step1_loss", "n_params", "code_version", "code_commit"]


def study_identity(grid: Grid) -> dict:
    s = grid.settings
    return {"tokens": int(grid.tokens), "model": s.get("model"), "model_overrides": list(s.get("model_overrides", [])),
            "seq_len": s.get("seq_len"), "data": str(s.get("data")), "warmup_fraction": s.get("warmup_fraction"),
            "eval_sequences": s.get("eval_sequences"), "micro_batch": s.get("micro_batch"),
            "zero_stage": s.get("zero_stage"), "precision": s.get("precision"),
            **{k: s[k] for k in ("params", "head_dim", "diversity_probe", "lr_ref_batch", "curve_eval_sequences",
                                 "val_fraction") if s.get(k)}}


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


def _version_fields(version: dict) -> dict:
    commit = version.get("commit")
    return {"code_version": version["key"],
            "code_commit": (commit[:12] if commit else "no-git") + ("+dirty" if version.get("dirty") else "")}


def stale_cells(out: Path, cells: list[CellSpec], version: dict) -> list[tuple[CellSpec, dict]]:
    """Finished cells of ``cells`` in ``out`` whose row was produced by another code version than
    ``version`` (rows without one included): ``[(cell, row)]``."""
    stale = []
    for c in cells:
        f = Path(out) / "cells" / c.key / "row.json"
        if f.exists():
            row = json.loads(f.read_text())
            if row.get("code_version") != version["key"]:
                stale.append((c, row))
    return stale


def _stale_message(out: Path, stale: list, version: dict) -> str:
    cell, row = stale[0]
    theirs = (f"code {row['code_version']} (commit {row.get('code_commit') or 'unknown'})" if row.get("code_version")
              else "no code version recorded (a study from before versions were recorded)")
    mine = _version_fields(version)
    return (f"{out}: {len(stale)} finished cell(s) of this grid were produced by another code version than this one "
            f"(e.g. {cell.key}: {theirs}; this code: {mine['code_version']} (commit {mine['code_commit']})), so this "
            f"code may not reproduce their numbers. Fix: add --rerun-stale to rerun them from scratch, or continue "
            f"the study in a new --out")


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="cell", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def run_grid(grid: Grid, out: Path, *, shard: tuple[int, int] = (0, 1), time_limit: float | None = None,
             progress: bool = True, cell_fn=None, runner=None, rerun_stale: bool = False,
             version: dict | None = None) -> dict:
    """Run this shard's unfinished cells. ``cell_fn(cell, settings, cell_dir, runner, log) -> row``
    (default :func:`.cell.run_cell`; tests pass a stand-in). Each row gets the code version
    (``version``, default :func:`.version.code_version`). Finished cells of another version:
    :class:`GridError` (nothing run), or with ``rerun_stale`` redone. Returns counts."""
    out = Path(out)
    grid.check()
    version = version or code_version()
    cells = grid.cells()
    stale = stale_cells(out, cells, version) if (out / "cells").is_dir() else []
    if stale and not rerun_stale:
        raise GridError(_stale_message(out, stale, version))
    _check_identity(out, grid)
    index, count = shard
    mine = [c for i, c in enumerate(cells) if i % count == index]
    stale_keys = {c.key for c, _ in stale}
    done = {c.key for c in cells if (out / "cells" / c.key / "row.json").exists()} - stale_keys
    todo = [c for c in mine if c.key not in done]
    counts = {"cells": len(cells), "shard": len(mine), "skipped": len(mine) - len(todo), "run": 0, "redone": 0,
              "failed": 0, "stopped": 0}
    if stale_keys:
        counts["stale"] = sum(c.key in stale_keys for c in mine)
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
        if cdir.exists():  # no row.json: an interrupted cell (or a stale one: --rerun-stale), redone from scratch
            shutil.rmtree(cdir)
            counts["redone"] += 1
        cdir.mkdir(parents=True)
        bar.set_description(cell.key)
        with open(cdir / "cell.log", "w") as log:
            print(f"cell {cell.key}: {json.dumps(study_identity(grid))}", file=log, flush=True)
            print(f"code version: {json.dumps(version)}", file=log, flush=True)
            try:
                row = cell_fn(cell, dict(grid.settings, tokens=int(grid.tokens)), cdir, runner, log)
            except Exception:  # noqa: BLE001 - one broken cell must not end the study; it stays unfinished
                traceback.print_exc(file=log)
                counts["failed"] += 1
                print(f"merit_ds.study: cell {cell.key} failed (see {cdir / 'cell.log'}); a re-run retries it",
                      file=sys.stderr)
                bar.update(1)
                continue
            row.update(_version_fields(version))
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
