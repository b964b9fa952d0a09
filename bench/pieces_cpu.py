"""Per-piece CPU measurement of the default stack (PR #2135's pieces on the #1855 stack), at tiny scale on the CaseOps
proxy: the whole default with each piece turned off (or, for pieces #2135 does not run, on) in turn, at equal steps,
over two seeds. Every run is a real `train_gpt.py` run (train, GPTQ export, range coder, reload from disk, sliding
eval, phased LoRA TTT), so each number is a round-trip score read from the run's own summary JSON.

Data:  python data/caseops.py proxy --vocab 1024 --max-train-docs 3000 --val-docs 200 --tokenizer-docs 3000 --workers 1
       (writes bench_data/proxy_caseops_sp1024: CaseOps text, its own 1024-piece tokenizer, the byte sidecar)
Run:   python bench/pieces_cpu.py [--steps 100] [--seeds 1337,1338] [--jobs 2] [--only a,b] [--out bench/pieces_cpu.md]
Runs go to bench_data/pieces_runs/ (one RUN_ID per config and seed); a run whose summary exists is read, not rerun,
so an interrupted sweep resumes. --jobs runs at a time, one thread each (OMP_NUM_THREADS=1).

Tiny CPU runs rank pieces at this scale only: they do not predict 8xH100 FineWeb results (35 M parameters,
~4,900 steps), and the proxy is not FineWeb.
"""
import argparse, glob, json, os, statistics, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "bench_data", "proxy_caseops_sp1024")
RUNS = os.path.join(ROOT, "bench_data", "pieces_runs")

# The default stack scaled from 11 x 512 to 4 x 256 (head dim 64 as there, so RoPE on 16 dims): loops on layers 1-2
# (3-5 of 11), two lanes from layer 3 (8 of 11), XSA everywhere; trained at 256 tokens, evaluated at 320 (2560 / 2048).
# At width 256 the MLP matrices (256 x 1024) are GPTQ'd int6 as in the full model; the attention matrices (256 x 256,
# at most 65,536 elements) stay fp16. The TTT prefix (2,500 of 50,000 documents in #2135) becomes 1 of the ~5 here.
# TTT is off except in the TTT rows: the export and training pieces are judged on the round-trip score alone.
SHAPE = dict(NUM_LAYERS=4, MODEL_DIM=256, NUM_HEADS=4, NUM_KV_HEADS=2, VOCAB_SIZE=1024, TRAIN_SEQ_LEN=256,
             TRAIN_BATCH_TOKENS=2048, GRAD_ACCUM_STEPS=1, MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=0,
             VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=0, LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=3, ROPE_DIMS=16,
             XSA_LAST_N=4, EVAL_SEQ_LEN=320, TTT_EVAL_SEQ_LEN=320, EVAL_BATCH_SEQS=32, VAL_MAX_TOKENS=8192,
             PHASED_TTT_PREFIX_DOCS=1, TTT_BATCH_SIZE=16, TARGET_BYTES=0, TTT_ENABLED=0)
TTT = dict(TTT_ENABLED=1)
# label -> (overrides on top of PRESET=default and SHAPE, what it changes, the row it is compared with)
CONFIGS = {
    "default": ({}, "the default stack (frontier2135 + our export), scaled; TTT off", None),
    "-tilt": (dict(NGRAM_TILT_ENABLED=0), "no token n-gram tilt (#2130/#2135)", "default"),
    "-long_eval": (dict(EVAL_SEQ_LEN=256, TTT_EVAL_SEQ_LEN=256), "eval context = training's (#1953 off)", "default"),
    "+awq_lite": (dict(AWQ_LITE_ENABLED=1), "AWQ-lite GPTQ on (#1908/#1945; off in #2135)", "default"),
    "-lqer_g32": (dict(LQER_ASYM_GROUP=64), "LQER B groups of 64 (#1855) instead of 32 (#2060)", "default"),
    "-lr_028": (dict(MATRIX_LR=0.026), "MATRIX_LR 0.026 (#1855) instead of 0.028 (#2060)", "default"),
    "-calib32": (dict(GPTQ_CALIBRATION_BATCHES=16), "16 GPTQ calibration batches (#1855) instead of 32", "default"),
    "default+ttt": (TTT, "the default stack with its phased LoRA TTT (the score a run reports)", None),
    "-asym_logit": (dict(TTT, ASYM_LOGIT_RESCALE=0), "no AsymLogit rescale (#1923); with TTT", "default+ttt"),
    "-ttt_2135": (dict(TTT, TTT_LORA_LR=1e-4, TTT_WEIGHT_DECAY=0.5, TTT_K_LORA=1, PHASED_TTT_NUM_PHASES=3),
                  "#1855's TTT (LR 1e-4, WD 0.5, K adapter, 3 phases) instead of #2135's", "default+ttt"),
}
OPTIONAL = {  # pieces whose variables this train_gpt.py may not have yet: run only where it has them
    "+progressive": (dict(TRAIN_SEQ_SCHEDULE="128@0.1,256@0.7,512@1.0", TRAIN_SEQ_LEN=512, EVAL_SEQ_LEN=512,
                          EVAL_STRIDE=256), "#2014's context growth 1k/2k/3k and eval 3072 / stride 1536, scaled to "
                     "128/256/512 (each must divide the 2,048-token batch) and 512 / 256", "default"),
}


