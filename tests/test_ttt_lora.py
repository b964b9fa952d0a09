"""Phased LoRA TTT (TTT_MODE=lora) is legal by construction: every target scored exactly once (the plain eval's targets
and bytes, per document); each document's adapters train only on the chunk of that document just scored; the whole
model trains only on documents already scored; prefix invariance on 1 and 2 ranks, 2 ranks == 1 rank; within a phase
a document's score depends on its own tokens only; TTT helps on text that repeats and leaves the plain eval alone."""
import copy

import numpy as np
import pytest
import torch

from conftest import HOST_READS, cpu_runtime, record_host_reads, scores_on_two_ranks, tiny_args
from test_ttt import noisy_model, ones_luts, random_docs
import train_gpt

SEQ = 16


def lora_args(**kw):
    base = dict(TRAIN_SEQ_LEN=SEQ, EVAL_BATCH_SEQS=3, TTT_MODE="lora", TTT_CHUNK_SIZE=5, TTT_BATCH_SIZE=3,
                TTT_LORA_RANK=4, TTT_LORA_LR=0.01, PHASED_TTT_PREFIX_DOCS=4, PHASED_TTT_NUM_PHASES=2,
                GLOBAL_TTT_LR=0.02, GLOBAL_TTT_CHUNK_TOKENS=64, GLOBAL_TTT_BATCH_SEQS=4, TTT_LORA_ALPHA=0)
    return tiny_args(**dict(base, **kw))


def varied_luts(n=1024):
    """Byte counts that differ by token and a leading-space rule that depends on the previous token, so per-document
    bytes are a real check."""
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, 5, (n,), generator=g), torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.2)


def stream(docs) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(docs).astype(np.int64))


def streams():
    """a and b share their first 4 documents; c differs from a in document 0 only."""
    rng = np.random.default_rng(0)
    shared, tail_a, tail_b, other0 = random_docs(rng, 4), random_docs(rng, 4), random_docs(rng, 4), random_docs(rng, 1)
    return dict(a=stream(shared + tail_a), b=stream(shared + tail_b), c=stream(other0 + shared[1:] + tail_a))


def lora_scores(model, val, args, rt, luts=None) -> torch.Tensor:
    luts = ones_luts(1024) if luts is None else luts
    m = copy.deepcopy(model)
    return train_gpt.evaluate_ttt_lora(m, val, luts, args, rt, lambda msg: None,
                                       docs=train_gpt.document_ids(val)[0])["docs"]


# ---- exactly once, with the plain eval's targets and bytes per document

@pytest.mark.parametrize("chunk,window,batch,prefix,phases", [(5, 16, 3, 4, 2), (1, 16, 1, 0, 1), (16, 16, 8, 100, 3),
                                                              (7, 9, 2, 3, 3), (3, 32, 4, 1, 1)])
def test_every_target_scored_exactly_once(monkeypatch, chunk, window, batch, prefix, phases):
    args = lora_args(TTT_CHUNK_SIZE=chunk, TTT_EVAL_SEQ_LEN=window, TTT_BATCH_SIZE=batch,
                     PHASED_TTT_PREFIX_DOCS=prefix, PHASED_TTT_NUM_PHASES=phases)
    val = torch.cat((torch.tensor([7, 8, 9]), streams()["a"]))  # text before the first BOS is document 0
    seen = torch.zeros(val.numel() - 1, dtype=torch.long)
    step = train_gpt.lora_step

    def counting(base, head, opt, val_d, luts_d, idx, lo, hi, *a):
        scored = idx[(idx >= lo[:, None]) & (idx < hi[:, None])]
        seen.index_add_(0, scored, torch.ones_like(scored))
        return step(base, head, opt, val_d, luts_d, idx, lo, hi, *a)
    monkeypatch.setattr(train_gpt, "lora_step", counting)
    model, luts = noisy_model(args), varied_luts()
    docs = train_gpt.document_ids(val)[0]
    r = train_gpt.evaluate_ttt_lora(copy.deepcopy(model), val, luts, args, cpu_runtime(), lambda m: None, docs=docs)
    assert (seen == 1).all()
    plain = train_gpt.evaluate(model, val, luts, args, cpu_runtime(), SEQ, docs=docs)
    assert (r["tokens"], r["bytes"]) == (plain["tokens"], plain["bytes"]) == (val.numel() - 1, plain["bytes"])
    assert torch.equal(r["docs"][:, 1:], plain["docs"][:, 1:])  # the same targets and bytes in every document
    assert r["stride"] == chunk


