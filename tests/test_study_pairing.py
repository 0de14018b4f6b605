"""The study's seeds are paired (issue #24): a seed fixes the initial weights and the data order of
every optimizer, lr and batch. Checked on the data order directly (fast) and on real cells: the
training loss of step 1 (before any update: only the weights and the first batch enter) is the same
for every optimizer and lr of a (seed, batch), and the validation loss at step 0 the same for every
cell of a seed."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from _dist import REPO_ROOT, dist_env
from merit_ds.data.prepare import prepare
from merit_ds.study.analysis import load_results, parse_curve
from merit_ds.study.cell import CellSpec, cell_args
from merit_ds.train import loop
from merit_ds.train.data_source import make_train_loader


def _stream(data, cell, settings, steps):
    """The training sequences a cell reads in its first ``steps`` steps, in order, as one array."""
    args = loop.parse_args(cell_args(cell, dict(settings, data=str(data)), data.parent / "o"))
    loader = make_train_loader(args.data, seq_len=int(args.seq_len), global_batch=int(args.global_batch),
                               micro_batch=int(args.micro_batch), rank=0, world=1, seed=args.seed)
    xs = [next(loader)[0].numpy() for _ in range(steps * loader.grad_accum)]
    return args.seed, np.concatenate(xs)


def test_a_seed_fixes_the_data_order_across_optimizers_lrs_and_batches(tmp_path):
    nano = tmp_path / "nano"
    nano.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, 500, 40_000, dtype=np.uint16).tofile(nano / "train.bin")
    rng.integers(0, 500, 2_000, dtype=np.uint16).tofile(nano / "val.bin")
    data = tmp_path / "prepared"
    prepare(nano, data, progress=False)
    s = {"model": "tiny", "model_overrides": [], "seq_len": 32, "micro_batch": 32, "eval_sequences": 16,
         "zero_stage": 0, "precision": "fp32", "tokens": 512_000, "diversity_probe": 0}
    seed, a = _stream(data, CellSpec("merit", 8, 1.2e-2, 1), s, steps=8)     # 8 steps of 8
    seed2, b = _stream(data, CellSpec("adamw", 8, 4e-3, 1), s, steps=8)      # another optimizer and lr
    seed3, c = _stream(data, CellSpec("lamb", 64, 5e-2, 1), s, steps=1)      # 1 step of 64 (2 micro-batches)
    assert seed == seed2 == seed3 == 1
    assert a.shape == (64, 32) and np.array_equal(a, b) and np.array_equal(a, c)
    _, d = _stream(data, CellSpec("merit", 8, 1.2e-2, 2), s, steps=8)        # another seed: another order
    assert not np.array_equal(a, d)


@pytest.mark.slow  # a merit_ds.study run: 12 cells of 2-4 steps
def test_real_cells_of_a_seed_share_weights_and_data(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "merit_ds.study", "--out", str(out), "--optimizers", "merit,adamw",
           "--batch-sizes", "8,16", "--lrs", "merit@8=1e-2,3e-2;merit@16=2e-2;adamw@8=1e-3,3e-3;adamw@16=2e-3",
           "--seeds", "0,1", "--tokens", "1024", "--seq-len", "32", "--vocab", "512", "--eval-sequences", "16",
           "--allow-short-cells", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=dist_env({"MERIT_TEST_RESULT": ""}), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = load_results(out / "results.csv")
    assert len(rows) == 12
    step1 = {}
    val0 = {}
    for row in rows:
        step1.setdefault((row["seed"], row["batch"]), set()).add(row["step1_loss"])
        val0.setdefault(row["seed"], set()).add(parse_curve(row["val_curve"])[0][1])
    # bit-identical within a (seed, batch): 3 cells each (2 optimizers, 2 or 1 lrs)
    assert all(len(v) == 1 for v in step1.values()), step1
    assert all(len(v) == 1 for v in val0.values()), val0  # the same initial weights at both batches
    assert step1[(0, 8)] != step1[(1, 8)] and val0[0] != val0[1]  # and seeds differ
    assert all(math.isfinite(x) for v in step1.values() for x in v)
    assert {row["code_version"] for row in rows} == {rows[0]["code_version"]} and rows[0]["code_commit"]
