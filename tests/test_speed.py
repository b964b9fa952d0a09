"""Speed by construction (issue 18), checked on CPU: each change leaves the numbers as they were. The bf16 residual
stream is CUDA's alone; evaluation computes logits only where a window scores; every eval graph is compiled while
priming; GPTQ's reserve is measured; bench/gpu_check.py runs end to end at tiny shapes."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_runtime, tiny_args
import train_gpt


def tokens(args, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(args.vocab_size, (rows, args.train_seq_len), generator=g)
    x[:, ::7] = train_gpt.BOS_ID
    return x, torch.randint(args.vocab_size, x.shape, generator=g)


def embed_before(self, idx, ctx):
    """GPT.embed as it was before the residual stream had a dtype of its own."""
    x = self.tok_emb(idx)
    if self.bigram is not None:
        x = x + self.bigram(idx, ctx)
    if self.smear is not None and self.args.smear_pre_norm:
        x = self.smear(x, idx)
    x = F.rms_norm(x, (x.size(-1),))
    return x if self.smear is None or self.args.smear_pre_norm else self.smear(x, idx)


def trained_like(args, seed=0):
    """A model whose zero-initialised pieces (projections, gates, bigram) are random too, so every path matters."""
    torch.manual_seed(seed)
    base, _ = train_gpt.build_model(args, cpu_runtime())
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base


@pytest.mark.parametrize("looping", [False, True])
def test_cpu_residual_stream_is_float32_and_bit_identical(monkeypatch, looping):
    args = tiny_args(SMEAR_GATE_ENABLED=1, SPARSE_ATTN_GATE_ENABLED=1, MTP_HEADS=1, MTP_WEIGHT=0.3)
    assert cpu_runtime().act_dtype == torch.float32
    base = trained_like(args)
    assert base.act_dtype == torch.float32
    x, y = tokens(args)
    ctx = train_gpt.Ctx(looping=looping)
    now = base(x, y, ctx=ctx), base(x, y, ctx=ctx, per_token=True)
    monkeypatch.setattr(train_gpt.GPT, "embed", embed_before)
    before = base(x, y, ctx=ctx), base(x, y, ctx=ctx, per_token=True)
    assert all(torch.equal(a, b) for a, b in zip(now, before))


def test_bf16_residual_stream_stays_bf16_and_near_float32():
    """What CUDA gets (act_dtype bf16, here without autocast, so everything runs in bf16): the embedding output and
    every lane of every block output are bf16, the logits float32 (soft-capped in float32), and the loss is close to
    the float32 one."""
    args = tiny_args(SMEAR_GATE_ENABLED=1)
    base = trained_like(args)
    x, y = tokens(args)
    fp32 = base(x, y, per_token=True)
    base.act_dtype = torch.bfloat16
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, out: seen.extend(t.dtype for t in out)) for b in base.blocks]
    bf16 = base(x, y, per_token=True)
    for h in hooks:
        h.remove()
    assert base.embed(x, train_gpt.PLAIN).dtype == torch.bfloat16
    assert len(seen) >= len(base.blocks) and set(seen) == {torch.bfloat16}
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert float(bf16.detach().mean()) == pytest.approx(float(fp32.detach().mean()), rel=2e-2)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: logits only where a window scores, no boolean indexing; the same numbers as before

def score_windows_before(model, val_d, luts_d, windows, batch_seqs, rt, ctx, sums, docs_d=None, stride=0, hints=None):
    """score_windows and add_scores as they were: logits for all L positions, scored targets picked by a mask."""
    assert hints is None  # the implementation before the tilt: these tests run with NGRAM_TILT_ENABLED=0
    pos = torch.arange(int(windows[0, 2] - windows[0, 0]) if len(windows) else 0, device=rt.device)
    for batch in windows.to(rt.device).split(batch_seqs):
        pad = batch_seqs - batch.size(0)
        if pad:
            batch = torch.cat((batch, batch[-1:].repeat(pad, 1) * torch.tensor([1, 0, 0], device=rt.device)))
        idx = batch[:, :1] + pos
        x, y = val_d[idx], val_d[idx + 1]
        with torch.no_grad(), rt.autocast():
            nll = model(x, y, ctx=ctx, per_token=True).double()
        scored = (idx >= batch[:, 1:2]) & (idx < batch[:, 2:3])
        rows = docs_d[idx] if docs_d is not None else torch.zeros_like(idx)
        nll, nbytes = nll.detach().double()[scored], train_gpt.target_bytes(x, y, luts_d, idx)[scored].double()
        sums.index_add_(0, rows[scored], torch.stack((nll, torch.ones_like(nll), nbytes), 1))


def eval_inputs(n=300, seed=3):
    g = torch.Generator().manual_seed(seed)
    val = torch.randint(4, 1024, (n + 1,), generator=g)
    val[torch.randint(n, (12,), generator=g)] = train_gpt.BOS_ID
    luts = (torch.randint(1, 5, (1024,), generator=g), torch.rand(1024, generator=g) < 0.3,
            torch.rand(1024, generator=g) < 0.1)
    return val, luts


@pytest.mark.parametrize("stride,batch", [(0, 3), (8, 4), (5, 3), (32, 2), (1, 64)])
@pytest.mark.parametrize("docs", [False, True])
def test_eval_scores_as_before(monkeypatch, stride, batch, docs):
    """The plain eval (non-overlapping and sliding windows, batches padded or not, per document or not) gives the
    numbers the previous implementation gave, to the last bit."""
    args = tiny_args(EVAL_BATCH_SEQS=batch, VAL_BATCH_SIZE=32 * batch, EVAL_STRIDE=stride, NGRAM_TILT_ENABLED=0)
    model, (val, luts) = trained_like(args), eval_inputs()
    doc_ids = train_gpt.document_ids(val)[0] if docs else None
    now = train_gpt.evaluate(model, val, luts, args, cpu_runtime(), stride, docs=doc_ids)
    monkeypatch.setattr(train_gpt, "score_windows", score_windows_before)
    before = train_gpt.evaluate(model, val, luts, args, cpu_runtime(), stride, docs=doc_ids)
    for k in ("val_loss", "val_bpb", "tokens", "bytes"):
        assert now[k] == before[k], k
    if docs:
        assert torch.equal(now["docs"], before["docs"])


def test_ttt_scores_as_before(monkeypatch):
    args = tiny_args(EVAL_BATCH_SEQS=4, TTT_CHUNK_TOKENS=64, TTT_BATCH_SEQS=2, TTT_EPOCHS=1, TTT_LR=0.05,
                     NGRAM_TILT_ENABLED=0)
    val, luts = eval_inputs()
    results = []
    for score in (train_gpt.score_windows, score_windows_before):
        monkeypatch.setattr(train_gpt, "score_windows", score)
        model = trained_like(args)
        results.append(train_gpt.evaluate_ttt(model, model, val, luts, args, cpu_runtime(), 8, lambda m: None))
    assert [r["val_loss"] for r in results[:1]] == [r["val_loss"] for r in results[1:]]
    assert results[0]["tokens"] == results[1]["tokens"] == 300


def test_sliding_windows_get_logits_only_where_they_score(monkeypatch):
    """With stride s < L the head runs on the last s positions of every batch but the one holding the stream's first
    window (all L): the logits hold s rows per window, not L."""
    args = tiny_args(EVAL_BATCH_SEQS=4, EVAL_STRIDE=8)
    model, (val, luts) = trained_like(args), eval_inputs()
    rows, logits = [], train_gpt.GPT.logits
    monkeypatch.setattr(train_gpt.GPT, "logits", lambda self, h, *a, **k: rows.append(h.shape[:2]) or logits(self, h, *a, **k))
    train_gpt.evaluate(model, val, luts, args, cpu_runtime(), 8)
    assert rows[0] == (4, 32) and set(rows[1:]) == {(4, 8)} and len(rows) == math.ceil((1 + (300 - 32) / 8) / 4)


# ----------------------------------------------------------------------------------------------------------------------
# Whole runs: nothing compiles on a clock; GPTQ's reserve is measured before it

def test_every_graph_is_compiled_while_priming(markov_data, monkeypatch):
    """Under torch.compile (a counting backend), a run compiles every graph before its training clock starts: the
    training steps, mid-run validation in each context, the pre-quant eval, the final evals (non-overlapping and
    sliding, on the fresh model rebuilt from the artifact) and score-first TTT all reuse graphs compiled while
    priming."""
    import functools
    from conftest import tiny_env
    graphs, at_clock = [], []

    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    real_train = train_gpt.train
    monkeypatch.setattr(train_gpt, "train", lambda *a, **k: at_clock.append(len(graphs)) or real_train(*a, **k))
    env = tiny_env(**markov_data, COMPILE=1, ITERATIONS=4, WARMUP_STEPS=2, ENABLE_LOOPING_AT=0.5, VAL_LOSS_EVERY=2,
                   EVAL_STRIDE=8, VAL_MAX_TOKENS=200, TTT_ENABLED=1, TTT_CHUNK_TOKENS=64, TTT_BATCH_SEQS=2,
                   TTT_EPOCHS=1, TRAIN_LOG_EVERY=0)
    s = train_gpt.run(train_gpt.Hyperparameters.from_env(env), cpu_runtime())
    assert s["final"]["stride"] == 8 and "ttt" in s and s["steps"] == 4
    assert at_clock[0] > 0 and len(graphs) == at_clock[0]


def test_gptq_reserve_is_measured_before_the_clock_and_leaves_no_trace(markov_data, monkeypatch):
    """GPTQ_RESERVE_SECONDS=-1 (the default): a calibration batch is timed (after an untimed one) before the clock;
    GPTQ_CALIBRATION_BATCHES x that x the margin comes off the training cap and is what the calibration line
    compares with; training reads the same batches as with a fixed reserve (the loader is rewound). A reserve that
    leaves no training time is a one-line error."""
    import re
    from conftest import tiny_env
    caps = []
    real_train = train_gpt.train
    monkeypatch.setattr(train_gpt, "train", lambda args, *a: caps.append(args.max_wallclock_seconds) or real_train(args, *a))

    def run(**kw):
        env = tiny_env(**markov_data, **dict(dict(ITERATIONS=3, TRAIN_LOG_EVERY=1, VAL_MAX_TOKENS=128,
                                                  GPTQ_CALIBRATION_BATCHES=4, MAX_WALLCLOCK_SECONDS=300), **kw))
        return train_gpt.run(train_gpt.Hyperparameters.from_env(env), cpu_runtime())
    measured, fixed = run(RUN_ID="measured"), run(RUN_ID="fixed", GPTQ_RESERVE_SECONDS=5)
    log = open(f"{markov_data['LOG_DIR']}/measured.txt").read()
    reserve, batch = map(float, re.search(r"gptq_reserve:([\d.]+)s batch:([\d.]+)s", log).groups())
    assert reserve == pytest.approx(train_gpt.GPTQ_RESERVE_MARGIN * 4 * batch, rel=0.01, abs=0.01)
    assert caps == [pytest.approx(300 - measured["config"]["gptq_reserve_seconds"]), 295]
    assert measured["config"]["gptq_reserve_seconds"] == pytest.approx(reserve, abs=0.005)
    assert f"reserve:{measured['config']['gptq_reserve_seconds']:g}s" in log
    assert measured["train_losses"] == fixed["train_losses"]
    with pytest.raises(train_gpt.UserError, match="^GPTQ_RESERVE_SECONDS: measured "):
        run(RUN_ID="short", MAX_WALLCLOCK_SECONDS=1e-6)


def test_the_default_stack_validates_only_at_the_end():
    assert train_gpt.Hyperparameters.from_env({}).val_loss_every == 0
    assert train_gpt.Hyperparameters.from_env({"PRESET": "seed162"}).val_loss_every == 1000


def test_gpu_check_cpu_smoke(tmp_path):
    """bench/gpu_check.py --cpu-smoke runs every stage at tiny shapes (errors raise) and writes its JSON."""
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["env"]["smoke"] and r["attention"]["sdpa_math_gqa"]["rel_err_out_dq_dk_dv"] == [0.0] * 4
    assert {"plain", "looped"} <= r["step"].keys() and r["step"]["looped"]["ms_per_step"] > 0
    assert r["gptq"]["matrices"] == 1 and r["gptq"]["bytes_model"] > 0  # the tied embedding, GPTQ'd, then the export
    assert r["eval"]["plain"]["projected_full_val_8gpu_s"] > 0 and r["eval"]["stride"] == 0
    assert r["eval"]["ttt"]["mode"] == "lora"
    assert r["eval"]["ttt"]["chunks"] >= 8 * 5 and r["eval"]["ttt"]["projected_full_val_8gpu_s"] > 0  # batches
    assert r["kernels"]["ce_plain_compiled"]["rel_err_loss_grad"] == [0.0, 0.0]  # float32 plain == its reference
    assert r["kernels"]["fused_run"] == ("ce_fused_compiled" in r["kernels"])
    assert set(r["flex"]) >= {"attention_score", "attention_train", "model_score", "model_train"}
    assert r["flex"]["model_train"]["rel_err"]["loss"] == 0.0  # on CPU both sides run the dense mask
    assert r["eval"]["ttt"]["prefix_docs"] == 1  # the prefix's share of the full set's documents, at least one
    assert r["eval"]["ttt"]["graphs_after_priming"] == 0  # on the CPU nothing compiles
