"""Export measurements for issue 10 (CPU): quantizers x compressors on one set of weights.

  python bench/quant_bench.py trained   # trains a small model on data/sample, then: pre-quant vs round-trip bpb,
                                        # artifact bytes and export time per (quantizer, compressor)
  python bench/quant_bench.py frontier  # the frontier shape (11 x 512, MLP 4x, vocab 8192, ~36 M parameters) with
                                        # Student-t(6) weights and Hessians from random tokens: bytes and export time
                                        # per compressor, the empirical entropy of the codes, and the fitted k
  python bench/quant_bench.py sweep       # after `trained`: round-trip bpb and bytes against the matrix k
  python bench/quant_bench.py zstd_split  # zstd-22 of each frontier tensor's codes alone, against the entropy
  python bench/quant_bench.py histograms  # after `trained`: per-tensor vs per-row-group vs per-column-group entropy

Prints Markdown rows (bench/quant_results.md holds the results and the exact commands). One thread: the machine's
cores are shared.
"""
import dataclasses
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt  # noqa: E402

ROWMAX = dict(GPTQ="0", MATRIX_CLIP_SIGMAS="0", MATRIX_BITS="0", EMBED_BITS="0", FP16_KEEP_PATTERNS="tok_emb",
              QUANT_CLIP_SEARCH="1", TARGET_BYTES="0")  # the previous default export
TRAINED = dict(DATA_PATH="data/sample", TOKENIZER_PATH="data/sample/tokenizer.model", NUM_LAYERS="4", MODEL_DIM="320",
               NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="3", TRAIN_SEQ_LEN="128", TRAIN_BATCH_TOKENS="8192",
               ITERATIONS="150", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="0", VAL_LOSS_EVERY="0",
               TRAIN_LOG_EVERY="50", BIGRAM_BUCKETS="512", BIGRAM_DIM="64", EVAL_STRIDE="0", TARGET_BYTES="0",
               VAL_MAX_TOKENS="65536", LOG_DIR="/tmp/quant_bench_logs", RUN_ID=f"qb{os.getpid()}")
FRONTIER = dict(VOCAB_SIZE="8192", NUM_LAYERS="11", MODEL_DIM="512", MLP_MULT="4", BIGRAM_BUCKETS="0",
                SMEAR_GATE="0", TRAIN_SEQ_LEN="1024", EVAL_STRIDE="0", TARGET_BYTES="0")


def entropy_bytes(qstate) -> float:
    total = 0.0
    for e in qstate.values():
        if "q" in e and e["q"].numel():
            c = np.bincount(e["q"].flatten().numpy().astype(np.int64) + 128)
            p = c[c > 0] / e["q"].numel()
            total += float(-(p * np.log2(p)).sum()) * e["q"].numel() / 8
    return total


def export(state, args, hessians):
    t0 = time.perf_counter()
    q = train_gpt.quantize_state(state, args, hessians)
    t1 = time.perf_counter()
    blob = train_gpt.pack(q, args)
    t2 = time.perf_counter()
    return q, blob, t1 - t0, t2 - t1


def score(blob, args, rt, val, luts):
    model, _ = train_gpt.build_model(args, rt, mtp=False)
    model.load_state_dict(train_gpt.dequantize_state(train_gpt.unpack(blob)[0]), strict=True)
    return train_gpt.evaluate(model, val, luts, args, rt, stride=0)["val_bpb"]


CACHE = "/tmp/quant_bench_trained.pt"  # the trained weights and Hessians, so later variants skip the training


