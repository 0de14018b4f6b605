"""Data that cannot silently rot: shard checksums and token ids are checked before training.

Unit tests against an independent reference (numpy over the shard files, hashlib over their
bytes), the repair the error names, and the training loop itself: corrupt or out-of-vocabulary
data stops it with exit code 2 and one line naming the file, before any step (no metrics, no
run directory), on every rank.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from merit_ds.data import CorruptDataError, DataError, prepare, read_manifest
from merit_ds.data.__main__ import main as cli
from merit_ds.data.integrity import check_token_data

KW = dict(val_fraction=0.25, shard_tokens=400, progress=False)
WORDS = "the of and to in that he shall unto for his a they be is him not them it with all".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) for _ in range(120)]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return src


@pytest.fixture()
def prepared(corpus, tmp_path) -> Path:
    out = tmp_path / "data"
    prepare(corpus, out, **KW)
    return out


def shard_files(out: Path) -> list[Path]:
    m = read_manifest(out)
    return [out / r["file"] for s in ("train", "val") for r in m["splits"][s]["shards"]]


def flip(path: Path, offset: int = 2) -> bytes:
    """Swap two bytes of the first token pair that differ: a still-valid-looking shard, other sha256."""
    data = bytearray(path.read_bytes())
    original = bytes(data)
    a, b = offset, offset + 2
    while data[a:a + 2] == data[b:b + 2]:
        b += 2
    data[a:a + 2], data[b:b + 2] = data[b:b + 2], data[a:a + 2]
    path.write_bytes(bytes(data))
    assert np.frombuffer(bytes(data), "<u2").max() < 50257  # ids still valid: only the checksum can tell
    return original


def test_clean_data_passes_and_max_id_is_the_true_maximum(prepared, capsys):
    files = shard_files(prepared)
    assert len(files) >= 6
    want = max(int(np.fromfile(f, dtype="<u2").max()) for f in files)
    got = check_token_data(prepared, vocab_size=50257)
    assert got == {"shards": len(files), "checked_here": len(files), "max_id": want, "checksums": True, "skipped": False}
    assert want == 50256  # EOS ends every document
    # two "ranks" without a process group: each reads its share (i % world), together all shards
    parts = [check_token_data(prepared, 50257, rank=r, world=2) for r in (0, 1)]
    assert [p["checked_here"] for p in parts] == [(len(files) + 1) // 2, len(files) // 2]
    assert cli(["info", str(prepared), "--verify"]) == 0
    assert f"all {len(files)} shards match their sha256; largest token id {want} < vocabulary 50257" in capsys.readouterr().out


def test_flipped_bytes_are_named_with_the_commands_that_confirm_and_repair(prepared):
    victim = shard_files(prepared)[1]
    original = flip(victim)
    with pytest.raises(CorruptDataError) as info:
        check_token_data(prepared, vocab_size=50257)
    msg = str(info.value)
    assert f"corrupt shard {victim}: sha256 does not match the manifest" in msg
    assert f"python -m merit_ds.data info {prepared} --verify" in msg
    assert cli(["info", str(prepared), "--verify"]) == 2  # confirms
    # the repair command in the message, run as given: the shard gets its original bytes back
    repair = re.search(r"repair with `python -m merit_ds\.data (prepare [^`]*)`", msg).group(1)
    assert cli([*shlex.split(repair), "--quiet"]) == 0
    assert victim.read_bytes() == original
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == read_manifest(prepared)["splits"]["train"]["shards"][1]["sha256"]
    assert not (prepared / ".repair").exists()
    assert check_token_data(prepared, 50257)["max_id"] == 50256


def test_repair_refuses_when_the_corpus_changed(corpus, tmp_path):
    """Same path and size (so the same settings), other text: the shards cannot be reproduced."""
    src = tmp_path / "c.jsonl"
    src.write_text(corpus.read_text())
    out = tmp_path / "data"
    prepare(src, out, **KW)
    flip(shard_files(out)[0])
    src.write_text(corpus.read_text().replace(" shall ", " shalt ", 1))
    before = {f.name: f.read_bytes() for f in shard_files(out)}
    with pytest.raises(DataError, match="does not reproduce the shards"):
        prepare(src, out, repair=True, **KW)
    assert {f.name: f.read_bytes() for f in shard_files(out)} == before  # nothing replaced


def test_out_of_vocabulary_ids_are_a_data_error_at_the_exact_boundary(prepared):
    files = shard_files(prepared)
    maxima = [int(np.fromfile(f, dtype="<u2").max()) for f in files]
    top = max(maxima)
    assert check_token_data(prepared, vocab_size=top + 1)["max_id"] == top
    with pytest.raises(DataError) as info:
        check_token_data(prepared, vocab_size=top)
    msg = str(info.value)
    first = files[maxima.index(top)]
    assert f"shard {first} holds token id {top}, outside the model's vocabulary (vocab_size {top})" in msg
    assert "its checksums match, so the data is as prepared, with a tokenizer of vocabulary 50257 (gpt2)" in msg
    assert f"--out NEW_DIR --val-fraction 0.25 --shard-tokens 400 --tokenizer MODEL_TOKENIZER_DIR`" in msg
    assert f"a vocabulary of at least {top + 1}" in msg and f"info {prepared} --verify" in msg


def test_nanogpt_data_has_only_the_vocabulary_check(tmp_path):
    d = tmp_path / "nano"
    d.mkdir()
    np.array([1, 2, 3, 60000, 5], dtype="<u2").tofile(d / "train.bin")
    np.array([7, 8, 9], dtype="<u2").tofile(d / "val.bin")
    assert check_token_data(d, 60001) == {"shards": 2, "checked_here": 2, "max_id": 60000, "checksums": False,
                                          "skipped": False}
    with pytest.raises(DataError, match=f"shard {d / 'train.bin'} holds token id 60000"):
        check_token_data(d, 50257)
    assert check_token_data(d / "val.bin", 10)["max_id"] == 9


# ---------------------------------------------------------------------------------------------
# the training loop: stops before the first step

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--model-override", "n_layer=1", "--model-override", "n_embd=32",
        "--model-override", "n_head=2", "--seq-len", "32", "--global-batch", "4", "--micro-batch", "2",
        "--zero-stage", "2", "--precision", "fp32", "--eval-every", "0", "--ckpt-every", "0", "--diag-every", "0",
        "--tracker", "none", "--no-progress", "--no-plot", "--steps", "1"]


def train(data: Path, out: Path, nprocs: int = 1) -> subprocess.CompletedProcess:
    from _dist import dist_env, free_port

    args = [*TINY, "--data", str(data), "--out", str(out)]
    if nprocs == 1:
        cmd = [sys.executable, "-m", "merit_ds.train", *args]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nprocs), "--master_port",
               str(free_port()), "--module", "merit_ds.train", *args]
    return subprocess.run(cmd, env=dist_env(), cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # the training loop on 2 ranks
def test_loop_stops_on_a_flipped_shard_on_every_rank(prepared, tmp_path):
    """Two ranks: the corrupt shard (index 1) is read by rank 1 only; rank 0 stops too."""
    victim = shard_files(prepared)[1]
    flip(victim)
    out = tmp_path / "run"
    r = train(prepared, out, nprocs=2)
    assert r.returncode == 2, r.stderr[-3000:]  # the ranks' exit code, passed on by the launcher
    # split at each message's start, not at newlines: two ranks write to the launcher's one pipe
    lines = [m for m in re.split(r"(?=merit_ds\.train: error)", r.stdout + r.stderr) if m.startswith("merit_ds.train: error")]
    # rank 0's own message (rank 1's says "error (rank 1):")
    assert any(ln.startswith("merit_ds.train: error: data: corrupt shard") for ln in lines), r.stderr[-3000:]
    assert any("error (rank 1): data: corrupt shard" in ln for ln in lines), r.stderr[-3000:]
    for ln in lines:
        assert f"{victim}: sha256 does not match the manifest" in ln and "info" in ln and "--verify" in ln
    assert not out.exists()  # no step, no metrics, no checkpoint
    assert "MERIT verified stepping" not in r.stdout  # stopped before the model was even built


@pytest.mark.slow  # a training-loop process
def test_loop_stops_on_out_of_vocabulary_ids_not_index_error(tmp_path):
    d = tmp_path / "nano"
    d.mkdir()
    rng = np.random.default_rng(1)
    train_ids = rng.integers(0, 1000, size=3000).astype("<u2")
    train_ids[1234] = 50257  # one past GPT-2's last id
    train_ids.tofile(d / "train.bin")
    rng.integers(0, 1000, size=600).astype("<u2").tofile(d / "val.bin")
    out = tmp_path / "run"
    r = train(d, out)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("merit_ds.train: error:")]
    assert len(err) == 1
    assert f"data: shard {d / 'train.bin'} holds token id 50257, outside the model's vocabulary (vocab_size 50257)" in err[0]
    assert "IndexError" not in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.slow  # a training-loop process
def test_loop_trains_on_clean_prepared_data(prepared, tmp_path):
    out = tmp_path / "run"
    r = train(prepared, out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "loss" in x] == [1]
    assert np.isfinite(recs[0]["loss"])
