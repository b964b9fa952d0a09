"""Progressive training context (TRAIN_SEQ_SCHEDULE, SEQ_CHANGE_WARMUP_STEPS; PR #2014), LoRA TTT's Q/V switches and
local LR (TTT_Q_LORA, TTT_V_LORA, TTT_LOCAL_LR_MULT; PR #1953), short documents' score-first chunks
(TTT_SHORT_*; PR #2014), and evaluation longer than training (PR #1953's 2560, #2014's 3072 at stride 1536): every
number below is worked out by hand in the comments."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from conftest import cpu_runtime, tiny_args
from data.shards import write_shard
from test_ttt import Recorder, noisy_model, ones_luts
from test_ttt_lora import lora_args, mixed_docs, varied_luts
import train_gpt

H, Ctx = train_gpt.Hyperparameters, train_gpt.Ctx
SCHEDULE = "8@0.2,16@0.5,32@1"  # TRAIN_SEQ_LEN=32


def one_line(e, *words):
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ---- the schedule: parsing, lookup, validation

def test_stages_and_the_length_at_each_progress():
    args = tiny_args(TRAIN_SEQ_SCHEDULE=SCHEDULE)
    assert train_gpt.seq_stages(args) == [(0.2, 8), (0.5, 16), (1.0, 32)]
    # LEN while progress <= FRAC: 0.2 is still the first stage, just past it the second
    for p, n in [(0.0, 8), (0.1, 8), (0.2, 8), (0.2000001, 16), (0.5, 16), (0.51, 32), (1.0, 32)]:
        assert train_gpt.seq_len_at(args, p) == n, p
    assert train_gpt.seq_stages(tiny_args()) == [(1.0, 32)]  # no schedule: TRAIN_SEQ_LEN throughout
    assert train_gpt.seq_len_at(tiny_args(), 0.7) == 32
    # a last FRAC below 1: its length holds to the end (upstream appends (1.0, last LEN))
    short = tiny_args(TRAIN_SEQ_SCHEDULE="8@0.3,32@0.6")
    assert [train_gpt.seq_len_at(short, p) for p in (0.3, 0.6, 0.61, 1.0)] == [8, 32, 32, 32]


def test_without_a_cap_each_step_gets_the_stage_of_step_over_iterations():
    # ITERATIONS=10, no cap: progress s/10. 8 while s/10 <= 0.1 (s = 0, 1), 16 while <= 0.2 (s = 2), then 32
    args = tiny_args(TRAIN_SEQ_SCHEDULE="8@0.1,16@0.2,32@1", ITERATIONS=10, MAX_WALLCLOCK_SECONDS=0)
    assert [train_gpt.seq_len_at(args, train_gpt.progress(args, s, 0.0)) for s in range(10)] == [8, 8, 16] + [32] * 7


@pytest.mark.parametrize("schedule,words", [
    ("1024", "LEN@FRAC"), ("16@", "LEN@FRAC"), ("a@0.5,32@1", "LEN@FRAC"), ("16@0.5,,32@1", "LEN@FRAC"),
    ("16@0.5@1", "LEN@FRAC"), ("0@0.5,32@1", "LEN > 0"), ("-8@0.5,32@1", "LEN > 0"),  # non-positive lengths
    ("16@0,32@1", "(0, 1]"), ("16@0.5,32@1.5", "(0, 1]"), ("16@-0.5,32@1", "(0, 1]"), ("16@nan,32@1", "(0, 1]"),
    ("16@0.5,32@0.5", "rising"), ("16@0.7,32@0.3", "rising"),  # fractions must rise
    ("8@0.5,16@1", "the longest = TRAIN_SEQ_LEN"), ("16@0.5,64@1", "the longest = TRAIN_SEQ_LEN")])
def test_bad_schedules_are_one_line_errors(schedule, words):
    with pytest.raises(train_gpt.UserError, match="^TRAIN_SEQ_SCHEDULE=") as e:
        tiny_args(TRAIN_SEQ_SCHEDULE=schedule)
    one_line(e, repr(schedule), words)


def test_a_schedule_longer_than_the_run_is_refused():
    """Every stage must get at least one step of ITERATIONS (whatever the clock, progress is at least
    step / ITERATIONS). ITERATIONS=10: stage i's last step is floor(FRAC_i * 10) (capped at 9)."""
    # 8@0.1: steps 0-1; 16@0.15: floor(1.5) = 1, no step after 1; 32@1: steps 2-9
    with pytest.raises(train_gpt.UserError, match="^TRAIN_SEQ_SCHEDULE=") as e:
        tiny_args(TRAIN_SEQ_SCHEDULE="8@0.1,16@0.15,32@1", ITERATIONS=10)
    one_line(e, "a step of ITERATIONS=10 for each")
    tiny_args(TRAIN_SEQ_SCHEDULE="8@0.1,16@0.2,32@1", ITERATIONS=10)  # step 2 is 16's
    with pytest.raises(train_gpt.UserError, match="ITERATIONS=3"):  # 8: step 0 (0/3); 16@0.3: floor(0.9) = 0
        tiny_args(TRAIN_SEQ_SCHEDULE="8@0.1,16@0.3,32@1", ITERATIONS=3)
    with pytest.raises(train_gpt.UserError, match="ITERATIONS=1"):  # one step: only the first stage runs
        tiny_args(TRAIN_SEQ_SCHEDULE="16@0.5,32@1", ITERATIONS=1)
    with pytest.raises(train_gpt.UserError, match="ITERATIONS=2"):  # steps 0 and 1 (1/2 <= 0.5) are both 16's
        tiny_args(TRAIN_SEQ_SCHEDULE="16@0.5,32@1", ITERATIONS=2)
    tiny_args(TRAIN_SEQ_SCHEDULE="16@0.5,32@1", ITERATIONS=3)  # 16: steps 0, 1 (1/3); 32: step 2 (2/3)


