"""Turns N seeds of one config into a records/ folder, and tests the result against the previous record.

Usage:
  python tools/submit.py OUT_DIR RUN RUN RUN [--against PREVIOUS/submission.json] [--source train_gpt.py] [--force]

RUN is a run's logs/<RUN_ID> (or its .json or .txt), or a folder holding one run's files. Every seed must be a
finished, full run (no .txt.partial, a final score, not `"smoke": true`, an artifact under the cap, an eval within
its budget) of the same code (the code_sha256 on its log's first line) and the same config (every setting but
SEED, RUN_ID and where files go): the maintainers reject a mean over different configs.

OUT_DIR gets:
  train_gpt.py       the file the seeds ran. An OUT_DIR/train_gpt.py already there (tools/pack_submission.py OUT_DIR,
                     then the seeds run inside it: the recommended way, so bytes_code counts the packed file) is kept;
                     otherwise --source (default: this checkout's train_gpt.py) is packed with pack_submission.py.
                     The seeds must have run it, or the readable source it unpacks to.
  requirements.txt   this checkout's, unless one is there
  logs/              each seed's log and summary
  submission.json    upstream's keys: val_loss and val_bpb (means), val_loss_std and val_bpb_std (sample std,
                     n - 1), seeds, seed_results (val_loss, val_bpb, artifact_bytes, steps, step_avg_ms, eval_time_s
                     per seed), pytorch_version, ...; with --against, the comparison below
  README.md          a skeleton with the results table (an existing README.md is kept: the skeleton then goes to
                     README.results.md)

--against: the mean improvement in bpb and in nats per token (bpb x ln 2 x bytes/token of these seeds' scored text,
as #1855's delta_vs_leaderboard_nats, so it is comparable across tokenizers), and one-sided Welch t-tests over the
seeds: p for any improvement, and p for an improvement of at least 0.005 nats, the README's rule (p < 0.01).
"""
import argparse
import datetime
import filecmp
import hashlib
import json
import math
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.pack_submission import PackError, pack_source, unpack_source  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "submit.py"
RULE_NATS, RULE_P = 0.005, 0.01  # upstream README: beat the record by 0.005 nats at p < 0.01
PRACTICE_P = 0.25  # what the maintainers have accepted in practice: any gain at p < 0.25 over the previous row
# Settings that differ between the seeds of one config: the seed, and where the run read and wrote files (the data
# and tokenizer are compared by file name, so the same data on two machines is the same config).
PER_RUN = {"seed", "run_id", "log_dir", "submission_json", "data_path", "tokenizer_path", "data_label",
           "save_doc_scores", "author", "github_id", "name"}
SKELETON_MARK = "<!-- tools/submit.py skeleton: replace this line and the notes below with your own text -->"
PACK_STUB_MARK = "Results: fill in from `submission.json`"  # tools/pack_submission.py's README stub