# ---- score before update: per-document adapters and the phases' global SGD

def recorded(monkeypatch, args, val, leak=False):
    """Events in call order: ("score", doc, positions) for each row of a scoring call, ("adapt", doc, positions) for
    the positions each row's adapter step trains on, ("global", None, positions) for each global SGD phase."""
    events, step, sgd = [], train_gpt.lora_step, train_gpt.global_sgd

    def recording_step(base, head, opt, val_d, luts_d, idx, lo, hi, train, rows, rt, sums, *more):
        scored = (idx >= lo[:, None]) & (idx < hi[:, None])
        for i, d in enumerate(rows.tolist()):
            events.append(("score", d, set(idx[i][scored[i]].tolist())))
        for i in [] if train is None else torch.nonzero(train).flatten().tolist():  # None: no row trains
            events.append(("adapt", int(rows[i]), set(idx[i][scored[i]].tolist())))
        return step(base, head, opt, val_d, luts_d, idx, lo, hi, train, rows, rt, sums, *more)

    def recording_sgd(base, params, val_d, hi, args, rt):
        hi = val_d.numel() - 1 if leak else hi  # the leak: train on the whole stream, later documents included
        events.append(("global", None, set(range(hi))))
        return sgd(base, params, val_d, hi, args, rt)
    monkeypatch.setattr(train_gpt, "lora_step", recording_step)
    monkeypatch.setattr(train_gpt, "global_sgd", recording_sgd)
    train_gpt.evaluate_ttt_lora(noisy_model(args), val, ones_luts(1024), args, cpu_runtime(), lambda m: None)
    return events


def violations(events) -> list:
    """Trained positions that a later scoring call scores: an adapter step against later scores of its document,
    a global step against any later score."""
    bad = []
    for i, (kind, doc, trained) in enumerate(events):
        for kind2, doc2, scored in events[i + 1:]:
            if kind2 == "score" and (kind == "global" or doc2 == doc) and trained & scored:
                bad.append((i, kind, doc, sorted(trained & scored)[:3]))
    return bad


def test_no_position_is_trained_on_before_it_is_scored(monkeypatch):
    val = streams()["a"]
    events = recorded(monkeypatch, lora_args(), val)
    assert violations(events) == []
    # each adapter step trains on exactly the chunk of its document that was just scored, and not on its last chunk
    for i, (kind, doc, pos) in enumerate(events):
        if kind == "adapt":
            last_score = next(e for e in reversed(events[:i]) if e[0] == "score" and e[1] == doc)
            assert pos == last_score[2]
    spans = train_gpt.document_ids(val)[1].tolist() + [val.numel() - 1]
    last_chunks = {d: max(p for k, dd, ps in events if k == "score" and dd == d for p in ps) for d in range(8)}
    assert all(last_chunks[d] == spans[d + 1] - 1 for d in range(8))
    assert not any(k == "adapt" and last_chunks[d] in ps for k, d, ps in events)
    # not vacuous: adapters trained in every document with more than one chunk; two global phases, on docs 0-1, 0-3
    assert {d for k, d, _ in events if k == "adapt"} == set(range(8))
    assert [max(ps) + 1 for k, _, ps in events if k == "global"] == [spans[2], spans[4]]


def test_the_check_fails_when_a_phase_trains_ahead(monkeypatch):
    assert violations(recorded(monkeypatch, lora_args(), streams()["a"], leak=True))


