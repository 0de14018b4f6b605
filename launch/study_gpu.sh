#!/usr/bin/env bash
# The large-batch study on GPUs: GPT-2 Small (or Medium) at the paper's batch sizes
# (480, 1k, 2k, 4k, 6k) x MERIT/LAMB/AdamW x 5 lrs each, one cell per GPU, all at one token budget.
#
# Command:   bash launch/study_gpu.sh            (one node; one worker process per GPU)
#   worker i of N: CUDA_VISIBLE_DEVICES=i python -m merit_ds.study --preset gpt2-small \
#       --budget-divisor 48 --data data/owt --out runs/study-gpt2-small --shard i/N
# largest cell (6k, one GPU, budget 48e9/48 = 1e9 tokens):
# batch: micro_batch 8 x grad_accum 768 x world 1 = 6144 sequences x 1024 = 6,291,456 tokens/step; 159 steps -> 1,000,341,504 tokens
# Budget: 48e9 / BUDGET_DIVISOR tokens per cell (48 -> 1e9: 2,035 steps at 480, 159 at 6k; the study refuses cells under 100 steps); a cell is
# one process-group-of-one run of merit_ds.train's parts (ZeRO-1, bf16, micro-batch 8, grad-accum
# batch/8). 75 cells; resumable: re-run the same command and finished cells are skipped.
# Variables: MODEL=gpt2-medium GPUS=8 BUDGET_DIVISOR=48 DATA=data/owt OUT=runs/study-$MODEL
# and any extra flags (e.g. --lrs "merit=...;lamb=...;adamw=..." --seeds 0,1) after the script name.
# A SLURM array instead: launch/study_slurm.sbatch. The table, plots and report.md are rewritten
# after every cell; afterwards: python -m merit_ds.study --preset $MODEL ... --report-only
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-gpt2-small}
GPUS=${GPUS:-8}
BUDGET_DIVISOR=${BUDGET_DIVISOR:-48}
DATA=${DATA:-data/owt}        # python -m merit_ds.data prepare --input <your corpus> --out data/owt
OUT=${OUT:-runs/study-${MODEL}}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
pids=()
for ((i = 0; i < GPUS; i++)); do
    CUDA_VISIBLE_DEVICES=$i python -m merit_ds.study --preset "$MODEL" --budget-divisor "$BUDGET_DIVISOR" \
        --data "$DATA" --out "$OUT" --shard "$i/$GPUS" --no-progress "$@" > "$OUT/worker_$i.log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
python -m merit_ds.study --preset "$MODEL" --budget-divisor "$BUDGET_DIVISOR" --data "$DATA" --out "$OUT" \
    --report-only "$@"
exit $status
