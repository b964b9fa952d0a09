"""Outputs never lose data (atomic writes, a used RUN_ID is refused, interrupts say what was written), inputs are
checked before the log exists, the artifact verifies itself and can be re-scored on its own (EVAL_ARTIFACT)."""
import dataclasses
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, assert_every_corruption_fails, cpu_runtime, tiny_args, tiny_env
from data.shards import write_shard
import train_gpt

H = train_gpt.Hyperparameters


def run_inprocess(data, **overrides):
    return train_gpt.run(H.from_env(tiny_env(**dict(data, **overrides))), cpu_runtime())


def launch(env_overrides, patch="", timeout=300):
    """train_gpt.main() in a fresh process; `patch` is Python run after `import train_gpt` (e.g. to signal itself)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_overrides)
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import train_gpt\n{textwrap.dedent(patch)}\ntrain_gpt.main()"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def digest(folder) -> dict:
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in glob.glob(f"{folder}/*")}


# ----------------------------------------------------------------------------------------------------------------------
# Every value checked up front

def test_every_field_has_a_range_choices_or_is_free_text():
    unchecked = [f.name.upper() for f in dataclasses.fields(H) if f.type not in (bool, "bool")
                 and f.name not in train_gpt.FIELD_RANGES and f.name not in train_gpt.FIELD_CHOICES
                 and f.name not in train_gpt.FREE_TEXT_FIELDS]
    assert not unchecked, f"fields without a range check: {unchecked}"


def outside(spec):
    """Values just outside an interval like "[0, 1)" or "(0, inf)", and one inside."""
    lo, hi = (float(s) for s in spec[1:-1].split(","))
    bad = []
    if lo != float("-inf"):
        bad.append(lo if spec[0] == "(" else lo - 1)
    if hi != float("inf"):
        bad.append(hi if spec[-1] == ")" else hi + 1)
    return bad


@pytest.mark.parametrize("name", sorted(train_gpt.FIELD_RANGES))
def test_values_outside_each_range_are_rejected(name):
    spec, kind = train_gpt.FIELD_RANGES[name], type(getattr(H(), name))
    for v in outside(spec):
        with pytest.raises(train_gpt.UserError, match=f"^{name.upper()}=") as e:
            H.from_env({name.upper(): str(kind(v))})
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("env,var", [
    ({"COMPRESS_LEVEL": "23"}, "COMPRESS_LEVEL"), ({"COMPRESSOR": "zlib", "COMPRESS_LEVEL": "10"}, "COMPRESS_LEVEL"),
    ({"COMPRESSOR": "zlib"}, "COMPRESS_LEVEL"),  # the default level 22 is zstd's; zlib stops at 9
    ({"EVAL_SEQ_LEN": "-1"}, "EVAL_SEQ_LEN"), ({"GRAD_ACCUM_STEPS": "-1"}, "GRAD_ACCUM_STEPS"),
    ({"MLP_MULT": "0"}, "MLP_MULT"), ({"MLP_MULT": "-2"}, "MLP_MULT"), ({"MODEL_DIM": "64", "MLP_MULT": "0.001"}, "MLP_MULT"),
    ({"WARMUP_STEPS": "-1"}, "WARMUP_STEPS"), ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC"),
    ({"WARMDOWN_FRAC": "-0.1"}, "WARMDOWN_FRAC"), ({"QAT": "1", "QAT_START_FRAC": "1.2"}, "QAT_START_FRAC"),
    ({"QAT": "1", "QAT_START_FRAC": "-0.5"}, "QAT_START_FRAC"),
    ({"TRAIN_SEQ_LEN": "32", "EVAL_SEQ_LEN": "0", "EVAL_STRIDE": "64"}, "EVAL_STRIDE"),
    ({"EVAL_SEQ_LEN": "16", "EVAL_STRIDE": "32"}, "EVAL_STRIDE"), ({"RUN_ID": "../escape"}, "RUN_ID"),
    ({"SEED": "-1"}, "SEED"), ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"), ({"COMPILE": "2"}, "COMPILE"),
])
def test_issue_range_checks(env, var):
    with pytest.raises(train_gpt.UserError, match=var) as e:
        H.from_env(env)
    assert "\n" not in str(e.value)


def test_stride_error_says_which_variable_to_change():
    with pytest.raises(train_gpt.UserError) as e:
        H.from_env({"TRAIN_SEQ_LEN": "32", "EVAL_SEQ_LEN": "0", "EVAL_STRIDE": "64"})
    assert "EVAL_STRIDE=64" in str(e.value) and "EVAL_SEQ_LEN" in str(e.value) and "(32)" in str(e.value)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs checked before the log exists

def test_a_bad_later_train_shard_stops_the_run_before_any_output(markov_data, tmp_path):
    for i in range(1, 4):
        write_shard(tmp_path / f"fineweb_train_00000{i}.bin", np.arange(100) % 50)
    with open(tmp_path / "fineweb_train_000002.bin", "r+b") as f:
        f.truncate(1024 + 2 * 60)  # the header promises 100 tokens
    with pytest.raises(train_gpt.UserError, match="fineweb_train_000002.bin: 1144 bytes but the header promises 100"):
        run_inprocess(markov_data, ITERATIONS=2)
    assert not os.listdir(markov_data["LOG_DIR"])  # checked before the log was created


def test_a_tokenizer_that_is_not_sentencepiece_is_one_line(markov_data, tmp_path):
    (tmp_path / "tok.model").write_text("not a model")
    proc = launch(tiny_env(**dict(markov_data, TOKENIZER_PATH=str(tmp_path / "tok.model"))))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "is not a SentencePiece model" in proc.stderr, proc.stderr
    assert not os.path.exists(markov_data["LOG_DIR"]) or not os.listdir(markov_data["LOG_DIR"])


def test_log_dir_that_is_a_file_is_one_line(markov_data, tmp_path):
    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(train_gpt.UserError, match=f"LOG_DIR: cannot write in {bad}"):
            run_inprocess(markov_data, LOG_DIR=str(bad), ITERATIONS=1)


def test_submission_path_is_checked_at_start(markov_data, tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(train_gpt.UserError, match="SUBMISSION_JSON=.*adir is a folder"):
        run_inprocess(markov_data, SUBMISSION_JSON=str(tmp_path / "adir"), ITERATIONS=1)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(train_gpt.UserError, match="SUBMISSION_JSON: cannot write in"):
        run_inprocess(markov_data, SUBMISSION_JSON=str(tmp_path / "afile" / "s.json"), ITERATIONS=1)
    assert not os.path.exists(markov_data["LOG_DIR"]) or not os.listdir(markov_data["LOG_DIR"])


def test_truncation_is_only_claimed_when_something_was_cut(markov_data):
    log_dir = markov_data["LOG_DIR"]
    whole = run_inprocess(markov_data, ITERATIONS=1, VAL_MAX_TOKENS=10**9, RUN_ID="whole")
    cut = run_inprocess(markov_data, ITERATIONS=1, VAL_MAX_TOKENS=100, RUN_ID="cut")
    assert "truncated" not in open(f"{log_dir}/whole.txt").read() and not whole["smoke"]
    assert "val_tokens:100 (VAL_MAX_TOKENS: truncated)" in open(f"{log_dir}/cut.txt").read()
    assert cut["smoke"] and "VAL_MAX_TOKENS=100" in cut["smoke_reasons"][0]


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: fresh RUN_ID, atomic files, default submission path, smoke marks

def test_a_used_run_id_is_refused_before_training_and_nothing_changes(markov_data, monkeypatch):
    first = run_inprocess(markov_data, ITERATIONS=2, RUN_ID="same", SUBMISSION_JSON="")
    log_dir = markov_data["LOG_DIR"]
    names = {"same.txt", "same.json", "same.int6_constriction.ptz", "same.submission.json"}
    assert set(os.listdir(log_dir)) == names  # no temporary or .partial file left behind
    assert first["config"]["submission_json"] == os.path.join(log_dir, "same.submission.json")
    before = digest(log_dir)
    monkeypatch.setattr(train_gpt, "train", lambda *a, **k: pytest.fail("trained despite a used RUN_ID"))
    with pytest.raises(train_gpt.UserError, match="RUN_ID=same already has files in") as e:
        run_inprocess(markov_data, ITERATIONS=2, RUN_ID="same", SUBMISSION_JSON="")
    assert all(n in str(e.value) for n in names) and "set a new RUN_ID or remove those files" in str(e.value)
    assert digest(log_dir) == before


def test_plain_run_does_not_touch_the_repository_submission_json(markov_data):
    committed = (ROOT / "submission.json").read_bytes()
    s = run_inprocess(markov_data, ITERATIONS=1, RUN_ID="plain", SUBMISSION_JSON="")
    assert (ROOT / "submission.json").read_bytes() == committed
    sub = json.load(open(os.path.join(markov_data["LOG_DIR"], "plain.submission.json")))
    assert sub["val_bpb"] == s["final"]["val_bpb"] and sub["track"] == "non-record"


def test_explicit_submission_path_gets_its_folders(markov_data, tmp_path):
    target = tmp_path / "a" / "b" / "sub.json"
    run_inprocess(markov_data, ITERATIONS=1, SUBMISSION_JSON=str(target))
    assert json.load(open(target))["run_id"]


@pytest.mark.parametrize("overrides,smoke", [(dict(ITERATIONS=3), False), (dict(ITERATIONS=3, VAL_MAX_TOKENS=64), True)])
def test_smoke_runs_are_marked(markov_data, overrides, smoke):
    s = run_inprocess(markov_data, RUN_ID="r", SUBMISSION_JSON="", **overrides)
    sub = json.load(open(os.path.join(markov_data["LOG_DIR"], "r.submission.json")))
    assert s["smoke"] is sub["smoke"] is smoke and sub["track"] == "non-record"


def test_smoke_reasons():
    args = tiny_args(ITERATIONS=1000)
    assert train_gpt.smoke_reasons(args, 100, False) == []
    assert train_gpt.smoke_reasons(args, 99, False) == ["stopped at step 99, before 10% of ITERATIONS=1000"]
    assert len(train_gpt.smoke_reasons(args, 99, True)) == 2


def test_wall_clock_cut_before_half_the_iterations_warns(markov_data):
    """The warning names the training cap that stopped the run: MAX_WALLCLOCK_SECONDS less the GPTQ reserve."""
    run_inprocess(markov_data, ITERATIONS=1000, MAX_WALLCLOCK_SECONDS=0.5, RUN_ID="cut", VAL_MAX_TOKENS=64,
                  GPTQ_RESERVE_SECONDS=0.4)
    log = open(os.path.join(markov_data["LOG_DIR"], "cut.txt")).read()
    assert "stopping_early: wallclock_cap" in log
    assert "WARNING: the training wall clock (0.1s: MAX_WALLCLOCK_SECONDS, less GPTQ_RESERVE_SECONDS" in log


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def broken_fsync(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(KeyboardInterrupt):
        train_gpt.write_atomic(str(path), b"new" * 1000)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    monkeypatch.undo()
    train_gpt.write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


# ----------------------------------------------------------------------------------------------------------------------
# Interrupts: one line, no traceback, non-zero exit, nothing half-written

def test_sigterm_during_export_leaves_previous_files_untouched(markov_data, tmp_path):
    sub = tmp_path / "keep" / "submission.json"
    sub.parent.mkdir()
    previous = '{"run_id": "earlier", "track": "non-record", "val_bpb": 1.5, "bytes_total": 100}'  # an earlier submission
    sub.write_text(previous)
    patch = """
        import os, signal
        real = train_gpt.pack
        def pack(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, arriving while the artifact is being compressed
            return real(*a, **k)
        train_gpt.pack = pack
    """
    proc = launch(tiny_env(**dict(markov_data, SUBMISSION_JSON=str(sub)), ITERATIONS=2, RUN_ID="killed"), patch)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == "train_gpt.py: interrupted during export; previous files untouched\n"
    assert sub.read_text() == previous
    files = sorted(os.listdir(markov_data["LOG_DIR"]))
    assert files == ["killed.txt"]  # the log, closed; no artifact, no temporary file, no summary
    log = open(os.path.join(markov_data["LOG_DIR"], "killed.txt")).read()
    assert log.rstrip().endswith("interrupted during export; previous files untouched")


def test_sigint_during_training_names_the_step(markov_data):
    patch = """
        import os, signal
        real = train_gpt.train_step
        calls = []
        def train_step(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)
        train_gpt.train_step = train_step
    """
    proc = launch(tiny_env(**markov_data, ITERATIONS=10, RUN_ID="stopped"), patch)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert proc.stderr == "train_gpt.py: interrupted at step 2; no artifact written\n"
    assert os.listdir(markov_data["LOG_DIR"]) == ["stopped.txt"]


def test_input_error_under_torchrun_is_printed_once(tmp_path):
    env = dict(os.environ, NUM_LAYERS="abc", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("train_gpt.py: error: NUM_LAYERS='abc'") == 1


# ----------------------------------------------------------------------------------------------------------------------
# The artifact verifies itself

@pytest.fixture
def artifact(tmp_path):
    args = tiny_args(LOG_DIR=str(tmp_path), RUN_ID="a")
    model = train_gpt.GPT(args)
    path, _ = train_gpt.export_artifact(args, cpu_runtime(), model)
    return path, open(path, "rb").read()


@pytest.mark.parametrize("compressor,level", [("zstd", 3), ("zlib", 9)])
def test_every_altered_or_truncated_artifact_fails_with_one_line(tmp_path, compressor, level):
    args = tiny_args(COMPRESSOR=compressor, COMPRESS_LEVEL=level, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1,
                     BIGRAM_BUCKETS=0, VOCAB_SIZE=64)
    data = train_gpt.pack(train_gpt.quantize_state(train_gpt.export_state(train_gpt.GPT(args)), args), args)
    train_gpt.unpack(data, "x.ptz")  # intact: loads
    positions = sorted(set(np.linspace(0, len(data) - 1, 200).astype(int).tolist()))
    assert_every_corruption_fails(data, positions, (0, 10, len(data) // 2, len(data) - 1))


def test_missing_artifact_is_one_line(tmp_path):
    with pytest.raises(train_gpt.UserError, match="artifact .*nope.ptz not found"):
        H.from_env({"EVAL_ARTIFACT": str(tmp_path / "nope.ptz")})


def test_eval_artifact_rescores_a_saved_run_with_the_same_final_line(markov_data):
    trained = run_inprocess(markov_data, ITERATIONS=3, RUN_ID="train", VAL_MAX_TOKENS=300, EVAL_STRIDE=8,
                            NUM_LAYERS=3, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, BIGRAM_BUCKETS=32)
    log_dir = markov_data["LOG_DIR"]
    final_line = [l for l in open(f"{log_dir}/train.txt") if l.startswith("final_int6_constriction_roundtrip_exact")][0]
    # the shape, the eval window and the stride come from the artifact, not from these (default) variables
    env = dict(DATA_PATH=markov_data["DATA_PATH"], TOKENIZER_PATH=markov_data["TOKENIZER_PATH"], LOG_DIR=log_dir,
               RUN_ID="rescore", EVAL_ARTIFACT=trained["artifact_path"], WARMUP_STEPS="0")
    proc = launch(env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = [l for l in proc.stdout.splitlines() if l.startswith("final_int6_constriction_roundtrip_exact")]
    assert len(again) == 1
    strip_time = lambda line: line.rsplit(" eval_time:", 1)[0]  # noqa: E731
    assert strip_time(again[0]) == strip_time(final_line.strip())
    summary = json.load(open(f"{log_dir}/rescore.json"))
    assert summary["mode"] == "eval_artifact" and summary["final"]["val_bpb"] == trained["final"]["val_bpb"]
    assert not os.path.exists(f"{log_dir}/rescore.submission.json")
    # a shape that contradicts the artifact is refused
    bad = launch(dict(env, RUN_ID="bad", NUM_LAYERS="4"))
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1
    assert "NUM_LAYERS=4 but the artifact was trained with 3; unset NUM_LAYERS" in bad.stderr


def test_model_fields_cover_everything_the_model_reads():
    """GPT's constructor and forward read only MODEL_FIELDS (stored in the artifact), init-only values and the
    export plan (also stored, per tensor). A new model knob missing from MODEL_FIELDS fails here."""
    import torch
    init_only = {"qk_gain_init", "tied_embed_init_std", "ortho_init", "mtp_heads", "mtp_weight"}
    export_plan = {"quant_attn_bits", "quant_mlp_bits", "quant_other_bits", "quant_group_size", "quant_clip_search",
                   "quant_int8_upstream", "quant_scale_floor", "fp16_keep_patterns",
                   "int8_keep_float_fp32_name_patterns", "matrix_clip_sigmas", "attn_clip_sigmas", "mlp_clip_sigmas",
                   "embed_clip_sigmas", "matrix_bits", "embed_bits"}
    kernels = {"fused_kernels", "attn_backend"}  # how the model computes, not what: each machine picks its own
    args = tiny_args(SMEAR_GATE=1, SMEAR_GATE_ENABLED=0, BIGRAM_BUCKETS=16)
    seen = set()

    class Recording:
        def __getattr__(self, name):
            seen.add(name)
            return getattr(args, name)
    model = train_gpt.GPT(Recording())
    x = torch.randint(0, 64, (1, 8))
    model(x, x)
    model(x, x, per_token=True)
    stored = set(train_gpt.MODEL_FIELDS + train_gpt.EVAL_FIELDS)  # the tilt's TOKEN_BOOST is an eval setting
    assert seen - init_only - export_plan - kernels <= stored, seen - init_only - export_plan - kernels - stored
