#!/usr/bin/env bash
# Creates (or refreshes) the project's environment in .venv/ at the repository root and
# installs the tested, pinned set. Idempotent: a second run with everything present takes
# seconds. Usage: bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"
root=$(pwd)

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
want=$(cat constraints.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, alone: the CPU build (from local disk where it lies there).
"$vpy" -m pip install -q "torch==2.13.0"
# Everything else against the constraints file so torch stays the CPU build.
"$vpy" -m pip install -q -c constraints.txt -e ".[hf,dev]"
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
