"""Bits per byte: exact byte counts against decoded real text, and every validation target scored exactly once."""
import io
import itertools
import json
import math

import pytest
import sentencepiece as spm
import torch
import zstandard

from conftest import PROXY, cpu_runtime, tiny_args
import train_gpt

BOS, UNK = 1, 3


@pytest.fixture(scope="module")
def sp():
    from conftest import TOKENIZER
    if not TOKENIZER.exists():
        pytest.skip(f"challenge tokenizer not found at {TOKENIZER}")
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.fixture(scope="module")
def luts(sp):
    return train_gpt.build_byte_luts(sp, 1024)


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


def test_lookup_tables_follow_the_canonical_rule(sp, luts):
    base, space, boundary = luts
    assert base.shape == space.shape == boundary.shape == (1024,)
    for i in range(1024):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            assert (base[i], space[i], boundary[i]) == (0, False, True), piece
        else:
            assert not boundary[i] and bool(space[i]) == piece.startswith("\u2581"), piece
            assert base[i] == len(piece.removeprefix("\u2581").encode("utf-8")), piece
    assert boundary[[0, 1, 2, 3]].all()  # pad, bos, eos, unk
    wider = train_gpt.build_byte_luts(sp, 1030)  # ids past the tokenizer's vocabulary are zero-byte boundaries
    assert wider[0].shape == (1030,) and (wider[0][1024:] == 0).all() and wider[2][1024:].all()


def test_byte_count_equals_decoded_text_on_real_documents(sp, luts):
    docs = [sp.encode(text) for text in real_documents(150)]
    stream = [tok for ids in docs for tok in [BOS] + ids]
    total = lut_bytes(stream, luts)

    # Documents the tokenizer covers fully: the count is exactly the UTF-8 size of the decoded text.
    clean = [ids for ids in docs if UNK not in ids]
    assert len(clean) >= 75
    for ids in clean:
        assert lut_bytes([BOS] + ids, luts) == len(sp.decode(ids).encode("utf-8"))

    # <unk> counts 0 bytes (sp.decode renders it as " ⁇ ") and, like BOS, is a boundary: a piece right after it gets
    # no leading-space byte. So the count is the decoded text without the <unk>s, less one byte per such space.
    with_unk = [ids for ids in docs if UNK in ids]
    assert len(with_unk) >= 10
    expected = 0
    for ids in docs:
        spaces_after_unk = sum(1 for a, b in zip(ids, ids[1:]) if a == UNK and b != UNK
                               and sp.id_to_piece(b).startswith("\u2581"))
        expected += len(sp.decode([i for i in ids if i != UNK]).encode("utf-8")) - spaces_after_unk
    assert total == expected
    # the same, decoding the <unk>-free runs separately (sp.decode drops the leading space of its first piece)
    runs = [list(g) for ids in docs for is_unk, g in itertools.groupby(ids, key=lambda i: i == UNK) if not is_unk]
    assert total == sum(len(sp.decode(run).encode("utf-8")) for run in runs)


def test_leading_space_counts_except_after_a_boundary(sp, luts):
    the, dot = sp.piece_to_id("\u2581the"), sp.piece_to_id(".")
    assert sp.id_to_piece(the) == "\u2581the" and not sp.is_unknown(the)
    assert lut_bytes([BOS, the], luts) == 3  # first piece of a document: "the"
    assert lut_bytes([BOS, the, the], luts) == 3 + 4  # mid-document: "the the"
    assert lut_bytes([BOS, dot, the], luts) == 1 + 4
    assert lut_bytes([BOS, the, BOS, the], luts) == 3 + 0 + 3  # BOS itself is 0 bytes, and resets the space
    assert lut_bytes([BOS, the, UNK, the], luts) == 3 + 0 + 3
    x, y = torch.tensor([[BOS, the], [the, the]]), torch.tensor([[the, the], [the, BOS]])
    assert train_gpt.target_bytes(x, y, luts).tolist() == [[3, 4], [4, 0]]  # works on [B, T] batches


def test_byte_fallback_pieces_count_one_byte_each(tmp_path):
    from data.make_sample import train_tokenizer  # the upstream settings: BPE with byte_fallback
    bf = train_tokenizer(real_documents(60), str(tmp_path / "bf"), 512)
    luts = train_gpt.build_byte_luts(bf, 512)
    texts = ["Café au lait costs 3€ in Zürich.", "日本語のテキスト and emoji 🙂 mixed in",
             "plain ascii words here"]
    ids = [bf.encode(t) for t in texts]
    assert any(bf.is_byte(i) for doc in ids for i in doc)
    assert all(luts[0][i] == 1 and not luts[1][i] for i in range(512) if bf.is_byte(i))
    stream = [tok for doc in ids for tok in [BOS] + doc]
    assert lut_bytes(stream, luts) == sum(len(bf.decode(doc).encode("utf-8")) for doc in ids)


