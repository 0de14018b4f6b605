"""keep_last pruning also removes universal copies whose source checkpoint is gone (issue 21)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from merit_ds.train.checkpoint import META, prune


def _ckpt(root: Path, step: int, complete: bool = True) -> Path:
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "weights.pt").write_bytes(bytes([step]) * 64)
    if complete:
        (d / META).write_text("{}")
    return d


def _md5s(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_universal_copies_of_pruned_checkpoints_go_with_them(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        _ckpt(root, step)
    for step in (10, 30):  # copies made when the run resumed on another world size
        _ckpt(root / "universal", step)
    (root / "universal" / ".tmp-step_00000040").mkdir()  # an interrupted conversion
    kept_before = {k: v for k, v in _md5s(root).items() if "step_00000030" in k or "step_00000040" in k}
    removed = prune(root, keep_last=2)
    names = sorted(str(p.relative_to(root)) for p in removed)
    assert names == ["step_00000010", "step_00000020", "universal/.tmp-step_00000040", "universal/step_00000010"]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000030", "step_00000040"]
    assert sorted(p.name for p in (root / "universal").iterdir()) == ["step_00000030"]
    # what is kept is untouched, byte for byte (the universal copy of a kept checkpoint included)
    assert {k: v for k, v in _md5s(root).items() if k in kept_before} == kept_before


def test_keep_last_zero_keeps_every_checkpoint_and_its_copy(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        _ckpt(root, step)
    _ckpt(root / "universal", 10)
    before = _md5s(root)
    assert prune(root, keep_last=0) == []
    assert _md5s(root) == before