def trained():
    env = dict(TRAINED)
    args = train_gpt.Hyperparameters.from_env(env)
    rt = train_gpt.Runtime(0, 1, torch.device("cpu"))
    torch.manual_seed(args.seed)
    luts, val, _, loader = train_gpt.prepare(args, rt)
    base, _ = train_gpt.build_model(args, rt)
    if os.path.exists(CACHE):
        cached = torch.load(CACHE)
        base.load_state_dict(cached["state"])
        hessians = cached["hessians"]
        print(f"weights and Hessians from {CACHE}")
    else:
        log = train_gpt.start_log(args, rt)
        opts = train_gpt.build_optimizers(base, args, rt)
        t0 = time.perf_counter()
        train_gpt.train(args, rt, base, base, opts, loader, lambda: None, log)
        log.close()
        print(f"trained {args.iterations} steps in {time.perf_counter() - t0:.0f}s, "
              f"{sum(p.numel() for p in base.parameters()):,} parameters", flush=True)
        t0 = time.perf_counter()
        hessians = train_gpt.collect_hessians(base, [loader.next_batch() for _ in range(args.gptq_calibration_batches)],
                                              args, rt)
        print(f"Hessians of {len(hessians)} matrices in {time.perf_counter() - t0:.1f}s")
        torch.save(dict(state=base.state_dict(), hessians=hessians), CACHE)
    pre = train_gpt.evaluate(base, val, luts, args, rt, stride=0)["val_bpb"]
    print(f"pre-quant bpb {pre:.4f}")
    state = train_gpt.export_state(base)
    print("| quantizer | compressor | round-trip bpb | gap | artifact bytes | quantize s | compress s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    variants = [("row max + clip search, fp16 embedding (previous default)", ROWMAX, False),
                ("SDClip RTN (GPTQ=0)", dict(GPTQ="0"), False), ("SDClip GPTQ (new default)", {}, True),
                ("SDClip GPTQ + LQER (rank 4, top 3)", dict(LQER_ENABLED="1"), True)]
    for name, over, gptq in variants:
        for comp, level in (("zstd", "22"), ("constriction", "22")):
            a = train_gpt.Hyperparameters.from_env(dict(env, **over, COMPRESSOR=comp, COMPRESS_LEVEL=level))
            q, blob, tq, tc = export(state, a, hessians if gptq else None)
            bpb = score(blob, a, rt, val, luts)
            print(f"| {name} | {comp} | {bpb:.4f} | {bpb - pre:+.4f} | {len(blob):,} | {tq:.2f} | {tc:.2f} |",
                  flush=True)


def student_t_(t: torch.Tensor, g, df=6.0):
    z = torch.randn(t.shape, generator=g)
    chi2 = torch.distributions.Chi2(df).sample(t.shape)  # uses the global generator, seeded below
    t.copy_(z / torch.sqrt(chi2 / df) * 0.02)


