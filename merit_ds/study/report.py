"""PNG plots and ``report.md`` from ``results.csv`` (nothing else is read: a synthetic table works)."""

from __future__ import annotations

import math
from pathlib import Path

from merit_ds.optim import registry

from .analysis import check_one_budget, load_results, summarize

__all__ = ["make_plots", "write_report", "report_from_csv", "PLOTS", "PAPER_CLAIM"]

PLOTS = ("best_loss_vs_batch.png", "lr_sensitivity.png", "max_attn_logit.png", "critical_batch.png")


def labels() -> dict[str, str]:
    """Optimizer name -> label, for every registered optimizer (:mod:`merit_ds.optim.registry`)."""
    return {s.name: s.label for s in registry.specs()}


def _color(o):
    spec = registry.find(o)
    return None if spec is None else spec.color

PAPER_CLAIM = ("MERIT paper: GPT-2 Medium trained at batch 6k matches batch 480 at 48B tokens (no large-batch "
               "penalty), while AdamW degrades at large batch and LAMB only partly closes the gap.")


def _label(o):
    return labels().get(o, o)


def make_plots(summary: dict, rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    best, paths = summary["best"], []
    title = f"budget {summary['budget']:,} tokens"

    # 1. best final val loss vs batch, winning lr on each point, seed spread as error bars
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for opt, per in sorted(best.items()):
        bs = sorted(per)
        ys = [per[b]["loss"] for b in bs]
        ax.errorbar(bs, ys, yerr=[per[b]["std"] for b in bs], marker="o", capsize=4, label=_label(opt),
                    color=_color(opt))
        for b, y in zip(bs, ys):
            if math.isfinite(y):
                flag = {"low": " (edge-)", "high": " (edge+)"}.get(per[b]["edge"], "")
                ax.annotate(f"{per[b]['lr']:.2g}{flag}", (b, y), textcoords="offset points", fontsize=8,
                            xytext=(4, 6 - 12 * sorted(best).index(opt)), color=_color(opt))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (sequences)")
    ax.set_ylabel("best final val loss (mean over seeds)")
    ax.set_title(f"Best val loss vs batch; label = winning peak lr ({title})")
    ax.legend()
    fig.tight_layout()
    paths.append(out / PLOTS[0]); fig.savefig(paths[-1], dpi=110); plt.close(fig)

    # 2. val loss vs lr, one panel per batch (sensitivity)
    batches = sorted({int(r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4), sharey=True, squeeze=False)
    finite = [v for per in best.values() for b in per.values() for v in b["means"].values() if math.isfinite(v)]
    ceiling = max(finite) + 0.5 if finite else 10
    for ax, b in zip(axes[0], batches):
        for opt, per in sorted(best.items()):
            if b not in per:
                continue
            lrs = per[b]["grid"]
            ys = [min(per[b]["means"][lr], ceiling) for lr in lrs]
            ax.plot(lrs, ys, marker="o", label=_label(opt), color=_color(opt))
            for lr in lrs:
                if not math.isfinite(per[b]["means"][lr]):
                    ax.plot([lr], [ceiling], marker="x", color="k")
        ax.set_xscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("peak lr")
    axes[0][0].set_ylabel("final val loss (mean over seeds; x = diverged)")
    axes[0][0].legend()
    fig.suptitle(f"lr sensitivity ({title})")
    fig.tight_layout()
    paths.append(out / PLOTS[1]); fig.savefig(paths[-1], dpi=110); plt.close(fig)

    # 3. max attention logit (max over training) at the largest batch, per optimizer, vs lr
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for opt, per in sorted(best.items()):
        hi = max(per)
        pts = sorted((float(r["lr"]), float(r["max_attn_logit"])) for r in rows
                     if r["optimizer"] == opt and int(r["batch"]) == hi and r.get("max_attn_logit") not in (None, ""))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="", label=f"{_label(opt)} (batch {hi})",
                    color=_color(opt))
            ax.axvline(per[hi]["lr"], color=_color(opt), linestyle=":", alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak lr (dotted: best lr)")
    ax.set_ylabel("max attention logit over training")
    ax.set_title(f"Max attention logit at the largest batch ({title})")
    ax.legend()
    fig.tight_layout()
    paths.append(out / PLOTS[2]); fig.savefig(paths[-1], dpi=110); plt.close(fig)

    # 4. steps to a target loss vs batch + perfect scaling + the measured gradient noise scale
    fig, ax = plt.subplots(figsize=(7, 4.5))
    crit = summary["steps_to_target"]
    for opt, per in sorted(crit.items()):
        bs = [b for b in sorted(per) if math.isfinite(per[b])]
        if not bs:
            continue
        ax.plot(bs, [per[b] for b in bs], marker="o", label=_label(opt), color=_color(opt))
        b0 = bs[0]
        ax.plot(bs, [per[b0] * b0 / b for b in bs], linestyle="--", color=_color(opt), alpha=0.4)
        bn = summary["per_optimizer"][opt]["b_noise"]
        if math.isfinite(bn) and bn > 0:
            ax.axvline(bn, color=_color(opt), linestyle=":", alpha=0.8)
            ax.text(bn, 0.03, f" B_noise {_label(opt)} {bn:.0f}", transform=ax.get_xaxis_transform(), fontsize=8,
                    color=_color(opt), rotation=90, va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch (sequences)")
    ax.set_ylabel(f"steps to val loss {summary['target']:.3f}")
    ax.set_title("Critical batch: steps to target (dashed: perfect scaling; dotted: measured noise scale)",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    paths.append(out / PLOTS[3]); fig.savefig(paths[-1], dpi=110); plt.close(fig)
    return paths


SCHEDULE_PLOT = "schedules.png"


def schedule_section(sched: dict) -> list[str]:
    """Report lines: every schedule (constant batches included) per optimizer, at the same tokens."""
    if not sched:
        return []
    lines = ["", "## Batch-size schedules at equal tokens", "",
             "Every cell trains the same token budget; a schedule's steps follow from its batches "
             "(`--batch-schedule`, lr by tokens). Best lr per schedule (mean over seeds).", "",
             "| optimizer | schedule | steps | final batch | best lr | best val loss (mean) | seed std |",
             "|---|---|---|---|---|---|---|"]
    for opt in sorted(sched):
        for label, v in sorted(sched[opt].items(), key=lambda kv: (kv[1]["schedule"] != "const", kv[1]["batch"], kv[0])):
            lines.append(f"| {_label(opt)} | {label} | {v['steps']} | {v['batch']} | {v['lr']:.3g} | "
                         f"{_fmt(v['loss'])} | {_fmt(v['std'])} |")
    return lines


def plot_schedules(sched: dict, out: Path) -> Path:
    """Best val loss per schedule, one group of bars per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({lb for per in sched.values() for lb in per},
                    key=lambda lb: (not lb.startswith("const"), int(lb[7:]) if lb.startswith("const b") else 0, lb))
    opts = sorted(sched)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(opts) / 2 + 3), 4.2), dpi=110)
    width = 0.8 / max(1, len(opts))
    for i, opt in enumerate(opts):
        ys = [sched[opt][lb]["loss"] if lb in sched[opt] else math.nan for lb in labels]
        ax.bar([x + i * width for x in range(len(labels))], ys, width, label=_label(opt))
    ax.set_xticks([x + width * (len(opts) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
    finite = [v["loss"] for per in sched.values() for v in per.values() if math.isfinite(v["loss"])]
    if finite:
        ax.set_ylim(min(finite) - 0.1, max(finite) + 0.1)
    ax.set_ylabel("best final val loss")
    ax.set_title("batch-size schedules at equal tokens")
    ax.legend()
    fig.tight_layout()
    path = Path(out) / SCHEDULE_PLOT
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(x, spec=".4f"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _header(title: str, scale: str, command: str, wall: str) -> list[str]:
    """A report's title and the run it describes (each line only when known)."""
    lines = [f"# {title}", ""]
    if scale:
        lines += [f"Scale: {scale}", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    if wall:
        lines += [f"Wall time: {wall}", ""]
    return lines


def write_report(summary: dict, out: Path, *, scale: str = "", command: str = "", wall: str = "") -> Path:
    best, per_opt = summary["best"], summary["per_optimizer"]
    lines = _header("Large-batch study", scale, command, wall)
    lines += [f"Token budget: {summary['budget']:,} tokens for every cell (one budget; cells of other budgets are "
              f"refused).", "", "## Best lr per optimizer and batch", "",
              "| optimizer | batch | best lr | best val loss (mean) | seed std | seed max-min | seeds | lr grid | edge of grid? |",
              "|---|---|---|---|---|---|---|---|---|"]
    for opt in sorted(best):
        for b in sorted(best[opt]):
            v = best[opt][b]
            edge = {"low": "YES: smallest lr of the grid (optimum not bracketed)",
                    "high": "YES: largest lr of the grid (optimum not bracketed)"}.get(v["edge"], "no")
            lines.append(f"| {_label(opt)} | {b} | {v['lr']:.3g} | {_fmt(v['loss'])} | {_fmt(v['std'])} | "
                         f"{_fmt(v['range'])} | {v['seeds']} | {', '.join(f'{x:.3g}' for x in v['grid'])} | {edge} |")
    lines += ["", "## Large-batch penalty and lr scaling", "",
              "Penalty = best loss at the largest batch minus best loss at the smallest (same tokens). "
              "Exponent alpha: least-squares fit of log(best lr) = c + alpha log(batch) (0.5 = the sqrt rule the "
              "recipes use, 1 = linear).", "",
              "| optimizer | batches | penalty | penalty +- (seed std) | alpha (all batches) | alpha (bracketed optima only) | edges | noise scale B_noise | max attn logit at largest batch (best lr) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for opt in sorted(per_opt):
        p = per_opt[opt]
        edges = ", ".join(f"b{b}:{e}" for b, e in p["edges"].items()) or "none"
        lines.append(f"| {_label(opt)} | {p['batches'][0]}-{p['batches'][-1]} | {_fmt(p['penalty'], '+.4f')} | "
                     f"{_fmt(p['penalty_spread'])} | {_fmt(p['exponent'], '.2f')} | {_fmt(p['exponent_bracketed'], '.2f')} | "
                     f"{edges} | {_fmt(p['b_noise'], '.1f')} | {_fmt(p['max_attn_logit_largest'], '.1f')} |")
    crit = summary["steps_to_target"]
    lines += ["", f"## Steps to val loss {_fmt(summary['target'])} (critical batch)", "",
              "| optimizer | " + " | ".join(f"batch {b}" for b in sorted({b for per in crit.values() for b in per})) + " |",
              "|---|" + "---|" * len({b for per in crit.values() for b in per})]
    allb = sorted({b for per in crit.values() for b in per})
    for opt in sorted(crit):
        lines.append(f"| {_label(opt)} | " + " | ".join(_fmt(crit[opt].get(b, math.nan), '.1f') for b in allb) + " |")
    lines += ["", "Target: the worst best loss over every optimizer and batch + 0.01, so that every best-lr "
              "curve can reach it (steps interpolated between evaluations, mean over seeds; n/a: a seed never "
              "reached it). Perfect scaling would divide the steps by the batch ratio; the gradient noise scale "
              "(McCandlish et al. 2018) is measured by the loop's diagnostics and drawn on the same axis "
              "(critical_batch.png).", "", "## The paper's claim beside what was measured", "", f"- {PAPER_CLAIM}"]
    for opt in sorted(per_opt):
        p = per_opt[opt]
        verdict = ("within the seed spread" if abs(p["penalty"]) <= max(2 * p["penalty_spread"], 1e-12)
                   else ("worse at the largest batch" if p["penalty"] > 0 else "better at the largest batch"))
        lines.append(f"- Measured here: {_label(opt)} large-batch penalty {_fmt(p['penalty'], '+.4f')} "
                     f"(batch {p['batches'][0]} -> {p['batches'][-1]}; {verdict}); best lr grows as batch^"
                     f"{_fmt(p['exponent'], '.2f')}.")
    if per_opt:
        ranked = sorted(per_opt, key=lambda o: per_opt[o]["penalty"])
        lines.append(f"- Ranking by penalty (smallest first): {', '.join(_label(o) for o in ranked)}.")
    lines += schedule_section(summary.get("schedules") or {})
    plots = PLOTS + ((SCHEDULE_PLOT,) if summary.get("schedules") else ())
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots), ""]
    path = Path(out) / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_family_report(rows: list[dict], out: Path, *, scale: str = "", command: str = "", wall: str = ""):
    """A study with a ``family`` axis: every table and plot is per family (cells of different shapes
    are never pooled); see :mod:`.families`."""
    from .families import family_plots, family_report_lines, family_summary

    fs = family_summary(rows)
    lines = _header("Width vs depth at large batch", scale, command, wall)
    lines += [f"Token budget: {check_one_budget(rows):,} tokens for every cell.", ""]
    lines += family_report_lines(fs, labels())
    path = Path(out) / "report.md"
    path.write_text("\n".join(lines))
    return path, family_plots(fs, out, labels()), fs


def report_from_csv(csv_path, out=None, **kw) -> tuple[Path, list[Path], dict]:
    csv_path = Path(csv_path)
    out = Path(out) if out else csv_path.parent
    rows = load_results(csv_path)
    if any(r.get("family") for r in rows):
        return write_family_report(rows, out, **kw)
    summary = summarize(rows)
    const = [r for r in rows if (r.get("schedule") or "const") == "const"]
    plots = make_plots(summary, const, out) if const else []
    if summary.get("schedules"):
        plots.append(plot_schedules(summary["schedules"], out))
    return write_report(summary, out, **kw), plots, summary
