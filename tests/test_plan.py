"""Batch arithmetic, presets, memory and wall-time accounting of `merit-ds plan` (hand-computed)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from merit_ds.train import presets
from merit_ds.train.batch import BatchConfigError, plan_batch
from merit_ds.train.plan import GiB, activation_bytes, format_plan, make_plan, memory_per_gpu, wall_time_seconds


def test_batch_presets_are_the_documented_numbers():
    assert presets.BATCH_PRESETS == {"480": 480, "1k": 1024, "2k": 2048, "4k": 4096, "6k": 6144}
    assert presets.parse_batch("6k") == 6144 and presets.parse_batch(1000) == 1000
    with pytest.raises(ValueError, match="presets"):
        presets.parse_batch("6kb")


# vocabulary padded 50257 -> 50304 (a multiple of 64): 47 x d more than GPT-2's 124,439,808 / 354,823,168
@pytest.mark.parametrize("name,expected", [("gpt2-small", 124_439_808 + 47 * 768), ("gpt2-medium", 354_823_168 + 47 * 1024),
                                           ("tiny", 7_242_624 + 47 * 128)])
def test_parameter_count_matches_transformers(name, expected):
    from transformers import GPT2LMHeadModel
    preset = presets.get_model_preset(name)
    with torch.device("meta"):
        model = GPT2LMHeadModel(presets.gpt2_config(preset))
    assert preset.n_params == expected == sum(p.numel() for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert preset.vocab_size == 50304 and 50304 % 64 == 0
    assert model.config.activation_function == "gelu_pytorch_tanh" and model.config.use_cache is False
    shape = (preset.n_layer, preset.n_embd, preset.n_head)
    assert shape == {"gpt2-small": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "tiny": (4, 128, 4)}[name]


def test_steps_for_48b_tokens():
    p = plan_batch(6144, 32, 1024, micro_batch=16, token_budget=48_000_000_000)
    assert p.tokens_per_step == 6_291_456
    assert p.steps == math.ceil(48e9 / (6144 * 1024)) == 7630
    assert p.grad_accum == 6144 // (16 * 32) == 12
    p = plan_batch(480, 16, 1024, grad_accum=2, token_budget=48_000_000_000)
    assert (p.micro_batch, p.steps) == (15, 97_657)
    assert "micro_batch 15 x grad_accum 2 x world 16 = global batch 480" in p.describe()


def test_batch_errors_are_clear():
    with pytest.raises(BatchConfigError, match="not divisible by the data-parallel world size 24.*1008, 1032"):
        plan_batch(1024, 24, 1024, token_budget=48e9)
    with pytest.raises(BatchConfigError, match="smaller than one optimizer step"):
        plan_batch(480, 8, 1024, token_budget=480 * 1024 - 1)
    with pytest.raises(BatchConfigError, match="not divisible by micro batch 7"):
        plan_batch(480, 8, 1024, micro_batch=7, token_budget=48e9)
    with pytest.raises(BatchConfigError, match="not the global batch"):
        plan_batch(480, 8, 1024, micro_batch=6, grad_accum=2, token_budget=48e9)


def test_lr_scaling_rule_and_warmup():
    small = presets.get_optim_preset("gpt2-small", "merit")
    assert presets.scaled_lr(small, 480) == small.lr_ref
    # 6144 / 480 = 12.8; sqrt(12.8) = 3.5777088 (3.5777^2 = 12.7999); 6e-4 x 3.5777088 = 2.1466253e-3
    assert presets.scaled_lr(small, 6144) == pytest.approx(2.1466253e-3, rel=1e-7)
    assert presets.warmup_steps(97_657) == math.ceil(0.02 * 97_657) == 1954  # ~the lineage's 2000
    assert presets.warmup_steps(7630) == 153
    assert (small.betas, small.weight_decay, small.grad_clip, small.min_lr_ratio) == ((0.9, 0.95), 0.1, 1.0, 0.1)


def test_memory_accounting_zero_paper():
    psi = 124_475_904
    # bf16: 2 + 2 + 12 bytes/param, split per stage over Nd = 8; gradients accumulated in fp32
    # (grad_accum_dtype): BF16_Optimizer's unpartitioned fp32 buffer at ZeRO-1 (2 + 4 bytes), an
    # fp32 partition at ZeRO-2/3 (4 bytes / Nd). Worked by hand from Psi = 124,475,904:
    #   2 Psi = 248,951,808     6 Psi = 746,855,424     12 Psi = 1,493,710,848
    #   2 Psi / 8 = 31,118,976  4 Psi / 8 = 62,237,952  12 Psi / 8 = 186,713,856
    m0 = memory_per_gpu(psi, 8, 0)
    assert (m0.params, m0.grads, m0.optimizer) == (248_951_808, 248_951_808, 1_493_710_848)
    m1 = memory_per_gpu(psi, 8, 1)
    assert (m1.params, m1.grads, m1.optimizer) == (248_951_808, 746_855_424, 186_713_856)
    m2 = memory_per_gpu(psi, 8, 2)
    assert (m2.params, m2.grads, m2.optimizer) == (248_951_808, 62_237_952, 186_713_856)
    m3 = memory_per_gpu(psi, 8, 3)
    assert (m3.params, m3.grads, m3.optimizer) == (31_118_976, 62_237_952, 186_713_856)
    off = memory_per_gpu(psi, 8, 2, offload=True)
    assert (off.optimizer, off.optimizer_cpu) == (0.0, 186_713_856)
    # fp32 on Nd = 4, no ZeRO: 4 + 4 + 8 bytes/param (weights are the master; m and v):
    # 4 Psi = 497,903,616; 8 Psi = 995,807,232
    f = memory_per_gpu(psi, 4, 0, precision="fp32")
    assert (f.params, f.grads, f.optimizer) == (497_903_616, 497_903_616, 995_807_232)
    with pytest.raises(ValueError, match="offload needs ZeRO stage"):
        memory_per_gpu(psi, 8, 0, offload=True)


def test_activation_measurement_matches_field_notes():
    """Saved bytes per GPT-2 layer (s b h units), fp32: docs/design/field_notes.md, 'Activation
    memory of a GPT-2 layer', measured 64 with gelu_pytorch_tanh and 112 with gelu_new at
    s = 1024; + 0.08 here for LayerNorm statistics and
    SDPA's log-sum-exp (12 heads / 768 x 4 bytes + 2 x 4 / 768 x 4 bytes ... = 1/12)."""
    from merit_ds.train.activations import activation_model, measure_saved_bytes

    small = presets.get_model_preset("gpt2-small")
    act = activation_model(small, "fp32")
    assert act.per_layer_per_token / 768 == pytest.approx(64 + 1 / 12, abs=1e-9)
    assert activation_model(small, "bf16").per_layer_per_token / 768 == pytest.approx(32 + 7 / 96, abs=1e-9)
    s = 64
    new = (measure_saved_bytes(small, n_layer=2, seq=s, activation_function="gelu_new")
           - measure_saved_bytes(small, n_layer=1, seq=s, activation_function="gelu_new"))
    assert new / (s * 768) == pytest.approx(112 + 1 / 12, abs=1e-9)
    # the rest: the loss's fp32 log-softmax (4 V per token) and small change
    assert 4 * 50304 < act.rest_per_token < 4.2 * 50304


