"""HF Trainer with MERIT: registration, every path against a plain-MERIT reference, the traps.

Multi-process paths run as one ``torchrun --nproc_per_node 2`` job (gloo, CPU) executing several
scenarios in turn (tests/_hf_trainer_worker.py); the tests read what rank 0 recorded.

Tolerances (stated once): the reference re-runs each recorded step from the recorded weights
(tests/_hf_common.py). DDP-averaged vs. one-process gradients differ in the last bits only, so
each step must agree to ``STEP_ATOL = 1e-6`` (measured ~5e-8 at step 1, ~4e-9 later); the
negative control (everything decayed, as with one flat parameter list) differs by > 1e-3.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from _hf_common import HP, SEQ, WEIGHT_DECAY, reference_check, token_data
from _hf_launch import REPO, run, torchrun

STEP_ATOL = 1e-6
CONTROL_MIN = 1e-3
STEPS, MICRO = 3, 2  # as in the worker
# The Trainer divides the summed token loss by the number of label tokens (B*L), while the
# model's own mean runs over the B*(L-1) shifted targets: its gradient is (L-1)/L of the mean
# loss's. The reference uses the same convention.
TRAINER_LOSS_SCALE = (SEQ - 1) / SEQ
HAVE_SHARDING = importlib.util.find_spec("merit_ds.sharding") is not None
NEEDS_SHARDING = "needs merit_ds.sharding (branch zero): MERIT is not exact on ZeRO flat partitions without it"

CLI = [
    "--optim", "merit", "--optim_args", "eps=1e-6",  # the command-line opt-in under test
    "--learning_rate", str(HP["lr"]), "--adam_beta2", str(HP["betas"][1]), "--weight_decay", str(WEIGHT_DECAY),
    "--per_device_train_batch_size", str(MICRO), "--max_steps", str(STEPS), "--max_grad_norm", "0",
    "--train_sampling_strategy", "sequential", "--lr_scheduler_type", "cosine",
    "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu",
    "--accelerator_config", '{"use_configured_state": true}',
]
DIST_SCENARIOS = ["cli", "cls", "ds2_dropped", "ds2_swap", "ds2_json"]
ZERO_SCENARIOS = ["ds1_cls", "ds2_cls", "ds3_cls", "ds2_offload", "ds3_json"]


def _launch(tmp_path_factory, scenarios, nproc):
    out = tmp_path_factory.mktemp("trainer")
    args = ["--out", str(out), "--scenarios", ",".join(scenarios), "--output_dir", str(out / "run"), *CLI]
    if nproc == 1:
        run([sys.executable, os.path.join(REPO, "tests/_hf_trainer_worker.py"), *args])
    else:
        torchrun("tests/_hf_trainer_worker.py", *args, nproc=nproc, timeout=400)
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in scenarios}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _launch(tmp_path_factory, ["cli", "cls"], 1)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    return _launch(tmp_path_factory, DIST_SCENARIOS, 2)


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    if not HAVE_SHARDING:
        pytest.skip(NEEDS_SHARDING)
    return _launch(tmp_path_factory, ZERO_SCENARIOS, 2)


def _assert_matches_reference(rec, world):
    assert rec["error"] is None, rec.get("message")
    assert rec["opt_type"] == "MERIT"
    assert len(rec["lrs"]) == STEPS and len(rec["weights"]) == STEPS + 1
    tokens = token_data(STEPS * MICRO * world)
    kw = dict(weight_decay=WEIGHT_DECAY, hp=dict(HP), loss_scale=TRAINER_LOSS_SCALE)
    diffs = reference_check(rec, tokens, MICRO * world, **kw)
    assert max(diffs) <= STEP_ATOL, diffs
    control = reference_check(rec, tokens, MICRO * world, all_decayed=True, **kw)
    assert max(control) > CONTROL_MIN, control  # the comparison can see a wrong decay split


def _assert_decay_split(rec):
    # Trainer's grouping: 10 decayed matrices (wte, wpe, 4 per block), the rest (biases, norms) at 0.
    groups = {wd: names for wd, names in rec["decay"]}
    assert set(groups) == {WEIGHT_DECAY, 0.0}
    assert all(n.endswith("weight") and "ln_" not in n for n in groups[WEIGHT_DECAY])
    assert all(n.endswith("bias") or "ln_" in n for n in groups[0.0])


# ---- registration (in-process) ------------------------------------------------------------
def test_register_trainer_optim_is_idempotent_and_dispatches():
    from transformers import HfArgumentParser, Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    from merit_ds import MERIT
    from merit_ds.integrations.hf_trainer import register_trainer_optim

    register_trainer_optim()
    register_trainer_optim()
    assert OptimizerNames("merit") is OptimizerNames.MERIT
    assert sum(m.value == "merit" for m in OptimizerNames) == 1
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "/tmp/unused", "--optim", "merit", "--optim_args", "beta2=0.95,eps=1e-7,nonfinite_grads=raise",
         "--learning_rate", "0.03", "--report_to", "none"]
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is MERIT
    assert kwargs == {"lr": 0.03, "betas": (args.adam_beta1, 0.95), "eps": 1e-7, "nonfinite_grads": "raise"}
    bad = TrainingArguments(output_dir="/tmp/unused", optim="merit", optim_args="weight_decay=0.1", report_to="none")
    with pytest.raises(ValueError, match="weight_decay"):
        Trainer.get_optimizer_cls_and_kwargs(bad)


def test_register_refuses_changed_internals(monkeypatch):
    import transformers
    from transformers import trainer_optimizer

    from merit_ds.integrations.hf_trainer import TransformersInternalsChanged, register_trainer_optim

    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(TransformersInternalsChanged, match=rf"transformers {transformers.__version__}.*_OPTIMIZER_HANDLERS"):
        register_trainer_optim()


# ---- single process ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cli", "cls"])
def test_single_process_matches_reference(single, name):
    _assert_matches_reference(single[name], world=1)
    _assert_decay_split(single[name])


# ---- DDP, 2 processes (gloo) -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["cli", "cls"])
def test_ddp_matches_reference(dist, name):
    assert dist[name]["world"] == 2
    _assert_matches_reference(dist[name], world=2)
    _assert_decay_split(dist[name])


@pytest.mark.parametrize("name", ["cli", "cls"])
def test_lr_schedule_under_two_processes(dist, name):
    # cosine, no warmup, 3 steps: lr_k = lr * (1 + cos(pi k / 3)) / 2, read from the optimizer
    # that steps, at the start of each step.
    import math

    expected = [HP["lr"] * 0.5 * (1 + math.cos(math.pi * k / STEPS)) for k in range(STEPS)]
    torch.testing.assert_close(dist[name]["lrs"], expected, rtol=1e-12, atol=0)


# ---- DeepSpeed traps (no sharding needed) ----------------------------------------------------
def test_deepspeed_dropped_optimizer_raises(dist):
    rec = dist["ds2_dropped"]
    assert rec["error"] == "DroppedOptimizerError"
    assert "optimizer_cls_and_kwargs" in rec["message"] and rec["weights"] == []


def test_deepspeed_offload_swap_raises(dist):
    rec = dist["ds2_swap"]
    assert rec["error"] == "OffloadSwapError"
    assert "zero_force_ds_cpu_optimizer" in rec["message"] and rec["weights"] == []


def test_deepspeed_json_optimizer_gets_decay_groups(dist):
    # Without the guard the Trainer passes DummyOptim(model.parameters()): one group, all decayed.
    rec = dist["ds2_json"]
    assert rec["opt_type"] == "MERIT"
    _assert_decay_split(rec)
    if not HAVE_SHARDING:  # the verification callback refuses unsharded MERIT before step 1
        assert rec["error"] == "NotMeritError" and "merit_ds.sharding" in rec["message"]
        assert rec["weights"] == []
    else:
        _assert_matches_reference(rec, world=2)


# ---- DeepSpeed ZeRO exactness (needs the sharding layer) -------------------------------------
@pytest.mark.parametrize("name", ZERO_SCENARIOS)
def test_deepspeed_zero_matches_reference(zero, name):
    _assert_matches_reference(zero[name], world=2)
    _assert_decay_split(zero[name])