def test_lengths_must_divide_the_micro_batch(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.r_[train_gpt.BOS_ID, np.arange(2, 1000)])
    env = dict(DATA_PATH=str(tmp_path), TRAIN_SEQ_SCHEDULE="24@0.5,32@1")
    # TRAIN_BATCH_TOKENS=1024 over 1 rank x 8 accum: 128 tokens per micro-batch; 24 does not divide 128, i.e. 1024
    # is no multiple of 8 x lcm(24, 32) = 768
    with pytest.raises(train_gpt.UserError, match="^TRAIN_BATCH_TOKENS=1024") as e:
        train_gpt.TrainLoader(tiny_args(**env), cpu_runtime(), 8)
    one_line(e, "must be a multiple of WORLD_SIZE*accum*TRAIN_SEQ_LEN = 768 (lcm of TRAIN_SEQ_SCHEDULE)")
    train_gpt.TrainLoader(tiny_args(**dict(env, TRAIN_SEQ_SCHEDULE="16@0.5,32@1")), cpu_runtime(), 8)
    # a packed row is one row of 128 tokens whatever the length: its documents are cut every 24 tokens
    train_gpt.PackedLoader(tiny_args(**env, TRAIN_LOADER="packed", DOC_MASK=1, GPTQ=0), cpu_runtime(), 8)


@pytest.mark.parametrize("name", ["TRAIN_SEQ_SCHEDULES", "TRAIN_SEQ_SCHEDULE_MODE", "SEQ_CHANGE_WARMUP",
                                  "SEQ_WARMUP_STEPS", "TTT_SHORT_DOC_LENGTH", "TTT_LOCAL_LR", "TTT_QV_LORA"])
def test_misspelled_new_names_are_caught(name):
    with pytest.raises(train_gpt.UserError, match=f"unknown environment variable {name}"):
        H.from_env({name: "1"})


# ---- training at each length, priming every graph

