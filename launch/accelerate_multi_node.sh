#!/usr/bin/env bash
# GPT-2 Medium, global batch 2048 (2k), 2 nodes x 8 GPUs, MERIT under ZeRO-1, bf16, accelerate launch.
#
# Command (run on every node; k = 0 on node0, 1 on node1):
#   MACHINE_RANK=k MAIN_IP=node0 bash launch/accelerate_multi_node.sh
#   = accelerate launch --config_file launch/accelerate_multi_node.yaml --machine_rank k --main_process_ip node0 \
#         -m merit_ds.train --model gpt2-medium --data data/owt --out runs/gpt2-medium-b2048
# batch: micro_batch 64 x grad_accum 2 x world 16 = 2048 sequences x 1024 = 2,097,152 tokens/step; 48e9 tokens -> 22,889 steps
# merit_ds.train reads the DeepSpeed JSON named in the YAML (batch, lr, ZeRO stage) and steps its
# own warmup-cosine schedule once per optimizer step (not Accelerate's per-process stepping).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec accelerate launch --config_file launch/accelerate_multi_node.yaml \
    --machine_rank "${MACHINE_RANK:?set MACHINE_RANK}" --main_process_ip "${MAIN_IP:-node0}" \
    -m merit_ds.train --model gpt2-medium --data "${DATA:-data/owt}" --out "${OUT:-runs/gpt2-medium-b2048}" \
    --eval-every 500 --ckpt-every 1000 --keep-last 3 --diag-every 100 "$@"
