"""FlashAttention varlen for TRAIN_LOADER=packed (issue 18): where FlashAttention runs, each packed micro-batch carries
the record's cu_seqlens (padded to a multiple of 64), the model attends through them, and priming compiles the record's
four buckets. No FlashAttention on CPU: these tests force the path (flash_runs) and check it against the document mask
the CPU runs, exactly, and check attend()'s FlashAttention layout against a per-segment stand-in for the library."""
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_runtime, tiny_args
from test_loaders import golden, golden_data, micro_batches, segment_starts
from test_progressive import Spy, counting_data
import train_gpt

CPU = torch.device("cpu")
BOS = train_gpt.BOS_ID


@pytest.fixture
def flash(monkeypatch):
    """train_gpt as if FlashAttention ran here: loaders attach cu_seqlens and train_step passes Segments."""
    monkeypatch.setattr(train_gpt, "flash_runs", lambda args, rt: True)


def padded(cu, n):
    return cu + [n] * (-len(cu) % 64)


@pytest.mark.parametrize("world,accum", [(1, 2), (2, 1), (1, 1)])
def test_packed_rows_carry_the_records_padded_cu_seqlens(tmp_path, flash, world, accum):
    """The record's own _build_cu_seqlens output (golden, #1855) and its padding to a multiple of 64 with the row
    length, for every micro-batch of every rank."""
    g = golden("loader_packed_1855.json")
    tokens, env = golden_data(tmp_path, g["inputs"])
    args = tiny_args(**env, TRAIN_LOADER="packed", DOC_MASK=1)
    for rank, want in enumerate(g["batches"][f"world{world}_accum{accum}"]):
        loader = train_gpt.PackedLoader(args, train_gpt.Runtime(rank, world, CPU), accum)
        assert loader.lengths == [g["inputs"]["train_seq_len"]]
        for (x, y, cu), b in zip(micro_batches(loader, len(want)), want):
            assert x[0].tolist() == tokens[b["start"]:b["start"] + x.size(1)].tolist()
            assert cu.dtype == torch.int32 and cu.tolist() == padded(b["cu_seqlens"], x.size(1))


def test_no_cu_seqlens_without_flash_attention(tmp_path):
    g = golden("loader_packed_1855.json")
    _, env = golden_data(tmp_path, g["inputs"])
    loader = train_gpt.PackedLoader(tiny_args(**env, TRAIN_LOADER="packed", DOC_MASK=1), cpu_runtime(), 1)
    assert loader.lengths == [] and all(len(b) == 2 for b in loader.next_batch())
    assert not train_gpt.flash_runs(tiny_args(ATTN_BACKEND="fa" if train_gpt.FLASH else "auto"), cpu_runtime())


