"""Batch-size schedules without processes: parsing and its errors, the per-step batch sequence and
step count for a token budget (against hand counts and a step-by-step walk), the lr by tokens
(bitwise the step schedule at a constant batch), the run configuration's checks, the loader's
batch change, and the loss plot's phase marks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from merit_ds.data import TokenBlockLoader
from merit_ds.data.errors import DataError
from merit_ds.train.batch_schedule import (BatchScheduleError, TokenWarmupCosine, build_step_table,
                                           parse_batch_schedule)
from merit_ds.train.loop import parse_args
from merit_ds.train.run_config import UsageError, resolve
from merit_ds.train.schedule import WarmupCosine


# --- parsing -------------------------------------------------------------------------------------------
def test_parse_phases_ramps_and_suffixes():
    s = parse_batch_schedule(" 16@0, 64@200000 ")
    assert [(p.start, p.batch, p.ramp) for p in s.phases] == [(0, 16, False), (200_000, 64, False)]
    assert s.spec == "16@0,64@200000"
    assert parse_batch_schedule("1k@0,2k@2e5").spec == "1024@0,2048@200000"  # sizes as --global-batch
    r = parse_batch_schedule("ramp:16..128@0..500000")
    assert (r.phases[0].batch, r.phases[0].end_batch, r.phases[0].end, r.phases[0].quantum) == (16, 128, 500_000, 16)
    assert r.batches() == [16, 32, 48, 64, 80, 96, 112, 128]
    mixed = parse_batch_schedule("16@0,ramp:16..64@100000..300000,128@600000")
    assert mixed.spec == "16@0,ramp:16..64@100000..300000,128@600000"


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("16@100", "must start at token 0"),
    ("16@0,64@100,32@100", "must increase"),
    ("16@0,64@100,32@50", "must increase"),
    ("16@0,64", "SIZE@TOKEN"),
    ("16@0,64@200k", "no k/M suffixes"),
    ("16@0,64@1.5", "not a non-negative integer"),
    ("16@0,x@100", "neither an integer nor one of the presets"),
    ("0@0", "positive"),
    ("ramp:16..64@100..50", "must end after it starts"),
    ("ramp:16..16@0..50", "constant phase"),
    ("ramp:16-64@0..50", "ramp:B0..B1@T0..T1"),
    ("ramp:16..64@0..500,32@400", "before the ramp"),
])
def test_parse_errors(text, message):
    with pytest.raises(BatchScheduleError, match=message):
        parse_batch_schedule(text)


# --- the step table ------------------------------------------------------------------------------------
def walk(schedule, seq_len, budget):
    """Step by step: each step takes the batch at the tokens trained before it, until the budget."""
    out, tokens = [], 0
    while tokens < budget:
        out.append(schedule.batch_at(tokens))
        tokens += out[-1] * seq_len
    return out


def test_two_phases_hand_count():
    # 16 x 128 = 2,048 tokens/step: steps 1..98 start before token 200,000 (step 98 starts at 198,656),
    # step 99 starts at 200,704 with 64 x 128 = 8,192 tokens; 500,000 - 200,704 = 299,296 -> 37 steps
    t = build_step_table(parse_batch_schedule("16@0,64@200000"), 128, token_budget=500_000)
    assert t.segments == ((1, 98, 16), (99, 37, 64))
    assert t.steps == 135 and t.total_tokens == 98 * 2048 + 37 * 8192 == 503_808
    assert [t.batch(s) for s in (1, 98, 99, 135)] == [16, 16, 64, 64]
    assert t.tokens_before(99) == 200_704 and t.sequences_before(99) == 1568
    with pytest.raises(IndexError):
        t.batch(136)


def test_ramp_levels_hand_count():
    # 16 -> 128 over 500,000 tokens in levels of 16: level k is reached at token ceil(k x 500,000 / 7)
    t = build_step_table(parse_batch_schedule("ramp:16..128@0..500000"), 128, token_budget=1_000_000)
    assert [b for _, _, b in t.segments] == [16, 32, 48, 64, 80, 96, 112, 128]
    assert t.segments[0] == (1, 35, 16)  # 35 x 2,048 = 71,680 >= 71,428.6 (34 x 2,048 = 69,632 is not)
    for (first, n, b), start in zip(t.segments[1:], t.starts[1:]):
        k = (b - 16) // 16
        assert start >= k * 500_000 / 7 > start - (t.batch(first - 1) * 128)  # the first step past the level
    assert t.total_tokens >= 1_000_000 > t.total_tokens - 128 * 128


@pytest.mark.parametrize("spec", ["16@0,64@200000", "ramp:16..128@0..500000", "ramp:128..16@0..300000,32@400000",
                                  "16@0,ramp:16..64@100000..300000,128@600000", "12@0,ramp:12..40@1000..9999,7@20000"])
@pytest.mark.parametrize("seq_len, budget", [(7, 100_000), (64, 123_457), (128, 1_000_000)])
def test_step_table_equals_the_step_by_step_walk(spec, seq_len, budget):
    s = parse_batch_schedule(spec)
    t = build_step_table(s, seq_len, token_budget=budget)
    batches = [t.batch(i) for i in range(1, t.steps + 1)]
    assert batches == walk(s, seq_len, budget)
    cum = [0, *itertools.accumulate(b * seq_len for b in batches)]
    assert [t.tokens_before(i) for i in range(1, t.steps + 2)] == cum
    assert cum[-1] >= budget > cum[-2]  # the budget is reached, never cut, and no step more


def test_fixed_number_of_steps():
    t = build_step_table(parse_batch_schedule("8@0,32@1000"), 10, max_steps=20)
    assert t.segments == ((1, 13, 8), (14, 7, 32))  # step 13 starts at 960 < 1000, step 14 at 1040


# --- lr by tokens --------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch, seq_len, steps, warmup", [(16, 128, 37, 3), (48, 7, 100, 1), (8, 64, 10, 0)])
def test_token_lr_is_bitwise_the_step_lr_at_a_constant_batch(batch, seq_len, steps, warmup):
    t = build_step_table(parse_batch_schedule(f"{batch}@0"), seq_len, max_steps=steps)
    by_tokens, by_steps = TokenWarmupCosine(t, warmup, 0.1), WarmupCosine(warmup, steps, 0.1)
    assert [by_tokens(i) for i in range(steps + 1)] == [by_steps(i) for i in range(steps + 1)]


def test_token_lr_across_a_batch_change_by_hand():
    # 4 steps of 2 x 10 tokens, then 4 of 8 x 10: tokens 0,20,40,60,80 | 160,240,320,400
    t = build_step_table(parse_batch_schedule("2@0,8@80"), 10, max_steps=8)
    f = TokenWarmupCosine(t, 2, 0.1)  # warmup = the first 2 steps = 40 tokens; total 400
    assert f(0) == 20 / 40 and f(1) == 40 / 40
    # steps 3..8 start at tokens a = 40, 60, 80, 160, 240, 320: cosine phase (a - 40) / 360 x 180
    # degrees = 0, 10, 20, 60, 100, 140; lr = 0.1 + 0.45 (1 + cos): cos 10 = 0.98480775 -> 0.99316349,
    # cos 20 = 0.93969262 -> 0.97286168, cos 60 = 0.5 -> 0.775, cos 100 = -0.17364818 -> 0.47185832,
    # cos 140 = -0.76604444 -> 0.20528000
    assert [t.tokens_before(step) for step in range(3, 9)] == [40, 60, 80, 160, 240, 320]
    assert [f(step - 1) for step in range(3, 9)] == pytest.approx(
        [1.0, 0.99316349, 0.97286168, 0.775, 0.47185832, 0.20528000], rel=1e-8)
    g = TokenWarmupCosine(t, 2, 0.1, "sqrt")
    assert g(5) == 2 * f(5) and g(0) == f(0)  # sqrt(8 / 2) = 2: the lr at batch 8 is twice batch 2's


# --- the run configuration -------------------------------------------------------------------------------
TINY = ["--model", "tiny", "--seq-len", "32", "--data", "d", "--out", "o", "--zero-stage", "2"]


def rc_of(*extra, world=2, cfg=None):
    return resolve(parse_args([*TINY, *extra]), launcher="deepspeed", world=world, cpu=True, base_cfg=cfg)


def test_resolve_schedule():
    rc = rc_of("--batch-schedule", "8@0,32@2048", "--micro-batch", "2", "--tokens", "8192")
    # 8 x 32 = 256 tokens/step: steps 1..8 (token 2,048 reached), then (8192 - 2048) / 1024 = 6 steps
    assert rc.batch_table.segments == ((1, 8, 8), (9, 6, 32)) and rc.plan.steps == 14
    assert (rc.plan.global_batch, rc.plan.grad_accum, rc.plan.micro_batch) == (8, 2, 2)
    assert rc.ds_config["train_batch_size"] == 8 and rc.ds_config["gradient_accumulation_steps"] == 2
    assert [rc.batch_at(s) for s in (8, 9)] == [8, 32] and rc.total_tokens == 8192
    # warmup: 2% of the tokens (163.84) is reached by the end of step 1 (256 tokens)
    assert rc.warmup == 1 and rc.lr_rule == "tokens"
    # default micro-batch: the largest dividing every phase's per-rank batch (gcd 8 / world 2 = 4)
    assert rc_of("--batch-schedule", "8@0,32@2048", "--steps", "3").plan.micro_batch == 4


@pytest.mark.parametrize("extra, cfg, message", [
    (["--batch-schedule", "8@0,12@100", "--micro-batch", "4"], None, r"12 sequences, not a multiple of micro_batch 4 x world 2 = 8"),
    (["--batch-schedule", "9@0,27@100"], None, "common multiple of the world size 2"),
    (["--batch-schedule", "8@0,16@100", "--global-batch", "8"], None, "both set the global batch"),
    (["--batch-schedule", "8@0,16@100"], {"train_batch_size": 8, "zero_optimization": {"stage": 2}}, "train_batch_size=8"),
    (["--batch-schedule", "8@100"], None, "start at token 0"),
    (["--batch-schedule-lr", "sqrt"], None, "only with --batch-schedule"),
])
def test_resolve_errors(extra, cfg, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        rc_of(*extra, "--steps", "4", cfg=cfg)


def test_resolve_ramp_quantum_must_divide():
    # levels of gcd(8, 20) = 4 sequences cannot split into micro 2 x world 4 = 8
    with pytest.raises(UsageError, match=r"gcd\(8, 20\) = 4 sequences, not a multiple of micro_batch 2 x world 4 = 8"):
        rc_of("--batch-schedule", "ramp:8..20@0..100", "--micro-batch", "2", "--steps", "4", world=4)


# --- the loader ----------------------------------------------------------------------------------------
def test_loader_takes_exactly_the_scheduled_sequences(tmp_path):
    np.arange(4000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    t = build_step_table(parse_batch_schedule("4@0,8@40"), 4, max_steps=8)  # 4 x 4 tokens: steps 1-3, then 8
    loaders = [TokenBlockLoader(tmp_path / "train.bin", block_size=4, global_batch=4, micro_batch=1, rank=r,
                                world_size=2, seed=3) for r in range(2)]
    whole = TokenBlockLoader(tmp_path / "train.bin", block_size=4, global_batch=4, micro_batch=4, seed=3)
    seen = []
    for step in range(1, t.steps + 1):
        b = t.batch(step)
        ids = []
        for ld in loaders:
            ld.set_global_batch(b)
            for _ in range(ld.grad_accum):
                x, _ = next(ld)
                ids += (x[:, 0] // 4).tolist()
        assert len(ids) == b and loaders[0].grad_accum == b // 2
        seen += ids
        assert loaders[0].consumed == t.sequences_before(step + 1)
    # the blocks are exactly the global order's next sequences, nothing repeated or skipped
    assert seen == whole.order.take(0, t.sequences_before(t.steps + 1)).tolist()
    with pytest.raises(DataError, match="multiple of micro_batch 1 x world_size 2"):
        loaders[0].set_global_batch(5)
    next(loaders[0])
    with pytest.raises(DataError, match="middle of a step"):
        loaders[0].set_global_batch(8)


# --- the plot ------------------------------------------------------------------------------------------
def test_loss_plot_marks_phase_changes(tmp_path, monkeypatch):
    import matplotlib.axes

    from merit_ds.train.tracking import plot_losses

    lines = []
    orig = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda self, x, *a, **k: lines.append(x) or orig(self, x, *a, **k))
    records = [{"step": s, "loss": 5.0 - 0.1 * s, "global_batch": 8 if s <= 3 else (16 if s <= 5 else 32)}
               for s in range(1, 8)]
    assert plot_losses(records, tmp_path / "loss.png").exists()
    assert lines == [3.5, 5.5]


def test_export_counts_the_scheduled_tokens():
    from merit_ds.train.export import _tokens_at

    info = {"seq_len": 32, "global_batch": 4}
    sched = {"batch_schedule": {"segments": [[1, 3, 4], [4, 3, 16]]}, "tokens_per_step": 128}
    assert [_tokens_at(sched, info, s) for s in (0, 1, 3, 4, 6)] == [0, 128, 384, 896, 1920]
    assert _tokens_at({"tokens_per_step": 128}, info, 6) == 768
