"""Batch-size schedules through DeepSpeed on CPU (real ranks, gloo).

* The engine alone (``sched_engine_worker.py``, 1 and 2 ranks, ZeRO 1/2/3): a batch change through
  ``engine.set_train_batch_size`` and explicit accumulation boundaries (the loop's
  ``Runner.set_global_batch``) gives bitwise the step of an engine built for the new
  accumulation from its JSON and loaded from the same checkpoint; DeepSpeed's managed boundary
  alone does not (negative control).
* The loop (``python -m merit_ds.train --batch-schedule 4@0,16@384``, tiny GPT-2, ZeRO-2, fp32,
  micro 2, 2 ranks): 3 steps of 4 sequences (grad-accum 1), then 3 of 16 (grad-accum 4);
  the banner, every step's ``global_batch``/``tokens``/``lr`` in metrics.jsonl, the plot; resuming
  from the checkpoint just before and just after the phase change reproduces every later loss
  bitwise; resuming on 1 process (universal checkpoint) continues the schedule.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _dist import REPO_ROOT, TESTS_DIR, dist_env, free_port, launch

pytestmark = pytest.mark.slow  # DeepSpeed engines and the training loop on 1-2 launched ranks

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("nprocs", [1, 2])
def test_engine_batch_change_equals_an_engine_built_for_it(nprocs):
    result = launch(TESTS_DIR / "sched_engine_worker.py", nprocs=nprocs, timeout=400)
    assert result["world"] == nprocs
    for stage, r in result["stages"].items():
        assert r["changed"] > 1e-3, stage                       # the steps moved the weights
        assert r["max_diff_a_r"] == 0.0, (stage, r)             # bitwise the engine built for grad-accum 4
        assert r["loss_a"] == r["loss_r"], (stage, r)
        assert r["max_diff_n_r"] > 1e-6, (stage, r)             # the managed boundary alone misplaces it


# --- the training loop ----------------------------------------------------------------------------------
SCHEDULE = "4@0,16@384"   # 4 x 32 = 128 tokens/step: steps 1-3 (start at 0, 128, 256), step 4 starts at 384
STEPS = 6
ARGS = ["--model", "tiny", "--model-override", "n_layer=2", "--model-override", "n_embd=32",
        "--model-override", "n_head=2", "--seq-len", "32", "--batch-schedule", SCHEDULE, "--micro-batch", "2",
        "--steps", str(STEPS), "--zero-stage", "2", "--precision", "fp32", "--eval-every", "3", "--ckpt-every", "1",
        "--keep-last", "10", "--diag-every", "3", "--tracker", "none", "--no-progress", "--no-export"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    nxt = rng.integers(0, 256, size=256)
    for name, n in (("train.bin", 40_000), ("val.bin", 4_000)):
        t = np.empty(n, dtype=np.uint16)
        t[0] = 0
        noise, jumps = rng.random(n), rng.integers(0, 256, size=n)
        for i in range(1, n):
            t[i] = nxt[t[i - 1]] if noise[i] < 0.8 else jumps[i]
        t.tofile(d / name)
    return d


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=dist_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def two_ranks(data: Path, out: Path) -> subprocess.CompletedProcess:
    return run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                "merit_ds.train", *ARGS, "--data", str(data), "--out", str(out)])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sched_ref") / "run"
    r = two_ranks(data_dir, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def test_loop_follows_the_schedule(reference):
    out, stdout = reference
    assert "batch schedule 4@0,16@384: micro_batch 2 x world 2 fixed" in stdout
    assert "4@0: steps 1-3: 4 (grad_accum 1) x 3 steps" in stdout
    assert "16@384: steps 4-6: 16 (grad_accum 4) x 3 steps" in stdout
    assert "6 steps, 1,920 tokens; lr by tokens (not scaled with the batch)" in stdout
    recs = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert [r["global_batch"] for r in recs] == [4, 4, 4, 16, 16, 16]
    assert [r["tokens"] for r in recs] == [128, 256, 384, 896, 1408, 1920]
    # lr by tokens: warmup = 1 step (2% of 1,920 tokens is reached by step 1's 128), cosine over
    # tokens 128 .. 1,920 from the tokens before each step, to 0.1 x peak
    run_info = json.loads((out / "run.json").read_text())
    peak = run_info["lr"]
    assert run_info["warmup"] == 1
    assert run_info["batch_schedule"]["segments"] == [[1, 3, 4], [4, 3, 16]]
    # step 1: warmup, 128 / 128 = 1; then the cosine phase (a - 128) / (1920 - 128) = 0, 1/14,
    # 2/14, 6/14, 10/14 of pi for a = 128, 256, 384, 896, 1408; 0.1 + 0.45 (1 + cos):
    # cos(pi/14) = 0.9749279122 -> 0.9887175605, cos(pi/7) = 0.9009688679 -> 0.9554359906,
    # cos(3pi/7) = 0.2225209340 -> 0.6501344203, cos(5pi/7) = -0.6234898019 -> 0.2694295892
    want = [peak * r for r in (1.0, 1.0, 0.9887175605, 0.9554359906, 0.6501344203, 0.2694295892)]
    assert [r["lr"] for r in recs] == pytest.approx(want, rel=1e-9)
    assert recs[3]["lr"] < recs[2]["lr"]  # the phase change does not reset or scale the lr (rule "tokens")
    assert (out / "loss.png").stat().st_size > 0
    meta = json.loads((out / "checkpoints" / "step_00000004" / "merit_ds_checkpoint.json").read_text())
    assert meta["run"]["schedule"]["batch_schedule"] == SCHEDULE


@pytest.mark.parametrize("resume_at", [3, 4])  # just before and just after the phase change
def test_resume_across_the_phase_change_is_bitwise(reference, data_dir, tmp_path, resume_at):
    ref, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    ck = out / "checkpoints"
    for step in range(resume_at + 1, STEPS + 1):
        shutil.rmtree(ck / f"step_{step:08d}")
    (ck / "latest").write_text(f"step_{resume_at:08d}")
    r = two_ranks(data_dir, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"at step {resume_at}" in r.stdout
    got, want = train_losses(out), train_losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # every step after the resume, bitwise
    assert [r["global_batch"] for r in records(out) if "loss" in r] == [4, 4, 4, 16, 16, 16]


def test_resume_on_one_process_continues_the_schedule(reference, data_dir, tmp_path):
    """Saved by 2 ranks at step 3, resumed by 1 process (universal checkpoint): the schedule's
    batches do not depend on the world size, so step 4 takes the same 16 sequences (micro 2 x
    grad-accum 8 instead of 2 ranks x 4) with the same weights: the same loss up to the order of
    the float64 sum; later steps average gradients in another order (compared at 1e-4)."""
    ref, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    ck = out / "checkpoints"
    for step in range(4, STEPS + 1):
        shutil.rmtree(ck / f"step_{step:08d}")
    (ck / "latest").write_text("step_00000003")
    r = run([sys.executable, "-m", "merit_ds.train", *ARGS, "--data", str(data_dir), "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world size 2 -> 1: resuming through the universal checkpoint" in r.stdout
    assert "16@384: steps 4-6: 16 (grad_accum 8) x 3 steps" in r.stdout
    got, want = train_losses(out), train_losses(ref)
    assert got[4] == pytest.approx(want[4], rel=1e-12)
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-4)
    assert [r["global_batch"] for r in records(out) if "loss" in r] == [4, 4, 4, 16, 16, 16]


def test_schedule_that_does_not_divide_is_refused_before_anything_is_written(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [a if a != SCHEDULE else "4@0,6@384" for a in ARGS]
    r = run([sys.executable, "-m", "merit_ds.train", *args, "--micro-batch", "4", "--data", str(data_dir),
             "--out", str(out)], timeout=180)
    assert r.returncode == 2
    assert "batch schedule: phase 6@384 has a global batch of 6 sequences, not a multiple of micro_batch 4" in r.stderr
    assert not out.exists()
