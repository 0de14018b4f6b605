"""PNG plots and ``report.md`` from ``results.csv`` (nothing else is read: a synthetic table works)."""

from __future__ import annotations

import math
from pathlib import Path

from merit_ds.optim import registry

from .analysis import check_one_budget, load_results, summarize
from .intervals import verdict

__all__ = ["make_plots", "write_report", "report_from_csv", "PLOTS", "PAPER_CLAIM", "PAPER", "warning_lines"]

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
        ci = (summary.get("intervals") or {}).get("best", {}).get(opt, {})
        if ci and all(b in ci and all(math.isfinite(v) for v in ci[b]) and math.isfinite(per[b]["loss"]) for b in bs):
            yerr = [[max(0.0, per[b]["loss"] - ci[b][0]) for b in bs], [max(0.0, ci[b][1] - per[b]["loss"]) for b in bs]]
        else:
            yerr = [per[b]["std"] for b in bs]
        ax.errorbar(bs, ys, yerr=yerr, marker="o", capsize=4, label=_label(opt), color=_color(opt))
        for b, y in zip(bs, ys):
            if math.isfinite(y):
                flag = {"low": " (edge-)", "high": " (edge+)"}.get(per[b]["edge"], "")
                ax.annotate(f"{per[b]['lr']:.2g}{flag}", (b, y), textcoords="offset points", fontsize=8,
                            xytext=(4, 6 - 12 * sorted(best).index(opt)), color=_color(opt))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (sequences)")
    ax.set_ylabel("best final val loss (mean over seeds; bars: 95% interval)" if summary.get("intervals")
                  else "best final val loss (mean over seeds; bars: seed std)")
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


#: The paper's regime (MERIT, ICML 2025): GPT-2 Medium, batch 480 vs 6k sequences of 1,024 tokens,
#: 48B tokens, so ~7,600 steps at 6k; "6-12x the critical batch" is issue #24's estimate for batch 6k.
PAPER = {"model": "GPT-2 Medium", "params": 355e6, "small_batch": 480, "large_batch": 6144, "seq_len": 1024,
         "tokens": 48e9, "crit_ratio": "~6-12 (issue #24's estimate)"}
PAPER["steps_large"] = PAPER["tokens"] / (PAPER["large_batch"] * PAPER["seq_len"])


def _ci(iv, spec=".4f") -> str:
    lo, hi = iv if iv else (math.nan, math.nan)
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    return f"[{_fmt(lo, spec) if math.isfinite(lo) else ('-inf' if lo < 0 else 'inf')}, " \
           f"{_fmt(hi, spec) if math.isfinite(hi) else ('inf' if hi > 0 else '-inf')}]"


def _ratio(a, b, spec=".2g") -> str:
    return _fmt(a / b, spec) if math.isfinite(a) and math.isfinite(b) and b > 0 else "n/a"


def warning_lines(checks: dict, max_se: float) -> list[str]:
    """The report's warning blocks: short cells, imprecise final losses, mixed or unrecorded code versions."""
    lines = []
    short = checks.get("short") or []
    if short:
        key, steps, batch = short[0]
        lines += [f"> **WARNING: {len(short)} cell(s) trained fewer than {checks['min_steps']} optimizer steps** "
                  f"(fewest: {key}, {steps} steps at batch {batch}). Cells that short mostly measure how many steps "
                  f"they had, not the optimizer: differences across batch sizes below are about steps, not "
                  f"large-batch quality. Rerun with a budget that gives every cell >= {checks['min_steps']} steps "
                  f"(the study refuses such a grid without --allow-short-cells).", ""]
    if checks.get("se_over"):
        key, se = checks["se_over"][0]
        lines += [f"> **WARNING: {len(checks['se_over'])} cell(s) have a final val loss standard error above "
                  f"{max_se} nats** (largest: {key}, {se:.4f}): more validation sequences (--eval-sequences) would "
                  f"resolve them.", ""]
    versions = checks.get("versions") or {}
    if len(versions) > 1 or "unrecorded" in versions:
        listed = "; ".join(f"{k}: {v} cell(s)" for k, v in sorted(versions.items()))
        lines += [f"> **WARNING: the cells do not all come from one recorded code version** ({listed}). Cells of "
                  f"different code versions may not be comparable; rerun them with one version (--rerun-stale).", ""]
    return lines


