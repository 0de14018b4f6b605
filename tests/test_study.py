"""The large-batch study (merit_ds.study): grid parsing, resume, edge-of-grid flags, the scaling
exponent against a hand computation, report + plots from a synthetic results.csv, refusal to mix
budgets, and one real 2-cell study through the training layer (subprocess, CPU)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _dist import REPO_ROOT, dist_env
from merit_ds.study.__main__ import _shard, build_parser, grid_from_args
from merit_ds.study.analysis import (best_per_batch, check_one_budget, fit_exponent, load_results,
                                     steps_to_target, summarize)
from merit_ds.study.cell import CellSpec
from merit_ds.study.grid import Grid, GridError, cell_steps, parse_list, parse_lrs, short_cells
from merit_ds.study.report import PLOTS, report_from_csv
from merit_ds.study.runner import COLUMNS, collect_results, run_grid, study_identity, write_results


# --- grid parsing ----------------------------------------------------------------------------------

def test_parse_lrs_shared_and_per_optimizer():
    assert parse_lrs("3e-3,1e-3", ["merit", "adamw"]) == {"merit": [1e-3, 3e-3], "adamw": [1e-3, 3e-3]}
    assert parse_lrs("merit=1e-2,3e-2; adamw=2e-3", ["merit", "adamw"]) == {"merit": [1e-2, 3e-2], "adamw": [2e-3]}
    with pytest.raises(GridError, match="no lr grid for adamw"):
        parse_lrs("merit=1e-2", ["merit", "adamw"])
    with pytest.raises(GridError, match="not in --optimizers"):
        parse_lrs("lamb=1e-2;merit=1e-2", ["merit"])
    with pytest.raises(GridError, match="repeated"):
        parse_list("1e-2,1e-2", float, "lr")
    with pytest.raises(GridError, match="positive"):
        parse_lrs("-1e-2", ["merit"])
    # per optimizer and batch; the plain entry fills the batches without their own
    assert parse_lrs("merit@8=6e-3,1.2e-2;merit@64=5e-2;adamw=2e-3", ["merit", "adamw"], [8, 64]) == {
        "merit": {8: [6e-3, 1.2e-2], 64: [5e-2]}, "adamw": [2e-3]}
    assert parse_lrs("merit@64=5e-2;merit=1e-2", ["merit"], [8, 64]) == {"merit": {8: [1e-2], 64: [5e-2]}}
    with pytest.raises(GridError, match="no lr grid at batch 64"):
        parse_lrs("merit@8=1e-2", ["merit"], [8, 64])
    with pytest.raises(GridError, match="batch 32 is not in --batch-sizes"):
        parse_lrs("merit@32=1e-2;merit=1e-2", ["merit"], [8, 64])
    with pytest.raises(GridError, match="must be an integer"):
        parse_lrs("merit@x=1e-2", ["merit"], [8])
    # --add-lrs widens a grid: at one batch, or at every batch
    from merit_ds.study.__main__ import add_lrs

    base = {"merit": {8: [6e-3, 1.2e-2], 64: [2.5e-2]}, "adamw": [1e-3, 2e-3]}
    assert add_lrs(base, "merit@8=3e-3;adamw=4e-3", ["merit", "adamw"], [8, 64]) == {
        "merit": {8: [3e-3, 6e-3, 1.2e-2], 64: [2.5e-2]}, "adamw": [1e-3, 2e-3, 4e-3]}
    assert add_lrs(base, "adamw@64=8e-3;merit=1.2e-2", ["merit", "adamw"], [8, 64]) == {
        "merit": {8: [6e-3, 1.2e-2], 64: [1.2e-2, 2.5e-2]}, "adamw": {8: [1e-3, 2e-3], 64: [1e-3, 2e-3, 8e-3]}}
    assert base["merit"][8] == [6e-3, 1.2e-2]  # not changed in place
    with pytest.raises(GridError, match="batch 32 is not in the grid's batches"):
        add_lrs(base, "merit@32=1e-2", ["merit", "adamw"], [8, 64])
    d = grid_from_args(build_parser().parse_args(["--out", "x", "--add-lrs", "merit@8=3e-3"]), prepare_data=False)
    assert d.lrs_for("merit", 8) == [3e-3, 6e-3, 1.2e-2, 2.5e-2, 5e-2] and len(d.cells()) == 75
    # a batch the preset has no grid for: named, with the flag that gives one; given, it runs
    with pytest.raises(GridError, match=r'no lr grid for merit at batch 16 .* --add-lrs "merit@16=lr,lr,..."'):
        grid_from_args(build_parser().parse_args(["--out", "x", "--batch-sizes", "8,16,64"]), prepare_data=False)
    d = grid_from_args(build_parser().parse_args(["--out", "x", "--batch-sizes", "8,16,64", "--add-lrs",
                                                  "merit@16=1e-2,2e-2;lamb@16=1e-2;adamw@16=3e-3"]), prepare_data=False)
    assert d.lrs_for("merit", 16) == [1e-2, 2e-2] and len(d.cells()) == 72 + (2 + 1 + 1) * 3
    g = Grid(["merit"], [8, 64], {"merit": {8: [1e-2, 2e-2], 64: [5e-2]}}, [0, 1], 512_000, {"seq_len": 32})
    g.check()
    assert [(c.batch, c.lr, c.seed) for c in g.cells()] == [(8, 1e-2, 0), (8, 2e-2, 0), (64, 5e-2, 0),
                                                            (8, 1e-2, 1), (8, 2e-2, 1), (64, 5e-2, 1)]


def test_grid_from_flags_counts_cells(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path), "--optimizers", "merit,lamb,adamw", "--batch-sizes",
                                      "16,128", "--lrs", "merit=1e-2,3e-2;lamb=1e-2;adamw=1e-3,2e-3,3e-3",
                                      "--seeds", "0,1", "--tokens", "65536", "--model", "tiny"])
    grid = grid_from_args(args, prepare_data=False)
    cells = grid.cells()
    assert len(cells) == (2 + 1 + 3) * 2 * 2 == 24
    assert len({c.key for c in cells}) == 24
    assert grid.tokens == 65536 and grid.batches == [16, 128] and grid.seeds == [0, 1]
    assert cells[0] == CellSpec("merit", 16, 1e-2, 0)
    # the default study (issue #24): 3 optimizers x batches 8 and 64 (ratio 8) x 4 lrs per (optimizer, batch)
    # x 3 seeds; 250 steps at batch 64, 2,000 at 8; none under MIN_STEPS
    d = grid_from_args(build_parser().parse_args(["--out", str(tmp_path / "d")]), prepare_data=False)
    assert len(d.cells()) == 72 and max(d.batches) / min(d.batches) == 8 and d.seeds == [0, 1, 2]
    assert d.optimizers == ["merit", "lamb", "adamw"]
    assert {(o, b): len(d.lrs_for(o, b)) for o in d.optimizers for b in d.batches} == {
        (o, b): 4 for o in ("merit", "lamb", "adamw") for b in (8, 64)}
    assert d.lrs_for("merit", 8) == [6e-3, 1.2e-2, 2.5e-2, 5e-2] and d.lrs_for("adamw", 64) == [2e-3, 4e-3, 8e-3, 1.6e-2]
    assert {cell_steps(c, d.tokens, d.settings["seq_len"]) for c in d.cells()} == {2000, 250}
    assert short_cells(d) == [] and d.tokens == 512_000 and d.settings["seq_len"] == 32
    assert (d.settings["eval_sequences"], d.settings["curve_eval_sequences"], d.settings["val_fraction"]) == (5120, 256, 0.15)
    assert d.settings["data"].endswith("data/vocab2048-val0.15/prepared")
    # the old default, kept as --preset cpu-quick: 96 cells, 32 steps at batch 128
    q = grid_from_args(build_parser().parse_args(["--out", str(tmp_path / "q"), "--preset", "cpu-quick"]),
                       prepare_data=False)
    assert len(q.cells()) == 96 and max(q.batches) / min(q.batches) == 16
    assert {o: len(v) for o, v in q.lrs.items()} == {"merit": 5, "lamb": 5, "adamw": 6}
    assert q.settings["data"].endswith("data/vocab2048/prepared") and "val_fraction" not in study_identity(q)
    assert short_cells(q)[0][1] == 32 and len(short_cells(q)) == 32  # batch 128: 16 lrs x 2 seeds
    # the GPU version: the paper's batch sizes, 48e9 / divisor tokens, GPT-2 Small's shape
    g = grid_from_args(build_parser().parse_args(["--out", str(tmp_path / "g"), "--preset", "gpt2-small"]),
                       prepare_data=False)
    assert g.batches == [480, 1024, 2048, 4096, 6144] and g.tokens == 1_000_000_000 and len(g.cells()) == 75
    assert g.settings["seq_len"] == 1024 and g.settings["zero_stage"] == 1 and g.settings["model"] == "gpt2-small"
    assert short_cells(g) == [] and cell_steps(CellSpec("merit", 6144, 1e-3, 0), g.tokens, 1024) == 159
    with pytest.raises(GridError, match="unknown optimizer"):
        Grid(["sgd"], [8], {"sgd": [1.0]}, [0], 1000, {}).check()
    assert _shard("1/4") == (1, 4)
    with pytest.raises(GridError):
        _shard("4/4")


# --- resume --------------------------------------------------------------------------------------------

def _fake_row(cell, s, loss=5.0):
    return {"optimizer": cell.optimizer, "batch": cell.batch, "lr": cell.lr, "seed": cell.seed, "tokens": s["tokens"],
            "tokens_trained": s["tokens"], "steps": s["tokens"] // (cell.batch * 8), "seq_len": 8, "warmup": 1,
            "final_val_loss": loss, "max_attn_logit": 3.0, "gns_b_noise": 10.0, "diverged": 0, "wall_s": 0.1,
            "val_curve": "0:8;10:6;20:5"}


def _micro_grid(tokens=4096, lrs=(1e-2, 3e-2)):
    return Grid(["merit"], [16], {"merit": list(lrs)}, [0], tokens, {"model": "tiny", "seq_len": 8, "data": "D"})


def test_resume_skips_finished_and_redoes_interrupted(tmp_path):
    calls = []

    def interrupted(cell, s, cdir, runner, log):
        calls.append(cell.key)
        if cell.lr == 3e-2:
            (cdir / "metrics.jsonl").write_text('{"step": 1}\n')
            raise KeyboardInterrupt  # killed mid-cell: its directory stays, without row.json
        return _fake_row(cell, s)

    with pytest.raises(KeyboardInterrupt):
        run_grid(_micro_grid(), tmp_path, cell_fn=interrupted, progress=False)
    assert calls == ["merit_b16_lr0.01_s0", "merit_b16_lr0.03_s0"]
    assert (tmp_path / "cells/merit_b16_lr0.01_s0/row.json").exists()
    assert not (tmp_path / "cells/merit_b16_lr0.03_s0/row.json").exists()
    finished_mtime = (tmp_path / "cells/merit_b16_lr0.01_s0/row.json").stat().st_mtime_ns

    calls.clear()
    counts = run_grid(_micro_grid(), tmp_path, cell_fn=lambda c, s, d, r, log: calls.append(c.key) or _fake_row(c, s, 4.0),
                      progress=False)
    assert calls == ["merit_b16_lr0.03_s0"]
    assert counts == {"cells": 2, "shard": 2, "skipped": 1, "run": 1, "redone": 1, "failed": 0, "stopped": 0}
    assert (tmp_path / "cells/merit_b16_lr0.01_s0/row.json").stat().st_mtime_ns == finished_mtime
    assert not (tmp_path / "cells/merit_b16_lr0.03_s0/metrics.jsonl").exists()  # the partial files went
    rows = load_results(tmp_path / "results.csv")
    assert [(r["lr"], r["final_val_loss"]) for r in rows] == [(1e-2, 5.0), (3e-2, 4.0)]
    # a third run has nothing to do
    counts = run_grid(_micro_grid(), tmp_path, cell_fn=lambda *a: pytest.fail("nothing should run"), progress=False)
    assert counts["skipped"] == 2 and counts["run"] == 0


def test_shards_split_the_grid(tmp_path):
    ran = {0: [], 1: []}
    for i in (0, 1):
        run_grid(_micro_grid(lrs=(1e-2, 2e-2, 3e-2)), tmp_path, shard=(i, 2), progress=False,
                 cell_fn=lambda c, s, d, r, log, i=i: ran[i].append(c.lr) or _fake_row(c, s))
    assert ran == {0: [1e-2, 3e-2], 1: [2e-2]}
    assert len(collect_results(tmp_path)) == 3


# --- never mixing budgets ---------------------------------------------------------------------------------

def test_refuses_to_mix_budgets(tmp_path):
    run_grid(_micro_grid(tokens=4096), tmp_path, cell_fn=lambda c, s, d, r, log: _fake_row(c, s), progress=False)
    with pytest.raises(GridError, match="budget of 4,096 tokens; this grid's is 8,192"):
        run_grid(_micro_grid(tokens=8192), tmp_path, cell_fn=lambda *a: pytest.fail("must not run"), progress=False)
    # a row of another budget smuggled into the cells: refused when collected
    row = json.loads((tmp_path / "cells/merit_b16_lr0.01_s0/row.json").read_text())
    (tmp_path / "cells/x").mkdir()
    (tmp_path / "cells/x/row.json").write_text(json.dumps(dict(row, tokens=8192)))
    with pytest.raises(GridError, match="refusing to mix budgets"):
        collect_results(tmp_path)
    # and a results.csv with two budgets cannot be analysed
    rows = [dict(_fake_row(CellSpec("merit", 16, 1e-2, 0), {"tokens": 4096})),
            dict(_fake_row(CellSpec("merit", 64, 1e-2, 0), {"tokens": 8192}))]
    write_results(tmp_path, rows)
    with pytest.raises(GridError, match=r"mix token budgets \[4096, 8192\]"):
        load_results(tmp_path / "results.csv")
    with pytest.raises(GridError):
        check_one_budget(rows)


# --- analysis ------------------------------------------------------------------------------------------

def _rows(table, tokens=65536, curves=None):
    """table: {(opt, batch): {lr: [loss per seed]}} -> result rows."""
    rows = []
    for (opt, batch), by_lr in table.items():
        for lr, losses in by_lr.items():
            for seed, loss in enumerate(losses):
                r = _fake_row(CellSpec(opt, batch, lr, seed), {"tokens": tokens}, loss)
                r["diverged"] = int(not math.isfinite(loss))
                r["max_attn_logit"] = 10 * lr * batch
                r["val_curve"] = (curves or {}).get((opt, batch), "0:8;10:6;20:5")
                r["gns_b_noise"] = 20.0 if opt == "merit" else 40.0
                rows.append(r)
    return rows


SYNTH = {
    ("merit", 8): {1e-2: [5.0, 5.2], 3e-2: [4.6, 4.8], 1e-1: [4.9, 5.1]},            # bracketed: 3e-2
    ("merit", 64): {1e-2: [5.4, 5.4], 3e-2: [5.1, 5.3], 1e-1: [4.9, 4.9]},           # edge: high
    ("adamw", 8): {1e-3: [4.5, 4.7], 3e-3: [4.8, 4.8], 1e-2: [float("inf"), 6.0]},   # edge: low; a diverged seed
    ("adamw", 64): {1e-3: [5.9, 6.1], 3e-3: [5.6, 5.6], 1e-2: [5.8, 5.8]},           # bracketed: 3e-3
}


def test_best_lr_edge_flags_and_seed_spread():
    best = best_per_batch(_rows(SYNTH))
    assert best["merit"][8]["lr"] == 3e-2 and best["merit"][8]["edge"] is None
    assert best["merit"][8]["loss"] == pytest.approx(4.7)
    assert best["merit"][8]["std"] == pytest.approx(math.sqrt(0.02))  # stdev(4.6, 4.8)
    assert best["merit"][8]["range"] == pytest.approx(0.2)
    assert best["merit"][64]["lr"] == 1e-1 and best["merit"][64]["edge"] == "high"
    assert best["adamw"][8]["lr"] == 1e-3 and best["adamw"][8]["edge"] == "low"
    assert best["adamw"][8]["means"][1e-2] == math.inf  # one diverged seed: the lr counts as failed
    assert best["adamw"][64]["lr"] == 3e-3 and best["adamw"][64]["edge"] is None


def test_scaling_exponent_matches_hand_computation():
    # lr doubling for every 4x batch: exactly the sqrt rule
    assert fit_exponent([8, 32, 128], [1e-2, 2e-2, 4e-2]) == pytest.approx(0.5, abs=1e-12)
    # x = 3a, 5a, 7a (a = ln 2); y - y0 = 0, ln 3, ln 3  ->  slope = 2a ln3 / 8a^2 = ln 3 / (4 ln 2)
    assert fit_exponent([8, 32, 128], [1e-2, 3e-2, 3e-2]) == pytest.approx(math.log(3) / (4 * math.log(2)), abs=1e-12)
    assert fit_exponent([8, 32, 128], [1e-2, 3e-2, 3e-2]) == pytest.approx(0.396240625, abs=1e-9)
    # summarize uses the best lrs: merit 3e-2 -> 1e-1 over 8x: log(10/3)/log(8)
    s = summarize(_rows(SYNTH))
    assert s["per_optimizer"]["merit"]["exponent"] == pytest.approx(math.log(1e-1 / 3e-2) / math.log(8))
    assert s["per_optimizer"]["adamw"]["exponent"] == pytest.approx(math.log(3e-3 / 1e-3) / math.log(8))
    assert math.isnan(s["per_optimizer"]["merit"]["exponent_bracketed"])  # only one bracketed optimum
    assert s["per_optimizer"]["merit"]["penalty"] == pytest.approx(4.9 - 4.7)
    assert s["per_optimizer"]["adamw"]["penalty"] == pytest.approx(5.6 - 4.6)


def test_steps_to_target_interpolates():
    curve = [(0, 8.0), (10, 6.0), (20, 5.0), (30, 4.5)]
    assert steps_to_target(curve, 5.5) == pytest.approx(15.0)
    assert steps_to_target(curve, 6.0) == pytest.approx(10.0)
    assert steps_to_target(curve, 4.0) == math.inf


# --- report and plots from a synthetic results.csv ---------------------------------------------------------

def test_report_and_plots_from_synthetic_csv(tmp_path):
    curves = {("merit", 8): "0:8;40:6;80:4.9", ("merit", 64): "0:8;5:6;10:4.95",
              ("adamw", 8): "0:8;40:6;80:4.7", ("adamw", 64): "0:8;5:6.5;10:5.6"}
    write_results(tmp_path, _rows(SYNTH, curves=curves))
    report, plots, summary = report_from_csv(tmp_path / "results.csv", scale="synthetic")
    for name in PLOTS:
        p = tmp_path / name
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    text = report.read_text()
    assert "| MERIT | 64 | 0.1 | 4.9000 |" in text
    assert "YES: largest lr of the grid" in text and "YES: smallest lr of the grid" in text
    assert "| MERIT | 8-64 | +0.2000 |" in text and "| AdamW | 8-64 | +1.0000 |" in text
    assert "MERIT paper: GPT-2 Medium trained at batch 6k matches batch 480" in text
    assert "Ranking by penalty (smallest first): MERIT, AdamW" in text
    # the target is the worst best loss (AdamW at 64: 5.6) + 0.01: steps interpolated on each best-lr curve
    assert summary["target"] == pytest.approx(5.61)
    assert summary["steps_to_target"]["adamw"][64] == pytest.approx(5 + 5 * 0.89 / 0.9)
    assert summary["steps_to_target"]["merit"][8] == pytest.approx(40 + 40 * 0.39 / 1.1)
    assert summary["per_optimizer"]["merit"]["b_noise"] == 20.0


# --- a real 2-cell study, through the training layer (CPU, subprocess) --------------------------------------

@pytest.mark.slow  # merit_ds.study runs
def test_real_micro_study_resumes(tmp_path):
    env = dist_env({"MERIT_TEST_RESULT": ""})
    out = tmp_path / "study"
    base = [sys.executable, "-m", "merit_ds.study", "--out", str(out), "--optimizers", "merit", "--batch-sizes", "8",
            "--seeds", "0", "--tokens", "2048", "--seq-len", "32", "--vocab", "512", "--eval-sequences", "16",
            "--allow-short-cells", "--no-progress"]
    r = subprocess.run(base + ["--lrs", "1e-2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    first = out / "cells/merit_b8_lr0.01_s0/row.json"
    mtime = first.stat().st_mtime_ns
    # an interrupted cell: a directory without row.json
    partial = out / "cells/merit_b8_lr0.03_s0"
    partial.mkdir()
    (partial / "cell.log").write_text("killed\n")
    r = subprocess.run(base + ["--lrs", "1e-2,3e-2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'skipped': 1, 'run': 1, 'redone': 1, 'failed': 0" in r.stderr
    assert first.stat().st_mtime_ns == mtime
    rows = load_results(out / "results.csv")
    assert [(r["lr"], r["steps"], r["tokens"]) for r in rows] == [(1e-2, 8, 2048), (3e-2, 8, 2048)]
    assert all(math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < math.log(512) + 0.5 for r in rows)
    assert all(r["max_attn_logit"] > 0 and r["val_curve"].startswith("0:") for r in rows)
    assert (out / "report.md").exists() and all((out / p).exists() for p in PLOTS)
    # another budget into the same directory is refused (exit 2, nothing run)
    r = subprocess.run(base[:-1] + ["--tokens", "4096", "--lrs", "1e-2"], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2 and "never mixed" in r.stderr


def test_empty_lrs_is_an_error_not_the_default_grid():
    with pytest.raises(GridError, match="--lrs is empty"):
        parse_lrs("", ["merit"])
    args = build_parser().parse_args(["--out", "x", "--lrs", ""])
    with pytest.raises(GridError, match="--lrs is empty"):
        grid_from_args(args, prepare_data=False)


def test_study_exits_nonzero_when_a_cell_failed(tmp_path, monkeypatch, capsys):
    """issue #23: a study whose cells failed exited 0. One cell of two fails: the report covers the
    finished one, and the exit code is 1 with one line saying how many failed and how to retry."""
    import merit_ds.study.runner as runner_mod
    import merit_ds.train.launcher as launcher_mod
    from merit_ds.study.__main__ import main

    def cell(c, settings, cdir, runner, log):
        if c.lr > 2e-2:
            raise RuntimeError("boom")
        return _fake_row(c, settings)

    monkeypatch.setattr(runner_mod, "run_cell", cell)
    monkeypatch.setattr(launcher_mod, "Runner", lambda launcher: None)
    out = tmp_path / "study"
    code = main(["--out", str(out), "--optimizers", "merit", "--batch-sizes", "8", "--seeds", "0", "--tokens", "2048",
                 "--seq-len", "32", "--vocab", "512", "--lrs", "1e-2,3e-2", "--no-progress", "--threads", "0",
                 "--allow-short-cells"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: 1 cell(s) failed (their cell.log says why); the report covers the 1 finished" in err
    assert (out / "report.md").is_file() and len((out / "results.csv").read_text().splitlines()) == 2


def test_flag_errors_write_nothing_under_out(tmp_path, capsys):
    """issue #23: a flag error found after the data was prepared left OUT/data behind."""
    from merit_ds.study.__main__ import main

    out = tmp_path / "study"
    code = main(["--out", str(out), "--optimizers", "merit", "--batch-sizes", "8", "--lrs", "1e-2", "--tokens", "16",
                 "--seq-len", "32", "--no-progress", "--threads", "0"])
    assert code == 2 and "is less than one step of the largest batch" in capsys.readouterr().err
    assert not out.exists()