def test_phase_groups():
    groups = lambda n, prefix, phases: train_gpt.phase_groups(n, lora_args(PHASED_TTT_PREFIX_DOCS=prefix,
                                                                           PHASED_TTT_NUM_PHASES=phases))
    assert groups(10, 4, 2) == [(0, 2), (2, 4), (4, 10)]
    assert groups(10, 0, 3) == [(0, 10)]  # no prefix: pure per-document LoRA
    assert groups(10, 5, 3) == [(0, 1), (1, 3), (3, 5), (5, 10)]
    assert groups(3, 2000, 3) == [(0, 3)]  # bounds come from the prefix alone (666, ...): no phase inside 3 docs
    assert groups(4, 2, 4) == [(0, 1), (1, 2), (2, 4)]  # empty groups dropped


# ---- prefix invariance, document independence, 1 rank vs 2 ranks

def all_scores(rt) -> dict:
    args = lora_args()
    model = noisy_model(args)
    out = {}
    for name, val in streams().items():
        out[name, True] = lora_scores(model, val, args, rt)
        out[name, False] = train_gpt.evaluate(model, val, ones_luts(1024), args, rt, 8,
                                              docs=train_gpt.document_ids(val)[0])["docs"]
    return out


def check_prefix_invariance(scores):
    for ttt in (False, True):  # a and b share documents 0-3: identical scores; the rest differ
        assert torch.equal(scores["a", ttt][:4], scores["b", ttt][:4])
        assert not torch.equal(scores["a", ttt][4:, 0], scores["b", ttt][4:, 0])
    assert not torch.allclose(scores["a", True][:, 0], scores["a", False][:, 0])  # TTT changed the scores
    # c differs from a in document 0 only. Document 1 shares its phase: adapted on its own tokens only, its score
    # stays (up to float noise from the batch it rides in); documents 2-3 come after a global phase that trained on
    # document 0, so theirs move.
    torch.testing.assert_close(scores["c", True][1], scores["a", True][1], rtol=1e-6, atol=1e-6)
    assert (scores["c", True][2:4, 0] - scores["a", True][2:4, 0]).abs().min() > 1e-4


def test_prefix_invariance_one_rank():
    check_prefix_invariance(all_scores(cpu_runtime()))


def test_two_ranks_prefix_invariance_and_match_one_rank(tmp_path):
    """On 2 gloo ranks each phase's batches of documents are dealt out and the global SGD batches split, gradients
    summed; prefix invariance holds exactly and the scores equal 1 rank's up to summation order."""
    two = scores_on_two_ranks(tmp_path, all_scores)
    check_prefix_invariance(two)
    one = all_scores(cpu_runtime())
    for key in one:
        assert torch.equal(one[key][:, 1:], two[key][:, 1:])
        torch.testing.assert_close(two[key][:, 0], one[key][:, 0], rtol=2e-5, atol=1e-5)  # all-reduce order: rounding


# ---- adapters and configuration

def test_adapters_start_at_zero_and_reach_every_target_module():
    args = lora_args(TTT_K_LORA=0)
    model = noisy_model(args)
    adapters = train_gpt.DocAdapters(model, args)
    assert adapters.names == ["blocks.0.attn.c_q", "blocks.0.attn.c_v", "blocks.0.attn", "blocks.0.mlp",
                              "blocks.1.attn.c_q", "blocks.1.attn.c_v", "blocks.1.attn", "blocks.1.mlp", "head"]
    x = streams()["a"][:SEQ + 1]
    xb, yb = x[None, :-1].repeat(3, 1), x[None, 1:].repeat(3, 1)
    ctx = train_gpt.Ctx(looping=model.final_ctx.looping)
    with torch.no_grad():
        plain = model(xb, yb, per_token=True)
        with adapters.attached(model) as head:  # B = 0: the adapted model is the model
            assert torch.equal(train_gpt.lora_nats(model, head, xb, yb, ctx), plain)
            for lora in adapters.loras:
                lora.B.normal_()
            moved = train_gpt.lora_nats(model, head, xb, yb, ctx)
        assert torch.equal(model(xb, yb, per_token=True), plain)  # hooks removed on exit
    assert not torch.allclose(moved, plain)
    for lora in adapters.loras:  # every row starts from the same A, drawn from SEED
        assert torch.equal(lora.A[0], lora.A[2]) and lora.scale == 1.0
    assert train_gpt.DocAdapters(model, lora_args(TTT_LORA_ALPHA=8)).loras[0].scale == 2.0


