"""issue #21 (first bite): GPUs visible but a torch that cannot use them (the CPU build from a
constrained install) must not train on the CPU silently: one line, exit 2, nothing written.
MERIT_DS_ALLOW_CPU=1 lets such a run go on; no visible GPU (this machine) changes nothing."""

from __future__ import annotations

import torch

from merit_ds.train import launcher
from merit_ds.train.loop import main


def _args(tmp_path):
    return ["--model", "tiny", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--no-progress"]


def test_refused_with_one_line_when_gpus_are_visible_but_torch_cannot_use_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launcher, "visible_nvidia_gpus", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MERIT_DS_ALLOW_CPU", raising=False)
    assert main(_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("merit_ds.train: error: 8 NVIDIA GPU(s) are visible (/proc/driver/nvidia/gpus) but torch ")
    assert "this run would train on the CPU. Install torch's CUDA build (README, 'On a GPU cluster')" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_allowed_explicitly_and_silent_without_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launcher, "visible_nvidia_gpus", lambda: 8)
    monkeypatch.setenv("MERIT_DS_ALLOW_CPU", "1")
    assert launcher.cpu_torch_on_gpu_node() is None
    monkeypatch.delenv("MERIT_DS_ALLOW_CPU")
    monkeypatch.setattr(launcher, "visible_nvidia_gpus", lambda: 0)
    assert launcher.cpu_torch_on_gpu_node() is None