class Spy(torch.nn.Module):
    """Records (input shape, split, whether y is x's successor) of each training forward, then runs the model."""

    def __init__(self, base):
        super().__init__()
        self.base, self.seen = base, []

    def forward(self, x, y, ctx=None, split=0, **kw):
        self.seen.append((tuple(x.shape), split, ctx))
        return self.base(x, y, ctx=ctx, split=split, **kw)


def counting_data(tmp_path, n=6000):
    """A shard whose token t is 2 + t % 1000 except a BOS every 100: every target is its input + 1 off a BOS."""
    tokens = 2 + np.arange(n) % 1000
    tokens[::100] = train_gpt.BOS_ID
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    return dict(DATA_PATH=str(tmp_path))


def test_priming_compiles_every_context_and_length(tmp_path):
    """Looping from 0.35 with lengths 8 to 0.2, 16 to 0.5, 32 after: the run meets (plain, 8), (plain, 16),
    (looped, 16), (looped, 32), in that order; priming runs each once (128-token micro-batches: 16x8, 8x16, 4x32)
    and puts the weights back."""
    args = tiny_args(**counting_data(tmp_path), TRAIN_SEQ_SCHEDULE=SCHEDULE, NUM_LOOPS=1, ENABLE_LOOPING_AT=0.35,
                     WARMUP_STEPS=4, TRAIN_LOADER="stream")
    plain, looped = Ctx(looping=False), Ctx(looping=True)
    assert train_gpt.reachable(args) == [(plain, 8), (plain, 16), (looped, 16), (looped, 32)]
    assert train_gpt.reachable_ctxs(args) == [plain, looped]
    rt = cpu_runtime()
    base = train_gpt.GPT(args)
    spy, before = Spy(base), copy.deepcopy(base.state_dict())
    loader = train_gpt.TrainLoader(args, rt, 8)
    train_gpt.prime_compile(spy, base, train_gpt.build_optimizers(base, args, rt), loader, args, rt, lambda m: None)
    shapes = [(s, split, c) for s, split, c in spy.seen]
    assert sorted(set(shapes), key=shapes.index) == [((16, 8), 8, plain), ((8, 16), 16, plain), ((8, 16), 16, looped),
                                                      ((4, 32), 32, looped)]
    assert len(shapes) == 4 * 8  # 8 micro-batches per step
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    # no schedule: one length, the contexts as before
    assert train_gpt.reachable(tiny_args(NUM_LOOPS=1, ENABLE_LOOPING_AT=0.35)) == [(plain, 32), (looped, 32)]


@pytest.mark.parametrize("loader", ["stream", "shuffled", "packed"])
def test_training_follows_the_schedule_with_every_loader(tmp_path, loader, monkeypatch):
    """ITERATIONS=8, no cap: progress s/8, so 16 for s = 0, 1, 2 (<= 0.25), then 32. Each micro-batch keeps its 128
    tokens: stream and shuffled 8 rows of 16 then 4 of 32, every target its input's successor; packed one row of 128
    whose documents are cut every 16, then every 32. SEQ_CHANGE_WARMUP_STEPS=2 re-warms the LR after the change
    only: scale 1/2 at step 3, 2/2 at step 4 (no warmdown here, so 1 elsewhere)."""
    args = tiny_args(**counting_data(tmp_path), TRAIN_SEQ_SCHEDULE="16@0.25,32@1", SEQ_CHANGE_WARMUP_STEPS=2,
                     ITERATIONS=8, WARMDOWN_FRAC=0, WARMDOWN_ITERS=0, MIN_LR=0, TRAIN_LOADER=loader, DOC_MASK=1,
                     GPTQ=0, NUM_LOOPS=0)
    rt = cpu_runtime()
    base = train_gpt.GPT(args)
    spy, batches, scales, lines = Spy(base), [], [], []
    step, sched = train_gpt.train_step, train_gpt.set_schedule

    def recording_step(model, b, *a):
        batches.append(b)
        return step(model, b, *a)
    monkeypatch.setattr(train_gpt, "train_step", recording_step)
    monkeypatch.setattr(train_gpt, "set_schedule", lambda o, a, s, scale: scales.append(scale) or sched(o, a, s, scale))
    opts = train_gpt.build_optimizers(base, args, rt)
    r = train_gpt.train(args, rt, spy, base, opts, train_gpt.LOADERS[loader](args, rt, 8), None, lines.append)
    assert r["steps"] == 8 and scales == [1, 1, 1, 0.5, 1, 1, 1, 1]
    want = [((8, 16), 16)] * 24 + [((4, 32), 32)] * 40
    if loader == "packed":
        want = [((1, 128), 16)] * 24 + [((1, 128), 32)] * 40
    assert [(s, split) for s, split, _ in spy.seen] == want
    for b in batches:  # what the loaders gave: every target is its input's successor (or a BOS)
        for x, y in b:
            assert ((y == x + 1) | (y == train_gpt.BOS_ID) | (x == train_gpt.BOS_ID) | (x == 1001)).all()
    changes = [l for l in lines if l.startswith("train_seq_len_")]
    assert len(changes) == 2
    assert changes[0].startswith("train_seq_len_16:on step:0 progress:0.000 schedule:16@0.25,32@1 train_time:")
    assert changes[1].startswith("train_seq_len_32:on step:3 progress:0.375 schedule:16@0.25,32@1 train_time:")
    assert [e["name"] for e in r["events"]] == ["train_seq_len_16", "train_seq_len_32"]


