"""TRAIN_LOADER=shuffled and =packed against numbers produced by the records' own loader code (tests/golden/README.md),
and their properties: packed rows attend only within their segments, long documents are cut every TRAIN_SEQ_LEN,
the same inputs give the same batches, what ranks read, and one-line errors for settings that cannot work."""
import json
import pathlib

import numpy as np
import pytest
import torch

from conftest import cpu_runtime, tiny_args, tiny_env
from data.shards import write_shard
from test_frontier import LOOPING, all_on_model
import train_gpt

CPU = torch.device("cpu")
BOS = train_gpt.BOS_ID
GOLDEN = pathlib.Path(__file__).parent / "golden"


def golden(name):
    return json.loads((GOLDEN / name).read_text())


def golden_data(tmp_path, inputs):
    """The golden runs' shards: documents of the given lengths back to back (BOS first), content 2 + position % 1000,
    cut into shards of the given sizes. Returns (all tokens, env for tiny_args)."""
    n = sum(inputs["shard_sizes"])
    tokens = 2 + np.arange(n) % 1000
    tokens[np.cumsum([0] + inputs["doc_lengths"])[:-1]] = BOS
    at = 0
    for i, size in enumerate(inputs["shard_sizes"]):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", tokens[at:at + size])
        at += size
    env = dict(DATA_PATH=str(tmp_path), VOCAB_SIZE=1024, TRAIN_SEQ_LEN=inputs["train_seq_len"],
               TRAIN_BATCH_TOKENS=inputs["global_tokens"])
    return tokens, env


def micro_batches(loader, n):
    """The first n micro-batches of a loader (next_batch() gives accum of them per call)."""
    out = []
    while len(out) < n:
        out += loader.next_batch()
    return out[:n]


def segment_starts(row: torch.Tensor, split: int) -> list[int]:
    """Where each segment of a [1, T] row starts, read off the dense mask: a query's first allowed key."""
    mask = train_gpt.document_mask(row, flex=False, split=split)[0, 0]
    return sorted({int(mask[q].nonzero().min()) for q in range(row.size(1))})


# ----------------------------------------------------------------------------------------------------------------------
# Golden values

@pytest.mark.parametrize("world,accum", [(1, 2), (2, 1)])
def test_shuffled_loader_matches_record_0409(tmp_path, world, accum):
    g = golden("loader_shuffled_0409.json")
    tokens, env = golden_data(tmp_path, g["inputs"])
    L = g["inputs"]["train_seq_len"]
    for rank, want in enumerate(g["batches"][f"world{world}_accum{accum}"]):
        loader = train_gpt.ShuffledLoader(tiny_args(**env), train_gpt.Runtime(rank, world, CPU), accum)
        for (x, y), starts in zip(micro_batches(loader, len(want)), want):
            assert x.tolist() == [tokens[s:s + L].tolist() for s in starts]
            assert y.tolist() == [tokens[s + 1:s + L + 1].tolist() for s in starts]
            assert x.dtype == y.dtype == torch.int64


@pytest.mark.parametrize("world,accum", [(1, 2), (2, 1), (1, 1)])
def test_packed_loader_and_segments_match_record_1855(tmp_path, world, accum):
    g = golden("loader_packed_1855.json")
    tokens, env = golden_data(tmp_path, g["inputs"])
    L, n = g["inputs"]["train_seq_len"], g["inputs"]["global_tokens"] // (world * accum)
    args = tiny_args(**env, TRAIN_LOADER="packed", DOC_MASK=1)
    for rank, want in enumerate(g["batches"][f"world{world}_accum{accum}"]):
        loader = train_gpt.PackedLoader(args, train_gpt.Runtime(rank, world, CPU), accum)
        for (x, y), b in zip(micro_batches(loader, len(want)), want):
            assert x.shape == y.shape == (1, n)
            assert x[0].tolist() == tokens[b["start"]:b["start"] + n].tolist()
            assert y[0].tolist() == tokens[b["start"] + 1:b["start"] + n + 1].tolist()
            # the record's cu_seqlens (without its padding), from our mask at split = TRAIN_SEQ_LEN
            assert segment_starts(x, L) + [n] == b["cu_seqlens"]
            assert b["max_seqlen"] <= L


def test_calibration_reads_the_records_shuffled_sequences(tmp_path):
    """Both records calibrate GPTQ on a new ShuffledSequenceLoader: its first rows, whatever training read."""
    g = golden("loader_shuffled_0409.json")
    tokens, env = golden_data(tmp_path, g["inputs"])
    L, want = g["inputs"]["train_seq_len"], g["batches"]["world1_accum2"][0]
    rt = train_gpt.Runtime(0, 1, CPU)
    first = [[tokens[s:s + L].tolist() for s in starts] for starts in want[:4]]
    for name in ("packed", "shuffled"):
        loader = train_gpt.LOADERS[name](tiny_args(**env, TRAIN_LOADER=name, DOC_MASK=1, GPTQ=1), rt, 2)
        micro_batches(loader, 5)
        assert type(loader.calib) is train_gpt.ShuffledLoader and loader.calib is not loader
        assert [x.tolist() for x, _ in micro_batches(loader.calib, 4)] == first
    stream = train_gpt.TrainLoader(tiny_args(**env, GPTQ=1, TRAIN_LOADER="stream"), rt, 2)
    assert stream.calib is stream  # the baseline's stream continues past what training read


