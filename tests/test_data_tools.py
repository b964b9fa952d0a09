"""The shard writer (data/shards.py), the offline sample builder (data/make_sample.py) and the proxy tokenizer
script (data/prepare_proxy.py)."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
import sentencepiece as spm
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402
from data.make_sample import STDLIB, build_sample, compiled_docstrings, source_docstrings  # noqa: E402
from data.shards import encode_docs, write_shard, write_split  # noqa: E402

PROXY_TOKENIZER = ROOT.parent / "shared" / "proxy" / "tokenizers" / "fineweb_1024_bpe.model"


def read_raw_shard(path):
    raw = Path(path).read_bytes()
    return np.frombuffer(raw[:1024], "<i4"), np.frombuffer(raw[1024:], "<u2"), len(raw)


def docs_of(tokens):
    """Splits a shard's tokens at each BOS into the documents' token tuples (BOS dropped)."""
    starts = np.flatnonzero(tokens == 1).tolist()
    assert starts[:1] == [0], "a shard starts with a BOS"
    return [tuple(tokens[a + 1:b].tolist()) for a, b in zip(starts, starts[1:] + [len(tokens)])]


# ---- shards.py ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [[1, 5, 1023, 0, 65535], np.array([7, 1, 2], dtype=np.int64), []])
def test_write_shard_writes_the_upstream_format(tmp_path, tokens):
    write_shard(tmp_path / "s.bin", tokens)
    header, payload, size = read_raw_shard(tmp_path / "s.bin")
    assert size == 1024 + 2 * len(tokens)
    assert header[:3].tolist() == [20240520, 1, len(tokens)] and not header[3:].any()
    assert payload.tolist() == list(tokens)
    assert train_gpt.load_shard(str(tmp_path / "s.bin"), 65536).tolist() == list(tokens)  # the trainer's reader


@pytest.mark.parametrize("bad", [[1, -1], [65536], np.array([0.5, 2.0])])
def test_write_shard_rejects_what_uint16_cannot_hold(tmp_path, bad):
    with pytest.raises(ValueError):
        write_shard(tmp_path / "bad.bin", bad)


def test_encode_docs_puts_a_bos_before_each_document_and_encodes_once():
    class FakeProcessor:
        calls = []

        def encode(self, texts):
            self.calls.append(texts)
            return [[100 + len(t)] * len(t) for t in texts]

    sp = FakeProcessor()
    tokens = encode_docs(sp, iter(["ab", "", "xyz"]))
    assert tokens.dtype == np.uint16 and tokens.tolist() == [1, 102, 102, 1, 1, 103, 103, 103]
    assert sp.calls == [["ab", "", "xyz"]]
    assert encode_docs(sp, []).tolist() == []


def test_write_split_cuts_at_shard_size_and_removes_stale_shards(tmp_path):
    paths = write_split(str(tmp_path), "train", np.arange(10), shard_size=4)
    assert [Path(p).name for p in paths] == [f"fineweb_train_00000{i}.bin" for i in range(3)]
    assert [read_raw_shard(p)[1].tolist() for p in paths] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    write_split(str(tmp_path), "val", [5], shard_size=4)
    write_split(str(tmp_path), "train", np.arange(3), shard_size=4)  # a smaller rerun leaves no old shard behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


# ---- make_sample.py -----------------------------------------------------------------------------------------------

def test_source_docstrings_reads_definitions_in_source_order_without_importing(tmp_path):
    (tmp_path / "m.py").write_text('"""Module."""\nraise SystemExit("imported")\n'
                                   'class A:\n    """Class A."""\n    def f(self):\n        """Method f."""\n'
                                   'if True:\n    async def g():\n        """Async g."""\n'
                                   '        def inner():\n            """Inner."""\n'
                                   'try:\n    pass\nexcept ImportError:\n    def h():\n        """  Indented\n'
                                   '        h."""\n')
    assert source_docstrings(tmp_path / "m.py") == ["Module.", "Class A.", "Method f.", "Async g.", "Inner.",
                                                    "Indented\nh."]
    (tmp_path / "broken.py").write_text("def (:\n")
    assert source_docstrings(tmp_path / "broken.py") == []


def test_compiled_docstrings_reads_c_modules():
    docs = compiled_docstrings("math")
    assert docs[0].startswith("This module provides access to the mathematical functions")
    assert any(d.startswith("Return the square root of x.") for d in docs)
    assert compiled_docstrings("no_such_module_xyz") == []


SAMPLE_MODULES = ["argparse", "bisect", "calendar", "csv", "difflib", "fnmatch", "fractions", "functools", "glob",
                  "heapq", "json/decoder", "json/encoder", "pprint", "random", "shutil", "string", "tarfile",
                  "tempfile", "textwrap", "zipfile"]


