"""merit_ds/study/data.py: the study's restricted vocabulary, on a corpus small enough to work by hand."""

import json

import numpy as np
import pytest

from merit_ds.data.prepare import prepare
from merit_ds.study.data import restricted_vocab


def _tokens(prepared, split):
    m = json.loads((prepared / "manifest.json").read_text())
    return np.concatenate([np.fromfile(prepared / s["file"], dtype=np.uint16) for s in m["splits"][split]["shards"]])


def test_restricted_vocab_by_hand(tmp_path):
    # train 5 5 5 7 7 9 1, val 5 9 2: counts 5 -> 4, 7 -> 2, 9 -> 2, 1 -> 1, 2 -> 1 (ties kept in id
    # order); k = 3 keeps the k - 1 = 2 most frequent, 5 -> 0 and 7 -> 1, and maps the rest to
    # "other" = 2; kept as themselves: 4 + 2 = 6 of 10 tokens
    nano = tmp_path / "nano"
    nano.mkdir()
    np.array([5, 5, 5, 7, 7, 9, 1], dtype="<u2").tofile(nano / "train.bin")
    np.array([5, 9, 2], dtype="<u2").tofile(nano / "val.bin")
    prepare(nano, tmp_path / "prepared", progress=False)
    info = restricted_vocab(tmp_path / "prepared", tmp_path / "v3", 3)
    assert info == {"vocab_size": 3, "requested": 3, "distinct": 5, "coverage": 0.6,
                    "source": str(tmp_path / "prepared"), "other_id": 2}
    assert _tokens(tmp_path / "v3" / "prepared", "train").tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert _tokens(tmp_path / "v3" / "prepared", "val").tolist() == [0, 2, 2]
    # again: the same answer, nothing redone; another k into the same directory is refused
    assert restricted_vocab(tmp_path / "prepared", tmp_path / "v3", 3) == info
    with pytest.raises(ValueError, match="holds another vocabulary"):
        restricted_vocab(tmp_path / "prepared", tmp_path / "v3", 4)
    # k above the distinct ids: every id kept (dense 0..4 in frequency order), no "other"
    big = restricted_vocab(tmp_path / "prepared", tmp_path / "v8", 8)
    assert (big["vocab_size"], big["coverage"], big["other_id"]) == (5, 1.0, None)
    assert _tokens(tmp_path / "v8" / "prepared", "train").tolist() == [0, 0, 0, 1, 1, 2, 3]