def test_train_step_cuts_stream_rows_and_keeps_packed_rows():
    args = tiny_args(DOC_MASK=1, NUM_LOOPS=0, TRAIN_LOADER="stream")
    base = train_gpt.GPT(args)
    spy = Spy(base)
    opt = train_gpt.build_optimizers(base, args, cpu_runtime())
    x = torch.arange(2, 130).view(4, 32)  # a stream micro-batch: 4 rows of TRAIN_SEQ_LEN
    train_gpt.train_step(spy, [(x, x + 1)], opt, args, cpu_runtime(), train_gpt.PLAIN, 8)
    train_gpt.train_step(spy, [(x, x + 1)], opt, args, cpu_runtime(), train_gpt.PLAIN)  # 0 = TRAIN_SEQ_LEN
    packed = dataclasses.replace(args, train_loader="packed")
    train_gpt.train_step(spy, [(x.view(1, 128), x.view(1, 128) + 1)], opt, packed, cpu_runtime(), train_gpt.PLAIN, 8)
    assert [(s, split) for s, split, _ in spy.seen] == [((16, 8), 8), ((4, 32), 32), ((1, 128), 8)]


# ---- LoRA TTT: Q/V switches, the local LR multiplier

def test_q_and_v_adapters_can_be_turned_off():
    model = noisy_model(lora_args())
    names = lambda **kw: train_gpt.DocAdapters(model, lora_args(**{"TTT_K_LORA": 1, **kw})).names[:5]
    assert names() == ["blocks.0.attn.c_q", "blocks.0.attn.c_v", "blocks.0.attn.c_k", "blocks.0.attn", "blocks.0.mlp"]
    # PR #1953 / #2014: no Q, no V; K, the attention output, the MLP and the head keep theirs
    assert names(TTT_Q_LORA=0, TTT_V_LORA=0) == ["blocks.0.attn.c_k", "blocks.0.attn", "blocks.0.mlp",
                                                 "blocks.1.attn.c_k", "blocks.1.attn"]
    assert names(TTT_Q_LORA=0) == ["blocks.0.attn.c_v", "blocks.0.attn.c_k", "blocks.0.attn", "blocks.0.mlp",
                                   "blocks.1.attn.c_v"]
    assert train_gpt.DocAdapters(model, lora_args(TTT_Q_LORA=0, TTT_V_LORA=0, TTT_K_LORA=0, TTT_O_LORA=0,
                                                  TTT_MLP_LORA=0)).names == ["head"]


def scores(args, val, luts=None):
    return train_gpt.evaluate_ttt_lora(noisy_model(args), val, luts or ones_luts(1024), args, cpu_runtime(),
                                       lambda m: None, docs=train_gpt.document_ids(val)[0])["docs"]


