"""One-call benchmark of train_gpt.py configurations on the proxy corpus (never FineWeb: its scores only compare
configurations with each other). Prepares the data, measures the device's matmul peak, runs each config for a fixed
wall clock, and writes one table (stdout, CSV, Markdown) of speed, MFU, memory, scores and artifact size.

GPU:     python bench/run_bench.py [--configs baseline,seed162,default] [--seconds 150] [--budget 570]
CPU/CI:  python bench/run_bench.py --dry-run --out /tmp/bench
Every config runs with CASEOPS_ENABLED=0: the proxy shards made here are plain text (bench/pieces_cpu.py uses CaseOps data).
Staging: python bench/run_bench.py --stage-proxy   (copies a slice of ../shared/proxy into bench_data/proxy)
"""
import argparse, csv, glob, hashlib, json, os, platform, re, shutil, signal, statistics, subprocess, sys, tempfile
import threading, time
from collections import deque

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_PROXY = os.path.join(ROOT, "..", "shared", "proxy")
STAGED_PROXY = os.path.join(ROOT, "bench_data", "proxy")
DRY_DATA_LIMITS = ["--max-train-docs", "200", "--max-val-docs", "20"]
DRY_ENV = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", TRAIN_SEQ_LEN="64",
               EVAL_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024", ITERATIONS="4", WARMUP_STEPS="1",
               VAL_BATCH_SIZE="4096", VAL_MAX_TOKENS="4096", EVAL_STRIDE="32", EVAL_BATCH_SEQS="8",
               BIGRAM_BUCKETS="64", BIGRAM_DIM="16", MAX_WALLCLOCK_SECONDS="30", LOOP_START="0", LOOP_END="0",
               GPTQ_RESERVE_SECONDS="0", TTT_CHUNK_TOKENS="1024", TTT_EVAL_SEQ_LEN="64")
# (header, dotted key into the row: the run's summary plus status fields, format)
COLUMNS = [
    ("config", "config", "{}"), ("status", "status", "{}"), ("steps", "steps", "{}"),
    ("ms/step", "step_avg_ms", "{:.1f}"), ("tokens/s", "tokens_per_s", "{:,.0f}"), ("MFU %", "mfu_pct", "{:.1f}"),
    ("peak MiB", "peak_mem_mib", "{:,.0f}"), ("pre-quant bpb", "pre_quant.val_bpb", "{:.4f}"),
    ("post-quant bpb", "final.val_bpb", "{:.4f}"), ("quant gap", "quant_gap_bpb", "{:+.4f}"),
    ("eval s", "final.eval_time_s", "{:.1f}"), ("TTT bpb", "ttt.val_bpb", "{:.4f}"), ("TTT s", "ttt.eval_time_s", "{:.1f}"),
    ("evals 8x full s", "eval_full_8x_s", "{:.0f}"), ("artifact bytes", "bytes_total", "{:,}"),
    ("valid", "artifact_valid", "{}"),
]
CSV_EXTRA = ["run_id", "returncode", "error", "wall_s", "model_params", "world_size", "train_flops_per_token",
             "final.tokens", "final.stride", "hardware", "roundtrip.eval_time_s", "ttt.chunk_time_s",
             "ttt.projected_full_val_s", "ttt.over_budget"]
FULL_VAL_TOKENS, RECORD_RANKS = 62_021_632, 8  # the sp1024 records' validation targets, on 8 GPUs


def tokenizer_name(vocab) -> str:
    return f"fineweb_{vocab}_bpe.model"


def has_shards(data_dir, vocab=1024) -> bool:
    return all(glob.glob(os.path.join(data_dir, p))
               for p in ("fineweb_train_*.bin", "fineweb_val_*.bin", tokenizer_name(vocab)))


