"""`python -m runners.bench.tokenize SOURCE TOKENIZER`: how fast a corpus becomes token ids, the first thing a sweep
waits on (runners.data.store builds its cache before any trial; on the GPU machine the four Gutenberg shards
held it about 2 minutes). Times the tokenizer's encode_batch (ids, offsets and the rest) against encode_batch_fast
(ids only, what runners.data.tokenize uses) on the first --bytes of SOURCE, checks they give the same
ids, and appends tokens_per_s and speedup to results/benchmarks.jsonl (benchmark "tokenize").
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import tokenizers

from runners.bench.log import append
from runners.data.corpus import read_documents
from runners.data.store import CHUNK_CHARS, document_chunks
from sweeps.trial import DataConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("source", help="a data.source: a path or glob of .txt/.gz/.xz/.jsonl/.parquet files")
    ap.add_argument("tokenizer", type=Path, help="a tokenizer.json")
    ap.add_argument("--separator", default="<|endoftext|>")
    ap.add_argument("--bytes", type=int, default=40_000_000, help="of UTF-8 text, from the start (data.max_bytes)")
    args = ap.parse_args()
    docs = list(read_documents(DataConfig(source=args.source, separator=args.separator, tokenizer=str(args.tokenizer),
                                          max_bytes=args.bytes)))
    tokenizer = tokenizers.Tokenizer.from_file(str(args.tokenizer))
    seconds, ids = {}, {}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tokenizer, name)
        started = time.perf_counter()
        ids[name] = [e.ids for chunk in document_chunks(docs, CHUNK_CHARS) for e in encode(chunk, add_special_tokens=False)]
        seconds[name] = time.perf_counter() - started
    if ids["encode_batch"] != ids["encode_batch_fast"]:
        raise SystemExit("error: encode_batch_fast gave other ids than encode_batch")
    tokens = sum(map(len, ids["encode_batch"]))
    config = {"source": args.source, "tokenizer": str(args.tokenizer), "characters": sum(map(len, docs)),
              "documents": len(docs), "tokens": tokens, "chunk_chars": CHUNK_CHARS, "threads": os.cpu_count(),
              "tokenizers": tokenizers.__version__, "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    for name, s in seconds.items():
        print(append("tokenize", "tokens_per_s", tokens / s, "tokens/s", config | {"method": name}))
    print(append("tokenize", "speedup", seconds["encode_batch"] / seconds["encode_batch_fast"], "x", config))


if __name__ == "__main__":
    main()
