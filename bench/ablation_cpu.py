"""Tiny CPU ablation of the default stack (frontier v1): the full stack, seed162 and baseline, and the full stack
with each piece turned off in turn, at equal steps on proxy text (vocab 1024), over a few seeds. It shows that each
piece trains and roughly which way it points at this scale; tiny CPU runs do not predict 8xH100 results.

Data:  python data/prepare_proxy.py --vocab 1024 --out bench_data/ablation_sp1024 --train-files 1 \
           --max-train-docs 2500 --max-val-docs 150 --workers 1
Run:   python bench/ablation_cpu.py [--steps 100] [--seeds 1337,1338] [--out bench/ablation_cpu.md] [--only a,b]
Every run is in this process, single-threaded: train_gpt.train, then one non-overlapping evaluation of the
unquantized weights (no averaging, no QAT, no export: none of that is what is being compared).
"""
import argparse, json, os, statistics, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import train_gpt  # noqa: E402

# The shape every run shares; the frontier's layer-relative settings are scaled from 11 layers to 6: loop layers
# 2-3 (3-5 of 11), two lanes from layer 4 (7 of 11), RoPE on a quarter of each head as 16 of 64.
SHAPE = dict(NUM_LAYERS=6, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=256, TRAIN_BATCH_TOKENS=1024,
             GRAD_ACCUM_STEPS=1, VOCAB_SIZE=1024, MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=0, VAL_LOSS_EVERY=0,
             TRAIN_LOG_EVERY=0, EVAL_STRIDE=0, EMA_DECAY=0, SWA=0, QAT=0, WARMDOWN_FRAC=0.75)
FRONTIER_SCALED = dict(LOOP_START=2, LOOP_END=3, PARALLEL_START_LAYER=4, ROPE_DIMS=8, XSA_LAST_N=6)
# label -> (preset, overrides on top of SHAPE, what it changes)
CONFIGS = {
    "frontier": ("default", FRONTIER_SCALED, "the whole default stack"),
    "seed162": ("seed162", dict(BIGRAM_BUCKETS=1024), "PR #162 stack (BigramHash 1024 buckets)"),
    "baseline": ("baseline", {}, "upstream naive baseline"),
    "-xsa": ("default", dict(FRONTIER_SCALED, XSA_LAST_N=0), "XSA off"),
    "-partial_rope": ("default", dict(FRONTIER_SCALED, ROPE_DIMS=0), "RoPE on all head dims"),
    "-ln_scale": ("default", dict(FRONTIER_SCALED, LN_SCALE=0), "LN scale off"),
    "-leaky": ("default", dict(FRONTIER_SCALED, MLP_ACT="relu2"), "relu^2 instead of LeakyReLU(0.5)^2"),
    "-skip_gates": ("default", dict(FRONTIER_SCALED, SKIP_GATES_ENABLED=0), "plain skip adds"),
    "-loops": ("default", dict(FRONTIER_SCALED, NUM_LOOPS=0), "no depth recurrence"),
    "-parallel": ("default", dict(FRONTIER_SCALED, PARALLEL_START_LAYER=99), "no two-lane blocks"),
    "-qk_gain": ("default", dict(FRONTIER_SCALED, QK_GAIN_INIT=1.5), "QK gain init 1.5 instead of 5.25"),
    "-muon_eq_r": ("default", dict(FRONTIER_SCALED, MUON_ROW_NORMALIZE=0), "no MuonEq-R row normalisation"),
    "-min_lr": ("default", dict(FRONTIER_SCALED, MIN_LR=0), "warmdown to 0 instead of 0.1"),
}


def run_one(preset, overrides, seed, steps, data, val_tokens) -> dict:
    env = {k: str(v) for k, v in {**SHAPE, **overrides}.items()}
    env.update(PRESET=preset, SEED=str(seed), ITERATIONS=str(steps), DATA_PATH=data, VAL_MAX_TOKENS=str(val_tokens),
               TOKENIZER_PATH=os.path.join(data, "fineweb_1024_bpe.model"))
    args = train_gpt.Hyperparameters.from_env(env)
    rt = train_gpt.Runtime(rank=0, world_size=1, device=torch.device("cpu"))
    torch.manual_seed(seed)
    luts = train_gpt.build_byte_luts(train_gpt.load_tokenizer(args), args.vocab_size)
    val = train_gpt.load_val_tokens(args)
    base, model = train_gpt.build_model(args, rt)
    optimizers = train_gpt.build_optimizers(base, args, rt)
    loader = train_gpt.TrainLoader(args, rt, 1)
    t0 = time.perf_counter()
    train_gpt.train(args, rt, model, base, optimizers, loader, None, lambda msg: None)
    seconds = time.perf_counter() - t0
    r = train_gpt.evaluate(base, val, luts, args, rt, stride=0)
    return dict(val_bpb=r["val_bpb"], val_loss=r["val_loss"], train_s=seconds,
                params=sum(p.numel() for p in base.parameters()))


def write_table(results, opts, path):
    ref = statistics.mean(r["val_bpb"] for r in results.get("frontier", [])) if results.get("frontier") else None
    lines = ["# CPU ablation of the default stack (tiny scale, proxy text, vocab 1024)", "",
             f"Command: `python bench/ablation_cpu.py --steps {opts.steps} --seeds {opts.seeds}` (data: see the "
             "script's docstring). Shape: 6 layers x 128, 4 heads / 2 KV, seq 256, 1,024 tokens a step (4 sequences), "
             f"{opts.steps} steps, warmdown over the last 75%, no EMA/SWA/QAT; val_bpb of the unquantized weights on "
             f"the first {opts.val_tokens:,} tokens of 150 held-out proxy documents. One thread on a shared 2-core "
             "CPU. Tiny CPU runs do not predict 8xH100 results: this shows each piece trains and which way it points "
             "here; a difference smaller than the seed spread means nothing.", "",
             "| config | what changes | params | " + " | ".join(f"bpb seed {s}" for s in opts.seed_list) +
             " | mean bpb | vs frontier | train s/run |", "|---|---|---|" + "---|" * len(opts.seed_list) + "---|---|---|"]
    for label, runs in results.items():
        mean = statistics.mean(r["val_bpb"] for r in runs)
        delta = f"{mean - ref:+.4f}" if ref is not None and label != "frontier" else ""
        cells = " | ".join(f"{r['val_bpb']:.4f}" for r in runs)
        lines.append(f"| {label} | {CONFIGS[label][2]} | {runs[0]['params']:,} | {cells} | {mean:.4f} | {delta} | "
                     f"{statistics.mean(r['train_s'] for r in runs):.0f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", default="1337,1338")
    p.add_argument("--data", default=os.path.join(ROOT, "bench_data", "ablation_sp1024"))
    p.add_argument("--val-tokens", type=int, default=16384)
    p.add_argument("--only", default="", help="comma-separated config labels (default: all)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "ablation_cpu.md"))
    opts = p.parse_args()
    opts.seed_list = [int(s) for s in opts.seeds.split(",")]
    torch.set_num_threads(1)
    labels = [x for x in opts.only.split(",") if x] or list(CONFIGS)
    results = {}
    for label in labels:
        preset, overrides, _ = CONFIGS[label]
        for seed in opts.seed_list:
            r = run_one(preset, overrides, seed, opts.steps, opts.data, opts.val_tokens)
            results.setdefault(label, []).append(r)
            print(json.dumps(dict(config=label, seed=seed, **r)), flush=True)
        write_table(results, opts, opts.out)  # rewritten after every config: a cut-short run keeps its rows


if __name__ == "__main__":
    main()