@pytest.mark.slow  # whole models measured at 2 x 256 tokens (GPT-2 Small: seconds each)
@pytest.mark.parametrize("name,precision", [("gpt2-small", "fp32"), ("gpt2-small", "bf16"), ("tiny", "fp32")])
def test_plan_activation_agrees_with_a_direct_measurement(name, precision):
    """The plan's figure (measured at 64 tokens, scaled) against the whole model measured at
    2 x 256 tokens: within 10% (it is within 0.1%: nothing grows with s^2 under SDPA)."""
    from merit_ds.train.activations import activation_model, measure_saved_bytes

    preset = presets.get_model_preset(name)
    b, s = 2, 256
    direct = measure_saved_bytes(preset, n_layer=preset.n_layer, seq=s, batch=b,
                                 dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    planned = activation_model(preset, precision).bytes(preset.n_layer, b * s)
    assert planned == pytest.approx(direct, rel=0.10)
    assert planned == pytest.approx(direct, rel=1e-3)
    e = 4 if precision == "fp32" else 2
    assert activation_bytes(preset, b, s, precision=precision) == pytest.approx(planned + (4 + e) * b * s * 50304)


def test_optimizer_scratch_in_the_plan():
    from merit_ds.train.plan import optimizer_scratch_bytes

    psi = presets.get_model_preset("gpt2-small").n_params
    assert psi == 124_475_904
    # MERIT on the GPU: the Triton step's tile table, 16 int64 = 128 bytes per 16 x 256 = 4096
    # elements. ZeRO-2 on 8 ranks: partition ceil(124,475,904 / 8) = 15,559,488 elements;
    # 15,559,488 = 3798 x 4096 + 2,880 -> 3799 tiles -> 3799 x 128 = 486,272 bytes
    # (< 0.032 bytes/element x 15,559,488 = 497,903.6)
    assert optimizer_scratch_bytes(psi, 8, 2) == 486_272
    # LAMB: three fp32 buffers of the partition, 12 x 15,559,488 = 186,713,856
    assert optimizer_scratch_bytes(psi, 8, 3, optimizer="lamb") == 186_713_856
    assert optimizer_scratch_bytes(psi, 8, 2, offload=True) == 0.0          # fused CPU kernel
    assert optimizer_scratch_bytes(psi, 8, 2, optimizer="adamw") == 0.0     # FusedAdam, in place
    # no ZeRO: the whole model, 124,475,904 = 30389 x 4096 + 2,560 -> 30390 tiles x 128 = 3,889,920
    assert optimizer_scratch_bytes(psi, 8, 0) == 3_889_920
    assert optimizer_scratch_bytes(1000, 8, 2) == 128  # a small partition is one tile
    # ZeRO-2 total: params 248,951,808 + grads 62,237,952 + optimizer 186,713,856 + scratch
    # 486,272 + activations 1 = 498,389,889 bytes
    assert memory_per_gpu(psi, 8, 2, activations=1.0).total == 498_389_889


def test_wall_time_and_plan():
    # (6 N + 12 L h s) D / (gpus * peak * mfu), N without the position embedding (PaLM's count):
    # GPT-2 Small, 7630 steps of 6k x 1024, 32 H100 at 40%
    per_token = 6 * (124_475_904 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert per_token == 855_383_040
    from merit_ds.train.plan import flops_per_token
    assert flops_per_token(presets.get_model_preset("gpt2-small"), 1024) == per_token
    # tokens: 7630 steps x 6144 x 1024 = 7630 x 6,291,456 = 48,003,809,280
    # FLOPs: 855,383,040 x 48,003,809,280 = 4.10616443e19
    # rate: 32 x 989e12 x 0.4 = 1.265920e16 FLOP/s -> 4.10616443e19 / 1.26592e16 = 3243.62 s (0.901 h)
    assert wall_time_seconds(per_token, 48_003_809_280, 32, 989e12, 0.4) == pytest.approx(3243.6208, rel=1e-7)
    p = make_plan("gpt2-small", "6k", 48e9, 4, 8, "h100")
    assert (p["steps"], p["per_gpu_batch"], p["world"]) == (7630, 192, 32)
    assert p["tokens_trained"] == 48_003_809_280 and p["flops"] == pytest.approx(4.10616443e19, rel=1e-8)
    assert p["wall_time_s"] == pytest.approx(3243.6208, rel=1e-7)
    for row in p["stages"]:
        assert row["fits"] and 192 % row["micro_batch"] == 0
        assert row["micro_batch"] * row["grad_accum"] * 32 == 6144
        assert row["total_gib"] <= 80 * 0.9
        assert row["total_gib"] * GiB == pytest.approx(
            (row["params_gib"] + row["grads_gib"] + row["optimizer_gib"] + row["scratch_gib"] + row["activations_gib"]) * GiB)
    # the next larger divisor of 192 (96) must not fit at stage 0, or the planner is not maximal
    small = presets.get_model_preset("gpt2-small")
    stage0 = p["stages"][0]
    bigger = [d for d in range(stage0["micro_batch"] + 1, 193) if 192 % d == 0][0]
    assert memory_per_gpu(small.n_params, 32, 0, activations=activation_bytes(small, bigger, 1024)).total > 80 * GiB * 0.9


@pytest.mark.slow  # two `python -m merit_ds plan` processes
def test_plan_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "merit_ds", "plan", "--model", "gpt2-medium", "--batch", "4k",
                          "--nodes", "2", "--gpus-per-node", "8", "--gpu", "h200"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ceil(48,000,000,000 / 4,194,304) = 11,445" in out.stdout and "memory per GPU" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "merit_ds", "plan", "--batch", "1k", "--nodes", "3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not divisible by the data-parallel world size 24" in bad.stderr


def test_plan_shows_the_chosen_optimizers_lr():
    merit = make_plan("gpt2-medium", "6k", 48e9, 4, 8, "h100")
    adamw = make_plan("gpt2-medium", "6k", 48e9, 4, 8, "h100", optimizer="adamw")
    assert adamw["lr"] == pytest.approx(1.0733126e-3, rel=1e-7)  # 3e-4 x sqrt(12.8) = 3e-4 x 3.5777088
    # the memory differs only by MERIT's scratch buffers (AdamW: none), where the micro-batch is equal
    for a, m in zip(adamw["stages"], merit["stages"]):
        assert a["scratch_gib"] == 0.0 and (a["params_gib"], a["grads_gib"]) == (m["params_gib"], m["grads_gib"])
        if a["micro_batch"] == m["micro_batch"]:
            assert a["total_gib"] == pytest.approx(m["total_gib"] - m["scratch_gib"])
    assert "schedule: AdamW peak lr 0.00107 (sqrt-scaled; paper value: GPT-3 table 2.1" in format_plan(adamw)
    assert "schedule: MERIT peak lr 0.00107 (sqrt-scaled; ESTIMATE" in format_plan(merit)


def test_plan_with_a_batch_schedule():
    """`merit-ds plan --batch-schedule`: steps and tokens hand-computed; one micro-batch for every
    phase (the loop keeps it and changes only the accumulation); compute counts the tokens the
    schedule trains, not steps x the first batch."""
    p = make_plan("gpt2-small", tokens=48e9, nodes=4, gpus_per_node=8, gpu="h100", batch_schedule="512@0,4k@10e9")
    # phase 1: 512 x 1024 = 524,288 tokens/step until a step starts at or after 10e9 tokens
    first = math.ceil(10e9 / 524_288)
    assert first == 19_074
    done = first * 524_288                                   # 10,000,269,312
    second = math.ceil((48_000_000_000 - done) / 4_194_304)  # 4096 x 1024 per step
    assert second == 9_060
    assert p["steps"] == first + second == 28_134
    assert p["tokens_trained"] == done + second * 4_194_304 == 48_000_663_552
    assert p["flops"] == p["flops_per_token"] * 48_000_663_552
    assert p["global_batch"] == 512 and p["per_gpu_batch"] == 16 and p["batch_schedule"] == "512@0,4096@10000000000"
    z2 = next(r for r in p["stages"] if r["stage"] == 2 and not r["offload"])
    assert z2["micro_batch"] == p["zero2_micro_batch"] == 16  # divides both 16 and 128 per GPU, and fits
    assert p["per_gpu_unit"] == 16  # gcd(512, 4096) / 32 ranks
    assert [(ph["first_step"], ph["steps"]) for ph in p["phases"]] == [(1, first), (first + 1, second)]
    assert [[(lv["batch"], lv["steps"], lv["grad_accum"]) for lv in ph["levels"]] for ph in p["phases"]] == [
        [(512, first, 1)], [(4096, second, 8)]]
    # warmup: the preset's share of the tokens, as the loop counts it
    frac = presets.get_optim_preset("gpt2-small", "merit").warmup_fraction
    w = p["warmup_steps"]
    assert w * 524_288 >= frac * 48_000_663_552 > (w - 1) * 524_288
    text = format_plan(p)
    assert "4096@10000000000: steps 19,075..28,134: 4,096 seq x 9,060 steps (128/GPU = 16 x 8)" in text
    # batches per GPU 15 and 128 share no divisor but 1: the planner says so by choosing micro-batch 1
    odd = make_plan("gpt2-small", tokens=48e9, nodes=4, gpus_per_node=8, gpu="h100", batch_schedule="480@0,4k@10e9")
    assert {r["micro_batch"] for r in odd["stages"]} == {1}
    with pytest.raises(BatchConfigError, match="multiples of 500 sequences, which 32 ranks cannot split"):
        make_plan("gpt2-small", nodes=4, batch_schedule="500@0")
    with pytest.raises(BatchConfigError, match=r"micro batch 32 does not divide every step's batch per GPU"):
        make_plan("gpt2-small", nodes=4, batch_schedule="512@0,4k@10e9", micro_batch=32)
    with pytest.raises(BatchConfigError, match="batch schedule"):
        make_plan("gpt2-small", batch_schedule="512@5")  # must start at token 0


@pytest.mark.slow  # a `python -m merit_ds plan` process
def test_plan_cli_batch_schedule():
    out = subprocess.run([sys.executable, "-m", "merit_ds", "plan", "--batch-schedule", "ramp:512..4k@0..10e9",
                          "--nodes", "4", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    levels = [lv["batch"] for lv in p["phases"][0]["levels"]]
    assert levels == list(range(512, 4097, 512))  # the ramp's levels, in multiples of gcd(512, 4096)
    assert sum(lv["steps"] for lv in p["phases"][0]["levels"]) == p["steps"]


def test_reduced_vocabulary_config_has_no_out_of_range_special_ids():
    """GPT-2's end-of-text id 50256 is kept where it exists and dropped from a reduced vocabulary
    (the study's 2,048 remapped ids), where transformers warned about it on every model build."""
    from merit_ds.train.presets import gpt2_config

    tiny = presets.get_model_preset("tiny")
    full = gpt2_config(tiny)
    assert (full.vocab_size, full.bos_token_id, full.eos_token_id) == (tiny.vocab_size, 50256, 50256)
    small = gpt2_config(tiny, vocab_size=2048)
    assert (small.bos_token_id, small.eos_token_id) == (None, None)
    assert gpt2_config(tiny, vocab_size=2048, eos_token_id=7).eos_token_id == 7  # named: kept


def test_plan_flags_are_checked_and_a_fixed_micro_batch_is_named(capsys):
    """issue #23: `--micro-batch 6144` said 'does not fit even at micro-batch 1' (false: 1 fits),
    and `--seq-len 0` silently meant 1024."""
    from merit_ds.cli import main

    assert main(["plan", "--model", "gpt2-small", "--batch", "6k", "--micro-batch", "768", "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "does not fit at micro-batch 768" in out and "even at micro-batch 1" not in out
    for flags, message in ((["--seq-len", "0"], "--seq-len must be a positive number of tokens, got 0"),
                           (["--micro-batch", "0"], "--micro-batch must be a positive number of sequences, got 0"),
                           (["--mfu", "1.5"], "--mfu is a fraction of the GPU's peak, in (0, 1], got 1.5")):
        assert main(["plan", *flags]) == 2
        err = capsys.readouterr().err
        assert err == f"merit-ds plan: error: {message}" + (" (leave it out for the model's 1024)" if "seq-len" in message
                                                            else "") + "\n"