# ----------------------------------------------------------------------------------------------------------------------
# Segments: documents and their TRAIN_SEQ_LEN pieces

def test_long_documents_are_cut_every_split_tokens_from_their_start():
    row = torch.full((1, 60), 7)
    row[0, [10, 50, 53]] = BOS  # a document running in from before the row, one of 40 tokens, one of 3, one of 7
    assert segment_starts(row, 16) == [0, 10, 26, 42, 50, 53]
    assert segment_starts(row, 0) == [0, 10, 50, 53]
    assert segment_starts(torch.full((1, 40), 7), 16) == [0, 16, 32]  # mid-document: counted from the row start
    rows = torch.randint(2, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    rows[rows < 8] = BOS
    assert torch.equal(train_gpt.document_mask(rows, flex=False, split=16), train_gpt.document_mask(rows, flex=False))


def packed_row():
    row = torch.randint(2, 64, (1, 64), generator=torch.Generator().manual_seed(5))
    row[0, [9, 45, 50]] = BOS  # segments (split 16): [0,9) [9,25) [25,41) [41,45) [45,50) [50,64)
    return row


def test_packed_row_attends_only_within_its_segments():
    """Changing a token changes logits only at and after it within its own segment (every switch on, looping)."""
    model, row, split = all_on_model(DOC_MASK=1), packed_row(), 16
    starts = segment_starts(row, split) + [row.size(1)]
    assert starts == [0, 9, 25, 41, 45, 50, 64]
    with torch.no_grad():
        base = model.logits(model.hidden(row, LOOPING, split))
        for t in (3, 12, 30, 39, 42, 47, 55):
            changed = row.clone()
            changed[0, t] = 2 + (int(row[0, t]) + 5) % 60
            diff = (model.logits(model.hidden(changed, LOOPING, split)) - base).abs().amax(-1)[0]
            end = min(s for s in starts if s > t)
            assert (diff[:t] == 0).all() and diff[t] > 0
            assert (diff[end:] == 0).all(), f"token {t} leaked past its segment's end {end}"
        assert (model.logits(model.hidden(row, LOOPING)) - base).abs().amax() > 0  # the split does cut attention


def test_packed_row_equals_its_segments_run_alone():
    """Like the record's varlen attention: each segment's logits are those of the segment as a row of its own (RoPE
    sees only position differences). Without smear/bigram, which read the previous token across a cut."""
    model, row = all_on_model(DOC_MASK=1, SMEAR_GATE_ENABLED=0), packed_row()
    starts = segment_starts(row, 16) + [row.size(1)]
    with torch.no_grad():
        packed = model.logits(model.hidden(row, LOOPING, 16))
        for a, b in zip(starts, starts[1:]):
            alone = model.logits(model.hidden(row[:, a:b], LOOPING))
            torch.testing.assert_close(packed[:, a:b], alone, atol=1e-4, rtol=1e-4)


def test_flex_block_mask_cuts_long_documents_like_the_dense_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    row = packed_row()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, 64, 8, generator=g) for h in (4, 2, 2))
    dense, flex = (train_gpt.document_mask(row, flex=f, split=16) for f in (False, True))
    torch.testing.assert_close(train_gpt.attend(q, k, v, flex), train_gpt.attend(q, k, v, dense), atol=1e-5, rtol=1e-5)


def test_training_passes_the_split_and_evaluation_does_not(monkeypatch):
    seen = []
    real = train_gpt.document_mask
    monkeypatch.setattr(train_gpt, "document_mask", lambda idx, flex=None, split=0: seen.append(split) or real(idx, flex, split))
    args = tiny_args(DOC_MASK=1, TRAIN_SEQ_LEN=16, NUM_LOOPS=0)
    model = train_gpt.GPT(args)
    rt = train_gpt.Runtime(0, 1, CPU)
    x = packed_row()
    train_gpt.train_step(model, [(x, x)], train_gpt.build_optimizers(model, args, rt), args, rt, train_gpt.PLAIN)
    model(x, x, per_token=True)
    assert seen == [16, 0]


# ----------------------------------------------------------------------------------------------------------------------
# Determinism, ranks, world size

