"""MERIT and LAMB by name in DeepSpeed's JSON config, through the real ``deepspeed`` launcher,
against a plain single-process reference; config checks.

Reference protocol (as tests/_hf_common.py): the script records the full fp32 weights before
every step; the test re-runs each step in one process from those weights (global batch = both
ranks' micro-batches, clipped at the config's ``gradient_clipping``) with plain ``merit_ds.MERIT``
/ ``merit_ds.LAMB`` and its own moments, and compares with the weights recorded after the step.
fp32 configs only (under bf16 the forward itself differs from an fp32 reference).
Tolerance ``STEP_ATOL = 1e-6``, as in test_hf_trainer.py; the negative control (one trust ratio
for all parameters, as an optimizer that sees one flat partition computes) differs by > 1e-3.
"""

import json
import re

import pytest
import torch

import merit_ds
from merit_ds import MERIT
from _dist import REPO_ROOT, TESTS_DIR, launch
from merit_ds.integrations.deepspeed import MeritConfigError, check_config

EXAMPLES = REPO_ROOT / "ds_configs" / "examples"
STEP_ATOL, CONTROL_MIN, STEPS = 1e-6, 1e-3, 4  # STEPS as in the script
# config -> (basic optimizer, ZeRO wrapper, compared numerically with the reference)
JSON_RUNS = {
    "zero2_merit_fp32.json": ("MERIT", "DeepSpeedZeroOptimizer", True),
    "zero3_merit_bf16_offload.json": ("MERIT", "DeepSpeedZeroOptimizer_Stage3", False),
    "zero2_shardedlamb_fp32.json": ("LAMB", "DeepSpeedZeroOptimizer", True),
    "zero3_shardedlamb_offload_fp32.json": ("LAMB", "DeepSpeedZeroOptimizer_Stage3", True),
}


@pytest.fixture(scope="module")
def json_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("json")
    res = launch(TESTS_DIR / "zero_json_script.py", 2, ["--ds_config", *(str(EXAMPLES / c) for c in JSON_RUNS)],
                 launcher="deepspeed", timeout=400, env={"MERIT_TEST_RECORD": str(out)})
    return res, out


def _reference(config: dict, weights: list, optimizer: str, *, flat: bool = False) -> list[float]:
    """Per step: max |recorded - reference| after the step (``flat``: the negative control)."""
    from zero_worker import VOCAB, Tiny

    model = Tiny()
    named = dict(model.named_parameters())
    params = config["optimizer"]["params"]
    flat_p = torch.nn.Parameter(torch.zeros(sum(p.numel() for p in named.values())))
    opt = getattr(merit_ds, optimizer)([flat_p] if flat else model.parameters(), **params)
    diffs = []
    for step in range(STEPS):
        with torch.no_grad():
            for n, w in weights[step].items():
                named[n].copy_(w)
        x = torch.cat([torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(step * 100 + r))
                       for r in range(2)])
        model.zero_grad()
        model(x, (x * 3 + 1) % VOCAB).backward()
        if config.get("gradient_clipping", 1.0):
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.get("gradient_clipping", 1.0))
        if flat:
            with torch.no_grad():
                flat_p.copy_(torch.cat([p.detach().reshape(-1) for p in named.values()]))
            flat_p.grad = torch.cat([p.grad.reshape(-1) for p in named.values()])
            opt.step()
            after = torch.cat([w.reshape(-1) for w in weights[step + 1].values()])
            diffs.append(float((flat_p.detach() - after).abs().max()))
        else:
            opt.step()
            diffs.append(max(float((named[n].detach() - w).abs().max()) for n, w in weights[step + 1].items()))
    return diffs


