"""Reads a run back from what train_gpt.py wrote: its log `logs/<RUN_ID>.txt`, its summary `logs/<RUN_ID>.json`, or
both (given either file, the other one beside it is read too). Shared by plot_runs.py and compare_runs.py.

The log lines relied on (anything else is ignored, so older and newer logs both read):

    run_id:<id> ...
    config:<json of the resolved Hyperparameters>                          (preset, iterations)
    step:<s>/<N> train_loss:<x> train_time:<ms>ms step_avg:<ms>ms
    step:<s>/<N> val_loss:<x> val_bpb:<x> train_time:<ms>ms step_avg:<ms>ms
    <name>:on step:<s> [<key>:<value> ...] [train_time:<ms>ms]              a switch: qat, warmdown, looping, ...
    stopping_early: wallclock_cap train_time:<ms>ms step:<s>/<N>
    pre_quant val_loss:<x> val_bpb:<x> eval_time:<ms>ms
    Serialized model <label>: <n> bytes  Code size: <n> bytes  Total submission size: <n> bytes
    final_<label>_roundtrip val_loss:<x> val_bpb:<x> eval_time:<ms>ms
    final_<label>_roundtrip_exact val_loss:<x> val_bpb:<x> scored_tokens:<n> scored_bytes:<n> stride:<n>
        eval_time:<ms>ms                                                    (all on one line)
    final_ttt_exact val_loss:<x> val_bpb:<x> scored_tokens:<n> ... eval_time:<ms>ms   (TTT_ENABLED=1)
    quant_gap_bpb:<x> ...

Steps are counted as in the log: `step:s` is logged after s optimizer steps, and `<name>:on step:s` means the switch
holds from the (s+1)-th step on, so both sit at x = s. Train times exclude validation (the script stops its clock).

While a run is on, its log is `logs/<RUN_ID>.txt.partial`, renamed to `.txt` when the run ends: a `.txt.partial` log
with no summary beside it is a run killed outright (or still running), read as an unfinished run.

A score that is not a finite number (nan, inf: the run diverged) makes the file unreadable as a run, so that no table
or plot shows it as a result; summaries are strict JSON (no NaN or Infinity).
"""
import bisect
import dataclasses
import json
import math
import os
import re
import sys


class RunError(ValueError):
    """A file that cannot be read as a run; the message says why, the caller names the file."""


PARTIAL = ".partial"  # train_gpt.py's log while the run is on, left so by a run killed outright


def split_run_path(path) -> tuple[str, str]:
    """(logs/abc, .json), (logs/abc, .txt) for logs/abc.json, logs/abc.txt and logs/abc.txt.partial."""
    return os.path.splitext(path.removesuffix(PARTIAL))


