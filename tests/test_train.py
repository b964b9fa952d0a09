"""End-to-end behaviour of a whole run: it learns, it is deterministic, warm-up leaves no trace, 2 ranks equal 1,
and every output file holds what the run measured."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cpu_runtime, record_host_reads, tiny_env, write_markov_data
import train_gpt


def run_inprocess(data, **overrides):
    args = train_gpt.Hyperparameters.from_env(tiny_env(**data, **overrides))
    return train_gpt.run(args, cpu_runtime())


def test_model_learns_well_below_unigram_entropy(markov_data):
    val = train_gpt.load_shard(os.path.join(markov_data["DATA_PATH"], "fineweb_val_000000.bin"), 1024)
    counts = np.bincount(val[1:], minlength=1024).astype(float)
    freq = counts[counts > 0] / counts.sum()
    unigram_nats = float(-(freq * np.log(freq)).sum())  # ~4 nats; the source's own entropy is ln 2 = 0.69
    s = run_inprocess(markov_data, ITERATIONS=80, QAT=0, EMA_DECAY=0, MATRIX_LR=0.04, SCALAR_LR=0.04,
                      TIED_EMBED_LR=0.05, WARMDOWN_FRAC=0.3, TRAIN_LOG_EVERY=0)
    # within 30% of the source's entropy (ln 2), over three times below the unigram entropy (~3.5 nats)
    assert s["pre_quant"]["val_loss"] < 1.3 * math.log(2) < 0.3 * unigram_nats, (s["pre_quant"], unigram_nats)
    assert s["final"]["val_loss"] < 1.3 * math.log(2)
    assert s["final"]["tokens"] == len(val) - 1


def test_same_seed_same_losses_and_warmup_leaves_no_trace(markov_data):
    common = dict(ITERATIONS=6, TRAIN_LOG_EVERY=1, QAT_START_FRAC=0.5, VAL_MAX_TOKENS=256)
    a = run_inprocess(markov_data, **common)
    b = run_inprocess(markov_data, **common)
    primed = run_inprocess(markov_data, WARMUP_STEPS=3, **common)  # primes QAT off and on, then restores
    assert len(a["train_losses"]) == 6
    assert a["train_losses"] == b["train_losses"]
    assert a["train_losses"] == primed["train_losses"]
    assert a["final"]["val_loss"] == primed["final"]["val_loss"]
    other = run_inprocess(markov_data, SEED=7, **common)
    assert other["train_losses"] != a["train_losses"]


def launch(data, tmp_path, nproc, run_id, **overrides):
    env = dict(os.environ, **tiny_env(**data, **overrides), RUN_ID=run_id, OMP_NUM_THREADS="1")
    env["SUBMISSION_JSON"] = str(tmp_path / f"{run_id}_submission.json")
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train_gpt.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(data["LOG_DIR"], f"{run_id}.json")) as f:
        return json.load(f), proc.stdout


def test_two_and_eight_ranks_match_one_rank(tmp_path, tokenizer_path):
    """1 process x 8 accumulation steps, 2 gloo processes x 4 and 8 x 1 see the same global batch; Muon's gradients
    are reduce-scattered to the ranks that own the matrices (with 8, some ranks own no matrix of a shape), which
    split the Newton-Schulz work and all-gather the updates; Adam's are all-reduced; the clipping norm
    (GRAD_CLIP_NORM of the default stack, GRAD_CLIP_LOCAL=0) is the global one; the wall clock is agreed in host
    memory. Losses agree up to float reduction order (8 ranks: ~25 s on 2 cores). The default's local clip differs
    by design (tests/test_optim.py)."""
    # 8 train shards: GPTQ calibration (shuffled sequences) gives each rank shards of its own, as the records do
    markov_data = write_markov_data(tmp_path, tokenizer_path, train_shards=8)
    common = dict(ITERATIONS=4, TRAIN_LOG_EVERY=1, QAT_START_FRAC=0.5, VAL_MAX_TOKENS=512, NORMUON=1, GRAD_CLIP_LOCAL=0)
    one, _ = launch(markov_data, tmp_path, 1, "one", **common)
    l1 = [loss for _, loss in one["train_losses"]]
    assert one["world_size"] == 1 and len(l1) == 4
    for n in (2, 8):
        many, _ = launch(markov_data, tmp_path, n, f"ranks{n}", **common)
        assert many["world_size"] == n
        np.testing.assert_allclose([loss for _, loss in many["train_losses"]], l1, rtol=2e-4)
        assert many["final"]["tokens"] == one["final"]["tokens"] == 512
        assert many["final"]["bytes"] == one["final"]["bytes"]
        assert math.isclose(many["final"]["val_loss"], one["final"]["val_loss"], rel_tol=1e-3)


def test_outputs_hold_what_the_run_measured(markov_data, tmp_path):
    s, stdout = launch(markov_data, tmp_path, 1, "e2e", ITERATIONS=3, VAL_MAX_TOKENS=300, EVAL_STRIDE=8,
                       AUTHOR="tester", DATA_LABEL="generated markov")
    log = open(os.path.join(markov_data["LOG_DIR"], "e2e.txt")).read()
    assert log.splitlines()[0].startswith("run_id:e2e")
    assert "config:" in log and '"eval_stride": 8' in log
    final = [l for l in log.splitlines() if l.startswith("final_int6_constriction_roundtrip_exact")]
    assert len(final) == 1
    fields = dict(kv.split(":", 1) for kv in final[0].split()[1:])
    assert float(fields["val_bpb"]) == pytest.approx(s["final"]["val_bpb"], abs=1e-8)
    assert int(fields["scored_tokens"]) == s["final"]["tokens"] == 300
    # the final line lets anyone re-derive the score
    nats = float(fields["val_loss"]) * int(fields["scored_tokens"])
    assert float(fields["val_bpb"]) == pytest.approx(nats / math.log(2) / int(fields["scored_bytes"]), rel=1e-7)
    assert s["bytes_model"] == os.path.getsize(s["artifact_path"])
    assert s["bytes_code"] == os.path.getsize(ROOT / "train_gpt.py")
    assert s["bytes_total"] == s["bytes_model"] + s["bytes_code"] and s["artifact_valid"]
    sub = json.load(open(tmp_path / "e2e_submission.json"))
    assert sub["val_bpb"] == s["final"]["val_bpb"] and sub["bytes_total"] == s["bytes_total"]
    assert sub["author"] == "tester" and sub["data"] == "generated markov" and "CPU" in sub["hardware"]


def test_non_finite_loss_is_a_one_line_error(markov_data, tmp_path):
    env = dict(os.environ, **tiny_env(**markov_data, ITERATIONS=3, TRAIN_LOG_EVERY=1, TIED_EMBED_LR="1e30"))
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "train loss is nan" in proc.stderr, proc.stderr[-2000:]


def test_missing_data_is_a_one_line_error(tmp_path, tokenizer_path):
    env = dict(os.environ, **tiny_env(DATA_PATH=str(tmp_path / "nowhere"), TOKENIZER_PATH=tokenizer_path,
                                      LOG_DIR=str(tmp_path / "logs"), SUBMISSION_JSON=""))
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "no val shards match" in err and "nowhere" in err, err


def test_all_switches_compile_as_full_graphs(markov_data, monkeypatch):
    """Every switch on, under torch.compile(fullgraph=True) as on CUDA (graph breaks would raise), gives the eager
    losses, including the QAT flip after compiling. The aot_eager backend keeps this fast and toolchain-free."""
    import functools
    import torch
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    # looping turns on at step 1, QAT at step 2: three contexts, all primed by the three warm-up steps
    common = dict(ITERATIONS=3, WARMUP_STEPS=3, QAT=1, QAT_START_FRAC=0.5, ENABLE_LOOPING_AT=0.3, MTP_HEADS=1,
                  MTP_WEIGHT=0.3, NORMUON=1, VAL_MAX_TOKENS=300, TRAIN_LOG_EVERY=1, SMEAR_GATE=0,
                  SMEAR_GATE_ENABLED=1, SPARSE_ATTN_GATE_ENABLED=1, DOC_MASK=1)
    # tiny matrices would be kept in fp16 (so QAT would leave them alone): quantize every block matrix to int6
    real_bits = train_gpt.export_bits
    monkeypatch.setattr(train_gpt, "export_bits", lambda name, t, args: 6 if name.startswith("blocks.") and t.ndim == 2
                        and "resid_mix" not in name else real_bits(name, t, args))
    eager = run_inprocess(markov_data, COMPILE=0, **common)
    no_qat = run_inprocess(markov_data, COMPILE=0, **dict(common, QAT=0))
    assert no_qat["train_losses"][:2] == eager["train_losses"][:2]
    assert no_qat["train_losses"][2][1] != eager["train_losses"][2][1]  # QAT matters (steps 1-2 are bit-identical)
    no_loop = run_inprocess(markov_data, COMPILE=0, **dict(common, NUM_LOOPS=0))
    assert no_loop["train_losses"][:1] == eager["train_losses"][:1]
    assert no_loop["train_losses"][1][1] != pytest.approx(eager["train_losses"][1][1], rel=1e-5)  # looping matters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = run_inprocess(markov_data, COMPILE=1, **common)
    assert compiled["qat_start_step"] == eager["qat_start_step"] == 2
    np.testing.assert_allclose([l for _, l in compiled["train_losses"]], [l for _, l in eager["train_losses"]],
                               rtol=1e-5)
    assert compiled["final"]["val_loss"] == pytest.approx(eager["final"]["val_loss"], rel=1e-5)


def test_training_steps_never_read_back_from_the_device(markov_data, monkeypatch):
    """From the third step on (first-step allocations done), the training loop reads nothing back from the device:
    no .item(), .tolist(), bool(), float(), int() or .cpu() of a tensor, each a host sync on CUDA. The default stack
    runs (EMA, gradient clipping, the wall-clock cap, QAT and looping switching on); TRAIN_LOG_EVERY=0, since a log
    step reads the loss on purpose. Exempt: CPU AdamW (foreach) reads its step counters on the host, where CUDA runs
    the fused kernel, which does not."""
    import torch
    calls, state = [], {"steps": 0, "on": False}
    record_host_reads(monkeypatch, lambda: state["on"], calls)
    real_step = train_gpt.train_step

    def step(*a, **k):
        state["steps"] += 1
        state["on"] = state["steps"] >= 3
        return real_step(*a, **k)
    monkeypatch.setattr(train_gpt, "train_step", step)

    class Runtime(train_gpt.Runtime):
        def sync(self):  # in the loop only when it ends (VAL_LOSS_EVERY=0): stop counting there
            state["on"] = False
    args = train_gpt.Hyperparameters.from_env(tiny_env(
        **markov_data, ITERATIONS=8, TRAIN_LOG_EVERY=0, MAX_WALLCLOCK_SECONDS=600, GPTQ_RESERVE_SECONDS=1,
        QAT=1, QAT_START_FRAC=0.5, ENABLE_LOOPING_AT=0.25, VAL_MAX_TOKENS=128))
    s = train_gpt.run(args, Runtime(0, 1, torch.device("cpu")))
    assert s["steps"] == 8 and s["averaged_updates"] == 8 and s["qat_start_step"] == 4
    assert state["steps"] == 8 and calls == []
