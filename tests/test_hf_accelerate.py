"""Accelerate (+ DeepSpeed plugin) with MERIT and LAMB: client and JSON paths, ZeRO 2/3, offload,
the swap and decay traps, LR schedules under 2 processes, and the documented CPU launch commands.

One ``torchrun --nproc_per_node 2`` job runs the scenarios of tests/_hf_accelerate_worker.py in
turn; two more jobs run the exact ``accelerate launch`` commands from docs/integrations.md
("CPU launch commands (tested)").
Tolerance as in test_hf_trainer.py: each step within ``STEP_ATOL = 1e-6`` of plain MERIT
re-run from the recorded weights (measured ~4e-9), negative control (all decayed) > 1e-3.
Scenarios ending in ``_lamb`` use LAMB (client ``merit_ds.LAMB`` or ``"type": "ShardedLAMB"``)
and are held to the same tolerances against plain single-process ``merit_ds.LAMB``.
"""

from __future__ import annotations

import json

import pytest
import torch

from _hf_common import HP, WEIGHT_DECAY, reference_check, token_data
from _dist import launch
from _hf_launch import accelerate_launch

pytestmark = pytest.mark.slow  # torchrun / accelerate launch jobs and fresh interpreters

STEP_ATOL, CONTROL_MIN = 1e-6, 1e-3
STEPS, MICRO, WARMUP, WORLD = 4, 2, 1, 2  # as in the worker
EXACT = ["ddp_client", "z1_client", "z2_client", "z3_client", "z2_json", "z3_json", "z2_offload", "z3_offload",
         "z2_client_lamb", "z3_json_lamb", "z3_offload_lamb",
         "z2_json_offload", "z3_json_offload_lamb"]  # named in the JSON + offload, no zero_force_ds_cpu_optimizer
TRAPS = ["swap", "adamw", "flat_json", "swap_lamb", "plain_swap", "plain_swap_lamb", "unguarded_swap"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    launch("tests/_hf_accelerate_worker.py", 2, ["--out", str(out), "--scenarios", ",".join(EXACT + TRAPS)], timeout=400)
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in EXACT + TRAPS}


def _assert_matches_reference(rec):
    assert rec["error"] is None, rec.get("message")
    optimizer = "LAMB" if rec["name"].endswith("_lamb") else "MERIT"
    assert rec["opt_type"] == optimizer
    assert len(rec["weights"]) == STEPS + 1
    tokens = token_data(STEPS * MICRO * WORLD)
    kw = dict(weight_decay=WEIGHT_DECAY, hp=dict(HP), loss_scale=1.0, optimizer=optimizer)  # model's own mean loss
    diffs = reference_check(rec, tokens, MICRO * WORLD, **kw)
    assert max(diffs) <= STEP_ATOL, diffs
    control = reference_check(rec, tokens, MICRO * WORLD, all_decayed=True, **kw)
    assert max(control) > CONTROL_MIN, control


def _expected_lrs():
    # get_cosine_schedule_with_warmup(warmup=1, total=4) per optimizer update, on 2 processes:
    # k = 0 warms up from 0 (k / 1 = 0); then progress (k - 1) / 3 = 0, 1/3, 2/3 and
    # (1 + cos(pi progress)) / 2 = 1, (1 + 0.5) / 2 = 0.75, (1 - 0.5) / 2 = 0.25
    assert (STEPS, WARMUP) == (4, 1)
    return [HP["lr"] * r for r in (0.0, 1.0, 0.75, 0.25)]


@pytest.mark.parametrize("name", EXACT)
def test_matches_plain_merit_reference(runs, name):
    rec = runs[name]
    if name.startswith("z"):
        assert rec["split"], "no matrix is split across the ranks"
    _assert_matches_reference(rec)


