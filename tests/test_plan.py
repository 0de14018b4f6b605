"""Batch arithmetic, presets, memory and wall-time accounting of `merit-ds plan` (hand-computed)."""

import json
import math
import subprocess
import sys

import pytest
from pathlib import Path
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
    # 6144 / 480 = 12.8; MERIT's measured exponent 0.69: 12.8^0.69 = exp(0.69 x ln 12.8) = exp(0.69 x
    # 2.5494452) = exp(1.7591172) = 5.8073083; 6e-4 x 5.8073083 = 3.4843850e-3
    assert presets.scaled_lr(small, 6144) == pytest.approx(3.4843850e-3, rel=1e-7)
    # an optimizer registered without an exponent gets the square-root rule: sqrt(12.8) = 3.5777088
    import dataclasses

    sqrt_rule = dataclasses.replace(small, lr_batch_exponent=0.5)
    assert presets.scaled_lr(sqrt_rule, 6144) == pytest.approx(2.1466253e-3, rel=1e-7)
    assert presets.get_optim_preset("gpt2-small", "adamw").lr_batch_exponent == 0.0
    assert presets.scaled_lr(presets.get_optim_preset("gpt2-small", "adamw"), 6144) == 6e-4
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
    # plain loss: + nll_loss's and log_softmax's fp32 gradients
    assert activation_bytes(preset, b, s, precision=precision, loss="plain") == pytest.approx(
        planned + 8 * b * s * 50304)
    # lean loss (the default): - the fp32 log-softmax + one fp32 lse per token, + one chunk (512 tokens
    # here, fewer than 1,334) of fp32 logits and their low-precision copy, + W's fp32 gradient and a chunk's
    e_copy = 0 if precision == "fp32" else 2
    assert activation_bytes(preset, b, s, precision=precision) == pytest.approx(
        planned - (4 * 50304 - 4) * b * s + (4 + e_copy) * 512 * 50304 + (4 + e_copy) * 50304 * preset.n_embd)


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
    # 486,272 + activations 1 = 498,389,889 bytes; + DeepSpeed's two bf16 reduce buckets
    # (overlap_comm), 2 x 500,000,000 x 2 = 2,000,000,000 -> 2,498,389,889
    assert memory_per_gpu(psi, 8, 2, activations=1.0, comm_buckets=False).total == 498_389_889
    assert memory_per_gpu(psi, 8, 2, activations=1.0).total == 2_498_389_889