def test_local_lr_mult_multiplies_the_adapters_lr():
    """The adapters' AdamW LR is TTT_LORA_LR x TTT_LOCAL_LR_MULT: 0.02 x 0.5 = 0.01 exactly (a power of two), so the
    scores are identical; a multiplier of 0 freezes the adapters (B stays 0), the same as TTT_LORA_LR=0."""
    val = mixed_docs(np.random.default_rng(1), [30, 12, 25])
    base = dict(PHASED_TTT_PREFIX_DOCS=0)
    half = scores(lora_args(**base, TTT_LORA_LR=0.02, TTT_LOCAL_LR_MULT=0.5), val)
    assert torch.equal(half, scores(lora_args(**base, TTT_LORA_LR=0.01), val))
    assert not torch.equal(half, scores(lora_args(**base, TTT_LORA_LR=0.02), val))
    assert torch.equal(scores(lora_args(**base, TTT_LOCAL_LR_MULT=0), val), scores(lora_args(**base, TTT_LORA_LR=0), val))


# ---- short documents' score-first chunks

def test_chunk_sizes_by_hand():
    n = torch.tensor([0, 254, 255, 256, 1998, 1999, 2000, 5000])  # targets; upstream's length is n + 1
    sizes = lambda **kw: train_gpt.chunk_sizes(lora_args(TTT_EVAL_SEQ_LEN=64, TTT_CHUNK_SIZE=48, **kw), n).tolist()
    on = dict(TTT_SHORT_SCORE_FIRST_ENABLED=1)
    # PR #2014's run: n + 1 <= 256 -> 8, <= 2000 -> 24, else TTT_CHUNK_SIZE (48)
    assert sizes(**on, TTT_SHORT_SCORE_FIRST_STEPS="256:8,2000:24") == [8, 8, 8, 24, 24, 24, 48, 48]
    assert sizes(**on, TTT_SHORT_SCORE_FIRST_STEPS="2000:24,256:8") == [8, 8, 8, 24, 24, 24, 48, 48]  # sorted
    assert sizes(TTT_SHORT_SCORE_FIRST_STEPS="256:8,2000:24") == [48] * 8  # off unless enabled
    # no steps: TTT_SHORT_CHUNK_SIZE below TTT_SHORT_DOC_LEN (default 512), 0 = TTT_CHUNK_SIZE (upstream's default)
    assert sizes(**on, TTT_SHORT_DOC_LEN=2000, TTT_SHORT_CHUNK_SIZE=24) == [24] * 6 + [48, 48]
    assert sizes(**on, TTT_SHORT_CHUNK_SIZE=16) == [16] * 3 + [16, 48, 48, 48, 48]
    assert sizes(**on) == [48] * 8


@pytest.mark.parametrize("env,words", [
    (dict(TTT_SHORT_SCORE_FIRST_STEPS="256-8"), ["TTT_SHORT_SCORE_FIRST_STEPS='256-8'", "LEN:CHUNK"]),
    (dict(TTT_SHORT_SCORE_FIRST_STEPS="256:8,"), ["LEN:CHUNK"]),
    (dict(TTT_SHORT_SCORE_FIRST_STEPS="0:8"), ["LEN > 0, CHUNK > 0"]),
    (dict(TTT_SHORT_SCORE_FIRST_STEPS="256:0"), ["LEN > 0, CHUNK > 0"]),
    (dict(TTT_SHORT_SCORE_FIRST_STEPS="256:17"), ["TTT_CHUNK_SIZE=5", "TTT context (16)", "TTT_SHORT_* chunks"]),
    (dict(TTT_SHORT_CHUNK_SIZE=17), ["TTT context (16)"]), (dict(TTT_SHORT_DOC_LEN=0), ["TTT_SHORT_DOC_LEN=0"])])
def test_bad_short_chunk_settings_are_one_line_errors(env, words):
    with pytest.raises(train_gpt.UserError) as e:
        lora_args(TTT_ENABLED=1, TTT_SHORT_SCORE_FIRST_ENABLED=1, **env)
    one_line(e, *words)


