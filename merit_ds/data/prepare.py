"""Tokenize a corpus and pack it into uint16 token shards, resumably and reproducibly.

Pipeline::

    corpus files --datasets--> documents (text, corpus order)
        --batched tokenize, N processes--> ids + [EOS] per document (empty documents dropped)
        --route by document index--> train / val streams
        --cut every shard_tokens tokens--> train_000000.bin ... val_000000.bin, manifest.json

Validation split: document ``i`` (0-based, corpus order) goes to ``val`` iff
``ceil((i+1) f) > ceil(i f)`` for ``f = val_fraction``: exactly ``ceil(n f)`` of
``n`` documents, evenly spread over the corpus (document 0 always), decided
without knowing ``n`` (so it works when streaming).

Resume: after each shard is renamed into place, ``.progress.json`` records its
size and sha256, and, for every split, its *cursor* ``(document index, token
offset)`` (the next token it expects) and its tokens not yet in a shard (saved
as ``.pending_<split>_<n>.bin``). A re-run with the same settings checks those
files, skips the documents before the earliest cursor without tokenizing them
(at most the document in progress is tokenized again), and continues; the output
is byte-identical to an uninterrupted run. The manifest is written last, so a
directory without one is visibly unfinished.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import multiprocessing as mp
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from .corpus import CorpusSpec, iter_text_batches, load_documents, resolve_input
from .errors import DataError
from .shards import (DTYPE, FORMAT, FORMAT_VERSION, JOURNAL, MANIFEST, SPLITS, atomic_write_bytes,
                     atomic_write_json, check_shard_file, read_json, read_manifest, sha256_bytes,
                     shard_name, verify_prepared)
from .tokenizer import load_tokenizer, tokenizer_fingerprint

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_FRACTION = 0.005
_BIN_CHUNK_TOKENS = 1 << 24


def is_val_document(index: int, val_fraction: Fraction) -> bool:
    """Whether document ``index`` belongs to the validation split (see module docstring)."""
    return math.ceil((index + 1) * val_fraction) > math.ceil(index * val_fraction)


def encode_documents(texts: list[str], tokenizer) -> list[list[int]]:
    """GPT-2 ids of each text followed by EOS; an empty text gives [] (no document).

    ``split_special_tokens``: a literal "<|endoftext|>" inside a text is ordinary
    text, never a document boundary; so the number of EOS ids in the output is
    exactly the number of documents.
    """
    enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                    return_attention_mask=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [ids + [eos] if ids else [] for ids in enc]


def _map_encode(batch, tokenizer):
    return {"ids": encode_documents(batch["text"], tokenizer)}


_WORKER_TOKENIZER = None


def _pool_init(tokenizer):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _pool_encode(texts):
    return [np.asarray(ids, dtype=DTYPE) for ids in encode_documents(texts, _WORKER_TOKENIZER)]


class _SplitWriter:
    """Cuts one split's token stream into shards.

    Tokens arrive as pieces ``(doc, ids, start)``: tokens ``[start, start+len(ids))``
    of document ``doc``, documents in increasing order. ``cursor`` is the first
    (doc, offset) not yet received; on resume, pieces before it are dropped and the
    tokens received but not yet in a shard (``buf``) are reloaded from the journal.
    """

    def __init__(self, out: Path, split: str, shard_tokens: int, eos_id: int, records: list[dict], on_shard):
        self.out, self.split, self.shard_tokens, self.eos_id = out, split, shard_tokens, eos_id
        self.records, self.on_shard = records, on_shard
        self.cursor = (0, 0)
        self.buf: list[np.ndarray] = []
        self.buf_len = 0

    def add(self, doc: int, ids: np.ndarray, start: int = 0) -> None:
        cdoc, coff = self.cursor
        if doc < cdoc:
            return
        if doc == cdoc and start < coff:
            ids, start = ids[coff - start:], coff
        if len(ids) == 0:
            return
        self.buf.append(ids)
        self.buf_len += len(ids)
        self.cursor = (doc, start + len(ids))
        while self.buf_len >= self.shard_tokens:
            self._cut(self.shard_tokens)

    def finish(self) -> None:
        if self.buf_len:
            self._cut(self.buf_len)

    def _cut(self, n: int) -> None:
        data = self.buf[0] if len(self.buf) == 1 else np.concatenate(self.buf)
        shard, rest = data[:n], data[n:]
        self.buf, self.buf_len = ([rest] if len(rest) else []), len(rest)
        name = shard_name(self.split, len(self.records))
        payload = np.ascontiguousarray(shard, dtype=DTYPE).tobytes()
        atomic_write_bytes(self.out / name, payload)
        self.records.append({"file": name, "tokens": int(n), "sha256": sha256_bytes(payload),
                             "documents": int(np.count_nonzero(shard == self.eos_id))})
        self.on_shard(self)

    # --- resume state: the cursor and the tokens not yet in a shard ---------------------------
    def save_pending(self, cursor: tuple[int, int], seq: int) -> dict:
        """Persist the buffer to a new file (atomically) and return its journal entry with ``cursor``.

        A new name per checkpoint: the file the current journal names stays intact
        until the next journal has replaced it.
        """
        self.cursor = cursor
        entry = {"cursor": list(cursor), "tokens": int(self.buf_len), "file": None, "sha256": None}
        if self.buf_len:
            data = np.ascontiguousarray(np.concatenate(self.buf), dtype=DTYPE)
            self.buf = [data]
            payload = data.tobytes()
            entry["file"] = f".pending_{self.split}_{seq:06d}.bin"
            atomic_write_bytes(self.out / entry["file"], payload)
            entry["sha256"] = sha256_bytes(payload)
        return entry

    def load_pending(self, entry: dict) -> None:
        if entry["tokens"]:
            path = self.out / entry["file"]
            check_shard_file(path, entry["tokens"], entry["sha256"])
            self.buf = [np.fromfile(path, dtype=DTYPE)]
            self.buf_len = entry["tokens"]
        self.cursor = tuple(entry["cursor"])


def _settings(spec: CorpusSpec, tok, tokenizer_arg, val_fraction, shard_tokens, text_column, text_unit) -> dict:
    s = {
        "source": spec.describe(),
        "tokenizer": {"name": "gpt2" if tokenizer_arg in (None, "gpt2") else str(Path(tokenizer_arg).resolve()),
                      "sha256": tokenizer_fingerprint(tok), "vocab_size": len(tok), "eos_id": tok.eos_token_id},
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    if spec.kind not in ("bin", "kjv"):
        s["text_column"] = text_column
    if spec.kind == "text":
        s["text_unit"] = text_unit
    return s


def _iter_tokenized(spec, tok, tok_fingerprint, start_doc, *, num_proc, streaming, text_column, text_unit, batch_docs,
                    progress) -> Iterator[tuple[int, np.ndarray]]:
    """(document index, ids + EOS) for documents ``start_doc, start_doc+1, ...`` in corpus order."""
    from tqdm.auto import tqdm

    ds = None if streaming else load_documents(spec, text_column=text_column, text_unit=text_unit, num_proc=num_proc)
    total = None if streaming else len(ds)
    bar = tqdm(total=total, initial=start_doc, unit="doc", desc="pack" if not streaming else "tokenize+pack",
               disable=not progress, dynamic_ncols=True)
    doc, tokens = start_doc, 0
    try:
        if not streaming:
            if start_doc:
                ds = ds.select(range(start_doc, len(ds)))
            fp = hashlib.sha256(f"{ds._fingerprint}|{tok_fingerprint}|encode-v1".encode()).hexdigest()[:32]
            import datasets
            tokd = ds.map(_map_encode, batched=True, batch_size=batch_docs, num_proc=num_proc if num_proc > 1 else None,
                          remove_columns=ds.column_names, fn_kwargs={"tokenizer": tok}, new_fingerprint=fp,
                          features=datasets.Features({"ids": datasets.Sequence(datasets.Value("uint16"))}),
                          desc="tokenize")
            for table in tokd.with_format("arrow").iter(batch_size=batch_docs):
                col = table.column("ids").combine_chunks()
                offsets = col.offsets.to_numpy()
                values = col.values.to_numpy(zero_copy_only=False).astype(DTYPE, copy=False)
                for j in range(len(col)):
                    ids = values[offsets[j]:offsets[j + 1]]
                    tokens += len(ids)
                    yield doc, ids
                    doc += 1
                bar.update(len(col))
                bar.set_postfix(tokens=f"{tokens:,}")
        else:
            batches = iter_text_batches(spec, batch_docs=batch_docs, start_doc=start_doc, text_column=text_column,
                                        text_unit=text_unit)
            if num_proc > 1:
                pool = mp.get_context("fork").Pool(num_proc, initializer=_pool_init, initargs=(tok,))
                results = pool.imap(_pool_encode, batches, chunksize=1)
            else:
                pool = None
                _pool_init(tok)
                results = map(_pool_encode, batches)
            try:
                for encoded in results:
                    for ids in encoded:
                        tokens += len(ids)
                        yield doc, ids
                        doc += 1
                    bar.update(len(encoded))
                    bar.set_postfix(tokens=f"{tokens:,}")
            finally:
                if pool is not None:
                    pool.terminate()
    except DataError:
        raise
    except Exception as exc:
        reason = f"{exc}: {exc.__cause__}" if exc.__cause__ is not None else str(exc)
        raise DataError(f"failed while reading/tokenizing corpus {spec.root}: {reason}") from exc
    finally:
        bar.close()


def _iter_bin(spec: CorpusSpec, vocab_size: int) -> Iterator[tuple[str, int, np.ndarray, int]]:
    """(split, file index, chunk, offset) over nanoGPT .bin files: val*.bin -> val, others -> train."""
    from .shards import _bin_tokens

    for i, f in enumerate(spec.files):
        n = _bin_tokens(f)
        split = "val" if f.stem.startswith("val") else "train"
        mm = np.memmap(f, dtype=DTYPE, mode="r", shape=(n,)) if n else np.zeros(0, DTYPE)
        for a in range(0, n, _BIN_CHUNK_TOKENS):
            chunk = np.array(mm[a:a + _BIN_CHUNK_TOKENS])
            if chunk.size and int(chunk.max()) >= vocab_size:
                raise DataError(f"token file {f} holds id {int(chunk.max())} >= vocabulary size {vocab_size}")
            yield split, i, chunk, a


@contextlib.contextmanager
def _datasets_progress(enabled: bool):
    """datasets draws its own bars (file loading, map); follow our ``progress`` flag, then restore."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was and not enabled:
            datasets.enable_progress_bars()


