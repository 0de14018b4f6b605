"""The study's data: a prepared directory, optionally with a vocabulary restricted to the corpus.

A GPT-2 head over 50,257 ids dominates the cost of a CPU-scale cell (at width 64 the output
layer is ~95% of the flops). :func:`restricted_vocab` re-maps a prepared directory's ids to a
dense vocabulary of the ``k - 1`` most frequent ids of the corpus (train + val) plus one
"other" id for the rest, writes nanoGPT-style ``train.bin``/``val.bin`` files and prepares them
with :func:`merit_ds.data.prepare.prepare` (shards, manifest, checksums: the loaders verify
them as for any corpus). The model then gets ``vocab_size=k`` as a preset override.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["prepare_kjv", "restricted_vocab", "KJV_VAL_FRACTION"]

#: The built-in corpus's val split (share of its 1,189 chapters) unless a preset asks for another:
#: 2% is ~21,700 tokens. The default study's 15% (~165,600 tokens) holds enough validation tokens
#: for a standard error <= 0.01 nats per cell (docs/study.md).
KJV_VAL_FRACTION = 0.02


def prepare_kjv(out: Path, val_fraction: float = KJV_VAL_FRACTION) -> Path:
    """The built-in KJV corpus, GPT-2 tokenized (idempotent)."""
    from merit_ds.data.prepare import prepare

    prepare("kjv", out, val_fraction=val_fraction, progress=False)
    return Path(out)


def _split_tokens(prepared: Path, split: str) -> np.ndarray:
    m = json.loads((prepared / "manifest.json").read_text())
    return np.concatenate([np.fromfile(prepared / s["file"], dtype=np.uint16) for s in m["splits"][split]["shards"]])


def restricted_vocab(prepared: Path, out: Path, k: int) -> dict:
    """``out``: ``prepared`` re-mapped to ``k`` ids (``k - 1`` most frequent + "other"); returns
    ``{"vocab_size": k, "coverage": share of tokens kept as themselves, "distinct": ids used}``."""
    from merit_ds.data.prepare import prepare

    prepared, out = Path(prepared), Path(out)
    info_path = out / "vocab.json"
    if info_path.exists() and (out / "prepared" / "manifest.json").exists():
        info = json.loads(info_path.read_text())
        if info["requested"] == k and info["source"] == str(prepared):
            return info
        raise ValueError(f"{out} holds another vocabulary ({info['vocab_size']} from {info['source']})")
    train, val = _split_tokens(prepared, "train"), _split_tokens(prepared, "val")
    ids, counts = np.unique(np.concatenate([train, val]), return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    keep = order[:k - 1] if len(order) > k else order
    other = len(keep) if len(order) > k else None
    table = np.full(65536, other if other is not None else 0, dtype=np.uint16)
    table[keep] = np.arange(len(keep), dtype=np.uint16)
    raw = out / "bin"
    raw.mkdir(parents=True, exist_ok=True)
    table[train].tofile(raw / "train.bin")
    table[val].tofile(raw / "val.bin")
    prepare(raw, out / "prepared", progress=False)
    total = len(train) + len(val)
    kept = int(np.isin(np.concatenate([train, val]), keep).sum())
    vocab = len(keep) + (1 if other is not None else 0)
    info = {"vocab_size": vocab, "requested": k, "distinct": int(len(ids)), "coverage": kept / total,
            "source": str(prepared), "other_id": other}
    info_path.write_text(json.dumps(info, indent=1))
    return info
