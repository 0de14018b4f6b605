"""``results.csv`` -> what the study found: best lr per (optimizer, batch) with its seed spread and
an edge-of-grid flag, the large-batch penalty, the lr-vs-batch scaling exponent, steps to a target
loss (the critical-batch curve) and the measured gradient noise scale."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, median, stdev

from .grid import GridError

__all__ = ["load_results", "check_one_budget", "best_per_batch", "best_per_schedule", "fit_exponent",
           "steps_to_target", "critical_batch", "summarize", "quality_checks", "MAX_SE"]

_INT = ("batch", "seed", "tokens", "tokens_trained", "steps", "seq_len", "warmup", "diverged", "n_layer", "n_embd",
        "val_blocks", "curve_blocks", "n_params")
_FLOAT = ("lr", "final_val_loss", "max_attn_logit", "gns_b_noise", "wall_s", "gdiv_delta", "gdiv_bound", "gdiv_bound_data",
          "final_val_se", "step1_loss")


def load_results(path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in _INT:
                if r.get(k) not in (None, ""):
                    r[k] = int(float(r[k]))
            for k in _FLOAT:
                if r.get(k) not in (None, ""):
                    r[k] = float(r[k])
            rows.append(r)
    check_one_budget(rows)
    return rows


def check_one_budget(rows: list[dict]) -> int:
    """The single token budget of ``rows``; :class:`GridError` if they mix budgets (or lengths)."""
    budgets = sorted({int(r["tokens"]) for r in rows})
    if len(budgets) > 1:
        raise GridError(f"results mix token budgets {budgets}: a comparison across batch sizes is only fair at one "
                        f"budget; analyse each budget's cells separately")
    lengths = sorted({int(r["seq_len"]) for r in rows if r.get("seq_len") not in (None, "")})
    if len(lengths) > 1:
        raise GridError(f"results mix sequence lengths {lengths}")
    return budgets[0] if budgets else 0


def _loss(r: dict) -> float:
    v = float(r["final_val_loss"])
    return math.inf if int(r.get("diverged", 0)) or not math.isfinite(v) else v


def best_per_batch(rows: list[dict]) -> dict:
    """{optimizer: {batch: {...}}}: the lr with the lowest mean final val loss over seeds, that mean, the
    seed spread (std, and max-min) at it, ``edge`` ("low"/"high" when it is the smallest/largest lr of
    the grid: the optimum was not bracketed, None otherwise), the grid, and per-lr means."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["optimizer"], int(r["batch"]))][float(r["lr"])].append(r)
    out = defaultdict(dict)
    for (opt, batch), by_lr in groups.items():
        means = {lr: mean(_loss(r) for r in rs) if all(math.isfinite(_loss(r)) for r in rs) else math.inf
                 for lr, rs in by_lr.items()}
        grid = sorted(by_lr)
        best = min(grid, key=lambda lr: (means[lr], lr))
        losses = [_loss(r) for r in by_lr[best]]
        edge = None
        if len(grid) > 1 and best == grid[0]:
            edge = "low"
        elif len(grid) > 1 and best == grid[-1]:
            edge = "high"
        out[opt][batch] = {"lr": best, "loss": means[best], "std": stdev(losses) if len(losses) > 1 else 0.0,
                           "range": max(losses) - min(losses), "seeds": len(losses), "edge": edge, "grid": grid,
                           "means": means, "rows": by_lr[best], "all_rows": dict(by_lr)}
    return dict(out)


def fit_exponent(batches, lrs) -> float:
    """Least-squares slope of log(lr) against log(batch): lr ~ batch^alpha (0.5: sqrt rule, 1: linear)."""
    x = [math.log(b) for b in batches]
    y = [math.log(v) for v in lrs]
    if len(x) < 2:
        return math.nan
    mx, my = mean(x), mean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx else math.nan


def parse_curve(text: str) -> list[tuple[int, float]]:
    pts = []
    for part in str(text or "").split(";"):
        if ":" in part:
            s, v = part.split(":")
            pts.append((int(s), float(v)))
    return pts


def steps_to_target(curve: list[tuple[int, float]], target: float) -> float:
    """First (linearly interpolated) step at which the validation curve reaches ``target``; inf if never."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            s0, l0 = prev
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        prev = (step, loss)
    return math.inf


#: The default target loss sits this far above the worst best loss (curves are stored rounded, and a
#: seed may end a little above its mean).
TARGET_MARGIN = 0.01


def critical_batch(best: dict, target: float | None = None) -> tuple[float, dict]:
    """Steps to ``target`` at each (optimizer, batch)'s best lr, mean over seeds (inf if a seed never
    reaches it): ``(target, {opt: {batch: steps}})``. Default target: the highest end of any best-lr
    validation curve (over every optimizer, batch and seed) + :data:`TARGET_MARGIN`, so that every
    best-lr curve of every seed reaches it; on the curves' own validation set (which may be a subset
    of the final loss's: ``curve_blocks``)."""
    if target is None:
        ends = [parse_curve(r.get("val_curve"))[-1][1] for per in best.values() for v in per.values()
                if math.isfinite(v["loss"]) for r in v["rows"] if parse_curve(r.get("val_curve"))]
        ends = [e for e in ends if math.isfinite(e)]
        target = max(ends) + TARGET_MARGIN if ends else math.nan
    out = {}
    for opt, per in best.items():
        out[opt] = {}
        for batch, v in sorted(per.items()):
            steps = [steps_to_target(parse_curve(r.get("val_curve")), target) for r in v["rows"]]
            out[opt][batch] = mean(steps) if steps and all(math.isfinite(s) for s in steps) else math.inf
    return target, out


def _schedule(r: dict) -> str:
    return r.get("schedule") or "const"  # results.csv written before the schedules axis: all constant