def write_report(summary: dict, out: Path, *, scale: str = "", command: str = "", wall: str = "") -> Path:
    from .analysis import MAX_SE

    best, per_opt = summary["best"], summary["per_optimizer"]
    iv = summary.get("intervals") or {}
    checks = summary.get("checks") or {}
    lines = _header("Large-batch study", scale, command, wall)
    lines += warning_lines(checks, MAX_SE)
    lines += [f"Token budget: {summary['budget']:,} tokens for every cell (one budget; cells of other budgets are "
              f"refused)."]
    versions = checks.get("versions") or {}
    if versions:
        lines += [f"Code version(s) of the cells (commit, then the code key of merit_ds.study.version): "
                  f"{'; '.join(f'{k} ({v} cells)' for k, v in sorted(versions.items()))}."]
    if iv.get("seeds"):
        lines += ["", f"Intervals: 95%, from a paired bootstrap over the {len(iv['seeds'])} seeds "
                  f"({', '.join(map(str, iv['seeds']))}) with each cell's evaluation noise and the best lr re-chosen in "
                  f"every replicate ({iv['replicates']:,} replicates, numpy seed {iv['seed']}; "
                  f"merit_ds/study/intervals.py). A claim whose interval contains 0 is **inconclusive**. With "
                  f"{len(iv['seeds'])} seeds a bootstrap cannot see seed-to-seed variation the seeds did not show: "
                  f"read the intervals as lower bounds on the uncertainty."]
    lines += ["", "## Best lr per optimizer and batch", "",
              "| optimizer | batch | best lr | best val loss (mean) | 95% interval | seed std | seed max-min | seeds | "
              "lr grid | edge of grid? |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for opt in sorted(best):
        for b in sorted(best[opt]):
            v = best[opt][b]
            edge = {"low": "YES: smallest lr of the grid (optimum not bracketed)",
                    "high": "YES: largest lr of the grid (optimum not bracketed)"}.get(v["edge"], "no")
            ci = _ci(iv.get("best", {}).get(opt, {}).get(b))
            lines.append(f"| {_label(opt)} | {b} | {v['lr']:.3g} | {_fmt(v['loss'])} | {ci} | {_fmt(v['std'])} | "
                         f"{_fmt(v['range'])} | {v['seeds']} | {', '.join(f'{x:.3g}' for x in v['grid'])} | {edge} |")
    lines += _cell_table(summary)
    lines += ["", "## Large-batch penalty and lr scaling", "",
              "Penalty = best loss at the largest batch minus best loss at the smallest (same tokens). "
              "Exponent alpha: least-squares fit of log(best lr) = c + alpha log(batch) (0.5 = the square-root rule, "
              "1 = linear).", "",
              "| optimizer | batches | penalty | penalty 95% interval | verdict | penalty +- (seed std) | alpha (all batches) | "
              "alpha 95% interval | alpha (bracketed optima only) | edges | noise scale B_noise | max attn logit at largest batch (best lr) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for opt in sorted(per_opt):
        p = per_opt[opt]
        edges = ", ".join(f"b{b}:{e}" for b, e in p["edges"].items()) or "none"
        pen_ci = iv.get("penalty", {}).get(opt)
        ver = (verdict(*pen_ci, "penalty (worse at the largest batch)", "better at the largest batch")
               if pen_ci else "n/a")
        lines.append(f"| {_label(opt)} | {p['batches'][0]}-{p['batches'][-1]} | {_fmt(p['penalty'], '+.4f')} | "
                     f"{_ci(pen_ci, '+.4f')} | {ver} | "
                     f"{_fmt(p['penalty_spread'])} | {_fmt(p['exponent'], '.2f')} | {_ci(iv.get('exponent', {}).get(opt), '.2f')} | "
                     f"{_fmt(p['exponent_bracketed'], '.2f')} | "
                     f"{edges} | {_fmt(p['b_noise'], '.1f')} | {_fmt(p['max_attn_logit_largest'], '.1f')} |")
    diffs = iv.get("difference") or {}
    if diffs:
        lines += ["", "## Differences of penalties (paired by seed)", "",
                  "| difference | point | 95% interval | verdict |", "|---|---|---|---|"]
        for (a, b), ci in sorted(diffs.items()):
            point = per_opt[a]["penalty"] - per_opt[b]["penalty"]
            ver = verdict(*ci, f"{_label(a)}'s penalty is larger", f"{_label(a)}'s penalty is smaller")
            lines.append(f"| {_label(a)} - {_label(b)} | {_fmt(point, '+.4f')} | {_ci(ci, '+.4f')} | {ver} |")
    crit = summary["steps_to_target"]
    allb = sorted({b for per in crit.values() for b in per})
    steps_iv = iv.get("steps") or {}
    lines += ["", f"## Steps to val loss {_fmt(summary['target'])} (critical batch)", "",
              "| optimizer | " + " | ".join(f"batch {b}" for b in allb) +
              " | efficiency at the largest batch | B_crit from steps | B_noise (probe) |",
              "|---|" + "---|" * (len(allb) + 3)]
    for opt in sorted(crit):
        p = per_opt.get(opt, {})
        cells = []
        for b in allb:
            ci = steps_iv.get(opt, {}).get(b)
            cells.append(_fmt(crit[opt].get(b, math.nan), '.1f') + (f" {_ci(ci, '.1f')}" if ci else ""))
        eff = _fmt(p.get("efficiency", math.nan), ".2f") + (f" {_ci(iv['efficiency'][opt], '.2f')}"
                                                             if opt in iv.get("efficiency", {}) else "")
        bc = _fmt(p.get("b_crit", math.nan), ".1f") + (f" {_ci(iv['b_crit'][opt], '.1f')}"
                                                       if opt in iv.get("b_crit", {}) else "")
        bn = _fmt(p.get("b_noise", math.nan), ".1f") + (f" {_ci(iv['b_noise'][opt], '.1f')}"
                                                        if opt in iv.get("b_noise", {}) else "")
        lines.append(f"| {_label(opt)} | " + " | ".join(cells) + f" | {eff} | {bc} | {bn} |")
    lines += ["", "Target: the highest end of any best-lr validation curve (every optimizer, batch and seed) + 0.01, "
              "so that every best-lr curve reaches it (steps interpolated between evaluations, mean over seeds; "
              "n/a: a seed never reached it; curves on their own validation blocks, `curve_blocks`). Brackets: 95% "
              "intervals. Efficiency = S(b0) b0 / (S(B) B): 1 is perfect scaling from the smallest batch b0, 0.5 twice "
              "the examples. B_crit from steps: S(B) = S_min (1 + B_crit / B) fitted to the steps (McCandlish et al. "
              "2018; inf: still scaling perfectly at the largest batch). B_noise: the loop's gradient noise scale "
              "(sequences; median of the best-lr cells over the second half of training), drawn on the same axis "
              "in critical_batch.png."]
    if per_opt:
        lines += ["", "Batches relative to the measured critical batch:", "",
                  "| optimizer | " + " | ".join(f"batch {b} / B_noise" for b in allb) + " | " +
                  " | ".join(f"batch {b} / B_crit" for b in allb) + " |",
                  "|---|" + "---|" * (2 * len(allb))]
        for opt in sorted(per_opt):
            p = per_opt[opt]
            lines.append(f"| {_label(opt)} | " + " | ".join(_ratio(b, p.get("b_noise", math.nan)) for b in allb) + " | " +
                         " | ".join(_ratio(b, p.get("b_crit", math.nan)) for b in allb) + " |")
    lines += _paper_section(summary)
    lines += schedule_section(summary.get("schedules") or {})
    plots = PLOTS + ((SCHEDULE_PLOT,) if summary.get("schedules") else ())
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots), ""]
    path = Path(out) / "report.md"
    path.write_text("\n".join(lines))
    return path


