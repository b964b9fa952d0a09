"""Scores that cannot be wrong and files that cannot be lost (issue 19): a re-score reproduces the run's own numbers
or refuses, a non-finite score is an error, an artifact with bytes appended does not load, an impossible size target
is refused, no output path overwrites another file, one RUN_ID is one run, and every odd input is one line."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TOKENIZER, cpu_runtime, tiny_args, tiny_env, write_markov_data
from data.shards import write_shard
from test_outputs import launch, run_inprocess
import train_gpt

H = train_gpt.Hyperparameters
LORA = dict(TTT_ENABLED=1, TTT_MODE="lora", TTT_CHUNK_SIZE=16, TTT_BATCH_SIZE=2, TTT_LORA_RANK=2,
            PHASED_TTT_PREFIX_DOCS=1, PHASED_TTT_NUM_PHASES=1, GLOBAL_TTT_CHUNK_TOKENS=64, GLOBAL_TTT_BATCH_SEQS=2)


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    """One tiny run with SEED=7 (which draws the LoRA adapters' A) and a cut validation set."""
    if not TOKENIZER.exists():
        pytest.skip(f"challenge tokenizer not found at {TOKENIZER}")
    data = write_markov_data(tmp_path_factory.mktemp("seeded"), str(TOKENIZER))
    s = run_inprocess(data, ITERATIONS=3, RUN_ID="seeded", SEED=7, VAL_MAX_TOKENS=300, **LORA)
    return data, s


def rescore_env(data, run_id, artifact, **kw):
    return dict(dict(DATA_PATH=data["DATA_PATH"], TOKENIZER_PATH=data["TOKENIZER_PATH"], LOG_DIR=data["LOG_DIR"],
                     RUN_ID=run_id, EVAL_ARTIFACT=artifact, WARMUP_STEPS="0"), **kw)


# ---- a re-score reproduces the run, or refuses

def test_rescore_reproduces_the_ttt_score_without_being_told_the_seed(seeded_run, capsys):
    data, trained = seeded_run
    args = H.from_env(rescore_env(data, "again", trained["artifact_path"]))
    assert args.seed == 7  # stored in the artifact, like every value the eval depends on
    again = train_gpt.run(args, cpu_runtime())
    assert again["ttt"]["val_loss"] == trained["ttt"]["val_loss"]
    assert again["final"]["val_loss"] == trained["final"]["val_loss"]
    said = [l for l in open(os.path.join(data["LOG_DIR"], "again.txt")) if l.startswith("eval_artifact: from the")]
    assert len(said) == 1 and "SEED=7" in said[0] and "VAL_MAX_TOKENS=300" in said[0]  # inherited, and it says so


def test_rescore_with_another_tokenizer_is_refused(seeded_run, tmp_path):
    data, trained = seeded_run
    other = tmp_path / "other.model"
    data_bytes = bytearray(TOKENIZER.read_bytes())
    data_bytes[-1] ^= 0xFF
    other.write_bytes(bytes(data_bytes))  # same size, another file
    with pytest.raises(train_gpt.UserError, match="is not the tokenizer the artifact was trained with") as e:
        H.from_env(rescore_env(data, "tok", trained["artifact_path"], TOKENIZER_PATH=str(other)))
    assert "VOCAB_SIZE" not in str(e.value)  # the fix is the tokenizer, never a VOCAB_SIZE that the artifact refuses
    assert trained["tokenizer_sha256"] == train_gpt.file_sha256(str(TOKENIZER))


def test_a_wrong_vocab_size_on_rescore_points_to_the_tokenizer(tmp_path):
    args = dataclasses.replace(tiny_args(TOKENIZER_PATH=str(TOKENIZER), VOCAB_SIZE=2048), eval_artifact="x.ptz")
    with pytest.raises(train_gpt.UserError, match="trained with VOCAB_SIZE=2048: set TOKENIZER_PATH to its tokenizer"):
        train_gpt.load_tokenizer(args)


def test_a_run_that_never_loops_is_scored_and_stored_in_the_plain_order(markov_data):
    """ENABLE_LOOPING_AT=1.0 is never reached in training: the artifact says so and evaluation runs the plain order
    (it used to score with the looped order the model never trained in)."""
    s = run_inprocess(markov_data, ITERATIONS=3, RUN_ID="flat", ENABLE_LOOPING_AT=1.0, NUM_LOOPS=2)
    qstate, header = train_gpt.read_artifact(s["artifact_path"])
    assert header["looping"] is False
    log = open(os.path.join(markov_data["LOG_DIR"], "flat.txt")).read()
    assert "WARNING: looping never turned on" in log
    args = tiny_args(**{k: v for k, v in markov_data.items()}, NUM_LOOPS=2)
    model = train_gpt.GPT(args)
    model.load_state_dict(train_gpt.dequantize_state(qstate))
    val, _ = train_gpt.load_val_tokens(args)
    luts = train_gpt.build_byte_luts(train_gpt.load_tokenizer(args), args.vocab_size)
    plain, looped = (train_gpt.evaluate(model, val, luts, args, cpu_runtime(), 0, train_gpt.Ctx(looping=b))
                     for b in (False, True))
    assert s["roundtrip"]["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-9)
    assert looped["val_loss"] != pytest.approx(plain["val_loss"], rel=1e-6)


# ---- a non-finite score is an error, and JSON never holds NaN

@pytest.mark.parametrize("ttt", [dict(TTT_LR=1e6, TTT_GRAD_CLIP=0, TTT_CHUNK_TOKENS=64),
                                 dict(LORA, TTT_LORA_LR=1e6, PHASED_TTT_PREFIX_DOCS=0)])
def test_a_diverging_ttt_is_an_error_with_no_submission(markov_data, ttt):
    with pytest.raises(train_gpt.UserError, match="final val_loss is (nan|inf).*test-time training diverged"):
        run_inprocess(markov_data, ITERATIONS=2, RUN_ID="div", VAL_MAX_TOKENS=400, **dict(ttt, TTT_ENABLED=1))
    assert not os.path.exists(markov_data["SUBMISSION_JSON"])
    assert not os.path.exists(os.path.join(markov_data["LOG_DIR"], "div.json"))
    assert "error: final val_loss is" in open(os.path.join(markov_data["LOG_DIR"], "div.txt")).read()


def test_json_outputs_never_hold_nan_or_infinity(tmp_path):
    path = tmp_path / "x.json"
    train_gpt.write_json(str(path), dict(a=math.nan, b=[1.0, math.inf, {"c": -math.inf}], d=2.5, e="nan"))

    def strict(token):
        raise ValueError(token)
    assert json.loads(path.read_text(), parse_constant=strict) == dict(a=None, b=[1.0, None, {"c": None}], d=2.5, e="nan")


# ---- the artifact: trailing bytes, folders and foreign files

@pytest.mark.parametrize("compressor,level", [("zstd", 3), ("zlib", 9), ("constriction", 0)])
def test_bytes_appended_to_an_artifact_are_refused(compressor, level):
    args = tiny_args(COMPRESSOR=compressor, COMPRESS_LEVEL=level, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1,
                     VOCAB_SIZE=64)
    data = train_gpt.pack(train_gpt.quantize_state(train_gpt.export_state(train_gpt.GPT(args)), args), args)
    train_gpt.unpack(data, "x.ptz")
    for extra in (b"\0", b"junk", bytes(100), data):
        with pytest.raises(train_gpt.UserError, match="^x.ptz: .*truncated or corrupt"):
            train_gpt.unpack(data + extra, "x.ptz")


def test_a_folder_or_a_foreign_file_as_artifact_says_what_it_is(tmp_path):
    with pytest.raises(train_gpt.UserError, match="is a folder; give the .ptz file inside it"):
        H.from_env({"EVAL_ARTIFACT": str(tmp_path)})
    torch.save({"w": torch.zeros(3)}, tmp_path / "model.pt")
    (tmp_path / "s.json").write_text('{"val_bpb": 1}')
    (tmp_path / "empty.ptz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    for name, what in [("model.pt", "a ZIP archive"), ("s.json", "JSON text"), ("empty.ptz", "empty"),
                       ("notes.txt", "text")]:
        with pytest.raises(train_gpt.UserError, match=f"is not a train_gpt.py artifact \\(the file is {what}"):
            H.from_env({"EVAL_ARTIFACT": str(tmp_path / name)})


def test_an_empty_eval_artifact_is_refused():
    with pytest.raises(train_gpt.UserError, match="EVAL_ARTIFACT is empty"):
        H.from_env({"EVAL_ARTIFACT": ""})


# ---- size targets

def test_a_target_below_the_code_size_is_refused_before_training():
    code = os.path.getsize(train_gpt.__file__)
    with pytest.raises(train_gpt.UserError, match=f"TARGET_BYTES=1000: leaves no room for a model: the code alone is {code}"):
        tiny_args(TARGET_BYTES=1000, MATRIX_CLIP_SIGMAS=12.85)


def test_a_failed_fit_is_recorded_and_the_artifact_is_not_valid(markov_data):
    target = os.path.getsize(train_gpt.__file__) + 1000
    s = run_inprocess(markov_data, ITERATIONS=2, RUN_ID="fit", TARGET_BYTES=target, MATRIX_CLIP_SIGMAS=12.85)
    sub = json.load(open(markov_data["SUBMISSION_JSON"]))
    assert s["size_fit"]["fits"] is False and s["size_fit"]["target_bytes"] == target
    assert s["artifact_valid"] is sub["artifact_valid"] is False and sub["size_fit"] == s["size_fit"]


# ---- output paths

@pytest.mark.parametrize("which", ["own summary", "own log", "other summary", "other artifact"])
def test_submission_json_never_replaces_another_file(markov_data, which):
    log_dir = markov_data["LOG_DIR"]
    os.makedirs(log_dir)
    for name, text in [("old.json", '{"config": {}, "val_bpb": 1}'), ("old.int6_constriction.ptz", "PGrc...")]:
        open(os.path.join(log_dir, name), "w").write(text)
    target = dict(zip(["own summary", "own log", "other summary", "other artifact"],
                      ["r.json", "r.txt", "old.json", "old.int6_constriction.ptz"]))[which]
    before = {n: open(os.path.join(log_dir, n), "rb").read() for n in os.listdir(log_dir)}
    with pytest.raises(train_gpt.UserError, match="SUBMISSION_JSON="):
        run_inprocess(markov_data, ITERATIONS=1, RUN_ID="r", SUBMISSION_JSON=os.path.join(log_dir, target))
    assert {n: open(os.path.join(log_dir, n), "rb").read() for n in os.listdir(log_dir)} == before


def test_a_run_id_taken_between_the_check_and_the_log_is_one_line(markov_data, monkeypatch):
    """Two runs started at once with one RUN_ID: both pass the check, the second to create the log stops."""
    real = train_gpt.load_val_tokens

    def other_run_starts(args):
        open(os.path.join(args.log_dir, "twin.txt.partial"), "x").close()
        return real(args)
    monkeypatch.setattr(train_gpt, "load_val_tokens", other_run_starts)
    with pytest.raises(train_gpt.UserError, match="RUN_ID=twin was just claimed by another run"):
        run_inprocess(markov_data, ITERATIONS=1, RUN_ID="twin")


def test_only_the_runs_own_files_make_a_run_id_taken(markov_data):
    """run.v2.txt belongs to RUN_ID=run.v2, and run.out to a shell redirect of this run's stdout."""
    log_dir = markov_data["LOG_DIR"]
    os.makedirs(log_dir)
    for name in ("run.v2.txt", "run.out", "run.notes"):
        open(os.path.join(log_dir, name), "w").close()
    run_inprocess(markov_data, ITERATIONS=1, RUN_ID="run", VAL_MAX_TOKENS=64)
    assert os.path.exists(os.path.join(log_dir, "run.txt"))
    with pytest.raises(train_gpt.UserError, match="RUN_ID=run already has files"):
        run_inprocess(markov_data, ITERATIONS=1, RUN_ID="run", VAL_MAX_TOKENS=64)


# ---- interrupts and errors say what happened

def test_sigterm_while_rescoring_says_so(seeded_run):
    data, trained = seeded_run
    patch = """
        import os, signal
        real = train_gpt.evaluate
        def evaluate(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)
        train_gpt.evaluate = evaluate
    """
    proc = launch(rescore_env(data, "cut", trained["artifact_path"]), patch)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert proc.stderr == "train_gpt.py: interrupted while scoring EVAL_ARTIFACT; the artifact is untouched, no summary written\n"


@pytest.mark.parametrize("text", ["1_0", "\uff11\uff10", " 10", "10 ", "1e3", "0x10", "٣"])
def test_integers_are_ascii_digits_only(text):
    with pytest.raises(train_gpt.UserError, match=r"NUM_LAYERS=.* is not a valid int \(ASCII digits"):
        H.from_env({"NUM_LAYERS": text})


@pytest.mark.parametrize("text,value", [("+5e-3", 5e-3), ("-.5", -0.5), ("2.", 2.0), ("1E2", 100.0)])
def test_floats_take_what_a_shell_user_means(text, value):
    assert train_gpt.parse_env_value("QK_GAIN_INIT", text, float) == value
    for bad in (f" {text}", text.replace(".", "_") + "_0", "nan", "inf", "1,5"):
        with pytest.raises(train_gpt.UserError, match="is not a valid float"):
            train_gpt.parse_env_value("QK_GAIN_INIT", bad, float)


def test_input_error_under_torchrun_survives_a_slow_rank_0(tmp_path):
    """Rank 0 is slow to reach the error (a loaded machine); the other rank fails at once. Its exit used to make
    torchrun terminate rank 0 before it printed: now the other ranks wait for rank 0."""
    wrapper = tmp_path / "slow_rank0.py"
    wrapper.write_text(f"import os, runpy, sys, time\nif os.environ['RANK'] == '0':\n    time.sleep(8)\n"
                       f"sys.argv = [{str(ROOT / 'train_gpt.py')!r}]\n"
                       f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = dict(os.environ, NUM_LAYERS="abc", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(wrapper)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("train_gpt.py: error: NUM_LAYERS='abc'") == 1, proc.stderr[-3000:]


def torchrun_with_rank_1_shard(tmp_path, rank1_tokens, script):
    """2 ranks of `script` with TRAIN_LOADER=shuffled, which reads train shards r, r+W, ... on rank r: shard 1, which
    only rank 1 reads, holds rank1_tokens. Returns stdout + stderr."""
    if not TOKENIZER.exists():
        pytest.skip(f"challenge tokenizer not found at {TOKENIZER}")
    data = write_markov_data(tmp_path, str(TOKENIZER), train_shards=2)
    write_shard(tmp_path / "fineweb_train_000001.bin", rank1_tokens)
    env = dict(os.environ, **tiny_env(**data, TRAIN_LOADER="shuffled", ITERATIONS=4, VAL_MAX_TOKENS=256),
               RUN_ID="r1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_a_shard_error_of_rank_1_under_torchrun_is_printed_once_by_rank_0(tmp_path):
    """Shard 1 is too short for a sequence. Each rank used to check only its own shards: rank 1 left the process
    group, rank 0 died at its next collective with gloo's traceback, torchrun ended the waiting rank 1, and no line
    said why. Now every rank checks every rank's shards, and rank 0 prints the line once."""
    out = torchrun_with_rank_1_shard(tmp_path, np.full(20, 5, np.uint16), ROOT / "train_gpt.py")
    assert out.count("no train shard 1, 1+2, ... of 2 holds TRAIN_SEQ_LEN+1 = 33 tokens") == 1, out[-5000:]
    assert "train_gpt.py: error: TRAIN_LOADER=shuffled" in out, out[-5000:]


def test_an_error_only_rank_1_meets_under_torchrun_is_printed_by_rank_1(tmp_path):
    """Rank 1 alone draws sequences with a token id >= VOCAB_SIZE, at its first training batch, and leaves; rank 0
    waits in the gradients' all-reduce. The wrapper only gives the process group a 30 s timeout, so rank 0 dies there
    (as it does when gloo sees the peer's connection reset) while rank 1 still waits for it: torchrun then ends rank 1,
    which used to leave silently. Now it finds no line of rank 0's in the group's store and prints its own."""
    wrapper = tmp_path / "short_timeout.py"
    wrapper.write_text(f"""import datetime, runpy, sys
import torch.distributed as dist
init = dist.init_process_group
dist.init_process_group = lambda *a, **k: init(*a, timeout=datetime.timedelta(seconds=30), **k)
sys.argv = [{str(ROOT / 'train_gpt.py')!r}]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    bad = np.full(30000, 5, np.uint16)
    bad[::10] = 2000  # in every sequence
    out = torchrun_with_rank_1_shard(tmp_path, bad, wrapper)
    assert out.count("fineweb_train_000001.bin: token id 2000 >= VOCAB_SIZE=1024") == 1, out[-5000:]
    assert "train_gpt.py (rank 1): error: " in out, out[-5000:]