def best_per_schedule(rows: list[dict]) -> dict:
    """{optimizer: {label: {...}}} over every schedule of the grid, all at the study's one budget:
    ``const b<B>`` for each constant batch and the schedule's text otherwise; per label the lr with
    the lowest mean final val loss over seeds, that mean, its seed std, the cell's steps and the
    batch it ends at. Diverged cells count as infinite loss."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        label = f"const b{int(r['batch'])}" if _schedule(r) == "const" else _schedule(r)
        groups[(r["optimizer"], label)][float(r["lr"])].append(r)
    out = defaultdict(dict)
    for (opt, label), by_lr in groups.items():
        means = {lr: mean(_loss(r) for r in rs) for lr, rs in by_lr.items()}
        lr = min(means, key=lambda x: (means[x], x))
        losses = [_loss(r) for r in by_lr[lr]]
        out[opt][label] = {"lr": lr, "loss": means[lr], "std": stdev(losses) if len(losses) > 1 else 0.0,
                           "seeds": len(losses), "steps": int(by_lr[lr][0]["steps"]),
                           "batch": int(by_lr[lr][0]["batch"]), "schedule": _schedule(by_lr[lr][0])}
    return dict(out)


def summarize(rows: list[dict], *, intervals: bool = False) -> dict:
    """Everything the report and the plots say, per optimizer. The batch-size analyses (best lr per
    batch, penalty, exponent, critical batch) read the constant-batch cells only; schedule cells are
    compared with them in ``schedules`` (:func:`best_per_schedule`). ``intervals``: also the 95%
    bootstrap intervals of :mod:`.intervals` (``summary["intervals"]``)."""
    budget = check_one_budget(rows)
    checks = quality_checks(rows)
    schedules = best_per_schedule(rows) if any(_schedule(r) != "const" for r in rows) else {}
    rows = [r for r in rows if _schedule(r) == "const"]
    if not rows:
        return {"budget": budget, "best": {}, "target": math.nan, "steps_to_target": {}, "per_optimizer": {},
                "schedules": schedules, "checks": checks}
    best = best_per_batch(rows)
    target, crit = critical_batch(best)
    per_opt = {}
    for opt, per in best.items():
        batches = sorted(per)
        lo, hi = batches[0], batches[-1]
        usable = [b for b in batches if per[b]["edge"] is None]
        noise = [float(r["gns_b_noise"]) for b in batches for r in per[b]["rows"]
                 if r.get("gns_b_noise") not in (None, "") and math.isfinite(float(r["gns_b_noise"]))]
        per_opt[opt] = {
            "batches": batches,
            "penalty": per[hi]["loss"] - per[lo]["loss"],
            "penalty_spread": math.hypot(per[hi]["std"], per[lo]["std"]),
            "exponent": fit_exponent(batches, [per[b]["lr"] for b in batches]),
            "exponent_bracketed": fit_exponent(usable, [per[b]["lr"] for b in usable]) if len(usable) >= 2 else math.nan,
            "edges": {b: per[b]["edge"] for b in batches if per[b]["edge"]},
            "b_noise": median(noise) if noise else math.nan,
            "max_attn_logit_largest": max((float(r["max_attn_logit"]) for r in per[hi]["rows"]), default=math.nan),
        }
    out = {"budget": budget, "best": best, "target": target, "steps_to_target": crit, "per_optimizer": per_opt,
           "schedules": schedules, "checks": checks}
    if intervals:
        from .intervals import bootstrap, fit_critical_batch

        out["intervals"] = bootstrap(rows, target=target if math.isfinite(target) else None)
        for opt, p in per_opt.items():
            bs = sorted(crit[opt])
            p["b_crit"] = fit_critical_batch(bs, [crit[opt][b] for b in bs])
            s0, s1 = crit[opt][bs[0]], crit[opt][bs[-1]]
            p["efficiency"] = (math.nan if len(bs) < 2 or not math.isfinite(s0) else
                               s0 * bs[0] / (s1 * bs[-1]) if math.isfinite(s1) else 0.0)
    return out


#: A cell's final validation loss should be measured to this standard error (nats) or better.
MAX_SE = 0.01


def quality_checks(rows: list[dict], min_steps: int | None = None) -> dict:
    """What the report must warn about: cells under ``min_steps`` (default :data:`.grid.MIN_STEPS`)
    optimizer steps, cells whose final loss has a standard error above :data:`MAX_SE`, and the code
    versions the rows come from (``{label: count}``; "unrecorded" for rows without one)."""
    from .grid import MIN_STEPS

    min_steps = MIN_STEPS if min_steps is None else min_steps
    def key(r):
        where = f"b{int(r['batch'])}" if (r.get("schedule") or "const") == "const" else r["schedule"]
        return f"{r['optimizer']}_{where}_lr{float(r['lr']):.3g}_s{int(r['seed'])}"

    short = sorted(((key(r), int(r["steps"]), int(r["batch"])) for r in rows
                    if r.get("steps") not in (None, "") and int(r["steps"]) < min_steps), key=lambda t: (t[1], t[0]))
    ses = [(key(r), float(r["final_val_se"])) for r in rows if r.get("final_val_se") not in (None, "")
           and math.isfinite(float(r["final_val_se"]))]
    versions = defaultdict(int)
    for r in rows:
        v = r.get("code_version") or ""
        versions[f"{r.get('code_commit') or 'unknown'} {v}" if v else "unrecorded"] += 1
    return {"min_steps": min_steps, "short": short, "se": ses, "se_missing": len(rows) - len(ses),
            "se_over": sorted([(k, v) for k, v in ses if v > MAX_SE], key=lambda kv: -kv[1]),
            "versions": dict(versions)}