def test_rows_are_independent_documents():
    """Row i's nats depend only on row i's tokens and adapter: changing row 0's tokens and adapter leaves row 1."""
    args = lora_args()
    model = noisy_model(args)
    adapters = train_gpt.DocAdapters(model, args)
    val = streams()["a"]
    x, y = torch.stack((val[:SEQ], val[20:20 + SEQ], val[40:40 + SEQ])), torch.stack((val[1:SEQ + 1], val[21:21 + SEQ], val[41:41 + SEQ]))
    ctx = train_gpt.Ctx(looping=model.final_ctx.looping)
    with torch.no_grad(), adapters.attached(model) as head:
        for lora in adapters.loras:
            lora.B.normal_()
        before = train_gpt.lora_nats(model, head, x, y, ctx)
        x2 = x.clone()
        x2[0] = torch.flip(x2[0], (0,))
        for lora in adapters.loras:
            lora.B[0].normal_()
        after = train_gpt.lora_nats(model, head, x2, y, ctx)
    torch.testing.assert_close(after[1:], before[1:], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after[0], before[0])


def test_config_checks():
    with pytest.raises(train_gpt.UserError, match="TTT_CHUNK_SIZE=64: must be <= the TTT context .16."):
        lora_args(TTT_CHUNK_SIZE=64, TTT_ENABLED=1)
    with pytest.raises(train_gpt.UserError, match="TTT_MODE='adam': must be one of sgd, lora"):
        lora_args(TTT_MODE="adam")
    with pytest.raises(train_gpt.UserError, match="unknown environment variable GLOBAL_TTT_LRR"):
        train_gpt.Hyperparameters.from_env({"GLOBAL_TTT_LRR": "1"})
    with pytest.raises(train_gpt.UserError, match=r"unknown environment variable PHASED_TTT_ENABLED \(upstream's switch "
                       r"for phased LoRA TTT: here TTT_MODE=lora turns it on"):
        train_gpt.Hyperparameters.from_env({"PHASED_TTT_ENABLED": "1"})
    assert train_gpt.Hyperparameters.from_env({}).ttt_mode == "lora"  # the default stack's (#2135's)
    assert train_gpt.Hyperparameters.from_env({"PRESET": "record0409"}).ttt_mode == "sgd"


def test_over_budget_projection_is_loud_and_marked():
    """The projection comes after this rank's first 4 batches of documents; past EVAL_BUDGET_SECONDS it warns with
    the LoRA knobs to turn, and the result is marked."""
    lines = []
    for budget, warned in (("1e-6", True), ("600", False)):
        args = lora_args(TTT_BATCH_SIZE=1, EVAL_BUDGET_SECONDS=budget)
        lines.clear()
        r = train_gpt.evaluate_ttt_lora(noisy_model(args), streams()["a"], ones_luts(1024), args, cpu_runtime(),
                                        lines.append)
        proj = [l for l in lines if l.startswith("ttt_projection: work:")]
        assert len(proj) == 1 and r["over_budget"] == warned and r["chunks"] == 8
        warning = [l for l in lines if l.startswith("WARNING: TTT_ENABLED=1 is projected")]
        assert len(warning) == warned
        if warned:
            assert "lower PHASED_TTT_PREFIX_DOCS or GLOBAL_TTT_EPOCHS, raise TTT_CHUNK_SIZE" in warning[0]
        # one document per batch, groups 0-1 | 2-3 | 4-7: the 4th batch is document 3, after the first phase
        phases = [i for i, l in enumerate(lines) if l.startswith("ttt_phase:")]
        assert phases[0] < lines.index(proj[0]) < phases[1]