class SubmitError(Exception):
    """One line naming the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------------
# Student-t tail and the one-sided Welch test (no scipy needed)

def betainc(a, b, x) -> float:
    """The regularized incomplete beta function I_x(a, b), from its continued fraction (modified Lentz method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below this point: use I_x(a,b) = 1 - I_(1-x)(b,a)
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(1000):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            return front * (f - 1.0)
    raise ArithmeticError(f"betainc({a}, {b}, {x}) did not converge")


def t_sf(t, df) -> float:
    """P(T > t) for Student's t with df (> 0, not necessarily whole) degrees of freedom."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2))
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def welch_one_sided(before, after, margin=0.0) -> tuple[float, float, float]:
    """(t, df, p) of Welch's test of mean(before) - mean(after) > margin (a lower score is better)."""
    n1, n2 = len(before), len(after)
    v1, v2 = statistics.variance(before) / n1, statistics.variance(after) / n2
    gain = statistics.fmean(before) - statistics.fmean(after) - margin
    if v1 + v2 == 0:  # identical seeds on both sides: the sign decides
        return math.copysign(math.inf, gain), math.inf, 0.0 if gain > 0 else 1.0
    t = gain / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
    return t, df, t_sf(t, df)


# ----------------------------------------------------------------------------------------------------------------------
# Reading the seeds

def run_prefix(arg) -> str:
    """logs/<RUN_ID> for a run named by its prefix, its .json/.txt/.txt.partial, or a folder holding one run."""
    if os.path.isdir(arg):
        names = sorted(os.listdir(arg))
        runs = [n[:-5] for n in names if n.endswith(".json") and not n.endswith(".submission.json")]
        runs += [n[:-12] for n in names if n.endswith(".txt.partial") and n[:-12] not in runs]
        if len(runs) != 1:
            found = f"{len(runs)} runs ({', '.join(runs)})" if runs else "no run (no <RUN_ID>.json)"
            raise SubmitError(f"{arg}: holds {found}; name one run as {os.path.join(arg, '<RUN_ID>')}")
        return os.path.join(arg, runs[0])
    for suffix in (".txt.partial", ".submission.json", ".json", ".txt"):
        if arg.endswith(suffix):
            return arg[:-len(suffix)]
    return arg


def has_final_score(summary) -> bool:
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        return False
    final = summary.get("ttt") or summary.get("final")
    needed = ("val_loss", "val_bpb", "eval_time_s")
    return isinstance(final, dict) and all(isinstance(final.get(k), (int, float)) for k in needed) and \
        all(k in summary for k in ("bytes_total", "steps", "step_avg_ms", "seed", "run_id"))


def load_seed(arg) -> dict:
    """The run's summary plus `prefix` and `code` (the log's code_bytes/code_sha256), after refusing a run that is
    not a finished, full, valid one."""
    prefix = run_prefix(arg)
    if os.path.exists(prefix + ".txt.partial"):
        raise SubmitError(f"{prefix}.txt.partial: that run did not finish (killed, or still running); "
                          "rerun the seed, or wait for it")
    for path, what in ((prefix + ".json", "summary"), (prefix + ".txt", "log")):
        if not os.path.isfile(path):
            raise SubmitError(f"{path} not found (the run's {what}): the run failed before its end or the path is "
                              "wrong; name logs/<RUN_ID> of a finished run")
    try:
        summary = json.load(open(prefix + ".json"))
    except ValueError:
        summary = None
    if not has_final_score(summary):
        raise SubmitError(f"{prefix}.json: no final score in it (a run that failed, or not a train_gpt.py summary); "
                          "rerun the seed")
    first = open(prefix + ".txt").readline()
    code = dict(kv.split(":", 1) for kv in first.split() if ":" in kv)
    if "code_sha256" not in code:
        raise SubmitError(f"{prefix}.txt: its first line has no code_sha256; name a log written by train_gpt.py")
    if summary["config"].get("eval_artifact"):
        raise SubmitError(f"{prefix}: a re-score of {summary['config']['eval_artifact']}, not a training run; "
                          "name the run that trained it")
    if summary.get("smoke"):
        why = "; ".join(summary.get("smoke_reasons") or []) or "marked smoke"
        raise SubmitError(f"{prefix}: a smoke run ({why}); a record needs full runs: rerun without VAL_MAX_TOKENS, "
                          "to the wall-clock cap")
    if not summary.get("artifact_valid", True):
        raise SubmitError(f"{prefix}: artifact over the cap (bytes_total {summary['bytes_total']:,} > 16,000,000); "
                          "shrink the model or set TARGET_BYTES, then rerun")
    if (summary.get("ttt") or {}).get("over_budget"):
        raise SubmitError(f"{prefix}: its TTT eval ran past the eval budget; lower the TTT cost, then rerun")
    return dict(summary, prefix=prefix, code=code)


def check_one_config(seeds) -> None:
    """One config, one code, one machine kind; distinct seeds."""
    first = seeds[0]
    seen = {}
    for s in seeds:
        if s["seed"] in seen:
            raise SubmitError(f"seed {s['seed']} appears twice ({seen[s['seed']]}, {s['prefix']}); "
                              "give runs of distinct seeds")
        seen[s["seed"]] = s["prefix"]
    for s in seeds[1:]:
        if s["code"]["code_sha256"] != first["code"]["code_sha256"]:
            raise SubmitError(f"{s['prefix']} ran code {s['code']['code_sha256']}, {first['prefix']} ran "
                              f"{first['code']['code_sha256']}: a record's seeds must run the same train_gpt.py; "
                              "rerun them with one file")
        diff = sorted(k for k in set(first["config"]) | set(s["config"]) if k not in PER_RUN
                      and first["config"].get(k) != s["config"].get(k))
        for k in ("data_path", "tokenizer_path"):
            if os.path.basename(os.path.normpath(str(first["config"].get(k)))) != \
                    os.path.basename(os.path.normpath(str(s["config"].get(k)))):
                diff.append(k)
        if diff:
            shown = ", ".join(f"{k.upper()} ({first['config'].get(k)!r} vs {s['config'].get(k)!r})" for k in diff[:3])
            raise SubmitError(f"{s['prefix']} and {first['prefix']} differ in {shown}"
                              f"{' and more' if len(diff) > 3 else ''}: a record's seeds must share one config; "
                              "rerun them with the same settings")
        for key in ("hardware", "torch_version"):
            if s.get(key) != first.get(key):
                raise SubmitError(f"{s['prefix']} ran on {key} {s.get(key)!r}, {first['prefix']} on "
                                  f"{first.get(key)!r}: run every seed on the same setup")


def seed_result(s) -> dict:
    final = s.get("ttt") or s["final"]  # a record reports its TTT score (as train_gpt.py's submission does)
    return dict(val_loss=round(final["val_loss"], 8), val_bpb=round(final["val_bpb"], 8),
                artifact_bytes=s["bytes_total"], steps=s["steps"], step_avg_ms=round(s["step_avg_ms"], 2),
                eval_time_s=round(final["eval_time_s"], 1))


def is_record_track(s) -> bool:
    """train_gpt.py's write_reports rule: 8 CUDA ranks, a wall-clock cap of at most 600 s, not a smoke run."""
    cap = s["config"].get("max_wallclock_seconds", 0)
    return s.get("device") == "cuda" and s.get("world_size") == 8 and 0 < cap <= 600 and not s.get("smoke")


# ----------------------------------------------------------------------------------------------------------------------
# The comparison with the previous record

def load_previous(path) -> dict:
    try:
        prev = json.load(open(path))
    except OSError as e:
        raise SubmitError(f"--against {path}: {e.strerror}; give the previous record's submission.json") from None
    except ValueError:
        raise SubmitError(f"--against {path}: not JSON; give the previous record's submission.json") from None
    results = prev.get("seed_results") if isinstance(prev, dict) else None
    bpbs = [r.get("val_bpb") for r in results.values()] if isinstance(results, dict) else []
    if len(bpbs) < 2 or not all(isinstance(b, (int, float)) for b in bpbs):
        raise SubmitError(f"--against {path}: no seed_results with a val_bpb for 2 or more seeds, so no p-value; "
                          "add them from the record's logs (seed_results: {seed: {val_bpb: ...}})")
    return dict(name=prev.get("name") or os.path.basename(os.path.dirname(os.path.abspath(path))), bpbs=bpbs)


def compare(prev, results) -> dict:
    """Improvement of these seeds over the previous record's: in bpb, and in nats per token of this submission's
    tokenization (k = val_loss / val_bpb = ln 2 x bytes/token), with the Welch p-values."""
    bpbs = [r["val_bpb"] for r in results]
    k = statistics.fmean(r["val_loss"] / r["val_bpb"] for r in results)
    delta_bpb = statistics.fmean(bpbs) - statistics.fmean(prev["bpbs"])
    t, df, p_gain = welch_one_sided(prev["bpbs"], bpbs)
    t_rule, df_rule, p_rule = welch_one_sided(prev["bpbs"], bpbs, margin=RULE_NATS / k)
    return dict(name=prev["name"], n_prev=len(prev["bpbs"]), prev_bpb=statistics.fmean(prev["bpbs"]),
                delta_bpb=delta_bpb, delta_nats=delta_bpb * k, t=t, df=df, p_gain=p_gain, t_rule=t_rule,
                p_rule=p_rule, holds=-delta_bpb * k >= RULE_NATS and p_rule < RULE_P)


def comparison_text(c) -> str:
    verdict = "holds" if c["holds"] else "does not hold"
    practice = "meets" if c["delta_bpb"] < 0 and c["p_gain"] < PRACTICE_P else "does not meet"
    return (f"Against {c['name']} ({c['n_prev']} seeds, mean {c['prev_bpb']:.8f} bpb): {c['delta_bpb']:+.5f} bpb, "
            f"{c['delta_nats']:+.5f} nats per token; one-sided Welch t-test over seeds: p = {c['p_gain']:.3g} for "
            f"any improvement (t = {c['t']:.3f}, df = {c['df']:.2f}), p = {c['p_rule']:.3g} for an improvement of at "
            f"least {RULE_NATS} nats. The README rule (>= {RULE_NATS} nats at p < {RULE_P}) {verdict}; it {practice} "
            f"what rows were accepted with in practice (a gain at p < {PRACTICE_P} over the previous row).")


# ----------------------------------------------------------------------------------------------------------------------
# The records folder

def sha16(data) -> str:
    """The code hash train_gpt.py logs (the first 16 hex digits of the SHA-256)."""
    return hashlib.sha256(data).hexdigest()[:16]


def shipped_code(out_dir, source, source_given) -> tuple[bytes, bytes, bool]:
    """(the train_gpt.py to ship, the readable source it runs, whether it is already in OUT_DIR)."""
    existing = os.path.join(out_dir, "train_gpt.py")
    if os.path.isfile(existing):
        shipped = open(existing, "rb").read()
        if source_given and shipped not in (open(source, "rb").read(), pack_source(open(source, "rb").read())):
            raise SubmitError(f"{existing} is neither --source {source} nor its packed form; remove one of them")
        try:
            return shipped, unpack_source(shipped), True
        except PackError:
            return shipped, shipped, True
    if not os.path.isfile(source):
        raise SubmitError(f"--source {source} not found; give the train_gpt.py the seeds ran")
    data = open(source, "rb").read()
    try:
        return data, unpack_source(data), False  # already packed: ship as is
    except PackError:
        return pack_source(data), data, False


def build_submission(seeds, results, shipped, readable, comparison) -> dict:
    first = seeds[0]
    cfg = first["config"]
    bpbs, losses = [r["val_bpb"] for r in results], [r["val_loss"] for r in results]
    sizes = [r["artifact_bytes"] for r in results]
    record = all(is_record_track(s) for s in seeds)
    sub = dict(
        name=cfg.get("name") or f"{cfg.get('preset', 'default')} stack", author=cfg.get("author", ""),
        github_id=cfg.get("github_id", ""),
        blurb=f"train_gpt.py PRESET={cfg.get('preset')}; {len(seeds)} seeds; {first.get('hardware')}; "
              f"data: {first.get('data')}",
        date=datetime.date.today().isoformat(), track="10min_16mb" if record else "non-record",
        val_loss=round(statistics.fmean(losses), 8), val_bpb=round(statistics.fmean(bpbs), 8),
        val_loss_std=round(statistics.stdev(losses), 8), val_bpb_std=round(statistics.stdev(bpbs), 8),
        seeds=[s["seed"] for s in seeds], seed_results={str(s["seed"]): r for s, r in zip(seeds, results)},
        artifact_bytes_mean=round(statistics.fmean(sizes)), artifact_bytes_max=max(sizes), bytes_total=max(sizes),
        bytes_code=len(shipped), train_steps_mean=round(statistics.fmean(r["steps"] for r in results), 2),
        step_avg_ms_mean=round(statistics.fmean(r["step_avg_ms"] for r in results), 2),
        hardware=first.get("hardware"), pytorch_version=first.get("torch_version"),
        cuda_version=first.get("cuda_version"), data=first.get("data"), ttt="ttt" in first,
        source_sha256=sha16(readable), run_ids=[s["run_id"] for s in seeds])
    if comparison:
        sub.update(comparison_baseline_bpb=round(comparison["prev_bpb"], 8),
                   delta_vs_baseline_bpb=round(comparison["delta_bpb"], 8),
                   delta_vs_baseline_nats=round(comparison["delta_nats"], 8), t_statistic=round(comparison["t"], 4),
                   welch_df=round(comparison["df"], 2), p_value=comparison["p_rule"],
                   p_value_any_gain=comparison["p_gain"])
    return sub


def readme_skeleton(sub, seeds, shipped, readable, comparison, ran_shipped) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.5f}"  # noqa: E731
    rows = []
    for s in seeds:
        r = sub["seed_results"][str(s["seed"])]
        rows.append(f"| {s['seed']} | `{s['run_id']}` | {r['steps']:,} | {r['step_avg_ms']:.1f} | "
                    f"{fmt(s.get('pre_quant', {}).get('val_bpb'))} | {fmt(s['final']['val_bpb'])} | "
                    f"{fmt((s.get('ttt') or {}).get('val_bpb'))} | {r['val_loss']:.8f} | **{r['val_bpb']:.8f}** | "
                    f"{r['artifact_bytes']:,} | {r['eval_time_s']:.1f} |")
    if shipped != readable:
        code = (f"`train_gpt.py` is {len(shipped):,} bytes: the packed (self-extracting) form of a {len(readable):,}-"
                f"byte program, sha256 `{sha16(readable)}...`; in the training repository, `python "
                "tools/pack_submission.py --unpack train_gpt.py` prints that program and `--check train_gpt.py "
                "--source SOURCE` confirms it is SOURCE with its docstrings and comments stripped")
    else:
        code = f"`train_gpt.py` is {len(shipped):,} bytes (readable source, sha256 `{sha16(readable)}...`)"
    if not ran_shipped:
        code += (". The seeds ran the readable source, so their bytes_code and artifact bytes count it: the shipped "
                 "file is smaller")
    cfg = seeds[0]["config"]
    return f"""# {sub['name']}

{SKELETON_MARK}

**val_bpb: {sub['val_bpb']:.8f}** ({len(seeds)}-seed mean, sample std {sub['val_bpb_std']:.5f}) | up to \
{sub['artifact_bytes_max']:,} bytes | {sub['hardware']} | track: {sub['track']}

What this submission changes, why, and whom it builds on: (write here)

## Results

Scores are the final evaluation of the artifact reloaded from disk (with TTT when it ran); bytes are code + artifact.

| Seed | Run | Steps | ms/step | Pre-quant bpb | Round-trip bpb | TTT bpb | val_loss | val_bpb | Bytes | Eval (s) |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
| **Mean** | | {sub['train_steps_mean']:,.0f} | {sub['step_avg_ms_mean']:.1f} | | | | {sub['val_loss']:.8f} | \
**{sub['val_bpb']:.8f}** | {sub['artifact_bytes_mean']:,} | |

Sample standard deviation over seeds: {sub['val_loss_std']:.5f} nats, {sub['val_bpb_std']:.5f} bpb.
{chr(10) + comparison_text(comparison) + chr(10) if comparison else ''}
## Reproducing

```bash
pip install -r requirements.txt
PRESET={cfg.get('preset')} SEED=<seed> RUN_ID=<run id> DATA_PATH=... TOKENIZER_PATH=... \\
  torchrun --standalone --nproc_per_node=8 train_gpt.py
```

plus the variables set for these runs: each log's `config:` line (logs/) holds every resolved setting, and the seeds
differ only in SEED and RUN_ID. Data: {sub['data']}. PyTorch {sub['pytorch_version']}, CUDA {sub['cuda_version']}.
{code}.
"""


