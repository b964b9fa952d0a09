"""Compares runs of train_gpt.py in one table.

Usage: python tools/compare_runs.py RUN [RUN ...] [--markdown]

A RUN is logs/<RUN_ID>.json (the summary) or logs/<RUN_ID>.txt (the log); no per-document score files are needed.
Columns: steps run, mean ms per step, bpb before quantization (averaged model), bpb of the artifact reloaded from
disk (the scored `final_..._roundtrip_exact` eval), the quantization gap (non-overlapping eval, round trip minus
pre-quant, as the log's quant_gap_bpb line), the test-time-training bpb where the run did TTT, the artifact's bytes
(code + compressed model) and the scored eval's seconds. "-" = the run does not say. Files that are not runs are
named on stderr and left out.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.runlog import load_runs  # noqa: E402

PROG = "compare_runs.py"
DOCS_SUFFIX = ".docs.tsv"  # per-document score files: a paired comparison, not this table
COLUMNS = ["run_id", "preset", "steps", "ms/step", "pre_quant_bpb", "roundtrip_bpb", "quant_gap", "ttt_bpb",
           "artifact_bytes", "eval_s"]


def fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def row(run) -> list[str]:
    size = fmt(run.bytes_total, ",") + ("*" if run.artifact_valid is False else "")
    return [run.run_id, run.preset, fmt(run.steps, "d"), fmt(run.step_avg_ms, ".1f"), fmt(run.pre_quant_bpb, ".4f"),
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
    return "\n".join(lines)


def compare_summaries(paths, markdown) -> int:
    runs = load_runs(paths, PROG)
    if not runs:
        print(f"{PROG}: error: no run to compare", file=sys.stderr)
        return 1
    print(table(runs, markdown))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="\n\n".join(p for p in __doc__.split("\n\n") if not p.startswith("Usage")))
    ap.add_argument("runs", nargs="+", metavar="RUN", help="logs/<RUN_ID>.json or logs/<RUN_ID>.txt")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    docs = [p for p in args.runs if p.endswith(DOCS_SUFFIX)]
    if docs:  # dispatch on the suffix: per-document files get their own mode
        print(f"{PROG}: error: comparing per-document score files ({docs[0]}) is not implemented yet; "
              "pass run summaries (logs/<RUN_ID>.json) or logs", file=sys.stderr)
        return 2
    return compare_summaries(args.runs, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