def test_lora_delta_by_hand_and_causality_with_adapters_on():
    """delta(x_i) = (alpha/rank) x_i A_i^T B_i^T, row by row, written out with explicit sums; and with every adapter
    moved off zero, changing the token at position t leaves the nats of every earlier target unchanged."""
    g = torch.Generator().manual_seed(5)
    a0 = torch.randn(3, 4, generator=g)
    lora = train_gpt.LoRA(2, 4, 5, 3, 1.5, a0)
    with torch.no_grad():
        lora.B.copy_(torch.randn(2, 5, 3, generator=g))
    x = torch.randn(2, 6, 4, generator=g)
    by_hand = torch.zeros(2, 6, 5)
    for i in range(2):
        for t in range(6):
            for o in range(5):
                by_hand[i, t, o] = 1.5 * sum(float(x[i, t] @ a0[r]) * float(lora.B.detach()[i, o, r]) for r in range(3))
    torch.testing.assert_close(lora(x).detach(), by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora(x[:1]).detach(), by_hand[:1], rtol=1e-5, atol=1e-5)  # the first m rows

    args = lora_args()
    model = noisy_model(args)
    adapters = train_gpt.DocAdapters(model, args)
    val = streams()["a"]
    x, y = val[None, :SEQ].clone(), val[None, 1:SEQ + 1]
    ctx = train_gpt.Ctx(looping=model.final_ctx.looping)
    with torch.no_grad(), adapters.attached(model) as head:
        for a in adapters.loras:
            a.B.normal_()
        before = train_gpt.lora_nats(model, head, x, y, ctx)
        for t in (3, 9, SEQ - 1):
            x2 = x.clone()
            x2[0, t] = (x2[0, t] + 7) % 1024
            after = train_gpt.lora_nats(model, head, x2, y, ctx)
            assert torch.equal(after[0, :t], before[0, :t]) and not torch.equal(after[0, t:], before[0, t:])


# ---- exactly once over document-length mixes (a short last document beside longer ones once scored its padding)

def mixed_docs(rng, lengths) -> torch.Tensor:
    return stream([np.concatenate(([train_gpt.BOS_ID], rng.integers(4, 1024, size=n))) for n in lengths])


@pytest.mark.parametrize("short", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_exactly_once_for_every_document_length_mix(monkeypatch, seed, short):
    """Random document lengths (0 to 40 tokens after the BOS, the last one often shorter than the window), random
    chunk, window and batch sizes, and with `short` random short-document chunks (TTT_SHORT_SCORE_FIRST_STEPS, or
    TTT_SHORT_DOC_LEN / TTT_SHORT_CHUNK_SIZE): every target is scored exactly once, every document gets exactly the
    plain eval's targets and bytes, and the stream's last target is scored once."""
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(0, 40, size=int(rng.integers(2, 9)))]
    lengths[-1] = int(rng.integers(0, 6))  # a short last document, batched with longer ones
    val = mixed_docs(rng, lengths)
    chunk, window, batch = int(rng.integers(1, 12)), int(rng.integers(8, 33)), int(rng.integers(1, 6))
    env = dict(TTT_CHUNK_SIZE=chunk, TTT_EVAL_SEQ_LEN=window, TTT_BATCH_SIZE=batch,
               PHASED_TTT_PREFIX_DOCS=int(rng.integers(0, 4)), PHASED_TTT_NUM_PHASES=1)
    if short:  # drawn after the rest: the same streams and sizes as without
        steps = ",".join(f"{int(rng.integers(2, 45))}:{int(rng.integers(1, min(window, 12) + 1))}"
                         for _ in range(int(rng.integers(0, 4))))
        env.update(TTT_SHORT_SCORE_FIRST_ENABLED=1, TTT_SHORT_SCORE_FIRST_STEPS=steps,
                   TTT_SHORT_DOC_LEN=int(rng.integers(1, 45)), TTT_SHORT_CHUNK_SIZE=int(rng.integers(0, window + 1)))
    args = lora_args(**env)
    seen, step = torch.zeros(val.numel() - 1, dtype=torch.long), train_gpt.lora_step

    def counting(base, head, opt, val_d, luts_d, idx, lo, hi, *a):
        scored = idx[(idx >= lo[:, None]) & (idx < hi[:, None])]
        seen.index_add_(0, scored, torch.ones_like(scored))
        return step(base, head, opt, val_d, luts_d, idx, lo, hi, *a)
    monkeypatch.setattr(train_gpt, "lora_step", counting)
    model, luts = noisy_model(args), varied_luts()
    docs = train_gpt.document_ids(val)[0]
    r = train_gpt.evaluate_ttt_lora(copy.deepcopy(model), val, luts, args, cpu_runtime(), lambda m: None, docs=docs)
    plain = train_gpt.evaluate(model, val, luts, args, cpu_runtime(), SEQ, docs=docs)
    assert (seen == 1).all(), (lengths, env)
    assert r["tokens"] == plain["tokens"] == val.numel() - 1, (lengths, env)
    assert torch.equal(r["docs"][:, 1:], plain["docs"][:, 1:]), (lengths, env)


