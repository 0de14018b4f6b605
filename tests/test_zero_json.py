"""MERIT by name in DeepSpeed's JSON config, through the real ``deepspeed`` launcher; config checks."""

import pytest
import torch

import merit_ds
from _dist import REPO_ROOT, TESTS_DIR, launch
from merit_ds.integrations.deepspeed import MeritConfigError, check_config


@pytest.mark.parametrize(
    "config, wrapper",
    [("zero2_merit_fp32.json", "DeepSpeedZeroOptimizer"), ("zero3_merit_bf16_offload.json", "DeepSpeedZeroOptimizer_Stage3")],
)
def test_json_config_name_through_deepspeed_launcher(config, wrapper):
    res = launch(TESTS_DIR / "zero_json_script.py", 2, ["--ds_config", str(REPO_ROOT / "ds_configs" / "examples" / config)],
                 launcher="deepspeed", timeout=300)
    assert res["world"] == 2
    assert res["basic_optimizer"] == "MERIT" and res["wrapper"] == wrapper
    assert res["sharded_groups"] == 1
    assert res["stats_all_reduces"] == 4  # one per step() call, 4 steps
    assert res["hyperparameters"] == {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}
    assert all(0 < l < 10 for l in res["losses"])


def test_import_registers_json_name():
    assert torch.optim.MERIT is merit_ds.MERIT


BASE = {"optimizer": {"type": "MERIT", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}


def test_check_config_requires_untested_optimizer_flag():
    with pytest.raises(MeritConfigError, match='"zero_allow_untested_optimizer": true'):
        check_config(BASE)
    check_config({**BASE, "zero_allow_untested_optimizer": True})
    check_config({**BASE, "zero_optimization": {"stage": 0}})  # no ZeRO: nothing to allow


def test_check_config_offload_needs_force_ds_cpu_optimizer_false():
    cfg = {**BASE, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(MeritConfigError, match='"zero_force_ds_cpu_optimizer": false'):
        check_config(cfg)
    check_config({**cfg, "zero_force_ds_cpu_optimizer": False})
    with pytest.raises(MeritConfigError, match="nvme"):
        check_config({**cfg, "zero_force_ds_cpu_optimizer": False,
                      "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})


def test_check_config_case_and_client_optimizer():
    with pytest.raises(MeritConfigError, match='"type": "MERIT"'):
        check_config({"optimizer": {"type": "merit"}})
    check_config({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}})  # not ours
    with pytest.raises(MeritConfigError):
        check_config({"zero_optimization": {"stage": 1}}, client_optimizer=True)


def _json_files_on_disk(root) -> list:
    """Independent count: os.walk, not the glob under test."""
    import os

    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".json"))


def test_shipped_configs_pass_the_check():
    """Every JSON under ds_configs/ (examples/ included) is a MERIT config that passes the check,
    and the check has teeth on each: without ``zero_allow_untested_optimizer`` it raises."""
    import json

    paths = sorted((REPO_ROOT / "ds_configs").rglob("*.json"))
    assert len(paths) > 0
    assert [str(p) for p in paths] == _json_files_on_disk(REPO_ROOT / "ds_configs")
    for path in paths:
        cfg = json.loads(path.read_text())
        names_merit = cfg.get("optimizer", {}).get("type") == "MERIT"
        # a config without "optimizer" gets MERIT as a client optimizer (merit_ds.train)
        assert names_merit or "optimizer" not in cfg, path
        check_config(path, client_optimizer=not names_merit)
        if int(cfg.get("zero_optimization", {}).get("stage", 0)) > 0:
            broken = {k: v for k, v in cfg.items() if k != "zero_allow_untested_optimizer"}
            with pytest.raises(MeritConfigError, match="zero_allow_untested_optimizer"):
                check_config(broken, client_optimizer=not names_merit)


def test_configs_named_in_docs_and_launch_files_exist():
    """README and launch/ refer to configs by path: each must be shipped."""
    import re

    texts = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "launch").iterdir())]
    named = {m for t in texts if t.is_file() for m in re.findall(r"ds_configs/[\w./-]+\.json", t.read_text())}
    assert len(named) >= 5
    missing = sorted(n for n in named if not (REPO_ROOT / n).is_file())
    assert missing == []


def test_flat_tensor_without_deepspeed_raises_instead_of_falling_back():
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = merit_ds.MERIT([w], lr=0.1)
    flat = torch.nn.Parameter(torch.randn(12))
    flat.grad = torch.randn(12)
    opt.param_groups[0]["params"] = [flat]  # what a sharding wrapper does
    with pytest.raises(merit_ds.ShardingLayoutError, match="never treats a flat partition as one vector"):
        opt.step()


def test_attach_rejects_what_it_cannot_use():
    opt = merit_ds.MERIT([torch.nn.Parameter(torch.randn(2, 2))])
    with pytest.raises(TypeError, match="DeepSpeedEngine"):
        merit_ds.attach(opt, object())


@pytest.mark.parametrize("value, refused", [(False, False), (True, True), ("false", True), (0, False)])
def test_force_ds_cpu_optimizer_read_like_deepspeed(value, refused):
    """DeepSpeed and Accelerate read the key with plain truthiness: the string "false" is on."""
    from merit_ds.integrations._common import OffloadSwapError, refuse_offload_swap

    cfg = {**BASE, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": value,
           "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    if refused:
        with pytest.raises(MeritConfigError, match="zero_force_ds_cpu_optimizer"):
            check_config(cfg)
        with pytest.raises(OffloadSwapError):
            refuse_offload_swap(cfg)
    else:
        check_config(cfg)
        refuse_offload_swap(cfg)
