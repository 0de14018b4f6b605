"""Bad input: a clear error naming the file, and nothing already prepared is overwritten or lost."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import numpy as np
import pytest

from merit_ds.data import CorruptDataError, DataError, TokenBlockLoader, open_split, prepare, verify_prepared
from merit_ds.data.__main__ import main as cli

KW = dict(val_fraction=0.25, shard_tokens=8, progress=False)


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture()
def prepared(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i} says hello"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    prepare(src, out, **KW)
    return src, out


def test_missing_path(tmp_path, capsys):
    with pytest.raises(DataError, match=f"does not exist: {tmp_path / 'nope'}"):
        prepare(tmp_path / "nope", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert cli(["prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        open_split(tmp_path / "nope")


def test_empty_corpus(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(DataError, match=f"no corpus files .* under {d}"):
        prepare(d, tmp_path / "out", progress=False)
    (d / "a.txt").write_text("")
    (d / "b.txt").write_text("")
    for streaming in (False, True):
        with pytest.raises(DataError, match=f"corpus {d} contains no text"):
            prepare(d, tmp_path / "out", progress=False, streaming=streaming)
        assert not (tmp_path / "out").exists()  # nothing left behind
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="e.jsonl"):
        prepare(tmp_path / "e.jsonl", tmp_path / "out2", progress=False)


def test_unreadable_or_malformed_file_is_named(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (d / "b.jsonl").write_text('{"text": "broken\n')
    for streaming in (False, True):
        with pytest.raises(DataError, match="b.jsonl"):
            prepare(d, tmp_path / "out", progress=False, streaming=streaming)
        assert not (tmp_path / "out").exists()  # a run that failed before its first shard leaves nothing
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="x.parquet"):
        prepare(tmp_path / "x.parquet", tmp_path / "out", progress=False)
    (tmp_path / "w.jsonl").write_text(json.dumps({"body": "text under another key"}) + "\n")
    with pytest.raises(DataError, match="no column 'text'"):
        prepare(tmp_path / "w.jsonl", tmp_path / "out", progress=False)
    (tmp_path / "odd.bin").write_bytes(b"\0\0\0")
    with pytest.raises(CorruptDataError, match="odd.bin"):
        open_split(tmp_path / "odd.bin")
    if os.geteuid() != 0:  # root reads anything
        f = tmp_path / "locked.txt"
        f.write_text("secret")
        f.chmod(0)
        with pytest.raises(DataError, match="locked.txt"):
            prepare(f, tmp_path / "out", progress=False)


def test_corrupt_shard_is_named_and_left_alone(prepared):
    src, out = prepared
    shard = out / "train_000001.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = snapshot(out)
    with pytest.raises(CorruptDataError, match="train_000001.bin"):
        verify_prepared(out)
    with pytest.raises(CorruptDataError, match="train_000001.bin"):
        prepare(src, out, **KW)
    assert cli(["info", str(out), "--verify"]) == 2
    assert snapshot(out) == before  # nothing rewritten
    shard.write_bytes(bytes(data[:-2]))  # truncated: caught by the cheap size check on open
    with pytest.raises(CorruptDataError, match="train_000001.bin"):
        TokenBlockLoader(out, block_size=4, global_batch=2)


def test_corrupt_manifest_is_named_and_left_alone(prepared):
    src, out = prepared
    (out / "manifest.json").write_text('{"format": "merit_ds.token_shards", "spl')
    before = snapshot(out)
    with pytest.raises(CorruptDataError, match="manifest.json"):
        open_split(out)
    with pytest.raises(CorruptDataError, match="manifest.json"):
        prepare(src, out, **KW)
    assert snapshot(out) == before


def test_existing_output_is_never_overwritten(prepared, tmp_path):
    src, out = prepared
    before = snapshot(out)
    with pytest.raises(DataError, match="different preparation"):
        prepare(src, out, **dict(KW, shard_tokens=9))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "something else"}) + "\n")
    with pytest.raises(DataError, match="different preparation"):
        prepare(other, out, **KW)
    assert snapshot(out) == before
    # shard files with neither manifest nor journal: refuse
    (out / "manifest.json").unlink()
    before = snapshot(out)
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare(src, out, **KW)
    assert snapshot(out) == before
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        prepare(src, f, **KW)


def test_corrupt_or_foreign_journal(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": "hello"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".progress.json").write_text("{not json")
    with pytest.raises(CorruptDataError, match=".progress.json"):
        prepare(src, out, **KW)
    (out / ".progress.json").write_text(json.dumps({"settings": {"other": 1}, "splits": {}}))
    with pytest.raises(DataError, match=".progress.json"):
        prepare(src, out, **KW)
    assert (out / ".progress.json").read_text() == json.dumps({"settings": {"other": 1}, "splits": {}})


def test_bad_arguments(tmp_path):
    for kw, msg in [({"val_fraction": 1.0}, "val_fraction"), ({"shard_tokens": 0}, "shard_tokens"),
                    ({"num_proc": 0}, "num_proc")]:
        with pytest.raises(DataError, match=msg):
            prepare("kjv", tmp_path / "o", progress=False, **kw)
    nano = tmp_path / "nano"
    nano.mkdir()
    np.array([1, 2, 60000], dtype="<u2").tofile(nano / "train.bin")
    with pytest.raises(DataError, match="train.bin holds id 60000"):
        prepare(nano, tmp_path / "o", progress=False)


def test_single_document_corpus_all_in_val(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("First paragraph.\n\nSecond paragraph.\n")
    with pytest.raises(DataError, match="only 1 document.*text_unit 'paragraph'"):
        prepare(book, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    m = prepare(book, tmp_path / "out", text_unit="paragraph", val_fraction=0.5, progress=False)
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (1, 1)