def prepare(input: str | os.PathLike, out: str | os.PathLike, *, val_fraction: float = DEFAULT_VAL_FRACTION,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, num_proc: int = 1, tokenizer: str | None = None,
            streaming: bool = False, text_column: str = "text", text_unit: str = "document",
            batch_docs: int = 1000, progress: bool = True, repair: bool = False) -> dict:
    """Prepare ``input`` (files, a directory, nanoGPT .bin files, or ``"kjv"``) into ``out``; return the manifest.

    Idempotent: if ``out`` already holds this exact preparation, its shards are
    verified and nothing is written. Resumable: an unfinished ``out`` (journal, no
    manifest) made with the same settings is continued. Anything else already in
    ``out`` is never overwritten: a mismatch raises :class:`DataError`.

    ``repair=True`` on a finished ``out`` whose shards fail their size or sha256 check:
    prepares the same corpus with the same settings again into ``out/.repair`` (resumable
    like any preparation; one more copy's worth of disk), checks that it reproduces the
    manifest's every shard checksum, and replaces only the failing shards.
    """
    with _datasets_progress(progress):
        return _prepare(input, out, val_fraction=val_fraction, shard_tokens=shard_tokens, num_proc=num_proc,
                        tokenizer=tokenizer, streaming=streaming, text_column=text_column, text_unit=text_unit,
                        batch_docs=batch_docs, progress=progress, repair=repair)


