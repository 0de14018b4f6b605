"""Bytes each GPU sends per optimizer step at each ZeRO stage: measured under DeepSpeed, then
planned for the GPT-2 recipes.

    .venv/bin/python benchmarks/zero_comm_volume.py

1. Measured: ``tests/comm_volume_worker.py`` on 2 CPU ranks (gloo; DeepSpeed's CPU accelerator)
   records every collective of one optimizer step (a 3-layer MLP, 27,936 parameters) at ZeRO 0-3,
   fp32 and bf16 with merit_ds's data types, 1 and 3 micro-batches per step; the ring bytes a rank
   sends, in units of ``(N-1)/N Psi b``, against ``merit_ds.train.plan.comm_bytes_per_step``.
   Counts, not timings: they do not depend on the machine (the collectives DeepSpeed chooses are
   the same on NCCL, which this does not run).
2. Planned: GB sent per GPU per step for every recipe on 8 and 32 H100s at ZeRO 0-3 (the
   micro-batch the planner fits per stage), and the stage the planner recommends.

Writes benchmarks/results/zero_comm_volume.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CONFIGS = ["z0_fp32", "z1_fp32", "z2_fp32", "z3_fp32", "z0_bf16", "z1_bf16", "z2_bf16", "z3_bf16", "z2_bf16_reduce"]


def measure() -> list[dict]:
    from _dist import launch  # tests/_dist.py: CPU ranks under torchrun, JSON result

    from merit_ds.train.plan import comm_bytes_per_step

    got = launch(ROOT / "tests" / "comm_volume_worker.py", 2, ["--configs", ",".join(CONFIGS), "--grad-accum", "1", "3"],
                 timeout=600)
    got.pop("_log_tail", None)
    rows = []
    for name in CONFIGS:
        for k, m in sorted(got[name].items()):
            unit = 0.5 * m["n_params"] * m["elem_bytes"]
            planned = ((int(k) + 1) * unit if name == "z2_bf16_reduce" else
                       comm_bytes_per_step(m["n_params"], 2, m["stage"], int(k), precision=m["precision"]))
            rows.append({"config": name, "stage": m["stage"], "precision": m["precision"], "grad_accum": int(k),
                         "deepspeed_optimizer": m["optimizer_wrapper"],
                         "collectives": {op: v["calls"] for op, v in m["ops"].items()},
                         "measured_units": m["sent_zero_bytes"] / unit, "planned_units": planned / unit,
                         "optimizer_stats_bytes": m["sent_optimizer_bytes"]})
    return rows


def plan_recipes() -> list[dict]:
    from merit_ds.train.plan import make_plan, recipe_zero_stage
    from merit_ds.train.presets import BATCH_PRESETS

    rows = []
    for model in ("gpt2-small", "gpt2-medium"):
        for batch in BATCH_PRESETS.values():
            for nodes in (1, 4):
                p = make_plan(model, batch, nodes=nodes, gpus_per_node=8, gpu="h100")
                st = {r["stage"]: r for r in p["stages"] if not r["offload"]}
                rows.append({"model": model, "batch": batch, "gpus": nodes * 8,
                             "per_stage": {s: {"micro": r["micro_batch"], "accum": r["grad_accum"],
                                               "gb": round(r["comm_gb_per_step"], 3)} for s, r in st.items()},
                             "recommended": p["recommended_stage"], "recipe_stage": recipe_zero_stage(model, batch)})
    return rows


def main() -> None:
    measured, planned = measure(), plan_recipes()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "zero_comm_volume.json").write_text(json.dumps({"measured": measured, "planned": planned}, indent=1) + "\n")
    lines = ["# Bytes sent per GPU per optimizer step, by ZeRO stage", "",
             "Written by `benchmarks/zero_comm_volume.py`. Units: `(N-1)/N Psi b` (one reduce-scatter or all-gather of "
             "all parameters in the compute dtype). Measured: every collective of one step on 2 CPU ranks "
             "under DeepSpeed (ring counts); planned: `merit_ds.train.plan.comm_bytes_per_step`.", "",
             "| config | micro-batches | DeepSpeed optimizer | collectives | measured | planned |", "|---|---:|---|---|---:|---:|"]
    for r in measured:
        ops = ", ".join(f"{op} x{n}" for op, n in r["collectives"].items())
        lines.append(f"| {r['config']} | {r['grad_accum']} | {r['deepspeed_optimizer']} | {ops} | "
                     f"{r['measured_units']:g} | {r['planned_units']:g} |")
    lines += ["", "`z2_bf16_reduce`: ZeRO-2 with `use_multi_rank_bucket_allreduce: false` (each slice reduced to its "
              "owner); merit_ds's configs keep DeepSpeed's default (true).", "",
              "## The recipes (GB sent per GPU per step; micro x accumulation as the planner fits it per stage)", "",
              "| model | batch | GPUs | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 | recommended here | recipe file |",
              "|---|---:|---:|---|---|---|---|---:|---:|"]
    for r in planned:
        cells = " | ".join(f"{v['gb']:.2f} ({v['micro']}x{v['accum']})" for _, v in sorted(r["per_stage"].items()))
        lines.append(f"| {r['model']} | {r['batch']:,} | {r['gpus']} | {cells} | {r['recommended']} | {r['recipe_stage']} |")
    (out / "zero_comm_volume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
