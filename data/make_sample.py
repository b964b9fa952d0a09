"""Builds an offline sample dataset in the upstream shard format, with no network.

The text is the English documentation that ships with every Python install: the docstrings of the standard
library's modules, classes and functions (one document per module) and pydoc's language-reference topics. A 1024-piece SentencePiece BPE tokenizer is
trained on it with the challenge tokenizer's settings, and the documents are split into train and val shards.
The output is deterministic. Usage: python data/make_sample.py [--out data/sample] [--vocab-size 1024]
"""
import argparse
import contextlib
import importlib
import inspect
import io
import os
import pkgutil
import random
import sys
import time
import warnings

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import encode_docs, write_split  # noqa: E402

# modules with side effects on import (windows, sounds, printing, network) or that are not documentation
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "test", "lib2to3",
        "ensurepip", "venv", "pydoc_data", "xxlimited", "xxsubtype", "_xxtestfuzz", "msilib", "winreg", "winsound"}
MIN_DOC_CHARS = 200


def module_names() -> list[str]:
    """The standard library's public modules, submodules of its packages included."""
    names = set(sys.builtin_module_names)
    for m in pkgutil.iter_modules():
        if not _in_stdlib(m.module_finder) or m.name in SKIP or m.name.startswith("_"):
            continue
        names.add(m.name)
        if m.ispkg:
            path = [os.path.join(m.module_finder.path, m.name)]
            names.update(sub.name for sub in pkgutil.walk_packages(path, m.name + ".", onerror=lambda _: None))
    return sorted(n for n in names if not any(part.startswith("_") or part in SKIP or "test" in part
                                              for part in n.split(".")))


def _in_stdlib(finder) -> bool:
    path = getattr(finder, "path", "")
    stdlib = os.path.dirname(os.__file__)
    return path.startswith(stdlib) and "site-packages" not in path


def module_text(name) -> str:
    """The module's docstring followed by those of its public classes, functions and methods."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 -- any module that cannot be imported here is simply skipped
            return ""
    parts, seen = [], set()

    def add(obj):
        doc = inspect.getdoc(obj)
        if doc and doc not in seen:
            seen.add(doc)
            parts.append(doc)

    add(module)
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
        obj = getattr(module, attr, None) if not attr.startswith("_") else None
        if obj is None or getattr(obj, "__module__", name) != name:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            add(obj)
            for meth_name, meth in sorted(vars(obj).items()) if inspect.isclass(obj) else ():
                if not meth_name.startswith("_") and callable(meth):
                    add(meth)
    return "\n\n".join(parts)


def collect_documents() -> list[str]:
    """One document per module, plus one per topic of the language reference that pydoc ships."""
    from pydoc_data.topics import topics
    docs = [module_text(name) for name in module_names()] + [topics[k] for k in sorted(topics)]
    return [d for d in docs if len(d) >= MIN_DOC_CHARS]


def train_tokenizer(texts, prefix, vocab_size) -> spm.SentencePieceProcessor:
    """The challenge tokenizer's settings (reference.md section 1): BPE, byte fallback, split digits, nmt_nfkc,
    no dummy prefix; ids pad 0, bos 1, eos 2, unk 3. One thread, so the model is the same on every run."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for t in texts for line in t.splitlines() if line.strip()),
        model_prefix=prefix, model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, character_coverage=0.999,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1, input_sentence_size=0,
        max_sentence_length=8192, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def build_sample(out_dir, texts, vocab_size=1024, val_frac=0.05, seed=0) -> dict:
    """Tokenizer + train/val shards for `texts`; returns docs, tokens and text bytes per split."""
    os.makedirs(out_dir, exist_ok=True)
    sp = train_tokenizer(texts, os.path.join(out_dir, "tokenizer"), vocab_size)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_frac * len(texts)))
    splits = {"val": [texts[i] for i in order[:n_val]], "train": [texts[i] for i in order[n_val:]]}
    stats = {}
    for split, docs in splits.items():
        tokens = encode_docs(sp, docs)
        write_split(out_dir, split, tokens)
        stats[split] = dict(docs=len(docs), tokens=len(tokens), text_bytes=sum(len(d.encode()) for d in docs))
    return stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    t0 = time.time()
    texts = collect_documents()
    stats = build_sample(opts.out, texts, opts.vocab_size, seed=opts.seed)
    for split, s in stats.items():
        print(f"{split}: {s['docs']} docs, {s['tokens']} tokens, {s['text_bytes']} text bytes")
    print(f"wrote {opts.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
