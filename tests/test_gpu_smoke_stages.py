"""benchmarks/gpu_smoke.py's card detection and its train_stages section (issue 21), on CPU."""

from __future__ import annotations

import sys

import pytest

from _dist import REPO_ROOT


def _smoke():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import gpu_smoke
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    return gpu_smoke


@pytest.mark.parametrize("name, gib, key", [
    ("NVIDIA H100 80GB HBM3", 79.6, "h100"),
    ("NVIDIA H100 PCIe", 79.6, "h100-pcie"),
    ("NVIDIA H200", 139.8, "h200"),
    ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "a100"),
    ("NVIDIA L4", 22.0, None),  # not a card the planner lists: no plan comparison, said so
])
def test_the_plan_comparison_uses_the_card_found(name, gib, key):
    assert _smoke().plan_gpu(name, int(gib * 1024**3)) == key


@pytest.mark.slow  # three short training jobs
def test_train_stages_section_dry_runs_on_cpu(tmp_path, monkeypatch):
    smoke = _smoke()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import subprocess

    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "merit_ds.data", "prepare", "--input", "kjv", "--out", str(data)], check=True, cwd=REPO_ROOT,
                   capture_output=True)
    r = smoke.train_stages(1, 3, model="tiny", micros=(2,), stages=(1, 2), precision="fp32", data=data)
    assert r["pass"], [e.get("tail") for e in r["runs"]]
    assert [(e["stage"], e["micro_batch"], e["compile"]) for e in r["runs"]] == [
        (1, 2, "auto"), (2, 2, "auto"), (2, 2, "off")]
    for e in r["runs"]:
        assert e["tokens_per_s"] > 0 and e["steps_logged"] >= 2
    assert r["plan_gpu"] is None and "no plan comparison" in r["plan_note"]  # no CUDA card here
    smoke.write({"env": {}, "train_stages": {"ok": True, "seconds": 1, **r}}, tmp_path / "smoke")
    table = (tmp_path / "smoke.md").read_text()
    assert "| 2 | 2 | off |" in table
