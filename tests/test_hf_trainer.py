"""HF Trainer with MERIT and LAMB: registration, every path against a plain single-process
MERIT/LAMB reference, the traps.

Multi-process paths run as one ``torchrun --nproc_per_node 2`` job (gloo, CPU) executing several
scenarios in turn (tests/_hf_trainer_worker.py); the tests read what rank 0 recorded.

Tolerances (stated once): the reference re-runs each recorded step from the recorded weights
(tests/_hf_common.py). DDP-averaged vs. one-process gradients differ in the last bits only, so
each step must agree to ``STEP_ATOL = 1e-6`` (measured ~5e-8 at step 1, ~4e-9 later); the
negative control (everything decayed, as with one flat parameter list) differs by > 1e-3.
LAMB (scenarios ending in ``_lamb``: ``optimizer_cls_and_kwargs=(LAMB, ...)``,
``optim="sharded_lamb"``, ``"type": "ShardedLAMB"``) is held to the same tolerances against
plain ``merit_ds.LAMB``.
"""

from __future__ import annotations

import pytest
import torch

from _hf_common import HP, SEQ, WEIGHT_DECAY, reference_check, token_data
from _dist import launch
from _hf_launch import run_python

STEP_ATOL = 1e-6
CONTROL_MIN = 1e-3
STEPS, MICRO = 3, 2  # as in the worker
# The Trainer divides the summed token loss by the number of label tokens (B*L), while the
# model's own mean runs over the B*(L-1) shifted targets: its gradient is (L-1)/L of the mean
# loss's. The reference uses the same convention.
TRAINER_LOSS_SCALE = (SEQ - 1) / SEQ

CLI = [
    "--optim", "merit", "--optim_args", "eps=1e-6",  # the command-line opt-in under test
    "--adam_epsilon", str(HP["eps"]),  # what "eps": "auto" becomes in the DeepSpeed JSON
    "--learning_rate", str(HP["lr"]), "--adam_beta2", str(HP["betas"][1]), "--weight_decay", str(WEIGHT_DECAY),
    "--per_device_train_batch_size", str(MICRO), "--max_steps", str(STEPS), "--max_grad_norm", "0",
    "--train_sampling_strategy", "sequential", "--lr_scheduler_type", "cosine",
    "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu",
    "--accelerator_config", '{"use_configured_state": true}',
]
# ds<stage>_<kind>: cls = optimizer_cls_and_kwargs, cli = optim="merit", json = "optimizer": {"type": "MERIT"} in the
# DeepSpeed config, offload = cls + offload_optimizer cpu (+ zero_force_ds_cpu_optimizer: false)
ZERO_SCENARIOS = ["ds1_cls", "ds2_cls", "ds3_cls", "ds2_offload", "ds2_json", "ds3_json", "ds3_cli"]
# The same paths with LAMB (a trailing "_lamb": optim="sharded_lamb", "type": "ShardedLAMB").
LAMB_ZERO_SCENARIOS = ["ds3_cls_lamb", "ds2_offload_lamb", "ds2_json_lamb", "ds2_cli_lamb"]
DIST_SCENARIOS = ["cli", "cls", "clip", "ds2_clip", "ds2_dropped", "ds2_swap", *ZERO_SCENARIOS,
                  "cls_lamb", "ds2_dropped_lamb", "ds2_swap_lamb", *LAMB_ZERO_SCENARIOS]
CLIP = 0.05  # as in the worker: max_grad_norm small enough that every step clips


def _launch(tmp_path_factory, scenarios, nproc):
    out = tmp_path_factory.mktemp("trainer")
    args = ["--out", str(out), "--scenarios", ",".join(scenarios), "--output_dir", str(out / "run"), *CLI]
    if nproc == 1:
        run_python("tests/_hf_trainer_worker.py", *args)
    else:
        launch("tests/_hf_trainer_worker.py", nproc, args, timeout=400)
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in scenarios}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _launch(tmp_path_factory, ["cli", "cls", "cli_lamb"], 1)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    return _launch(tmp_path_factory, DIST_SCENARIOS, 2)


def _optimizer(rec):
    return "LAMB" if rec["name"].endswith("_lamb") else "MERIT"


def _assert_matches_reference(rec, world, clip=0.0):
    assert rec["error"] is None, rec.get("message")
    assert rec["opt_type"] == _optimizer(rec)
    assert len(rec["lrs"]) == STEPS and len(rec["weights"]) == STEPS + 1
    tokens = token_data(STEPS * MICRO * world)
    kw = dict(weight_decay=WEIGHT_DECAY, hp=dict(HP), loss_scale=TRAINER_LOSS_SCALE, clip=clip,
              optimizer=_optimizer(rec))
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

    from merit_ds import LAMB, MERIT
    from merit_ds.integrations.hf_trainer import register_trainer_optim

    register_trainer_optim()
    register_trainer_optim()
    assert OptimizerNames("merit") is OptimizerNames.MERIT
    assert sum(m.value == "merit" for m in OptimizerNames) == 1
    assert OptimizerNames("sharded_lamb") is OptimizerNames.SHARDED_LAMB
    assert sum(m.value == "sharded_lamb" for m in OptimizerNames) == 1
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
    with pytest.raises(ValueError, match="max_trust_ratio"):  # a LAMB-only key: listed as not accepted by MERIT
        Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(
            output_dir="/tmp/unused", optim="merit", optim_args="max_trust_ratio=10", report_to="none"))
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "/tmp/unused", "--optim", "sharded_lamb", "--optim_args",
         "beta2=0.95,max_trust_ratio=10,bias_correction=false", "--learning_rate", "0.002", "--report_to", "none"]
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is LAMB
    assert kwargs == {"lr": 0.002, "betas": (args.adam_beta1, 0.95), "eps": args.adam_epsilon,
                      "max_trust_ratio": 10.0, "bias_correction": False}