def read_text(path, errors="strict") -> str:
    """The text of `path`, or RunError saying why not (missing, a directory, a binary file, not UTF-8)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RunError(e.strerror or str(e)) from None
    if b"\0" in data[:4096]:
        raise RunError("a binary file, not text")
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise RunError(f"not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from None


def number(text) -> float:
    """float(text), refusing nan and inf (what a diverged run scores)."""
    value = float(text)
    if not math.isfinite(value):
        raise RunError(f"a non-finite number ({text})")
    return value


@dataclasses.dataclass
class Run:
    path: str                                   # the file the user named
    run_id: str
    preset: str = "-"
    train: list = dataclasses.field(default_factory=list)   # (step, train_loss, train_time_ms or None)
    val: list = dataclasses.field(default_factory=list)     # (step, val_bpb, train_time_ms)
    events: list = dataclasses.field(default_factory=list)  # {"name", "step", "train_time_ms" (None: unknown)}
    steps: int | None = None
    step_avg_ms: float | None = None
    pre_quant_bpb: float | None = None
    roundtrip_bpb: float | None = None          # reloaded artifact, non-overlapping eval (comparable to val_bpb)
    final_bpb: float | None = None              # reloaded artifact, the scored (exact, sliding) eval
    quant_gap_bpb: float | None = None
    ttt_bpb: float | None = None
    bytes_total: int | None = None
    artifact_valid: bool | None = None
    eval_s: float | None = None                 # the scored eval's time
    unfinished: bool = False                    # only a .txt.partial log: killed, or still running
    times_estimated: bool = False               # no log: train times are step x step_avg_ms
    notes: list = dataclasses.field(default_factory=list)

    def time_at(self, step) -> float | None:
        """Train time (ms) at `step`, interpolated between logged points; None when nothing gives a time."""
        known = {0: 0.0}
        for s, _, t in self.val + self.train:  # a step with a train and a val line: the earlier time
            if t is not None:
                known[s] = min(t, known.get(s, t))
        if len(known) == 1:
            return step * self.step_avg_ms if self.step_avg_ms else None
        points = sorted(known.items())
        steps = [s for s, _ in points]
        i = bisect.bisect_left(steps, step)
        if i < len(points) and steps[i] == step:
            return points[i][1]
        if i == len(points):  # past the last logged point: extend with the mean step time so far
            s, t = points[-1]
            return t + (step - s) * (self.step_avg_ms or t / max(s, 1))
        (s0, t0), (s1, t1) = points[i - 1], points[i]
        return t0 + (t1 - t0) * (step - s0) / (s1 - s0)


# ----------------------------------------------------------------------------------------------------------------------
# The log

RUN_ID = re.compile(r"^run_id:(\S+)")
STEP = re.compile(r"^step:(\d+)/(\d+) (.*)$")
EVENT = re.compile(r"^([A-Za-z_][\w.-]*):on step:(\d+)(?:\s|$)(.*)$")
FINAL = re.compile(r"^final_(\S+?)_roundtrip(_exact)? (.*)$")
TOTAL_BYTES = re.compile(r"Total submission size: (\d+) bytes")


def fields(text) -> dict[str, str]:
    """`a:1 b:2ms c` -> {"a": "1", "b": "2ms"}: the key:value tokens of a line."""
    return dict(tok.split(":", 1) for tok in text.split() if ":" in tok)


def ms(value: str) -> float:
    return number(value[:-2] if value.endswith("ms") else value)


def parse_line(line, out):
    """Adds what one log line says to `out`."""
    if (m := STEP.match(line)) and "step_avg:" in line:  # the last field: a line cut short lacks it
        step, f = int(m[1]), fields(m[3])
        time_ms, out["last_step_avg"] = ms(f["train_time"]), (step, ms(f["step_avg"]))
        out["iterations"] = int(m[2])
        if "train_loss" in f:
            out["train"].append((step, number(f["train_loss"]), time_ms))
        elif "val_bpb" in f:
            out["val"].append((step, number(f["val_bpb"]), time_ms))
    elif m := RUN_ID.match(line):
        out["run_id"] = m[1]
    elif line.startswith("config:{"):
        out["config"] = json.loads(line[len("config:"):])
    elif line.startswith("stopping_early:"):
        f = fields(line)
        out["stopped"] = (int(f["step"].split("/")[0]), ms(f["train_time"]))
    elif line.startswith("pre_quant "):
        out["pre_quant_bpb"] = number(fields(line)["val_bpb"])
    elif m := TOTAL_BYTES.search(line):
        out["bytes_total"] = int(m[1])
    elif line.startswith("ARTIFACT OVER CAP"):
        out["artifact_valid"] = False
    elif line.startswith("final_ttt_exact "):
        out["ttt_bpb"] = number(fields(line)["val_bpb"])
    elif m := FINAL.match(line):
        f = fields(m[3])
        if m[2]:
            out["final_bpb"], out["eval_s"] = number(f["val_bpb"]), ms(f["eval_time"]) / 1000
        else:
            out["roundtrip_bpb"] = number(f["val_bpb"])
    elif line.startswith("quant_gap_bpb:"):
        out["quant_gap_bpb"] = number(line.split()[0].split(":", 1)[1])
    elif m := EVENT.match(line):
        f = fields(m[3])
        out["events"].append(dict(name=m[1], step=int(m[2]),
                                  train_time_ms=ms(f["train_time"]) if "train_time" in f else None))


def parse_log(text: str) -> dict:
    """Everything the log says about the run, as summary-like keys; raises RunError if it is not a train_gpt.py log."""
    out = dict(train=[], val=[], events=[])
    for i, line in enumerate(text.splitlines(), 1):
        try:
            parse_line(line.strip(), out)
        except RunError as e:
            shown = line.strip() if len(line.strip()) <= 80 else line.strip()[:77] + "..."
            raise RunError(f"{e} on line {i} ({shown}): the run diverged") from None
        except (ValueError, KeyError, IndexError):  # a line cut short or a look-alike: not ours
            pass
    if "run_id" not in out and "config" not in out and not (out["train"] or out["val"]):
        raise RunError("not a train_gpt.py log (no run_id:, config: or step: lines)")
    return out


def read_log(path) -> dict:
    return parse_log(read_text(path, errors="replace"))  # a run killed mid-write can cut a character short


# ----------------------------------------------------------------------------------------------------------------------
# The summary

def read_summary(path) -> dict:
    text = read_text(path)
    try:
        s = json.loads(text, parse_constant=number, parse_float=number)  # NaN, Infinity, 1e999: not scores
    except RunError as e:
        raise RunError(f"{e} in its JSON: the run diverged") from None
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        raise RunError(f"not JSON ({e})") from None
    if not isinstance(s, dict) or not isinstance(s.get("config"), dict) or "run_id" not in s:
        if isinstance(s, dict) and "val_bpb" in s and "bytes_total" in s:
            raise RunError("a submission file, not a run summary (pass logs/<RUN_ID>.json or .txt)")
        raise RunError("not a train_gpt.py summary (no run_id and config)")
    return s


KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}


def typed(value, kind, name):
    """`value` if it is None or of type `kind` (float: any number); RunError naming it if not."""
    if value is None or (isinstance(value, bool) == (kind is bool)
                         and isinstance(value, (int, float) if kind is float else kind)):
        return value
    shown = json.dumps(value)
    raise RunError(f"{name} is {shown if len(shown) <= 40 else shown[:37] + '...'}, not {KINDS[kind]}")


# parse_log's key: where a summary keeps it, and its type
SUMMARY_FIELDS = dict(run_id=("run_id", str), steps=("steps", int), step_avg_ms=("step_avg_ms", float),
                      pre_quant_bpb=("pre_quant.val_bpb", float), roundtrip_bpb=("roundtrip.val_bpb", float),
                      final_bpb=("final.val_bpb", float), quant_gap_bpb=("quant_gap_bpb", float),
                      ttt_bpb=("ttt.val_bpb", float), bytes_total=("bytes_total", int),
                      artifact_valid=("artifact_valid", bool), eval_s=("final.eval_time_s", float))


def field(s: dict, path: str, kind):
    """s["a"]["b"] for the path "a.b" (s["a"] for "a"), None where a part is missing or null; RunError if of the wrong
    type."""
    parent, _, key = path.rpartition(".")
    if parent and (s := typed(s.get(parent), dict, parent)) is None:
        return None
    return typed(s.get(key), kind, path)


def summary_of(path) -> dict:
    """The summary at `path` in parse_log's terms."""
    s = read_summary(path)
    try:
        return from_summary(s)
    except RunError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise RunError(f"a summary with malformed fields ({type(e).__name__}: {e})") from None


