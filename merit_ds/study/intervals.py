"""95% intervals for what the study claims: a seeded, paired bootstrap over seeds, with each
cell's evaluation noise, the best lr re-chosen in every replicate.

The data: the constant-batch cells, one final validation loss ``L[o, b, lr, s]`` per optimizer o,
batch b, lr and seed s, with its standard error ``e`` over validation blocks (``final_val_se``).

One replicate:

1. **Seeds, paired**: draw ``n`` seeds with replacement from the study's ``n`` seeds. The same draw
   serves every optimizer, batch and lr, because a seed fixes the initial weights and the data order
   of all of them (:mod:`.cell`): a seed that is hard for one cell is hard for its partners, and a
   difference between optimizers keeps that pairing.
2. **Evaluation noise**: each cell's loss gets ``+ e z`` (``z`` standard normal, one per cell and
   replicate; a seed drawn twice keeps its ``z``). Independent across cells, which overstates the
   noise of a difference (all cells share the validation set): conservative.
3. **The lrs near the optimum**: per (optimizer, batch) the mean over the drawn seeds of every lr,
   and the best lr is the one with the lowest mean *in this replicate*: where neighbouring lrs are
   within the noise of each other the choice flips between them, and the interval carries that.

From each replicate: the best loss per (optimizer, batch); the **large-batch penalty** per
optimizer (best loss at the largest batch minus at the smallest); the **differences of
penalties**, MERIT minus each other optimizer (paired: the same replicate); the lr-vs-batch
**exponent** (least-squares slope of log best lr on log batch); the **steps to the common
target** at each batch (mean over the drawn seeds of the best lr's curve, linearly interpolated);
the **critical batch** fitted to them (``S(B) = S_min (1 + B_crit / B)``, McCandlish et al. 2018,
by least squares of S on 1/B); the scaling **efficiency** ``S(b0) b0 / (S(B) B)``; and the median
**gradient noise scale** of the best-lr cells. The interval is the 2.5% and 97.5% percentiles over
:data:`REPLICATES` replicates (nearest rank: :func:`percentile_interval`), drawn from
``numpy.random.default_rng(SEED)``: the same numbers on every run.

A claim whose interval contains 0 is **inconclusive** (:func:`verdict`). With 2-3 seeds the
bootstrap over seeds is narrow-biased (it cannot see variation the seeds did not show); the
report says so and says how many seeds there were.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

__all__ = ["SEED", "REPLICATES", "LEVEL", "percentile_interval", "verdict", "contains_zero", "bootstrap",
           "fit_critical_batch"]

SEED = 24  # issue #24
REPLICATES = 10_000
LEVEL = 0.95


def percentile_interval(values, level: float = LEVEL, *, drop_nan: bool = False) -> tuple[float, float]:
    """The ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of ``values`` by nearest rank: with the
    values sorted, ``v[floor(a n)]`` and ``v[ceil((1 - a) n) - 1]``, ``a = (1 - level) / 2`` (so an
    outcome with probability above ``a`` is inside). +-inf sort last/first. NaN (undefined in that
    replicate): ``(nan, nan)``, or with ``drop_nan`` the interval of the others as long as at most a
    share ``a`` of the values is NaN."""
    v = np.asarray(values, dtype=float).ravel()
    nan = np.isnan(v)
    if nan.any():
        if not drop_nan or nan.mean() > (1.0 - level) / 2.0:
            return math.nan, math.nan
        v = v[~nan]
    v = np.sort(v)
    n = len(v)
    if n == 0:
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    return float(v[int(math.floor(a * n + 1e-9))]), float(v[int(math.ceil((1.0 - a) * n - 1e-9)) - 1])


def contains_zero(lo: float, hi: float) -> bool:
    return not (math.isnan(lo) or math.isnan(hi)) and lo <= 0.0 <= hi


def verdict(lo: float, hi: float, positive: str, negative: str) -> str:
    """``"inconclusive"`` when the interval ``[lo, hi]`` contains 0, ``positive`` when it lies above
    0, ``negative`` below; ``"n/a"`` when it is undefined."""
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    if contains_zero(lo, hi):
        return "inconclusive"
    return positive if lo > 0 else negative


def fit_critical_batch(batches, steps) -> float:
    """``B_crit`` of ``S(B) = S_min (1 + B_crit / B)`` fitted to steps-to-target ``steps`` at ``batches``
    (least squares of S on 1/B: S = a + c/B, B_crit = c/a). Exact for two batches:
    ``B_crit = (S1 - S2) / (S2/B1 - S1/B2)``. ``inf`` where a <= 0 < c (steps still falling as fast as
    1/B: no critical batch below the largest batch), 0 where c <= 0 (no fall at all), nan if a step
    count is missing or infinite."""
    x = np.array([1.0 / b for b in batches], dtype=float)
    y = np.array(steps, dtype=float)
    if len(x) < 2 or not np.isfinite(y).all():
        return math.nan
    c, a = _line(x, y)
    return _bcrit(a, c)


def _line(x, y):
    mx, my = x.mean(), y.mean()
    sxx = ((x - mx) ** 2).sum()
    c = ((x - mx) * (y - my)).sum() / sxx
    return float(c), float(my - c * mx)


def _bcrit(a, c):
    if c <= 0:
        return 0.0
    if a <= 0:
        return math.inf
    return c / a


def _const(rows):
    return [r for r in rows if (r.get("schedule") or "const") == "const"]


def _f(v, default=math.nan) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _loss(r) -> float:
    v = _f(r.get("final_val_loss"))
    return math.inf if int(_f(r.get("diverged"), 0)) or not math.isfinite(v) else v


def bootstrap(rows: list[dict], *, target: float | None = None, replicates: int = REPLICATES, seed: int = SEED,
              level: float = LEVEL, jitter: bool = True, reference: str = "merit") -> dict:
    """Intervals (see the module docstring) from ``rows`` (results.csv rows; constant-batch cells are
    used). ``target``: the validation loss for steps to target (None: no step intervals). Returns::

        {"seeds": [...], "replicates": R, "seed": seed, "level": level,
         "best": {opt: {batch: (lo, hi)}},           # best loss per (optimizer, batch)
         "penalty": {opt: (lo, hi)}, "difference": {(reference, other): (lo, hi)},
         "exponent": {opt: (lo, hi)}, "steps": {opt: {batch: (lo, hi)}}, "efficiency": {opt: (lo, hi)},
         "b_crit": {opt: (lo, hi)}, "b_noise": {opt: (lo, hi)}, "batches": {opt: [b0, ..., B]}}
    """
    from .analysis import parse_curve, steps_to_target

    rows = _const(rows)
    seeds = sorted({int(r["seed"]) for r in rows})
    n = len(seeds)
    out = {"seeds": seeds, "replicates": replicates, "seed": seed, "level": level, "best": {}, "penalty": {},
           "difference": {}, "exponent": {}, "steps": {}, "efficiency": {}, "b_crit": {}, "b_noise": {},
           "batches": {}}
    if not rows:
        return out
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, n, size=(replicates, n))  # the same seeds for every optimizer, batch and lr: paired
    col = {s: i for i, s in enumerate(seeds)}
    groups = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        groups[(r["optimizer"], int(r["batch"]))][float(r["lr"])][col[int(r["seed"])]] = r
    best_r, lr_r, steps_r, gns_r = {}, {}, {}, defaultdict(list)
    for key in sorted(groups):
        by_lr = groups[key]
        lrs = sorted(by_lr)
        loss = np.full((len(lrs), n), np.nan)
        se = np.zeros((len(lrs), n))
        steps = np.full((len(lrs), n), np.nan)
        gns = np.full((len(lrs), n), np.nan)
        for i, lr in enumerate(lrs):
            for j, r in by_lr[lr].items():
                loss[i, j] = _loss(r)
                e = _f(r.get("final_val_se"), 0.0)
                se[i, j] = e if math.isfinite(e) and e > 0 else 0.0
                if target is not None:
                    steps[i, j] = steps_to_target(parse_curve(r.get("val_curve")), target)
                g = _f(r.get("gns_b_noise"))
                gns[i, j] = g if math.isfinite(g) else np.nan
        # evaluation noise, one z per cell and replicate (drawn for every group, in sorted order: deterministic)
        z = rng.standard_normal((replicates, len(lrs), n))
        noise = se[None] * z if jitter else np.zeros_like(z)
        noisy = np.where(np.isfinite(loss)[None], loss[None] + noise, loss[None])  # (R, lrs, seeds)
        picked = np.take_along_axis(noisy, np.broadcast_to(draw[:, None, :], noisy.shape), axis=2)
        with np.errstate(invalid="ignore"):
            means = _nanmean_inf(picked)  # (R, lrs): inf when a drawn seed diverged or none exists
        best_i = np.argmin(means, axis=1)  # ties: the smallest lr (as best_per_batch)
        rr = np.arange(replicates)
        best_r[key] = means[rr, best_i]
        lr_r[key] = np.asarray(lrs)[best_i]
        if target is not None:
            st = np.take_along_axis(steps[best_i], draw, axis=1)  # (R, n): the best lr's steps at the drawn seeds
            steps_r[key] = _nanmean_inf(st)
        # the noise scale: the point estimate's best lr (the lowest mean over all seeds)
        gns_r[key[0]].append(gns[int(np.argmin(_nanmean_inf(loss)))][draw])  # (R, n)
    by_opt = defaultdict(list)
    for opt, b in best_r:
        by_opt[opt].append(b)
    for opt, batches in by_opt.items():
        batches = sorted(batches)
        out["batches"][opt] = batches
        out["best"][opt] = {b: percentile_interval(best_r[(opt, b)], level) for b in batches}
        if len(batches) < 2:
            continue
        lo, hi = batches[0], batches[-1]
        with np.errstate(invalid="ignore"):
            pen = best_r[(opt, hi)] - best_r[(opt, lo)]
        out["penalty"][opt] = percentile_interval(pen, level)
        out.setdefault("_pen", {})[opt] = pen
        x = np.log(np.asarray(batches, dtype=float))
        y = np.log(np.stack([lr_r[(opt, b)] for b in batches], axis=1))  # (R, batches)
        xm = x - x.mean()
        out["exponent"][opt] = percentile_interval((y - y.mean(axis=1, keepdims=True)) @ xm / (xm @ xm), level)
        if target is not None:
            S = np.stack([steps_r[(opt, b)] for b in batches], axis=1)  # (R, batches)
            out["steps"][opt] = {b: percentile_interval(S[:, k], level) for k, b in enumerate(batches)}
            with np.errstate(invalid="ignore", divide="ignore"):
                eff = S[:, 0] * lo / (S[:, -1] * hi)  # the largest batch never reaching the target: 0
            eff = np.where(np.isfinite(S[:, 0]), np.where(np.isfinite(S[:, -1]), eff, 0.0), np.nan)
            out["efficiency"][opt] = percentile_interval(eff, level, drop_nan=True)
            out["b_crit"][opt] = percentile_interval(_bcrit_rows(batches, S), level, drop_nan=True)
        g = np.concatenate(gns_r[opt], axis=1)
        with np.errstate(invalid="ignore"), _quiet():
            out["b_noise"][opt] = percentile_interval(np.nanmedian(g, axis=1), level, drop_nan=True)
    pens = out.pop("_pen", {})
    if reference in pens:
        for other in sorted(pens):
            if other != reference:
                with np.errstate(invalid="ignore"):
                    out["difference"][(reference, other)] = percentile_interval(pens[reference] - pens[other], level)
    return out


def _nanmean_inf(a):
    """Mean over the last axis ignoring NaN (missing cells); inf if an entry is inf or all are NaN."""
    finite_or_inf = ~np.isnan(a)
    count = finite_or_inf.sum(axis=-1)
    total = np.where(finite_or_inf, a, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = total / count
    return np.where(count == 0, np.inf, m)


def _bcrit_rows(batches, S):
    x = 1.0 / np.asarray(batches, dtype=float)
    xm = x - x.mean()
    ok = np.isfinite(S).all(axis=1)
    Sf = np.where(ok[:, None], S, 0.0)
    c = (Sf - Sf.mean(axis=1, keepdims=True)) @ xm / (xm @ xm)
    a = Sf.mean(axis=1) - c * x.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(c <= 0, 0.0, np.where(a <= 0, np.inf, c / a))
    return np.where(ok, b, np.nan)


class _quiet:
    """numpy's all-NaN-slice warnings off (a cell without a noise scale is simply left out)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)