def test_lean_loss_and_comm_buckets_in_the_plan():
    """The lean loss's term and DeepSpeed's reduce buckets, worked by hand for GPT-2 Medium
    (V = 50,304, h = 1,024) at micro-batch 48 x 1,024 = 49,152 tokens, bf16."""
    from merit_ds.train.plan import comm_bucket_bytes, deepspeed_bucket_defaults, loss_work_bytes

    med = presets.get_model_preset("gpt2-medium")
    assert (med.vocab_size, med.n_embd) == (50304, 1024)
    # plain: nll_loss's and log_softmax's fp32 gradients, 8 bytes x 49,152 x 50,304;
    # 49,152 x 50,304 = 2,457,600,000 + 14,942,208 = 2,472,542,208 -> x 8 = 19,780,337,664
    assert loss_work_bytes(med, 49_152, loss="plain") == 19_780_337_664
    assert loss_work_bytes(med, 49_152, precision="fp32", loss="plain") == 19_780_337_664
    # lean: chunk C = 67,108,864 // 50,304 = 1,334 (1,334 x 50,304 = 67,105,536, 3,328 short of 2^26);
    # fp32 logits + their bf16 copy: 6 x 67,105,536 = 402,633,216; W's fp32 gradient + a chunk's
    # bf16 product: 6 x 50,304 x 1,024 = 6 x 51,511,296 = 309,067,776; sum 711,700,992
    assert loss_work_bytes(med, 49_152) == 711_700_992
    # fp32: no copies, 4 x 67,105,536 + 4 x 51,511,296 = 268,422,144 + 206,045,184 = 474,467,328
    assert loss_work_bytes(med, 49_152, precision="fp32") == 474_467_328
    # fewer tokens than a chunk: the chunk is the micro-batch (1 x 1,024 tokens)
    assert loss_work_bytes(med, 1024) == 6 * 1024 * 50304 + 309_067_776
    # saved: the log-softmax's 4 x 50,304 bytes per token less, one fp32 lse more: 201,212 x 49,152
    # = 9,859,388,000 + 30,584,224 = 9,889,972,224. Plain minus lean (the measured rest cancels):
    # 19,780,337,664 + 9,889,972,224 - 711,700,992 = 28,958,608,896 bytes (26.97 GiB)
    assert activation_bytes(med, 48, 1024, loss="plain") - activation_bytes(med, 48, 1024) == 28_958_608_896
    # DeepSpeed's own defaults, read from deepspeed.runtime.zero.config (0.19.8: 5e8 elements each):
    # from the file's syntax tree (deepspeed not imported: `plan --json` stays clean) and from the
    # imported pydantic model agree
    import sys

    from merit_ds.train.plan import deepspeed_zero_defaults

    imported = sys.modules.pop("deepspeed.runtime.zero.config", None)  # force the syntax-tree path
    try:
        deepspeed_zero_defaults.cache_clear()
        from_source = deepspeed_zero_defaults()
    finally:
        if imported is not None:
            sys.modules["deepspeed.runtime.zero.config"] = imported
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    deepspeed_zero_defaults.cache_clear()
    fields = DeepSpeedZeroConfig.model_fields
    assert from_source == deepspeed_zero_defaults() == {k: int(fields[k].default) for k in from_source}
    assert from_source == {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
                           "use_multi_rank_bucket_allreduce": 1, "max_live_parameters": 1_000_000_000,
                           "max_reuse_distance": 1_000_000_000}
    assert deepspeed_bucket_defaults() == {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
    # bytes: ZeRO-2 two buckets (overlap_comm) of 500,000,000 bf16 = 2,000,000,000, fp32 4,000,000,000;
    # ZeRO-1 fp32 one of fp32 (no overlap) = 2,000,000,000, bf16 none (BF16_Optimizer); ZeRO-3 one
    # bucket of the communication dtype: 1,000,000,000 (bf16), 2,000,000,000 (fp32); no ZeRO none
    assert [comm_bucket_bytes(st, "bf16") for st in (0, 1, 2, 3)] == [0, 0, 2_000_000_000, 1_000_000_000]
    assert [comm_bucket_bytes(st, "fp32") for st in (0, 1, 2, 3)] == [0, 2_000_000_000, 4_000_000_000, 2_000_000_000]
    assert comm_bucket_bytes(2, "bf16", overlap_comm=False) == 1_000_000_000
    with pytest.raises(BatchConfigError, match="--loss must be one of lean, plain"):
        make_plan("gpt2-medium", loss="fused")


def test_gpt2_medium_6k_plan_before_and_after_the_lean_loss():
    """4 x 8 H100, batch 6k: 192 sequences per GPU. ZeRO-2 total at micro 64 (lean), by hand:
    params 2 Psi = 2 x 354,871,296 = 709,742,592; grads 4 Psi / 32 = 44,358,912; optimizer
    12 Psi / 32 = 133,076,736; MERIT's tile table: partition ceil(354,871,296 / 32) = 11,089,728 =
    2,707 x 4,096 + 1,856 -> 2,708 tiles x 128 = 346,624; reduce buckets 2,000,000,000; sum
    2,887,524,864 + the activations (measured, scaled)."""
    med = presets.get_model_preset("gpt2-medium")
    lean = make_plan("gpt2-medium", "6k", 48e9, 4, 8, "h100")
    plain = make_plan("gpt2-medium", "6k", 48e9, 4, 8, "h100", loss="plain")
    z2 = {p["loss"]: next(r for r in p["stages"] if r["stage"] == 2 and not r["offload"]) for p in (lean, plain)}
    assert (z2["plain"]["micro_batch"], z2["plain"]["grad_accum"]) == (48, 4)  # as before the lean loss
    assert (z2["lean"]["micro_batch"], z2["lean"]["grad_accum"]) == (64, 3)
    act = activation_bytes(med, 64, 1024)
    assert z2["lean"]["total_gib"] * GiB == pytest.approx(2_887_524_864 + act, abs=1)
    assert z2["lean"]["comm_gib"] * GiB == 2_000_000_000
    # the next divisors do not fit 90% of 80 GiB = 77,309,411,328 bytes: lean at 96, plain at 64
    budget = 0.9 * 80 * GiB
    assert memory_per_gpu(med.n_params, 32, 2, activations=activation_bytes(med, 96, 1024)).total > budget
    assert memory_per_gpu(med.n_params, 32, 2, activations=activation_bytes(med, 64, 1024, loss="plain")).total > budget
    # ZeRO-3 keeps the plain loss (the lm_head weight is partitioned): 48 either way
    for p in (lean, plain):
        assert [r["micro_batch"] for r in p["stages"] if r["stage"] == 3] == [48, 48]
    text = format_plan(lean)
    assert "loss: lean (chunked over 1,334 tokens; ZeRO-3 rows: plain" in text and "comm" in text


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
            (row["params_gib"] + row["grads_gib"] + row["optimizer_gib"] + row["scratch_gib"] + row["comm_gib"]
             + row["activations_gib"]) * GiB)
    # the lean loss fits all 192 sequences per GPU at ZeRO 0-2; ZeRO-3 keeps the plain loss (64)
    assert [(r["stage"], r["micro_batch"], r["loss"]) for r in p["stages"]] == [
        (0, 192, "lean"), (1, 192, "lean"), (2, 192, "lean"), (3, 64, "plain"), (2, 192, "lean"), (3, 64, "plain")]
    # the next larger divisor of 192 must not fit where there is one, or the planner is not maximal
    small = presets.get_model_preset("gpt2-small")
    for row in p["stages"]:
        bigger = [d for d in range(row["micro_batch"] + 1, 193) if 192 % d == 0]
        if bigger:
            act = activation_bytes(small, bigger[0], 1024, loss=row["loss"])
            assert memory_per_gpu(small.n_params, 32, row["stage"], offload=row["offload"],
                                  activations=act).total > 80 * GiB * 0.9


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
    assert adamw["lr"] == 3e-4  # AdamW's measured exponent is 0: its batch-480 lr at every batch
    assert merit["lr"] == pytest.approx(1.7421925e-3, rel=1e-7)  # 3e-4 x 12.8^0.69 = 3e-4 x 5.8073083
    # the memory differs only by MERIT's scratch buffers (AdamW: none), where the micro-batch is equal
    for a, m in zip(adamw["stages"], merit["stages"]):
        assert a["scratch_gib"] == 0.0 and (a["params_gib"], a["grads_gib"]) == (m["params_gib"], m["grads_gib"])
        if a["micro_batch"] == m["micro_batch"]:
            assert a["total_gib"] == pytest.approx(m["total_gib"] - m["scratch_gib"])
    assert "schedule: AdamW peak lr 0.0003 (the same at every batch; paper value: GPT-3 table 2.1" in format_plan(adamw)
    assert "schedule: MERIT peak lr 0.00174 (scaled as batch^0.69; ESTIMATE" in format_plan(merit)


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


