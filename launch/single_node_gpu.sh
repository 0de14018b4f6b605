#!/usr/bin/env bash
# GPT-2 Small, global batch 480, one node with 8 GPUs, MERIT under ZeRO-1, bf16.
#
# Command:   bash launch/single_node_gpu.sh
#   = deepspeed --num_gpus 8 --module merit_ds.train --model gpt2-small \
#         --ds-config ds_configs/gpt2-small_b480_zero1_bf16.json --data data/owt --out runs/gpt2-small-b480
# batch: micro_batch 15 x grad_accum 4 x world 8 = 480 sequences x 1024 = 491,520 tokens/step; 48e9 tokens -> 97,657 steps
# Other presets: MODEL=gpt2-medium BATCH=6144 bash launch/single_node_gpu.sh (config ds_configs/${MODEL}_b${BATCH}_zero1_bf16.json);
# Baselines: OPTIMIZER=adamw|lamb bash launch/single_node_gpu.sh (config ds_configs/${MODEL}_${OPTIMIZER}_b${BATCH}_zero1_bf16.json,
# --optimizer adamw|lamb; same batch arithmetic, the optimizer's own lr preset).
# check first: python -m merit_ds plan --model $MODEL --batch $BATCH --nodes 1 --gpus-per-node 8 --gpu h100
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-gpt2-small}
BATCH=${BATCH:-480}
GPUS=${GPUS:-8}
OPTIMIZER=${OPTIMIZER:-merit}  # merit | lamb | adamw
TAG=""; [ "$OPTIMIZER" = merit ] || TAG="_${OPTIMIZER}"
DATA=${DATA:-data/owt}        # python -m merit_ds.data prepare --input <your corpus> --out data/owt
OUT=${OUT:-runs/${MODEL}${TAG}-b${BATCH}}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
python -m merit_ds plan --model "$MODEL" --batch "$BATCH" --nodes 1 --gpus-per-node "$GPUS" --optimizer "$OPTIMIZER"
deepspeed --num_gpus "$GPUS" --module merit_ds.train --model "$MODEL" --optimizer "$OPTIMIZER" \
    --ds-config "ds_configs/${MODEL}${TAG}_b${BATCH}_zero1_bf16.json" \
    --data "$DATA" --out "$OUT" --eval-every 500 --ckpt-every 1000 --keep-last 3 --diag-every 100 "$@"