def frontier():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    args = train_gpt.Hyperparameters.from_env(dict(FRONTIER))
    rt = train_gpt.Runtime(0, 1, torch.device("cpu"))
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2 and "skip" not in n and "resid_mix" not in n:
                student_t_(p, g)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    batches = [[(torch.randint(0, 8192, (4, 1024), generator=g), torch.randint(0, 8192, (4, 1024), generator=g))]
               for _ in range(2)]
    hessians = train_gpt.collect_hessians(model, batches, args, rt)
    print(f"{n_params:,} parameters; Hessians of {len(hessians)} matrices from 8 x 1024 random tokens in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    state = train_gpt.export_state(model)
    print("| quantizer | compressor | codes | entropy bytes | artifact bytes | vs entropy | quantize s | compress s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, gptq in (("SDClip RTN", False), ("SDClip GPTQ", True)):
        for comp in ("constriction", "zstd"):
            if comp == "zstd" and gptq:
                continue  # zstd-22 of 36 M codes takes minutes; once (RTN) is enough for the comparison
            a = dataclasses.replace(args, compressor=comp, compress_level=22)
            q, blob, tq, tc = export(state, a, hessians if gptq else None)
            n = sum(e["q"].numel() for e in q.values() if "q" in e)
            h = entropy_bytes(q)
            print(f"| {name} | {comp} | {n:,} | {h:,.0f} | {len(blob):,} | {100 * (len(blob) / h - 1):+.2f}% | "
                  f"{tq:.1f} | {tc:.1f} |", flush=True)
    factors = {n: train_gpt.gptq_factor(H) for n, H in hessians.items()}  # as export_artifact: once per matrix
    for target in (16_000_000 - 10_000, 13_000_000):
        a = dataclasses.replace(args, compressor="constriction", target_bytes=target)
        lines = []
        t0 = time.perf_counter()
        blob, _ = train_gpt.fit_artifact(state, a, factors, os.path.getsize(train_gpt.__file__), lines.append)
        print(f"\nsize fit, TARGET_BYTES={target:,} (GPTQ, constriction, code {os.path.getsize(train_gpt.__file__):,} "
              f"bytes): {time.perf_counter() - t0:.0f}s, artifact {len(blob):,} bytes")
        print("\n".join("    " + l for l in lines), flush=True)


def sweep():
    """After `trained`: round-trip bpb and bytes of the GPTQ + constriction artifact against the matrix k (what the
    size fit trades: a smaller k, finer steps and a bigger file)."""
    args = train_gpt.Hyperparameters.from_env(dict(TRAINED))
    rt = train_gpt.Runtime(0, 1, torch.device("cpu"))
    luts = train_gpt.build_byte_luts(train_gpt.load_tokenizer(args), args.vocab_size)
    val, _ = train_gpt.load_val_tokens(args)
    cached = torch.load(CACHE)
    state = {k: v for k, v in cached["state"].items() if not k.startswith("mtp_heads.")}
    print("| matrix k | GPTQ round-trip bpb | RTN round-trip bpb | GPTQ artifact bytes |")
    print("|---:|---:|---:|---:|")
    for k in (3.0, 4.0, 6.0, 8.0, 10.0, 12.85, 16.0, 24.0, 48.0):
        row = []
        for h in (cached["hessians"], None):
            blob = train_gpt.pack(train_gpt.quantize_state(state, args, h, matrix_sigmas=k), args)
            row.append((score(blob, args, rt, val, luts), len(blob)))
        print(f"| {k:g} | {row[0][0]:.4f} | {row[1][0]:.4f} | {row[0][1]:,} |", flush=True)


def zstd_split():
    """The frontier shape's SDClip RTN codes: zstd-22 of each tensor's codes alone (summed) against the entropy, to
    place the whole artifact's zstd overhead."""
    import zstandard
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    args = train_gpt.Hyperparameters.from_env(dict(FRONTIER))
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2 and "skip" not in n and "resid_mix" not in n:
                student_t_(p, g)
    q = train_gpt.quantize_state(train_gpt.export_state(model), args)
    zc = zstandard.ZstdCompressor(level=22)
    by_kind = {}
    for n, e in q.items():
        if "q" in e:
            kind = "embedding int8" if n == "tok_emb.weight" else "block int6"
            z = len(zc.compress(e["q"].numpy().tobytes()))
            h = entropy_bytes({n: e})
            a, b = by_kind.get(kind, (0, 0))
            by_kind[kind] = (a + z, b + h)
    for kind, (z, h) in by_kind.items():
        print(f"| {kind} | zstd-22 per tensor {z:,} | entropy {h:,.0f} | {100 * (z / h - 1):+.2f}% |", flush=True)


def grouped_entropy(q: torch.Tensor, rows_per_group=0, cols_per_group=0) -> tuple[float, int]:
    """Bytes of ideal coding with one histogram per group of rows (or columns), and how many histograms."""
    x = q.numpy().astype(np.int64) + 128
    parts = ([x[i:i + rows_per_group] for i in range(0, x.shape[0], rows_per_group)] if rows_per_group else
             [x[:, j:j + cols_per_group] for j in range(0, x.shape[1], cols_per_group)])
    total = 0.0
    for part in parts:
        c = np.bincount(part.ravel())
        p = c[c > 0] / part.size
        total += float(-(p * np.log2(p)).sum()) * part.size / 8
    return total, len(parts)


def histograms():
    """What finer models would buy on the trained model's GPTQ codes: per tensor vs per 64 rows vs per 64 columns
    (ideal code lengths, before the cost of storing the extra histograms: ~2 bytes per used code per histogram)."""
    args = train_gpt.Hyperparameters.from_env(dict(TRAINED))
    cached = torch.load(CACHE)
    state = {k: v for k, v in cached["state"].items() if not k.startswith("mtp_heads.")}
    q = train_gpt.quantize_state(state, args, cached["hessians"])
    print("| tensor | codes | per tensor | per 64 rows (histograms) | per 64 columns (histograms) |")
    print("|---|---:|---:|---:|---:|")
    sums = np.zeros(3)
    for n, e in q.items():
        if "q" not in e:
            continue
        t = grouped_entropy(e["q"], rows_per_group=e["q"].shape[0])[0]
        r, nr = grouped_entropy(e["q"], rows_per_group=64)
        c, nc = grouped_entropy(e["q"], cols_per_group=64)
        sums += (t, r, c)
        print(f"| {n} | {e['q'].numel():,} | {t:,.0f} | {r:,.0f} ({nr}) | {c:,.0f} ({nc}) |")
    print(f"| all | | {sums[0]:,.0f} | {sums[1]:,.0f} | {sums[2]:,.0f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"trained": trained, "frontier": frontier, "histograms": histograms, "sweep": sweep,
     "zstd_split": zstd_split}[sys.argv[1]]()
