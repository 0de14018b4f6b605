"""Check token data before training: shard contents against the manifest, token ids against the model.

A shard with flipped bytes whose values are still token ids trains without a word; one whose
ids exceed the model's vocabulary fails much later with an ``IndexError`` inside the embedding.
:func:`check_token_data` rules both out before the first step, in **one read per shard**:

    for each shard (train and val):  read 16 MiB chunks -> sha256.update(chunk)
                                                         -> max id = max(max id, chunk.max())
    sha256 != manifest's             -> CorruptDataError naming the shard
    max id >= model vocabulary       -> DataError naming the shard, the id and the vocabulary

Cost and parallelism: the shards are divided among the data-parallel ranks (shard ``i`` is
read by rank ``i % world``) and each rank reads its share with a few threads (hashlib and
numpy release the GIL on large buffers); the ranks then exchange their verdicts, so every rank
stops with the same error or none does. Each shard is read once per run, at start-up.

Data without a manifest (nanoGPT ``train.bin``/``val.bin`` or a single ``.bin`` file) has no
checksums: only the vocabulary check applies.

Every error ends with the commands that confirm or repair the data (:func:`repair_hint`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import CorruptDataError, DataError
from .shards import DTYPE, MANIFEST, SPLITS, check_shard_file, read_manifest

__all__ = ["ShardScan", "scan_shard", "check_token_data", "repair_hint", "vocab_hint", "prepare_command"]

_CHUNK = 1 << 24  # bytes; even, so a chunk never splits a uint16


@dataclass
class ShardScan:
    """What one read of a shard found."""

    file: str
    tokens: int
    sha256: Optional[str]  # None when there is no checksum to compare with (nanoGPT data)
    max_id: int


def scan_shard(path: Path, tokens: int, expect_sha256: Optional[str]) -> ShardScan:
    """Size check, sha256 (compared with ``expect_sha256`` when given) and largest id, one read."""
    path = Path(path)
    check_shard_file(path, tokens, None)  # missing or wrong size: named, before reading
    h = hashlib.sha256() if expect_sha256 is not None else None
    max_id = -1
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                if h is not None:
                    h.update(chunk)
                max_id = max(max_id, int(np.frombuffer(chunk, dtype=DTYPE).max()))
    except OSError as exc:
        raise DataError(f"cannot read shard {path}: {exc}") from exc
    digest = h.hexdigest() if h is not None else None
    if expect_sha256 is not None and digest != expect_sha256:
        raise CorruptDataError(f"corrupt shard {path}: sha256 does not match the manifest")
    return ShardScan(str(path), tokens, digest, max_id)


def prepare_command(directory: Path, manifest: dict, tokenizer: Optional[str] = None) -> str:
    """The ``prepare`` command line that made ``directory`` (same settings: byte-identical shards),
    or, with ``tokenizer``, the same with another tokenizer."""
    s = manifest["settings"]
    src = s["source"]
    cmd = ["python", "-m", "merit_ds.data", "prepare", "--input", src.get("name") or src.get("input", "?"),
           "--out", str(directory), "--val-fraction", str(s["val_fraction"]), "--shard-tokens", str(s["shard_tokens"])]
    tok = tokenizer if tokenizer is not None else s["tokenizer"]["name"]
    if tok != "gpt2":
        cmd += ["--tokenizer", tok]
    if "text_column" in s and s["text_column"] != "text":
        cmd += ["--text-column", s["text_column"]]
    if "text_unit" in s and s["text_unit"] != "document":
        cmd += ["--text-unit", s["text_unit"]]
    return " ".join(shlex.quote(c) for c in cmd)


def repair_hint(directory: Path, manifest: Optional[dict]) -> str:
    """How to confirm and repair: ``info --verify``, then ``prepare --repair`` with the original settings."""
    directory = Path(directory)
    if manifest is None:
        return (f"this data has no manifest (no checksums): re-create it with `python -m merit_ds.data prepare "
                f"--input <corpus> --out <dir>`, or train a model whose vocabulary covers its ids")
    return (f"confirm with `python -m merit_ds.data info {shlex.quote(str(directory))} --verify`; repair with "
            f"`{prepare_command(directory, manifest)} --repair` (re-tokenizes the corpus and replaces only the "
            f"shards that fail their sha256)")


def vocab_hint(directory: Path, manifest: Optional[dict], max_id: int) -> str:
    """Ids beyond the model's vocabulary in shards whose checksums match: another tokenizer."""
    directory = Path(directory)
    if manifest is None:
        return (f"the token file does not fit this model: re-create it with this model's tokenizer "
                f"(`python -m merit_ds.data prepare --input <corpus> --out <dir> --tokenizer <dir>`), or give the "
                f"model a vocabulary of at least {max_id + 1}")
    return (f"its checksums match, so the data is as prepared, with a tokenizer of vocabulary "
            f"{manifest['vocab_size']} ({manifest['settings']['tokenizer']['name']}): prepare the corpus for this "
            f"model into a new directory (`{prepare_command(Path('NEW_DIR'), manifest, 'MODEL_TOKENIZER_DIR')}`), or give the model a vocabulary of at least {max_id + 1}; "
            f"`python -m merit_ds.data info {shlex.quote(str(directory))} --verify` confirms the data")


