"""bench/run_bench.py: MFU, summary reading, table and reports on hand-made summaries; one real --dry-run."""
import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import run_bench as rb  # noqa: E402

SUMMARY = dict(
    run_id="r1", config=dict(num_layers=9, model_dim=512), device="cuda", hardware="8x NVIDIA H100", world_size=8,
    torch_version="2.11.0", model_params=17_000_000, train_flops_per_token=1.2e8, steps=1000, train_time_ms=150_000.0,
    step_avg_ms=150.0, tokens_per_s=3.5e6, peak_mem_mib=10240.0,
    pre_quant=dict(val_loss=2.0, val_bpb=1.2, tokens=100, bytes=250, eval_time_s=3.0),
    final=dict(val_loss=1.98, val_bpb=1.19, tokens=100, bytes=250, eval_time_s=12.5, stride=64),
    quant_gap_bpb=0.004, bytes_code=56_000, bytes_model=15_000_000, bytes_total=15_056_000, artifact_valid=True)
OK = dict(status="ok", returncode=0, wall_s=200.0, error="")


def test_mfu_formula_and_missing_inputs():
    peak = 900e12
    assert rb.mfu(SUMMARY, peak) == pytest.approx(3.5e6 * 1.2e8 / (8 * peak))
    assert rb.mfu({**SUMMARY, "world_size": None}, peak) == pytest.approx(3.5e6 * 1.2e8 / peak)
    assert rb.mfu({k: v for k, v in SUMMARY.items() if k != "tokens_per_s"}, peak) is None
    assert rb.mfu({**SUMMARY, "train_flops_per_token": None}, peak) is None
    assert rb.mfu({}, peak) is None
    assert rb.mfu(SUMMARY, 0) is None