def run_env(label, overrides, seed, steps) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "PYTHONPATH", "TMPDIR")}
    env.update({k: str(v) for k, v in {**SHAPE, **overrides}.items()})
    env.update(SEED=str(seed), ITERATIONS=str(steps), DATA_PATH=DATA, TOKENIZER_PATH=os.path.join(DATA, "fineweb_1024_bpe_lossless_caps_caseops_v1.model"),
               LOG_DIR=RUNS, RUN_ID=f"pieces_{label.replace('+', 'p').replace('-', 'm')}_s{seed}_n{steps}",
               DATA_LABEL="CaseOps proxy (../shared/proxy), own 1024 BPE, not FineWeb", OMP_NUM_THREADS="1")
    return env


def run_one(label, overrides, seed, steps) -> dict:
    env = run_env(label, overrides, seed, steps)
    summary = os.path.join(RUNS, env["RUN_ID"] + ".json")
    if not os.path.exists(summary):
        for stale in glob.glob(os.path.join(RUNS, env["RUN_ID"] + ".*")):  # an interrupted run's files
            os.remove(stale)
        t0 = time.time()
        p = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py")], env=env, cwd=ROOT,
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{label} seed {seed} failed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        print(f"{label} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    s = json.load(open(summary))
    ttt = s.get("ttt") or {}
    return dict(pre=s["pre_quant"]["val_bpb"], final=s["final"]["val_bpb"], ttt=ttt.get("val_bpb", float("nan")),
                bytes=s["bytes_model"], train_s=s["train_time_ms"] / 1000,
                eval_s=s["final"]["eval_time_s"] + ttt.get("eval_time_s", 0.0))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", default="1337,1338")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (2 on a 2-core machine)")
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "pieces_cpu.md"))
    a = ap.parse_args()
    if not os.path.exists(os.path.join(DATA, "caseops_manifest.json")):
        raise SystemExit(f"no CaseOps proxy data at {DATA}; make it with the Data command in this file's docstring")
    sys.path.insert(0, ROOT)
    import train_gpt
    known = {f.name.upper() for f in train_gpt.dataclasses.fields(train_gpt.Hyperparameters)}
    configs = dict(CONFIGS, **{k: v for k, v in OPTIONAL.items() if set(v[0]) <= known})
    if a.only:
        wanted = a.only.split(",")
        configs = {k: v for k, v in configs.items() if k in wanted or any(v2[2] == k for k2, v2 in configs.items()
                                                                          if k2 in wanted)}
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(RUNS, exist_ok=True)
    t0 = time.time()
    with ThreadPoolExecutor(a.jobs) as pool:
        futures = {(k, s): pool.submit(run_one, k, v[0], s, a.steps) for k, v in configs.items() for s in seeds}
        res = {k: [futures[k, s].result() for s in seeds] for k in configs}
    mean = {k: {m: statistics.mean(r[m] for r in rs) for m in rs[0]} for k, rs in res.items()}
    lines = [
        "# Per-piece CPU measurement of the default stack (tiny scale, CaseOps proxy, not FineWeb)", "",
        f"Made by `python bench/pieces_cpu.py --steps {a.steps} --seeds {a.seeds} --jobs {a.jobs}` on "
        f"{time.strftime('%Y-%m-%d')}, a 2-core CPU machine (torch {train_gpt.torch.__version__}), {a.jobs} runs at a "
        f"time, one thread each; every run's own train and eval seconds are in the table (runs already on disk are read, "
        f"not rerun). "
        f"Data: `bench_data/proxy_caseops_sp1024` (the proxy corpus through CaseOps, its own 1024-piece tokenizer, "
        f"bytes from the sidecar). Shape and settings: `SHAPE` in `bench/pieces_cpu.py` ({SHAPE['NUM_LAYERS']} x "
        f"{SHAPE['MODEL_DIM']}, {a.steps} steps of {SHAPE['TRAIN_BATCH_TOKENS']:,} tokens at {SHAPE['TRAIN_SEQ_LEN']}, "
        f"eval at {SHAPE['EVAL_SEQ_LEN']}, the first {SHAPE['VAL_MAX_TOKENS']:,} validation targets).", "",
        "Each row changes one thing from the row it is compared with (`vs`); bpb values are means over the seeds. "
        "`pre` is the averaged model before export, `final` the artifact reloaded from disk (sliding eval, stride "
        "64: the round-trip score), `TTT` the phased LoRA TTT score of the reloaded artifact (the score a run reports; "
        "TTT rows only). `delta` is the change of `final` (TTT rows: of `TTT`) against `vs`; negative = better. "
        "`spread` is the largest seed-to-seed difference of that delta's score in the row: deltas within the spreads "
        "are noise. Tiny CPU runs rank pieces at this scale only; they do not predict 8xH100 FineWeb results.", "",
        "| config | what it changes | vs | pre bpb | final bpb | TTT bpb | delta | spread | model bytes | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, (_, what, vs) in configs.items():
        m, rs = mean[k], res[k]
        key = "ttt" if "TTT_ENABLED" in configs[k][0] else "final"
        spread = max(r[key] for r in rs) - min(r[key] for r in rs)
        delta = f"{m[key] - mean[vs][key]:+.4f}" if vs else ""
        ttt = f"{m['ttt']:.4f}" if key == "ttt" else "-"
        lines.append(f"| `{k}` | {what} | {vs or ''} | {m['pre']:.4f} | {m['final']:.4f} | {ttt} | {delta} | "
                     f"{spread:.4f} | {m['bytes']:,.0f} | {m['train_s']:.0f} | {m['eval_s']:.0f} |")
    open(a.out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
