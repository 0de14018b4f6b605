"""Data for large-batch GPT-2 training: offline tokenization, uint16 token shards, resumable blocks.

    from merit_ds.data import prepare, TokenBlockLoader
    prepare("kjv", "data/kjv")                         # or a dir of txt/jsonl/parquet, or nanoGPT .bin
    loader = TokenBlockLoader("data/kjv", block_size=1024, global_batch=480, micro_batch=8,
                              rank=rank, world_size=world, seed=0)
    x, y = next(loader)                                # int64 (micro_batch, block_size)
    ckpt["data"] = loader.state_dict(); ...; loader.load_state_dict(ckpt["data"])

Command line: ``python -m merit_ds.data prepare --input kjv --out data/kjv`` and
``python -m merit_ds.data info data/kjv``. Before training: ``check_token_data(dir, vocab_size)``.
"""
from .corpus import KJV_NAME, kjv_documents, load_documents, resolve_input
from .errors import CorruptDataError, DataError, EmptyCorpusError
from .integrity import check_token_data
from .prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, encode_documents, is_val_document, prepare
from .sampler import BlockOrder, TokenBlockLoader
from .shards import TokenShards, open_split, read_manifest, verify_prepared
from .tokenizer import GPT2_EOS_ID, gpt2_tokenizer_dir, load_tokenizer

__all__ = [
    "BlockOrder", "check_token_data", "CorruptDataError", "DataError", "DEFAULT_SHARD_TOKENS", "DEFAULT_VAL_FRACTION", "EmptyCorpusError",
    "GPT2_EOS_ID", "KJV_NAME", "TokenBlockLoader", "TokenShards", "encode_documents", "gpt2_tokenizer_dir",
    "is_val_document", "kjv_documents", "load_documents", "load_tokenizer", "open_split", "prepare",
    "read_manifest", "resolve_input", "verify_prepared",
]
