"""tools/compare_runs.py and tools/plot_runs.py on inputs a user can hand them by mistake: every malformed file is one
line on stderr naming it and what is wrong (never a traceback), non-finite scores of a diverged run are refused, a
killed run's .txt.partial log is marked unfinished, and plot_runs says exactly which file it wrote."""
import json
import shutil

import numpy as np
import pytest

from conftest import ROOT
from test_tools import LOG, write, write_docs
from tools import compare_runs, plot_runs

EXAMPLE = ROOT / "docs" / "example_runs" / "cpu_sample_wd50.json"
SUMMARY = json.loads(EXAMPLE.read_text())


def summary(tmp_path, name, text=None, **changes):
    """A copy of the example summary as `name` with `changes` (`a__b=v` sets s["a"]["b"]), or `text` as `name`."""
    s = json.loads(json.dumps(SUMMARY))
    for key, value in changes.items():
        *parents, last = key.split("__")
        d = s
        for p in parents:
            d = d[p]
        d[last] = value
    return write(tmp_path / name, text if text is not None else json.dumps(s))


def one_line(capsys, prefix) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def compare_skips(capsys, path, rc=1) -> str:
    """compare_runs.py on `path` alone: one line naming it, and no table."""
    assert compare_runs.main([path]) == rc
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 2 and lines[1] == "compare_runs.py: error: no run to compare", err
    assert lines[0].startswith(f"compare_runs.py: skipping {path}: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------------
# A diverged run (issue 19, item 4)

@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_summary_with_a_non_finite_score_is_refused(tmp_path, capsys, token):
    text = json.dumps(SUMMARY).replace(json.dumps(SUMMARY["ttt"]["val_bpb"]), token)
    path = summary(tmp_path, "diverged.json", text)
    line = compare_skips(capsys, path)
    assert "non-finite" in line and "diverged" in line, line
    # beside a good run: named on stderr, left out of the table
    assert compare_runs.main([path, str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 2 and "cpu_sample_wd50" in out and "nan" not in out and "inf" not in out
    assert err.startswith(f"compare_runs.py: skipping {path}: ") and len(err.strip().splitlines()) == 1


def test_a_log_with_a_non_finite_score_is_refused_naming_the_line(tmp_path, capsys):
    text = LOG + "final_ttt_exact val_loss:nan val_bpb:nan scored_tokens:9 scored_bytes:20 stride:64 eval_time:10ms\n"
    line = compare_skips(capsys, write(tmp_path / "diverged.txt", text))
    assert f"line {len(LOG.splitlines()) + 1}" in line and "val_bpb:nan" in line and "diverged" in line, line
    diverged_training = LOG.replace("train_loss:4.0000", "train_loss:inf")
    line = compare_skips(capsys, write(tmp_path / "inf.txt", diverged_training))
    assert "train_loss:inf" in line, line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_per_document_scores_that_are_not_finite_are_refused(tmp_path, capsys, value):
    nbytes = np.array([10, 20, 30])
    good = write_docs(tmp_path / "a.docs.tsv", dict(plain=np.array([7.0, 14, 21])), nbytes)
    bad = write_docs(tmp_path / "b.docs.tsv", dict(plain=np.array([7.0, 14, 21]), ttt=np.array([6.0, 14, 20])), nbytes)
    with open(bad) as f:
        lines = f.read().splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\t" + value  # document 1's ttt score
    write(tmp_path / "b.docs.tsv", "\n".join(lines) + "\n")
    for argv in ([bad], [good, bad]):
        assert compare_runs.main(argv) == 2
        line = one_line(capsys, f"compare_runs.py: error: {bad}: ")
        assert "non-finite" in line and "nats_ttt" in line and "document 1" in line, line


# ----------------------------------------------------------------------------------------------------------------------
# Malformed files (issue 19, item 11)

@pytest.mark.parametrize("content, why", [
    (b"doc\tfirst_pos\ttargets\tbytes\tnats_plain\n0\t0\t5\t10\t3.0\n1\t5\t5\t10\t\xff\xfe\n", "not UTF-8"),
    (b"\x28\xb5\x2f\xfd\0\0\x01\x02", "binary file"),
    (b"", "not a per-document score file"),
    (b"doc\tfirst_pos\ttargets\tbytes\tnats_plain\n", "not a per-document score file"),
    (b"doc\tfirst_pos\ttargets\tbytes\tnats_plain\n0\t0\t5\t0\t3.0\n", "no bytes"),
])
def test_a_malformed_per_document_file_is_one_line(tmp_path, capsys, content, why):
    path = tmp_path / "x.docs.tsv"
    path.write_bytes(content)
    assert compare_runs.main([str(path)]) == 2
    assert why in one_line(capsys, f"compare_runs.py: error: {path}: ")


def test_a_directory_named_as_a_per_document_file_is_one_line(tmp_path, capsys):
    (tmp_path / "d.docs.tsv").mkdir()
    assert compare_runs.main([str(tmp_path / "d.docs.tsv")]) == 2
    assert "Is a directory" in one_line(capsys, f"compare_runs.py: error: {tmp_path / 'd.docs.tsv'}: ")


@pytest.mark.parametrize("changes, why", [
    (dict(steps="many"), 'steps is "many", not an integer'),
    (dict(steps=True), "steps is true, not an integer"),
    (dict(steps=12.5), "steps is 12.5, not an integer"),
    (dict(step_avg_ms="fast"), 'step_avg_ms is "fast", not a number'),
    (dict(final__val_bpb="low"), 'final.val_bpb is "low", not a number'),
    (dict(final="x"), 'final is "x", not an object'),
    (dict(ttt=[1.2]), "ttt is [1.2], not an object"),
    (dict(bytes_total="16MB"), 'bytes_total is "16MB", not an integer'),
    (dict(artifact_valid="yes"), 'artifact_valid is "yes", not true or false'),
    (dict(run_id=5), "run_id is 5, not a string"),
    (dict(config__preset=5), "config.preset is 5, not a string"),
    (dict(events=[dict(name="qat", step=3, train_time_ms="soon")]), 'events[0].train_time_ms is "soon", not a number'),
    (dict(events=[dict(step=3)]), "malformed fields"),
    (dict(train_losses=[[1, "x"]]), "malformed fields"),
])
def test_a_summary_field_of_the_wrong_type_is_one_line(tmp_path, capsys, changes, why):
    line = compare_skips(capsys, summary(tmp_path, "odd.json", **changes))
    assert why in line, line


def test_a_bad_summary_beside_a_log_is_ignored_naming_it(tmp_path, capsys):
    summary(tmp_path, "abc.json", run_id="abc", steps="many")
    log = write(tmp_path / "abc.txt", LOG)
    assert compare_runs.main([log]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split()[:3] == ["abc", "seed162", "20"]
    assert err.strip() == f"compare_runs.py: {log}: ignored {tmp_path / 'abc.json'}: steps is \"many\", not an integer"


@pytest.mark.parametrize("name, content, why", [
    ("empty.json", "", "not JSON"),
    ("empty.txt", "", "not a train_gpt.py log"),
    ("list.json", "[1, 2]", "not a train_gpt.py summary"),
    ("string.json", '"run"', "not a train_gpt.py summary"),
    ("huge.json", '{"run_id": "x", "config": {}, "steps": ' + "9" * 5000 + "}", "not JSON (Exceeds the limit"),
    ("bom.json", '\ufeff{"run_id": "x", "config": {}}', "not JSON (Unexpected UTF-8 BOM"),
    ("latin1.json", b'{"run_id": "\xe9"}', "not UTF-8"),
    ("nul.txt", b"run_id:x\0\0\0", "binary file"),
    ("dir.json", None, "Is a directory"),
    ("dir", None, "Is a directory"),
    ("missing.txt", "", "No such file"),
])
def test_odd_files_are_one_line_in_both_tools(tmp_path, capsys, name, content, why):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif name != "missing.txt":
        path.write_text(content)
    assert why in compare_skips(capsys, str(path))
    assert plot_runs.main([str(path), "--out", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0], "plot_runs.py: error: nothing to plot"] and why in err[0], err
    assert err[0].startswith(f"plot_runs.py: skipping {path}: ")


def test_a_log_with_no_steps_is_a_row_of_dashes_and_nothing_to_plot(tmp_path, capsys):
    path = write(tmp_path / "early.txt", LOG.split("step:1/40")[0])
    assert compare_runs.main([path]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["abc", "seed162"] + ["-"] * 8
    assert plot_runs.main([path, "--out", str(tmp_path / "p.png")]) == 1
    assert "no logged steps" in capsys.readouterr().err


def test_a_negative_seed_is_an_argument_error(tmp_path, capsys):
    p = write_docs(tmp_path / "r.docs.tsv", dict(plain=np.ones(3), ttt=np.ones(3)), np.array([1, 2, 3]))
    with pytest.raises(SystemExit) as e:
        compare_runs.main([p, "--seed", "-1"])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------------------------------
# A killed run

KILLED = LOG.split("stopping_early")[0]  # the log of a run killed while training: no final lines


def test_a_killed_runs_partial_log_is_marked_unfinished(tmp_path, capsys):
    partial = write(tmp_path / "abc.txt.partial", KILLED)
    assert compare_runs.main([partial, "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2].startswith("| abc (unfinished) | seed162 | 20 |"), lines
    assert lines[3].startswith("(unfinished): ") and ".txt.partial" in lines[3]
    done = write(tmp_path / "done.txt", KILLED.replace("run_id:abc", "run_id:done"))
    assert compare_runs.main([done]) == 0
    assert "unfinished" not in capsys.readouterr().out


def test_a_killed_run_even_with_final_lines_is_not_listed_as_finished(tmp_path, capsys):
    partial = write(tmp_path / "abc.txt.partial", LOG)  # killed at the very end, before the log was renamed
    assert compare_runs.main([partial]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[1].startswith("abc (unfinished)") and rows[-1].startswith("(unfinished): ")


def test_a_partial_log_and_its_summary_are_one_run(tmp_path, capsys):
    partial = write(tmp_path / "abc.txt.partial", KILLED)
    other = summary(tmp_path, "abc.json", run_id="abc")
    assert compare_runs.main([partial, other]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 2 and "(unfinished)" not in out  # the summary: the run got to its end
    assert err.strip() == f"compare_runs.py: skipping {other}: same run as {partial}"


def test_a_killed_run_plots_its_curves_labelled_unfinished(tmp_path, capsys, monkeypatch):
    labels, original = [], plot_runs.run_label
    monkeypatch.setattr(plot_runs, "run_label", lambda run: labels.append(original(run)) or labels[-1])
    out = tmp_path / "p.png"
    assert plot_runs.main([write(tmp_path / "abc.txt.partial", KILLED), "--out", str(out)]) == 0
    assert out.exists() and labels == ["abc (seed162): unfinished (killed or still running), no final score"]


# ----------------------------------------------------------------------------------------------------------------------
# plot_runs --out

@pytest.mark.parametrize("name", ["p.xyz", "p.png.bak"])
def test_plot_out_with_an_extension_matplotlib_cannot_write_lists_the_ones_it_can(tmp_path, capsys, name):
    assert plot_runs.main([str(EXAMPLE), "--out", str(tmp_path / name)]) == 2
    line = one_line(capsys, f"plot_runs.py: error: cannot write {tmp_path / name}: ")
    assert ".png" in line and ".pdf" in line and ".svg" in line, line
    assert list(tmp_path.iterdir()) == []


def test_plot_out_a_directory_writes_inside_it_and_prints_the_path(tmp_path, capsys):
    (tmp_path / "plots").mkdir()
    assert plot_runs.main([str(EXAMPLE), "--out", str(tmp_path / "plots")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'plots' / 'runs.png'}: 1 run"
    assert (tmp_path / "plots" / "runs.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name, written", [("runs", "runs.png"), ("runs.", "runs.png"), ("Runs.SVG", "Runs.SVG"),
                                           ("r.pdf", "r.pdf")])
def test_plot_prints_the_exact_path_it_wrote(tmp_path, capsys, name, written):
    assert plot_runs.main([str(EXAMPLE), "--out", str(tmp_path / name)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / written}: 1 run"
    assert [p.name for p in tmp_path.iterdir()] == [written]


@pytest.mark.skipif(shutil.which("xelatex") is not None, reason="LaTeX is installed: .pgf can be written")
def test_plot_out_in_a_format_whose_tool_is_missing_is_one_line(tmp_path, capsys):
    assert plot_runs.main([str(EXAMPLE), "--out", str(tmp_path / "p.pgf")]) == 1
    assert "xelatex" in one_line(capsys, f"plot_runs.py: error: cannot write {tmp_path / 'p.pgf'}: ")