def write_record(out_dir, seeds, shipped, in_place, submission, readme, force) -> list[str]:
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    sub_path = os.path.join(out_dir, "submission.json")
    if os.path.exists(sub_path) and not force:
        raise SubmitError(f"{sub_path} exists; pass --force to replace it")
    copies = []
    for s in seeds:
        for suffix in (".txt", ".json"):
            src, dest = s["prefix"] + suffix, os.path.join(out_dir, "logs", os.path.basename(s["prefix"]) + suffix)
            if os.path.exists(dest) and os.path.samefile(src, dest):
                continue
            if os.path.exists(dest) and not filecmp.cmp(src, dest, shallow=False) and not force:
                raise SubmitError(f"{dest} exists and differs from {src}; pass --force to replace it")
            copies.append((src, dest))
    written = []
    if not in_place:
        with open(os.path.join(out_dir, "train_gpt.py"), "wb") as f:
            f.write(shipped)
        written.append("train_gpt.py")
    if not os.path.exists(os.path.join(out_dir, "requirements.txt")):
        shutil.copyfile(os.path.join(ROOT, "requirements.txt"), os.path.join(out_dir, "requirements.txt"))
        written.append("requirements.txt")
    for src, dest in copies:
        shutil.copyfile(src, dest)
        written.append(os.path.relpath(dest, out_dir))
    with open(sub_path, "w") as f:
        f.write(json.dumps(submission, indent=2) + "\n")
    written.append("submission.json")
    readme_path = os.path.join(out_dir, "README.md")
    old = open(readme_path).read() if os.path.exists(readme_path) else None
    name = "README.md" if old is None or SKELETON_MARK in old or PACK_STUB_MARK in old else "README.results.md"
    with open(os.path.join(out_dir, name), "w") as f:
        f.write(readme)
    written.append(name)
    return written


