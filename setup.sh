#!/usr/bin/env bash
# Creates (or refreshes) the project's environment in .venv/ at the repository root and
# installs the tested, pinned set. Idempotent: a second run with everything present takes
# seconds. Usage: bash setup.sh
#
# Which torch build: on a machine whose NVIDIA driver lists GPUs (/proc/driver/nvidia/gpus, or
# `nvidia-smi -L`) the CUDA build of the pinned torch, with the triton that build pins; elsewhere
# the CPU build (constraints.txt's torch==2.13.0+cpu). Overrides:
#   MERIT_DS_TORCH=cpu|cuda        force one (default: auto)
#   MERIT_DS_TORCH_INDEX=URL       where the CUDA build comes from (default: pip's index, whose
#                                  Linux torch wheel is a CUDA build; e.g.
#                                  https://download.pytorch.org/whl/cu128 for another CUDA version)
#   MERIT_DS_SETUP_DRY_RUN=1       print the decision and the pip commands, change nothing
set -euo pipefail
cd "$(dirname "$0")"
root=$(pwd)

torch_version=2.13.0
gpu_proc=${MERIT_DS_GPU_PROC:-/proc/driver/nvidia/gpus}   # (tests point it at a fake driver listing)
gpus=0
if [ -d "$gpu_proc" ]; then gpus=$(find "$gpu_proc" -mindepth 1 -maxdepth 1 | wc -l); fi
if [ "$gpus" = 0 ] && [ -z "${MERIT_DS_GPU_PROC:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
mode=${MERIT_DS_TORCH:-auto}
case "$mode" in
  auto) if [ "$gpus" -gt 0 ]; then mode=cuda; why="$gpus NVIDIA GPU(s) visible"; else mode=cpu; why="no NVIDIA GPU visible"; fi ;;
  cpu|cuda) why="MERIT_DS_TORCH=$mode" ;;
  *) echo "setup.sh: MERIT_DS_TORCH=$mode: expected cpu, cuda or auto (unset). Nothing was changed." >&2; exit 2 ;;
esac
# The CUDA build brings its own triton: constraints.txt without the CPU pins of torch and triton.
gpu_constraints=.venv/constraints-$mode.txt
if [ "$mode" = cuda ]; then
  torch_cmd=(-m pip install -q "torch==$torch_version" ${MERIT_DS_TORCH_INDEX:+--index-url "$MERIT_DS_TORCH_INDEX"})
  rest_cmd=(-m pip install -q -c "$gpu_constraints" -e ".[hf,dev,megatron]")
else
  torch_cmd=(-m pip install -q "torch==$torch_version")   # the CPU build (from local disk where it lies there)
  rest_cmd=(-m pip install -q -c constraints.txt -e ".[hf,dev,megatron]")
fi
if [ "${MERIT_DS_SETUP_DRY_RUN:-0}" = 1 ]; then
  echo "setup.sh: torch build: $mode ($why)"
  echo "setup.sh: would run: python ${torch_cmd[*]}"
  [ "$mode" = cuda ] && echo "setup.sh: would write $gpu_constraints: constraints.txt without its torch and triton pins"
  echo "setup.sh: would run: python ${rest_cmd[*]}"
  exit 0
fi
echo "setup.sh: torch build: $mode ($why); override with MERIT_DS_TORCH=cpu|cuda"

need_apt=()
# mpi4py needs an MPI library to build and import; numactl is for --bind_cores_to_rank.
dpkg -s libopenmpi-dev >/dev/null 2>&1 || need_apt+=(libopenmpi-dev openmpi-bin)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)   # DeepSpeed JIT-compiles its CPU ops
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup.sh: please install with apt: ${need_apt[*]}" >&2; exit 1
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
vpy="$root/.venv/bin/python"
stamp=.venv/.merit_ds_installed
want=$( (cat constraints.txt setup.py; echo "$mode ${MERIT_DS_TORCH_INDEX:-}") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, alone; then everything else against the constraints, so that no resolver replaces
# that torch and no transitive dependency drifts.
"$vpy" "${torch_cmd[@]}"
if [ "$mode" = cuda ]; then
  grep -v -E '^(torch|triton)==' constraints.txt > "$gpu_constraints"
  if ! "$vpy" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
    echo "setup.sh: the torch installed ($("$vpy" -c 'import torch; print(torch.__version__)')) is not a CUDA build." \
         "Set MERIT_DS_TORCH_INDEX to PyTorch's wheel index for your CUDA version" \
         "(e.g. https://download.pytorch.org/whl/cu128) and run setup.sh again; or MERIT_DS_TORCH=cpu." >&2
    exit 1
  fi
fi
"$vpy" "${rest_cmd[@]}"
# JIT-built C++ ops, built here, not inside the first training step or timed test that needs them,
# with the venv's bin/ first on PATH, as the launchers have it: its ninja, not the system's (two
# ninja versions disagree on the build's hash and rebuild each other's work from scratch).
export PATH="$root/.venv/bin:$PATH"
# MERIT's CPU kernel (~40 s; merit_ds/optim/cpu_kernel.py). Without g++ it warns and the foreach
# path is used.
"$vpy" -c "from merit_ds.optim import cpu_kernel; cpu_kernel.load()"
# DeepSpeed's shared-memory all-reduce for CPU ranks on one machine (~30 s), which every CPU job
# with 2+ ranks loads at start-up (the demo, the multi-process tests). Optional: a failure here
# only means the first such job builds it.
DS_ACCELERATOR=cpu "$vpy" -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
    >/dev/null 2>&1 || echo "setup.sh: DeepSpeed's CPU shared-memory op did not build now; the first CPU job builds it" >&2
echo "$want" > "$stamp"
