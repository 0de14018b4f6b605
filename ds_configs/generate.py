"""Writes every DeepSpeed JSON in ds_configs/ from merit_ds.train.presets (the one source of truth).

    python ds_configs/generate.py           # (re)write the JSON files
    python ds_configs/generate.py --check   # exit 1 if a committed file differs (CI / tests)

Files:
  zero{1,2,3}_{bf16,fp32}.json, zero{2,3}_offload_{bf16,fp32}.json
      generic: MERIT with the GPT-2 lineage hyperparameters; no batch keys (merit_ds.train fills
      train_batch_size / micro / grad-accum from its command line).
  gpt2-{small,medium}_b{480,1024,2048,4096,6144}_zero{S}_bf16.json
      the recipes: global batch and lr set (scaled by each optimizer's exponent); ZeRO stage S = the planner's choice for a
      file that serves 8 to 32 GPUs (merit_ds.train.plan.recipe_zero_stage: fits everywhere,
      never accumulates in bf16, sends the fewest bytes per step on 8 GPUs; ZeRO-1 for every
      recipe today); micro-batch = what `merit-ds plan` fits on 32 x 80 GiB GPUs at that stage,
      which also divides the per-GPU batch on 8 and 16 GPUs
      (DeepSpeed derives grad-accum = train_batch_size / (micro x world)). Other cluster shapes:
      the same file works on any world size dividing the batch; merit_ds.train re-plans the
      micro-batch (largest divisor of the per-rank batch not above the file's) and prints it;
      --micro-batch overrides it.
  gpt2-{small,medium}_{lamb,adamw}_b{480,1024,2048,4096,6144}_zero{S}_bf16.json
      the baselines at the same points (the reference batch 480 and the large batches), same
      batch keys, each with its own preset lr (merit_ds.train.presets): "ShardedLAMB"
      (merit_ds.LAMB) and DeepSpeed's "AdamW". Train with `--optimizer lamb|adamw`.
  tiny_b16_zero2_fp32.json
      the CPU demo: 16 sequences = micro 4 x grad-accum 2 x 2 processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from merit_ds.train.ds_config import make_ds_config  # noqa: E402
from merit_ds.train.plan import recipe_micro_batch, recipe_zero_stage  # noqa: E402
from merit_ds.optim import registry  # noqa: E402
from merit_ds.train.presets import BATCH_PRESETS, get_optim_preset, scaled_lr  # noqa: E402

def recipe_name(model: str, batch: int, optimizer: str = "merit", stage: int | None = None) -> str:
    """Recipe file name for a model, optimizer and batch (MERIT's names carry no optimizer); the
    stage is the recipe's (:func:`recipe_zero_stage`) unless given."""
    tag = "" if optimizer == "merit" else f"_{optimizer}"
    stage = recipe_zero_stage(model, batch) if stage is None else stage
    return f"{model}{tag}_b{batch}_zero{stage}_bf16.json"


def build_all() -> dict[str, dict]:
    files: dict[str, dict] = {}
    lineage = get_optim_preset("gpt2-small", "merit")
    for precision in ("bf16", "fp32"):
        for stage in (1, 2, 3):
            files[f"zero{stage}_{precision}.json"] = make_ds_config(stage, precision, optim=lineage)
        for stage in (2, 3):
            files[f"zero{stage}_offload_{precision}.json"] = make_ds_config(stage, precision, offload=True, optim=lineage)
    for spec in registry.specs():  # every registered optimizer with GPT-2 recipe defaults
        optimizer = spec.name
        for model in ("gpt2-small", "gpt2-medium"):
            if model not in spec.recipe_defaults:
                continue
            optim = spec.recipe_defaults[model]
            for batch in BATCH_PRESETS.values():
                stage = recipe_zero_stage(model, batch)
                files[recipe_name(model, batch, optimizer, stage)] = make_ds_config(
                    stage, "bf16", optim=optim, lr=float(f"{scaled_lr(optim, batch):.6g}"), global_batch=batch,
                    micro_batch=recipe_micro_batch(model, batch, stage), optimizer=optimizer)
    tiny = get_optim_preset("tiny", "merit")
    files["tiny_b16_zero2_fp32.json"] = make_ds_config(2, "fp32", optim=tiny, lr=scaled_lr(tiny, 16),
                                                       global_batch=16, micro_batch=4)
    return files


def render(cfg: dict) -> str:
    return json.dumps(cfg, indent=2) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    files = build_all()
    stale = []
    for name, cfg in files.items():
        path = HERE / name
        text = render(cfg)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    extra = sorted(p.name for p in HERE.glob("*.json") if p.name not in files)
    if args.check:
        if stale or extra:
            print(f"stale: {stale}; not generated (delete them): {extra}", file=sys.stderr)
            return 1
        print(f"{len(files)} configs up to date")
    else:
        print(f"wrote {len(files)} configs to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