def check_windows(n, seq, stride):
    w = train_gpt.sliding_windows(n, seq, stride)
    assert w.dtype == torch.int64 and w.ndim == 2 and w.shape[1] == 3
    L = min(seq, n)
    assert w[0, 1] == 0 and w[0, 0] == 0  # the first window scores from the very first target
    scored = [t for _, lo, hi in w.tolist() for t in range(lo, hi)]
    assert scored == list(range(n))  # every target exactly once, in order
    for start, lo, hi in w.tolist():
        assert start <= lo < hi <= start + L and 0 <= start and start + L <= n
        if 0 < stride < L and lo > 0:
            assert hi - lo <= stride and lo - start >= L - stride  # at least L - stride tokens of context
    assert w[-1, 2] == n
    if stride == 0 or stride >= L:
        assert len(w) == math.ceil(n / L)


@pytest.mark.parametrize("n,seq,stride", [(1, 4, 2), (3, 8, 2), (16, 4, 0), (16, 4, 4), (17, 4, 4), (100, 16, 7),
                                          (100, 16, 1), (1000, 64, 64), (1001, 64, 24), (65, 64, 60), (64, 64, 3),
                                          (50, 8, 100), (2047, 2048, 64), (60573, 1024, 64), (60573, 1024, 0)])
def test_sliding_windows_score_every_target_exactly_once(n, seq, stride):
    check_windows(n, seq, stride)


def test_sliding_windows_over_a_grid():
    for n in range(1, 90):
        for seq in (1, 2, 3, 5, 8, 16, 32):
            for stride in {0, 1, 2, 3, 5, 7, seq - 1, seq, seq + 3}:
                check_windows(n, seq, stride)


def test_sliding_windows_examples():
    assert train_gpt.sliding_windows(10, 4, 0).tolist() == [[0, 0, 4], [4, 4, 8], [6, 8, 10]]
    assert train_gpt.sliding_windows(10, 4, 2).tolist() == [[0, 0, 4], [2, 4, 6], [4, 6, 8], [6, 8, 10]]
    assert train_gpt.sliding_windows(9, 4, 2).tolist() == [[0, 0, 4], [2, 4, 6], [4, 6, 8], [5, 8, 9]]
    assert train_gpt.sliding_windows(3, 8, 2).tolist() == [[0, 0, 3]]


# ---- evaluate() with a probe model that reads the absolute positions from the tokens (val = 0, 1, 2, ...)

class PositionProbe(torch.nn.Module):
    """Returns, for target position t scored with c tokens of context, the 'nll' f(t, c)."""

    def __init__(self, f):
        super().__init__()
        self.f, self.calls = f, []

    def forward(self, x, y, ctx=None, per_token=False, hint=None):
        k = y.size(1)  # the targets of the last k positions of x (GPT.forward's contract)
        assert per_token and x.size(0) == y.size(0) and (y == x[:, -k:] + 1).all()
        self.calls.append(x.shape)
        t = x.double()  # target position t predicts val[t + 1]; x[:, j] == t
        context = torch.arange(1, x.size(1) + 1, dtype=torch.float64).expand_as(t)
        return self.f(t, context)[:, -k:]


def probe_eval(f, n, seq_len, stride, batch_seqs, rt=None, **kw):
    model = PositionProbe(f)
    val = torch.arange(n + 1)
    luts = (torch.ones(n + 1, dtype=torch.int64), torch.zeros(n + 1, dtype=torch.bool),
            torch.zeros(n + 1, dtype=torch.bool))
    args = tiny_args(TRAIN_SEQ_LEN=seq_len, EVAL_BATCH_SEQS=batch_seqs, VAL_BATCH_SIZE=seq_len * batch_seqs, **kw)
    return train_gpt.evaluate(model, val, luts, args, rt or cpu_runtime(), stride), model


CASES = [(n, seq, stride, b) for n, seq in ((100, 16), (64, 16), (17, 16), (10, 16), (257, 32))
         for stride in (0, 1, 7, 16) for b in (1, 3, 8)]


