"""tools/pack_submission.py: the packed train_gpt.py unpacks to the source byte for byte and runs identically."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_env
from tools import pack_submission as ps


def test_packed_source_round_trips_and_is_much_smaller():
    source = (ROOT / "train_gpt.py").read_bytes()
    packed = ps.pack_source(source)
    assert hashlib.sha256(ps.unpack_source(packed)).digest() == hashlib.sha256(source).digest()
    assert len(packed) < 0.45 * len(source)
    assert hashlib.sha256(source).hexdigest() in packed.decode().splitlines()[0]
    assert ps.pack_source(source) == packed  # deterministic
    with pytest.raises(ps.PackError):
        ps.unpack_source(b"print('hello')\n")


def run(script, env, cwd):
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_the_packed_file_runs_identically_and_the_folder_takes_its_run(markov_data, tmp_path):
    out = tmp_path / "records_run"
    assert ps.main([str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"train_gpt.py", "README.md", "requirements.txt"}
    packed = out / "train_gpt.py"
    env = dict(os.environ, **tiny_env(**markov_data, ITERATIONS=4, VAL_MAX_TOKENS=256, TRAIN_LOG_EVERY=1),
               OMP_NUM_THREADS="1")
    logs = markov_data["LOG_DIR"]
    run(ROOT / "train_gpt.py", dict(env, RUN_ID="plain", SUBMISSION_JSON=str(tmp_path / "plain.json")), ROOT)
    run(packed, dict(env, RUN_ID="packed", SUBMISSION_JSON=f"{logs}/packed.submission.json"), out)
    a, b = (json.load(open(f"{logs}/{r}.json")) for r in ("plain", "packed"))
    timeless = lambda r: {k: v for k, v in r.items() if k != "eval_time_s"}  # noqa: E731
    assert a["train_losses"] == b["train_losses"] and len(a["train_losses"]) == 4
    for key in ("final", "roundtrip", "pre_quant"):
        assert timeless(a[key]) == timeless(b[key]), key
    assert a["bytes_model"] == b["bytes_model"]
    assert a["bytes_code"] == os.path.getsize(ROOT / "train_gpt.py")
    assert b["bytes_code"] == os.path.getsize(packed) < a["bytes_code"]  # the file that ran is what counts
    first = open(f"{logs}/packed.txt").readline()
    assert f"code_bytes:{os.path.getsize(packed)} " in first
    assert f"code_sha256:{hashlib.sha256(packed.read_bytes()).hexdigest()[:16]}" in first
    # a run of the readable source is refused: its bytes_code is not the shipped file's
    assert ps.main([str(out), "--run", f"{logs}/plain"]) == 1
    assert ps.main([str(out), "--run", f"{logs}/packed"]) == 0
    assert json.load(open(out / "submission.json"))["bytes_code"] == os.path.getsize(packed)
    assert (out / "packed.txt").exists() and (out / "packed.json").exists()
