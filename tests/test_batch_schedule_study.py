"""Batch-size schedules as a study axis (``--schedules``): parsing, the cells it adds, the report's
and plot's grouping by schedule, and one real 2-cell study (constant vs small-then-large at the
same token budget) through the training layer."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from _dist import REPO_ROOT, dist_env
from merit_ds.study.__main__ import build_parser, grid_from_args
from merit_ds.study.analysis import load_results
from merit_ds.study.cell import CellSpec, cell_args
from merit_ds.study.grid import GridError, parse_schedules
from merit_ds.study.report import SCHEDULE_PLOT, report_from_csv
from merit_ds.study.runner import write_results


def test_parse_schedules():
    assert parse_schedules("const; 16@0,64@1e5 ;ramp:16..64@0..100000") == [
        "const", "16@0,64@100000", "ramp:16..64@0..100000"]
    with pytest.raises(GridError, match="repeats"):
        parse_schedules("16@0,64@100000;16@0,64@1e5")
    with pytest.raises(GridError, match="must start at token 0"):
        parse_schedules("const;16@5")
    with pytest.raises(GridError, match="no schedules"):
        parse_schedules(" ; ")


def test_grid_with_a_schedule_axis(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path), "--optimizers", "merit,adamw", "--batch-sizes", "16,64",
                                      "--lrs", "merit=1e-2,3e-2;adamw=1e-3", "--seeds", "0", "--tokens", "200000",
                                      "--model", "tiny", "--micro-batch", "32",
                                      "--schedules", "const;16@0,64@100000;ramp:16..64@0..100000"])
    grid = grid_from_args(args, prepare_data=False)
    cells = grid.cells()
    # per optimizer: const x 2 batches x its lrs, plus 2 schedules x its lrs
    assert len(cells) == (2 * 2 + 2 * 2) + (2 * 1 + 2 * 1) == 12
    assert len({c.key for c in cells}) == 12
    sched = [c for c in cells if c.schedule != "const"]
    assert sched[0] == CellSpec("merit", 64, 1e-2, 0, schedule="16@0,64@100000")
    assert sched[0].key == "merit_sched-16at0_64at100000_lr0.01_s0"
    assert [c.key for c in cells if c.schedule.startswith("ramp")][0] == "merit_sched-ramp16-64at0-100000_lr0.01_s0"
    a = cell_args(sched[0], dict(grid.settings, tokens=grid.tokens), tmp_path)
    assert a[a.index("--batch-schedule") + 1] == "16@0,64@100000" and "--global-batch" not in a
    assert a[a.index("--micro-batch") + 1] == "16"  # gcd(16, 64) = 16 <= the study's 32
    assert CellSpec("merit", 16, 1e-2, 0).key == "merit_b16_lr0.01_s0"  # constant cells keep their keys


def _row(opt, batch, lr, loss, schedule="const", steps=10):
    return {"optimizer": opt, "batch": batch, "schedule": schedule, "lr": lr, "seed": 0, "tokens": 4096,
            "tokens_trained": 4096, "steps": steps, "seq_len": 8, "warmup": 1, "final_val_loss": loss,
            "max_attn_logit": 3.0, "gns_b_noise": 10.0, "diverged": 0, "wall_s": 0.1, "val_curve": "0:8;5:6;10:5"}


def test_report_groups_by_schedule(tmp_path):
    rows = [_row("merit", 8, 1e-2, 5.0, steps=64), _row("merit", 8, 3e-2, 4.8, steps=64),
            _row("merit", 64, 1e-2, 5.6, steps=8), _row("merit", 64, 3e-2, 5.5, steps=8),
            _row("merit", 64, 1e-2, 5.2, "8@0,64@2048", 36), _row("merit", 64, 3e-2, 5.3, "8@0,64@2048", 36)]
    write_results(tmp_path, rows)
    assert [r["schedule"] for r in load_results(tmp_path / "results.csv")] == ["const"] * 4 + ["8@0,64@2048"] * 2
    report, plots, summary = report_from_csv(tmp_path / "results.csv")
    s = summary["schedules"]["merit"]
    assert (s["const b8"]["lr"], s["const b8"]["loss"]) == (3e-2, 4.8)
    assert (s["const b64"]["lr"], s["const b64"]["loss"]) == (3e-2, 5.5)
    assert (s["8@0,64@2048"]["lr"], s["8@0,64@2048"]["loss"], s["8@0,64@2048"]["steps"]) == (1e-2, 5.2, 36)
    # the batch analyses read the constant cells only: the schedule cell (batch 64) does not win "batch 64"
    assert summary["best"]["merit"][64]["loss"] == 5.5
    text = report.read_text()
    assert "## Batch-size schedules at equal tokens" in text
    assert "| MERIT | const b8 | 64 | 8 | 0.03 | 4.8000 |" in text
    assert "| MERIT | 8@0,64@2048 | 36 | 64 | 0.01 | 5.2000 |" in text
    png = tmp_path / SCHEDULE_PLOT
    assert png in plots and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # a merit_ds.study run
def test_real_study_with_a_schedule_axis(tmp_path):
    """Constant batch 8 vs 8-then-16 at 2,048 tokens (sequences of 32): 8 steps vs 4 + 2."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "merit_ds.study", "--out", str(out), "--optimizers", "merit", "--batch-sizes", "8",
           "--seeds", "0", "--tokens", "2048", "--seq-len", "32", "--vocab", "512", "--eval-sequences", "16",
           "--lrs", "1e-2", "--schedules", "const;8@0,16@1024", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=dist_env({"MERIT_TEST_RESULT": ""}), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = load_results(out / "results.csv")
    assert [(r["schedule"], r["batch"], r["steps"], r["tokens_trained"]) for r in rows] == [
        ("const", 8, 8, 2048), ("8@0,16@1024", 16, 6, 2048)]
    assert all(math.isfinite(r["final_val_loss"]) for r in rows)
    recs = [json.loads(line) for line in (out / "cells/merit_sched-8at0_16at1024_lr0.01_s0/metrics.jsonl")
            .read_text().splitlines()]
    assert [x["global_batch"] for x in recs] == [8, 8, 8, 8, 16, 16]
    assert [x["tokens"] for x in recs] == [256, 512, 768, 1024, 1536, 2048]
    assert "| MERIT | 8@0,16@1024 | 6 | 16 |" in (out / "report.md").read_text()
    assert (out / SCHEDULE_PLOT).exists()