@pytest.mark.slow  # the deepspeed launcher, 2 ranks
@pytest.mark.parametrize("config", list(JSON_RUNS))
def test_json_config_name_through_deepspeed_launcher(json_runs, config):
    results, out = json_runs
    res = results[config]
    optimizer, wrapper, numeric = JSON_RUNS[config]
    cfg = json.loads((EXAMPLES / config).read_text())
    assert res["world"] == 2
    assert res["basic_optimizer"] == optimizer and res["wrapper"] == wrapper
    assert res["sharded_groups"] == 1
    assert res["stats_all_reduces"] == STEPS  # one per step() call
    params = cfg["optimizer"]["params"]
    assert res["hyperparameters"] == {k: params[k] for k in ("lr", "betas", "eps", "weight_decay")}
    assert all(0 < l < 10 for l in res["losses"])
    if numeric:
        weights = torch.load(out / config.replace(".json", ".pt"))["weights"]
        diffs = _reference(cfg, weights, optimizer)
        control = _reference(cfg, weights, optimizer, flat=True)
        print(f"{config}: max step diff vs reference {max(diffs):.2e}, negative control {max(control):.2e}")
        assert max(diffs) <= STEP_ATOL, diffs
        assert max(control) > CONTROL_MIN, control


def test_import_registers_json_name():
    assert torch.optim.MERIT is merit_ds.MERIT
    assert torch.optim.ShardedLAMB is merit_ds.LAMB


BASE = {"optimizer": {"type": "MERIT", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}


def test_check_config_requires_untested_optimizer_flag():
    with pytest.raises(MeritConfigError, match='"zero_allow_untested_optimizer": true'):
        check_config(BASE)
    check_config({**BASE, "zero_allow_untested_optimizer": True})
    check_config({**BASE, "zero_optimization": {"stage": 0}})  # no ZeRO: nothing to allow


def test_check_config_offload_needs_force_ds_cpu_optimizer_false_for_client_optimizers_only():
    cfg = {**BASE, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    # Named in the JSON: DeepSpeed builds it itself and enforces the key for client optimizers
    # only (engine.py:2342-2346); Accelerate swaps client optimizers only. So: accepted (and run
    # exactly through the deepspeed launcher: zero3_shardedlamb_offload_fp32.json has no such key).
    check_config(cfg)
    check_config({**cfg, "optimizer": {"type": "ShardedLAMB"}})
    client = {k: v for k, v in cfg.items() if k != "optimizer"}
    for opt in (True, merit_ds.MERIT, merit_ds.LAMB([torch.nn.Parameter(torch.ones(2))])):
        with pytest.raises(MeritConfigError, match='client .*"zero_force_ds_cpu_optimizer": false.*client optimizers only'):
            check_config(client, client_optimizer=opt)
    check_config({**client, "zero_force_ds_cpu_optimizer": False}, client_optimizer=True)
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
    """Every JSON under ds_configs/ (examples/ included) is a MERIT or ShardedLAMB config that
    passes the check, and the check has teeth on each: without ``zero_allow_untested_optimizer``
    it raises. The AdamW baseline recipes name DeepSpeed's own AdamW, which needs no such key."""
    import json

    paths = sorted((REPO_ROOT / "ds_configs").rglob("*.json"))
    assert len(paths) > 0
    assert [str(p) for p in paths] == _json_files_on_disk(REPO_ROOT / "ds_configs")
    assert any("shardedlamb" in p.name for p in paths)
    for path in paths:
        cfg = json.loads(path.read_text())
        if cfg.get("optimizer", {}).get("type") == "AdamW":  # --optimizer adamw recipes: DeepSpeed's own
            assert "_adamw_" in path.name and "zero_allow_untested_optimizer" not in cfg, path
            check_config(path)
            continue
        names_merit = cfg.get("optimizer", {}).get("type") in ("MERIT", "ShardedLAMB")
        # a config without "optimizer" gets MERIT as a client optimizer (merit_ds.train)
        assert names_merit or "optimizer" not in cfg, path
        check_config(path, client_optimizer=not names_merit)
        if int(cfg.get("zero_optimization", {}).get("stage", 0)) > 0:
            broken = {k: v for k, v in cfg.items() if k != "zero_allow_untested_optimizer"}
            with pytest.raises(MeritConfigError, match="zero_allow_untested_optimizer"):
                check_config(broken, client_optimizer=not names_merit)


def test_configs_named_in_docs_and_launch_files_exist():
    """README, docs/ and launch/ refer to configs by path: each must be shipped."""
    import re

    texts = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("**/*.md")),
             *sorted((REPO_ROOT / "launch").iterdir())]
    named = {m for t in texts if t.is_file() for m in re.findall(r"ds_configs/[\w./-]+\.json", t.read_text())}
    assert len(named) >= 5
    missing = sorted(n for n in named if not (REPO_ROOT / n).is_file())
    assert missing == []


