"""The on-disk format: uint16 token shards, the manifest, and memory-mapped reading.

A prepared directory::

    out/
      manifest.json          written last: its presence means "complete"
      train_000000.bin       raw little-endian uint16 tokens, no header (nanoGPT's .bin format)
      train_000001.bin       every shard holds exactly shard_tokens tokens but the last
      val_000000.bin
      .progress.json         only while a preparation is unfinished (resume journal)

Documents are concatenated in corpus order, each followed by one EOS token, and
the stream is cut into shards at fixed token counts (a document may span two
shards). Every file is written to a temporary name, fsynced, then renamed
(``os.replace``), so a file with a final name is always complete.

:func:`open_split` also accepts nanoGPT data directly: a directory with
``train.bin`` / ``val.bin`` or a single ``.bin`` file.
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_bytes, sha256_bytes, sha256_file  # noqa: F401  (re-exported)
from .errors import CorruptDataError, DataError

MANIFEST = "manifest.json"
JOURNAL = ".progress.json"
FORMAT = "merit_ds.token_shards"
FORMAT_VERSION = 1
DTYPE = np.dtype("<u2")
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptDataError(f"corrupt {what} {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CorruptDataError(f"corrupt {what} {path}: not a JSON object")
    return obj


def read_manifest(directory: str | os.PathLike) -> dict:
    """Load and structurally check ``manifest.json``; errors name the file."""
    path = Path(directory) / MANIFEST
    m = read_json(path, "manifest")
    try:
        if m["format"] != FORMAT or m["version"] != FORMAT_VERSION:
            raise CorruptDataError(f"{path}: unknown format {m['format']!r} version {m['version']!r}")
        for split in SPLITS:
            info = m["splits"][split]
            total = 0
            for rec in info["shards"]:
                if Path(rec["file"]).name != rec["file"] or rec["file"].startswith("."):
                    raise CorruptDataError(f"{path}: shard file name {rec['file']!r} is not a plain file name")
                if not isinstance(rec["tokens"], int) or rec["tokens"] <= 0 or len(rec["sha256"]) != 64:
                    raise CorruptDataError(f"{path}: bad shard record {rec}")
                total += rec["tokens"]
            if total != info["tokens"]:
                raise CorruptDataError(f"{path}: {split} shard tokens sum to {total}, manifest says {info['tokens']}")
    except (KeyError, TypeError) as exc:
        raise CorruptDataError(f"corrupt manifest {path}: missing or malformed field {exc}") from exc
    return m


def check_shard_file(path: Path, tokens: int, sha256: str | None) -> None:
    """Size check always; content check when ``sha256`` is given. Errors name the shard."""
    if not path.is_file():
        raise CorruptDataError(f"shard missing: {path}")
    size = path.stat().st_size
    if size != tokens * DTYPE.itemsize:
        raise CorruptDataError(f"corrupt shard {path}: {size} bytes, expected {tokens * DTYPE.itemsize}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise CorruptDataError(f"corrupt shard {path}: sha256 does not match the manifest")


def verify_prepared(directory: str | os.PathLike, checksums: bool = True) -> dict:
    """Check a prepared directory against its manifest (sizes, and sha256 when ``checksums``)."""
    d = Path(directory)
    m = read_manifest(d)
    for split in SPLITS:
        for rec in m["splits"][split]["shards"]:
            check_shard_file(d / rec["file"], rec["tokens"], rec["sha256"] if checksums else None)
    return m


class TokenShards:
    """One split as a single virtual uint16 array over memory-mapped shard files.

    ``read(start, length)`` copies ``length`` tokens starting at global position
    ``start``, crossing shard boundaries as needed::

        shard 0: [0 ........ n0)  shard 1: [n0 ........ n0+n1)  ...
                         |<--- read(start, length) --->|
    """

    def __init__(self, files: list[Path], tokens: list[int], fingerprint: str):
        self.files = list(files)
        self.tokens = list(tokens)
        self.fingerprint = fingerprint
        self.starts = [0]
        for n in self.tokens:
            self.starts.append(self.starts[-1] + n)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def _map(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.files[i], dtype=DTYPE, mode="r", shape=(self.tokens[i],))
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside [0, {len(self)})")
        out = np.empty(length, dtype=DTYPE)
        i = bisect.bisect_right(self.starts, start) - 1
        pos, done = start, 0
        while done < length:
            local = pos - self.starts[i]
            take = min(length - done, self.tokens[i] - local)
            out[done:done + take] = self._map(i)[local:local + take]
            done += take
            pos += take
            i += 1
        return out

    def __getstate__(self):  # memmaps are reopened in a child process
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


def _bin_tokens(path: Path) -> int:
    size = path.stat().st_size
    if size % DTYPE.itemsize:
        raise CorruptDataError(f"corrupt token file {path}: {size} bytes is not a whole number of uint16 tokens")
    return size // DTYPE.itemsize


def open_split(path: str | os.PathLike, split: str = "train", verify: bool = False) -> TokenShards:
    """Open one split of prepared data (manifest dir), a nanoGPT dir (``{split}.bin``) or a ``.bin`` file.

    Shard sizes are always checked against the manifest; ``verify=True`` also checks sha256.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    p = Path(path)
    if not p.exists():
        raise DataError(f"token data not found: {p}")
    if p.is_file():
        if p.suffix != ".bin":
            raise DataError(f"not a token file (.bin) or prepared directory: {p}")
        n = _bin_tokens(p)
        return TokenShards([p], [n], f"bin:{p.resolve()}:{n}")
    if (p / MANIFEST).exists():
        m = verify_prepared(p, checksums=verify) if verify else read_manifest(p)
        recs = m["splits"][split]["shards"]
        for rec in recs:
            if not verify:
                check_shard_file(p / rec["file"], rec["tokens"], None)
        fp = sha256_bytes("".join(r["sha256"] for r in recs).encode())
        return TokenShards([p / r["file"] for r in recs], [r["tokens"] for r in recs], fp)
    nano = p / f"{split}.bin"
    if nano.is_file():
        n = _bin_tokens(nano)
        return TokenShards([nano], [n], f"bin:{nano.resolve()}:{n}")
    if (p / JOURNAL).exists():
        raise DataError(f"{p} holds an unfinished preparation (no {MANIFEST}); re-run prepare to finish it")
    raise DataError(f"{p} is neither a prepared directory ({MANIFEST}) nor nanoGPT data ({split}.bin)")