def test_cu_seqlens_cut_where_the_document_mask_cuts():
    """Random rows (BOS anywhere, at 0 or not, runs of BOS, none at all) at several splits: the segments start where
    the dense mask's do; the length is the next multiple of 64 (plus `extra` buckets), padded with n."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 300, (1,), generator=g))
        row = torch.randint(2, 50, (1, n), generator=g)
        row[torch.rand(1, n, generator=g) < [0.0, 0.01, 0.1, 0.6][trial % 4]] = BOS
        bos = np.flatnonzero(row[0].numpy() == BOS)
        for split in (1, 7, 16, 64, 512):
            for extra in (0, 2):
                cu = train_gpt.cu_seqlens(bos, n, split, extra)
                starts = segment_starts(row, split)
                assert cu.dtype == np.int32 and len(cu) % 64 == 0
                assert len(cu) == 64 * (len(starts) // 64 + 1 + extra)
                assert cu.tolist() == starts + [n] * (len(cu) - len(starts))


def test_segments_give_the_models_document_mask_output_exactly(tmp_path, flash):
    """A packed row through every switch (looped): logits from its cu_seqlens equal those from document_mask."""
    from test_frontier import LOOPING, all_on_model
    model = all_on_model(DOC_MASK=1)
    row = torch.randint(2, 64, (1, 96), generator=torch.Generator().manual_seed(3))
    row[0, [0, 9, 40, 41, 77]] = BOS
    bos = np.flatnonzero(row[0].numpy() == BOS)
    with torch.no_grad():
        for split in (16, 32):
            seg = train_gpt.Segments(torch.from_numpy(train_gpt.cu_seqlens(bos, 96, split)), split)
            want = model.logits(model.hidden(row, LOOPING, split))
            assert torch.equal(model.logits(model.hidden(row, LOOPING, segments=seg)), want)


def train_packed(tmp_path, monkeypatch, use_flash):
    """8 steps of a packed run with a length schedule (16, then 32); returns the weights, the Segments' lengths and
    cu_seqlens sizes the model saw, and the losses."""
    tmp_path.mkdir()
    if use_flash:
        monkeypatch.setattr(train_gpt, "flash_runs", lambda args, rt: True)
    args = tiny_args(**counting_data(tmp_path), TRAIN_SEQ_SCHEDULE="16@0.25,32@1", ITERATIONS=8, TRAIN_LOADER="packed",
                     DOC_MASK=1, GPTQ=0, NUM_LOOPS=0, TRAIN_LOG_EVERY=1)
    rt = cpu_runtime()
    torch.manual_seed(0)
    base = train_gpt.GPT(args)
    seen, lines = [], []

    class Watch(Spy):
        def forward(self, x, y, ctx=None, split=0, segments=None, **kw):
            seen.append((split, None if segments is None else (segments.max_len, tuple(segments.cu.tolist()))))
            return super().forward(x, y, ctx=ctx, split=split, segments=segments, **kw)
    opts = train_gpt.build_optimizers(base, args, rt)
    train_gpt.train(args, rt, Watch(base), base, opts, train_gpt.PackedLoader(args, rt, 8), None, lines.append)
    return base.state_dict(), seen, [l.split(" train_time")[0] for l in lines if "train_loss" in l]


def test_training_through_cu_seqlens_equals_the_document_mask_run(tmp_path, monkeypatch):
    """The same packed run with and without the cu_seqlens path: the same losses and the same weights, bit for bit
    (on CPU both become the same dense mask); each micro-batch's Segments are its row cut at the step's length."""
    want, plain, want_losses = train_packed(tmp_path / "a", monkeypatch, False)
    got, seen, losses = train_packed(tmp_path / "b", monkeypatch, True)
    assert losses == want_losses and len(losses) == 8
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert [s for s, _ in seen] == [s for s, _ in plain] == [16] * 24 + [32] * 40
    assert all(seg is None for _, seg in plain)
    for split, (max_len, cu) in seen:
        assert max_len == split and len(cu) == 64 and cu[-1] == 128 and list(cu) == sorted(cu)
        assert all(0 < b - a <= split for a, b in zip(cu, cu[1:]) if b < 128 or a < 128)


def test_priming_compiles_four_cu_buckets_for_each_context(tmp_path, flash):
    """The record primes buckets 64, 128, 192 and 256: each (context, length) once per bucket, with rows cut only
    every L tokens; weights put back."""
    args = tiny_args(**counting_data(tmp_path), TRAIN_LOADER="packed", DOC_MASK=1, NUM_LOOPS=1, ENABLE_LOOPING_AT=0.5,
                     WARMUP_STEPS=8)
    rt = cpu_runtime()
    base = train_gpt.GPT(args)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    seen, log = [], []

    class Watch(Spy):
        def forward(self, x, y, ctx=None, split=0, segments=None, **kw):
            seen.append((ctx.looping, len(segments.cu), segments.cu.tolist()[:3]))
            return super().forward(x, y, ctx=ctx, split=split, segments=segments, **kw)
    loader = train_gpt.PackedLoader(args, rt, 1)
    train_gpt.prime_compile(Watch(base), base, train_gpt.build_optimizers(base, args, rt), loader, args, rt, log.append)
    n = args.train_batch_tokens
    assert sorted((looped, size) for looped, size, _ in seen) == [(f, b) for f in (False, True) for b in (64, 128, 192, 256)]
    assert all(first == [0, 32, 64] for *_, first in seen) and n == 1024
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    log.clear()
    train_gpt.prime_compile(Watch(base), base, train_gpt.build_optimizers(base, args, rt), loader,
                            tiny_args(**counting_data(tmp_path), TRAIN_LOADER="packed", DOC_MASK=1, NUM_LOOPS=1,
                                      ENABLE_LOOPING_AT=0.5, WARMUP_STEPS=3), rt, log.append)
    assert "primes 3 of 8 graphs" in log[0]


def stand_in_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """FlashAttention's varlen contract, one segment at a time: q [N, H, hd], k/v [N, H_kv, hd], segments
    cu[i]:cu[i+1] (empty ones allowed), none longer than max_seqlen."""
    assert q.dim() == 3 and causal and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
    assert cu_seqlens_q.dtype == torch.int32 and int(cu_seqlens_q[-1]) == q.size(0)
    out, cu = torch.zeros_like(q), cu_seqlens_q.tolist()
    for a, b in zip(cu, cu[1:]):
        assert 0 <= b - a <= max_seqlen_q
        if b > a:
            y = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True,
                                               enable_gqa=True)
            out[a:b] = y[0].transpose(0, 1)
    return out, None  # some versions return the log-sum-exp too


def test_attend_hands_flash_attention_the_flattened_segments(monkeypatch):
    """attend()'s FlashAttention branch (a stand-in library; the branch runs for CUDA tensors, faked here): the
    [B, H, T, hd] batch flattened to B*T tokens with the padded cu_seqlens gives the document-masked attention."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 40, 8, generator=g) for h in (4, 2, 2))
    idx = torch.randint(2, 50, (2, 40), generator=g)
    idx[0, [5, 30]], idx[1, [0, 12]] = BOS, BOS
    want = train_gpt.attend(q, k, v, train_gpt.document_mask(idx, flex=False, split=16))
    flat = idx.flatten().numpy()
    bos = np.union1d(np.flatnonzero(flat == BOS), [40])  # the second row starts a segment too
    cu = train_gpt.cu_seqlens(bos, 80, 16)
    assert len(cu) == 64
    calls = []
    library = types.SimpleNamespace(flash_attn_varlen_func=lambda *a, **kw: calls.append(1) or stand_in_varlen(*a, **kw))
    monkeypatch.setattr(train_gpt, "FLASH", library)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    got = train_gpt.attend(q, k, v, train_gpt.Segments(torch.from_numpy(cu), 16), flash=True)
    monkeypatch.undo()
    assert calls == [1]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
