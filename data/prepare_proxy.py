"""Tokenizes the proxy English corpus (../shared/proxy: zstd JSON Lines, one {"text", "source"} per line) with its
challenge tokenizer into upstream-format shards, on all CPU cores. The proxy is for comparing configurations side by
side; its scores are not FineWeb scores.

Usage: python data/prepare_proxy.py [--src ../shared/proxy] [--out bench_data/proxy_sp1024] [--train-files N]
       [--max-train-docs N] [--max-val-docs N] [--workers K]
"""
import argparse
import glob
import io
import itertools
import json
import os
import shutil
import sys
import time
from multiprocessing import Pool

import numpy as np
import sentencepiece as spm
import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import BOS_ID, write_split  # noqa: E402

TOKENIZER = "fineweb_1024_bpe.model"
BATCH_DOCS = 256
_sp = None  # one SentencePieceProcessor per worker process


def read_docs(path, limit=None):
    with open(path, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        for line in itertools.islice(reader, limit):
            yield json.loads(line)["text"]


def _init_worker(model_path):
    global _sp
    _sp = spm.SentencePieceProcessor(model_file=model_path)


def _encode_batch(texts) -> np.ndarray:
    return np.concatenate([np.array([BOS_ID] + ids, dtype=np.uint16) for ids in _sp.encode(texts)])


def batches(docs, size=BATCH_DOCS):
    it = iter(docs)
    while batch := list(itertools.islice(it, size)):
        yield batch


def tokenize(pool, docs) -> tuple[np.ndarray, int]:
    """[BOS] + ids per document, in document order."""
    parts, n_docs = [], 0
    for part in pool.imap(_encode_batch, batches(docs)):
        parts.append(part)
        n_docs += int((part == BOS_ID).sum())
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint16)), n_docs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=os.path.join("..", "shared", "proxy"))
    p.add_argument("--out", default=os.path.join("bench_data", "proxy_sp1024"))
    p.add_argument("--train-files", type=int, default=None, help="use only the first N train .zst files")
    p.add_argument("--max-train-docs", type=int, default=None)
    p.add_argument("--max-val-docs", type=int, default=None)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    opts = p.parse_args()
    model = os.path.join(opts.src, "tokenizers", TOKENIZER)
    train_files = sorted(glob.glob(os.path.join(opts.src, "text", "docs_*.jsonl.zst")))[:opts.train_files]
    val_file = os.path.join(opts.src, "text", "val_docs.jsonl.zst")
    for path in (model, val_file, *train_files[:1]):
        if not os.path.isfile(path):
            sys.exit(f"prepare_proxy: {path} not found; point --src at the proxy corpus folder (../shared/proxy)")
    if not train_files:
        sys.exit(f"prepare_proxy: no docs_*.jsonl.zst under {opts.src}/text; point --src at the proxy corpus")
    t0 = time.time()
    os.makedirs(opts.out, exist_ok=True)
    shutil.copyfile(model, os.path.join(opts.out, TOKENIZER))
    train_docs = itertools.islice(itertools.chain.from_iterable(read_docs(f) for f in train_files), opts.max_train_docs)
    with Pool(opts.workers, initializer=_init_worker, initargs=(model,)) as pool:
        for split, docs in (("val", read_docs(val_file, opts.max_val_docs)), ("train", train_docs)):
            tokens, n_docs = tokenize(pool, docs)
            paths = write_split(opts.out, split, tokens)
            print(f"{split}: {n_docs} docs, {len(tokens)} tokens (BOS included), {len(paths)} shard(s)")
    print(f"wrote {opts.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
