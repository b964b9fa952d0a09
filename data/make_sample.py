"""Builds an offline sample dataset in the upstream shard format, with no network.

The text is the English documentation that ships with every Python install: the docstrings of the standard
library (one document per module: its docstring, then those of its classes and functions), the docstrings of its
compiled modules, and pydoc's language-reference topics. A SentencePiece BPE tokenizer is trained on it with the
challenge tokenizer's settings, and the documents are split into train and val shards. The output depends only
on the Python version (whose standard library is the text) and the arguments: two runs give identical files.

Usage: python data/make_sample.py [--out data/sample] [--vocab-size 1024] [--seed 0]
"""
import argparse
import ast
import contextlib
import importlib
import inspect
import io
import math
import os
import random
import sys
import time
import warnings
from multiprocessing import Pool

import numpy as np
import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import with_bos, write_split  # noqa: E402

STDLIB = os.path.dirname(os.__file__)
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# compiled modules that touch the terminal or are test fixtures rather than documentation
SKIP_COMPILED = {"readline", "_curses", "_curses_panel", "_tkinter", "xxlimited", "xxlimited_35", "xxsubtype"}
MIN_DOC_CHARS = 200
MIN_VAL_TOKENS = 50_000

# The challenge tokenizer's settings (ids pad 0, bos 1, eos 2, unk 3). For determinism, shuffle_input_sentence=False
# makes input_sentence_size keep the first lines rather than a random sample when there are more (the stdlib gives
# about 60k); the pieces trained were checked to be identical across runs and with 1 or 2 threads.
SPM_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False, character_coverage=0.999, pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=2,
    input_sentence_size=2_000_000, shuffle_input_sentence=False, max_sentence_length=8192, minloglevel=2)


# ---- text ---------------------------------------------------------------------------------------------------------

def stdlib_sources() -> list[str]:
    """Every .py file of the standard library (its test suite and GUI packages included), in a fixed order."""
    paths = []
    for folder, subdirs, files in os.walk(STDLIB):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
        paths += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return paths