def submit(out_dir, runs, source, source_given=False, against=None, force=False, log=print) -> dict:
    if len(runs) < 2:
        raise SubmitError(f"{len(runs)} run given; a record needs 3 seeds of one config (2 at least for a std)")
    seeds = [load_seed(r) for r in runs]
    check_one_config(seeds)
    shipped, readable, in_place = shipped_code(out_dir, source, source_given)
    ran = seeds[0]["code"]["code_sha256"]
    if ran not in (sha16(shipped), sha16(readable)):
        where = f"{out_dir}/train_gpt.py" if in_place else source
        raise SubmitError(f"the seeds ran code {ran}, but {where} is {sha16(shipped)} (source {sha16(readable)}); "
                          "ship the train_gpt.py they ran (--source, or the one in OUT_DIR)")
    results = [seed_result(s) for s in seeds]
    comparison = compare(load_previous(against), results) if against else None
    submission = build_submission(seeds, results, shipped, readable, comparison)
    readme = readme_skeleton(submission, seeds, shipped, readable, comparison, ran == sha16(shipped))
    written = write_record(out_dir, seeds, shipped, in_place, submission, readme, force)
    log(f"{out_dir}: {', '.join(written)}")
    log(f"{len(seeds)} seeds {submission['seeds']}: val_bpb {submission['val_bpb']:.8f} (sample std "
        f"{submission['val_bpb_std']:.5f}), val_loss {submission['val_loss']:.8f}, up to "
        f"{submission['artifact_bytes_max']:,} bytes, track {submission['track']}")
    if len(seeds) < 3:
        log("note: the maintainers ask for 3 seeds of one config")
    if comparison:
        log(comparison_text(comparison))
    return submission


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    ap.add_argument("out_dir", help="the records folder to write (records/track_10min_16mb/<date>_<name>)")
    ap.add_argument("runs", nargs="+", help="logs/<RUN_ID> of each seed (or its .json/.txt, or a folder with one run)")
    ap.add_argument("--against", help="the previous record's submission.json (with seed_results)")
    ap.add_argument("--source", help="the train_gpt.py the seeds ran (default: this checkout's), packed unless it is")
    ap.add_argument("--force", action="store_true", help="replace submission.json and logs already in OUT_DIR")
    args = ap.parse_args(argv)
    try:
        submit(args.out_dir, args.runs, args.source or os.path.join(ROOT, "train_gpt.py"), bool(args.source),
               args.against, args.force)
    except SubmitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e.filename}: {e.strerror}; check the path", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