def _cell_table(summary: dict) -> list[str]:
    """Every (optimizer, batch, lr): each seed's final val loss +- its standard error, and the mean."""
    best = summary["best"]
    seeds = sorted({int(r["seed"]) for per in best.values() for v in per.values()
                    for rs in v.get("all_rows", {}).values() for r in rs})
    if not best:
        return []
    lines = ["", "## Every cell: final val loss +- standard error over validation blocks", "",
             "| optimizer | batch | lr | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|---|" + "---|" * (len(seeds) + 1)]
    for opt in sorted(best):
        for b in sorted(best[opt]):
            v = best[opt][b]
            for lr in v["grid"]:
                by_seed = {int(r["seed"]): r for r in v.get("all_rows", {}).get(lr, [])}
                cells = []
                for sd in seeds:
                    r = by_seed.get(sd)
                    if r is None:
                        cells.append("")
                        continue
                    loss = float(r["final_val_loss"])
                    se = r.get("final_val_se")
                    diverged = int(float(r.get("diverged") or 0)) or not math.isfinite(loss)
                    cells.append("diverged" if diverged else _fmt(loss) + (
                        f" +- {float(se):.4f}" if se not in (None, "") and math.isfinite(float(se)) else ""))
                mark = " (best)" if lr == v["lr"] else ""
                lines.append(f"| {_label(opt)} | {b} | {lr:.3g}{mark} | " + " | ".join(cells) +
                             f" | {_fmt(v['means'][lr])} |")
    return lines