def _prepare(input, out, *, val_fraction, shard_tokens, num_proc, tokenizer, streaming, text_column, text_unit,
             batch_docs, progress, repair=False) -> dict:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if int(shard_tokens) != shard_tokens or shard_tokens < 1:
        raise DataError(f"shard_tokens must be a positive integer, got {shard_tokens}")
    if num_proc < 1:
        raise DataError(f"num_proc must be >= 1, got {num_proc}")
    spec = resolve_input(input)
    tok = load_tokenizer(tokenizer)
    settings = _settings(spec, tok, tokenizer, val_fraction, int(shard_tokens), text_column, text_unit)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output path exists and is not a directory: {out}")

    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest.get("settings") != settings:
            raise DataError(f"{out / MANIFEST} describes a different preparation (other input or settings); "
                            f"choose another output directory or delete {out}")
        if repair:
            return _repair(spec, tok, settings, manifest, out, num_proc=num_proc, streaming=streaming,
                           text_column=text_column, text_unit=text_unit, batch_docs=batch_docs,
                           val_fraction=val_fraction, shard_tokens=shard_tokens, progress=progress)
        verify_prepared(out, checksums=True)
        return manifest
    if repair:
        raise DataError(f"nothing to repair: {out} holds no {MANIFEST} (a finished preparation)")

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare_into(spec, tok, settings, out, num_proc=num_proc, streaming=streaming,
                             text_column=text_column, text_unit=text_unit, batch_docs=batch_docs,
                             val_fraction=val_fraction, shard_tokens=shard_tokens, progress=progress)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before its first shard leaves nothing behind


