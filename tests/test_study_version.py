"""The study's guards (issue #24): the code version recorded in every cell and the refusal of a
resumed study's cells from another version; the refusal of grids with cells under 100 steps."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from merit_ds.study.__main__ import build_parser, grid_from_args, main
from merit_ds.study.analysis import load_results
from merit_ds.study.cell import CellSpec
from merit_ds.study.grid import MIN_STEPS, Grid, GridError, cell_steps, check_min_steps, short_cells
from merit_ds.study.runner import run_grid
from merit_ds.study.version import ANALYSIS_ONLY, PACKAGE_ROOT, code_version, source_hash


# --- the code version -------------------------------------------------------------------------------------

def _package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "train").mkdir(parents=True)
    (pkg / "study").mkdir()
    (pkg / "train" / "loop.py").write_text("x = 1\n")
    (pkg / "study" / "report.py").write_text("y = 1\n")
    return pkg


def test_source_hash_follows_the_code_not_the_analysis(tmp_path):
    pkg = _package(tmp_path)
    h = source_hash(pkg)
    assert len(h) == 64 and source_hash(pkg) == h
    (pkg / "train" / "__pycache__").mkdir()
    (pkg / "train" / "__pycache__" / "loop.cpython-311.pyc").write_bytes(b"\0")
    (pkg / "study" / "report.py").write_text("y = 2  # analysis only: no cell changes\n")
    assert source_hash(pkg) == h
    (pkg / "train" / "new.py").write_text("")  # an untracked file is code too
    h2 = source_hash(pkg)
    assert h2 != h
    (pkg / "train" / "loop.py").write_text("x = 2\n")
    assert source_hash(pkg) not in (h, h2)
    assert "study/report.py" in ANALYSIS_ONLY and "study/intervals.py" in ANALYSIS_ONLY


def test_code_version_without_git(tmp_path):
    v = code_version(_package(tmp_path), fresh=True)
    assert v["commit"] is None and v["dirty"] is None
    assert v["label"] == f"no-git {v['key']}" and len(v["key"]) == 16
    assert set(v["libraries"]) == {"torch", "deepspeed", "transformers", "numpy"}


def test_code_version_of_this_checkout():
    v = code_version(fresh=True)
    head = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    status = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "status", "--porcelain", "--untracked-files=all", "--",
                             "."], capture_output=True, text=True).stdout
    assert v["commit"] == head.stdout.strip() and v["dirty"] == bool(status.strip())
    assert v["label"] == f"{v['commit'][:12]}{'+dirty' if v['dirty'] else ''} {v['key']}"
    assert code_version() == code_version()  # cached per process


# --- a resumed study refuses cells of another code version -----------------------------------------------------

V1 = {"key": "aaaaaaaaaaaaaaaa", "commit": "1" * 40, "dirty": False}
V2 = {"key": "bbbbbbbbbbbbbbbb", "commit": "2" * 40, "dirty": True}


def _fake(cell, s, loss=5.0):
    return {"optimizer": cell.optimizer, "batch": cell.batch, "lr": cell.lr, "seed": cell.seed, "tokens": s["tokens"],
            "tokens_trained": s["tokens"], "steps": 125, "seq_len": 32, "warmup": 3, "final_val_loss": loss,
            "final_val_se": 0.005, "max_attn_logit": 3.0, "gns_b_noise": 10.0, "diverged": 0, "wall_s": 0.1,
            "val_curve": "0:8;10:6"}


def _grid(lrs=(1e-2, 2e-2)):
    return Grid(["merit"], [16], {"merit": list(lrs)}, [0], 64_000, {"model": "tiny", "seq_len": 32, "data": "D"})


def test_rows_record_the_code_version(tmp_path):
    run_grid(_grid(), tmp_path, cell_fn=lambda c, s, d, r, log: _fake(c, s), progress=False, version=V1)
    rows = load_results(tmp_path / "results.csv")
    assert [(r["code_version"], r["code_commit"]) for r in rows] == [(V1["key"], "1" * 12)] * 2
    assert "code version: " in (tmp_path / "cells/merit_b16_lr0.01_s0/cell.log").read_text()


def test_resume_refuses_cells_of_another_code_version(tmp_path):
    run_grid(_grid(), tmp_path, cell_fn=lambda c, s, d, r, log: _fake(c, s), progress=False, version=V1)
    before = (tmp_path / "cells/merit_b16_lr0.01_s0/row.json").read_text()
    # the same grid, grown by one lr, under another code version: refused, nothing run or removed
    with pytest.raises(GridError) as e:
        run_grid(_grid((1e-2, 2e-2, 4e-2)), tmp_path, cell_fn=lambda *a: pytest.fail("must not run"),
                 progress=False, version=V2)
    msg = str(e.value)
    assert ("2 finished cell(s) of this grid were produced by another code version than this one (e.g. "
            "merit_b16_lr0.01_s0: code aaaaaaaaaaaaaaaa (commit 111111111111); this code: bbbbbbbbbbbbbbbb (commit "
            "222222222222+dirty))") in msg
    assert "Fix: add --rerun-stale to rerun them from scratch, or continue the study in a new --out" in msg
    assert (tmp_path / "cells/merit_b16_lr0.01_s0/row.json").read_text() == before
    assert not (tmp_path / "cells/merit_b16_lr0.04_s0").exists()
    # --rerun-stale: the two stale cells are redone from scratch, the new one run; all now of version 2
    ran = []
    counts = run_grid(_grid((1e-2, 2e-2, 4e-2)), tmp_path, progress=False, version=V2, rerun_stale=True,
                      cell_fn=lambda c, s, d, r, log: ran.append(c.key) or _fake(c, s, 4.0))
    assert ran == ["merit_b16_lr0.01_s0", "merit_b16_lr0.02_s0", "merit_b16_lr0.04_s0"]
    assert counts["stale"] == 2 and counts["redone"] == 2 and counts["run"] == 3
    assert {r["code_version"] for r in load_results(tmp_path / "results.csv")} == {V2["key"]}
    # the same version again: nothing to do
    assert run_grid(_grid((1e-2, 2e-2, 4e-2)), tmp_path, progress=False, version=V2,
                    cell_fn=lambda *a: pytest.fail("nothing to run"))["skipped"] == 3


def test_cells_without_a_recorded_version_count_as_another(tmp_path):
    run_grid(_grid(), tmp_path, cell_fn=lambda c, s, d, r, log: _fake(c, s), progress=False, version=V1)
    f = tmp_path / "cells/merit_b16_lr0.02_s0/row.json"
    row = json.loads(f.read_text())
    del row["code_version"]
    f.write_text(json.dumps(row))
    with pytest.raises(GridError, match=r"1 finished cell\(s\) .* \(e\.g\. merit_b16_lr0\.02_s0: no code version "
                                        r"recorded"):
        run_grid(_grid(), tmp_path, cell_fn=lambda *a: pytest.fail("must not run"), progress=False, version=V1)


# --- fewer than 100 steps ------------------------------------------------------------------------------------

def test_cell_steps_match_the_plan():
    # ceil(tokens / (batch x seq)): 512,000 / (64 x 32) = 250; 262,144 / (128 x 64) = 32; 1e9 / (6144 x 1024) -> 159
    assert cell_steps(CellSpec("merit", 64, 1e-2, 0), 512_000, 32) == 250
    assert cell_steps(CellSpec("merit", 128, 1e-2, 0), 262_144, 64) == 32
    assert cell_steps(CellSpec("merit", 6144, 1e-3, 0), 1_000_000_000, 1024) == 159
    # a batch schedule: its step table (4 steps of 8, then 2 of 16 for 2,048 tokens of 32)
    assert cell_steps(CellSpec("merit", 16, 1e-2, 0, schedule="8@0,16@1024"), 2048, 32) == 6


def test_short_cells_are_refused_with_the_fix():
    g = Grid(["merit", "adamw"], [8, 128], {"merit": [1e-2], "adamw": [2e-3, 5e-3]}, [0, 1], 262_144, {"seq_len": 64})
    assert [(c.key, n) for c, n in short_cells(g)][:2] == [("adamw_b128_lr0.002_s0", 32), ("adamw_b128_lr0.002_s1", 32)]
    assert len(short_cells(g)) == 6  # batch 128: 3 (optimizer, lr) x 2 seeds; batch 8 has 512 steps
    with pytest.raises(GridError) as e:
        check_min_steps(g)
    assert str(e.value) == (
        "cell adamw_b128_lr0.002_s0 gets 32 optimizer steps at 262,144 tokens (batch 128 x 64 tokens per step), fewer "
        "than 100 (and 5 more cell(s) under 100): so few steps mostly measure the number of steps, not the optimizer. "
        "Fix: --tokens 819200 or more (100 steps at batch 128), or smaller --batch-sizes; or pass --allow-short-cells "
        "to run it anyway (its report then warns)")
    g.tokens = 100 * 128 * 64
    check_min_steps(g)  # exactly 100 steps: allowed
    assert MIN_STEPS == 100


def test_the_cli_refuses_a_short_grid_before_writing_anything(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    flags = ["--out", str(out), "--optimizers", "merit", "--batch-sizes", "8,16", "--lrs", "1e-2", "--seeds", "0",
             "--tokens", "4096", "--seq-len", "32", "--vocab", "512", "--no-progress", "--threads", "0"]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert ("error: cell merit_b16_lr0.01_s0 gets 8 optimizer steps at 4,096 tokens (batch 16 x 32 tokens per step), "
            "fewer than 100 (and 1 more cell(s) under 100)") in err and "--allow-short-cells" in err
    assert not out.exists()
    # with the override it runs (stand-in cells here), and the report warns
    import merit_ds.study.runner as runner_mod
    import merit_ds.train.launcher as launcher_mod

    monkeypatch.setattr(runner_mod, "run_cell", lambda c, s, d, r, log: dict(_fake(c, s), steps=4096 // (32 * c.batch)))
    monkeypatch.setattr(launcher_mod, "Runner", lambda launcher: None)
    assert main(flags + ["--allow-short-cells"]) == 0
    assert "WARNING: 2 cell(s) trained fewer than 100 optimizer steps" in (out / "report.md").read_text()
    # one batch size compares no batch sizes: it runs, with a warning on stderr and in the report
    one = tmp_path / "one"
    capsys.readouterr()
    assert main(["--out", str(one)] + flags[2:4] + ["--batch-sizes", "8"] + flags[6:]) == 0
    assert "warning: cell merit_b8_lr0.01_s0 gets 16 optimizer steps (< 100; 1 such cell(s)); one batch size" in \
        capsys.readouterr().err
    assert "WARNING: 1 cell(s) trained fewer than 100 optimizer steps" in (one / "report.md").read_text()


def test_presets_and_the_min_steps_rule(tmp_path):
    def grid(*flags):
        return grid_from_args(build_parser().parse_args(["--out", str(tmp_path), *flags]), prepare_data=False)

    assert short_cells(grid()) == []  # the default: 250 steps at batch 64
    assert min(n for _, n in short_cells(grid("--preset", "cpu-quick"))) == 32
    assert short_cells(grid("--preset", "width-depth")) == []  # 409,600 / (64 x 64) = 100 steps
    assert min(n for _, n in short_cells(grid("--preset", "width-depth", "--tokens", "131072"))) == 32  # the first run's
    assert short_cells(grid("--preset", "gpt2-small")) == []  # default divisor 48: 159 steps at 6144
    with pytest.raises(GridError, match=r"--budget-divisor 76 or less"):
        check_min_steps(grid("--preset", "gpt2-small", "--budget-divisor", "100"), gpu=True)


def test_committed_results_analyse_and_warn_when_short(tmp_path):
    """docs/study/results.csv (whatever study it holds: the quick study's cells had 32 steps at batch 128)
    is analysed without refusal, and the report warns exactly when a cell is under 100 steps."""
    from merit_ds.study.report import report_from_csv

    shutil.copy(PACKAGE_ROOT.parent / "docs" / "study" / "results.csv", tmp_path / "results.csv")
    rows = load_results(tmp_path / "results.csv")
    text = report_from_csv(tmp_path / "results.csv", tmp_path)[0].read_text()
    short = sum(int(r["steps"]) < MIN_STEPS for r in rows)
    assert (f"WARNING: {short} cell(s) trained fewer than 100 optimizer steps" in text) == bool(short)