LAMB_BASE = {"optimizer": {"type": "ShardedLAMB", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}


def test_check_config_sharded_lamb_like_merit():
    with pytest.raises(MeritConfigError, match='ShardedLAMB under ZeRO needs "zero_allow_untested_optimizer": true'):
        check_config(LAMB_BASE)
    ok = {**LAMB_BASE, "zero_allow_untested_optimizer": True}
    check_config(ok)
    with pytest.raises(MeritConfigError, match='write "type": "ShardedLAMB", not "shardedlamb"'):
        check_config({**ok, "optimizer": {"type": "shardedlamb"}})
    with pytest.raises(MeritConfigError, match='"type": "ShardedLAMB", not "Shardedlamb"'):
        check_config({**ok, "optimizer": {"type": "Shardedlamb"}})
    offload = {**ok, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(MeritConfigError, match="nvme"):
        check_config({**offload, "zero_force_ds_cpu_optimizer": False,
                      "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})
    with pytest.raises(MeritConfigError, match="gradient_clipping"):
        check_config({**ok, "optimizer": {"type": "ShardedLAMB", "params": {"max_grad_norm": 1.0}}})
    with pytest.raises(MeritConfigError, match='LAMB under ZeRO needs'):  # a client LAMB instance
        check_config({"zero_optimization": {"stage": 1}}, client_optimizer=merit_ds.LAMB)


@pytest.mark.parametrize("name", ["lamb", "Lamb", "LAMB"])
def test_check_config_explains_deepspeeds_fused_lamb(name):
    cfg = {**LAMB_BASE, "zero_allow_untested_optimizer": True, "optimizer": {"type": name}}
    with pytest.raises(MeritConfigError, match=r'FusedLamb.*CUDA-only.*per\s+flat partition.*"type": "ShardedLAMB"'):
        check_config(cfg)
    check_config({**cfg, "zero_optimization": {"stage": 0}})  # without ZeRO FusedLamb is LAMB (on CUDA): not ours


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
    check_config(cfg)  # named in the JSON: the key does not matter
    if refused:
        with pytest.raises(MeritConfigError, match="zero_force_ds_cpu_optimizer"):
            check_config(cfg, client_optimizer=True)
        with pytest.raises(OffloadSwapError):
            refuse_offload_swap(cfg)
    else:
        check_config(cfg, client_optimizer=True)
        refuse_offload_swap(cfg)


@pytest.mark.parametrize("name, cls", [("MERIT", merit_ds.MERIT), ("ShardedLAMB", merit_ds.LAMB)])
def test_check_config_names_unknown_params_and_the_accepted_ones(name, cls):
    import inspect

    from merit_ds.integrations.deepspeed import accepted_params

    # derived from the constructor: every keyword it takes, nothing else
    assert accepted_params(cls) == [n for n in inspect.signature(cls).parameters if n != "params"]
    ok = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    check_config({**ok, "optimizer": {"type": name, "params": {k: "auto" for k in accepted_params(cls)}}})
    for bad in ({"lr": 1e-3, "momentum": 0.9}, {"lr": 1e-3, "torch_adam": True, "adam_w_mode": True}):
        cfg = {**ok, "optimizer": {"type": name, "params": bad}}
        unknown = [k for k in bad if k != "lr"]
        with pytest.raises(MeritConfigError) as info:
            check_config(cfg)
        msg = str(info.value)
        assert all(repr(k) in msg for k in unknown) and "accepted: " + ", ".join(accepted_params(cls)) in msg
        with pytest.raises(TypeError):  # what DeepSpeed would hit inside deepspeed.initialize
            cls([torch.nn.Parameter(torch.ones(2))], **bad)
    if cls is merit_ds.MERIT:  # a LAMB-only key is unknown to MERIT
        with pytest.raises(MeritConfigError, match="'max_trust_ratio'"):
            check_config({**ok, "optimizer": {"type": name, "params": {"max_trust_ratio": 10}}})


def test_unknown_params_refused_before_the_engine_on_every_path():
    """The Trainer guard and prepare_with_merit run check_config before DeepSpeed starts."""
    from types import SimpleNamespace

    from merit_ds.integrations.accelerate import check_before_prepare
    from merit_ds.integrations.hf_trainer import _guarded_deepspeed_init

    cfg = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
           "optimizer": {"type": "ShardedLAMB", "params": {"lr": 1e-3, "adam_w_mode": True}}}
    plugin = SimpleNamespace(hf_ds_config=SimpleNamespace(config=cfg), deepspeed_config=cfg)
    state = SimpleNamespace(deepspeed_plugin=plugin)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(state=state), optimizer=None,
                              optimizer_cls_and_kwargs=None, args=SimpleNamespace(optim="adamw_torch"))

    def original(*a, **k):
        raise AssertionError("reached DeepSpeed")

    with pytest.raises(MeritConfigError, match="'adam_w_mode'"):
        _guarded_deepspeed_init(original, trainer, 10)
    from accelerate.utils import DummyOptim

    with pytest.raises(MeritConfigError, match="'adam_w_mode'"):
        check_before_prepare(SimpleNamespace(state=state), DummyOptim([torch.nn.Parameter(torch.ones(2))]))


# ----------------------------------------------------------------------------------------------
# deepspeed.initialize checks a config naming MERIT/ShardedLAMB (any case) before building


def test_import_merit_ds_makes_deepspeed_initialize_check_the_config(tmp_path):
    """Armed by ``import merit_ds`` (deepspeed imported here); the wrapper raises before DeepSpeed
    does anything (no process group exists in this process, and none is created)."""
    import argparse

    import deepspeed
    import torch.distributed as dist

    assert getattr(deepspeed.initialize, "_merit_ds_checked", False)
    model = torch.nn.Linear(2, 2)
    base = {"train_batch_size": 2, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    with pytest.raises(MeritConfigError, match='write "type": "MERIT", not "merit"'):
        deepspeed.initialize(model=model, config=dict(base, optimizer={"type": "merit", "params": {}}))
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(dict(base, optimizer={"type": "MERIT", "params": {"lr": 1e-3, "momentum": 0.9}})))
    with pytest.raises(MeritConfigError, match=r"does not accept params key 'momentum'; accepted: lr, betas, eps"):
        deepspeed.initialize(model=model, config=str(path))  # a path
    with pytest.raises(MeritConfigError, match=r"params key 'momentum'"):  # the old keyword
        deepspeed.initialize(model=model, config_params=json.loads(path.read_text()))
    with pytest.raises(MeritConfigError, match=r"params key 'momentum'"):  # args.deepspeed_config
        deepspeed.initialize(args=argparse.Namespace(deepspeed_config=str(path)), model=model)
    path.write_text(json.dumps(dict(base, optimizer={"type": "shardedlamb"})))
    with pytest.raises(MeritConfigError, match='"type": "ShardedLAMB"'):
        deepspeed.initialize(model=model, config=str(path))
    # read as DeepSpeed reads configs: hjson (comments, trailing commas) and base64 strings
    path.write_text('{\n  // MERIT, misspelled\n  "train_batch_size": 2,\n  "optimizer": {"type": "merit",},\n}\n')
    with pytest.raises(MeritConfigError, match='not "merit"'):
        deepspeed.initialize(model=model, config=str(path))
    import base64

    encoded = base64.urlsafe_b64encode(json.dumps(dict(base, optimizer={"type": "Merit"})).encode()).decode()
    with pytest.raises(MeritConfigError, match='not "Merit"'):
        deepspeed.initialize(model=model, config=encoded)
    assert not dist.is_initialized()  # nothing was built


def test_initialize_check_passes_other_configs_through():
    """Only configs naming MERIT/ShardedLAMB in some case are checked: DeepSpeed's own optimizers
    (its "Lamb" under ZeRO too, which check_config alone would refuse) reach DeepSpeed unchanged."""
    import types

    from merit_ds.integrations.deepspeed import install_initialize_check

    calls = []

    def initialize(args=None, model=None, optimizer=None, config=None, config_params=None):
        calls.append(config)
        return "engine"

    fake = types.SimpleNamespace(initialize=initialize)
    install_initialize_check(fake)
    install_initialize_check(fake)  # idempotent: one wrapper
    assert fake.initialize.__wrapped__ is initialize
    zero = {"zero_optimization": {"stage": 2}}
    for cfg in ({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}, **zero},
                {"optimizer": {"type": "Lamb", "params": {}}, **zero}, zero, None, "/no/such/file.json",
                {"optimizer": {"type": "MERIT", "params": {"lr": 1e-3}}, "zero_allow_untested_optimizer": True, **zero},
                # malformed beyond what the check reads: DeepSpeed reports these itself
                {"optimizer": "MERIT"}, {"optimizer": {"type": "MERIT"}, "zero_optimization": {"stage": "two"}}):
        assert fake.initialize(model=None, config=cfg) == "engine"
    assert len(calls) == 8
    with pytest.raises(MeritConfigError, match="zero_allow_untested_optimizer"):
        fake.initialize(config={"optimizer": {"type": "MERIT"}, **zero})
    assert len(calls) == 8  # refused before DeepSpeed was called


@pytest.mark.slow  # fresh interpreters
@pytest.mark.parametrize("disarm", [False, True])
def test_initialize_check_armed_whichever_is_imported_first(disarm):
    import os
    import subprocess
    import sys

    code = "import merit_ds, deepspeed; print(getattr(deepspeed.initialize, '_merit_ds_checked', False))\n"
    env = dict(os.environ, MERIT_DS_NO_DEEPSPEED_CHECK="1" if disarm else "0")
    probe_first = code.replace("import merit_ds, deepspeed",  # transformers probes for deepspeed this way
                               "import importlib.util, merit_ds; importlib.util.find_spec('deepspeed'); import deepspeed")
    for order in (code, code.replace("import merit_ds, deepspeed", "import deepspeed, merit_ds"), probe_first):
        out = subprocess.run([sys.executable, "-c", order], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-1] == str(not disarm)


@pytest.mark.parametrize("params,message", [
    ({"betas": [0.9, 0.95, 0.99]}, "betas must be a pair (beta1, beta2), got (0.9, 0.95, 0.99)"),
    ({"eps": -1e-6}, "Invalid epsilon value: -1e-06 (must be finite and >= 0)"),
    ({"eps": "1e-6"}, "eps must be a number, got '1e-6' (str)"),
    ({"betas": [1.5, 0.9]}, "Invalid beta parameter at index 0: 1.5 (must be in [0, 1))"),
    ({"lr": True}, "lr must be a number, got True (bool)"),
])
def test_check_config_validates_hyperparameter_values_by_the_optimizers_rules(params, message):
    """Values DeepSpeed would pass to MERIT(...) inside deepspeed.initialize (a traceback there) are
    refused first, with the optimizer's own message: the same rules as MERIT(params, **kwargs)."""
    for name in ("MERIT", "ShardedLAMB"):
        cfg = {"optimizer": {"type": name, "params": {"lr": 1e-3, **params}}}
        with pytest.raises(MeritConfigError, match=re.escape(message)):
            check_config(cfg)
    with pytest.raises(ValueError, match=re.escape(message)):  # the same rule in Python
        MERIT([torch.zeros(1, requires_grad=True)], **{"lr": 1e-3, **params, "betas": tuple(params.get("betas", (0.9, 0.99)))})


def test_check_config_names_a_misspelled_top_level_key():
    cfg = {"optimizer": {"type": "MERIT", "params": {"lr": 1e-3}}, "zero_optimisation": {"stage": 2},
           "gradient_cliping": 1.0, "my_own_key": 1}
    with pytest.raises(MeritConfigError, match='"zero_optimisation" is not a DeepSpeed key \\(did you mean '
                                               '"zero_optimization"\\?\\); "gradient_cliping" .*"gradient_clipping"'):
        check_config(cfg)
    # every committed config uses only keys DeepSpeed knows (negative control for false alarms)
    from merit_ds.integrations.deepspeed import misspelled_keys

    for f in sorted(REPO_ROOT.glob("ds_configs/**/*.json")):
        assert misspelled_keys(json.loads(f.read_text())) == [], f