def source_docstrings(path) -> list[str]:
    """Docstrings of the module at `path` and of every class and function in it, in source order. The source is
    parsed, never imported, so no module runs; files that do not parse (deliberately broken test data) give []."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError, OSError):
        return []
    return list(_docstrings(tree))


def _docstrings(node):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)  # cleaned like inspect.cleandoc
        if doc:
            yield doc
    # descend through statements only (definitions also sit inside if/try/with blocks), never into expressions
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler)):
                yield from _docstrings(child)


def compiled_modules() -> list[str]:
    """Built-in and extension (C) modules, whose docstrings have no Python source to parse."""
    dynload = os.path.join(STDLIB, "lib-dynload")
    names = set(sys.builtin_module_names)
    if os.path.isdir(dynload):
        names.update(f.split(".")[0] for f in os.listdir(dynload) if f.endswith((".so", ".pyd")))
    return sorted(n for n in names if n not in SKIP_COMPILED and "test" not in n)


def compiled_docstrings(name) -> list[str]:
    """Docstrings of a compiled module, its classes, functions and methods (dunder methods left out)."""
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- a module that cannot be imported on this platform is skipped
            return []
    objects = [module]
    for attr, obj in sorted(vars(module).items()):
        if not attr.startswith("__") and (inspect.isclass(obj) or inspect.isroutine(obj)):
            objects.append(obj)
            if inspect.isclass(obj):
                objects += [m for k, m in sorted(vars(obj).items()) if not k.startswith("__") and inspect.isroutine(m)]
    return [doc for doc in map(inspect.getdoc, objects) if doc]


def collect_documents(workers=None) -> list[str]:
    """One document per module (its docstrings joined by blank lines) plus one per language-reference topic.
    A docstring seen before (inherited, re-exported, boilerplate) is dropped, and so are documents under
    MIN_DOC_CHARS characters."""
    with Pool(workers or os.cpu_count()) as pool:  # parsing the whole standard library is the slow part
        groups = list(pool.imap(source_docstrings, stdlib_sources(), chunksize=16))
    groups += [compiled_docstrings(name) for name in compiled_modules()]
    from pydoc_data.topics import topics
    groups += [[topics[key]] for key in sorted(topics)]
    seen, docs = set(), []
    for group in groups:
        fresh = [d for d in group if d not in seen and _is_utf8(d)]
        seen.update(fresh)
        doc = "\n\n".join(fresh)
        if len(doc) >= MIN_DOC_CHARS:
            docs.append(doc)
    return docs


def _is_utf8(text) -> bool:
    try:  # docstrings written with escapes can hold lone surrogates, which no tokenizer or byte count accepts
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ---- tokenizer and shards -----------------------------------------------------------------------------------------

def train_tokenizer(texts, prefix, vocab_size, **overrides) -> spm.SentencePieceProcessor:
    """Trains on the non-blank lines of `texts`, writing prefix.model and prefix.vocab. The model is built in
    memory so that its bytes do not record the output path (spm stores model_prefix in the model). `overrides`
    replace SPM_SETTINGS entries (num_threads on a bigger machine)."""
    model = io.BytesIO()
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
                                   **dict(SPM_SETTINGS, **overrides))
    with open(prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(prefix + ".vocab", "w", encoding="utf-8") as f:  # the same layout as spm's own .vocab
        f.writelines(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    return sp


def split_docs(sp, texts, seed=0, val_frac=0.05, min_val_tokens=MIN_VAL_TOKENS):
    """Shuffles with `seed`, then val is the shortest head of that order holding val_frac of the documents and
    min_val_tokens tokens, but never more than half of them. Returns {"val": (indices, ids), "train": ...}: the
    documents' indices into `texts` and their token id lists (without BOS), in the shuffled order."""
    if len(texts) < 2:
        raise ValueError(f"need at least 2 documents for a train/val split, got {len(texts)}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    ids = sp.encode([texts[i] for i in order])
    ends = np.cumsum([len(doc) + 1 for doc in ids])  # tokens up to and including each document, BOS counted
    n_val = max(math.ceil(val_frac * len(ids)), int(np.searchsorted(ends, min_val_tokens)) + 1)
    n_val = min(n_val, len(ids) // 2)
    return {"val": (order[:n_val], ids[:n_val]), "train": (order[n_val:], ids[n_val:])}


def build_sample(out_dir, texts, vocab_size=1024, seed=0, val_frac=0.05, min_val_tokens=MIN_VAL_TOKENS) -> dict:
    """Tokenizer (OUT/tokenizer.model) and train/val shards for `texts`; returns docs, tokens (BOS included) and
    UTF-8 text bytes per split. The tokenizer sees all documents, val included, as upstream's saw FineWeb."""
    os.makedirs(out_dir, exist_ok=True)
    sp = train_tokenizer(texts, os.path.join(out_dir, "tokenizer"), vocab_size)
    stats = {}
    for split, (indices, ids) in split_docs(sp, texts, seed, val_frac, min_val_tokens).items():
        tokens = with_bos(ids)
        write_split(out_dir, split, tokens)
        stats[split] = dict(docs=len(ids), tokens=len(tokens), text_bytes=sum(len(texts[i].encode()) for i in indices))
    return stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    t0 = time.time()
    texts = collect_documents()
    print(f"collected {len(texts)} documents, {sum(len(t.encode()) for t in texts)} bytes, in {time.time() - t0:.1f}s")
    stats = build_sample(opts.out, texts, opts.vocab_size, seed=opts.seed)
    for split, s in stats.items():
        print(f"{split}: {s['docs']} docs, {s['tokens']} tokens, {s['text_bytes']} text bytes "
              f"({s['text_bytes'] / s['tokens']:.2f} bytes/token)")
    print(f"wrote {opts.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
