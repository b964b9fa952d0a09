"""Per-piece CPU measurement of the default stack (PR #2135's pieces on the #1855 stack), at tiny scale on the CaseOps
proxy: the whole default with each piece turned off (or, for pieces #2135 does not run, on) in turn, at equal steps,
over two seeds. Every run is a real `train_gpt.py` run (train, GPTQ export, range coder, reload from disk, sliding
eval, phased LoRA TTT), so each number is a round-trip score read from the run's own summary JSON.

Data:  python data/caseops.py proxy --vocab 1024 --max-train-docs 3000 --val-docs 200 --tokenizer-docs 3000 --workers 1
       (writes bench_data/proxy_caseops_sp1024: CaseOps text, its own 1024-piece tokenizer, the byte sidecar)
Run:   python bench/pieces_cpu.py [--steps 150] [--seeds 1337,1338] [--only a,b] [--out bench/pieces_cpu.md]
Runs go to bench_data/pieces_runs/ (one RUN_ID per config and seed); a run whose summary exists is read, not rerun,
so an interrupted sweep resumes. One run at a time, one thread each (OMP_NUM_THREADS=1).

Tiny CPU runs rank pieces at this scale only: they do not predict 8xH100 FineWeb results (35 M parameters,
~4,900 steps), and the proxy is not FineWeb.
"""
import argparse, json, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "bench_data", "proxy_caseops_sp1024")
RUNS = os.path.join(ROOT, "bench_data", "pieces_runs")

# The default stack scaled from 11 x 512 to 6 x 128: loops on layers 2-3 (3-5 of 11), two lanes from layer 4 (8 of
# 11), RoPE on 8 of 32 head dims (16 of 64), XSA everywhere; trained at 256 tokens, evaluated at 320 (2560 / 2048).
# The TTT prefix (2,500 of 50,000 documents in #2135) becomes 1 of the ~5 documents scored here.
SHAPE = dict(NUM_LAYERS=6, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, VOCAB_SIZE=1024, TRAIN_SEQ_LEN=256,
             TRAIN_BATCH_TOKENS=2048, GRAD_ACCUM_STEPS=1, MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=0,
             VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=0, LOOP_START=2, LOOP_END=3, PARALLEL_START_LAYER=4, ROPE_DIMS=8,
             XSA_LAST_N=6, EVAL_SEQ_LEN=320, TTT_EVAL_SEQ_LEN=320, EVAL_BATCH_SEQS=32, VAL_MAX_TOKENS=8192,
             PHASED_TTT_PREFIX_DOCS=1, TTT_BATCH_SIZE=16, GPTQ_CALIBRATION_BATCHES=32, TARGET_BYTES=0)