def test_same_inputs_same_batches_and_reset_starts_over(tmp_path):
    g = golden("loader_packed_1855.json")
    _, env = golden_data(tmp_path, g["inputs"])
    for name in ("shuffled", "packed"):
        args = tiny_args(**env, TRAIN_LOADER=name, DOC_MASK=1)
        make = lambda rank=0, a=args: train_gpt.LOADERS[name](a, train_gpt.Runtime(rank, 2, CPU), 1)
        a, b = make(), make()
        first = [x.tolist() for x, _ in micro_batches(a, 9)]
        assert first == [x.tolist() for x, _ in micro_batches(b, 9)]
        a.reset()
        assert first == [x.tolist() for x, _ in micro_batches(a, 9)]
        assert first != [x.tolist() for x, _ in micro_batches(make(1), 9)]  # ranks read different rows
        # as in the records, SEED does not move the data (the shuffled generator is PCG64(rank))
        assert first == [x.tolist() for x, _ in micro_batches(make(a=tiny_args(**env, TRAIN_LOADER=name, DOC_MASK=1,
                                                                                     SEED=7)), 9)]


def test_shuffled_ranks_read_their_own_shards_without_repeats_until_all_are_used(tmp_path):
    g = golden("loader_shuffled_0409.json")
    tokens, env = golden_data(tmp_path, g["inputs"])
    sizes, L = g["inputs"]["shard_sizes"], g["inputs"]["train_seq_len"]
    bounds = np.cumsum([0] + sizes)
    for rank in range(2):
        loader = train_gpt.ShuffledLoader(tiny_args(**env), train_gpt.Runtime(rank, 2, CPU), 1)
        total = sum(len(s) for s in loader.starts)
        rows = [r for x, _ in micro_batches(loader, total // 4) for r in x.tolist()]
        where = [next(i for i in range(len(tokens)) if tokens[i:i + L].tolist() == r) for r in rows]
        shard = [int(np.searchsorted(bounds, p, side="right")) - 1 for p in where]
        assert set(shard) <= set(range(rank, len(sizes), 2))
        assert len(set(where)) == len(where)  # within one cut of the shards no sequence is read twice
        assert all(p + L + 1 <= bounds[s + 1] for p, s in zip(where, shard))  # never across a shard's end


def test_packed_world_sizes_agree_within_a_shard_and_differ_where_the_record_does(tmp_path):
    """Each micro-step takes the next W spans; 1 rank x 2 accum and 2 ranks x 1 read the same spans until a shard's
    end, where the record checks the fit of W spans per micro-step (golden: world1_accum2 vs world2_accum1)."""
    g = golden("loader_packed_1855.json")["batches"]
    one = [b["start"] for b in g["world1_accum2"][0]]
    two = [b["start"] for pair in zip(*g["world2_accum1"]) for b in pair]
    assert one[:4] == two[:4] and one[4:] != two[4:]  # the third 130-token step does not fit in shard 0 for 2 ranks
    _, env = golden_data(tmp_path, golden("loader_packed_1855.json")["inputs"])
    args = tiny_args(**env, TRAIN_LOADER="packed", DOC_MASK=1)
    single = train_gpt.PackedLoader(args, train_gpt.Runtime(0, 1, CPU), 2)
    ranks = [train_gpt.PackedLoader(args, train_gpt.Runtime(r, 2, CPU), 1) for r in range(2)]
    for _ in range(2):
        assert [x.tolist() for x, _ in single.next_batch()] == [r.next_batch()[0][0].tolist() for r in ranks]


# ----------------------------------------------------------------------------------------------------------------------
# Settings that cannot work: one line, naming the variable

def one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_impossible_settings_are_one_line_errors(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.r_[BOS, np.arange(2, 100)])
    env = dict(DATA_PATH=str(tmp_path), TRAIN_SEQ_LEN=16)
    rt2 = train_gpt.Runtime(0, 2, CPU)
    with pytest.raises(train_gpt.UserError) as e:
        tiny_args(**env, TRAIN_LOADER="packed", DOC_MASK=0)
    one_line(e, "DOC_MASK", "TRAIN_LOADER=packed")
    with pytest.raises(train_gpt.UserError) as e:
        tiny_args(**env, TRAIN_LOADER="sequential")
    one_line(e, "TRAIN_LOADER", "stream, shuffled, packed")
    with pytest.raises(train_gpt.UserError) as e:  # packed rows need not be whole sequences, only an even split
        train_gpt.PackedLoader(tiny_args(**env, TRAIN_BATCH_TOKENS=81, TRAIN_LOADER="packed", DOC_MASK=1), rt2, 2)
    one_line(e, "TRAIN_BATCH_TOKENS=81", "WORLD_SIZE*accum = 4")
    train_gpt.PackedLoader(tiny_args(**env, TRAIN_BATCH_TOKENS=84, TRAIN_LOADER="packed", DOC_MASK=1, GPTQ=0), rt2, 2)
    with pytest.raises(train_gpt.UserError) as e:  # GPTQ calibrates on whole shuffled sequences, as the record
        train_gpt.PackedLoader(tiny_args(**env, TRAIN_BATCH_TOKENS=84, TRAIN_LOADER="packed", DOC_MASK=1, GPTQ=1), rt2, 2)
    one_line(e, "TRAIN_BATCH_TOKENS=84", "WORLD_SIZE*accum*TRAIN_SEQ_LEN = 64")
    packed = dict(env, TRAIN_LOADER="packed", DOC_MASK=1, GPTQ=0)
    train_gpt.PackedLoader(tiny_args(**packed, TRAIN_BATCH_TOKENS=96), rt2, 1).next_batch()  # 2 x 49 <= 99 tokens
    with pytest.raises(train_gpt.UserError) as e:  # 2 ranks x (50+1) tokens > 99 tokens from the first BOS
        train_gpt.PackedLoader(tiny_args(**packed, TRAIN_BATCH_TOKENS=100), rt2, 1).next_batch()
    one_line(e, "TRAIN_LOADER=packed", "2 x 51 tokens", "TRAIN_BATCH_TOKENS")
    for rank in (0, 1):  # one shard, two ranks: none for rank 1 (also GPTQ's calibration), seen by both ranks alike
        rt = train_gpt.Runtime(rank, 2, CPU)
        with pytest.raises(train_gpt.UserError) as e:
            train_gpt.PackedLoader(tiny_args(**dict(packed, GPTQ=1), TRAIN_BATCH_TOKENS=64), rt, 1)
        one_line(e, "TRAIN_LOADER=shuffled", "GPTQ calibration", "no train shard 1, 1+2, ... of 1")
    with pytest.raises(train_gpt.UserError) as e:
        train_gpt.ShuffledLoader(tiny_args(**dict(env, TRAIN_SEQ_LEN=128), TRAIN_BATCH_TOKENS=1024),
                                 train_gpt.Runtime(0, 1, CPU), 8)
    one_line(e, "TRAIN_LOADER=shuffled", "TRAIN_SEQ_LEN+1 = 129")
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(2, 200))  # no document starts anywhere
    with pytest.raises(train_gpt.UserError) as e:
        train_gpt.PackedLoader(tiny_args(**env, TRAIN_BATCH_TOKENS=32, TRAIN_LOADER="packed", DOC_MASK=1),
                               train_gpt.Runtime(0, 1, CPU), 1).next_batch()
    one_line(e, "first BOS")


# ----------------------------------------------------------------------------------------------------------------------
# Whole runs and the compiled graph

@pytest.mark.parametrize("loader", ["shuffled", "packed"])
def test_a_whole_run_trains_and_calibrates_with_each_loader(markov_data, loader):
    env = tiny_env(**markov_data, TRAIN_LOADER=loader, DOC_MASK=1, ITERATIONS=3, WARMUP_STEPS=1, TRAIN_LOG_EVERY=1,
                   VAL_MAX_TOKENS=256, GPTQ_CALIBRATION_BATCHES=1, TTT_ENABLED=0)
    s = train_gpt.run(train_gpt.Hyperparameters.from_env(env), cpu_runtime())
    assert len(s["train_losses"]) == 3 and all(np.isfinite(loss) for _, loss in s["train_losses"])
    assert s["final"]["tokens"] == 256


def test_the_split_mask_compiles_as_a_full_graph(monkeypatch):
    """The CUDA route: the BlockMask with split is built inside the compiled forward (aot_eager keeps this fast)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import functools
    model, row = all_on_model(DOC_MASK=1), packed_row()
    with torch.no_grad():
        want = model(row, row, ctx=LOOPING, split=16)
        monkeypatch.setattr(train_gpt, "document_mask", functools.partial(train_gpt.document_mask, flex=True))
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
            torch.testing.assert_close(compiled(row, row, ctx=LOOPING, split=16), want, rtol=1e-5, atol=1e-5)
        finally:
            torch._dynamo.reset()


def test_shuffled_skips_shards_too_short_for_a_sequence(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [])
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(2, 12))  # 10 tokens: no sequence of 17
    write_shard(tmp_path / "fineweb_train_000002.bin", np.arange(100, 200))
    args = tiny_args(DATA_PATH=str(tmp_path), TRAIN_SEQ_LEN=16, TRAIN_BATCH_TOKENS=64)
    loader = train_gpt.ShuffledLoader(args, train_gpt.Runtime(0, 1, CPU), 1)
    assert [len(s) for s in loader.starts] == [0, 0, 5]  # (100 - 1 - phase) // 16 sequences
    for x, y in micro_batches(loader, 6):
        assert ((x >= 100) & (x < 200)).all() and torch.equal(x[:, 1:], y[:, :-1])
