"""Compares runs of train_gpt.py in one table, or two runs document by document.

Usage: python tools/compare_runs.py RUN [RUN ...] [--markdown]
       python tools/compare_runs.py A.docs.tsv [B.docs.tsv] [--column NAME] [--resamples N] [--seed S]

A RUN is logs/<RUN_ID>.json (the summary) or logs/<RUN_ID>.txt (the log); no per-document score files are needed.
Columns: steps run, mean ms per step, bpb before quantization (averaged model), bpb of the artifact reloaded from
disk (the scored `final_..._roundtrip_exact` eval), the quantization gap (non-overlapping eval, round trip minus
pre-quant, as the log's quant_gap_bpb line), the test-time-training bpb where the run did TTT, the artifact's bytes
(code + compressed model) and the scored eval's seconds. "-" = the run does not say. A run known only by its
logs/<RUN_ID>.txt.partial (killed, or still running) is marked "(unfinished)". Files that are not runs, or whose scores
are not finite (a diverged run), are named on stderr and left out.

Per-document mode (files written with SAVE_DOC_SCORES=1, one row per validation document): the bpb of B minus the
bpb of A with 99% confidence intervals from a paired t-test over documents (normal approximation) and a paired
bootstrap (documents resampled with replacement), and the t-test's two-sided p. Both files must score the same
documents (same targets and bytes). Each file's nats column is --column (plain or ttt; default: the file's last,
i.e. ttt where TTT ran). With one file, A is its plain column and B its last: the TTT gain, audited per document.
"""
import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.runlog import RunError, load_runs, read_text  # noqa: E402

PROG = "compare_runs.py"
DOCS_SUFFIX = ".docs.tsv"  # per-document score files: a paired comparison, not this table
COLUMNS = ["run_id", "preset", "steps", "ms/step", "pre_quant_bpb", "roundtrip_bpb", "quant_gap", "ttt_bpb",
           "artifact_bytes", "eval_s"]


def fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def row(run) -> list[str]:
    size = fmt(run.bytes_total, ",") + ("*" if run.artifact_valid is False else "")
    run_id = run.run_id + (" (unfinished)" if run.unfinished else "")
    return [run_id, run.preset, fmt(run.steps, "d"), fmt(run.step_avg_ms, ".1f"), fmt(run.pre_quant_bpb, ".4f"),
            fmt(run.final_bpb, ".4f"), fmt(run.quant_gap_bpb, "+.5f"), fmt(run.ttt_bpb, ".4f"), size,
            fmt(run.eval_s, ".1f")]


def table(runs, markdown=False) -> str:
    rows = [COLUMNS] + [row(r) for r in runs]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in rows]
    if any(r.artifact_valid is False for r in runs):
        lines.append("* over the 16,000,000-byte artifact cap: not a valid submission")
    if any(r.unfinished for r in runs):
        lines.append("(unfinished): only a .txt.partial log, no summary: the run was killed or is still running")
    return "\n".join(lines)


def compare_summaries(paths, markdown) -> int:
    runs = load_runs(paths, PROG)
    if not runs:
        print(f"{PROG}: error: no run to compare", file=sys.stderr)
        return 1
    print(table(runs, markdown))
    return 0


Z99 = 2.5758293035489004  # two-sided 99% normal quantile


class DocsError(ValueError):
    pass