def test_lora_rows_attend_causally_and_score_as_the_document_mask_would():
    """A LoRA TTT row is one document's window (from its start or later) padded on the right with what follows, so
    lora_nats runs plain causal attention (split -1: no document mask, hence no eager flex_attention on CUDA). Every
    position before the next document's BOS scores as under the document mask; the padding after it does not."""
    args = lora_args(DOC_MASK=1)
    model = noisy_model(args)
    assert model.args.doc_mask
    val = streams()["a"]
    bos = torch.nonzero(val == train_gpt.BOS_ID)[:, 0]
    start, nxt = int(bos[1]), int(bos[2])  # document 1, with document 2's first tokens as padding
    x = val[start:nxt + 6][None]
    ctx = train_gpt.Ctx(looping=model.final_ctx.looping)
    with torch.no_grad():
        causal, masked = model.hidden(x, ctx, -1), model.hidden(x, ctx)
    n = nxt - start
    torch.testing.assert_close(causal[:, :n], masked[:, :n], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(causal[:, n:], masked[:, n:], rtol=1e-3, atol=1e-3)
    calls = []
    real = train_gpt.document_mask
    try:
        train_gpt.document_mask = lambda *a, **k: calls.append(1) or real(*a, **k)
        adapters = train_gpt.DocAdapters(model, args)
        with torch.no_grad(), adapters.attached(model) as head:
            train_gpt.lora_nats(model, head, x, val[start + 1:nxt + 7][None], ctx)
    finally:
        train_gpt.document_mask = real
    assert not calls


# ---- compiled (COMPILE=1, the CUDA default): every graph built before the clock, the eager scores

@pytest.mark.parametrize("env", [dict(), dict(TTT_CHUNK_SIZE=1, TTT_BATCH_SIZE=1, PHASED_TTT_NUM_PHASES=1),
                                 dict(NGRAM_TILT_ENABLED=1, TOKEN_ORDER=4, TTT_SHORT_SCORE_FIRST_ENABLED=1,
                                      TTT_SHORT_SCORE_FIRST_STEPS="8:2,16:4", TTT_BATCH_SIZE=4)])
def test_compiled_lora_ttt_compiles_only_before_the_clock_and_scores_as_eager(monkeypatch, env):
    """COMPILE=1 compiles lora_nats with dynamic shapes while priming on random tokens (here dynamo with its eager
    backend: the tracing, guards and graphs inductor gets, in seconds). The eval itself then compiles nothing (a
    recompile is an error: rows of 1 and windows of 1 position included), breaks no graph, and gives every document
    the eager path's nats exactly."""
    real, state = torch.compile, {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **dict(kw, backend="eager")))
    phased = train_gpt.phased_lora

    def strict(*a, **k):  # the eval proper, after priming
        state["primed"] = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            return phased(*a, **k)
    monkeypatch.setattr(train_gpt, "phased_lora", strict)
    from torch._dynamo.utils import counters
    val = mixed_docs(np.random.default_rng(1), [30, 3, 12, 0, 25, 7, 1, 40, 2])
    luts, docs = varied_luts(), train_gpt.document_ids(val)[0]
    args = lora_args(**env)
    model, lines = noisy_model(args), []
    eager = train_gpt.evaluate_ttt_lora(copy.deepcopy(model), val, luts, args, cpu_runtime(), lines.append, docs=docs)
    torch._dynamo.reset()
    counters.clear()
    compiled = train_gpt.evaluate_ttt_lora(copy.deepcopy(model), val, luts, lora_args(COMPILE=1, **env),
                                           cpu_runtime(), lines.append, docs=docs)
    assert state["primed"] == counters["stats"]["unique_graphs"] == (1 if args.ttt_batch_size == 1 else 2)
    assert not counters["graph_break"]
    assert sum(line.startswith("ttt_lora_compile: ") for line in lines) == 1
    assert torch.equal(compiled["docs"], eager["docs"]) and compiled["val_loss"] == eager["val_loss"]


