"""The width-vs-depth report: ``results.csv`` rows with a ``family`` -> per family the steps to a
target loss vs batch (each optimizer), the scaling efficiency, and the gradient diversity.

Chen et al. 2018's claim, in these terms: at a fixed parameter count a wider family keeps cutting
the steps to a target loss further as the batch grows (its efficiency at large batch is higher),
and its gradient diversity (hence the batch bound n*Delta) is larger.

Steps are compared *within* a family, against that family's own smallest batch, so the target is
per family: the worst best-lr final loss over that family's optimizers and batches + 0.01 (every
curve of the family reaches it); families differ in loss, and a common target would be reached
by some families' large-batch cells only barely, or not at all.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import median

from .analysis import summarize

__all__ = ["family_summary", "family_plots", "family_report_lines", "FAMILY_PLOTS", "CHEN_CLAIM"]

FAMILY_PLOTS = ("family_steps_to_target.png", "family_diversity.png")
FAMILY_ORDER = {"wide": 0, "base": 1, "deep": 2}
FAMILY_COLORS = {"wide": "tab:orange", "base": "tab:purple", "deep": "tab:cyan"}
CHEN_CLAIM = ("Chen et al. 2018: at a fixed number of parameters, wider networks tolerate larger batches (more "
              "gradient diversity, so a batch up to ~n*Delta loses little per-example progress).")


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _families(rows) -> list[str]:
    return sorted({r.get("family") or "" for r in rows}, key=lambda f: (FAMILY_ORDER.get(f, 9), f))


def family_summary(rows: list[dict]) -> dict:
    """{family: {"shape", "summary" (analysis.summarize of its rows), "efficiency" {opt: {batch: e}},
    "diversity" {opt: {batch: {delta, bound, bound_data}}}}}; efficiency e(b) = steps(b0) b0 / (steps(b) b)
    (1: perfect scaling from the smallest batch b0, 0.5: twice the examples needed)."""
    out = {}
    for fam in _families(rows):
        sub = [r for r in rows if (r.get("family") or "") == fam]
        summ = summarize(sub)
        eff, div = {}, {}
        for opt, per in summ["steps_to_target"].items():
            bs = sorted(per)
            b0 = bs[0]
            eff[opt] = {b: (per[b0] * b0 / (per[b] * b) if _finite(per[b]) and _finite(per[b0]) else math.nan)
                        for b in bs}
        for opt, per in summ["best"].items():
            div[opt] = {}
            for b, v in per.items():
                vals = {k: [float(r[k]) for r in v["rows"] if _finite(r.get(k))] for k in ("gdiv_delta", "gdiv_bound",
                                                                                             "gdiv_bound_data")}
                div[opt][b] = {k: (median(x) if x else math.nan) for k, x in vals.items()}
        r0 = sub[0]
        shape = (f"{r0.get('n_layer')} x {r0.get('n_embd')}" if r0.get("n_layer") not in (None, "") else "")
        out[fam] = {"shape": shape, "summary": summ, "efficiency": eff, "diversity": div}
    return out


def _fmt(x, spec=".1f"):
    return format(float(x), spec) if _finite(x) else "n/a"


def family_plots(fs: dict, out: Path, labels: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, paths = Path(out), []
    opts = sorted({o for f in fs.values() for o in f["summary"]["steps_to_target"]})
    # 1. steps to the family's target vs batch, one panel per optimizer, a line per family
    fig, axes = plt.subplots(1, len(opts), figsize=(5.2 * len(opts), 4.3), squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for fam, f in fs.items():
            per = f["summary"]["steps_to_target"].get(opt, {})
            bs = [b for b in sorted(per) if _finite(per[b])]
            if not bs:
                continue
            c = FAMILY_COLORS.get(fam)
            ax.plot(bs, [per[b] for b in bs], "o-", color=c, label=f"{fam} ({f['shape']})")
            ax.plot(bs, [per[bs[0]] * bs[0] / b for b in bs], "--", color=c, alpha=0.35)
        _log_log(ax, "global batch (sequences)")
        ax.set_title(labels.get(opt, opt))
    axes[0][0].set_ylabel("steps to the family's target val loss")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Steps to target vs batch per family (dashed: perfect scaling from the smallest batch)", fontsize=10)
    fig.tight_layout()
    paths.append(out / FAMILY_PLOTS[0]); fig.savefig(paths[-1], dpi=110); plt.close(fig)

    # 2. gradient diversity per family: n*Delta and its extrapolation vs batch, per optimizer
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.3), squeeze=False)
    markers = {o: m for o, m in zip(opts, "os^v")}
    for fam, f in fs.items():
        c = FAMILY_COLORS.get(fam)
        for opt in opts:
            per = f["diversity"].get(opt, {})
            bs = sorted(per)
            for ax, key in zip(axes[0], ("gdiv_bound", "gdiv_bound_data")):
                pts = [(b, per[b][key]) for b in bs if _finite(per[b][key]) and per[b][key] > 0]
                if pts:
                    ax.plot(*zip(*pts), marker=markers[opt], color=c, label=f"{fam}, {labels.get(opt, opt)}")
    axes[0][0].set_title("n x Delta on the probe (capped near n)", fontsize=10)
    axes[0][1].set_title("extrapolated to a large data set: (n-1)S/(T-S)", fontsize=10)
    for ax in axes[0]:
        _log_log(ax, "global batch of the cell (sequences)")
    axes[0][0].set_ylabel("batch bound (sequences)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Gradient diversity per family (best-lr cells; median over the second half of training)", fontsize=10)
    fig.tight_layout()
    paths.append(out / FAMILY_PLOTS[1]); fig.savefig(paths[-1], dpi=110); plt.close(fig)
    return paths


def family_report_lines(fs: dict, labels: dict) -> list[str]:
    lines = ["## Width vs depth: model families at a fixed parameter count", "", f"- {CHEN_CLAIM}", ""]
    allb = sorted({b for f in fs.values() for per in f["summary"]["steps_to_target"].values() for b in per})
    lines += ["### Steps to target vs batch (each family's own target)", "",
              "| family | shape (layers x width) | optimizer | target val loss | " +
              " | ".join(f"steps at {b}" for b in allb) + " | " + " | ".join(f"efficiency at {b}" for b in allb[1:]) + " |",
              "|---|---|---|---|" + "---|" * (2 * len(allb) - 1)]
    for fam, f in fs.items():
        s = f["summary"]
        for opt in sorted(s["steps_to_target"]):
            per, eff = s["steps_to_target"][opt], f["efficiency"][opt]
            lines.append(f"| {fam} | {f['shape']} | {labels.get(opt, opt)} | {_fmt(s['target'], '.3f')} | " +
                         " | ".join(_fmt(per.get(b)) for b in allb) + " | " +
                         " | ".join(_fmt(eff.get(b), '.2f') for b in allb[1:]) + " |")
    lines += ["", "Efficiency at batch b = steps(b0) b0 / (steps(b) b), b0 the smallest batch: 1 is perfect scaling "
              "(b/b0 times fewer steps), 0.5 means twice the examples for the same loss. Chen et al. predict a "
              "higher efficiency at large batch for the wider family.", "",
              "### Best final val loss per family", "",
              "| family | optimizer | " + " | ".join(f"batch {b}" for b in allb) + " |", "|---|---|" + "---|" * len(allb)]
    for fam, f in fs.items():
        for opt, per in sorted(f["summary"]["best"].items()):
            lines.append(f"| {fam} | {labels.get(opt, opt)} | " +
                         " | ".join(f"{_fmt(per[b]['loss'], '.3f')} (lr {per[b]['lr']:.3g})" if b in per else "n/a"
                                    for b in allb) + " |")
    lines += ["", "### Gradient diversity per family", "",
              "Median over the diagnostics steps of the second half of each cell (best-lr cells), then over the "
              "family's batches: Delta, the bound n*Delta (n = the probe's sequences; it cannot exceed about n), "
              "its extrapolation to a large data set (n-1)S/(T-S), and the loop's gradient noise scale.", "",
              "| family | optimizer | Delta | n x Delta | extrapolated bound | B_noise |", "|---|---|---|---|---|---|"]
    for fam, f in fs.items():
        for opt in sorted(f["diversity"]):
            per = f["diversity"][opt]
            med = {k: median([v[k] for v in per.values() if _finite(v[k])] or [math.nan])
                   for k in ("gdiv_delta", "gdiv_bound", "gdiv_bound_data")}
            bn = f["summary"]["per_optimizer"][opt]["b_noise"]
            lines.append(f"| {fam} | {labels.get(opt, opt)} | {_fmt(med['gdiv_delta'], '.3f')} | "
                         f"{_fmt(med['gdiv_bound'], '.2f')} | {_fmt(med['gdiv_bound_data'], '.1f')} | {_fmt(bn)} |")
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in FAMILY_PLOTS), ""]
    return lines


def _log_log(ax, xlabel: str) -> None:
    """Batch on a log2 axis, the quantity on a log axis, a light grid: both family plots."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