def read_docs(path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Columns of a .docs.tsv file by name, and the names of its nats columns (without the nats_ prefix). Refuses
    scores that are not finite: a diverged run's nan would make every statistic nan and its p-value 0."""
    try:
        rows = [line.split("\t") for line in read_text(path).splitlines() if line.strip()]
    except RunError as e:
        raise DocsError(f"{path}: {e}") from None
    head = rows[0] if rows else []
    if head[:4] != ["doc", "first_pos", "targets", "bytes"] or len(head) < 5 or len(rows) < 2:
        raise DocsError(f"{path}: not a per-document score file (header doc, first_pos, targets, bytes, nats_...)")
    try:
        data = np.array(rows[1:], dtype=np.float64)
    except ValueError:
        raise DocsError(f"{path}: a row that is not numbers, or of the wrong length") from None
    if data.ndim != 2 or data.shape[1] != len(head):
        raise DocsError(f"{path}: rows of the wrong length")
    if not np.isfinite(data).all():
        r, c = np.argwhere(~np.isfinite(data))[0]
        raise DocsError(f"{path}: a non-finite {head[c]} ({rows[r + 1][c]}) for document {r} (line {r + 2}): the run "
                        "diverged")
    if data[:, 3].sum() <= 0:
        raise DocsError(f"{path}: its documents have no bytes")
    return {h: data[:, i] for i, h in enumerate(head)}, [h.removeprefix("nats_") for h in head[4:]]


def pick(cols, names, column, path) -> np.ndarray:
    name = column or names[-1]
    if name not in names:
        raise DocsError(f"{path}: no nats_{name} column (it has {', '.join(names)})")
    return cols["nats_" + name]


def paired_stats(nats_a, nats_b, nbytes, resamples=2000, seed=0) -> dict:
    """bpb of A and B over the same documents, B - A, and 99% intervals for B - A over documents."""
    d = (nats_b - nats_a) / math.log(2)  # bits per document
    n, total = len(d), nbytes.sum()
    diff = d.sum() / total
    se = math.sqrt(n) * d.std(ddof=1) / total if n > 1 else float("inf")
    z = diff / se if se > 0 else (math.inf if diff else 0.0)
    rng, boots = np.random.default_rng(seed), []
    for start in range(0, resamples, 256):
        idx = rng.integers(n, size=(min(256, resamples - start), n))
        boots.append(d[idx].sum(1) / nbytes[idx].sum(1))
    lo, hi = np.quantile(np.concatenate(boots), [0.005, 0.995])
    return dict(docs=n, bpb_a=nats_a.sum() / math.log(2) / total, bpb_b=nats_b.sum() / math.log(2) / total,
                diff=diff, t_ci=(diff - Z99 * se, diff + Z99 * se), p=math.erfc(abs(z) / math.sqrt(2)),
                boot_ci=(float(lo), float(hi)), resamples=resamples)


def compare_docs(paths, column, resamples, seed) -> int:
    try:
        a, names_a = read_docs(paths[0])
        b, names_b = (a, names_a) if len(paths) == 1 else read_docs(paths[1])
        if len(paths) == 1:
            if "plain" not in names_a or len(names_a) < 2:
                raise DocsError(f"{paths[0]}: one file compares its plain and TTT columns, and it has only "
                                f"{', '.join(names_a)}")
            labels = [f"{paths[0]} plain", f"{paths[0]} {names_a[-1]}"]
            nats_a, nats_b = a["nats_plain"], a["nats_" + names_a[-1]]
        else:
            nats_a, nats_b = pick(a, names_a, column, paths[0]), pick(b, names_b, column, paths[1])
            labels = [f"{p} {column or n[-1]}" for p, n in zip(paths, (names_a, names_b))]
        for key in ("first_pos", "targets", "bytes"):
            if len(a[key]) != len(b[key]) or (a[key] != b[key]).any():
                raise DocsError(f"{paths[0]} and {paths[-1]} score different documents ({key} differs); "
                                "compare runs on the same validation set")
    except DocsError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    r = paired_stats(nats_a, nats_b, a["bytes"], resamples, seed)
    print(f"documents: {r['docs']}  targets: {int(a['targets'].sum())}  bytes: {int(a['bytes'].sum())}")
    print(f"A: {labels[0]}  val_bpb:{r['bpb_a']:.8f}")
    print(f"B: {labels[1]}  val_bpb:{r['bpb_b']:.8f}")
    print(f"B - A: {r['diff']:+.8f} bpb")
    print(f"paired t-test over documents: 99% CI [{r['t_ci'][0]:+.8f}, {r['t_ci'][1]:+.8f}]  p={r['p']:.3g}")
    print(f"paired bootstrap ({r['resamples']} resamples): 99% CI [{r['boot_ci'][0]:+.8f}, {r['boot_ci'][1]:+.8f}]")
    return 0


def seed(text) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="\n\n".join(p for p in __doc__.split("\n\n") if not p.startswith("Usage")))
    ap.add_argument("runs", nargs="+", metavar="RUN", help="logs/<RUN_ID>.json or logs/<RUN_ID>.txt")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--column", choices=("plain", "ttt"), help="per-document mode: the nats column of both files")
    ap.add_argument("--resamples", type=int, default=2000, help="per-document mode: bootstrap resamples")
    ap.add_argument("--seed", type=seed, default=0, help="per-document mode: bootstrap seed (>= 0)")
    args = ap.parse_args(argv)
    docs = [p for p in args.runs if p.endswith(DOCS_SUFFIX)]
    if docs:  # dispatch on the suffix: per-document files get their own mode
        if len(docs) != len(args.runs) or len(docs) > 2:
            print(f"{PROG}: error: per-document mode takes one or two .docs.tsv files and nothing else",
                  file=sys.stderr)
            return 2
        return compare_docs(docs, args.column, max(args.resamples, 1), args.seed)
    return compare_summaries(args.runs, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