def test_sample_builder_makes_a_deterministic_consistent_dataset(tmp_path):
    texts = ["\n\n".join(source_docstrings(os.path.join(STDLIB, m + ".py"))) for m in SAMPLE_MODULES]
    stats = build_sample(str(tmp_path / "a"), texts, vocab_size=512, min_val_tokens=3000)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a" / "tokenizer.model"))
    assert sp.vocab_size() == 512 and (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(map(sp.is_byte, range(512))) == 256 and 3 not in sp.encode("naïve € ∑ 😀")  # byte fallback
    assert sp.encode("12345", out_type=str) == list("12345")  # split_digits

    shards = {split: train_gpt.load_shard(str(tmp_path / "a" / f"fineweb_{split}_000000.bin"), 512)
              for split in ("train", "val")}
    encoded = {tuple(sp.encode(t)) for t in texts}
    for split, tokens in shards.items():
        docs = docs_of(tokens)
        assert len(docs) == stats[split]["docs"] and len(tokens) == stats[split]["tokens"]
        assert set(docs) <= encoded  # each document is [BOS] + sp.encode(text)
    assert stats["val"]["docs"] + stats["train"]["docs"] == len(texts)
    assert stats["val"]["docs"] >= math.ceil(0.05 * len(texts)) and stats["val"]["tokens"] >= 3000
    assert stats["val"]["docs"] <= len(texts) // 2

    build_sample(str(tmp_path / "b"), texts, vocab_size=512, min_val_tokens=3000)
    for name in ("tokenizer.model", "tokenizer.vocab", "fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ---- prepare_proxy.py ---------------------------------------------------------------------------------------------

def run_prepare_proxy(*args):
    return subprocess.run([sys.executable, str(ROOT / "data" / "prepare_proxy.py"), *map(str, args)],
                          capture_output=True, text=True)


def write_corpus(src, files):
    (src / "tokenizers").mkdir(parents=True)
    (src / "text").mkdir()
    shutil.copy(PROXY_TOKENIZER, src / "tokenizers")
    for name, texts in files.items():
        lines = "".join(json.dumps({"text": t, "source": "test"}) + "\n" for t in texts)
        (src / "text" / f"{name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))


@pytest.mark.skipif(not PROXY_TOKENIZER.exists(), reason=f"proxy tokenizer not found at {PROXY_TOKENIZER}")
def test_prepare_proxy_writes_bos_plus_encoding_per_document_in_order(tmp_path):
    files = {"docs_000": ["The first training document.", "Second one, with digits 123.\n\nAnd a paragraph."],
             "docs_001": ["A third, in the next file."] * 2 + [f"Document {i}." for i in range(300)],
             "val_docs": ["Held-out text.", "More held-out text!"]}
    write_corpus(tmp_path / "src", files)
    out = tmp_path / "out"
    result = run_prepare_proxy("--src", tmp_path / "src", "--out", out, "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert "train: 304 docs" in result.stdout and "val: 2 docs" in result.stdout
    sp = spm.SentencePieceProcessor(model_file=str(PROXY_TOKENIZER))
    shard = {split: read_raw_shard(out / f"fineweb_{split}_000000.bin")[1] for split in ("train", "val")}
    assert shard["train"].tolist() == encode_docs(sp, files["docs_000"] + files["docs_001"]).tolist()
    assert shard["val"].tolist() == [t for text in files["val_docs"] for t in [1] + sp.encode(text)]
    assert (out / "fineweb_1024_bpe.model").read_bytes() == PROXY_TOKENIZER.read_bytes()

    result = run_prepare_proxy("--src", tmp_path / "src", "--out", out, "--train-files", 1, "--max-val-docs", 1)
    assert result.returncode == 0, result.stderr
    assert read_raw_shard(out / "fineweb_train_000000.bin")[1].tolist() == encode_docs(sp, files["docs_000"]).tolist()
    assert read_raw_shard(out / "fineweb_val_000000.bin")[1].tolist() == encode_docs(sp, files["val_docs"][:1]).tolist()


def test_prepare_proxy_names_a_missing_source_in_one_line(tmp_path):
    result = run_prepare_proxy("--src", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert str(tmp_path / "nowhere") in result.stderr and "--src" in result.stderr
    (tmp_path / "src" / "text").mkdir(parents=True)
    result = run_prepare_proxy("--src", tmp_path / "src", "--out", tmp_path / "out")
    assert result.returncode != 0 and "fineweb_1024_bpe.model not found" in result.stderr


def test_prepare_proxy_trains_an_upstream_spec_tokenizer_and_bytes_stay_exact(tmp_path):
    """--vocab other than 1024: a BPE with byte fallback, split digits, no dummy prefix, trained on the train text;
    the byte count of every shard document equals the UTF-8 size of its decoded text, byte pieces included."""
    rare = ["Café au lait costs 3€ in Zürich.", "日本語のテキスト and emoji 🙂 mixed in", "Ωμέγα and ЖЖЖ"]
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(400)]
    files = {"docs_000": [f"Document {i}: " + " ".join(rng.choice(words, size=80)) + f" {i * 37}." for i in range(150)],
             "val_docs": ["Held-out text with 12345 digits."] + rare}
    write_corpus(tmp_path / "src", files)
    out = tmp_path / "out"
    result = run_prepare_proxy("--src", tmp_path / "src", "--out", out, "--vocab", 400, "--workers", 1)
    assert result.returncode == 0, result.stderr
    sp = spm.SentencePieceProcessor(model_file=str(out / "fineweb_400_bpe.model"))
    assert sp.vocab_size() == 400 and sum(sp.is_byte(i) for i in range(400)) == 256
    assert [sp.id_to_piece(i) for i in sp.encode("1234")] == ["1", "2", "3", "4"]  # split_digits
    assert not sp.id_to_piece(sp.encode("Document")[0]).startswith("\u2581")  # no dummy prefix
    luts = train_gpt.build_byte_luts(sp, 400)
    val = read_raw_shard(out / "fineweb_val_000000.bin")[1].astype(np.int64)
    docs = docs_of(val)
    assert len(docs) == 4 and any(sp.is_byte(t) for doc in docs for t in doc)
    for doc in docs:
        t = torch.tensor([1, *doc])
        assert int(train_gpt.target_bytes(t[:-1], t[1:], luts).sum()) == len(sp.decode(list(doc)).encode("utf-8"))
    assert [sp.decode(list(d)) for d in docs[1:]] == rare  # byte fallback: nothing lost
    again = run_prepare_proxy("--src", tmp_path / "src", "--out", out, "--vocab", 400, "--workers", 1)
    assert again.returncode == 0 and "tokenizer: reusing" in again.stdout