def test_communication_per_step_per_stage_hand_worked():
    """GPT-2 Medium (354,871,296 parameters), batch 6k on 32 H100, bf16: each GPU sends
    (31/32) x 354,871,296 x 2 bytes = 0.6876 GB per reduce-scatter or all-gather (an all-reduce
    twice that): ZeRO-0 one all-reduce, 2x = 1.375 GB; ZeRO-1 an all-reduce and an all-gather,
    3x = 2.063 GB; ZeRO-2 at 3 micro-batches an all-reduce per micro-batch and the all-gather,
    (2 x 3 + 1)x = 4.813 GB; ZeRO-3 at 4 micro-batches a gather and a reduce-scatter per
    micro-batch (355M parameters < 1e9 live: gathered once), (2 x 4)x = 5.501 GB. The planner
    recommends ZeRO-1: ZeRO-0 sends less but would accumulate 3 micro-batches in bf16. (That
    DeepSpeed sends exactly these: tests/test_comm_volume.py.)"""
    from merit_ds.train.plan import comm_bytes_per_step, format_plan, make_plan

    one = 31 / 32 * 354_871_296 * 2
    assert comm_bytes_per_step(354_871_296, 32, 0, 3) == pytest.approx(2 * one)
    assert comm_bytes_per_step(354_871_296, 32, 1, 3) == pytest.approx(3 * one)
    assert comm_bytes_per_step(354_871_296, 32, 2, 3) == pytest.approx(7 * one)
    assert comm_bytes_per_step(354_871_296, 32, 3, 4) == pytest.approx(8 * one)
    assert comm_bytes_per_step(2_000_000_000, 32, 3, 4) == pytest.approx(12 * one * 2e9 / 354_871_296)  # > 1e9 live
    assert comm_bytes_per_step(354_871_296, 32, 2, 3, precision="fp32") == pytest.approx(14 * one)
    assert comm_bytes_per_step(354_871_296, 1, 2, 3) == 0.0  # one GPU sends nothing
    p = make_plan("gpt2-medium", "6k", nodes=4, gpus_per_node=8, gpu="h100")
    sent = {(r["stage"], r["offload"]): round(r["comm_gb_per_step"], 3) for r in p["stages"]}
    assert (sent[(0, False)], sent[(1, False)], sent[(2, False)], sent[(3, False)]) == (1.375, 2.063, 4.813, 5.501)
    assert p["recommended_stage"] == 1
    assert ("recommended: ZeRO-1 (micro-batch 64 x 3, 2.06 GB sent per GPU per step: fits, sends the fewest bytes); "
            "not ZeRO-0: it would accumulate the gradients of the micro-batches in bf16") in format_plan(p)
    # one micro-batch per step: nothing accumulates, and ZeRO-0's single all-reduce is the least
    p = make_plan("gpt2-small", "480", nodes=4, gpus_per_node=8, gpu="h100")
    assert [r["grad_accum"] for r in p["stages"]][:4] == [1, 1, 1, 1] and p["recommended_stage"] == 0
    assert "recommended: ZeRO-0 (micro-batch 15 x 1, 0.48 GB sent per GPU per step: fits, sends the fewest bytes, " \
           "the lowest stage of those)" in format_plan(p)
    # a batch schedule: the bytes averaged over its steps (one micro-batch at 256, 24 at 6144 on 8 GPUs),
    # ZeRO-0 out (bf16 accumulation in the later phase); ZeRO-3 no longer ties ZeRO-0 on the first phase
    p = make_plan("gpt2-medium", 256, nodes=1, gpus_per_node=8, gpu="h100", batch_schedule="256@0,6144@1e9")
    rows = {r["stage"]: r for r in p["stages"] if not r["offload"]}
    assert rows[0]["max_grad_accum"] == 24 and p["recommended_stage"] == 1
    assert rows[3]["comm_gb_per_step"] > 10 * rows[1]["comm_gb_per_step"]
    # one GPU: nothing is sent at any stage; the lowest stage that fits without bf16 accumulation
    assert make_plan("gpt2-small", 480, nodes=1, gpus_per_node=1, gpu="h100")["recommended_stage"] == 1
    # fp32 accumulates in fp32 at every stage: ZeRO-0 stays a candidate
    p = make_plan("gpt2-small", "6k", nodes=1, gpus_per_node=8, gpu="h100", precision="fp32")
    assert p["stages"][0]["grad_accum"] > 1 and p["recommended_stage"] == 0


