"""GPU-facing defaults of merit_ds.train that are decided on the CPU (issue 21): the loss, the
micro-batch from the memory plan, --compile."""

from __future__ import annotations

import pytest

from merit_ds.train.loop import compile_wanted, parse_args
from merit_ds.train.run_config import UsageError, lean_loss_wanted, resolve

MEDIUM_6K = ["--model", "gpt2-medium", "--global-batch", "6144", "--steps", "10", "--precision", "bf16",
             "--zero-stage", "2", "--data", "unused", "--out", "unused"]
H100 = 80 * 2**30


def test_loss_is_lean_on_cuda_plain_on_cpu_unless_asked():
    assert lean_loss_wanted("auto", cpu=False) == "lean" and lean_loss_wanted("auto", cpu=True) == "plain"
    assert lean_loss_wanted("lean", cpu=True) == "lean" and lean_loss_wanted("plain", cpu=False) == "plain"
    with pytest.raises(UsageError, match="--loss must be"):
        lean_loss_wanted("chunky", cpu=True)


def test_compile_is_on_for_cuda_off_for_cpu_unless_asked():
    assert compile_wanted("auto", cpu=False) and not compile_wanted("auto", cpu=True)
    assert compile_wanted("on", cpu=True) and not compile_wanted("off", cpu=False)
    assert parse_args(["--data", "d", "--out", "o", "--compile"]).compile == "on"  # the bare flag, as before


def test_the_micro_batch_is_the_largest_the_plan_fits_on_this_gpu():
    # GPT-2 Medium, batch 6,144 on 32 H100 (192 sequences per GPU), ZeRO-2 bf16, lean loss:
    # merit-ds plan --model gpt2-medium --batch 6k --nodes 4 --gpu h100 gives 64 x 3 (51.7 GiB of 72)
    rc = resolve(parse_args(MEDIUM_6K), launcher="deepspeed", world=32, cpu=False, gpu_mem_bytes=H100)
    assert (rc.plan.micro_batch, rc.plan.grad_accum) == (64, 3) and rc.loss == "lean"
    assert rc.micro_note.startswith("micro-batch 64 x grad_accum 3: the largest the memory plan fits on this GPU")
    # the plain loss holds the full-vocabulary fp32 logits: a smaller micro-batch fits
    plain = resolve(parse_args([*MEDIUM_6K, "--loss", "plain"]), launcher="deepspeed", world=32, cpu=False,
                    gpu_mem_bytes=H100)
    assert plain.plan.micro_batch < 64 and plain.loss == "plain"
    # --micro-batch wins; on the CPU nothing is planned
    fixed = resolve(parse_args([*MEDIUM_6K, "--micro-batch", "8"]), launcher="deepspeed", world=32, cpu=False,
                    gpu_mem_bytes=H100)
    assert fixed.plan.micro_batch == 8 and "memory plan" not in fixed.micro_note
    cpu = resolve(parse_args(MEDIUM_6K), launcher="deepspeed", world=32, cpu=True)
    assert cpu.plan.micro_batch == 192 and cpu.loss == "plain"


def test_a_gpu_too_small_for_any_micro_batch_is_one_clear_error():
    with pytest.raises(UsageError, match=r"no micro-batch of the 192 sequences per GPU fits this GPU"):
        resolve(parse_args(MEDIUM_6K), launcher="deepspeed", world=32, cpu=False, gpu_mem_bytes=2 * 2**30)