def test_read_summary_tolerates_missing_and_bad_files(tmp_path):
    good = tmp_path / "r1.json"
    good.write_text(json.dumps(SUMMARY))
    assert rb.read_summary(good)["final"]["val_bpb"] == 1.19
    assert rb.read_summary(tmp_path / "absent.json") == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert rb.read_summary(tmp_path / "bad.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert rb.read_summary(tmp_path / "list.json") == {}


def test_table_rows_for_full_partial_and_failed_runs():
    partial = {k: v for k, v in SUMMARY.items() if k not in ("final", "peak_mem_mib", "bytes_total")}
    partial["pre_quant"] = {"val_bpb": None}
    rows = [rb.make_row("default", OK, SUMMARY, 900e12),
            rb.make_row("seed162", OK, partial, 900e12),
            rb.make_row("baseline", dict(status="failed", returncode=1, wall_s=3.0, error="boom"), {}, 900e12),
            rb.make_row("ghost", OK, {}, 900e12)]
    table = rb.format_table(rows).splitlines()
    assert table[0].split()[:3] == ["config", "status", "steps"]
    assert len(table) == 2 + len(rows)
    full = table[2]
    for text in ("default", "1000", "150.0", "3,500,000", "5.8", "10,240", "1.2000", "1.1900", "+0.0040", "12.5",
                 "15,056,000", "True"):
        assert text in full.split(), text
    assert "-" in table[3].split() and "1.1900" not in table[3]
    assert table[4].split()[:3] == ["baseline", "failed", "-"]
    assert rows[3]["status"] == "no summary"  # exit 0 without a summary is not a success


def test_write_reports_header_and_rows(tmp_path):
    meta = dict(hardware="NVIDIA H100 x 8", torch="2.11.0", cuda="12.8", git_commit="abc1234",
                peak_tflops="750 TFLOP/s", seconds_per_run=150, data="bench_data/proxy_sp1024: proxy, NOT FineWeb")
    rows = [rb.make_row("default", OK, SUMMARY, 750e12),
            rb.make_row("baseline", dict(status="failed", returncode=2, wall_s=1.0, error="ValueError: x"), {}, 1.0)]
    csv_path, md_path = rb.write_reports(rows, meta, str(tmp_path / "out"), "20260101_000000")
    assert csv_path.endswith("bench_20260101_000000.csv") and md_path.endswith(".md")
    lines = pathlib.Path(csv_path).read_text().splitlines()
    assert lines[0] == "# hardware: NVIDIA H100 x 8" and any("NOT FineWeb" in x for x in lines)
    table = list(csv.DictReader(x for x in lines if not x.startswith("#")))
    assert [r["config"] for r in table] == ["default", "baseline"]
    assert float(table[0]["post-quant bpb"]) == 1.19 and table[1]["post-quant bpb"] == "-"
    assert table[1]["error"] == "ValueError: x"
    md = pathlib.Path(md_path).read_text()
    assert "- git_commit: abc1234" in md and "| default | ok | 1000 |" in md and "ValueError: x" in md


def test_config_env_presets_and_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("PRESET", "seed162")
    env = rb.config_env("default", str(tmp_path), "bench_x", str(tmp_path / "runs"), 150, {"NUM_LAYERS": "2"})
    assert "PRESET" not in env  # default = no PRESET, even if the caller's shell has one
    assert env["TOKENIZER_PATH"] == os.path.join(str(tmp_path), "fineweb_1024_bpe.model")
    assert env["SUBMISSION_JSON"] == os.path.join(str(tmp_path / "runs"), "bench_x_submission.json")
    assert (env["MAX_WALLCLOCK_SECONDS"], env["VAL_LOSS_EVERY"], env["NUM_LAYERS"]) == ("150", "0", "2")
    env = rb.config_env("baseline", "d", "r", "l", 30, {"MAX_WALLCLOCK_SECONDS": "5"})
    assert env["PRESET"] == "baseline" and env["MAX_WALLCLOCK_SECONDS"] == "5"
    assert rb.parse_configs("baseline, fast=default,") == [("baseline", "baseline"), ("fast", "default")]
    assert rb.per_config_env(["fast:QAT=0"], ["baseline", "fast"]) == {"baseline": {}, "fast": {"QAT": "0"}}
    with pytest.raises(SystemExit):
        rb.per_config_env(["nope:QAT=0"], ["baseline"])


def test_run_config_records_failure_and_timeout(tmp_path, capsys):
    fail = [sys.executable, "-c", "print('step 1'); raise ValueError('bad knob')"]
    res = rb.run_config(fail, dict(os.environ), tmp_path / "fail.out")
    assert (res["status"], res["returncode"]) == ("failed", 1)
    assert res["error"] == "ValueError: bad knob"
    assert "step 1" in (tmp_path / "fail.out").read_text() and "bad knob" in capsys.readouterr().out
    hang = [sys.executable, "-c", "import time; print('x', flush=True); time.sleep(60)"]
    res = rb.run_config(hang, dict(os.environ), tmp_path / "hang.out", timeout=1)
    assert res["status"] == "timeout" and res["wall_s"] < 30


def test_last_error_line_prefers_the_cause():
    torchrun = ["Traceback (most recent call last):", '  File "train_gpt.py", line 9',
                "torch.OutOfMemoryError: CUDA out",
                "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "  error_file: <N/A>", ""]
    assert rb.last_error_line(torchrun) == "torch.OutOfMemoryError: CUDA out"
    assert rb.last_error_line(["x", "train_gpt.py: error: PRESET='x' is unknown", "y"]).endswith("is unknown")
    assert rb.last_error_line(["a", "b", "  "]) == "b" and rb.last_error_line([]) == ""


def test_cpu_peak_is_a_plausible_flop_rate():
    peak = rb.measure_peak_flops("cpu", size=128, reps=3)
    assert math.isfinite(peak) and 1e6 < peak < 1e14


def test_dry_run_end_to_end(tmp_path):
    needed = [ROOT / "train_gpt.py", ROOT / "data" / "prepare_proxy.py", pathlib.Path(rb.SHARED_PROXY)]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        pytest.skip(f"the dry run needs {', '.join(missing)}")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run_bench.py"), "--dry-run", "--configs",
                           "baseline,default", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (csv_path,) = tmp_path.glob("bench_*.csv")
    rows = list(csv.DictReader(x for x in csv_path.read_text().splitlines() if not x.startswith("#")))
    assert [(r["config"], r["status"]) for r in rows] == [("baseline", "ok"), ("default", "ok")], rows
    for r in rows:
        assert int(r["steps"]) == 4 and r["valid"] == "True"
        assert 0 < float(r["post-quant bpb"]) < 20 and 0 < float(r["pre-quant bpb"]) < 20
        assert float(r["MFU %"]) > 0 and int(r["artifact bytes"]) > 0
        assert (tmp_path / "runs" / f"{r['run_id']}.json").exists()
        assert (r["TTT bpb"] != "-") == (r["config"] == "default")  # TTT: on in the default stack only
        assert float(r["evals 8x full s"]) > 0
    assert not list((tmp_path / "runs").glob("*.ptz"))
    assert "NOT FineWeb" in csv_path.read_text() and "post-quant bpb" in proc.stdout


def test_eval_projection_to_the_full_validation_set_on_8_devices():
    s = dict(SUMMARY, world_size=1, roundtrip=dict(eval_time_s=2.0, tokens=100),
             final=dict(SUMMARY["final"], eval_time_s=3.0), ttt=dict(eval_time_s=5.0, val_bpb=1.1))
    # 10 s for 100 targets on 1 device: 62,021,632 targets on 8 devices
    assert rb.eval_full_seconds(s) == pytest.approx(10.0 * 62_021_632 / 100 / 8)
    same = dict(s, final=dict(s["roundtrip"], tokens=100), ttt=None)  # EVAL_STRIDE=0: one eval, counted once
    assert rb.eval_full_seconds(same) == pytest.approx(2.0 * 62_021_632 / 100 / 8)
    assert rb.eval_full_seconds({}) is None
    row = rb.make_row("default", OK, s, 1.0)
    assert "1.1000" in rb.format_table([row]).splitlines()[2].split()