def _local_shards(data: Path) -> tuple[Optional[dict], list[tuple[Path, int, Optional[str]]]]:
    """(manifest or None, every shard of both splits as (path, tokens, sha256 or None))."""
    if data.is_file():
        if data.suffix != ".bin":
            raise DataError(f"not a token file (.bin) or prepared directory: {data}")
        size = data.stat().st_size
        return None, [(data, size // DTYPE.itemsize, None)]
    if (data / MANIFEST).exists():
        m = read_manifest(data)
        return m, [(data / r["file"], r["tokens"], r["sha256"]) for s in SPLITS for r in m["splits"][s]["shards"]]
    files = [data / f"{s}.bin" for s in SPLITS if (data / f"{s}.bin").is_file()]
    if not files:
        raise DataError(f"{data} is neither a prepared directory ({MANIFEST}) nor nanoGPT data (train.bin)")
    return None, [(f, f.stat().st_size // DTYPE.itemsize, None) for f in files]


def _exchange(error: Optional[str], max_id: int, rank: int, world: int) -> tuple[Optional[str], int]:
    """Every rank learns the first error (in rank order) and the largest id over all ranks."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return error, max_id
    box: list = [None] * world
    dist.all_gather_object(box, (error, max_id))
    errors = [e for e, _ in box if e]
    return (errors[0] if errors else None), max(m for _, m in box)


def data_fingerprint(data: str | os.PathLike) -> dict:
    """``{file: [bytes, mtime_ns]}`` of the manifest and every shard of ``data``: what a restart
    compares against the last full verification instead of re-hashing the corpus."""
    data = Path(data)
    manifest, shards = _local_shards(data)
    files = [p for p, _, _ in shards] + ([data / MANIFEST] if manifest is not None else [])
    return {str(p.resolve()): [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(files)}


def check_token_data(data: str | os.PathLike, vocab_size: int, *, rank: int = 0, world: int = 1,
                     threads: Optional[int] = None, verified_record: Optional[os.PathLike] = None,
                     full: bool = True, write_record: bool = True) -> dict:
    """Verify every shard of ``data`` (checksums when there is a manifest) and its ids < ``vocab_size``.

    Call on every rank (collective when a process group is running): raises the same
    :class:`DataError` on every rank, naming the file and the repair command, or returns
    ``{"shards": n, "checked_here": k, "max_id": m, "checksums": bool, "skipped": bool}``.

    ``verified_record`` (a JSON file, e.g. in the run directory) remembers the last full
    verification: with ``full=False`` a rank whose shards all still have the recorded sizes and
    modification times, for the same ``vocab_size``, skips re-reading them (``skipped``); after a
    verification that read anything, rank 0 rewrites the record (``write_record=False``: the
    caller does, later, with :func:`write_verified_record` and the returned ``max_id``).
    ``full=True`` reads everything.
    """
    data = Path(data)
    error, manifest, shards, mine, max_id = None, None, [], [], -1
    skipped = False
    try:
        if not data.exists():
            raise DataError(f"token data not found: {data}")
        manifest, shards = _local_shards(data)
        mine = shards[rank::world]
        record = _read_record(verified_record) if verified_record is not None and not full else None
        if record is not None and record.get("vocab_size") == vocab_size and \
                record.get("files") == data_fingerprint(data):
            skipped, max_id = True, int(record["max_id"])
        else:
            workers = threads or max(1, min(4, os.cpu_count() or 1, len(mine)))
            with ThreadPoolExecutor(workers) as pool:
                scans = list(pool.map(lambda s: _scan_named(s, vocab_size), mine))
            max_id = max([sc.max_id for sc in scans], default=-1)
    except _VocabError as exc:
        error = f"{exc}; " + vocab_hint(data, manifest, exc.max_id)
    except CorruptDataError as exc:
        error = "corrupt: " + f"{exc}; " + repair_hint(data, manifest)
    except DataError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one rank alone raising would leave the others waiting
        error = f"checking the token data {data} failed: {type(exc).__name__}: {exc}"
    error, max_id = _exchange(error, max_id, rank, world)
    if error:
        raise CorruptDataError(error[len("corrupt: "):]) if error.startswith("corrupt: ") else DataError(error)
    if verified_record is not None and rank == 0 and not skipped and write_record:
        write_verified_record(verified_record, data, vocab_size, max_id)
    return {"shards": len(shards), "checked_here": len(mine), "max_id": max_id, "checksums": manifest is not None,
            "skipped": skipped}


def write_verified_record(path: os.PathLike, data: str | os.PathLike, vocab_size: int, max_id: int) -> None:
    """Record that ``data`` passed a full check for ``vocab_size`` (its largest id ``max_id``)."""
    from merit_ds.fileio import atomic_write_text

    data = Path(data)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(
        {"data": str(data.resolve()), "vocab_size": vocab_size, "max_id": max_id, "files": data_fingerprint(data)},
        indent=1, sort_keys=True))


def _read_record(path: os.PathLike) -> Optional[dict]:
    try:
        rec = json.loads(Path(path).read_text())
        return rec if isinstance(rec, dict) and isinstance(rec.get("max_id"), int) else None
    except (OSError, ValueError):
        return None


class _VocabError(DataError):
    def __init__(self, msg: str, max_id: int):
        super().__init__(msg)
        self.max_id = max_id


def _scan_named(shard: tuple[Path, int, Optional[str]], vocab_size: int) -> ShardScan:
    path, tokens, sha = shard
    sc = scan_shard(path, tokens, sha)
    if sc.max_id >= vocab_size:
        raise _VocabError(f"shard {path} holds token id {sc.max_id}, outside the model's vocabulary "
                          f"(vocab_size {vocab_size})", sc.max_id)
    return sc