def from_summary(s: dict) -> dict:
    out = {key: field(s, path, kind) for key, (path, kind) in SUMMARY_FIELDS.items()}
    out.update(config=s["config"], val=[],
               train=[(int(step), float(loss), None) for step, loss in s.get("train_losses") or []])
    if s.get("events") is not None:
        out["events"] = [dict(name=e["name"], step=int(e["step"]),
                              train_time_ms=typed(e.get("train_time_ms"), float, f"events[{i}].train_time_ms"))
                         for i, e in enumerate(s["events"])]
    elif s.get("qat_start_step") is not None:  # summaries written before the events list
        out["events"] = [dict(name="qat", step=typed(s["qat_start_step"], int, "qat_start_step"), train_time_ms=None)]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# A run from either file

def steps_and_avg(log: dict):
    """Steps run and ms per step, from the log alone."""
    if "stopped" in log:
        step, t = log["stopped"]
        return step, t / max(step, 1)
    finished = "final_bpb" in log or "roundtrip_bpb" in log or "pre_quant_bpb" in log
    last = max([s for s, *_ in log["train"] + log["val"]], default=None)
    steps = log.get("iterations") if finished else last
    avg = log["last_step_avg"][1] if "last_step_avg" in log else None
    return steps, avg


def load_run(path) -> Run:
    """A Run from `path` (a summary .json or a log .txt) and its companion beside it, if any. Raises RunError."""
    stem, ext = split_run_path(path)
    notes = []
    if ext == ".json":
        summary, log = summary_of(path), None
        companion = stem + ".txt"
    else:
        summary, log = None, read_log(path)
        companion = stem + ".json"
    if os.path.exists(companion):
        try:
            if log is None:
                log = read_log(companion)
            else:
                summary = summary_of(companion)
        except RunError as e:
            notes.append(f"ignored {companion}: {e}")
        else:
            ids = {summary["run_id"], log.get("run_id", summary["run_id"])}
            if len(ids) > 1:
                ours, theirs = (summary, log) if ext == ".json" else (log, summary)
                notes.append(f"ignored {companion}: it is run {theirs['run_id']}, not {ours['run_id']}")
                if ext == ".json":
                    log = None
                else:
                    summary = None
    run = Run(path=path, run_id="")
    if log is not None:
        run.steps, run.step_avg_ms = steps_and_avg(log)
        for key in ("train", "val", "events", "pre_quant_bpb", "roundtrip_bpb", "final_bpb", "quant_gap_bpb",
                    "ttt_bpb", "bytes_total", "artifact_valid", "eval_s"):
            if key in log:
                setattr(run, key, log[key])
    if summary is not None:  # exact figures win over the log's rounded ones; curves with times stay the log's
        for key, value in summary.items():
            if key in ("train", "val", "events") and log is not None or key == "config" or value is None:
                continue
            if hasattr(run, key):
                setattr(run, key, value)
        run.times_estimated = log is None and bool(run.train)
        if log is not None:  # the log's times with the summary's unrounded losses
            exact = {step: loss for step, loss, _ in summary["train"]}
            run.train = [(step, exact.get(step, loss), t) for step, loss, t in run.train]
    config = (summary or {}).get("config") or (log or {}).get("config") or {}
    run.preset = typed(config.get("preset"), str, "config.preset") or "-"
    run.run_id = (run.run_id or (log or {}).get("run_id") or typed(config.get("run_id"), str, "config.run_id")
                  or os.path.basename(stem))
    for e in run.events:
        if e["train_time_ms"] is None:
            e["train_time_ms"] = run.time_at(e["step"])
    run.train = [(s, loss, t if t is not None else run.time_at(s)) for s, loss, t in run.train]
    run.notes = notes
    run.unfinished = path.endswith(PARTIAL) and summary is None
    return run


def load_runs(paths, prog, need_points=False) -> list[Run]:
    """Every readable run among `paths`, in order. Each file that is not one (or, with need_points, has no logged
    step to draw) gets one line on stderr naming it, and is left out; a run named twice (its .json and its .txt)
    is read once."""
    runs, seen = [], {}
    for path in paths:
        stem = split_run_path(os.path.abspath(path))[0]
        if stem in seen:
            print(f"{prog}: skipping {path}: same run as {seen[stem]}", file=sys.stderr)
            continue
        try:
            run = load_run(path)
            if need_points and not (run.train or run.val):
                raise RunError("no logged steps (TRAIN_LOG_EVERY and VAL_LOSS_EVERY were 0, or it stopped before "
                               "the first log line)")
        except RunError as e:
            print(f"{prog}: skipping {path}: {e}", file=sys.stderr)
            continue
        for note in run.notes:
            print(f"{prog}: {path}: {note}", file=sys.stderr)
        seen[stem] = path
        runs.append(run)
    return runs
