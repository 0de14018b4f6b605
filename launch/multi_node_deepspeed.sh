#!/usr/bin/env bash
# GPT-2 Small, global batch 6144 (6k), 4 nodes x 8 GPUs, MERIT under ZeRO-1, bf16, deepspeed launcher.
#
# Command, pdsh mode (passwordless ssh; run once, on node 0):
#   bash launch/multi_node_deepspeed.sh pdsh
#   = deepspeed --hostfile launch/hostfile --launcher pdsh --master_addr node0 --master_port 29500 \
#         --module merit_ds.train --model gpt2-small --ds-config ds_configs/gpt2-small_b6144_zero1_bf16.json \
#         --data data/owt --out runs/gpt2-small-b6144
# Command, no-ssh mode (no ssh between nodes; run on EVERY node, k = 0..3):
#   NODE_RANK=k MASTER_ADDR=node0 bash launch/multi_node_deepspeed.sh no-ssh
#   = deepspeed --hostfile launch/hostfile --no_ssh --node_rank k --master_addr node0 --master_port 29500 ...same...
# batch: micro_batch 192 x grad_accum 1 x world 32 = 6144 sequences x 1024 = 6,291,456 tokens/step; 48e9 tokens -> 7,630 steps
# The hostfile (launch/hostfile.example) lists every node with its GPU count; --data and --out must be
# on a filesystem all nodes share (checkpoints are renamed into place by global rank 0).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-pdsh}
shift || true
MODEL=${MODEL:-gpt2-small}
BATCH=${BATCH:-6144}
HOSTFILE=${HOSTFILE:-launch/hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-data/owt}
OUT=${OUT:-runs/${MODEL}-b${BATCH}}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
train=(--module merit_ds.train --model "$MODEL" --ds-config "ds_configs/${MODEL}_b${BATCH}_zero1_bf16.json"
       --data "$DATA" --out "$OUT" --eval-every 200 --ckpt-every 500 --keep-last 3 --diag-every 100 "$@")
case "$MODE" in
  pdsh)   exec deepspeed --hostfile "$HOSTFILE" --launcher pdsh --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${train[@]}" ;;
  no-ssh) exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}" \
               --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${train[@]}" ;;
  *) echo "usage: $0 pdsh|no-ssh [extra merit_ds.train args]" >&2; exit 2 ;;
esac