def test_the_global_sgd_trains_the_model_without_the_adapters(monkeypatch):
    """The adapters stay hooked in for the whole eval (so a compiled lora_nats keeps its graphs) but act only while
    scoring: in each global SGD phase the model gives exactly the nats of its own weights without the hooks."""
    args = lora_args(PHASED_TTT_PREFIX_DOCS=6, PHASED_TTT_NUM_PHASES=2)
    sgd, seen = train_gpt.global_sgd, []

    def checking(base, params, val_d, hi, a, rt):
        x, y = val_d[None, :SEQ], val_d[None, 1:SEQ + 1]
        bare = train_gpt.GPT(args)
        bare.load_state_dict(base.state_dict())
        hooks = [h for m in base.modules() for h in m._forward_hooks.values()]
        with torch.no_grad():
            seen.append((len(hooks), torch.equal(base(x, y, per_token=True), bare(x, y, per_token=True))))
        return sgd(base, params, val_d, hi, a, rt)
    monkeypatch.setattr(train_gpt, "global_sgd", checking)
    lora_scores(noisy_model(args), streams()["a"], args, cpu_runtime())
    assert seen == [(8, True), (8, True)]


def test_a_chunk_never_waits_on_the_device(monkeypatch):
    """On CUDA a read back from the device (.item(), .tolist(), bool(), float(), int(), .cpu(), .nonzero(), boolean
    mask indexing) or a blocking host-to-device copy stalls the host until every queued kernel has run, so the GPU
    idles while the next chunk is launched. A chunk's device work (lora_step) reads nothing back, and a batch
    (lora_batch, whose index math runs on host tensors) makes no blocking copy. Exempt: CPU AdamW reads its step
    counters on the host (_get_value), as CUDA's does."""
    calls, state = [], {"lora_step": False, "lora_batch": False}
    record_host_reads(monkeypatch, lambda: state["lora_step"], calls, HOST_READS + ("nonzero",))
    getitem, to = torch.Tensor.__getitem__, torch.Tensor.to

    def masked(self, key):
        if state["lora_step"] and any(isinstance(k, torch.Tensor) and k.dtype == torch.bool
                                      for k in (key if isinstance(key, tuple) else (key,))):
            calls.append("boolean mask indexing")
        return getitem(self, key)

    def copy(self, *a, **k):
        if state["lora_batch"] and any(isinstance(v, (torch.device, str)) for v in (*a, k.get("device"))) \
                and not k.get("non_blocking"):
            calls.append("blocking copy to the device")
        return to(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "__getitem__", masked)
    monkeypatch.setattr(torch.Tensor, "to", copy)
    ran = []
    for name in list(state):
        def flagged(*a, real=getattr(train_gpt, name), name=name, **k):
            state[name] = True
            ran.append(name)
            try:
                return real(*a, **k)
            finally:
                state[name] = False
        monkeypatch.setattr(train_gpt, name, flagged)
    args = lora_args(TTT_SHORT_SCORE_FIRST_ENABLED=1, TTT_SHORT_SCORE_FIRST_STEPS="8:2", NGRAM_TILT_ENABLED=1,
                     TOKEN_ORDER=4)
    val = mixed_docs(np.random.default_rng(2), [30, 3, 12, 0, 25, 7])
    train_gpt.evaluate_ttt_lora(noisy_model(args), val, varied_luts(), args, cpu_runtime(), lambda m: None)
    assert ran.count("lora_batch") >= 2 and ran.count("lora_step") > ran.count("lora_batch") and calls == []
