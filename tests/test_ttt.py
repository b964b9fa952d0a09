"""Score-first test-time training is legal by construction: every target scored exactly once, no training on a
target before it is scored (the last chunk never trained on), prefix invariance on 1 and 2 ranks, 2 ranks == 1 rank;
per-document scores that sum to the printed totals; TTT helps on text that repeats and leaves the plain eval alone."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import TOKENIZER, cpu_runtime, markov_tokens, scores_on_two_ranks, tiny_args, tiny_env
from data.shards import write_shard
import train_gpt

BOS = train_gpt.BOS_ID


def ones_luts(n):
    return (torch.ones(n, dtype=torch.int64), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))


class Recorder(torch.nn.Module):
    """Reads val = arange, so each input token is its own position. Its 'nats' are the target positions (a sum over
    targets shows which were scored, and how often); one trainable scalar makes SGD steps real. Records the largest
    target position of every training forward (one per SGD step on one rank)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.trained = []

    def forward(self, x, y, ctx=None, per_token=False, hint=None):
        x = x[:, -y.size(1):]  # the targets of the last y.size(1) positions (GPT.forward's contract)
        assert per_token and (y == x + 1).all()
        if torch.is_grad_enabled():
            self.trained.append(int(x.max()))
        return x.double() * (1 + self.w - self.w.detach())


def recorded_ttt(monkeypatch, n, seq, stride, chunk, batch=2, epochs=2):
    """Runs TTT over arange(n + 1); returns the result, the model and the event list in call order:
    ("score", smallest target position of the call) and ("train", largest target position of the step)."""
    events, model = [], Recorder()
    score = train_gpt.score_windows

    def recording_score(m, val_d, luts_d, windows, *a, **kw):
        if len(windows):
            events.append(("score", int(windows[:, 1].min())))
        return score(m, val_d, luts_d, windows, *a, **kw)
    monkeypatch.setattr(train_gpt, "score_windows", recording_score)
    step = train_gpt.ttt_step

    def recording_step(m, params, opt, x, *a, **kw):
        events.append(("train", int(x.max())))
        return step(m, params, opt, x, *a, **kw)
    monkeypatch.setattr(train_gpt, "ttt_step", recording_step)
    args = tiny_args(TRAIN_SEQ_LEN=seq, EVAL_BATCH_SEQS=3, TTT_CHUNK_TOKENS=chunk, TTT_BATCH_SEQS=batch,
                     TTT_EPOCHS=epochs, TTT_LR=0.1)
    r = train_gpt.evaluate_ttt(model, model, torch.arange(n + 1), ones_luts(n + 1), args, cpu_runtime(), stride,
                               lambda msg: None)
    return r, model, events


CASES = [(100, 16, 4, 24), (100, 16, 0, 16), (257, 32, 8, 40), (64, 16, 16, 1000), (50, 16, 5, 7), (17, 16, 3, 5)]


@pytest.mark.parametrize("n,seq,stride,chunk", CASES)
def test_ttt_scores_every_target_exactly_once(monkeypatch, n, seq, stride, chunk):
    r, _, _ = recorded_ttt(monkeypatch, n, seq, stride, chunk)
    assert (r["tokens"], r["bytes"]) == (n, n)
    assert r["val_loss"] * n == pytest.approx(n * (n - 1) / 2, rel=1e-12)  # sum of positions: each once
    plain = train_gpt.evaluate(Recorder(), torch.arange(n + 1), ones_luts(n + 1), tiny_args(TRAIN_SEQ_LEN=seq),
                               cpu_runtime(), stride)
    assert (plain["tokens"], plain["bytes"], plain["stride"]) == (r["tokens"], r["bytes"], r["stride"])


@pytest.mark.parametrize("seed", range(8))
def test_exactly_once_over_random_sizes(monkeypatch, seed):
    """Random stream length, window, stride, chunk and batch: the plain eval and TTT each score every target once."""
    rng = np.random.default_rng(seed)
    seq = int(rng.integers(4, 40))
    n, stride, chunk = int(rng.integers(1, 200)), int(rng.integers(0, seq + 1)), int(rng.integers(1, 90))
    r, _, _ = recorded_ttt(monkeypatch, n, seq, stride, chunk, batch=int(rng.integers(1, 6)))
    args = tiny_args(TRAIN_SEQ_LEN=seq, EVAL_BATCH_SEQS=int(rng.integers(1, 6)))
    plain = train_gpt.evaluate(Recorder(), torch.arange(n + 1), ones_luts(n + 1), args, cpu_runtime(), stride)
    for out in (r, plain):
        assert (out["tokens"], out["bytes"]) == (n, n), (n, seq, stride, chunk)
        assert out["val_loss"] * n == pytest.approx(n * (n - 1) / 2, rel=1e-12)