def chunks_scored(monkeypatch, args, val):
    """(document, lo, hi) of every scored chunk, in call order."""
    seen, step = [], train_gpt.lora_step

    def recording(base, head, opt, val_d, luts_d, idx, lo, hi, train, rows, *a):
        seen.extend(zip(rows.tolist(), lo.tolist(), hi.tolist()))
        return step(base, head, opt, val_d, luts_d, idx, lo, hi, train, rows, *a)
    monkeypatch.setattr(train_gpt, "lora_step", recording)
    scores(args, val)
    return seen


def test_short_documents_are_scored_in_their_own_chunks(monkeypatch):
    """Documents of 5, 12 and 29 targets (upstream's lengths 6, 13, 30: the closing BOS counted; the stream's last
    document has none), steps 8:2,16:4, chunk 5: 6 <= 8 -> chunks of 2; 13 <= 16 -> 4; 30 -> 5. The 5-target
    document needs 3 chunks, the 12-target one 3 too, the 29-target one 6: batched together, rows are ordered by
    chunk count, then length (29, 12, 5)."""
    val = mixed_docs(np.random.default_rng(0), [4, 11, 29])  # n tokens after the BOS: n + 1 targets
    args = lora_args(TTT_SHORT_SCORE_FIRST_ENABLED=1, TTT_SHORT_SCORE_FIRST_STEPS="8:2,16:4", TTT_BATCH_SIZE=3,
                     PHASED_TTT_PREFIX_DOCS=0)
    seen = chunks_scored(monkeypatch, args, val)
    by_doc = {d: [(lo, hi) for dd, lo, hi in seen if dd == d] for d in range(3)}
    assert by_doc[0] == [(0, 2), (2, 4), (4, 5)]
    assert by_doc[1] == [(5, 9), (9, 13), (13, 17)]
    assert by_doc[2] == [(17, 22), (22, 27), (27, 32), (32, 37), (37, 42), (42, 46)]
    assert [d for d, _, _ in seen[:3]] == [2, 1, 0]  # chunk 0 of every row, longest chunk count first
    off = chunks_scored(monkeypatch, lora_args(TTT_BATCH_SIZE=3, PHASED_TTT_PREFIX_DOCS=0), val)
    assert len(off) == 6 + 3 + 1  # TTT_CHUNK_SIZE=5 for all: 30 -> 6, 12 -> 3, 5 -> 1


