#!/usr/bin/env bash
# GPT-2 Small, global batch 1024 (1k), 2 nodes x 8 GPUs, MERIT under ZeRO-1, bf16, OpenMPI mpirun.
#
# Command:   bash launch/mpirun.sh
#   = mpirun -np 16 -npernode 8 --hostfile launch/mpi_hosts -x PYTHONPATH -x PATH \
#         python -m merit_ds.train --model gpt2-small --ds-config ds_configs/gpt2-small_b1024_zero1_bf16.json \
#         --data data/owt --out runs/gpt2-small-b1024
# batch: micro_batch 32 x grad_accum 2 x world 16 = 1024 sequences x 1024 = 1,048,576 tokens/step; 48e9 tokens -> 45,777 steps
# Rank, world size and master address come from MPI: deepspeed.init_distributed's mpi4py discovery
# (pip install mpi4py; OpenMPI's libmpi-dev). launch/mpi_hosts: "node0 slots=8" per node.
# Tested on CPU with 2 ranks (tests/test_recipes_train.py): same losses as the deepspeed launcher, bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec mpirun -np "${NP:-16}" -npernode "${PER_NODE:-8}" --hostfile "${HOSTS:-launch/mpi_hosts}" \
    -x PYTHONPATH -x PATH -x LD_LIBRARY_PATH \
    python -m merit_ds.train --model gpt2-small --ds-config ds_configs/gpt2-small_b1024_zero1_bf16.json \
    --data "${DATA:-data/owt}" --out "${OUT:-runs/gpt2-small-b1024}" \
    --eval-every 500 --ckpt-every 1000 --keep-last 3 --diag-every 100 "$@"
