"""Plots runs of train_gpt.py side by side: train loss and val_bpb against train time and against steps, one line per
run, with a vertical mark where a switch (QAT, warmdown, looping, ...) turned on.

Usage: python tools/plot_runs.py RUN [RUN ...] [--out runs.png] [--title TEXT]

--out is the file to write, in the format its extension names (.png, .pdf, .svg, ...; .png added where there is none),
or a directory to write runs.png in; the path written is printed.

A RUN is logs/<RUN_ID>.json (the summary) or logs/<RUN_ID>.txt (the log); the other file beside it is read too.
Curves and switch times come from the log; from a summary alone, train times are estimated from its mean step time
and there are no val points. Files that are not runs, or runs with no logged step, are named on stderr and left out.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.runlog import load_runs  # noqa: E402

PROG = "plot_runs.py"
DEFAULT_OUT = "runs.png"
EVENT_STYLES = {"qat": "--", "warmdown": ":", "looping": "-."}
OTHER_STYLES = [(0, (6, 2, 1, 2, 1, 2)), (0, (1, 3)), (0, (8, 3))]


def event_style(name, extra: dict):
    if name in EVENT_STYLES:
        return EVENT_STYLES[name]
    return extra.setdefault(name, OTHER_STYLES[len(extra) % len(OTHER_STYLES)])


def run_label(run) -> str:
    score = f"final round-trip {run.final_bpb:.4f} bpb" if run.final_bpb is not None else "no final score"
    size = f", {run.bytes_total:,} bytes" if run.bytes_total is not None else ""
    over = " (OVER CAP)" if run.artifact_valid is False else ""
    unfinished = "unfinished (killed or still running), " if run.unfinished else ""
    return f"{run.run_id} ({run.preset}): {unfinished}{score}{size}{over}"


def plot(runs, out, title=None):
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    (loss_t, loss_s), (bpb_t, bpb_s) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    extra_styles, marked, handles = {}, {}, []
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        if run.train:
            steps, losses, times = zip(*run.train)
            loss_s.plot(steps, losses, color=c, lw=1.2)
            if None not in times:  # None: a summary alone that lacks even its mean step time
                loss_t.plot([t / 1000 for t in times], losses, color=c, lw=1.2)
        if run.val:
            steps, bpbs, times = zip(*run.val)
            bpb_t.plot([t / 1000 for t in times], bpbs, color=c, lw=1.2, marker=".")
            bpb_s.plot(steps, bpbs, color=c, lw=1.2, marker=".")
        if run.roundtrip_bpb is not None and run.steps:
            bpb_s.plot([run.steps], [run.roundtrip_bpb], color=c, marker="x", ms=8, mew=2)
            if (end_ms := run.time_at(run.steps)) is not None:
                bpb_t.plot([end_ms / 1000], [run.roundtrip_bpb], color=c, marker="x", ms=8, mew=2)
            marked["x"] = True
        for e in run.events:
            style = event_style(e["name"], extra_styles)
            marked[e["name"]] = style
            for ax in (loss_s, bpb_s):
                ax.axvline(e["step"], color=c, ls=style, lw=1, alpha=0.8)
            if e["train_time_ms"] is not None:
                for ax in (loss_t, bpb_t):
                    ax.axvline(e["train_time_ms"] / 1000, color=c, ls=style, lw=1, alpha=0.8)
        handles.append(Line2D([], [], color=c, lw=2, label=run_label(run)))
    for name, style in marked.items():
        if name == "x":
            handles.append(Line2D([], [], color="k", marker="x", ls="",
                                  label="round trip, non-overlapping eval (as val_bpb)"))
        else:
            handles.append(Line2D([], [], color="k", ls=style, lw=1, label=f"{name} on"))
    clock = "train time (s, validation excluded)"
    for ax, ylabel, xlabel in ((loss_t, "train loss", clock), (loss_s, "train loss", "step"),
                               (bpb_t, "val_bpb", clock), (bpb_s, "val_bpb", "step")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if not any(run.val for run in runs):
        for ax in (bpb_t, bpb_s):
            ax.text(0.5, 0.5, "no val points logged (VAL_LOSS_EVERY=0)", ha="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.legend(handles=handles, loc="outside lower center", ncol=1 if len(runs) > 2 else 2, fontsize=9,
               frameon=False)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def out_path(out) -> str:
    """The file --out names: runs.png inside a directory, .png added to a name without an extension (as matplotlib
    does: it would write somedir.png for an existing directory somedir)."""
    if os.path.isdir(out):
        return os.path.join(out, DEFAULT_OUT)
    return out if os.path.splitext(out)[1] not in ("", ".") else out.rstrip(".") + ".png"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="\n\n".join(p for p in __doc__.split("\n\n") if not p.startswith("Usage")))
    ap.add_argument("runs", nargs="+", metavar="RUN", help="logs/<RUN_ID>.json or logs/<RUN_ID>.txt")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"file or directory to write (default {DEFAULT_OUT})")
    ap.add_argument("--title", help="figure title")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"{PROG}: error: matplotlib is not installed (pip install -r requirements.txt)", file=sys.stderr)
        return 2
    from matplotlib.backend_bases import FigureCanvasBase
    out, formats = out_path(args.out), sorted(FigureCanvasBase.get_supported_filetypes())
    if os.path.splitext(out)[1][1:].lower() not in formats:
        print(f"{PROG}: error: cannot write {out}: matplotlib writes {', '.join('.' + f for f in formats)}",
              file=sys.stderr)
        return 2
    runs = load_runs(args.runs, PROG, need_points=True)
    for run in runs:
        if run.times_estimated:
            print(f"{PROG}: {run.path}: no log beside it: train times estimated as step x step_avg, no val points",
                  file=sys.stderr)
    if not runs:
        print(f"{PROG}: error: nothing to plot", file=sys.stderr)
        return 1
    try:
        plot(runs, out, args.title)
    except (OSError, RuntimeError) as e:  # RuntimeError: a format's external tool (.pgf: LaTeX) is missing
        print(f"{PROG}: error: cannot write {out}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {len(runs)} run{'s' if len(runs) > 1 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
