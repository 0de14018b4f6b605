"""merit_ds/study/intervals.py: the study's 95% intervals, on tables small enough to work by hand.

With two seeds and no evaluation noise the paired bootstrap has three outcomes per replicate:
both draws seed 0 (probability 1/4), both seed 1 (1/4), one of each (1/2). Each has probability
above 2.5%, so a 95% percentile interval runs exactly from the smallest outcome to the largest:
the expected intervals below are those extremes, worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from merit_ds.study.intervals import (REPLICATES, SEED, bootstrap, contains_zero, fit_critical_batch,
                                      percentile_interval, verdict)
from merit_ds.study.report import report_from_csv
from merit_ds.study.runner import write_results


def _row(opt, batch, lr, seed, loss, se=None, curve="0:8;10:6;20:5", steps=250, gns=10.0):
    r = {"optimizer": opt, "batch": batch, "schedule": "const", "lr": lr, "seed": seed, "tokens": 512_000,
         "tokens_trained": 512_000, "steps": steps, "seq_len": 32, "warmup": 5, "final_val_loss": loss,
         "max_attn_logit": 3.0, "gns_b_noise": gns, "diverged": int(not math.isfinite(loss)), "wall_s": 1.0,
         "val_curve": curve, "code_version": "k", "code_commit": "c"}
    if se is not None:
        r["final_val_se"] = se
    return r


def _table(spec, **kw):
    """spec: {(opt, batch): {lr: [loss per seed]}} -> rows."""
    return [_row(o, b, lr, s, loss, **kw) for (o, b), by_lr in spec.items() for lr, losses in by_lr.items()
            for s, loss in enumerate(losses)]


# --- the pieces -------------------------------------------------------------------------------------------

def test_percentile_interval_by_nearest_rank():
    # 1..100: a = 0.025 -> v[floor(2.5)] = v[2] = 3 and v[ceil(97.5) - 1] = v[97] = 98
    assert percentile_interval(np.arange(1, 101)) == (3.0, 98.0)
    # 1..40: v[floor(1.0)] = v[1] = 2, v[ceil(39.0) - 1] = v[38] = 39
    assert percentile_interval(np.arange(1, 41)) == (2.0, 39.0)
    # three outcomes, each more likely than 2.5%: the interval is their range
    assert percentile_interval([0.9] * 50 + [0.8] * 25 + [1.0] * 25) == (0.8, 1.0)
    # an outcome rarer than 2.5% (2 in 100) falls outside
    assert percentile_interval([5.0] * 2 + [1.0] * 98) == (1.0, 1.0)
    assert percentile_interval([1.0, math.inf, 2.0, 3.0]) == (1.0, math.inf)
    assert all(math.isnan(x) for x in percentile_interval([1.0, math.nan, 2.0]))
    # drop_nan: 1 NaN in 100 (<= 2.5%) is left out; 3 in 100 make the interval undefined
    assert percentile_interval([math.nan] + list(range(1, 100)), drop_nan=True) == (3.0, 97.0)
    assert all(math.isnan(x) for x in percentile_interval([math.nan] * 3 + [1.0] * 97, drop_nan=True))


def test_inconclusive_rule():
    assert verdict(-0.1, 0.2, "worse", "better") == "inconclusive"
    assert verdict(0.0, 0.2, "worse", "better") == "inconclusive"  # touching 0 is containing it
    assert verdict(-0.3, 0.0, "worse", "better") == "inconclusive"
    assert verdict(0.05, 0.2, "worse", "better") == "worse"
    assert verdict(-0.3, -0.1, "worse", "better") == "better"
    assert verdict(math.nan, 0.1, "worse", "better") == "n/a"
    assert contains_zero(-1, 1) and not contains_zero(0.1, 1) and not contains_zero(math.nan, 1)


def test_critical_batch_fit_by_hand():
    # S(B) = 100 (1 + 16 / B): 300 steps at 8, 125 at 64 -> (300 - 125) / (125/8 - 300/64) = 175 / 10.9375 = 16
    assert fit_critical_batch([8, 64], [300.0, 125.0]) == pytest.approx(16.0, abs=1e-12)
    assert fit_critical_batch([8, 16, 64], [300.0, 200.0, 125.0]) == pytest.approx(16.0, abs=1e-12)
    assert fit_critical_batch([8, 64], [800 / 8, 800 / 64]) == math.inf  # perfect scaling: S_min = 0
    assert fit_critical_batch([8, 64], [50.0, 50.0]) == 0.0  # no gain from the batch at all
    assert math.isnan(fit_critical_batch([8, 64], [50.0, math.inf]))


# --- the bootstrap: hand-worked ---------------------------------------------------------------------------

def test_penalty_interval_two_seeds_by_hand():
    # batch 8: 4.0 (seed 0), 4.2 (seed 1); batch 64: 5.0, 5.0. Draws {0,0}: 1.0, {1,1}: 0.8, {0,1}: 0.9
    rows = _table({("adamw", 8): {2e-3: [4.0, 4.2]}, ("adamw", 64): {4e-3: [5.0, 5.0]}})
    iv = bootstrap(rows)
    assert iv["seeds"] == [0, 1] and iv["replicates"] == REPLICATES and iv["seed"] == SEED
    assert iv["penalty"]["adamw"] == pytest.approx((0.8, 1.0), abs=1e-12)
    assert iv["best"]["adamw"][8] == pytest.approx((4.0, 4.2)) and iv["best"]["adamw"][64] == pytest.approx((5.0, 5.0))
    # the lrs: 2e-3 at 8, 4e-3 at 64 in every replicate: exponent log 2 / log 8 = 1/3 exactly
    assert iv["exponent"]["adamw"] == pytest.approx((1 / 3, 1 / 3), abs=1e-12)
    assert bootstrap(rows) == iv  # seeded: the same numbers every time


def test_best_lr_is_rechosen_in_every_replicate():
    # batch 64, lr 5e-2: 4.5 (seed 0), 5.1 (seed 1); lr 2.5e-2: 4.8, 4.8. {0,0}: min(4.5, 4.8) = 4.5 at 5e-2;
    # {1,1}: min(5.1, 4.8) = 4.8 at 2.5e-2; {0,1}: min(4.8, 4.8) = 4.8 (tie: the smaller lr). Batch 8: 4.0.
    rows = _table({("merit", 8): {1.2e-2: [4.0, 4.0]}, ("merit", 64): {2.5e-2: [4.8, 4.8], 5e-2: [4.5, 5.1]}})
    iv = bootstrap(rows)
    assert iv["best"]["merit"][64] == pytest.approx((4.5, 4.8))
    assert iv["penalty"]["merit"] == pytest.approx((0.5, 0.8))
    # best lr 5e-2 (exponent log(5e-2/1.2e-2)/log 8) or 2.5e-2 (log(2.5e-2/1.2e-2)/log 8)
    assert iv["exponent"]["merit"] == pytest.approx((math.log(2.5e-2 / 1.2e-2) / math.log(8),
                                                     math.log(5e-2 / 1.2e-2) / math.log(8)))


def test_differences_are_paired_by_seed():
    # seed 1 is hard for both optimizers at batch 64 (+0.6); per seed MERIT's penalty is 0.4 below AdamW's.
    # Paired: every replicate gives -0.4. Unpaired draws would range from 0.5 - 1.5 = -1.0 to 1.1 - 0.9 = +0.2.
    rows = _table({("merit", 8): {1e-2: [4.0, 4.0]}, ("merit", 64): {3e-2: [4.5, 5.1]},
                   ("adamw", 8): {2e-3: [4.0, 4.0]}, ("adamw", 64): {4e-3: [4.9, 5.5]}})
    iv = bootstrap(rows)
    assert iv["penalty"]["merit"] == pytest.approx((0.5, 1.1)) and iv["penalty"]["adamw"] == pytest.approx((0.9, 1.5))
    assert iv["difference"] == {("merit", "adamw"): pytest.approx((-0.4, -0.4), abs=1e-12)}
    assert verdict(*iv["difference"][("merit", "adamw")], "larger", "smaller") == "smaller"


def test_a_difference_that_straddles_zero_is_inconclusive(tmp_path):
    # MERIT's penalty 0.5 (seed 0) / 0.7 (seed 1), AdamW's 0.7 / 0.5: paired differences -0.2, +0.2, 0 -> [-0.2, +0.2]
    spec = {("merit", 8): {1e-2: [4.0, 4.0], 2e-2: [4.3, 4.3]}, ("merit", 64): {2e-2: [4.5, 4.7], 4e-2: [4.9, 4.9]},
            ("adamw", 8): {1e-3: [4.0, 4.0], 2e-3: [4.4, 4.4]}, ("adamw", 64): {2e-3: [4.7, 4.5], 4e-3: [4.9, 4.9]}}
    rows = _table(spec)
    iv = bootstrap(rows)
    assert iv["difference"][("merit", "adamw")] == pytest.approx((-0.2, 0.2))
    write_results(tmp_path, rows)
    text = report_from_csv(tmp_path / "results.csv")[0].read_text()
    assert "| MERIT - AdamW | +0.0000 | [-0.2000, +0.2000] | inconclusive |" in text
    assert "- MERIT - AdamW penalty: +0.0000 (95% interval [-0.2000, +0.2000]): inconclusive." in text
    assert "| MERIT | 8-64 | +0.6000 | [+0.5000, +0.7000] | penalty (worse at the largest batch) |" in text


def test_evaluation_noise_is_in_the_interval():
    # one seed (every draw is seed 0): the interval is the evaluation noise alone. Penalty = 1 + 0.01 (z1 - z2),
    # normal with sd 0.01 sqrt(2) = 0.01414: 95% interval 1 -+ 1.96 x 0.01414 = [0.9723, 1.0277] (up to sampling
    # error of the 2.5% quantile over 10,000 replicates, ~0.0006)
    rows = _table({("merit", 8): {1e-2: [4.0]}, ("merit", 64): {3e-2: [5.0]}}, se=0.01)
    lo, hi = bootstrap(rows)["penalty"]["merit"]
    assert lo == pytest.approx(1 - 1.96 * 0.01 * math.sqrt(2), abs=0.002)
    assert hi == pytest.approx(1 + 1.96 * 0.01 * math.sqrt(2), abs=0.002)
    # and none without it
    assert bootstrap(rows, jitter=False)["penalty"]["merit"] == pytest.approx((1.0, 1.0))


def test_steps_to_target_and_critical_batch_intervals_by_hand():
    # curves fall linearly from 8 to 4: seed 0 in 100 steps at batch 8, seed 1 in 200; at batch 64 in 20 and 40.
    # Target 4.01: reached at 99.75 / 199.5 steps (batch 8) and 19.95 / 39.9 (batch 64). Per draw the mean over
    # the drawn seeds: {0,0}, {1,1}, {0,1} -> batch 8: [99.75, 199.5], batch 64: [19.95, 39.9]; the efficiency
    # S(8) 8 / (S(64) 64) is 0.625 in every replicate, and so is B_crit: (S8 - S64) / (S64/8 - S8/64) with
    # S8 = 5 S64 -> 4 S64 / (S64/8 - 5 S64/64) = 4 / (3/64) = 85.33
    rows = [_row("merit", 8, 1e-2, 0, 4.0, curve="0:8;100:4"), _row("merit", 8, 1e-2, 1, 4.0, curve="0:8;200:4"),
            _row("merit", 64, 3e-2, 0, 4.0, curve="0:8;20:4"), _row("merit", 64, 3e-2, 1, 4.0, curve="0:8;40:4")]
    iv = bootstrap(rows, target=4.01)
    assert iv["steps"]["merit"][8] == pytest.approx((99.75, 199.5))
    assert iv["steps"]["merit"][64] == pytest.approx((19.95, 39.9))
    assert iv["efficiency"]["merit"] == pytest.approx((0.625, 0.625))
    assert iv["b_crit"]["merit"] == pytest.approx((256 / 3, 256 / 3))
    assert fit_critical_batch([8, 64], [5.0, 1.0]) == pytest.approx(256 / 3)


def test_noise_scale_interval_is_over_seeds_of_the_best_lr():
    rows = [_row("merit", 8, 1e-2, 0, 4.0, gns=10.0), _row("merit", 8, 1e-2, 1, 4.1, gns=30.0),
            _row("merit", 8, 2e-2, 0, 4.5, gns=999.0), _row("merit", 8, 2e-2, 1, 4.6, gns=999.0),
            _row("merit", 64, 3e-2, 0, 5.0, gns=20.0), _row("merit", 64, 3e-2, 1, 5.0, gns=40.0)]
    # best lrs 1e-2 and 3e-2; medians over the drawn seeds' cells at both batches: {0,0}: (10,10,20,20) -> 15;
    # {1,1}: (30,30,40,40) -> 35; {0,1}: (10,30,20,40) -> 25. The 999s of the worse lr never enter.
    assert bootstrap(rows)["b_noise"]["merit"] == pytest.approx((15.0, 35.0))


def test_a_diverged_seed_makes_its_lr_fail_in_the_replicates_that_draw_it():
    # batch 8, lr 1e-2 diverged on seed 1: {1,1} and {0,1} must use 2e-2 (4.5), {0,0} may use 1e-2 (3.9)
    rows = _table({("merit", 8): {1e-2: [3.9, math.inf], 2e-2: [4.5, 4.5]}, ("merit", 64): {3e-2: [5.0, 5.0]}})
    iv = bootstrap(rows)
    assert iv["best"]["merit"][8] == pytest.approx((3.9, 4.5))
    assert iv["penalty"]["merit"] == pytest.approx((0.5, 1.1))


def test_report_warns_about_short_cells_imprecise_losses_and_versions(tmp_path):
    rows = _table({("merit", 8): {1e-2: [4.0, 4.2]}, ("merit", 128): {3e-2: [5.0, 5.1]}}, se=0.004)
    for r in rows:
        r["steps"] = 512 if r["batch"] == 8 else 32
    rows[-1]["final_val_se"] = 0.03
    rows[0]["code_version"] = "other"
    write_results(tmp_path, rows)
    text = report_from_csv(tmp_path / "results.csv")[0].read_text()
    assert ("> **WARNING: 2 cell(s) trained fewer than 100 optimizer steps** (fewest: merit_b128_lr0.03_s0, 32 "
            "steps at batch 128)") in text
    assert "> **WARNING: 1 cell(s) have a final val loss standard error above 0.01 nats** (largest: " \
           "merit_b128_lr0.03_s1, 0.0300)" in text
    assert "> **WARNING: the cells do not all come from one recorded code version** (c k: 3 cell(s); c other: 1 cell(s))" in text
    assert "| MERIT | 8 | 0.01 (best) | 4.0000 +- 0.0040 | 4.2000 +- 0.0040 | 4.1000 |" in text
    # a clean table has no warning block
    ok = _table({("merit", 8): {1e-2: [4.0, 4.2]}, ("merit", 64): {3e-2: [5.0, 5.1]}}, se=0.004)
    write_results(tmp_path, ok)
    assert "WARNING" not in report_from_csv(tmp_path / "results.csv")[0].read_text()


def test_scale_gap_in_the_report(tmp_path):
    rows = _table({("merit", 8): {1e-2: [4.0, 4.2]}, ("merit", 64): {3e-2: [5.0, 5.1]}}, se=0.004, gns=16.0)
    for r in rows:
        r["steps"], r["n_params"] = (2000 if r["batch"] == 8 else 250), 233_216
    write_results(tmp_path, rows)
    text = report_from_csv(tmp_path / "results.csv")[0].read_text()
    assert "| optimizer steps at the largest batch | ~7,629 | 250 | 0.033 |" in text
    assert "| tokens per run | 4.8e+10 | 512,000 | 1.1e-05 |" in text
    assert "| batches (sequences) | 480 -> 6,144 (ratio 12.8) | 8 -> 64 (ratio 8.0) | |" in text
    assert "| model | GPT-2 Medium (355M parameters) | 233,216 parameters | 0.00066 |" in text
    assert "| largest batch / critical batch | ~6-12 (issue #24's estimate) | 4 (B_noise)" in text