@pytest.mark.parametrize("name", ["ddp_client", "z2_client", "z3_json", "z3_json_lamb"])
def test_lr_schedule_under_two_processes(runs, name):
    # ddp_client/z2_client: torch scheduler in AcceleratedScheduler (stepped twice per update,
    # built with scheduler_steps); z3_json: DummyScheduler stepped by DeepSpeed once per update.
    torch.testing.assert_close(runs[name]["lrs"], _expected_lrs(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["swap", "swap_lamb"])
def test_offload_swap_is_refused(runs, name):
    rec = runs[name]
    assert rec["error"] == "OffloadSwapError" and "zero_force_ds_cpu_optimizer" in rec["message"]
    assert ("not LAMB" if name.endswith("_lamb") else "not MERIT") in rec["message"]


@pytest.mark.parametrize("name", ["plain_swap", "plain_swap_lamb"])
def test_plain_prepare_refuses_the_offload_swap(runs, name):
    # No merit_ds call but `import merit_ds`: plain accelerator.prepare(model, MERIT(...), sched)
    # under ZeRO-Offload without zero_force_ds_cpu_optimizer would train with DeepSpeedCPUAdam
    # (accelerator.py:2374-2383); the guard armed at import raises before DeepSpeed starts.
    rec = runs[name]
    assert rec["error"] == "OffloadSwapError", rec.get("message")
    assert "zero_force_ds_cpu_optimizer" in rec["message"]
    assert ("not LAMB" if name.endswith("_lamb") else "not MERIT") in rec["message"]
    assert "opt_type" not in rec and rec["weights"] == []
    # negative control, same launch: with the guard taken off, Accelerate swaps in DeepSpeedCPUAdam
    # (built from MERIT's param groups, so it keeps MERIT's betas; Adam with adamw_mode=False)
    control = runs["unguarded_swap"]
    assert control["opt_type"] == "DeepSpeedCPUAdam" and control["betas"] == list(HP["betas"]), control


def test_non_merit_optimizer_is_detected_after_prepare(runs):
    rec = runs["adamw"]
    assert rec["error"] == "NotMeritError"
    assert "AdamW" in rec["message"] and "DeepSpeedZeroOptimizer" in rec["message"]


def test_flat_parameter_list_with_decay_is_refused(runs):
    rec = runs["flat_json"]
    assert rec["error"] == "DecaySplitError" and "ln_1.bias" in rec["message"]


# ---- the CPU launch commands documented in docs/integrations.md, "CPU launch commands (tested)" ---------------
def test_accelerate_launch_ddp_on_cpu(tmp_path):
    accelerate_launch(
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no"],
        "tests/_hf_accelerate_worker.py", "--from-launcher", "--out", str(tmp_path), "--scenarios", "ddp_client",
        ACCELERATE_USE_CPU=1,
    )
    _assert_matches_reference(torch.load(tmp_path / "ddp_client.pt", weights_only=False))


def test_accelerate_launch_deepspeed_json_on_cpu(tmp_path):
    from merit_ds.integrations.accelerate import merit_deepspeed_config

    ds = merit_deepspeed_config(3, micro_batch=MICRO, grad_accum=1, gradient_clipping=0.0,
                                optimizer_params=dict(HP, weight_decay=WEIGHT_DECAY))
    (tmp_path / "ds_zero3_merit.json").write_text(json.dumps(ds))
    (tmp_path / "accelerate_ds.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'ds_zero3_merit.json'}\n  zero3_init_flag: false\n"
        "num_processes: 2\nnum_machines: 1\nmachine_rank: 0\nuse_cpu: false\n"
    )
    accelerate_launch(["--config_file", str(tmp_path / "accelerate_ds.yaml")], "tests/_hf_accelerate_worker.py",
                      "--from-launcher", "--out", str(tmp_path), "--scenarios", "z3_json")
    rec = torch.load(tmp_path / "z3_json.pt", weights_only=False)
    assert rec["split"]
    _assert_matches_reference(rec)


# ---- the Accelerate guard is armed by `import merit_ds` alone -----------------------------------
def test_import_merit_ds_arms_accelerate_guard_in_either_order():
    import subprocess
    import sys

    from _dist import dist_env

    code = (
        "import sys\n{first}\n{second}\n"
        "from accelerate.accelerator import Accelerator\n"
        "print(getattr(Accelerator._prepare_deepspeed, '__merit_ds_guard__', False))\n"
    )
    for first, second in [("import merit_ds", "import accelerate"), ("import accelerate", "import merit_ds"),
                          ("import merit_ds", "from transformers import Trainer")]:
        out = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)], env=dist_env(),
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().endswith("True"), (first, second, out.stdout, out.stderr[-2000:])
    out = subprocess.run([sys.executable, "-c", "import sys, merit_ds; print('accelerate' in sys.modules)"],
                         env=dist_env(), capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code.format(first="import merit_ds", second="import accelerate")],
                         env=dist_env({"MERIT_DS_NO_ACCELERATE_GUARD": "1"}), capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("False"), out.stderr[-2000:]
