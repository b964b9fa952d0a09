"""tools/plot_runs.py and tools/compare_runs.py: the log parser reads every line kind, runs plot and compare, bad
inputs get one line each naming the file, and train_gpt.py logs the switch events the plot marks."""
import json
import math
import shutil

import numpy as np
import pytest

from conftest import ROOT, cpu_runtime, tiny_env
import train_gpt
from tools import compare_runs, plot_runs, runlog
from tools.runlog import RunError, load_run, parse_log

EXAMPLES = ROOT / "docs" / "example_runs"
EXAMPLE_IDS = ["cpu_sample_wd50", "cpu_sample_wd20"]

# One line of each kind train_gpt.py writes (see tools/runlog.py), a qat:on line as written before it carried its
# train time, a switch the parser has never heard of, noise, and a last line cut short by a crash.
LOG = """\
run_id:abc code_bytes:57849 code_sha256:35a4b15ec741acda
torch:2.13.0+cpu cuda:None python:3.11.7 hardware:1x CPU (x86_64, 2 cores)
config:{"preset": "seed162", "iterations": 40, "run_id": "abc"}
train_loader:dataset:data/sample train_shards:1 val_tokens:63638
warmup_step:1/2
step:1/40 train_loss:6.9000 train_time:1000ms step_avg:1000.00ms
step:2/40 train_loss:6.5000 train_time:2000ms step_avg:1000.00ms
step:10/40 train_loss:5.0000 train_time:10000ms step_avg:1000.00ms
step:10/40 val_loss:4.9000 val_bpb:2.8000 train_time:10001ms step_avg:1000.10ms
warmdown:on step:12 train_time:12500ms
qat:on step:16 progress:0.800
looping:on step:18 layers:2-5 train_time:18000ms
step:20/40 train_loss:4.0000 train_time:20000ms step_avg:1000.00ms
step:20/40 val_loss:3.9000 val_bpb:2.2000 train_time:20002ms step_avg:1000.10ms
stopping_early: wallclock_cap train_time:20002ms step:20/40
averaging: applied EMA over 20 updates
pre_quant val_loss:3.9100 val_bpb:2.2100 eval_time:4776ms
Serialized model int6_zstd: 16000000 bytes  Code size: 57849 bytes  Total submission size: 16057849 bytes
ARTIFACT OVER CAP: 16057849 bytes is 57849 over 16000000; this run is not a valid submission
final_int6_zstd_roundtrip val_loss:3.9200 val_bpb:2.2150 eval_time:5172ms
final_int6_zstd_roundtrip_exact val_loss:3.90000000 val_bpb:2.20500000 scored_tokens:63638 scored_bytes:160557 stride:64 eval_time:6819ms
quant_gap_bpb:+0.00500 (standard eval, post - pre)
peak memory allocated: 0 MiB
summary:logs/abc.json submission:submission.json
step:21/40 train_loss:3.9
"""


def write(path, text):
    path.write_text(text)
    return str(path)


def test_log_parser_reads_every_line_kind(tmp_path):
    run = load_run(write(tmp_path / "abc.txt", LOG))
    assert (run.run_id, run.preset) == ("abc", "seed162")
    assert run.train == [(1, 6.9, 1000.0), (2, 6.5, 2000.0), (10, 5.0, 10000.0), (20, 4.0, 20000.0)]
    assert run.val == [(10, 2.8, 10001.0), (20, 2.2, 20002.0)]
    # every `<name>:on step:<n>` line is a switch; qat's time, not logged, is interpolated between steps 10 and 20
    assert [(e["name"], e["step"]) for e in run.events] == [("warmdown", 12), ("qat", 16), ("looping", 18)]
    assert run.events[0]["train_time_ms"] == 12500 and run.events[2]["train_time_ms"] == 18000
    assert run.events[1]["train_time_ms"] == pytest.approx(16000)
    assert (run.steps, run.step_avg_ms) == (20, pytest.approx(1000.1))  # stopped early at 20 of 40
    assert (run.pre_quant_bpb, run.roundtrip_bpb, run.final_bpb, run.quant_gap_bpb) == (2.21, 2.215, 2.205, 0.005)
    assert (run.bytes_total, run.artifact_valid, run.eval_s, run.ttt_bpb) == (16057849, False, 6.819, None)