def test_recipe_stage_is_the_planners_choice_for_8_to_32_gpus():
    """Every recipe file serves 8, 16 and 32 GPUs with one stage and micro-batch. ZeRO-0 (bf16
    accumulation) is out wherever 8 GPUs take several micro-batches per step; of ZeRO-1/2/3 at 8
    GPUs, ZeRO-1's 3 (N-1)/N Psi b beats ZeRO-2's (2k + 1) and ZeRO-3's 2k at k >= 2. The
    committed files carry that stage in their name and their JSON (generate.py --check holds
    them equal to the generator: tests/test_recipes_configs.py)."""
    import json

    from merit_ds.train.plan import make_plan, recipe_micro_batch, recipe_zero_stage
    from merit_ds.train.presets import BATCH_PRESETS

    root = Path(__file__).resolve().parent.parent
    for model in ("gpt2-small", "gpt2-medium"):
        for batch in BATCH_PRESETS.values():
            assert recipe_zero_stage(model, batch) == 1, (model, batch)
            micro = recipe_micro_batch(model, batch, 1)
            p8 = make_plan(model, batch, nodes=1, gpus_per_node=8, gpu="h100", micro_batch=micro)
            rows = {r["stage"]: r for r in p8["stages"] if not r["offload"]}
            assert rows[0]["grad_accum"] > 1  # ZeRO-0 would accumulate in bf16 on 8 GPUs
            assert rows[1]["comm_gb_per_step"] < rows[2]["comm_gb_per_step"]
            for tag in ("", "_lamb", "_adamw"):
                cfg = json.loads((root / "ds_configs" / f"{model}{tag}_b{batch}_zero1_bf16.json").read_text())
                assert cfg["zero_optimization"]["stage"] == 1 and cfg["train_micro_batch_size_per_gpu"] == micro
                assert cfg["data_types"] == {"grad_accum_dtype": "fp32"} and cfg["bf16"] == {"enabled": True}


def test_recipe_table_in_the_docs_is_the_planners():
    """docs/recipes.md's recipe table is `merit-ds plan --recipes --nodes 4`'s output, verbatim."""
    from merit_ds.train.plan import recipes_table

    docs = (Path(__file__).resolve().parent.parent / "docs" / "recipes.md").read_text()
    assert recipes_table(4, 8, "h100") in docs
