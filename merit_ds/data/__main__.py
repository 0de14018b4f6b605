"""Command line: ``python -m merit_ds.data prepare ...`` and ``python -m merit_ds.data info DIR``."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import DataError
from .prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION


def _cmd_prepare(args) -> int:
    from .prepare import prepare

    t0 = time.perf_counter()
    m = prepare(args.input, args.out, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                num_proc=args.num_proc, tokenizer=args.tokenizer, streaming=args.streaming,
                text_column=args.text_column, text_unit=args.text_unit, progress=not args.quiet,
                repair=args.repair)
    dt = time.perf_counter() - t0
    _print_summary(args.out, m)
    print(f"done in {dt:.1f} s")
    return 0


def _print_summary(out, m) -> None:
    s = m["settings"]
    print(f"{out}: {s['source'].get('name') or s['source'].get('input')}, tokenizer {s['tokenizer']['name']} "
          f"(vocab {m['vocab_size']}, eos {m['eos_id']}), shard_tokens {s['shard_tokens']:,}, "
          f"val_fraction {s['val_fraction']}")
    for split, info in m["splits"].items():
        print(f"  {split:5s} {info['tokens']:>15,} tokens {info['documents']:>12,} documents "
              f"{len(info['shards']):>6} shards")


def _cmd_info(args) -> int:
    from .integrity import check_token_data
    from .shards import read_manifest

    m = read_manifest(args.dir)
    scan = check_token_data(args.dir, m["vocab_size"]) if args.verify else None
    if args.json:
        print(json.dumps(m, indent=1, sort_keys=True))
    else:
        _print_summary(args.dir, m)
        if scan is not None:
            print(f"  all {scan['shards']} shards match their sha256; largest token id {scan['max_id']} "
                  f"< vocabulary {m['vocab_size']}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m merit_ds.data", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize a corpus into uint16 token shards (resumable)")
    p.add_argument("--input", required=True, help="file or directory of .txt/.jsonl/.parquet, nanoGPT .bin "
                   "files, or 'kjv' (built-in King James Bible)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="fraction of documents for the validation split (default %(default)s)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard file (default %(default)s)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer processes (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: GPT-2, offline)")
    p.add_argument("--streaming", action="store_true", help="stream the corpus (larger than memory/disk cache)")
    p.add_argument("--text-column", default="text", help="jsonl/parquet column holding the text")
    p.add_argument("--text-unit", default="document", choices=("document", "paragraph", "line"),
                   help=".txt files: what one document is (default: a whole file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--repair", action="store_true", help="a finished OUT whose shards fail their sha256: prepare "
                   "again (same settings) and replace only the failing shards")
    p.set_defaults(fn=_cmd_prepare)
    i = sub.add_parser("info", help="describe (and optionally verify) a prepared directory")
    i.add_argument("dir")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256 and that its ids are < the vocabulary")
    i.add_argument("--json", action="store_true", help="print the manifest")
    i.set_defaults(fn=_cmd_info)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
