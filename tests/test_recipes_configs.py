"""ds_configs/ is generated from the presets (never hand-edited); launch/ headers state their
exact command and batch arithmetic, and the arithmetic is right."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from merit_ds.integrations.deepspeed import check_config
from merit_ds.train import presets
from merit_ds.train.batch import plan_batch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ds_configs/generate.py in a subprocess
def test_committed_configs_equal_generated():
    r = subprocess.run([sys.executable, str(ROOT / "ds_configs" / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "41 configs up to date" in r.stdout  # 11 generic + 10 MERIT recipes + 2 x 10 baselines + tiny


def _optimizer_of(name: str) -> str:
    return next((o for o in ("lamb", "adamw") if f"_{o}_" in name), "merit")


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_config_names_its_optimizer_and_passes_the_check(path):
    cfg = json.loads(path.read_text())
    optimizer = _optimizer_of(path.name)
    assert cfg["optimizer"]["type"] == {"merit": "MERIT", "lamb": "ShardedLAMB", "adamw": "AdamW"}[optimizer]
    check_config(cfg)  # zero_allow_untested_optimizer, zero_force_ds_cpu_optimizer=false with offload
    # the keys DeepSpeed demands for an optimizer it did not write; its own AdamW needs neither
    assert cfg.get("zero_allow_untested_optimizer") is (None if optimizer == "adamw" else True)
    assert cfg["gradient_clipping"] == 1.0 and cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert cfg["optimizer"]["params"]["eps"] == {"merit": 1e-6, "lamb": 1e-6, "adamw": 1e-8}[optimizer]
    if "offload" in path.name:
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["bf16"]["enabled"] == ("bf16" in path.name)
    # bf16 under ZeRO accumulates gradients in fp32 over the micro-steps (issue 12); DeepSpeed's
    # own parser must read it so (it falls back to the model dtype when the key is missing)
    from deepspeed.runtime.config import GRAD_ACCUM_DTYPE, get_data_types_params

    want = "fp32" if cfg["bf16"]["enabled"] and cfg["zero_optimization"]["stage"] > 0 else None
    assert get_data_types_params(cfg).get(GRAD_ACCUM_DTYPE) == want


@pytest.mark.parametrize("optimizer", ["merit", "lamb", "adamw"])
@pytest.mark.parametrize("model", ["gpt2-small", "gpt2-medium"])
@pytest.mark.parametrize("batch", [480, 1024, 2048, 4096, 6144])
def test_recipe_configs(model, batch, optimizer):
    tag = "" if optimizer == "merit" else f"_{optimizer}"
    cfg = json.loads((ROOT / "ds_configs" / f"{model}{tag}_b{batch}_zero1_bf16.json").read_text())
    assert cfg["train_batch_size"] == batch
    micro = cfg["train_micro_batch_size_per_gpu"]
    # the baselines run at exactly the MERIT recipe's batch arithmetic
    merit = json.loads((ROOT / "ds_configs" / f"{model}_b{batch}_zero1_bf16.json").read_text())
    assert micro == merit["train_micro_batch_size_per_gpu"]
    for world in (8, 16, 32):  # the documented cluster shapes all divide evenly
        plan = plan_batch(batch, world, 1024, micro_batch=micro, token_budget=48_000_000_000)
        assert plan.micro_batch * plan.grad_accum * world == batch
    # peak lr at 480: MERIT and LAMB estimates, AdamW the GPT-3 / nanoGPT / Sophia value; scaled by
    # each optimizer's measured exponent (the CPU study: MERIT 0.69, LAMB 0.85, AdamW 0)
    lr_480 = {"gpt2-small": 6e-4, "gpt2-medium": 3e-4}[model]
    assert presets.get_optim_preset(model, optimizer).lr_ref == lr_480
    assert presets.get_optim_preset(model, optimizer).lr_batch_exponent == {"merit": 0.69, "lamb": 0.85, "adamw": 0.0}[optimizer]
    assert cfg["optimizer"]["params"]["lr"] == pytest.approx(RECIPE_LR[optimizer][model][batch], rel=1e-5)


# The recipes' peak lr, worked by hand: lr_480 x (B / 480)^alpha, GPT-2 Small lr_480 = 6e-4, Medium 3e-4;
# alpha as the CPU study measured it (docs/study.md, "The recipes' lr rule"): MERIT 0.69, LAMB 0.85, AdamW 0
#   B / 480:          2.1333333  4.2666667  8.5333333  12.8
#   MERIT ^0.69:      1.6867492  2.7212047  4.3900747  5.8073083
#   LAMB  ^0.85:      1.9041445  3.4322223  6.1865839  8.7322965
#   AdamW ^0:         1          1          1          1
_FACTOR = {"merit": (1, 1.6867492, 2.7212047, 4.3900747, 5.8073083),
           "lamb": (1, 1.9041445, 3.4322223, 6.1865839, 8.7322965),
           "adamw": (1, 1, 1, 1, 1)}
RECIPE_LR = {opt: {model: dict(zip((480, 1024, 2048, 4096, 6144), (lr * f for f in factors)))
                   for model, lr in (("gpt2-small", 6e-4), ("gpt2-medium", 3e-4))}
             for opt, factors in _FACTOR.items()}
assert RECIPE_LR["merit"]["gpt2-small"][6144] == pytest.approx(3.4843850e-3)  # 6e-4 x 5.8073083


LAUNCH_FILES = sorted(p for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch", ".yaml"))
BATCH_LINE = re.compile(r"# batch: micro_batch (\d+) x grad_accum (\d+) x world (\d+) = (\d+) sequences x (\d+) = "
                        r"([\d,]+) tokens/step; (?:48e9 tokens -> ([\d,]+) steps|(\d+) steps -> ([\d,]+) tokens)")


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_headers_state_command_and_correct_arithmetic(path):
    head = "\n".join(path.read_text().splitlines()[:20])
    assert re.search(r"# Command", head), f"{path.name}: no command in the header"
    m = BATCH_LINE.search(head)
    assert m, f"{path.name}: no batch arithmetic line in the header"
    micro, accum, world, batch, seq = map(int, m.groups()[:5])
    tokens = int(m.group(6).replace(",", ""))
    assert micro * accum * world == batch and batch * seq == tokens
    if m.group(7):
        assert math.ceil(48e9 / tokens) == int(m.group(7).replace(",", ""))
    # the header's numbers match the config the file launches
    cfgs = re.findall(r"ds_configs/([\w.-]+\.json)", head)
    if cfgs:
        cfg = json.loads((ROOT / "ds_configs" / cfgs[0]).read_text())
        assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"]) == (batch, micro)
