"""Statistics traffic of MERIT's and LAMB's sharded step under tensor parallelism.

Counts, with merit_ds's own layout code (merit_ds.optim.layout.stats_layout and
merit_ds.optim.tp_layout.exchange_plan), what one ``step()`` call all-reduces for GPT-2 Small and
Medium laid out as Megatron lays out a GPT (per layer: fused qkv and fc1 column-parallel with
split biases, attention proj and fc2 row-parallel with replicated biases, LayerNorms
replicated; the embedding vocabulary-parallel, padded to 50,304 rows; positions replicated), at
tensor-parallel sizes 1, 2, 4, 8. No timing: arithmetic on shapes. Writes
benchmarks/results/tp_stats_traffic.{json,md}.

    .venv/bin/python benchmarks/tp_stats_traffic.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from merit_ds.optim.lamb_fragments import LambFragmentRule
from merit_ds.optim.layout import stats_layout
from merit_ds.optim.merit_fragments import MeritFragmentRule
from merit_ds.optim.tp_layout import TensorSplit, exchange_plan, full_shapes

OUT = Path(__file__).resolve().parent / "results"
MODELS = {"GPT-2 Small": (12, 768), "GPT-2 Medium": (24, 1024)}
VOCAB, POSITIONS = 50304, 1024


def megatron_gpt(layers: int, h: int):
    """[(whole shape, split dim or None)] of a Megatron GPT."""
    params = [((VOCAB, h), 0), ((POSITIONS, h), None)]
    for _ in range(layers):
        params += [((h,), None), ((h,), None),  # input LayerNorm
                   ((3 * h, h), 0), ((3 * h,), 0), ((h, h), 1), ((h,), None),  # attention
                   ((h,), None), ((h,), None),  # post-attention LayerNorm
                   ((4 * h, h), 0), ((4 * h,), 0), ((h, 4 * h), 1), ((h,), None)]  # MLP
    return params + [((h,), None), ((h,), None)]  # final LayerNorm


def traffic(rule, params, tp: int) -> dict:
    """What TP rank 0 all-reduces per step() for these parameters (one group)."""
    local, splits = [], []
    for shape, dim in params:
        if dim is None or tp == 1:
            local.append(shape)
            splits.append(None)
            continue
        n = shape[dim] // tp
        local.append(shape[:dim] + (n,) + shape[dim + 1:])
        splits.append(TensorSplit(dim, 0, shape[dim]))
    # the local layout as the sharded step builds it: dim-0 slices already whole (globalize_rows)
    shapes = [s if sp is None or sp.dim == 1 else w for s, sp, w in zip(local, splits, full_shapes(local, splits))]
    layout = stats_layout(shapes, rule.stats_size)
    entries = exchange_plan(layout, splits, rule, tp_rank=0).global_numel if tp > 1 else layout.buffer_numel
    itemsize = rule.stats_dtype.itemsize
    rank_params = sum(math.prod(s) for s in local)
    return {"entries": entries, "bytes": entries * itemsize, "rank_params": rank_params,
            "percent_of_rank_params": 100.0 * entries / rank_params}


def main() -> None:
    rows = []
    for model, (layers, h) in MODELS.items():
        params = megatron_gpt(layers, h)
        for tp in (1, 2, 4, 8):
            for name, rule in (("MERIT", MeritFragmentRule()), ("LAMB", LambFragmentRule())):
                rows.append({"model": model, "tp": tp, "optimizer": name, **traffic(rule, params, tp)})
    OUT.mkdir(exist_ok=True)
    (OUT / "tp_stats_traffic.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model | TP | optimizer | entries all-reduced per step() | bytes | parameters per rank (before ZeRO) | entries / parameters |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tp']} | {r['optimizer']} | {r['entries']:,} | {r['bytes'] / 1e3:,.1f} kB | "
                     f"{r['rank_params'] / 1e6:,.1f}M | {r['percent_of_rank_params']:.3f}% |")
    (OUT / "tp_stats_traffic.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