def test_a_finished_log_ran_all_its_iterations(tmp_path):
    text = LOG.replace("stopping_early: wallclock_cap train_time:20002ms step:20/40\n", "")
    assert load_run(write(tmp_path / "abc.txt", text)).steps == 40
    unfinished = LOG.split("stopping_early")[0]  # still training: the last logged step
    assert load_run(write(tmp_path / "abc.txt", unfinished)).steps == 20


def test_summary_numbers_win_and_the_log_beside_it_gives_the_curves():
    s = json.loads((EXAMPLES / "cpu_sample_wd50.json").read_text())
    run = load_run(str(EXAMPLES / "cpu_sample_wd50.json"))
    assert run.final_bpb == s["final"]["val_bpb"] and run.pre_quant_bpb == s["pre_quant"]["val_bpb"]
    assert run.steps == s["steps"] and run.bytes_total == s["bytes_total"] and run.eval_s == s["final"]["eval_time_s"]
    assert [(st, loss) for st, loss, _ in run.train] == [tuple(p) for p in s["train_losses"]]
    assert run.val and all(t is not None for *_, t in run.train) and not run.times_estimated
    from_log = load_run(str(EXAMPLES / "cpu_sample_wd50.txt"))
    assert from_log.final_bpb == run.final_bpb and from_log.val == run.val  # the .json is read beside the .txt
    assert [e["name"] for e in run.events] == [e["name"] for e in s["events"]] == ["looping", "warmdown", "qat"]


def test_summary_alone_estimates_times_from_the_step_average(tmp_path):
    shutil.copy(EXAMPLES / "cpu_sample_wd50.json", tmp_path / "alone.json")
    run = load_run(str(tmp_path / "alone.json"))
    assert run.times_estimated and run.val == []
    step, _, t = run.train[-1]
    assert t == pytest.approx(step * run.step_avg_ms)


def test_a_summary_without_times_still_plots_against_steps(tmp_path):
    s = json.loads((EXAMPLES / "cpu_sample_wd50.json").read_text())
    del s["step_avg_ms"]
    path = write(tmp_path / "bare.json", json.dumps(s))
    run = load_run(path)
    assert run.train and all(t is None for *_, t in run.train)
    assert plot_runs.main([path, "--out", str(tmp_path / "bare.png")]) == 0


def test_a_companion_from_another_run_is_ignored(tmp_path):
    shutil.copy(EXAMPLES / "cpu_sample_wd50.json", tmp_path / "x.json")
    write(tmp_path / "x.txt", LOG)  # run abc
    run = load_run(str(tmp_path / "x.json"))
    assert run.run_id == "cpu_sample_wd50" and run.val == [] and "not cpu_sample_wd50" in run.notes[0]


@pytest.mark.parametrize("name, content, reason", [
    ("notes.txt", "just some text\nstep: not a step\n", "not a train_gpt.py log"),
    ("model.ptz", b"\x28\xb5\x2f\xfd\0\0\x01", "binary file"),
    ("submission.json", '{"val_bpb": 2.1, "bytes_total": 5, "track": "non-record"}', "a submission file"),
    ("broken.json", '{"run_id": "x", ', "not JSON"),
    ("other.json", '{"run_id": "x"}', "not a train_gpt.py summary"),
    ("odd.json", '{"run_id": "x", "config": {}, "train_losses": [3]}', "malformed fields"),
    ("missing.json", None, "No such file"),
])
def test_not_a_run_is_refused_naming_why(tmp_path, name, content, reason):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(RunError, match=reason):
        load_run(str(path))


def png_colors(path):
    from PIL import Image
    image = Image.open(path).convert("RGB")
    return image.size, {rgb for _, rgb in image.getcolors(maxcolors=1 << 20)}