REPAIR_DIR = ".repair"


def _repair(spec, tok, settings, manifest, out: Path, **kw) -> dict:
    """Re-prepare into ``out/.repair``; replace the shards that fail their check with identical ones."""
    import shutil

    recs = [r for s in SPLITS for r in manifest["splits"][s]["shards"]]
    bad = []
    for r in recs:
        try:
            check_shard_file(out / r["file"], r["tokens"], r["sha256"])
        except DataError:
            bad.append(r)
    if not bad:
        shutil.rmtree(out / REPAIR_DIR, ignore_errors=True)
        return manifest
    tmp = out / REPAIR_DIR
    tmp.mkdir(exist_ok=True)
    fresh = _prepare_into(spec, tok, settings, tmp, **kw) if not (tmp / MANIFEST).exists() else read_manifest(tmp)
    if fresh["splits"] != manifest["splits"]:
        raise DataError(f"cannot repair {out}: preparing the corpus again ({tmp}) does not reproduce the shards its "
                        f"{MANIFEST} records (the corpus or a library changed); prepare it into a new directory")
    for r in bad:
        check_shard_file(tmp / r["file"], r["tokens"], r["sha256"])
        os.replace(tmp / r["file"], out / r["file"])
    shutil.rmtree(tmp)
    verify_prepared(out, checksums=True)
    return manifest


