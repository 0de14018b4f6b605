"""Restarts do not re-hash what did not change (issue 21): the token shards and the checkpoint
to resume are re-read only where their size or modification time changed since their last full
check; ``--verify full`` (``full=True`` / ``checksums=True``) re-reads everything."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from merit_ds.data import integrity
from merit_ds.data.errors import DataError
from merit_ds.train import checkpoint as ckpt

RUN = {"optimizer": "merit", "model_config": {"n": 1}, "seq_len": 8, "global_batch": 4, "precision": "fp32",
       "zero_stage": 2, "schedule": "cosine", "world": 2}


def _data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for split, n in (("train", 4096), ("val", 512)):
        np.arange(n, dtype="<u2").__mod__(50).astype("<u2").tofile(d / f"{split}.bin")
    return d


def _count_reads(monkeypatch):
    calls = []
    real = integrity._scan_named
    monkeypatch.setattr(integrity, "_scan_named", lambda s, v: calls.append(s) or real(s, v))
    return calls


def test_unchanged_shards_are_not_read_again(tmp_path, monkeypatch):
    data, record = _data(tmp_path), tmp_path / "run" / "verified_data.json"
    reads = _count_reads(monkeypatch)
    first = integrity.check_token_data(data, 50, verified_record=record, full=False)
    assert not first["skipped"] and len(reads) == 2 and first["max_id"] == 49 and record.is_file()
    again = integrity.check_token_data(data, 50, verified_record=record, full=False)
    assert again["skipped"] and len(reads) == 2 and again["max_id"] == 49  # nothing read
    full = integrity.check_token_data(data, 50, verified_record=record, full=True)
    assert not full["skipped"] and len(reads) == 4  # --verify full reads everything


def test_a_changed_shard_is_read_and_its_fault_found(tmp_path, monkeypatch):
    data, record = _data(tmp_path), tmp_path / "run" / "verified_data.json"
    integrity.check_token_data(data, 50, verified_record=record, full=False)
    np.full(512, 60, dtype="<u2").tofile(data / "val.bin")  # ids past the vocabulary; new mtime
    reads = _count_reads(monkeypatch)
    with pytest.raises(DataError, match="60"):
        integrity.check_token_data(data, 50, verified_record=record, full=False)
    assert reads  # re-read because it changed


def test_another_vocabulary_is_checked_again(tmp_path, monkeypatch):
    data, record = _data(tmp_path), tmp_path / "run" / "verified_data.json"
    integrity.check_token_data(data, 50, verified_record=record, full=False)
    with pytest.raises(DataError):
        integrity.check_token_data(data, 40, verified_record=record, full=False)  # ids up to 49 >= 40


def _checkpoint(tmp_path: Path) -> Path:
    root = tmp_path / "checkpoints"
    tmp = root / ".tmp-step_00000004"
    tmp.mkdir(parents=True)
    (tmp / "model.pt").write_bytes(os.urandom(4096))
    (tmp / "optim.pt").write_bytes(os.urandom(8192))
    return ckpt.finalize(root, tmp.name, "step_00000004", RUN, 4)


def _count_hashes(monkeypatch):
    calls = []
    real = ckpt.sha256_file
    monkeypatch.setattr(ckpt, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    return calls


def test_untouched_checkpoint_files_are_not_rehashed(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path)
    hashes = _count_hashes(monkeypatch)
    ckpt.validate(path, RUN, checksums="changed")
    assert hashes == []
    ckpt.validate(path, RUN, checksums=True)
    assert sorted(hashes) == ["model.pt", "optim.pt"]


def test_a_rewritten_checkpoint_file_is_rehashed_and_caught(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path)
    before = hashlib.md5((path / "optim.pt").read_bytes()).hexdigest()
    victim = path / "model.pt"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))  # same size, new mtime
    with pytest.raises(ckpt.CheckpointError, match="model.pt fails its sha256 check"):
        ckpt.validate(path, RUN, checksums="changed")
    assert hashlib.md5((path / "optim.pt").read_bytes()).hexdigest() == before  # nothing else touched


def test_bit_rot_that_keeps_the_mtime_needs_verify_full(tmp_path):
    # the documented trade-off: a change that keeps size and mtime is found by --verify full only
    path = _checkpoint(tmp_path)
    victim = path / "model.pt"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[0] ^= 0x01
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    ckpt.validate(path, RUN, checksums="changed")  # passes
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.validate(path, RUN, checksums=True)


def test_metadata_records_each_files_mtime(tmp_path):
    path = _checkpoint(tmp_path)
    meta = json.loads((path / ckpt.META).read_text())
    for rel, rec in meta["files"].items():
        assert rec["mtime_ns"] == (path / rel).stat().st_mtime_ns and rec["bytes"] == (path / rel).stat().st_size