def _paper_section(summary: dict) -> list[str]:
    per_opt, iv = summary["per_optimizer"], summary.get("intervals") or {}
    lines = ["", "## The paper's claim beside what was measured", "", f"- {PAPER_CLAIM}"]
    rows = [r for per in summary["best"].values() for v in per.values() for r in v["rows"]]
    if rows:
        batches = sorted({int(r["batch"]) for r in rows})
        hi = batches[-1]
        steps_hi = max((int(r["steps"]) for r in rows if int(r["batch"]) == hi), default=0)
        seq = int(rows[0]["seq_len"]) if rows[0].get("seq_len") not in (None, "") else 0
        params = next((int(r["n_params"]) for r in rows if r.get("n_params") not in (None, "")), None)
        tokens = summary["budget"]
        b_noise = [per_opt[o]["b_noise"] for o in per_opt if math.isfinite(per_opt[o].get("b_noise", math.nan))]
        b_crit = [per_opt[o].get("b_crit", math.nan) for o in per_opt
                  if math.isfinite(per_opt[o].get("b_crit", math.nan)) and per_opt[o].get("b_crit", 0) > 0]
        def rng(v):
            lo, hi = f"{min(v):.2g}", f"{max(v):.2g}"
            return lo if lo == hi else f"{lo}-{hi}"

        lines += ["", "The scale gap, in numbers:", "",
                  "| | paper | here | here / paper |", "|---|---|---|---|",
                  f"| model | {PAPER['model']} ({PAPER['params'] / 1e6:.0f}M parameters) | "
                  f"{f'{params:,} parameters' if params else 'n/a'} | "
                  f"{_fmt(params / PAPER['params'], '.2g') if params else 'n/a'} |",
                  f"| batches (sequences) | {PAPER['small_batch']} -> {PAPER['large_batch']:,} (ratio "
                  f"{PAPER['large_batch'] / PAPER['small_batch']:.1f}) | {batches[0]} -> {hi} (ratio {hi / batches[0]:.1f}) | |",
                  f"| sequence length | {PAPER['seq_len']:,} | {seq} | |",
                  f"| tokens per step at the largest batch | {PAPER['large_batch'] * PAPER['seq_len']:,} | {hi * seq:,} | "
                  f"{_fmt(hi * seq / (PAPER['large_batch'] * PAPER['seq_len']), '.2g')} |",
                  f"| optimizer steps at the largest batch | ~{PAPER['steps_large']:,.0f} | {steps_hi:,} | "
                  f"{_fmt(steps_hi / PAPER['steps_large'], '.2g')} |",
                  f"| tokens per run | {PAPER['tokens']:.3g} | {tokens:,} | {_fmt(tokens / PAPER['tokens'], '.2g')} |",
                  f"| largest batch / critical batch | {PAPER['crit_ratio']} | "
                  f"{(rng([hi / b for b in b_noise]) + ' (B_noise)') if b_noise else 'n/a'}"
                  f"{('; ' + rng([hi / b for b in b_crit]) + ' (B_crit from steps)') if b_crit else ''} | |"]
        lines.append("")
    for opt in sorted(per_opt):
        p = per_opt[opt]
        ci = iv.get("penalty", {}).get(opt)
        if ci:
            v = verdict(*ci, "a penalty", "better at the largest batch")
            said = "inconclusive: no penalty resolved" if v == "inconclusive" else v
            lines.append(f"- Measured here: {_label(opt)} large-batch penalty {_fmt(p['penalty'], '+.4f')} "
                         f"(95% interval {_ci(ci, '+.4f')}; batch {p['batches'][0]} -> {p['batches'][-1]}: {said}); "
                         f"best lr grows as batch^{_fmt(p['exponent'], '.2f')} "
                         f"({_ci(iv.get('exponent', {}).get(opt), '.2f')}).")
        else:
            verdict_old = ("within the seed spread" if abs(p["penalty"]) <= max(2 * p["penalty_spread"], 1e-12)
                           else ("worse at the largest batch" if p["penalty"] > 0 else "better at the largest batch"))
            lines.append(f"- Measured here: {_label(opt)} large-batch penalty {_fmt(p['penalty'], '+.4f')} "
                         f"(batch {p['batches'][0]} -> {p['batches'][-1]}; {verdict_old}); best lr grows as batch^"
                         f"{_fmt(p['exponent'], '.2f')}.")
    for (a, b), ci in sorted((iv.get("difference") or {}).items()):
        point = per_opt[a]["penalty"] - per_opt[b]["penalty"]
        v = verdict(*ci, f"{_label(a)} loses more than {_label(b)}", f"{_label(a)} loses less than {_label(b)}")
        lines.append(f"- {_label(a)} - {_label(b)} penalty: {_fmt(point, '+.4f')} (95% interval {_ci(ci, '+.4f')}): "
                     f"{v}.")
    if per_opt:
        ranked = sorted(per_opt, key=lambda o: per_opt[o]["penalty"])
        lines.append(f"- Ranking by penalty (smallest first): {', '.join(_label(o) for o in ranked)}"
                     + (" (point estimates: where a difference above is inconclusive, that order is not established)."
                        if iv.get("difference") else "."))
    return lines


def write_family_report(rows: list[dict], out: Path, *, scale: str = "", command: str = "", wall: str = ""):
    """A study with a ``family`` axis: every table and plot is per family (cells of different shapes
    are never pooled); see :mod:`.families`."""
    from .families import family_plots, family_report_lines, family_summary

    from .analysis import MAX_SE, quality_checks

    fs = family_summary(rows)
    lines = _header("Width vs depth at large batch", scale, command, wall)
    lines += warning_lines(quality_checks(rows), MAX_SE)
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
    summary = summarize(rows, intervals=True)
    const = [r for r in rows if (r.get("schedule") or "const") == "const"]
    plots = make_plots(summary, const, out) if const else []
    if summary.get("schedules"):
        plots.append(plot_schedules(summary["schedules"], out))
    return write_report(summary, out, **kw), plots, summary
