"""Bits per byte: exact byte counts against decoded real text, and every validation target scored exactly once."""
import io
import itertools
import json
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch
import zstandard

from conftest import PROXY, cpu_runtime, tiny_args
import train_gpt

UNK = 3


@pytest.fixture
def sp(tokenizer_path):
    return spm.SentencePieceProcessor(model_file=tokenizer_path)


def real_documents(n):
    path = PROXY / "text" / "val_docs.jsonl.zst"
    if not path.exists():
        pytest.skip(f"proxy corpus not found at {path}")
    with open(path, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        return [json.loads(line)["text"] for line in itertools.islice(reader, n)]


def lut_bytes(stream, luts):
    t = torch.tensor(stream)
    return int(train_gpt.target_bytes(t[:-1], t[1:], luts).sum())


def test_byte_count_equals_decoded_text_on_real_documents(sp):
    docs = [sp.encode(text) for text in real_documents(150)]
    luts = train_gpt.build_byte_luts(sp, 1024)
    stream = [tok for ids in docs for tok in [1] + ids]
    # The canonical rule treats <unk> like BOS: 0 bytes, and the next piece's leading space is not counted.
    # sp.decode renders <unk> as " ⁇ ", so decode the <unk>-free runs separately (decode drops a leading space).
    def segments(ids):
        return [list(g) for unk, g in itertools.groupby(ids, key=lambda i: i == UNK) if not unk]
    expected = sum(len(sp.decode(seg).encode("utf-8")) for ids in docs for seg in segments(ids))
    assert lut_bytes(stream, luts) == expected
    clean = [ids for ids in docs if UNK not in ids]
    assert len(clean) > 50
    for ids in clean:  # documents the tokenizer covers fully: the count is exactly the decoded text's bytes
        assert lut_bytes([1] + ids, luts) == len(sp.decode(ids).encode("utf-8"))


def test_leading_space_counts_except_after_a_boundary(sp):
    luts = train_gpt.build_byte_luts(sp, 1024)
    the = sp.piece_to_id("\u2581the")
    assert lut_bytes([1, the], luts) == 3  # first piece of a document: "the"
    assert lut_bytes([1, the, the], luts) == 3 + 4  # later: " the"
    base, space, boundary = luts
    assert boundary[[0, 1, 2, 3]].all() and (base[[0, 1, 2, 3]] == 0).all()


@pytest.mark.parametrize("n,seq,stride", [(1, 4, 2), (3, 8, 2), (16, 4, 0), (16, 4, 4), (17, 4, 4), (100, 16, 7),
                                          (100, 16, 1), (1000, 64, 64), (1001, 64, 24), (65, 64, 60), (64, 64, 3),
                                          (50, 8, 100)])
def test_sliding_windows_score_every_target_exactly_once(n, seq, stride):
    w = train_gpt.sliding_windows(n, seq, stride).tolist()
    L = min(seq, n)
    assert w[0][1] == 0
    scored = [t for _, lo, hi in w for t in range(lo, hi)]
    assert scored == list(range(n))
    for start, lo, hi in w:
        assert start <= lo < hi <= start + L and start + L <= n
        if lo > 0 and 0 < stride < L:
            assert hi - lo <= stride


def test_evaluate_scores_each_target_once_with_exact_sums(sp):
    args = tiny_args(TRAIN_SEQ_LEN=16, ORTHO_INIT=1)
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():
        model.tok_emb.weight.normal_(0, 0.5)
    luts = train_gpt.build_byte_luts(sp, 1024)
    val = torch.tensor([1] + sp.encode("The quick brown fox jumps over the lazy dog. " * 6) + [1] +
                       sp.encode("A second document, shorter."))
    rt, n = cpu_runtime(), len(val) - 1
    all_bytes = int(train_gpt.target_bytes(val[:-1], val[1:], luts).sum())
    results = {}
    for stride in (0, 1, 7, 16):
        for batch in (1, 3, 8):
            r = train_gpt.evaluate(model, val, luts, tiny_args(TRAIN_SEQ_LEN=16, EVAL_BATCH_SEQS=batch,
                                                               VAL_BATCH_SIZE=16 * batch), rt, stride)
            assert (r["tokens"], r["bytes"]) == (n, all_bytes)
            assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * n / all_bytes, rel=1e-12)
            results[stride, batch] = r["val_loss"]
    assert results[16, 1] == pytest.approx(results[0, 3], rel=1e-9)  # stride = seq_len is the non-overlapping eval
    assert results[1, 1] == pytest.approx(results[1, 8], rel=1e-9)  # padding of the last batch changes nothing
    # by hand: non-overlapping windows, the last one pulled back to end at the final target
    with torch.no_grad():
        nats = 0.0
        for start, lo, hi in train_gpt.sliding_windows(n, 16, 0).tolist():
            nll = model(val[start:start + 16][None], val[start + 1:start + 17][None], per_token=True)[0].double()
            nats += float(nll[lo - start:hi - start].sum())
    assert results[0, 3] == pytest.approx(nats / n, rel=1e-6)


def test_byte_fallback_pieces_count_one_byte_each(tmp_path):
    from data.make_sample import collect_documents, train_tokenizer
    bf = train_tokenizer(collect_documents()[:40], str(tmp_path / "bf"), 512)
    luts = train_gpt.build_byte_luts(bf, 512)
    texts = ["Café au lait costs 3€ in Zürich.", "日本語のテキスト and emoji 🙂 mixed in", "plain ascii words here"]
    ids = [bf.encode(t) for t in texts]
    assert any(bf.is_byte(i) for doc in ids for i in doc)
    stream = [tok for doc in ids for tok in [1] + doc]
    assert lut_bytes(stream, luts) == sum(len(bf.decode(doc).encode("utf-8")) for doc in ids)
