"""Gradient diversity (merit_ds/train/diversity.py) and model families (merit_ds/train/families.py).

Reference for the diversity: a direct loop, one backward per example on the model itself
(``loss.backward()``, ``p.grad``), against the vmap(grad) per-example gradients of the probe. In
fp32 the two differ by float rounding only (~1e-9 per element on this model), so the tolerance is
rtol 1e-5 / atol 1e-7 on the sums; a wrong reduction (a mean instead of a sum, a gradient of the
whole batch's loss, one example dropped) is off by O(1)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _dist import REPO_ROOT, TESTS_DIR, dist_env, launch

from merit_ds.train.diversity import GradientDiversity, diversity_from_sums
from merit_ds.train.families import (FAMILIES, FamilyError, non_embedding_params, solve_shape)
from merit_ds.train.presets import count_parameters

RTOL, ATOL = 1e-5, 1e-7


def small_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=64, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, use_cache=False, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                     attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


def direct_sums(model, x, y):
    """sum_i ||g_i||^2 and sum_i g_i from one backward per example (the reference)."""
    sq, total = 0.0, None
    for i in range(x.size(0)):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=x[i:i + 1]).logits
        F.cross_entropy(logits.view(-1, logits.size(-1)), y[i]).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        sq += float(flat.pow(2).sum())
        total = flat if total is None else total + flat
    model.zero_grad(set_to_none=True)
    return sq, total


def test_from_sums_by_hand():
    # g1 = (1, 0), g2 = (0, 1): S = 2, T = 2 -> Delta 1, bound 2; T <= S: no extrapolation
    r = diversity_from_sums(2.0, 2.0, 2)
    assert (r["gdiv_delta"], r["gdiv_bound"], r["gdiv_n"]) == (1.0, 2.0, 2) and math.isnan(r["gdiv_bound_data"])
    # g1 = g2 = (1, 0): S = 2, T = 4 -> Delta 0.5, bound 1 (identical gradients: no diversity); (n-1)S/(T-S) = 1
    r = diversity_from_sums(2.0, 4.0, 2)
    assert (r["gdiv_delta"], r["gdiv_bound"], r["gdiv_bound_data"]) == (0.5, 1.0, 1.0)


def test_matches_direct_per_example_loop():
    model = small_gpt2()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (5, 16), generator=g)
    y = (x + 1) % 64  # one rule for every example: the per-example gradients share a direction (T > S)
    sq, total = direct_sums(model, x, y)
    want = diversity_from_sums(sq, float(total.pow(2).sum()), 5)
    model.train()
    rng = torch.get_rng_state()
    got = GradientDiversity(probe=5, chunk=2).measure(model, x, y, zero_stage=0)  # chunks of 2, 2, 1
    assert got["gdiv_n"] == 5 and math.isfinite(want["gdiv_bound_data"])
    for k in ("gdiv_delta", "gdiv_bound", "gdiv_bound_data"):
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL)
    assert 1 / 5 <= got["gdiv_delta"]  # Cauchy-Schwarz: ||sum g||^2 <= n sum ||g||^2
    # nothing left behind: no .grad, the mode as it was, no random number drawn
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    # a negative control: the batch-mean gradient's norm in place of the per-example sum is far off
    model.zero_grad()
    logits = model(input_ids=x).logits
    F.cross_entropy(logits.view(-1, 64), y.reshape(-1)).backward()
    mean_g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    assert abs(sq / float((5 * mean_g).pow(2).sum()) - want["gdiv_delta"]) < 1e-5  # the same T, computed another way
    assert abs(sq / float(mean_g.pow(2).sum()) - want["gdiv_delta"]) > 1.0


def test_probe_bounds_the_examples():
    model = small_gpt2()
    x, y = torch.randint(0, 64, (6, 16)), torch.randint(0, 64, (6, 16))
    got = GradientDiversity(probe=3).measure(model, x, y, zero_stage=0)
    sq, total = direct_sums(model, x[:3], y[:3])
    assert got["gdiv_n"] == 3
    torch.testing.assert_close(got["gdiv_delta"], sq / float(total.pow(2).sum()), rtol=RTOL, atol=ATOL)
    assert GradientDiversity(probe=0).measure(model, x, y, zero_stage=0) is None
    with pytest.raises(ValueError):
        GradientDiversity(probe=-1)


@pytest.mark.slow  # 2 launched ranks
def test_two_ranks_equal_single_process_on_the_union():
    """2 ranks (gloo): plain process group, and a DeepSpeed ZeRO-3 engine (parameters partitioned,
    gathered for the probe); each rank probes its own 3 examples; rank 0 compares with one process
    on all 6."""
    r = launch(TESTS_DIR / "diversity_worker.py", nprocs=2, timeout=600)
    assert r["n"] == [6, 6]
    assert r["partitioned_before_after"] == [True, True]  # ZeRO-3 gathered for the probe only
    for key in ("plain", "zero3"):
        got, want = r[key], r["single"]
        for k in ("gdiv_delta", "gdiv_bound", "gdiv_bound_data"):
            torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=f"{key} {k}")
    assert math.isfinite(r["single"]["gdiv_bound_data"])
    # negative control: one rank's examples alone give another value
    assert abs(r["rank0_alone"]["gdiv_delta"] - r["single"]["gdiv_delta"]) > 1e-3


# --- the training loop: the diagnostic does not change the trajectory ---------------------------------

@pytest.mark.slow  # training-loop processes
def test_loop_losses_bitwise_equal_with_and_without_diversity(tmp_path):
    rng = np.random.default_rng(0)
    rng.integers(0, 256, size=30_000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    rng.integers(0, 256, size=4_000, dtype=np.uint16).tofile(tmp_path / "val.bin")
    runs = {}
    for probe, stage in ((0, "2"), (4, "2"), (4, "3")):
        out = tmp_path / f"run{probe}" if stage == "2" else tmp_path / "zero3"
        cmd = [sys.executable, "-m", "merit_ds.train", "--model", "tiny", "--model-override", "n_layer=1",
               "--model-override", "n_embd=32", "--model-override", "n_head=2", "--model-override", "vocab_size=256",
               "--seq-len", "16", "--global-batch", "8", "--micro-batch", "2", "--zero-stage", stage, "--precision", "fp32",
               "--steps", "6", "--diag-every", "2", "--eval-every", "3", "--ckpt-every", "0", "--tracker", "none",
               "--no-progress", "--no-export", "--diversity-probe", str(probe), "--data", str(tmp_path), "--out", str(out)]
        p = subprocess.run(cmd, cwd=REPO_ROOT, env=dist_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs[probe if stage == "2" else "zero3"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert ("gradient diversity at step 6: Delta" in p.stdout) == (probe > 0)
    loss = lambda recs, k: [(r["step"], r[k]) for r in recs if k in r]  # noqa: E731
    assert loss(runs[0], "loss") == loss(runs[4], "loss") and len(loss(runs[0], "loss")) == 6
    assert loss(runs[0], "val_loss") == loss(runs[4], "val_loss")
    assert loss(runs[0], "gns_b_noise") == loss(runs[4], "gns_b_noise")
    div = [r for r in runs[4] if "gdiv_delta" in r]
    assert [r["step"] for r in div] == [1, 2, 4, 6] and not any("gdiv_delta" in r for r in runs[0])
    for r in div:  # 4 of the step's 8 sequences (micro 2 x accum 4), world 1
        assert r["gdiv_n"] == 4 and r["gdiv_batch"] == 8
        assert 1 / 4 <= r["gdiv_delta"] and r["gdiv_bound"] == pytest.approx(4 * r["gdiv_delta"])
    # ZeRO-3 (parameters partitioned, gathered for the probe): the same measurement; after step 1 the
    # weights are the ZeRO-2 run's up to reduction order (later steps may drift: MERIT amplifies last bits)
    div3 = [r for r in runs["zero3"] if "gdiv_delta" in r]
    assert [r["step"] for r in div3] == [1, 2, 4, 6] and all(r["gdiv_n"] == 4 for r in div3)
    torch.testing.assert_close(div3[0]["gdiv_delta"], div[0]["gdiv_delta"], rtol=1e-4, atol=0)
    assert (tmp_path / "run4" / "diversity.png").stat().st_size > 0 and not (tmp_path / "run0" / "diversity.png").exists()


# --- model families -------------------------------------------------------------------------------------

def test_non_embedding_count_matches_the_model():
    assert non_embedding_params(12, 768) == 85_056_000  # GPT-2 Small without wte/wpe
    for L, d in ((12, 768), (3, 64), (7, 48)):
        assert non_embedding_params(L, d) == count_parameters(L, d, 64, 100) - 100 * d - 64 * d
    m = small_gpt2()
    n = sum(p.numel() for name, p in m.named_parameters() if "wte" not in name and "wpe" not in name)
    assert n == non_embedding_params(2, 32)


@pytest.mark.parametrize("params,head_dim", [(2e5, 16), (85e6, 64), (3e8, 64), (1.5e5, 8)])
def test_families_within_tolerance_and_ordered(params, head_dim):
    shapes = {f: solve_shape(f, params, head_dim=head_dim) for f in FAMILIES}
    for s in shapes.values():
        assert abs(s.params / params - 1) <= 0.05
        assert s.params == non_embedding_params(s.n_layer, s.n_embd)
        assert s.n_embd % head_dim == 0 and s.n_head * head_dim == s.n_embd
    w, b, d = shapes["wide"], shapes["base"], shapes["deep"]
    assert w.n_embd > b.n_embd > d.n_embd and w.n_layer < b.n_layer < d.n_layer


def test_family_shapes_at_the_study_size():
    got = {f: (s.n_layer, s.n_embd, s.n_head) for f, s in ((f, solve_shape(f, 2e5, head_dim=16)) for f in FAMILIES)}
    assert got == {"wide": (1, 128, 8), "base": (4, 64, 4), "deep": (7, 48, 3)}


def test_family_errors_and_fixed_depth():
    s = solve_shape("L4", 2e5, head_dim=8)
    assert (s.n_layer, s.n_embd, s.params) == (4, 64, 200_064)
    with pytest.raises(FamilyError, match="nearest: 6 x 48"):
        solve_shape("L6", 2e5, head_dim=8)  # 48 -> -15.1%, 56 -> +15.1%
    with pytest.raises(FamilyError, match="unknown model family"):
        solve_shape("tall", 2e5)
    with pytest.raises(FamilyError, match="within 5%"):
        solve_shape("wide", 1e5, head_dim=16)  # 1 layer: 88 -> -5.8%, 96 -> +12%
    with pytest.raises(FamilyError, match="positive"):
        solve_shape("base", 0)


def test_resolve_family_and_its_errors():
    from merit_ds.train.loop import parse_args
    from merit_ds.train.run_config import UsageError, resolve

    base = ["--data", "d", "--out", "o", "--model", "tiny", "--steps", "2", "--zero-stage", "0"]
    rc = resolve(parse_args(base + ["--family", "deep", "--params", "2e5", "--head-dim", "16"]), launcher="deepspeed",
                 world=1, cpu=True)
    assert (rc.overrides["n_layer"], rc.overrides["n_embd"], rc.overrides["n_head"]) == (7, 48, 3)
    assert rc.family.describe().startswith("family deep: 7 layers x 48 wide, 3 heads")
    with pytest.raises(UsageError, match="go together"):
        resolve(parse_args(base + ["--family", "deep"]), launcher="deepspeed", world=1, cpu=True)
    with pytest.raises(UsageError, match="drop --model-override n_layer"):
        resolve(parse_args(base + ["--family", "deep", "--params", "2e5", "--model-override", "n_layer=2"]),
                launcher="deepspeed", world=1, cpu=True)


# --- the study's family axis and the width-depth report -------------------------------------------------

def test_width_depth_grid(tmp_path):
    from merit_ds.study.__main__ import build_parser, grid_from_args
    from merit_ds.study.cell import cell_args
    from merit_ds.study.runner import study_identity

    g = grid_from_args(build_parser().parse_args(["--out", str(tmp_path / "w"), "--preset", "width-depth"]),
                       prepare_data=False)
    cells = g.cells()
    assert len(cells) == 24 and g.families == ["wide", "base", "deep"] and g.tokens == 409_600
    merit = {c.batch: c.lr for c in cells if c.family == "deep" and c.optimizer == "merit"}
    assert merit == {8: 0.012, 16: 0.017, 32: 0.024, 64: 0.0339}  # 1.2e-2 x sqrt(b / 8), 3 digits
    assert {c.batch: c.lr for c in cells if c.family == "wide" and c.optimizer == "adamw"}[32] == 0.004
    assert cells[0].key == "wide_merit_b8_lr0.012_s0" and len({c.key for c in cells}) == 24
    args = cell_args(cells[0], dict(g.settings, tokens=g.tokens), tmp_path)
    assert args[args.index("--family") + 1] == "wide" and args[args.index("--params") + 1] == "200000"
    assert args[args.index("--head-dim") + 1] == "16" and args[args.index("--diversity-probe") + 1] == "8"
    assert study_identity(g)["params"] == 200_000
    # the default study's identity is unchanged (its committed study.json still matches)
    d = grid_from_args(build_parser().parse_args(["--out", str(tmp_path / "d")]), prepare_data=False)
    assert "params" not in study_identity(d) and d.families == [] and d.cells()[0].key == "merit_b8_lr0.006_s0"
    from merit_ds.study.grid import Grid, GridError

    with pytest.raises(GridError, match="needs --params"):
        Grid(["merit"], [8], {"merit": [1e-2]}, [0], 4096, {"seq_len": 8}, ["wide"]).check()
    with pytest.raises(GridError, match="unknown model family"):
        Grid(["merit"], [8], {"merit": [1e-2]}, [0], 4096, {"seq_len": 8, "params": 2e5}, ["tall"]).check()


def test_family_report_from_a_synthetic_table(tmp_path):
    """Two families, one optimizer, batches 8 and 32: the wide family's steps to target fall 4x (efficiency
    1.0), the deep family's 2x (0.5); the numbers in report.md are these."""
    import csv

    from merit_ds.study.report import report_from_csv
    from merit_ds.study.runner import COLUMNS

    rows = []
    # val curves: loss falls linearly 6 -> 4 over the steps; target = worst best loss + 0.01
    for fam, (L, d), steps_to_4 in (("wide", (1, 128), {8: 400, 32: 100}), ("deep", (7, 48), {8: 400, 32: 200})):
        for b in (8, 32):
            n = steps_to_4[b]
            curve = ";".join(f"{s}:{6 - 2 * s / n:.7g}" for s in range(0, n + 1, n // 4))
            rows.append({"optimizer": "merit", "batch": b, "lr": 0.01, "seed": 0, "tokens": 4096, "tokens_trained": 4096,
                         "steps": n, "seq_len": 8, "warmup": 1, "final_val_loss": 4.0, "max_attn_logit": 3.0,
                         "gns_b_noise": 10.0, "diverged": 0, "wall_s": 1.0, "val_curve": curve, "family": fam,
                         "n_layer": L, "n_embd": d, "gdiv_delta": 0.9 if fam == "wide" else 0.5,
                         "gdiv_bound": 7.2 if fam == "wide" else 4.0, "gdiv_bound_data": 50.0 if fam == "wide" else 8.0})
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    report, plots, fs = report_from_csv(tmp_path / "results.csv", tmp_path)
    # target 4.01: reached at step n * (6 - 4.01) / 2 = 0.995 n
    assert fs["wide"]["summary"]["steps_to_target"]["merit"] == pytest.approx({8: 398.0, 32: 99.5})
    assert fs["wide"]["efficiency"]["merit"][32] == pytest.approx(1.0)
    assert fs["deep"]["efficiency"]["merit"][32] == pytest.approx(0.5)
    text = report.read_text()
    assert "| wide | 1 x 128 | MERIT | 4.010 | 398.0 | 99.5 | 1.00 |" in text
    assert "| deep | 7 x 48 | MERIT | 4.010 | 398.0 | 199.0 | 0.50 |" in text
    assert "| wide | MERIT | 0.900 | 7.20 | 50.0 | 10.0 |" in text and "| deep | MERIT | 0.500 | 4.00 | 8.0 | 10.0 |" in text
    assert [p.name for p in plots] == ["family_steps_to_target.png", "family_diversity.png"]
    assert all(p.stat().st_size > 10_000 for p in plots)


def test_the_cost_benchmark_times_the_loops_default_probe():
    """benchmarks/bench_diag_cost.py states the cost of the default cadences: it must time the
    probe size the loop uses by default."""
    import importlib.util

    from merit_ds.train.loop import parse_args

    spec = importlib.util.spec_from_file_location("bench_diag_cost", REPO_ROOT / "benchmarks" / "bench_diag_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = parse_args(["--data", "d", "--out", "o"])
    assert bench.DIVERSITY_PROBE == args.diversity_probe
    assert (args.diag_every, args.eval_every) in bench.CADENCES.values()