TAB_BLUE, TAB_ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two line colours


def test_bad_inputs_get_one_line_each_and_the_other_runs_still_plot(tmp_path, capsys):
    no_steps = write(tmp_path / "nosteps.txt", "\n".join(l for l in LOG.splitlines() if not l.startswith("step:")))
    not_a_log = write(tmp_path / "notes.txt", "hello\n")
    sub = write(tmp_path / "sub.json", '{"val_bpb": 2.1, "bytes_total": 5}')
    good = [str(EXAMPLES / f"{r}.json") for r in EXAMPLE_IDS]
    out = tmp_path / "runs.png"
    gone = str(tmp_path / "gone.txt")
    rc = plot_runs.main([no_steps, good[0], not_a_log, sub, good[1], gone, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and out.exists()
    assert len(err) == 4, err
    for line, path, why in zip(err, [no_steps, not_a_log, sub, gone],
                               ["no logged steps", "not a train_gpt.py log", "submission", "No such file"]):
        assert line.startswith(f"plot_runs.py: skipping {path}: ") and why in line, line
    size, colors = png_colors(out)
    assert size == (880, 600) and {TAB_BLUE, TAB_ORANGE} <= colors  # both runs are drawn, nothing else is
    assert (0x2C, 0xA0, 0x2C) not in colors  # the third colour: no line for a skipped file


def test_nothing_to_plot_is_an_error(tmp_path, capsys):
    assert plot_runs.main([write(tmp_path / "a.txt", "x\n"), "--out", str(tmp_path / "o.png")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "plot_runs.py: error: nothing to plot"
    assert not (tmp_path / "o.png").exists()


def test_missing_matplotlib_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert plot_runs.main([str(EXAMPLES / "cpu_sample_wd50.json"), "--out", str(tmp_path / "o.png")]) == 2
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_plotting_two_tiny_cpu_runs_writes_a_png(markov_data, tmp_path, capsys):
    common = dict(ITERATIONS=6, TRAIN_LOG_EVERY=1, VAL_LOSS_EVERY=3, VAL_MAX_TOKENS=256, QAT=1, QAT_START_FRAC=0.5,
                  WARMDOWN_FRAC=0.5)
    for run_id, extra in (("tiny_a", {}), ("tiny_b", dict(QAT=0, MATRIX_LR=0.02))):
        args = train_gpt.Hyperparameters.from_env(tiny_env(**markov_data, **{**common, **extra}, RUN_ID=run_id))
        train_gpt.run(args, cpu_runtime())
    logs = tmp_path / "logs"
    a = json.loads((logs / "tiny_a.json").read_text())
    # QAT from progress 0.5 (step index 3), looping from ENABLE_LOOPING_AT=0.35 (step index 3); the LR scale first
    # drops below 1 after progress 0.5 (step index 4)
    assert [(e["name"], e["step"]) for e in a["events"]] == [("qat", 3), ("looping", 3), ("warmdown", 4)]
    assert [e["name"] for e in json.loads((logs / "tiny_b.json").read_text())["events"]] == ["looping", "warmdown"]
    log = (logs / "tiny_a.txt").read_text()
    for e in a["events"]:
        assert f"{e['name']}:on step:{e['step']} " in log and f"train_time:{e['train_time_ms']}ms" in log
    assert load_run(str(logs / "tiny_a.txt")).events == a["events"]

    out = tmp_path / "runs.png"
    assert plot_runs.main([str(logs / "tiny_a.json"), str(logs / "tiny_b.txt"), "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < out.stat().st_size < 500_000
    size, colors = png_colors(out)
    assert size == (880, 600) and {TAB_BLUE, TAB_ORANGE} <= colors


def test_compare_table_holds_each_summary_figure(tmp_path, capsys):
    s = json.loads((EXAMPLES / "cpu_sample_wd50.json").read_text())
    ran_ttt = f"{s['ttt']['val_bpb']:.4f}"  # the example ran the default stack's TTT
    s["ttt"] = dict(val_bpb=1.23456)  # another TTT score
    s["run_id"] = "with_ttt"
    paths = [str(EXAMPLES / "cpu_sample_wd50.json"), write(tmp_path / "with_ttt.json", json.dumps(s)),
             write(tmp_path / "junk.txt", "junk\n")]
    assert compare_runs.main(paths) == 0
    out, err = capsys.readouterr()
    header, plain, ttt = [line.split() for line in out.strip().splitlines()]
    assert header == ["run_id", "preset", "steps", "ms/step", "pre_quant_bpb", "roundtrip_bpb", "quant_gap", "ttt_bpb",
                      "artifact_bytes", "eval_s"]
    assert plain == ["cpu_sample_wd50", s["config"]["preset"], str(s["steps"]), f"{s['step_avg_ms']:.1f}",
                     f"{s['pre_quant']['val_bpb']:.4f}", f"{s['final']['val_bpb']:.4f}", f"{s['quant_gap_bpb']:+.5f}",
                     ran_ttt, f"{s['bytes_total']:,}", f"{s['final']['eval_time_s']:.1f}"]
    assert ttt[0] == "with_ttt" and ttt[7] == "1.2346" and ttt[1:7] == plain[1:7]
    assert err.strip() == f"compare_runs.py: skipping {paths[2]}: not a train_gpt.py log (no run_id:, config: or " \
                          "step: lines)"


def test_compare_reads_a_log_alone_and_marks_an_artifact_over_the_cap(tmp_path, capsys):
    assert compare_runs.main([write(tmp_path / "abc.txt", LOG), "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2] == "| abc | seed162 | 20 | 1000.1 | 2.2100 | 2.2050 | +0.00500 | - | 16,057,849* | 6.8 |"
    assert lines[3].startswith("* over the 16,000,000-byte artifact cap")


def write_docs(path, nats: dict, nbytes, targets=None):
    lines = ["\t".join(["doc", "first_pos", "targets", "bytes"] + [f"nats_{k}" for k in nats])]
    for i, b in enumerate(nbytes):
        t = targets[i] if targets is not None else b // 2
        lines.append("\t".join([str(i), str(100 * i), str(t), str(b)] + [repr(float(v[i])) for v in nats.values()]))
    return write(path, "\n".join(lines) + "\n")


def docs_output(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    ci = lambda s: [float(v) for v in s.split("[")[1].split("]")[0].split(",")]
    return dict(a=float(out[1].split("val_bpb:")[1]), b=float(out[2].split("val_bpb:")[1]),
                diff=float(out[3].split()[3]), t_ci=ci(out[4]), p=float(out[4].split("p=")[1]), boot_ci=ci(out[5]))


def test_per_document_comparison_by_hand(tmp_path, capsys):
    nbytes = np.array([100, 300, 200, 400])
    a = np.array([50.0, 160.0, 90.0, 230.0])
    delta = np.array([1.0, 2.0, 0.0, 3.0])  # B is worse on 3 documents of 4
    pa = write_docs(tmp_path / "a.docs.tsv", dict(plain=a), nbytes)
    pb = write_docs(tmp_path / "b.docs.tsv", dict(plain=a - 5, ttt=a + delta), nbytes)
    assert compare_runs.main([pa, pb]) == 0  # default column: each file's last (B's ttt, A's plain)
    r = docs_output(capsys)
    ln2 = math.log(2)
    assert r["a"] == pytest.approx(a.sum() / ln2 / 1000, abs=1e-8)
    assert r["diff"] == pytest.approx(6 / ln2 / 1000, abs=1e-8)
    d = delta / ln2  # by hand: sum of per-document bits, its standard error sqrt(n) * sd
    se = 2 * np.std(d, ddof=1) / 1000
    assert r["t_ci"] == pytest.approx([6 / ln2 / 1000 - 2.5758293 * se, 6 / ln2 / 1000 + 2.5758293 * se], abs=1e-8)
    assert r["p"] == pytest.approx(math.erfc(6 / ln2 / 1000 / se / math.sqrt(2)), rel=5e-3)  # printed to 3 digits
    assert r["boot_ci"][0] <= r["diff"] <= r["boot_ci"][1]
    assert compare_runs.main([pa, pb, "--column", "plain"]) == 0
    assert docs_output(capsys)["diff"] == pytest.approx(-20 / ln2 / 1000, abs=1e-8)


def test_per_document_pairing_separates_a_small_consistent_gain_from_noise(tmp_path, capsys):
    rng = np.random.default_rng(0)
    nbytes = rng.integers(200, 5000, size=2000)
    a = nbytes * rng.uniform(0.5, 1.0, size=2000)  # documents differ far more than the two runs do
    better = a * (1 - 0.002 + rng.normal(0, 0.002, size=2000))
    noise = a * (1 + rng.normal(0, 0.002, size=2000))
    pa = write_docs(tmp_path / "a.docs.tsv", dict(plain=a), nbytes)
    assert compare_runs.main([pa, write_docs(tmp_path / "b.docs.tsv", dict(plain=better), nbytes)]) == 0
    r = docs_output(capsys)
    assert r["p"] < 0.01 and r["t_ci"][1] < 0 and r["boot_ci"][1] < 0
    assert compare_runs.main([pa, write_docs(tmp_path / "c.docs.tsv", dict(plain=noise), nbytes)]) == 0
    r = docs_output(capsys)
    assert r["t_ci"][0] < 0 < r["t_ci"][1] and r["boot_ci"][0] < 0 < r["boot_ci"][1] and r["p"] > 0.01


def test_per_document_one_file_audits_its_ttt_gain(tmp_path, capsys):
    nbytes = np.array([10, 20, 30])
    p = write_docs(tmp_path / "r.docs.tsv", dict(plain=np.array([7.0, 14, 21]), ttt=np.array([6.0, 14, 20])), nbytes)
    assert compare_runs.main([p]) == 0
    assert docs_output(capsys)["diff"] == pytest.approx(-2 / math.log(2) / 60, abs=1e-8)


def test_per_document_errors_are_one_line(tmp_path, capsys):
    nbytes = np.array([10, 20, 30])
    pa = write_docs(tmp_path / "a.docs.tsv", dict(plain=np.ones(3)), nbytes)
    other = write_docs(tmp_path / "b.docs.tsv", dict(plain=np.ones(3)), nbytes, targets=[5, 9, 15])
    cases = [([pa, other], "score different documents (targets differs)"),
             ([pa], "compares its plain and TTT columns, and it has only plain"),
             ([pa, pa, "--column", "ttt"], "no nats_ttt column (it has plain)"),
             ([pa, str(tmp_path / "missing.docs.tsv")], "missing.docs.tsv: No such file"),
             ([pa, str(EXAMPLES / "cpu_sample_wd50.json")], "one or two .docs.tsv files and nothing else"),
             ([write(tmp_path / "x.docs.tsv", "doc\tfoo\n")], "not a per-document score file")]
    for argv, message in cases:
        assert compare_runs.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_runlog_reads_the_ttt_line(tmp_path):
    log = LOG + "final_ttt_exact val_loss:2.1 val_bpb:1.98765432 scored_tokens:9 scored_bytes:20 stride:64 " \
                "eval_time:10ms\n"
    run = runlog.load_run(write(tmp_path / "t.txt", log))
    assert run.ttt_bpb == 1.98765432
    assert runlog.load_run(write(tmp_path / "u.txt", LOG)).ttt_bpb is None


def test_readme_picture_is_committed_small_and_its_runs_say_what_data_they_saw():
    assert "](docs/example_runs/runs.png)" in (ROOT / "README.md").read_text()
    png = EXAMPLES / "runs.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 150_000
    for run_id in EXAMPLE_IDS:
        s = json.loads((EXAMPLES / f"{run_id}.json").read_text())
        assert s["run_id"] == run_id and "not FineWeb" in s["data"] and s["device"] == "cpu"
