"""The shard writer, the offline sample builder and the proxy tokenizer script."""
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from conftest import ROOT, TOKENIZER
import train_gpt
from data.make_sample import build_sample, collect_documents
from data.shards import encode_docs, write_shard, write_split


def test_write_shard_round_trips_through_the_reader(tmp_path):
    tokens = np.array([1, 5, 1023, 0, 7], dtype=np.int64)
    write_shard(tmp_path / "s.bin", tokens)
    raw = (tmp_path / "s.bin").read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    assert list(np.frombuffer(raw[:12], "<i4")) == [20240520, 1, 5]
    assert train_gpt.load_shard(str(tmp_path / "s.bin"), 1024).tolist() == tokens.tolist()
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "bad.bin", [70000])


def test_write_split_cuts_at_shard_size(tmp_path):
    paths = write_split(str(tmp_path), "train", np.arange(10, dtype=np.uint16), shard_size=4)
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"fineweb_train_00000{i}.bin" for i in range(3)]
    assert [len(train_gpt.load_shard(p, 1024)) for p in paths] == [4, 4, 2]


def test_sample_builder_makes_a_consistent_dataset(tmp_path):
    texts = collect_documents()[:60]
    assert len(texts) == 60 and all(len(t) >= 200 for t in texts)
    stats = build_sample(str(tmp_path), texts, vocab_size=512)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.vocab_size() == 512 and sp.bos_id() == 1 and sp.is_byte(sp.piece_to_id("<0x41>"))
    val = train_gpt.load_shard(str(tmp_path / "fineweb_val_000000.bin"), 512)
    train = train_gpt.load_shard(str(tmp_path / "fineweb_train_000000.bin"), 512)
    assert (val == 1).sum() == stats["val"]["docs"] and (train == 1).sum() == stats["train"]["docs"]
    assert stats["val"]["docs"] + stats["train"]["docs"] == 60 and val[0] == 1
    again = tmp_path / "again"
    build_sample(str(again), texts, vocab_size=512)
    assert (again / "fineweb_train_000000.bin").read_bytes() == (tmp_path / "fineweb_train_000000.bin").read_bytes()


def test_prepare_proxy_tokenizes_each_document_after_a_bos(tmp_path):
    if not TOKENIZER.exists():
        pytest.skip(f"proxy tokenizer not found at {TOKENIZER}")
    src = tmp_path / "src"
    (src / "tokenizers").mkdir(parents=True)
    (src / "text").mkdir()
    shutil.copy(TOKENIZER, src / "tokenizers")
    docs = {"docs_000": ["The first training document.", "Second one, with digits 123."],
            "docs_001": ["A third, in the next file."], "val_docs": ["Held-out text.", "More held-out text!"]}
    for name, texts in docs.items():
        lines = "".join(json.dumps({"text": t, "source": "test"}) + "\n" for t in texts)
        (src / "text" / f"{name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "data" / "prepare_proxy.py"), "--src", str(src), "--out", str(out),
                    "--workers", "2"], check=True, capture_output=True, text=True)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    train = train_gpt.load_shard(str(out / "fineweb_train_000000.bin"), 1024)
    val = train_gpt.load_shard(str(out / "fineweb_val_000000.bin"), 1024)
    assert train.tolist() == encode_docs(sp, docs["docs_000"] + docs["docs_001"]).tolist()
    assert val.tolist() == encode_docs(sp, docs["val_docs"]).tolist()
    assert (out / "fineweb_1024_bpe.model").read_bytes() == TOKENIZER.read_bytes()
    missing = subprocess.run([sys.executable, str(ROOT / "data" / "prepare_proxy.py"), "--src", str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "not found" in missing.stderr and missing.stderr.count("\n") == 1