# label -> (overrides on top of PRESET=default and SHAPE, what it changes)
CONFIGS = {
    "default": ({}, "the default stack (frontier2135 + our export), scaled"),
    "-tilt": (dict(NGRAM_TILT_ENABLED=0), "no token n-gram tilt (#2130/#2135)"),
    "-asym_logit": (dict(ASYM_LOGIT_RESCALE=0), "no AsymLogit rescale (#1923)"),
    "-long_eval": (dict(EVAL_SEQ_LEN=256, TTT_EVAL_SEQ_LEN=256), "eval and TTT context = training's (#1953 off)"),
    "+awq_lite": (dict(AWQ_LITE_ENABLED=1), "AWQ-lite GPTQ on (#1908/#1945; off in #2135)"),
    "-lqer_g32": (dict(LQER_ASYM_GROUP=64), "LQER B groups of 64 (#1855) instead of 32 (#2060)"),
    "-lr_028": (dict(MATRIX_LR=0.026), "MATRIX_LR 0.026 (#1855) instead of 0.028 (#2060)"),
    "-calib32": (dict(GPTQ_CALIBRATION_BATCHES=16), "16 GPTQ calibration batches (#1855) instead of 32 (#2135)"),
    "-ttt_2135": (dict(TTT_LORA_LR=1e-4, TTT_WEIGHT_DECAY=0.5, TTT_K_LORA=1, PHASED_TTT_NUM_PHASES=3),
                  "#1855's TTT (LR 1e-4, WD 0.5, K adapter, 3 phases) instead of #2135's"),
}
OPTIONAL = {  # pieces whose variables this train_gpt.py may not have yet: run only where it has them
    "+progressive": (dict(TRAIN_SEQ_SCHEDULE="128@0.1,256@0.7,384@1.0", EVAL_SEQ_LEN=384, TTT_EVAL_SEQ_LEN=384,
                          EVAL_STRIDE=192), "#2014's context growth 1k/2k/3k, scaled to 128/256/384; eval 384 / 192"),
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
        t0 = time.time()
        p = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py")], env=env, cwd=ROOT,
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{label} seed {seed} failed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        print(f"{label} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    s = json.load(open(summary))
    return dict(pre=s["pre_quant"]["val_bpb"], final=s["final"]["val_bpb"], ttt=s["ttt"]["val_bpb"],
                bytes=s["bytes_model"], train_s=s["train_time_ms"] / 1000, eval_s=s["ttt"]["eval_time_s"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", default="1337,1338")
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
        configs = {k: configs[k] for k in ["default", *a.only.split(",")] if k in configs}
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(RUNS, exist_ok=True)
    t0 = time.time()
    res = {k: [run_one(k, ov, s, a.steps) for s in seeds] for k, (ov, _) in configs.items()}
    mean = {k: {m: statistics.mean(r[m] for r in rs) for m in rs[0]} for k, rs in res.items()}
    base = mean["default"]
    lines = [
        "# Per-piece CPU measurement of the default stack (tiny scale, CaseOps proxy, not FineWeb)", "",
        f"Made by `python bench/pieces_cpu.py --steps {a.steps} --seeds {a.seeds}` on "
        f"{time.strftime('%Y-%m-%d')}, a 2-core CPU machine (torch {train_gpt.torch.__version__}), one run at a time, "
        f"one thread each; the sweep took {(time.time() - t0) / 60:.0f} min (runs already on disk are read, not rerun). "
        f"Data: `bench_data/proxy_caseops_sp1024` (the proxy corpus through CaseOps, its own 1024-piece tokenizer, "
        f"bytes from the sidecar). Shape and settings: `SHAPE` in `bench/pieces_cpu.py` (6 x 128, {a.steps} steps of "
        f"{SHAPE['TRAIN_BATCH_TOKENS']:,} tokens, eval at {SHAPE['EVAL_SEQ_LEN']} on a model trained at "
        f"{SHAPE['TRAIN_SEQ_LEN']}, the first {SHAPE['VAL_MAX_TOKENS']:,} validation targets).", "",
        "Each row changes one thing from `default`; bpb values are means over the seeds; a negative delta means the "
        "change scored better than `default`. `pre` is the averaged model before export, `final` the artifact "
        "reloaded from disk (sliding eval), `TTT` the phased LoRA TTT score of the reloaded artifact (the score a "
        "run reports). `spread` is the largest |seed difference| of the TTT score in that row: deltas smaller than "
        "the spreads are noise.", "",
        "| config | what it changes | pre bpb | final bpb | TTT bpb | TTT delta | spread | model bytes | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for k, (_, what) in configs.items():
        m, rs = mean[k], res[k]
        spread = max(r["ttt"] for r in rs) - min(r["ttt"] for r in rs)
        delta = "" if k == "default" else f"{m['ttt'] - base['ttt']:+.4f}"
        lines.append(f"| `{k}` | {what} | {m['pre']:.4f} | {m['final']:.4f} | {m['ttt']:.4f} | {delta} | "
                     f"{spread:.4f} | {m['bytes']:,.0f} | {m['train_s']:.0f} | {m['eval_s']:.0f} |")
    open(a.out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
