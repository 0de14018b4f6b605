"""The training loop's run configuration without processes: ``--optimizer`` against the DeepSpeed
JSON, each optimizer's lr preset and where the banner says it came from, how each optimizer reaches
DeepSpeed; and which optimizer the loop accepts as the one stepping (plain optimizers, no engine)."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch

from merit_ds.integrations.param_groups import DecaySplitError, merit_param_groups
from merit_ds.optim import LAMB, MERIT
from merit_ds.train.loop import parse_args
from merit_ds.train.optimizers import WrongOptimizerError, build_client_optimizer, verify_optimizer_is_stepping
from merit_ds.train.presets import get_optim_preset
from merit_ds.train.run_config import UsageError, resolve

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--seq-len", "32", "--global-batch", "8", "--micro-batch", "2", "--steps", "10",
        "--data", "unused", "--out", "unused"]


def _resolve(*extra, cfg=None, world=2, cpu=True, ds_config=None):
    args = parse_args([*TINY, *extra] + (["--ds-config", ds_config or "cfg.json"] if cfg is not None else []))
    return resolve(args, launcher="deepspeed", world=world, cpu=cpu, base_cfg=copy.deepcopy(cfg))


def _recipe(name: str) -> dict:
    return json.loads((ROOT / "ds_configs" / name).read_text())


def test_default_is_merit_named_in_the_json_with_its_preset_lr():
    rc = _resolve()
    assert rc.optimizer == "merit" and not rc.client
    assert rc.lr == pytest.approx(6.1985385e-3, rel=1e-7)  # MERIT: 1e-2 x 0.5^0.69 = 1e-2 x exp(-0.69 ln 2) = 1e-2 x 0.61985385
    assert rc.ds_config["optimizer"] == {"type": "MERIT", "params": {
        "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1, "lr": rc.lr}}
    assert rc.lr_origin.startswith("preset tiny/merit: 0.01 at batch 16, measured: CPU sweep")
    assert rc.lr_origin.endswith("at batch 8: scaled as batch^0.69 (measured: CPU study, batch 8 -> 64, "
                                 "alpha 0.69 [0.69, 1.02]; extrapolated beyond)")
    assert rc.ds_config["zero_allow_untested_optimizer"] is True
    assert (rc.plan.micro_batch, rc.plan.grad_accum, rc.plan.world) == (2, 2, 2)


def test_lamb_is_a_client_optimizer_with_its_own_preset():
    rc = _resolve("--optimizer", "lamb")
    assert rc.client and "optimizer" not in rc.ds_config
    assert rc.ds_config["zero_allow_untested_optimizer"] is True
    assert rc.lr == pytest.approx(5.5478474e-3, rel=1e-7)  # LAMB: 1e-2 x 0.5^0.85 = 1e-2 x exp(-0.85 ln 2) = 1e-2 x 0.55478474
    assert rc.opt_params == {"betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1, "lr": rc.lr}
    assert "ESTIMATE" in rc.lr_origin and rc.label == "LAMB"


def test_adamw_is_deepspeeds_own_torch_adamw_on_cpu_without_offload():
    rc = _resolve("--optimizer", "adamw")
    assert not rc.client and rc.lr == 3e-3  # AdamW: its measured exponent is 0, the batch-16 lr at batch 8
    assert rc.ds_config["optimizer"] == {"type": "AdamW", "params": {
        "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "lr": rc.lr, "torch_adam": True}}
    assert "zero_allow_untested_optimizer" not in rc.ds_config
    # GPU: DeepSpeed's FusedAdam; offload: DeepSpeedCPUAdam (neither gets torch_adam)
    assert "torch_adam" not in _resolve("--optimizer", "adamw", cpu=False).ds_config["optimizer"]["params"]
    off = _resolve("--optimizer", "adamw", "--offload")
    assert "torch_adam" not in off.ds_config["optimizer"]["params"] and off.offload
    assert "zero_force_ds_cpu_optimizer" not in off.ds_config


@pytest.mark.parametrize("optimizer,lr_480,source", [
    ("merit", {"gpt2-small": 6e-4, "gpt2-medium": 3e-4}, "ESTIMATE"),
    ("lamb", {"gpt2-small": 6e-4, "gpt2-medium": 3e-4}, "ESTIMATE"),
    ("adamw", {"gpt2-small": 6e-4, "gpt2-medium": 3e-4}, "paper value"),
])
def test_gpt2_presets_state_where_the_lr_comes_from(optimizer, lr_480, source):
    for model, lr in lr_480.items():
        preset = get_optim_preset(model, optimizer)
        assert (preset.lr_ref, preset.batch_ref) == (lr, 480) and source in preset.lr_source
        assert (preset.betas, preset.weight_decay, preset.grad_clip, preset.min_lr_ratio) == ((0.9, 0.95), 0.1, 1.0, 0.1)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        get_optim_preset("gpt2-small", "sgd")


def test_lr_origin_flag_and_json():
    assert _resolve("--lr", "0.5").lr_origin == "--lr"
    cfg = _recipe("tiny_b16_zero2_fp32.json")
    args = ["--global-batch", "16", "--micro-batch", "4"]
    rc = _resolve(*args, cfg=cfg, ds_config="ds_configs/tiny_b16_zero2_fp32.json")
    assert rc.lr == cfg["optimizer"]["params"]["lr"] and rc.lr_origin == "from ds_configs/tiny_b16_zero2_fp32.json"
    assert _resolve(*args, "--lr", "0.5", cfg=cfg).lr == 0.5


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_baseline_recipe_configs_resolve_with_their_optimizer(optimizer):
    name = f"gpt2-small_{optimizer}_b480_zero1_bf16.json"
    cfg = _recipe(name)
    args = parse_args(["--model", "gpt2-small", "--optimizer", optimizer, "--ds-config", name, "--data", "d", "--out", "o"])
    rc = resolve(args, launcher="deepspeed", world=32, cpu=False, base_cfg=cfg)
    assert (rc.plan.global_batch, rc.plan.micro_batch, rc.plan.grad_accum, rc.plan.steps) == (480, 15, 1, 97_657)
    assert rc.lr == 6e-4 and rc.lr_origin == f"from {name}" and rc.precision == "bf16" and rc.zero_stage == 1
    assert rc.client == (optimizer == "lamb") and ("optimizer" in rc.ds_config) == (optimizer == "adamw")


@pytest.mark.parametrize("optimizer,json_type,message", [
    ("merit", "AdamW", "names optimizer 'AdamW' \\(adamw\\) but --optimizer is merit: pass --optimizer adamw"),
    ("lamb", "MERIT", "names optimizer 'MERIT' \\(merit\\) but --optimizer is lamb: pass --optimizer merit"),
    ("adamw", "ShardedLAMB", "names optimizer 'ShardedLAMB' \\(lamb\\) but --optimizer is adamw"),
    ("lamb", "Lamb", "DeepSpeed's built-in Lamb \\(FusedLamb\\) computes its trust ratios per ZeRO partition"),
    ("adamw", "Adam", 'the AdamW baseline is named "AdamW"'),
    ("merit", "merit", 'write "type": "MERIT", not "merit"'),
    ("lamb", "shardedlamb", 'write "type": "ShardedLAMB", not "shardedlamb"'),
    ("merit", "SGD", "optimizer type 'SGD': merit_ds.train trains merit, lamb, adamw"),
])
def test_json_must_name_the_chosen_optimizer(optimizer, json_type, message):
    cfg = _recipe("zero2_fp32.json")
    cfg["optimizer"]["type"] = json_type
    with pytest.raises(UsageError, match=message):
        _resolve("--optimizer", optimizer, cfg=cfg)


def test_json_without_optimizer_section_and_lamb_params():
    cfg = _recipe("zero2_fp32.json")
    del cfg["optimizer"]
    for optimizer in ("merit", "lamb"):
        rc = _resolve("--optimizer", optimizer, cfg=cfg)
        assert rc.client and "optimizer" not in rc.ds_config
    rc = _resolve("--optimizer", "adamw", cfg=cfg)  # DeepSpeed's AdamW, section added
    assert rc.ds_config["optimizer"]["type"] == "AdamW" and not rc.client
    cfg = _recipe("zero2_fp32.json")
    cfg["optimizer"] = {"type": "ShardedLAMB", "params": {"max_trust_ratio": 10.0, "eps": 1e-8}}
    rc = _resolve("--optimizer", "lamb", cfg=cfg)
    assert rc.opt_params == {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "max_trust_ratio": 10.0,
                             "lr": rc.lr}
    cfg["optimizer"]["params"]["momentum"] = 0.9
    with pytest.raises(UsageError, match=r"optimizer.params \['momentum'\] are not arguments of LAMB"):
        _resolve("--optimizer", "lamb", cfg=cfg)
    cfg = _recipe("zero2_fp32.json")
    del cfg["optimizer"], cfg["zero_allow_untested_optimizer"]
    with pytest.raises(UsageError, match='ShardedLAMB under ZeRO needs "zero_allow_untested_optimizer": true'):
        _resolve("--optimizer", "lamb", cfg=cfg)
    cfg = dict(_recipe("zero2_offload_fp32.json"), optimizer={"type": "ShardedLAMB", "params": {}})
    del cfg["zero_force_ds_cpu_optimizer"]  # a client optimizer under offload: DeepSpeed would refuse it
    with pytest.raises(UsageError, match='"zero_force_ds_cpu_optimizer": false'):
        _resolve("--optimizer", "lamb", cfg=cfg)


# ----------------------------------------------------------------------------------------------
# which optimizer steps (plain optimizers; the DeepSpeed-wrapped ones in test_recipes_train.py)

@pytest.fixture(scope="module")
def model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=8, vocab_size=16))


def _engine(opt, model):
    return types.SimpleNamespace(optimizer=opt, module=model)


def test_verify_accepts_the_chosen_optimizer_only(model):
    groups = merit_param_groups(model, 0.1)
    adamw, lamb = torch.optim.AdamW(groups, lr=1e-3), LAMB(groups, lr=1e-3)
    assert verify_optimizer_is_stepping(_engine(adamw, model), "adamw") is adamw
    assert verify_optimizer_is_stepping(_engine(lamb, model), "lamb") is lamb
    with pytest.raises(WrongOptimizerError, match="--optimizer lamb: the optimizer stepping the weights is "
                                                  "torch.optim.adamw.AdamW"):
        verify_optimizer_is_stepping(_engine(adamw, model), "lamb")
    with pytest.raises(WrongOptimizerError, match="torch.optim.adam.Adam "):
        verify_optimizer_is_stepping(_engine(torch.optim.Adam(groups), model), "adamw")
    with pytest.raises(WrongOptimizerError, match="merit_ds.optim.merit.MERIT"):
        verify_optimizer_is_stepping(_engine(MERIT(groups), model), "adamw")
    with pytest.raises(WrongOptimizerError, match="--optimizer merit: .*merit_ds.optim.lamb.LAMB"):
        verify_optimizer_is_stepping(_engine(lamb, model), "merit")
    # one group, everything decayed: biases and LayerNorms too
    with pytest.raises(DecaySplitError):
        verify_optimizer_is_stepping(_engine(torch.optim.AdamW(model.parameters(), weight_decay=0.1), model), "adamw")


def test_client_optimizer_gets_the_resolved_hyperparameters(model):
    cfg = _recipe("zero2_fp32.json")
    cfg["optimizer"] = {"type": "ShardedLAMB", "params": {"max_trust_ratio": 10.0}}
    rc = _resolve("--optimizer", "lamb", cfg=cfg)
    opt = build_client_optimizer(rc, merit_param_groups(model, rc.opt_params["weight_decay"]))
    assert isinstance(opt, LAMB)
    g0, g1 = opt.param_groups
    assert (g0["lr"], g0["betas"], g0["eps"], g0["weight_decay"], g0["max_trust_ratio"]) == (
        rc.lr, (0.9, 0.95), 1e-6, 0.1, 10.0)
    assert g1["weight_decay"] == 0.0


@pytest.mark.parametrize("world", [8, 16, 32, 64, 128, 3, 6144])
@pytest.mark.parametrize("model", ["gpt2-small", "gpt2-medium"])
def test_6k_recipe_runs_on_any_world_size_dividing_the_batch(model, world):
    """One recipe JSON, every world size that divides 6144: the micro-batch is the JSON's when it
    divides the per-rank batch, else the largest divisor below it, accumulation re-derived; the
    DeepSpeed config gets the re-planned keys (no refusal at the micro-batch check)."""
    name = f"{model}_b6144_zero1_bf16.json"
    cfg = _recipe(name)
    json_micro = cfg["train_micro_batch_size_per_gpu"]
    args = parse_args(["--model", model, "--ds-config", name, "--data", "d", "--out", "o"])
    rc = resolve(args, launcher="deepspeed", world=world, cpu=False, base_cfg=copy.deepcopy(cfg))
    per_rank = 6144 // world
    want = max(d for d in range(1, min(json_micro, per_rank) + 1) if per_rank % d == 0)  # independent re-derivation
    assert (rc.plan.micro_batch, rc.plan.grad_accum) == (want, per_rank // want)
    assert rc.plan.micro_batch * rc.plan.grad_accum * world == 6144
    ds = rc.ds_config
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        6144, want, per_rank // want)
    assert ("re-planned" in rc.micro_note) == (per_rank % json_micro != 0)
    # --micro-batch overrides the JSON
    args = parse_args(["--model", model, "--ds-config", name, "--data", "d", "--out", "o", "--micro-batch", "1"])
    rc = resolve(args, launcher="deepspeed", world=world, cpu=False, base_cfg=copy.deepcopy(cfg))
    assert (rc.plan.micro_batch, rc.plan.grad_accum, rc.ds_config["train_micro_batch_size_per_gpu"]) == (1, per_rank, 1)
    assert rc.micro_note == ("" if json_micro == 1 else f"micro-batch 1 from --micro-batch (the config says {json_micro})")


@pytest.mark.parametrize("lr", ["nan", "-1e-3", "inf"])
def test_nan_or_negative_lr_is_a_usage_error(lr):
    with pytest.raises(UsageError, match=r"peak lr .* \(--lr\) must be a finite number >= 0"):
        _resolve(f"--lr={lr}")
    cfg = {"optimizer": {"type": "MERIT", "params": {"lr": float(lr)}}, "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True}
    with pytest.raises(UsageError, match=r"peak lr .* \(from cfg.json\) must be a finite number >= 0"):
        _resolve(cfg=cfg)


def test_fp16_config_on_cpu_points_to_bf16(monkeypatch):
    """Refused exactly where DeepSpeed's CPU accelerator refuses fp16 (its own
    is_fp16_supported: oneDNN fp16 kernels), accepted where it does not."""
    import merit_ds.train.run_config as run_config
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    assert accelerator.device_name() == "cpu"
    cfg = {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: None)  # what this project's CPU says
    assert run_config.cpu_supports_fp16() is False
    with pytest.raises(UsageError, match=r'enables fp16, which DeepSpeed\'s CPU accelerator refuses on this CPU .*'
                                         r'use "bf16"'):
        _resolve(cfg=cfg)
    assert _resolve(cfg=cfg, cpu=False).optimizer == "merit"  # on a GPU fp16 is DeepSpeed's business
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: True)  # a CPU with oneDNN fp16
    assert _resolve(cfg=cfg).ds_config["fp16"]["enabled"] is True


@pytest.mark.parametrize("lr", ["auto", None, [0.1], True])
def test_json_lr_that_is_not_a_number_is_a_usage_error(lr):
    cfg = {"optimizer": {"type": "MERIT", "params": {"lr": lr}}, "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True}
    if lr is None:  # no lr in the JSON: the preset's, 1e-2 at batch 16 scaled to 8 by MERIT's 0.69
        assert _resolve(cfg=cfg).lr == pytest.approx(0.0061985385)  # 1e-2 x 0.5^0.69
        return
    with pytest.raises(UsageError, match=r'cfg.json: "optimizer": \{"params": \{"lr": .*\}\} is not a number'):
        _resolve(cfg=cfg)
    assert _resolve("--lr", "0.004", cfg=cfg).lr == 0.004  # --lr wins over the JSON


def test_json_naming_merit_under_offload_needs_no_force_key():
    """DeepSpeed asks for "zero_force_ds_cpu_optimizer": false only for client optimizers; a
    JSON naming MERIT with offload_optimizer runs as written, and the loop accepts it."""
    cfg = _recipe("zero2_offload_fp32.json")
    cfg.pop("zero_force_ds_cpu_optimizer", None)
    cfg["optimizer"] = {"type": "MERIT", "params": {}}
    rc = _resolve(cfg=cfg)
    assert rc.optimizer == "merit" and not rc.client and rc.offload
    assert rc.ds_config["optimizer"]["type"] == "MERIT" and "zero_force_ds_cpu_optimizer" not in rc.ds_config
    del cfg["optimizer"]  # the same config with MERIT as a client optimizer: DeepSpeed would refuse it
    with pytest.raises(UsageError, match='"zero_force_ds_cpu_optimizer": false'):
        _resolve(cfg=cfg)


@pytest.mark.parametrize("key", ["momentum", "torch_adam", "adam_w_mode"])
def test_unknown_merit_json_params_name_the_key_and_the_accepted_ones(key):
    cfg = _recipe("zero2_fp32.json")
    cfg["optimizer"] = {"type": "MERIT", "params": {key: True}}
    with pytest.raises(UsageError) as err:
        _resolve(cfg=cfg)
    msg = str(err.value)
    assert f"params key '{key}'" in msg
    accepted = msg.split("accepted: ")[1].split(" (")[0].split(". ")[0].split(", ")
    from merit_ds.integrations.deepspeed import accepted_params

    assert accepted == accepted_params(MERIT) and {"lr", "betas", "eps", "weight_decay"} <= set(accepted)


@pytest.mark.parametrize("key", ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"])
def test_batch_keys_must_be_numbers_not_strings(key):
    """issue #23: ``"train_batch_size": "16"`` was reported as a comparison of '16' with 16."""
    cfg = _recipe("zero2_fp32.json")
    cfg[key] = "16"
    with pytest.raises(UsageError, match=f'{key} must be a whole number of sequences or "auto", got \'16\' \\(str\\); '
                                         f'write "{key}": 16 without quotes'):
        _resolve(cfg=cfg)


def test_a_misspelled_deepspeed_key_is_named_with_the_nearest_one():
    cfg = _recipe("zero2_fp32.json")
    cfg["zero_optimisation"] = cfg.pop("zero_optimization")
    with pytest.raises(UsageError, match='"zero_optimisation" is not a DeepSpeed key \\(did you mean "zero_optimization"\\?\\)'):
        _resolve(cfg=cfg)


def test_client_optimizer_values_are_checked_by_its_own_rules():
    """LAMB reaches DeepSpeed as a client optimizer the loop builds: a bad value in the JSON's params
    is LAMB's own message before anything is built, as for the JSON-named MERIT (check_config)."""
    cfg = _recipe("zero2_fp32.json")
    cfg["optimizer"] = {"type": "ShardedLAMB", "params": {"eps": "1e-6"}}
    with pytest.raises(UsageError, match=r"LAMB's hyperparameters: eps must be a number, got '1e-6' \(str\)"):
        _resolve("--optimizer", "lamb", cfg=cfg)