def test_register_refuses_changed_internals(monkeypatch):
    import transformers
    from transformers import trainer_optimizer

    from merit_ds.integrations.hf_trainer import TransformersInternalsChanged, register_trainer_optim

    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(TransformersInternalsChanged, match=rf"transformers {transformers.__version__}.*_OPTIMIZER_HANDLERS"):
        register_trainer_optim()


# ---- single process ------------------------------------------------------------------------
@pytest.mark.slow  # a launched Trainer job
@pytest.mark.parametrize("name", ["cli", "cls", "cli_lamb"])
def test_single_process_matches_reference(single, name):
    _assert_matches_reference(single[name], world=1)
    _assert_decay_split(single[name])


# ---- DDP, 2 processes (gloo) -----------------------------------------------------------------
@pytest.mark.slow  # torchrun, 2 ranks
@pytest.mark.parametrize("name", ["cli", "cls", "cls_lamb"])
def test_ddp_matches_reference(dist, name):
    assert dist[name]["world"] == 2
    _assert_matches_reference(dist[name], world=2)
    _assert_decay_split(dist[name])


@pytest.mark.slow  # torchrun, 2 ranks
@pytest.mark.parametrize("name", ["cli", "cls", "ds2_cls", "ds3_json", "ds2_json_lamb"])
def test_lr_schedule_under_two_processes(dist, name):
    # cosine, no warmup, 3 steps: lr_k = lr * (1 + cos(pi k / 3)) / 2, read from the optimizer
    # that steps, at the start of each step: cos 0 = 1, cos 60 deg = 0.5, cos 120 deg = -0.5 ->
    # lr x 1, 0.75, 0.25
    assert STEPS == 3
    expected = [HP["lr"] * r for r in (1.0, 0.75, 0.25)]
    torch.testing.assert_close(dist[name]["lrs"], expected, rtol=1e-12, atol=0)


# ---- DeepSpeed: the traps, then ZeRO 1/2/3 exactness -----------------------------------------
@pytest.mark.slow  # torchrun, 2 ranks
@pytest.mark.parametrize("name", ["ds2_dropped", "ds2_dropped_lamb"])
def test_deepspeed_dropped_optimizer_raises(dist, name):
    rec = dist[name]
    assert rec["error"] == "DroppedOptimizerError"
    assert "optimizer_cls_and_kwargs" in rec["message"] and rec["weights"] == []
    assert _optimizer(rec) in rec["message"]


@pytest.mark.slow  # torchrun, 2 ranks
@pytest.mark.parametrize("name", ["ds2_swap", "ds2_swap_lamb"])
def test_deepspeed_offload_swap_raises(dist, name):
    rec = dist[name]
    assert rec["error"] == "OffloadSwapError"
    assert "zero_force_ds_cpu_optimizer" in rec["message"] and rec["weights"] == []
    assert f"not {_optimizer(rec)}" in rec["message"]


@pytest.mark.slow  # torchrun, 2 ranks
@pytest.mark.parametrize("name", ZERO_SCENARIOS + LAMB_ZERO_SCENARIOS)
def test_deepspeed_zero_matches_reference(dist, name):
    rec = dist[name]
    assert rec["split"], "no matrix is split across the ranks: the test would not exercise sharding"
    # The JSON cases also check the trap fix: the Trainer alone passes DummyOptim(flat list),
    # every parameter decayed; the guard hands DeepSpeed the Trainer's decay groups.
    _assert_decay_split(rec)
    _assert_matches_reference(rec, world=2)


# ---- the guard is armed by `import merit_ds` alone ---------------------------------------------
@pytest.mark.slow  # fresh interpreters
def test_import_merit_ds_arms_trainer_guard_in_either_order():
    code = (
        "import sys\n"
        "{first}\n{second}\n"
        "import transformers.trainer as tm\n"
        "assert 'transformers' in sys.modules\n"
        "print(getattr(tm.deepspeed_init, '__merit_ds_guard__', False))\n"
    )
    import subprocess
    import sys

    from _dist import dist_env

    for first, second in [("import merit_ds", "from transformers import Trainer"),
                          ("import transformers.trainer", "import merit_ds")]:
        out = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)], env=dist_env(),
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().endswith("True"), (first, out.stdout, out.stderr[-2000:])


@pytest.mark.slow  # a fresh interpreter
def test_import_merit_ds_does_not_import_transformers():
    import subprocess
    import sys

    from _dist import dist_env

    code = "import sys, merit_ds; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=dist_env(), capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.slow  # torchrun, 2 ranks
@pytest.mark.parametrize("name", ["clip", "ds2_clip"])
def test_gradient_clipping_matches_reference(dist, name):
    # DDP: the Trainer's clip_grad_norm_; ZeRO 2: DeepSpeed's gradient_clipping ("auto" <- max_grad_norm).
    rec = dist[name]
    _assert_matches_reference(rec, world=2, clip=CLIP)
    unclipped = reference_check(rec, token_data(STEPS * MICRO * 2), MICRO * 2, weight_decay=WEIGHT_DECAY, hp=dict(HP),
                                loss_scale=TRAINER_LOSS_SCALE)
    assert max(unclipped) > 10 * STEP_ATOL, unclipped  # clipping really changed the steps