@pytest.mark.parametrize("n,seq,stride,batch", CASES)
def test_evaluate_scores_each_target_once_with_enough_context(n, seq, stride, batch):
    ones, _ = probe_eval(lambda t, c: torch.ones_like(t), n, seq, stride, batch)
    assert (ones["tokens"], ones["bytes"], ones["val_loss"]) == (n, n, 1.0)
    pos, model = probe_eval(lambda t, c: t, n, seq, stride, batch)
    assert pos["val_loss"] * n == pytest.approx(n * (n - 1) / 2, rel=1e-12)  # sum of t: each once
    assert len({shape for shape in model.calls}) == 1  # one static shape: the last batch is padded
    sq, _ = probe_eval(lambda t, c: t * t, n, seq, stride, batch)
    assert sq["val_loss"] * n == pytest.approx(sum(t * t for t in range(n)), rel=1e-12)
    # context: every target t is scored with at least min(t + 1, L - stride + 1) tokens in its window
    L, s = min(seq, n), min(stride or seq, seq, n)
    short, _ = probe_eval(lambda t, c: (c < torch.clamp(t + 1, max=L - s + 1)).double(), n, seq, stride, batch)
    assert short["val_loss"] == 0
    assert short["stride"] == s


class Reduced(Exception):
    pass


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("n,stride", [(100, 7), (100, 0), (300, 16), (40, 4)])
def test_ranks_split_the_windows_without_overlap(monkeypatch, world, n, stride):
    sums = []

    def all_reduce(t, *args, **kw):  # stand-in for the collective: capture this rank's partial sums
        sums.append(t.clone())
        raise Reduced
    monkeypatch.setattr(train_gpt.dist, "all_reduce", all_reduce)
    for r in range(world):
        with pytest.raises(Reduced):
            probe_eval(lambda t, c: t, n, 16, stride, 4, rt=train_gpt.Runtime(r, world, torch.device("cpu")))
    nats, tokens, nbytes = torch.stack(sums).sum(0).tolist()
    assert (tokens, nbytes, nats) == (n, n, n * (n - 1) / 2)


# ---- evaluate() with a real tiny model

@pytest.fixture(scope="module")
def tiny_model():
    args = tiny_args(TRAIN_SEQ_LEN=16)
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():  # random weights everywhere, so every layer (and the zero-init projections) matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def val_stream(sp):
    return torch.tensor([BOS] + sp.encode("The quick brown fox jumps over the lazy dog. " * 5) + [BOS] +
                        sp.encode("A second document, shorter, with digits 12345."))


def test_evaluate_totals_and_bpb(sp, luts, tiny_model, val_stream):
    val, rt, n = val_stream, cpu_runtime(), len(val_stream) - 1
    assert n > 3 * 16 and n % 16 and n % 7  # ragged tails for both strides
    all_bytes = int(train_gpt.target_bytes(val[:-1], val[1:], luts).sum())
    losses = {}
    batches = {0: (2, 5, 64), 1: (5, 64), 7: (2, 5, 64), 16: (2, 5, 64)}  # 2, 5: a part-filled last batch
    for stride in batches:
        for batch in batches[stride]:
            args = tiny_args(TRAIN_SEQ_LEN=16, EVAL_BATCH_SEQS=batch, VAL_BATCH_SIZE=16 * batch)
            r = train_gpt.evaluate(tiny_model, val, luts, args, rt, stride)
            assert (r["tokens"], r["bytes"]) == (n, all_bytes)
            assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * n / all_bytes, rel=1e-12)
            losses[stride, batch] = r["val_loss"]
    for stride in batches:  # batching and padding change nothing
        assert max(losses[stride, b] for b in batches[stride]) == pytest.approx(losses[stride, 64], rel=1e-9)
        assert min(losses[stride, b] for b in batches[stride]) == pytest.approx(losses[stride, 64], rel=1e-9)
    assert losses[16, 5] == pytest.approx(losses[0, 5], rel=1e-12)  # stride = seq_len is the non-overlapping eval


def test_evaluate_nats_match_a_hand_sum(luts, tiny_model, val_stream):
    val, n, L = val_stream, len(val_stream) - 1, 16
    r = train_gpt.evaluate(tiny_model, val, luts, tiny_args(TRAIN_SEQ_LEN=L, NGRAM_TILT_ENABLED=0), cpu_runtime(), stride=L)
    # by hand: full windows of L targets from 0, then one last full window pulled back to end at target n-1
    nats, start, done = 0.0, 0, 0
    with torch.no_grad():
        while done < n:
            start = min(start, n - L)
            nll = tiny_model(val[start:start + L][None], val[start + 1:start + L + 1][None], per_token=True)[0]
            nats += float(nll[done - start:].double().sum())
            done, start = start + L, start + L
    assert r["val_loss"] * r["tokens"] == pytest.approx(nats, rel=1e-6)
    assert r["tokens"] == n
