"""Packing is exact, deterministic, parallel-invariant, idempotent and resumable."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import hashlib
import importlib
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from merit_ds.data import (TokenBlockLoader, is_val_document, load_tokenizer, open_split, prepare,
                           read_manifest)
from merit_ds.data.__main__ import main as cli

prepare_module = importlib.import_module("merit_ds.data.prepare")  # the package exports the function

DOCS = [
    "Hello world",
    "In the beginning God created the heavens and the earth.",
    "",  # empty: not a document
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Line one\nline two <|endoftext|> still text",
    "Short.",
    "A somewhat longer document that spans more than one shard when shards are small, "
    "so that the shard boundaries fall inside documents as well as between them.",
    "Ünïcödé and emoji 🙂 survive byte-level BPE.",
    "The end.",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def expected_streams(docs, tok, val_fraction):
    """Reference packing, written independently: per split, the concatenated ids + EOS."""
    frac = Fraction(str(val_fraction))
    streams = {"train": [], "val": []}
    ndocs = {"train": 0, "val": 0}
    for i, text in enumerate(docs):
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if not ids:
            continue
        split = "val" if math.ceil((i + 1) * frac) > math.ceil(i * frac) else "train"
        streams[split] += ids + [50256]
        ndocs[split] += 1
    return streams, ndocs


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def read_split(out, split):
    m = read_manifest(out)
    return np.concatenate([np.fromfile(out / r["file"], dtype="<u2") for r in m["splits"][split]["shards"]]
                          or [np.zeros(0, "<u2")])


def dir_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


def test_packing_is_exact(tmp_path, tok):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    m = prepare(src, tmp_path / "out", val_fraction=0.25, shard_tokens=16, progress=False)
    streams, ndocs = expected_streams(DOCS, tok, 0.25)
    assert ndocs == {"train": 5, "val": 3}  # docs 0, 4, 7 -> val (doc 2 is empty and dropped)
    for split in ("train", "val"):
        got = read_split(tmp_path / "out", split)
        assert got.tolist() == streams[split]
        info = m["splits"][split]
        assert info["tokens"] == len(streams[split]) and info["documents"] == ndocs[split]
        assert int((got == 50256).sum()) == ndocs[split]
        # shard boundaries: every shard holds exactly 16 tokens but the last
        sizes = [r["tokens"] for r in info["shards"]]
        assert sizes == [16] * (len(streams[split]) // 16) + ([len(streams[split]) % 16] if len(streams[split]) % 16 else [])
        for k, rec in enumerate(info["shards"]):
            f = tmp_path / "out" / rec["file"]
            assert rec["file"] == f"{split}_{k:06d}.bin"
            assert f.stat().st_size == 2 * rec["tokens"]
            assert hashlib.sha256(f.read_bytes()).hexdigest() == rec["sha256"]
            assert np.fromfile(f, "<u2").tolist() == streams[split][16 * k:16 * k + rec["tokens"]]
    total_doc_tokens = sum(len(tok(d, split_special_tokens=True)["input_ids"]) for d in DOCS)
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == total_doc_tokens + 8
    assert m["settings"]["source"]["files"] == [{"path": "c.jsonl", "bytes": src.stat().st_size}]
    assert m["settings"]["tokenizer"]["name"] == "gpt2" and m["eos_id"] == 50256 and m["dtype"] == "uint16"
    assert not (tmp_path / "out" / ".progress.json").exists()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m


def test_val_rule_is_exact_fraction():
    frac = Fraction("0.005")
    val = [i for i in range(1189) if is_val_document(i, frac)]
    assert len(val) == math.ceil(1189 * 0.005) == 6
    assert val == [0, 200, 400, 600, 800, 1000]


def test_txt_dir_and_parquet_and_nanogpt_inputs(tmp_path, tok):
    import datasets

    txt = tmp_path / "txt"
    (txt / "sub").mkdir(parents=True)
    for name, text in [("b.txt", DOCS[1]), ("a.txt", DOCS[0] + "\n\nsecond paragraph\n"), ("sub/c.txt", DOCS[3])]:
        (txt / name).write_text(text, encoding="utf-8")
    prepare(txt, tmp_path / "o1", val_fraction=0.0, shard_tokens=1000, progress=False)
    order = [DOCS[0] + "\n\nsecond paragraph\n", DOCS[1], DOCS[3]]  # sorted paths: a, b, sub/c
    assert read_split(tmp_path / "o1", "train").tolist() == expected_streams(order, tok, 0.0)[0]["train"]

    pq = tmp_path / "pq"
    pq.mkdir()
    datasets.Dataset.from_dict({"content": DOCS, "n": list(range(len(DOCS)))}).to_parquet(str(pq / "x.parquet"))
    prepare(pq, tmp_path / "o2", val_fraction=0.25, shard_tokens=1000, text_column="content", progress=False)
    streams, _ = expected_streams(DOCS, tok, 0.25)
    assert read_split(tmp_path / "o2", "train").tolist() == streams["train"]
    assert read_split(tmp_path / "o2", "val").tolist() == streams["val"]

    nano = tmp_path / "nano"
    nano.mkdir()
    train = (np.arange(1000) * 37 % 50257).astype("<u2")
    val = (np.arange(100) * 11 % 50257).astype("<u2")
    train.tofile(nano / "train.bin")
    val.tofile(nano / "val.bin")
    m = prepare(nano, tmp_path / "o3", shard_tokens=300, progress=False)
    assert [r["tokens"] for r in m["splits"]["train"]["shards"]] == [300, 300, 300, 100]
    assert read_split(tmp_path / "o3", "train").tolist() == train.tolist()
    assert read_split(tmp_path / "o3", "val").tolist() == val.tolist()
    # the loader reads nanoGPT data directly too, identically
    a = TokenBlockLoader(nano, block_size=8, global_batch=4, seed=3)
    b = TokenBlockLoader(tmp_path / "o3", block_size=8, global_batch=4, seed=3)
    for _ in range(3):
        assert all((u == v).all() for u, v in zip(next(a), next(b)))


def test_parallel_and_streaming_are_byte_identical_and_reruns_are_noops(tmp_path):
    src = tmp_path / "corpus"  # three files: parallel Arrow conversion over files, too
    src.mkdir()
    for k in range(3):
        write_jsonl(src / f"part{k}.jsonl", (DOCS * 20)[60 * k:60 * (k + 1)])
    kw = dict(val_fraction=0.1, shard_tokens=97, progress=False, batch_docs=16)
    prepare(src, tmp_path / "a", **kw)
    prepare(src, tmp_path / "b", num_proc=2, **kw)
    prepare(src, tmp_path / "c", num_proc=2, streaming=True, **kw)
    prepare(src, tmp_path / "d", streaming=True, **kw)
    ref = dir_bytes(tmp_path / "a")
    assert len(ref) > 10
    for other in "bcd":
        assert dir_bytes(tmp_path / other) == ref
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    m = prepare(src, tmp_path / "a", **kw)  # finished: verified, nothing rewritten
    assert m == read_manifest(tmp_path / "a")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == stamps


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("crash_at", [1, 9, "last"])
def test_resume_after_interruption(tmp_path, monkeypatch, streaming, crash_at):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS * 20)
    kw = dict(val_fraction=0.1, shard_tokens=97, progress=False, batch_docs=16, streaming=streaming)
    prepare(src, tmp_path / "clean", **kw)
    clean = read_manifest(tmp_path / "clean")
    n_shards = sum(len(clean["splits"][s]["shards"]) for s in ("train", "val"))
    crash_at = n_shards - 1 if crash_at == "last" else crash_at  # "last": val's final shard, after the stream

    real_cut = prepare_module._SplitWriter._cut
    cuts = []

    def crashing_cut(self, n):
        if len(cuts) == crash_at:
            # die half-way through writing a shard: a temp file is left behind
            (self.out / f".{self.split}_half.bin.tmp.999").write_bytes(b"\0" * 10)
            raise KeyboardInterrupt
        cuts.append(n)
        real_cut(self, n)

    monkeypatch.setattr(prepare_module._SplitWriter, "_cut", crashing_cut)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "r", **kw)
    out = tmp_path / "r"
    assert not (out / "manifest.json").exists()
    journal = json.loads((out / ".progress.json").read_text())
    finished = journal["splits"]["train"] + journal["splits"]["val"]
    assert len(finished) == crash_at
    assert sorted(p.name for p in out.glob("*_*.bin") if not p.name.startswith(".")) == sorted(r["file"] for r in finished)
    with pytest.raises(Exception, match="unfinished preparation"):
        open_split(out)
    start = min(e["cursor"][0] for e in journal["pending"].values())

    monkeypatch.setattr(prepare_module._SplitWriter, "_cut", real_cut)
    tokenized = []
    real_encode = prepare_module.encode_documents
    monkeypatch.setattr(prepare_module, "encode_documents",
                        lambda texts, t: tokenized.append(len(texts)) or real_encode(texts, t))
    prepare(src, out, **kw)
    assert dir_bytes(out) == dir_bytes(tmp_path / "clean")  # no journal, pending or temp files left
    # the resumed run tokenized only from the document in progress on
    assert sum(tokenized) == len(DOCS) * 20 - start
    assert start > 0


def test_kjv_builtin_corpus(tmp_path):
    m = prepare("kjv", tmp_path / "kjv", shard_tokens=300_000, progress=False)
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert (train["tokens"], train["documents"]) == (1_111_708, 1_183)
    assert (val["tokens"], val["documents"]) == (5_959, 6)
    assert [r["tokens"] for r in train["shards"]] == [300_000, 300_000, 300_000, 211_708]
    head = np.fromfile(tmp_path / "kjv" / "train_000000.bin", "<u2")[:20].tolist()
    tok = load_tokenizer()
    # doc 0 (Genesis 1) is validation; the training stream starts with Genesis 2
    assert tok.decode(head).startswith("Genesis 2\n2:1 Thus the heavens and the earth")
    # the CLI reports the same preparation without redoing it
    assert cli(["prepare", "--input", "kjv", "--out", str(tmp_path / "kjv"), "--shard-tokens", "300000",
                "--quiet"]) == 0
    assert cli(["info", str(tmp_path / "kjv"), "--verify"]) == 0


def test_loader_reads_prepared_splits(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS * 4)
    prepare(src, tmp_path / "out", val_fraction=0.25, shard_tokens=50, progress=False)
    val = read_split(tmp_path / "out", "val")
    L = TokenBlockLoader(tmp_path / "out", split="val", block_size=8, global_batch=2, shuffle=False)
    assert L.num_blocks == (len(val) - 1) // 8
    for k in range(L.steps_per_epoch):
        x, y = L.get_batch(k)
        assert x.flatten().tolist() == val[16 * k:16 * k + 16].tolist()
        assert y[:, -1].tolist() == [val[16 * k + 8], val[16 * k + 16]]
    train = TokenBlockLoader(tmp_path / "out", block_size=8, global_batch=2, verify=True)
    assert train.num_blocks == (len(read_split(tmp_path / "out", "train")) - 1) // 8