def prepare_data(data_dir, src, train_files=1, workers=None, limits=(), vocab=1024) -> None:
    """Tokenize the proxy corpus into data_dir with data/prepare_proxy.py (which trains the tokenizer when vocab is
    not 1024), unless shards are already there."""
    if has_shards(data_dir, vocab):
        print(f"data: reusing shards in {data_dir}", flush=True)
        return
    cmd = [sys.executable, os.path.join(ROOT, "data", "prepare_proxy.py"), "--src", src, "--out", data_dir,
           "--train-files", str(train_files), "--workers", str(workers or os.cpu_count() or 1), "--vocab", str(vocab),
           *limits]
    print("data: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    if not has_shards(data_dir, vocab):
        sys.exit(f"run_bench: {data_dir} still lacks train/val shards or {tokenizer_name(vocab)} after prepare_proxy.py")


def stage_proxy(train_files=1, src=SHARED_PROXY, dest=STAGED_PROXY) -> int:
    """Copy the tokenizer, the first train_files train files and the val file into dest; return bytes copied."""
    train = sorted(glob.glob(os.path.join(src, "text", "docs_*.jsonl.zst")))[:train_files]
    files = [*glob.glob(os.path.join(src, "tokenizers", "*")), *train, os.path.join(src, "text", "val_docs.jsonl.zst")]
    if not train or not os.path.isfile(files[-1]):
        sys.exit(f"run_bench: {src} does not look like the proxy corpus (text/docs_*.jsonl.zst, val_docs.jsonl.zst)")
    shutil.rmtree(dest, ignore_errors=True)  # the staged folder is carried whole: no leftovers from a larger staging
    total = 0
    for path in files:
        target = os.path.join(dest, os.path.relpath(path, src))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
        total += os.path.getsize(target)
    return total


def measure_peak_flops(device="cuda", size=8192, reps=20) -> float:
    """Median matmul FLOP/s: bf16 size^2 @ size^2 with CUDA events, or float32 on CPU with perf_counter."""
    import torch
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def code_id(commit=None) -> str:
    """The git commit (or 'unknown': the GPU machine's copy has no .git) and train_gpt.py's hash."""
    if not commit:
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
            commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        except OSError:
            commit = "unknown"
    with open(os.path.join(ROOT, "train_gpt.py"), "rb") as f:
        return f"{commit} (train_gpt.py sha256 {hashlib.sha256(f.read()).hexdigest()[:16]})"


def parse_kv(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.exit(f"run_bench: expected KEY=VAL, got {item!r}")
        out[key] = value
    return out


def parse_configs(spec) -> list[tuple[str, str]]:
    """'baseline,fast=default' -> [(label, preset)]; a bare name is both; preset 'default' sets no PRESET."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        label, _, preset = item.partition("=")
        out.append((label, preset or label))
    return out


def config_env(preset, data_dir, run_id, log_dir, seconds, overrides, vocab=1024) -> dict:
    env = dict(os.environ)
    env.pop("PRESET", None)
    if preset != "default":
        env["PRESET"] = preset
    env.update(DATA_PATH=data_dir, TOKENIZER_PATH=os.path.join(data_dir, tokenizer_name(vocab)), RUN_ID=run_id,
               VOCAB_SIZE=str(vocab),
               MAX_WALLCLOCK_SECONDS=str(seconds), LOG_DIR=log_dir, VAL_LOSS_EVERY="0",
               CASEOPS_ENABLED="0",  # the proxy shards here are plain text: bytes from the tokenizer's pieces
               SUBMISSION_JSON=os.path.join(log_dir, f"{run_id}_submission.json"),
               DATA_LABEL=f"proxy corpus ({os.path.basename(os.path.normpath(data_dir))}), not FineWeb")
    env.update(overrides)
    return env


def last_error_line(lines) -> str:
    """train_gpt.py's own one-line error, else the last Python exception line (not torchrun's ChildFailedError
    wrapper, which hides the cause), else the last line mentioning an error, else the last line."""
    lines = [line.strip() for line in lines if line.strip()]
    tests = (lambda x: x.startswith("train_gpt.py: error"),
             lambda x: re.match(r"^[\w.]*(Error|Exception)\b", x) and "ChildFailedError" not in x,
             lambda x: "error" in x.lower())
    for test in tests:
        found = [x for x in lines if test(x)]
        if found:
            return found[-1]
    return lines[-1] if lines else ""


def run_config(cmd, env, out_path, timeout=None, tail=6) -> dict:
    """Run one training command, streaming its output to out_path; keep the last lines for the report."""
    last = deque(maxlen=200)
    t0 = time.time()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)
        killed = []
        timer = threading.Timer(timeout or 0, lambda: (killed.append(1), os.killpg(proc.pid, signal.SIGKILL)))
        if timeout:  # the whole process group, so torchrun's workers go too
            timer.start()
        for line in proc.stdout:
            out.write(line)
            last.append(line.rstrip("\n"))
        rc = proc.wait()
        timer.cancel()
    for line in list(last)[-tail:]:
        print("    | " + line, flush=True)
    status = "timeout" if killed else "failed" if rc else "ok"
    return dict(status=status, returncode=rc, wall_s=time.time() - t0,
                error=last_error_line(list(last)) if status != "ok" else "")


def read_summary(path) -> dict:
    """The run's summary JSON, or {} when it is missing or unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def get(d, dotted):
    for key in dotted.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def mfu(summary, peak_flops):
    """Model FLOP utilisation (0..1) or None if any input is missing."""
    tps, fpt, world = get(summary, "tokens_per_s"), get(summary, "train_flops_per_token"), get(summary, "world_size")
    if not (tps and fpt and peak_flops):
        return None
    return tps * fpt / ((world or 1) * peak_flops)


def eval_full_seconds(summary):
    """Seconds of all the final evals (round trip, sliding, TTT) on the full validation set on 8 of this run's
    devices: each phase's measured time scaled by full/scored targets and by ranks/8 (the work splits over ranks)."""
    tokens, world = get(summary, "final.tokens"), get(summary, "world_size") or 1
    phases = [summary.get("roundtrip"), summary.get("final"), summary.get("ttt")]
    if phases[1] == phases[0]:  # EVAL_STRIDE=0: the final eval is the round-trip one
        phases[1] = None
    times = [p.get("eval_time_s") for p in phases if isinstance(p, dict)]
    if not tokens or not times or None in times:
        return None
    return sum(times) * FULL_VAL_TOKENS / tokens * world / RECORD_RANKS


def make_row(label, result, summary, peak_flops) -> dict:
    row = {**summary, "config": label, **result, "eval_full_8x_s": eval_full_seconds(summary)}
    if row["status"] == "ok" and not summary:
        row.update(status="no summary", error="the run exited 0 but wrote no summary JSON")
    m = mfu(summary, peak_flops)
    row["mfu_pct"] = None if m is None else 100 * m
    return row


def cell(row, key, fmt="{}") -> str:
    value = get(row, key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(rows) -> str:
    header = [h for h, _, _ in COLUMNS]
    body = [[cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.rjust(w) if i > 1 else x.ljust(w) for i, (x, w) in enumerate(zip(line, widths)))
             for line in [header, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_reports(rows, meta, out_dir, stamp) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"bench_{stamp}")
    with open(base + ".csv", "w", newline="") as f:
        f.writelines(f"# {k}: {v}\n" for k, v in meta.items())
        writer = csv.writer(f)
        writer.writerow([h for h, _, _ in COLUMNS] + CSV_EXTRA)
        for r in rows:
            writer.writerow([cell(r, k) for _, k, _ in COLUMNS] + [cell(r, k) for k in CSV_EXTRA])
    with open(base + ".md", "w") as f:
        f.write("# train_gpt.py benchmark (proxy corpus, not FineWeb)\n\n")
        f.writelines(f"- {k}: {v}\n" for k, v in meta.items())
        f.write("\n| " + " | ".join(h for h, _, _ in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
        for r in rows:
            f.write("| " + " | ".join(cell(r, k, fmt) for _, k, fmt in COLUMNS) + " |\n")
        problems = [f"- {r['config']} ({r['status']}, rc {r.get('returncode')}): `{r['error']}`\n"
                    for r in rows if r.get("error")]
        if problems:
            f.write("\nRuns that did not finish cleanly:\n\n" + "".join(problems))
    return base + ".csv", base + ".md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="baseline,seed162,default",
                   help="comma-separated presets; LABEL=PRESET runs PRESET under another name")
    p.add_argument("--seconds", type=float, default=150, help="MAX_WALLCLOCK_SECONDS of each run")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL", help="env override for every run")
    p.add_argument("--config-env", action="append", default=[], metavar="NAME:KEY=VAL", help="override for one run")
    p.add_argument("--vocab", default="1024", help="comma-separated vocabularies: 1024 is the challenge tokenizer, "
                   "others (4096, 8192) a BPE trained on the proxy by data/prepare_proxy.py")
    p.add_argument("--data", default=None, help="shard folder (default bench_data/proxy_sp<vocab>; dry run: a temp dir)")
    p.add_argument("--src", default=None, help="proxy corpus (default: bench_data/proxy if any, else ../shared/proxy)")
    p.add_argument("--train-files", type=int, default=1, help="proxy train files to tokenize (or stage)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--max-train-docs", type=int, default=None)
    p.add_argument("--max-val-docs", type=int, default=None)
    p.add_argument("--nproc", type=int, default=None, help="GPUs per run (default: all visible, rounded to 1/2/4/8)")
    p.add_argument("--out", default=os.path.join(ROOT, "logs", "bench"), help="reports go here, run logs in OUT/runs")
    p.add_argument("--budget", type=float, default=0, help="seconds for the whole harness: a config is skipped "
                   "when fewer are left than the longest run took, a run is killed at it; reports are always written")
    p.add_argument("--commit", default=None, help="commit to report (default: git rev-parse --short HEAD)")
    p.add_argument("--keep-artifacts", action="store_true", help="keep each run's .ptz (deleted by default)")
    p.add_argument("--dry-run", action="store_true", help="tiny data and model on CPU, the whole pipeline in ~1 min")
    p.add_argument("--stage-proxy", action="store_true", help="copy a slice of ../shared/proxy to bench_data/proxy")
    return p.parse_args(argv)


def per_config_env(items, labels) -> dict:
    out = {label: {} for label in labels}
    for item in items:
        label, sep, kv = item.partition(":")
        if not sep or label not in out:
            sys.exit(f"run_bench: --config-env {item!r}: expected NAME:KEY=VAL with NAME one of {', '.join(labels)}")
        out[label].update(parse_kv([kv]))
    return out


def device_info(dry_run, nproc) -> tuple[str, int, float, dict]:
    """(device, processes per run, measured peak FLOP/s, header fields)."""
    import torch
    gpus = 0 if dry_run else torch.cuda.device_count()
    if gpus:
        peak = measure_peak_flops("cuda")
        hw, how = f"{torch.cuda.get_device_name(0)} x {gpus}", "bf16 8192^3 matmuls on GPU 0"
        torch.cuda.empty_cache()  # the runs get GPU 0's memory back (the CUDA context itself stays)
    else:  # 1024 rather than 512: small CPU matmuls are dominated by overhead
        peak = measure_peak_flops("cpu", size=1024)
        hw, how = f"CPU: {cpu_model()} ({os.cpu_count()} cores)", "CPU float32 1024^3 matmuls; MFU is relative to it"
    # train_gpt.py needs WORLD_SIZE to divide 8
    n = (nproc or max(k for k in (1, 2, 4, 8) if k <= gpus)) if gpus else 1
    meta = dict(hardware=hw, torch=torch.__version__, cuda=torch.version.cuda or "none",
                peak_tflops=f"{peak / 1e12:.4g} TFLOP/s (measured: median of 20 {how})", processes_per_run=n)
    return ("cuda" if gpus else "cpu"), n, peak, meta


def run_all(opts, configs, data_dirs, meta, peak, cmd, stamp, t_start) -> list[dict]:
    """Each config at each vocabulary in turn (label@vocab when there are several); reports are rewritten after
    every run, so a harness killed mid-way leaves its rows."""
    log_dir = os.path.join(os.path.abspath(opts.out), "runs")
    console_dir = os.path.join(os.path.abspath(opts.out), "console")  # not in LOG_DIR: train_gpt.py wants it fresh
    os.makedirs(console_dir, exist_ok=True)
    extra = per_config_env(opts.config_env, [label for label, _ in configs])
    rows, longest = [], 0.0
    for vocab, (base, preset) in ((v, c) for v in data_dirs for c in configs):
        label = f"{base}@{vocab}" if len(data_dirs) > 1 else base
        run_id = f"bench_{label.replace('@', '_v')}_{stamp}"
        overrides = {**(DRY_ENV if opts.dry_run else {}), **parse_kv(opts.env), **extra[base]}
        env = config_env(preset, data_dirs[vocab], run_id, log_dir, opts.seconds, overrides, vocab)
        left = opts.budget - (time.time() - t_start) if opts.budget else None
        if left is not None and left < max(longest, 30):
            result = dict(status="skipped", returncode=None, wall_s=0.0, error=f"budget: {left:.0f}s left")
        else:
            print(f"\n== {label} (PRESET={env.get('PRESET', 'none')}) run_id={run_id}", flush=True)
            result = run_config(cmd, env, os.path.join(console_dir, f"{run_id}.out"), left)
            longest = max(longest, result["wall_s"])
        summary = read_summary(os.path.join(env["LOG_DIR"], f"{env['RUN_ID']}.json"))
        if not opts.keep_artifacts:
            for path in glob.glob(os.path.join(env["LOG_DIR"], f"{env['RUN_ID']}.*.ptz")):
                os.remove(path)
        rows.append(make_row(label, result, summary, peak))
        write_reports(rows, meta, opts.out, stamp)
    return rows


def main(argv=None) -> list[dict]:
    t_start, opts = time.time(), parse_args(argv)
    if opts.stage_proxy:
        total = stage_proxy(opts.train_files, opts.src or SHARED_PROXY)
        print(f"staged {total / 2**20:.1f} MiB into {STAGED_PROXY}; carry bench_data/proxy to the GPU call")
        return []
    configs = parse_configs(opts.configs)
    if not configs:
        sys.exit("run_bench: --configs names no configuration")
    stamp = time.strftime("%Y%m%d_%H%M%S")
    vocabs = [int(v) for v in opts.vocab.split(",") if v.strip()]
    if opts.data and len(vocabs) != 1:
        sys.exit("run_bench: --data names one shard folder, so give one --vocab")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        data_dirs = {v: os.path.abspath(opts.data or (os.path.join(tmp, str(v)) if opts.dry_run else
                                                      os.path.join(ROOT, "bench_data", f"proxy_sp{v}"))) for v in vocabs}
        src = opts.src or (STAGED_PROXY if os.path.isdir(STAGED_PROXY) else SHARED_PROXY)
        limits = (DRY_DATA_LIMITS if opts.dry_run else []) + [
            x for flag, v in (("--max-train-docs", opts.max_train_docs), ("--max-val-docs", opts.max_val_docs))
            if v is not None for x in (flag, str(v))]
        for vocab, data_dir in data_dirs.items():
            prepare_data(data_dir, src, 1 if opts.dry_run else opts.train_files, opts.workers, limits, vocab)
        device, nproc, peak, meta = device_info(opts.dry_run, opts.nproc)
        seconds = DRY_ENV["MAX_WALLCLOCK_SECONDS"] + " (dry run)" if opts.dry_run else opts.seconds
        meta.update(git_commit=code_id(opts.commit), seconds_per_run=seconds,
                    data=f"{', '.join(data_dirs.values())}: proxy corpus tokenized from {src}, NOT FineWeb "
                         "(compares configs only)",
                    mode="dry run: tiny model on CPU" if opts.dry_run else "full")
        print("\n".join(f"{k}: {v}" for k, v in meta.items()), flush=True)
        train = os.path.join(ROOT, "train_gpt.py")
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", train]
               if device == "cuda" else [sys.executable, train])
        rows = run_all(opts, configs, data_dirs, meta, peak, cmd, stamp, t_start)
    print("\n" + format_table(rows))
    print(f"\nreports: {os.path.join(opts.out, f'bench_{stamp}')}.csv and .md")
    return rows


if __name__ == "__main__":
    main()