def _prepare_into(spec, tok, settings, out: Path, *, num_proc, streaming, text_column, text_unit, batch_docs,
                  val_fraction, shard_tokens, progress) -> dict:
    for stale in out.glob(".*.tmp.*"):
        stale.unlink()
    journal_path = out / JOURNAL
    if journal_path.exists():
        journal = read_json(journal_path, "preparation journal")
        if journal.get("settings") != settings:
            raise DataError(f"{journal_path} belongs to an unfinished preparation with other input or settings; "
                            f"re-run it with those, or choose another output directory")
        try:
            for split in SPLITS:
                for rec in journal["splits"][split]:
                    check_shard_file(out / rec["file"], rec["tokens"], rec["sha256"])
        except (KeyError, TypeError) as exc:
            raise DataError(f"corrupt preparation journal {journal_path}: {exc}") from exc
    else:
        ours = sorted(p.name for s in SPLITS for p in out.glob(f"{s}_*.bin"))
        if ours:
            raise DataError(f"{out} already holds shard files ({ours[0]}, ...) but no {MANIFEST} or {JOURNAL}; "
                            f"refusing to overwrite them")
        journal = {"settings": settings, "splits": {s: [] for s in SPLITS}}

    def checkpoint(cut: _SplitWriter) -> None:
        """After a shard: persist every split's pending tokens and cursor, then the journal.

        The split just cut has received up to its cursor; every other split has
        received all documents up to and including the current one, which was not
        theirs. So a resume restarts at the current document, re-tokenizing nothing
        else.
        """
        doc = cut.cursor[0]
        seq = sum(len(journal["splits"][s]) for s in SPLITS)
        journal["pending"] = {s: w.save_pending(w.cursor if w is cut else max(tuple(w.cursor), (doc + 1, 0)), seq)
                              for s, w in writers.items()}
        atomic_write_json(journal_path, journal)
        remove_unreferenced_pending()

    def remove_unreferenced_pending() -> None:
        keep = {e["file"] for e in journal.get("pending", {}).values()}
        for f in out.glob(".pending_*.bin"):
            if f.name not in keep:
                f.unlink()

    writers = {s: _SplitWriter(out, s, int(shard_tokens), tok.eos_token_id, journal["splits"][s], checkpoint)
               for s in SPLITS}
    try:
        for s, w in writers.items():
            if "pending" in journal:
                w.load_pending(journal["pending"][s])
    except (KeyError, TypeError) as exc:
        raise DataError(f"corrupt preparation journal {journal_path}: {exc}") from exc
    remove_unreferenced_pending()
    if num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # Rust threads do not survive fork

    if spec.kind == "bin":
        for split, i, chunk, offset in _iter_bin(spec, len(tok)):
            writers[split].add(i, chunk, offset)
    else:
        frac = Fraction(str(val_fraction))
        start_doc = min(w.cursor[0] for w in writers.values())
        for doc, ids in _iter_tokenized(spec, tok, settings["tokenizer"]["sha256"], start_doc, num_proc=num_proc,
                                        streaming=streaming, text_column=text_column, text_unit=text_unit,
                                        batch_docs=batch_docs, progress=progress):
            writers["val" if is_val_document(doc, frac) else "train"].add(doc, ids)
    for w in writers.values():
        w.finish()

    splits = {}
    for s in SPLITS:
        recs = journal["splits"][s]
        splits[s] = {"tokens": sum(r["tokens"] for r in recs), "documents": sum(r["documents"] for r in recs),
                     "shards": [{k: r[k] for k in ("file", "tokens", "sha256", "documents")} for r in recs]}
    if splits["train"]["tokens"] == 0:
        # Nothing usable was made: remove this run's own unfinished files so a corrected re-run can start.
        for rec in journal["splits"]["val"]:
            (out / rec["file"]).unlink(missing_ok=True)
        journal_path.unlink(missing_ok=True)
        journal.pop("pending", None)
        remove_unreferenced_pending()
        if not splits["val"]["tokens"]:
            raise DataError(f"corpus {spec.root} contains no text (0 non-empty documents)")
        raise DataError(f"corpus {spec.root} has only {splits['val']['documents']} document(s) and all went to the "
                        f"validation split; use val_fraction 0, or text_unit 'paragraph' or 'line' for .txt files")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": "uint16", "eos_id": tok.eos_token_id,
                "vocab_size": len(tok), "settings": settings, "splits": splits}
    atomic_write_json(out / MANIFEST, manifest)
    journal_path.unlink()
    journal.pop("pending", None)
    remove_unreferenced_pending()
    return manifest
