"""setup.sh chooses the torch build by what the machine has (issue 21: one install for clusters).

Run in its dry-run mode (MERIT_DS_SETUP_DRY_RUN=1: prints the decision and the pip commands,
changes nothing) against a fake NVIDIA driver listing (MERIT_DS_GPU_PROC), so the CUDA branch is
checked on this CPU-only machine without downloading a CUDA torch.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from _dist import REPO_ROOT

SETUP = REPO_ROOT / "setup.sh"


def _run(tmp_path, gpus: int, **env):
    proc = tmp_path / "gpus"
    proc.mkdir(exist_ok=True)
    for i in range(gpus):
        (proc / f"0000:{i + 1:02x}:00.0").mkdir(exist_ok=True)
    full = {k: v for k, v in os.environ.items() if not k.startswith("MERIT_DS_")}
    full.update({"MERIT_DS_SETUP_DRY_RUN": "1", "MERIT_DS_GPU_PROC": str(proc), **env})
    return subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, env=full, timeout=60)


def _venv_md5():
    stamp = REPO_ROOT / ".venv" / ".merit_ds_installed"
    return hashlib.md5(stamp.read_bytes()).hexdigest() if stamp.exists() else None


def test_gpu_node_gets_the_cuda_build_without_the_cpu_pins(tmp_path):
    before = _venv_md5()
    out = _run(tmp_path, gpus=8)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "setup.sh: torch build: cuda (8 NVIDIA GPU(s) visible)"
    assert "pip install -q torch==2.13.0" in lines[1] and "+cpu" not in lines[1]
    assert "without its torch and triton pins" in lines[2]
    assert "-c .venv/constraints-cuda.txt" in lines[3]
    assert _venv_md5() == before  # a dry run changes nothing


def test_cpu_machine_keeps_the_cpu_build(tmp_path):
    out = _run(tmp_path, gpus=0)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "setup.sh: torch build: cpu (no NVIDIA GPU visible)"
    assert "-c constraints.txt" in out.stdout


@pytest.mark.parametrize("gpus, force, want", [(8, "cpu", "cpu"), (0, "cuda", "cuda")])
def test_the_override_wins(tmp_path, gpus, force, want):
    out = _run(tmp_path, gpus=gpus, MERIT_DS_TORCH=force)
    assert out.stdout.splitlines()[0] == f"setup.sh: torch build: {want} (MERIT_DS_TORCH={force})"


def test_a_cuda_index_is_passed_to_pip(tmp_path):
    out = _run(tmp_path, gpus=1, MERIT_DS_TORCH_INDEX="https://download.pytorch.org/whl/cu128")
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in out.stdout


def test_a_wrong_override_is_one_line_and_changes_nothing(tmp_path):
    before = _venv_md5()
    out = _run(tmp_path, gpus=0, MERIT_DS_TORCH="gpu", MERIT_DS_SETUP_DRY_RUN="0")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "setup.sh: MERIT_DS_TORCH=gpu: expected cpu, cuda or auto (unset). Nothing was changed."
    assert _venv_md5() == before