def test_a_documents_score_does_not_depend_on_its_batch():
    """Each document picks its chunk from its own length (upstream: the batch's longest document picks for all), so
    its score is the same alone (TTT_BATCH_SIZE=1) or batched with documents of other chunk sizes. Targets 4, 26,
    15, 16, 10, 31, 6: 15 < 16 takes chunks of 3 (5 chunks), 16 chunks of 5 (4 chunks), so the shorter document has
    more chunks and goes first in its batch. In float64, exactly: in float32 the batch's padding moves the sums by
    rounding, and AdamW's first step (beta1 = 0: lr times the gradient's sign) turns a flipped sign of a gradient
    element that is zero up to rounding into a full step, as in any batched run."""
    val = mixed_docs(np.random.default_rng(2), [3, 25, 14, 15, 9, 30, 6])
    kw = dict(TTT_SHORT_SCORE_FIRST_ENABLED=1, TTT_SHORT_SCORE_FIRST_STEPS="8:2,16:3", PHASED_TTT_PREFIX_DOCS=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the adapters too
    try:
        def scores64(args):
            model = noisy_model(args).double()
            model.act_dtype = torch.float64
            return train_gpt.evaluate_ttt_lora(model, val, ones_luts(1024), args, cpu_runtime(), lambda m: None,
                                               docs=train_gpt.document_ids(val)[0])["docs"]
        alone = scores64(lora_args(**kw, TTT_BATCH_SIZE=1))
        for batch in (3, 7):
            assert torch.equal(scores64(lora_args(**kw, TTT_BATCH_SIZE=batch)), alone), batch
        assert not torch.equal(scores64(lora_args(TTT_BATCH_SIZE=7, PHASED_TTT_PREFIX_DOCS=0))[:, 0], alone[:, 0])
    finally:
        torch.set_default_dtype(default)


# ---- evaluation longer than training (PR #1953: 2560, PR #2014: 3072 at stride 1536, on models trained at 2048)

@pytest.mark.parametrize("eval_len", [20, 24])  # 16 x 1.25 (2560 / 2048) and 16 x 1.5 (3072 / 2048)
def test_long_eval_scores_every_target_once_on_every_path(eval_len):
    """Trained at 16, evaluated at 20 or 24 with stride half the window, DOC_MASK=1 and the n-gram tilt: the plain
    sliding eval, SGD TTT and LoRA TTT (context TTT_EVAL_SEQ_LEN = the eval length) each score every target once,
    with per-document targets and bytes equal to the non-overlapping eval at the training length."""
    rng = np.random.default_rng(4)
    val = mixed_docs(rng, [int(n) for n in rng.integers(0, 70, size=7)])
    env = dict(TRAIN_SEQ_LEN=16, EVAL_SEQ_LEN=eval_len, EVAL_STRIDE=eval_len // 2, TTT_EVAL_SEQ_LEN=eval_len,
               DOC_MASK=1, NGRAM_TILT_ENABLED=1, TOKEN_ORDER=3, TTT_CHUNK_TOKENS=40, TTT_BATCH_SEQS=3, TTT_EPOCHS=1,
               TTT_LR=0.05, TTT_SHORT_SCORE_FIRST_ENABLED=1, TTT_SHORT_SCORE_FIRST_STEPS="20:3")
    args, rt, luts = lora_args(**env), cpu_runtime(), varied_luts()
    model, docs = noisy_model(args), train_gpt.document_ids(val)[0]
    assert train_gpt.eval_plan(val, args, rt, args.eval_stride)[1] == eval_len  # the windows are the long ones
    ref = train_gpt.evaluate(model, val, luts, lora_args(TRAIN_SEQ_LEN=16), rt, 0, docs=docs)
    m = copy.deepcopy(model)
    out = dict(plain=train_gpt.evaluate(model, val, luts, args, rt, args.eval_stride, docs=docs),
               sgd=train_gpt.evaluate_ttt(m, m, val, luts, args, rt, args.eval_stride, lambda _: None, docs=docs),
               lora=train_gpt.evaluate_ttt_lora(copy.deepcopy(model), val, luts, args, rt, lambda _: None, docs=docs))
    for name, r in out.items():
        assert r["tokens"] == val.numel() - 1, name
        assert torch.equal(r["docs"][:, 1:], ref["docs"][:, 1:]), name
    assert out["plain"]["stride"] == eval_len // 2


@pytest.mark.parametrize("n", [100, 257, 50])
def test_long_windows_at_half_stride_count_each_position_once(n):
    """A recorder model (nats = target position) over arange: the plain eval and SGD TTT at windows of 24 on a
    16-token training length, stride 12, sum the positions 0 .. n-1 exactly once: n (n - 1) / 2."""
    args = tiny_args(TRAIN_SEQ_LEN=16, EVAL_SEQ_LEN=24, EVAL_STRIDE=12, EVAL_BATCH_SEQS=3, TTT_CHUNK_TOKENS=30,
                     TTT_BATCH_SEQS=2, TTT_EPOCHS=1)
    val, luts, rt = torch.arange(n + 1), ones_luts(n + 1), cpu_runtime()
    m = Recorder()
    for r in (train_gpt.evaluate(Recorder(), val, luts, args, rt, 12),
              train_gpt.evaluate_ttt(m, m, val, luts, args, rt, 12, lambda _: None)):
        assert r["tokens"] == n and r["val_loss"] * n == pytest.approx(n * (n - 1) / 2, rel=1e-12)
