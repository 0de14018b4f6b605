#!/usr/bin/env bash
# The CPU demo: tiny GPT-2 (4 layers x 128 wide, 7.2M params) trained with MERIT under DeepSpeed
# ZeRO-2 on 2 CPU processes, on the built-in King James Bible corpus; evaluates, checkpoints and
# plots train/val loss (runs/cpu_demo/loss.png; docs/demo_loss.png, shown in docs/recipes.md, is one such plot).
#
# Command (from a fresh clone):   bash launch/cpu_demo.sh
#   = bash setup.sh
#     python -m merit_ds.data prepare --input kjv --out data_cache/kjv
#     DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module merit_ds.train --model tiny \
#         --ds-config ds_configs/tiny_b16_zero2_fp32.json --steps 60 --data data_cache/kjv --out runs/cpu_demo \
#         --eval-every 20 --ckpt-every 30 --keep-last 2 --diag-every 30 --diversity-probe 2 --resume auto
# batch: micro_batch 4 x grad_accum 2 x world 2 = 16 sequences x 128 = 2,048 tokens/step; 60 steps -> 122,880 tokens
# Where the time goes (docs/recipes.md, "The demo"): setup, then ~1.3 s per step on 2 cores, most of it
# GPT-2's 50,257-token output layer (6.4M of the 7.2M parameters); a diagnostics step (1, 30, 60) costs
# a few steps more (per-example gradients for the diversity probe, 2 sequences per rank here).
# Environment overrides: STEPS, OUT, DATA, MASTER_PORT, VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# VENV: an existing environment to use instead of this checkout's .venv (then setup.sh is skipped).
if [ -z "${VENV:-}" ]; then bash setup.sh; VENV="$root/.venv"; fi
py="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"   # the checkout, also for the launcher's children
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
DATA=${DATA:-data_cache/kjv}
OUT=${OUT:-runs/cpu_demo}
STEPS=${STEPS:-60}

[ -f "$DATA/manifest.json" ] || "$py" -m merit_ds.data prepare --input kjv --out "$DATA"
# --resume auto: a second run continues (or, when finished, only re-evaluates) instead of overwriting.
deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29561}" --module merit_ds.train \
    --model tiny --ds-config ds_configs/tiny_b16_zero2_fp32.json --steps "$STEPS" \
    --data "$DATA" --out "$OUT" --eval-every 20 --ckpt-every 30 --keep-last 2 --diag-every 30 --diversity-probe 2 \
    --resume auto
echo "demo done: $OUT (metrics.jsonl, tensorboard/, checkpoints/), plot $OUT/loss.png"
echo "TensorBoard: $VENV/bin/tensorboard --logdir $OUT/tensorboard"