@pytest.mark.parametrize("n,seq,stride,chunk", CASES)
def test_no_target_is_trained_on_before_it_is_scored(monkeypatch, n, seq, stride, chunk):
    r, model, events = recorded_ttt(monkeypatch, n, seq, stride, chunk)
    assert [e[1] for e in events if e[0] == "train"] == model.trained  # one forward per step, as recorded
    for i, (kind, pos) in enumerate(events):
        if kind == "train":  # every position trained on is below every position scored afterwards
            later = [p for k, p in events[i:] if k == "score"]
            assert all(pos < p for p in later), (i, pos, later)
    # and training is not vacuous: every chunk but the last is trained on, right up to the last chunk's first target
    chunks = train_gpt.ttt_chunks(train_gpt.sliding_windows(n, seq, stride), chunk)
    last_lo = int(chunks[-1][0, 1])
    trained = [p for k, p in events if k == "train"]
    assert len(chunks) == r["chunks"]
    if len(chunks) > 1:
        assert max(trained) == last_lo - 1
    else:
        assert not trained


def test_the_check_fails_when_training_runs_ahead(monkeypatch):
    """The instrumentation catches a leak: train on a chunk before scoring it and the order check fails."""
    monkeypatch.setattr(train_gpt, "ttt_chunks", lambda w, c: [w[: len(w) // 2], w[len(w) // 2:]])
    orig = train_gpt.ttt_train
    monkeypatch.setattr(train_gpt, "ttt_train", lambda m, p, o, v, lo, hi, a, rt: orig(m, p, o, v, lo, v.numel() - 1, a, rt))
    _, _, events = recorded_ttt(monkeypatch, 100, 16, 4, 24)
    trained = [p for k, p in events if k == "train"]
    scored_after = [p for k, p in events[events.index(("train", trained[0])):] if k == "score"]
    assert max(trained) >= min(scored_after)


def test_document_ids():
    val = torch.tensor([BOS, 5, 6, BOS, 7, BOS, 8, 9])
    docs, starts = train_gpt.document_ids(val)
    assert docs.tolist() == [0, 0, 0, 1, 1, 2, 2]  # target val[t+1] belongs to val[t]'s document: a BOS ends one
    assert starts.tolist() == [0, 3, 5]
    docs, starts = train_gpt.document_ids(torch.tensor([5, 6, BOS, 7, BOS]))  # text before the first BOS: doc 0
    assert docs.tolist() == [0, 0, 1, 1] and starts.tolist() == [0, 2]


# ---- a real tiny model: prefix invariance, 1 rank vs 2 ranks

SEQ, STRIDE, CHUNK = 16, 8, 48


def random_docs(rng, count, vocab=1024):
    return [np.concatenate(([BOS], rng.integers(4, vocab, size=int(rng.integers(20, 60))))) for _ in range(count)]


def two_streams(k=4):
    """Streams identical in their first k documents, different afterwards (and at least as long)."""
    rng = np.random.default_rng(0)
    shared, tail_a, tail_b = random_docs(rng, k), random_docs(rng, 4), random_docs(rng, 4)
    return [torch.from_numpy(np.concatenate(shared + tail).astype(np.int64)) for tail in (tail_a, tail_b)]


def ttt_args(**kw):
    return tiny_args(TRAIN_SEQ_LEN=SEQ, EVAL_BATCH_SEQS=3, TTT_CHUNK_TOKENS=CHUNK, TTT_BATCH_SEQS=4, TTT_EPOCHS=2,
                     TTT_LR=0.05, **kw)


def noisy_model(args):
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def doc_scores(model, val, rt, ttt: bool) -> torch.Tensor:
    """Per-document [nats, targets, bytes] of the plain eval or of TTT on a copy of the model."""
    args, luts = ttt_args(), ones_luts(1024)
    docs = train_gpt.document_ids(val)[0]
    if not ttt:
        return train_gpt.evaluate(model, val, luts, args, rt, STRIDE, docs=docs)["docs"]
    m = copy.deepcopy(model)
    return train_gpt.evaluate_ttt(m, m, val, luts, args, rt, STRIDE, lambda msg: None, docs=docs)["docs"]


def all_scores(model, rt) -> dict:
    return {(s, ttt): doc_scores(model, val, rt, ttt) for s, val in enumerate(two_streams()) for ttt in (False, True)}


def safe_docs(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading documents end before the first chunk that reads a differing token."""
    p = int(torch.nonzero(a[:min(len(a), len(b))] != b[:min(len(a), len(b))])[0])
    chunks = train_gpt.ttt_chunks(train_gpt.sliding_windows(len(a) - 1, SEQ, STRIDE), CHUNK)
    cut = next(int(c[0, 1]) for c in chunks if int(c[:, 2].max()) >= p)  # a window reads val[start .. hi]
    docs, starts = train_gpt.document_ids(a)
    ends = torch.cat((starts[1:], torch.tensor([len(a) - 1])))  # doc d's targets: starts[d] .. ends[d] - 1
    return int((ends <= cut).sum())


def check_prefix_invariance(scores):
    a, b = two_streams()
    k = safe_docs(a, b)
    assert 2 <= k < 4  # some documents are protected, and not all the shared ones (the check has teeth)
    for ttt in (False, True):
        assert torch.equal(scores[0, ttt][:k], scores[1, ttt][:k])
        assert not torch.equal(scores[0, ttt][k:k + 4, 0], scores[1, ttt][k:k + 4, 0])
    assert not torch.allclose(scores[0, True][1:, 0], scores[0, False][1:, 0])  # TTT did change later documents


def test_prefix_invariance_one_rank():
    check_prefix_invariance(all_scores(noisy_model(ttt_args()), cpu_runtime()))


def ttt_scores(rt):
    return all_scores(noisy_model(ttt_args()), rt)


def test_two_ranks_prefix_invariance_and_match_one_rank(tmp_path):
    """On 2 gloo ranks each chunk's windows and each SGD batch are split; gradients are summed so both ranks apply
    the update of the whole batch. Prefix invariance holds exactly; the scores equal 1 rank's up to summation order."""
    two = scores_on_two_ranks(tmp_path, ttt_scores)
    check_prefix_invariance(two)
    one = all_scores(noisy_model(ttt_args()), cpu_runtime())
    for key in one:
        assert torch.equal(one[key][:, 1:], two[key][:, 1:])  # the same targets and bytes per document
        torch.testing.assert_close(two[key][:, 0], one[key][:, 0], rtol=1e-6, atol=1e-6)


def test_warmup_uses_random_tokens_and_restores_the_weights():
    args = ttt_args()
    model = noisy_model(args)
    before = copy.deepcopy(model.state_dict())
    seen = []
    hook = model.register_forward_pre_hook(lambda m, inp, kwargs: seen.append(inp[0].clone()), with_kwargs=True)
    train_gpt.ttt_warmup(model, model, args, cpu_runtime(), STRIDE, 3, SEQ)
    hook.remove()
    assert len(seen) == 3  # two scoring calls (a batch with the stream's first window, one without), one SGD step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- whole runs: TTT on repeating text, the plain eval untouched, per-document files

@pytest.fixture(scope="module")
def repeat_runs(tmp_path_factory):
    """A tiny model trained on a Markov source, scored on one unseen 300-token passage of that source repeated as 4
    documents; the same run with TTT off and on (default TTT settings, smaller chunks for the small stream)."""
    if not TOKENIZER.exists():
        pytest.skip(f"challenge tokenizer not found at {TOKENIZER}")
    tmp = tmp_path_factory.mktemp("repeat")
    tokens = markov_tokens(40300, seed=1)
    train, passage = tokens[:40000].copy(), tokens[40000:]
    train[::200] = BOS
    write_shard(tmp / "fineweb_train_000000.bin", train)
    val = np.concatenate([np.concatenate(([BOS], passage)) for _ in range(4)]).astype(np.uint16)
    write_shard(tmp / "fineweb_val_000000.bin", val)
    runs = {}
    lora = dict(TTT_MODE="lora", TTT_CHUNK_SIZE=16, TTT_LORA_RANK=8, TTT_LORA_LR=1e-3, PHASED_TTT_PREFIX_DOCS=3,
                PHASED_TTT_NUM_PHASES=3, GLOBAL_TTT_LR=0.005, GLOBAL_TTT_EPOCHS=3,  # a phase after each of docs 0-2
                TTT_LORA_ALPHA=0, TTT_WEIGHT_DECAY=0.5, TTT_K_LORA=1)  # scale 1: the LR above is for it
    for run_id, ttt, extra in (("ttt0", 0, {}), ("ttt1", 1, {}), ("ttt1_tight", 1, dict(EVAL_BUDGET_SECONDS="1e-6")),
                               ("lora", 1, lora)):
        env = tiny_env(DATA_PATH=tmp, TOKENIZER_PATH=TOKENIZER, LOG_DIR=tmp / "logs", ITERATIONS=30, EVAL_STRIDE=16,
                       TTT_ENABLED=ttt, SAVE_DOC_SCORES=1, TTT_CHUNK_TOKENS=256, RUN_ID=run_id, TRAIN_LOG_EVERY=0,
                       NGRAM_TILT_ENABLED=0, **extra)  # the tilt alone would learn the repeats
        summary = train_gpt.run(train_gpt.Hyperparameters.from_env(env), cpu_runtime())
        log = (tmp / "logs" / f"{run_id}.txt").read_text()
        sub = json.loads((tmp / "logs" / f"{run_id}.submission.json").read_text())
        runs[run_id] = dict(summary=summary, log=log, sub=sub, docs=(tmp / "logs" / f"{run_id}.docs.tsv").read_text())
    return val, runs


def line(log, prefix) -> dict:
    found = [l for l in log.splitlines() if l.startswith(prefix)]
    assert len(found) == 1, (prefix, found)
    return dict(kv.split(":", 1) for kv in found[0].split()[1:])


def plain_prefix(run) -> str:
    """The plain final line's name for the run's export (e.g. final_int6_constriction_roundtrip_exact)."""
    return f"final_{train_gpt.artifact_label(train_gpt.Hyperparameters(**run['summary']['config']))}_roundtrip_exact"


def read_docs(text) -> tuple[list[str], np.ndarray]:
    rows = [r.split("\t") for r in text.strip().splitlines()]
    return rows[0], np.array(rows[1:], dtype=np.float64)


def test_ttt_improves_on_repeating_text_and_leaves_the_plain_eval_alone(repeat_runs):
    val, runs = repeat_runs
    passage = val[1:301]
    assert all((val[301 * i + 1:301 * (i + 1)] == passage).all() for i in range(4))  # the text really repeats
    off, on = runs["ttt0"], runs["ttt1"]
    plain_off = line(off["log"], plain_prefix(off))
    plain_on = line(on["log"], plain_prefix(on))
    plain_off.pop("eval_time"), plain_on.pop("eval_time")
    assert plain_off == plain_on  # the plain eval is the same with TTT on
    assert "final_ttt_exact" not in off["log"]
    ttt = line(on["log"], "final_ttt_exact")
    assert (ttt["scored_tokens"], ttt["scored_bytes"], ttt["stride"]) == \
        (plain_on["scored_tokens"], plain_on["scored_bytes"], plain_on["stride"])
    gain = float(plain_on["val_bpb"]) - float(ttt["val_bpb"])
    assert gain > 0.01, gain  # measured: 0.0173 bpb (0.568 -> 0.550)
    header, rows = read_docs(on["docs"])
    assert header[-2:] == ["nats_plain", "nats_ttt"]
    per_token = rows[:, 5] / rows[:, 2]
    assert (np.diff(per_token) < 0).all()  # each repeat is predicted better than the one before
    plain = rows[:, 4] / rows[:, 2]
    gains = plain - per_token  # nats per token; measured: about 0.00, 0.02, 0.04, 0.05
    assert gains[-1] > gains[0] + 0.03 and gains[-1] > 0.03  # the gain comes from the repeats


def test_submission_reports_the_ttt_score_with_the_plain_one_beside_it(repeat_runs):
    _, runs = repeat_runs
    on, off = runs["ttt1"], runs["ttt0"]
    assert on["sub"]["ttt"] and on["sub"]["val_bpb"] == on["summary"]["ttt"]["val_bpb"]
    assert on["sub"]["val_bpb_no_ttt"] == on["summary"]["final"]["val_bpb"] == off["sub"]["val_bpb"]
    assert not off["sub"]["ttt"] and off["sub"]["val_bpb"] == off["sub"]["val_bpb_no_ttt"]
    assert not on["sub"]["eval_over_budget"] and not on["summary"]["ttt"]["over_budget"]


def test_doc_scores_sum_to_the_printed_totals(repeat_runs):
    val, runs = repeat_runs
    for run_id, column in (("ttt0", ["nats_plain"]), ("ttt1", ["nats_plain", "nats_ttt"])):
        r = runs[run_id]
        header, rows = read_docs(r["docs"])
        assert header == ["doc", "first_pos", "targets", "bytes"] + column
        assert rows[:, 0].tolist() == list(range(4)) and rows[:, 1].tolist() == [0, 301, 602, 903]
        for name, key, prefix in (("nats_plain", "final", plain_prefix(r)),
                                  ("nats_ttt", "ttt", "final_ttt_exact")):
            if name not in header:
                continue
            printed, exact = line(r["log"], prefix), r["summary"][key]
            assert int(rows[:, 2].sum()) == int(printed["scored_tokens"]) == exact["tokens"] == len(val) - 1
            assert int(rows[:, 3].sum()) == int(printed["scored_bytes"]) == exact["bytes"]
            nats = math.fsum(rows[:, header.index(name)])
            assert nats / exact["tokens"] == pytest.approx(exact["val_loss"], rel=1e-12)
            assert round(nats / exact["tokens"], 8) == float(printed["val_loss"])


def test_over_budget_projection_is_loud_and_marked(repeat_runs):
    _, runs = repeat_runs
    tight = runs["ttt1_tight"]
    assert "WARNING: TTT_ENABLED=1 is projected to take" in tight["log"]
    assert "OVER BUDGET" in tight["log"]
    assert tight["summary"]["ttt"]["over_budget"] and tight["sub"]["eval_over_budget"]
    proj = line(tight["log"], "ttt_projection:")
    assert proj["chunks"] == f"4/{tight['summary']['ttt']['chunks']}"
    assert "WARNING" not in runs["ttt1"]["log"]


def test_ttt_leaves_the_plain_eval_model_alone_and_presets_choose_it():
    args = ttt_args(TTT_ENABLED=1)
    model = noisy_model(args)
    before = copy.deepcopy(model.state_dict())
    val = two_streams()[0]
    lines = []
    r = train_gpt.final_ttt(args, cpu_runtime(), model, val, ones_luts(1024), None, 0.0, lines.append)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # TTT trained a copy
    assert r["chunks"] > 1 and any(l.startswith("final_ttt_exact ") for l in lines)
    assert train_gpt.Hyperparameters.from_env({}).ttt_enabled  # the default stack: on
    for preset in ("seed162", "baseline"):  # their records had no TTT
        assert not train_gpt.Hyperparameters.from_env({"PRESET": preset}).ttt_enabled


# ---- a whole run: repeating text, the plain eval untouched, per-document sums

def test_lora_ttt_run_improves_on_repeats_and_sums_match(repeat_runs):
    val, runs = repeat_runs
    lora, plain_run = runs["lora"], runs["ttt0"]
    plain_off, plain_on = line(plain_run["log"], plain_prefix(plain_run)), line(lora["log"], plain_prefix(lora))
    plain_off.pop("eval_time"), plain_on.pop("eval_time")
    assert plain_off == plain_on  # the plain eval is the same with LoRA TTT on
    ttt = line(lora["log"], "final_ttt_exact")
    assert (ttt["scored_tokens"], ttt["scored_bytes"]) == (plain_on["scored_tokens"], plain_on["scored_bytes"])
    assert "mode:lora" in lora["log"] and lora["log"].count("ttt_phase: ") == 3
    header, rows = read_docs(lora["docs"])
    assert header[-2:] == ["nats_plain", "nats_ttt"]
    assert int(rows[:, 2].sum()) == int(ttt["scored_tokens"]) and int(rows[:, 3].sum()) == int(ttt["scored_bytes"])
    assert round(rows[:, 5].sum() / rows[:, 2].sum(), 8) == float(ttt["val_loss"])
    # nats per target, per document. Measured: -0.008, 0.005, 0.018, 0.027. Document 0 has only its own adapters,
    # which cost this tiny model a little (scoring each document alone, without the previous one as context, costs
    # 0.0003-0.005 with TTT_LORA_LR=0 and no phases); each later repeat follows one more phase over the copies before.
    gains = rows[:, 4] / rows[:, 2] - rows[:, 5] / rows[:, 2]
    assert (np.diff(gains) > 0.005).all() and gains[3] > 0.02, gains
    assert float(plain_on["val_bpb"]) - float(ttt["val_bpb"]) > 0.004  # measured: 0.5678 -> 0.5609
    assert lora["sub"]["ttt"] and lora["sub"]["val_bpb"] == lora["summary"]["ttt"]["val_bpb"]
