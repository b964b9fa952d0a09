"""Tokenizes the proxy English corpus (../shared/proxy: zstd JSON Lines, one {"text", "source"} per line) into
upstream-format shards, on all CPU cores. --vocab 1024 uses the proxy's copy of the challenge tokenizer; any other
size (4096, 8192) trains a SentencePiece BPE with the upstream spec (byte fallback, split digits, nmt_nfkc, no dummy
prefix, coverage 0.999) on the first --tokenizer-docs training documents, once: a tokenizer already in --out is
reused. The proxy is for comparing configurations side by side; its scores are not FineWeb scores.

Usage: python data/prepare_proxy.py [--vocab 1024] [--src ../shared/proxy] [--out bench_data/proxy_sp<vocab>]
       [--train-files N] [--max-train-docs N] [--max-val-docs N] [--tokenizer-docs N] [--tokenizer-only] [--workers K]
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
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.make_sample import train_tokenizer  # noqa: E402
from data.shards import encode_docs, write_split  # noqa: E402

TOKENIZER = "fineweb_1024_bpe.model"  # the proxy's challenge tokenizer
TOKENIZER_DOCS = 20_000  # ~60 MB of text, the first train file: ample for 8192 pieces
BATCH_DOCS = 256
# The proxy's val split (SOURCES.md): 1,740 docs and 2,063,443 tokens from sp.encode, so 2,065,183 with the BOS.
PROXY_VAL_DOCS, PROXY_VAL_TOKENS = 1740, 2_063_443 + 1740
_sp = None  # one SentencePieceProcessor per worker process


def read_docs(path, limit=None):
    """The "text" of each JSON line of a .jsonl.zst file, streamed; at most `limit` of them."""
    with open(path, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        yield from itertools.islice((json.loads(line)["text"] for line in reader if line.strip()), limit)


def _init_worker(model_path):
    global _sp
    _sp = spm.SentencePieceProcessor(model_file=model_path)


def _encode_batch(texts) -> tuple[int, np.ndarray]:
    return len(texts), encode_docs(_sp, texts)


def batches(docs, size=BATCH_DOCS):
    it = iter(docs)
    while batch := list(itertools.islice(it, size)):
        yield batch


def tokenize(pool, docs, desc="", total=None) -> tuple[np.ndarray, int]:
    """[BOS] + ids per document, concatenated in document order (imap keeps the order); also the document count.
    A progress bar (documents) on stderr when it is a terminal."""
    parts, n_docs = [], 0
    with tqdm(desc=desc, total=total, unit=" docs", disable=not sys.stderr.isatty()) as bar:
        for n, tokens in pool.imap(_encode_batch, batches(docs)):
            parts.append(tokens)
            n_docs += n
            bar.update(n)
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint16)), n_docs


def check_val(n_docs, n_tokens) -> None:
    """Compares a complete val split with the proxy's published counts; a mismatch means another tokenizer or
    corpus version, whose scores are not comparable with runs on the real proxy."""
    if n_docs != PROXY_VAL_DOCS:
        print(f"val check skipped: {n_docs} docs, not the proxy's {PROXY_VAL_DOCS}")
    elif n_tokens == PROXY_VAL_TOKENS:
        print(f"val check ok: {n_tokens:,} tokens = {PROXY_VAL_TOKENS - PROXY_VAL_DOCS:,} + {PROXY_VAL_DOCS:,} BOS")
    else:
        sys.exit(f"prepare_proxy: val has {n_tokens:,} tokens, expected {PROXY_VAL_TOKENS:,}; "
                 "the tokenizer or the corpus is not the proxy's")


def tokenizer_name(vocab) -> str:
    return f"fineweb_{vocab}_bpe.model"


def source_files(src, n_train_files, vocab=1024) -> tuple[str, list[str], str]:
    """The tokenizer (None unless vocab is 1024), train and val files under `src`; exits with a one-line message
    if any is missing."""
    fix = "point --src at the proxy corpus folder (../shared/proxy, holding tokenizers/ and text/)"
    model = os.path.join(src, "tokenizers", TOKENIZER) if vocab == 1024 else None
    train = sorted(glob.glob(os.path.join(src, "text", "docs_*.jsonl.zst")))[:n_train_files]
    val = os.path.join(src, "text", "val_docs.jsonl.zst")
    for path in filter(None, (src, model, val)):
        if not os.path.exists(path):
            sys.exit(f"prepare_proxy: {path} not found; {fix}")
    if not train:
        sys.exit(f"prepare_proxy: no docs_*.jsonl.zst in {os.path.join(src, 'text')}; {fix}")
    return model, train, val


def make_tokenizer(opts, model, train_files) -> str:
    """The tokenizer in opts.out: the challenge one copied, or one trained here (reused if already there)."""
    path = os.path.join(opts.out, tokenizer_name(opts.vocab))
    if model:
        shutil.copyfile(model, path)
    elif os.path.isfile(path):
        print(f"tokenizer: reusing {path}")
    else:
        t0 = time.time()
        docs = itertools.islice(itertools.chain.from_iterable(read_docs(f) for f in train_files), opts.tokenizer_docs)
        train_tokenizer(docs, path.removesuffix(".model"), opts.vocab, num_threads=opts.workers)
        print(f"tokenizer: trained {path} ({opts.vocab} pieces, first {opts.tokenizer_docs} train docs) "
              f"in {time.time() - t0:.1f}s")
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=1024, help="1024: the challenge tokenizer; else train a BPE here")
    p.add_argument("--src", default=os.path.join("..", "shared", "proxy"))
    p.add_argument("--out", default=None, help="default bench_data/proxy_sp<vocab>")
    p.add_argument("--tokenizer-docs", type=int, default=TOKENIZER_DOCS, help="train docs the BPE is trained on")
    p.add_argument("--tokenizer-only", action="store_true", help="make the tokenizer in --out, write no shards")
    p.add_argument("--train-files", type=int, default=None, help="use only the first N train .zst files")
    p.add_argument("--max-train-docs", type=int, default=None)
    p.add_argument("--max-val-docs", type=int, default=None)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    opts = p.parse_args()
    if opts.train_files is not None and opts.train_files < 1:
        p.error("--train-files must be at least 1")
    if opts.vocab < 260 or opts.vocab > 65536:
        p.error("--vocab must be in [260, 65536]: 256 byte pieces + 4 specials, ids must fit uint16")
    opts.out = opts.out or os.path.join("bench_data", f"proxy_sp{opts.vocab}")
    model, train_files, val_file = source_files(opts.src, opts.train_files, opts.vocab)
    t0 = time.time()
    os.makedirs(opts.out, exist_ok=True)
    model = make_tokenizer(opts, model, sorted(glob.glob(os.path.join(opts.src, "text", "docs_*.jsonl.zst"))))
    if opts.tokenizer_only:
        return
    train_docs = itertools.chain.from_iterable(read_docs(f) for f in train_files)
    val_total = min(PROXY_VAL_DOCS, opts.max_val_docs or PROXY_VAL_DOCS)  # the bar's total; train's is unknown
    splits = (("val", read_docs(val_file, opts.max_val_docs), val_total),
              ("train", itertools.islice(train_docs, opts.max_train_docs), opts.max_train_docs))
    with Pool(opts.workers, initializer=_init_worker, initargs=(model,)) as pool:
        for split, docs, total in splits:
            tokens, n_docs = tokenize(pool, docs, f"tokenizing {split}", total)
            paths = write_split(opts.out, split, tokens)
            print(f"{split}: {n_docs} docs, {len(tokens)} tokens (BOS included), {len(paths)} shard(s), "
                  f"{time.time() - t0:.1f}s")
            if split == "val" and opts.max_val_docs is None and opts.vocab == 1024:
                check_val(n_docs, len(tokens))
    print(f"wrote {opts.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
