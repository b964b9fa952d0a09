"""One short device call: what the default stack's step, eval and GPTQ cost on the real shapes, on one GPU.

  GPU: PYTHONUNBUFFERED=1 python3 bench/gpu_check.py             (writes $OUT/gpu_check.json after every stage)
  CPU: python bench/gpu_check.py --cpu-smoke                     (tiny shapes, seconds: checks the code runs; CI)

Stages, in order; each is skipped (and says so in the JSON) once too little of CHECK_BUDGET_S (default 420) is left,
and --stages picks a subset for a rerun:
 0. kernels: the fused softcapped CE, eager and compiled, against the plain path at one rank's real logits.
 0. flex: document_mask's BlockMask built inside the compiled graph at B > 1 rows, against the dense mask eager.
 1. step: the default stack (PRESET=default, vocab 8192) as train_gpt.py builds it (bf16 residual stream, compiled),
    one rank's share of a step on 8 GPUs (one packed row of 48 x 2048 tokens, grad_accum 1), plain and looped: ms per step, the
    Muon step's share, peak memory, a profiler split of GPU time by kernel family, and the projection to 8 GPUs
    (Muon's Newton-Schulz work divided by 8; communication is not measured here).
 2. eval: rank 0 of 8 (collectives skipped) runs the preset's plain final eval (EVAL_STRIDE: the default's 0 is
    non-overlapping windows; --env EVAL_STRIDE=64 measures a sliding one) and its TTT on random tokens, after priming
    every graph as train_gpt.py does; projected to the full validation set on 8 GPUs.
 3. gptq: Hessians from calibration batches (ms per batch, so the reserve GPTQ_RESERVE_SECONDS=-1 would measure),
    the GPTQ quantization of every matrix, then the TARGET_BYTES size fit (the whole export).
 4. attention: one micro-batch (B=48, 8 q / 4 kv heads, T=2048, hd=64, bf16, causal) forward+backward, median ms,
    for SDPA flash, SDPA cuDNN (GQA, and with K/V expanded; train_gpt.py's set_kernels picks FlashAttention 3
    when importable, else SDPA cuDNN-first on Hopper: the step stage logs its choice), FlashAttention 3 causal and
    varlen (document cu_seqlens, as the packed loader's rows) when importable, the same for FA4 run eager (where
    bench/fa4_carry.sh's wheels are installed), flex_attention causal and document-masked; each checked against
    float32 math attention on the first two sequences (relative error of the output and the three gradients).
Random tokens and random weights: speed only, no scores. The SOTA's figures are in the JSON for comparison.
"""
import argparse, contextlib, dataclasses, json, os, statistics, sys, time, traceback

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt as tg  # noqa: E402
from bench import fa4_ops  # noqa: E402  (FA4 as custom ops; FA4 itself where flash-attn-4 imports)

SOTA = {"ms_per_step_8xH100": {"#1855 (mean)": 121.7, "#2135 before looping": 95.0, "#2135 looped": 140.0},
        "steps_in_600s": {"#1855": 4930}}
# tiny shapes for --cpu-smoke: the default stack's pieces, a 2-layer 64-wide model; 1088 x 64 > 65536, so GPTQ quantizes the tied embedding
SMOKE_ENV = dict(VOCAB_SIZE="1088", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8",
                 TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024", LOOP_START="0", LOOP_END="0", PARALLEL_START_LAYER="1",
                 EVAL_BATCH_SEQS="4", TTT_CHUNK_TOKENS="256", TTT_BATCH_SEQS="4",
                 GPTQ_CALIBRATION_BATCHES="2", COMPILE="0", EVAL_SEQ_LEN="80", TTT_EVAL_SEQ_LEN="80",
                 TTT_BATCH_SIZE="2", TTT_CHUNK_SIZE="16", TTT_LORA_RANK="4", PHASED_TTT_PREFIX_DOCS="4")
DOC_TOKENS = 957  # the mean validation document (47,851,520 CaseOps targets / 50,000 documents); --cpu-smoke: 40
FULL_VAL_DOCS = 50_000


class Check:
    """The results so far, written to OUT/gpu_check.json after every stage, and the time budget."""

    def __init__(self, out, budget, smoke):
        self.path, self.budget, self.smoke, self.t0 = os.path.join(out, "gpu_check.json"), budget, smoke, time.time()
        self.result = {"sota": SOTA}
        os.makedirs(out, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def save(self):
        self.result["wall_s"] = round(time.time() - self.t0, 1)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.result, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)

    def stage(self, name, fn, need_s, *args):
        """Runs fn(*args) into result[name] unless fewer than need_s seconds are left; an error is recorded, not
        raised, so later stages still run."""
        if self.left() < need_s and not self.smoke:
            self.result[name] = f"skipped: {self.left():.0f}s left of CHECK_BUDGET_S, needs ~{need_s}s"
        else:
            t = time.time()
            try:
                self.result[name] = fn(*args)
            except Exception as e:  # noqa: BLE001
                if self.smoke:
                    raise
                self.result[name] = {"error": repr(e)[:600], "traceback": traceback.format_exc()[-4000:]}
            if isinstance(self.result[name], dict):
                self.result[name]["stage_s"] = round(time.time() - t, 1)
        print(name, json.dumps(self.result[name], default=str)[:2000], flush=True)
        self.save()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warm=2, reps=8) -> float:
    """Median ms of fn(), CUDA events on the GPU, the wall clock on the CPU."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def peak_mib():
    return round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None


def doc_ids(B, T, device, mean_len=800, seed=0):
    """Document index per position: lengths ~ exponential(mean_len), at least 16 (a stand-in for FineWeb's)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lens = []
        while sum(lens) < T:
            lens.append(max(16, int(torch.empty(1).exponential_(1 / mean_len, generator=g))))
        rows.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[:T])
    return torch.stack(rows).to(device)


# ----------------------------------------------------------------------------------------------------------------------
# 1. attention backends

def attention_stage(dev, B, Hq, Hkv, T, D):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator(device=dev).manual_seed(0)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, do = (torch.randn(B, Hq, T, D, device=dev, dtype=dt, generator=g) for _ in range(2))
    k, v = (torch.randn(B, Hkv, T, D, device=dev, dtype=dt, generator=g) for _ in range(2))
    docs = doc_ids(B, T, dev)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    dense_doc = causal & (docs[:, :, None] == docs[:, None, :])  # [B, T, T]

    def sdpa(backend, expand=False):
        def f(q, k, v):
            if expand:
                k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand)
        return f

    variants = {}  # name -> (fn, uses the document mask)
    if dev.type == "cuda":
        variants["sdpa_flash_gqa"] = sdpa(SDPBackend.FLASH_ATTENTION), False
        variants["sdpa_cudnn_gqa"] = sdpa(SDPBackend.CUDNN_ATTENTION), False
        variants["sdpa_cudnn_expanded_kv"] = sdpa(SDPBackend.CUDNN_ATTENTION, expand=True), False
    else:
        variants["sdpa_math_gqa"] = sdpa(SDPBackend.MATH), False
    out = {"shape": dict(B=B, Hq=Hq, Hkv=Hkv, T=T, D=D, dtype=str(dt))}
    new = torch.ones_like(docs, dtype=torch.bool)  # each document's start: FlashAttention's varlen cu_seqlens
    new[:, 1:] = docs[:, 1:] != docs[:, :-1]
    seg = tg.Segments(torch.cat([torch.nonzero(new.flatten())[:, 0], torch.tensor([B * T], device=dev)]).int(), T)
    if dev.type == "cuda" and tg.FLASH is not None:  # train_gpt.attend's FlashAttention paths (what the default runs)
        variants[f"{tg.FLASH.__name__}_causal"] = (lambda q, k, v: tg.attend(q, k, v, None, True)), False
        variants[f"{tg.FLASH.__name__}_varlen_doc (fewer FLOPs)"] = (lambda q, k, v: tg.attend(q, k, v, seg, True)), True
    fa4 = fa4_ops.FA4 if dev.type == "cuda" else None
    if fa4 is not None:  # FA4's own functions, eager, through attend's FlashAttention calls (FLASH swapped for each)
        def as_flash(mask):
            def f(q, k, v):
                flash, tg.FLASH = tg.FLASH, fa4
                try:
                    return tg.attend(q, k, v, mask, True)
                finally:
                    tg.FLASH = flash
            return f
        variants["fa4_causal_eager"] = as_flash(None), False
        variants["fa4_varlen_doc_eager (fewer FLOPs)"] = as_flash(seg), True
        try:  # what keeps it out of train_gpt.py: "ok" here would mean a newer FA4 compiles in a full graph
            torch.compile(lambda q, k, v: fa4.flash_attn_func(q, k, v, causal=True), fullgraph=True)(
                *(x.transpose(1, 2) for x in (q, k, v)))
            out["fa4_fullgraph"] = "ok"
        except Exception as e:  # noqa: BLE001
            out["fa4_fullgraph"] = "error: " + repr(e)[:200]
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False) if dev.type == "cuda" else flex_attention
        cm = create_block_mask(lambda b, h, i, j: j <= i, None, None, T, T, device=dev)
        dm = create_block_mask(lambda b, h, i, j: (j <= i) & (docs[b, i] == docs[b, j]), B, None, T, T, device=dev)
        variants["flex_causal"] = (lambda q, k, v: flex(q, k, v, block_mask=cm, enable_gqa=True)), False
        variants["flex_doc_mask (fewer FLOPs)"] = (lambda q, k, v: flex(q, k, v, block_mask=dm, enable_gqa=True)), True
        out["doc_mask_sparsity_pct"] = float(dm.sparsity())
    except Exception as e:  # noqa: BLE001
        out["flex_error"] = repr(e)[:300]

    def reference(masked):
        """float32 math attention on the first two sequences: output and gradients of q, k, v."""
        qq, kk, vv = (t[:2].detach().float().requires_grad_(True) for t in (q, k, v))
        rep = Hq // Hkv
        mask = dense_doc[:2, None] if masked else causal
        with sdpa_kernel([SDPBackend.MATH]):
            y = F.scaled_dot_product_attention(qq, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1),
                                               attn_mask=mask)
        y.backward(do[:2].float())
        return y.detach(), qq.grad, kk.grad, vv.grad
    refs = {m: reference(m) for m in {m for _, m in variants.values()}}
    for name, (f, masked) in variants.items():
        try:
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            y = f(qq, kk, vv)
            y.backward(do)
            errs = [rel(a[:2], b) for a, b in zip((y, qq.grad, kk.grad, vv.grad), refs[masked])]

            def step():
                qq.grad = kk.grad = vv.grad = None
                f(qq, kk, vv).backward(do)
            out[name] = dict(ms_fwd_bwd=round(timed(step), 3), rel_err_out_dq_dk_dv=[float(f"{e:.2e}") for e in errs])
        except Exception as e:  # noqa: BLE001
            out[name] = "error: " + repr(e)[:300]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 0. the fused Triton kernels against the plain paths

def kernels_stage(smoke):
    """FUSED_KERNELS' softcapped CE at one rank's real shape (98,304 tokens, vocab 8192), bf16 logits: eager and compiled
    as the model (torch.compile fullgraph), and the plain path compiled; each forward+backward's median ms and the
    relative error of the loss and gradient against the plain path in float32. On the CPU (--cpu-smoke) the fused one
    runs only under TRITON_INTERPRET=1, float32, compiled with the aot_eager backend (no C++ build). (A fused
    LeakyReLU^2 MLP tile was measured here too, 2026-11-30, and removed: 15% slower than plain compiled.)"""
    args = default_args(smoke)
    N, V = (64, 1088) if smoke else (args.train_batch_tokens // 8, args.vocab_size)
    dt, cap = (torch.float32 if smoke else torch.bfloat16), args.logit_softcap
    g = torch.Generator(device=DEV).manual_seed(0)
    fused_ok = tg.triton is not None and (not smoke or os.environ.get("TRITON_INTERPRET") == "1")
    compile_ = (lambda f: torch.compile(f, backend="aot_eager", fullgraph=True)) if smoke else \
        (lambda f: torch.compile(f, fullgraph=True, dynamic=False))
    out = dict(shapes=dict(N=N, V=V, dtype=str(dt)), fused_run=fused_ok)
    z0 = (torch.randn(N, V, device=DEV, generator=g) * 8).to(dt)
    y = torch.randint(V, (N,), device=DEV, generator=g)
    plain = lambda z, y: F.cross_entropy(tg.softcap(z.float(), cap), y)

    def run(f):
        z = z0.detach().requires_grad_()
        loss = f(z, y)
        loss.backward()
        return loss.detach(), z.grad
    ref = run(plain)  # eager, float32
    variants = {"plain_compiled": compile_(plain)}
    if fused_ok:
        fused = lambda z, y: tg.softcap_ce(z, y, cap)[0].mean()
        variants.update(fused_eager=fused, fused_compiled=compile_(fused))
    for name, f in variants.items():
        try:
            got = run(f)
            out[f"ce_{name}"] = dict(ms_fwd_bwd=round(timed(lambda: run(f), reps=3 if smoke else 10), 3),
                                     rel_err_loss_grad=[float(f"{rel(a, b):.2e}") for a, b in zip(got, ref)])
        except Exception as e:  # noqa: BLE001
            if smoke:
                raise
            out[f"ce_{name}"] = {"error": repr(e)[:300], "traceback": traceback.format_exc()[-3000:]}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 1. document masks on B > 1 rows

def flex_stage(smoke):
    """train_gpt.document_mask's BlockMask, built inside the compiled graph as the model does, at B > 1 rows.
    attention: attend() alone, compiled with the mask built in the graph, and eager SDPA with the dense mask (bf16),
    each against float32 math attention on the first two rows (output). model: a 2-layer model of the default's width
    with every zero-initialised matrix drawn at random (else attention would reach neither the logits nor any
    gradient), compiled, against the same model eager with the dense mask: scoring (the sliding eval's 64 windows of
    2560, nats per target) and training (the shuffled loader's 48 rows of 2048: the loss and each matrix's gradient).
    Relative errors, and the compiled call's median ms. (2026-11-30, H200, torch 2.11: torch's create_block_mask
    inside the compiled eval graph read out of bounds at B = 64; this stage's first form, zero-init projections,
    showed a largest matrix-gradient error of 0.77 between compiled flex and eager dense at B = 48, unexplained.)"""
    args = default_args(smoke, **{k: SMOKE_ENV[k] for k in ("NUM_LAYERS", "LOOP_START", "LOOP_END",
                                                            "PARALLEL_START_LAYER")})
    rt = tg.Runtime(0, 1, DEV)
    out = dict(kernels=tg.set_kernels(args, rt))
    shapes = dict(score=(4, 80, False), train=(4, 64, True)) if smoke else \
        dict(score=(64, 2560, False), train=(48, 2048, True))
    real = tg.document_mask
    dense = lambda idx, flex=None, split=0: real(idx, False, split)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def tokens(B, T, seed=1):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(2, args.vocab_size, (B, T), generator=g)
        x[torch.rand(B, T, generator=g) < 1 / (40 if smoke else DOC_TOKENS)] = tg.BOS_ID
        return x.to(DEV), torch.randint(args.vocab_size, (B, T), generator=g).to(DEV)

    dt = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    for name, (B, T, _) in shapes.items():  # attention alone
        x, _ = tokens(B, T)
        g = torch.Generator(device=DEV).manual_seed(2)
        q = torch.randn(B, 8, T, 64 if not smoke else 16, device=DEV, generator=g).to(dt)
        k, v = (torch.randn(B, 4, T, q.size(-1), device=DEV, generator=g).to(dt) for _ in range(2))
        f = torch.compile(lambda q, k, v, x: tg.attend(q, k, v, tg.document_mask(x, split=T)), fullgraph=True,
                          dynamic=False) if not smoke else (lambda q, k, v, x: tg.attend(q, k, v, real(x, False, T)))
        m = dense(x[:2], split=T)
        kk, vv = (t[:2].float().repeat_interleave(2, 1) for t in (k, v))
        with sdpa_kernel([SDPBackend.MATH]):
            ref = F.scaled_dot_product_attention(q[:2].float(), kk, vv, attn_mask=m)
        got, sdpa = f(q, k, v, x)[:2], tg.attend(q[:2], k[:2], v[:2], m)
        out[f"attention_{name}"] = dict(B=B, T=T, ms_compiled=round(timed(lambda: f(q, k, v, x), reps=3), 3),
                                        rel_err_compiled_flex=float(f"{rel(got, ref):.2e}"),
                                        rel_err_eager_sdpa_dense=float(f"{rel(sdpa, ref):.2e}"))
    base, model = tg.build_model(args, rt, mtp=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in base.parameters():
            if p.ndim == 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    for name, (B, T, train) in shapes.items():
        x, y = tokens(B, T)

        def call(m):
            for p in base.parameters():
                p.grad = None
            with torch.set_grad_enabled(train), rt.autocast():
                if not train:
                    return {"nats": m(x, y, per_token=True).float()}
                loss = m(x, y, split=T)
                loss.backward()
            return {"loss": loss.detach().float(), **{n: p.grad.float() for n, p in base.named_parameters()
                                                       if p.ndim == 2 and p.grad is not None}}
        got = call(model)
        ms = timed(lambda: call(model), reps=3 if smoke else 5)
        tg.document_mask = dense  # the dense mask, eager
        try:
            ref = call(base)
        finally:
            tg.document_mask = real
        errs = {n: float(f"{rel(got[n], ref[n]):.2e}") for n in ref}
        out[f"model_{name}"] = dict(B=B, T=T, ms=round(ms, 2), rel_err=errs)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 2. the default stack's step

def profile_split(fn) -> dict:
    """GPU time (CPU time on the CPU) of one fn() by kernel family."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    groups = dict(attention=0.0, gemm=0.0, triton=0.0, nccl=0.0, other=0.0)
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0.0) if cuda else ev.self_cpu_time_total
        n = ev.key.lower()
        if not t or (cuda and n.startswith(("aten::", "cuda", "autograd", "torch", "profilerstep"))):
            continue
        key = ("attention" if any(s in n for s in ("flash", "fmha", "attention", "cudnn", "sdpa")) else
               "gemm" if any(s in n for s in ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas", "aten::mm", "aten::addmm",
                                               "aten::bmm")) else
               "triton" if "triton" in n else "nccl" if "nccl" in n else "other")
        groups[key] += t / 1000.0
    total = sum(groups.values()) or 1.0
    return {k: dict(ms=round(v, 2), pct=round(100 * v / total, 1)) for k, v in groups.items()}


def default_args(smoke, **extra):
    env = dict(SMOKE_ENV if smoke else {}, PRESET="default", **EXTRA_ENV, **extra)
    return tg.Hyperparameters.from_env(env)


def calib_batch(args, rows, seed=0):
    """Rows of TRAIN_SEQ_LEN, as the shuffled calibration loader reads them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(args.vocab_size, (rows, args.train_seq_len), generator=g)
    x[:, ::800] = tg.BOS_ID
    return x.to(DEV), torch.randint(args.vocab_size, x.shape, generator=g).to(DEV)


def random_batch(args, rt, rows, seed=0):
    """One rank's micro-batch as the default's loader (TRAIN_LOADER=packed) gives it: one row of rows x TRAIN_SEQ_LEN
    tokens, documents of DOC_TOKENS on average, with its cu_seqlens where FlashAttention runs (train_step's input)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, args.vocab_size, (1, rows * args.train_seq_len), generator=g)
    ids = doc_ids(1, x.size(1), "cpu", DOC_TOKENS, seed)[0]
    bos = (torch.nonzero(ids[1:] != ids[:-1])[:, 0] + 1).numpy()
    x[0, bos] = tg.BOS_ID
    cus = [torch.from_numpy(tg.cu_seqlens(bos, x.size(1), k)).to(DEV) for k in (tg.seq_lengths(args) if tg.flash_runs(args, rt) else ())]
    return x.to(DEV), torch.randint(args.vocab_size, x.shape, generator=g).to(DEV), *cus


def step_stage(smoke):
    args = default_args(smoke)
    rt = tg.Runtime(0, 1, DEV)
    rows = args.train_batch_tokens // 8 // args.train_seq_len  # one rank's micro-batch on 8 GPUs: 48 x 2048
    kernels = tg.set_kernels(args, rt)  # the attention and fused kernels train_gpt.py would pick here
    batch = [random_batch(args, rt, rows)]
    base, model = tg.build_model(args, rt)
    optimizers = tg.build_optimizers(base, args, rt)
    out = dict(tokens_per_rank=rows * args.train_seq_len, vocab=args.vocab_size, act_dtype=str(rt.act_dtype),
               compiled=model is not base, kernels=kernels)
    for ctx in (tg.Ctx(looping=False), tg.Ctx(looping=True)):
        name = "looped" if ctx.looping else "plain"
        t = time.time()
        tg.train_step(model, batch, optimizers, args, rt, ctx)
        sync()
        first = time.time() - t
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ms = timed(lambda: tg.train_step(model, batch, optimizers, args, rt, ctx), reps=3 if smoke else 8)

        def muon_only():  # Muon's step on fresh gradients (one rank does all of Newton-Schulz here, 1/8 on 8 GPUs)
            x, y, *cus = batch[0]
            with rt.autocast():
                model(x, y, ctx=ctx, split=args.train_seq_len,
                      segments=tg.Segments(cus[0], args.train_seq_len) if cus else None).backward()
            sync()
            t = time.perf_counter()
            optimizers[1].step()
            sync()
            dt = 1000 * (time.perf_counter() - t)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            return dt
        muon = statistics.median([muon_only() for _ in range(3)])
        out[name] = dict(ms_per_step=round(ms, 2), muon_ms=round(muon, 2), first_call_s=round(first, 1),
                         projected_8gpu_ms_no_comms=round(ms - muon * 7 / 8, 2), peak_mib=peak_mib(),
                         gpu_time_split=profile_split(lambda: tg.train_step(model, batch, optimizers, args, rt, ctx)))
        print(name, out[name], flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 3. GPTQ: calibration, quantization, the size fit

def gptq_stage(smoke):
    args = default_args(smoke)
    rt = tg.Runtime(0, 1, DEV)
    torch.manual_seed(0)
    base = tg.GPT(args).to(DEV)
    base.act_dtype = rt.act_dtype
    rows = args.train_batch_tokens // 8 // args.train_seq_len
    batches = [[calib_batch(args, rows, seed)] for seed in range(3)]
    times = []
    for b in batches:
        sync()
        t = time.perf_counter()
        hessians = tg.collect_hessians(base, [b], args, rt)
        sync()
        times.append(time.perf_counter() - t)
    per_batch = statistics.median(times[1:])
    out = dict(calibration_batch_s=round(per_batch, 3), first_batch_s=round(times[0], 3),
               reserve_measured_s=round(tg.GPTQ_RESERVE_MARGIN * args.gptq_calibration_batches * per_batch, 2),
               reserve_batches=args.gptq_calibration_batches)
    sync()
    t = time.perf_counter()
    factors = {n: tg.gptq_factor(H) for n, H in hessians.items()}
    state = tg.export_state(base)
    tg.quantize_state(state, args, factors)
    sync()
    out.update(gptq_quantize_s=round(time.perf_counter() - t, 2), matrices=len(factors))
    if smoke or CHECK.left() > 150:
        t = time.perf_counter()
        blob, fit = tg.fit_artifact(state, args, factors, os.path.getsize(tg.__file__), lambda m: None, True)
        out.update(size_fit_s=round(time.perf_counter() - t, 1), size_fit_trials=fit["trials"], bytes_model=len(blob))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 4. eval and TTT, projected to the full validation set on 8 GPUs

@contextlib.contextmanager
def rank0_of(world):
    """A Runtime of rank 0 of `world` on this one device: collectives are skipped (their cost is not measured), so
    the eval code splits its work as on `world` GPUs and this device does rank 0's share."""
    real = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: None
    try:
        yield tg.Runtime(0, world, DEV)
    finally:
        torch.distributed.all_reduce = real


def eval_stage(smoke):
    args = default_args(smoke)
    world, L, stride = tg.RECORD_RANKS, args.eval_seq_len or args.train_seq_len, args.eval_stride
    out = dict(world=world, stride=stride, full_val_targets=tg.FULL_VAL_TOKENS)
    with rank0_of(world) as rt:
        out["kernels"] = tg.set_kernels(args, rt)
        base, model = tg.build_model(args, rt, mtp=False)
        luts = [torch.ones(args.vocab_size, dtype=torch.long), torch.zeros(args.vocab_size, dtype=torch.bool),
                torch.zeros(args.vocab_size, dtype=torch.bool)]
        batches = 1 if smoke else 3  # EVAL_BATCH_SEQS windows each, scored by rank 0
        n = L + (world * batches * args.eval_batch_seqs - 1) * (stride or L)
        g = torch.Generator().manual_seed(0)
        val = torch.randint(args.vocab_size, (n + 1,), generator=g)
        if args.ttt_mode == "lora":  # documents of the mean length, enough for rank 0's projection batches
            docs = world * (tg.TTT_PROJECT_CHUNKS + 1) * args.ttt_batch_size
            ttt_val = torch.randint(1, args.vocab_size, (docs * (40 if smoke else DOC_TOKENS) + 1,), generator=g)
            ttt_val[:-1:40 if smoke else DOC_TOKENS] = tg.BOS_ID
            # the prefix (global SGD) as the same share of the documents as on the full set, so that scaling all the
            # work by tokens projects it right (2026-11-30: all 2,500 prefix documents in 2,560 projected 964 s)
            args = dataclasses.replace(args, phased_ttt_prefix_docs=max(
                1, docs * args.phased_ttt_prefix_docs // FULL_VAL_DOCS))
        else:
            ttt_val = torch.randint(args.vocab_size, ((tg.TTT_PROJECT_CHUNKS + 1) * args.ttt_chunk_tokens + 1,),
                                    generator=g)
        t = time.time()
        if model is not base:  # the plain eval's and TTT's graphs, as train_gpt.py's prime_eval compiles them
            _, L, seqs = tg.eval_plan(val, args, rt, stride)
            tg.prime_scoring(model, args, rt, stride, seqs, L)
            if args.ttt_mode == "sgd":
                _, L2, seqs = tg.ttt_plan(ttt_val, args, rt, stride)
                tg.ttt_warmup(base, model, args, rt, stride, seqs, L2)
        sync()
        out["prime_s"] = round(time.time() - t, 1)
        r = tg.evaluate(model, val, luts, args, rt, stride)
        windows = -(-(tg.FULL_VAL_TOKENS - L) // (stride or L)) + 1
        n_windows = len(tg.sliding_windows(n, L, stride))
        out["plain"] = dict(rank0_windows=-(-n_windows // world), eval_s=round(r["eval_time_s"], 3),
                              projected_full_val_8gpu_s=round(r["eval_time_s"] * windows / n_windows, 1))
        lines, graphs = [], {}
        phased = tg.phased_lora

        def counted(*a, **k):  # graphs dynamo builds during the eval proper, after the priming: each one is a compile
            graphs["primed"] = counters["stats"]["unique_graphs"]  # on the clock
            return phased(*a, **k)
        tg.phased_lora = counted
        counters.clear()
        try:
            if args.ttt_mode == "lora":  # compiles lora_nats first (its log's ttt_lora_compile line), off the clock
                r = tg.evaluate_ttt_lora(base, ttt_val, luts, args, rt, lines.append)
            else:
                r = tg.evaluate_ttt(base, model, ttt_val, luts, args, rt, stride, lines.append)
        finally:
            tg.phased_lora = phased
        out["ttt"] = dict(mode=args.ttt_mode, prefix_docs=args.phased_ttt_prefix_docs, chunks=r["chunks"],
                          chunk_s=round(r["chunk_time_s"], 3),
                          projected_full_val_8gpu_s=round(r["projected_full_val_s"], 1),
                          graphs_after_priming=counters["stats"]["unique_graphs"] - graphs.get("primed", 0), log=lines)
    return out


# ----------------------------------------------------------------------------------------------------------------------

# run in this order, each with the seconds it needs on an H200, compiles included (2026-11-30: kernels 18, flex 90, step
# 121, eval 141 with the old TTT prefix and the LoRA TTT eager, attention 13, gptq 9 without the size fit). eval's 230
# guesses the compiled LoRA TTT's priming (dynamic shapes, forward and backward: 2 graphs) at up to 100 s; unmeasured.
STAGES = dict(kernels=40, flex=100, step=150, eval=230, gptq=40, attention=30)


def main():
    global DEV, CHECK
    p = argparse.ArgumentParser()
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the code runs")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="a train_gpt.py variable for every stage's model, e.g. FUSED_KERNELS=0 (repeatable)")
    p.add_argument("--flash", choices=("fa4",), help="fa4: FA4 wrapped as custom ops (bench/fa4_ops.py) as "
                   "train_gpt.FLASH, so the compiled step and evals run it where FA3 would (needs fa4_carry.sh's "
                   "packages)")
    opts = p.parse_args()
    if opts.flash:
        if fa4_ops.FA4 is None:
            p.error("--flash fa4: flash_attn.cute.interface does not import (bench/fa4_carry.sh packs it)")
        tg.FLASH = fa4_ops
    EXTRA_ENV.update(kv.split("=", 1) for kv in opts.env)
    smoke = opts.cpu_smoke or not torch.cuda.is_available()
    DEV = torch.device("cpu" if smoke else "cuda")
    CHECK = Check(opts.out, float(os.environ.get("CHECK_BUDGET_S", "420")), smoke)
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, smoke=smoke,
               gpu=torch.cuda.get_device_name() if not smoke else "cpu",
               cudnn=torch.backends.cudnn.version() if not smoke else None)
    with contextlib.suppress(ImportError):
        import triton
        env["triton"] = triton.__version__
    env["extra_env"], env["flash"] = EXTRA_ENV, getattr(tg.FLASH, "__name__", None)
    CHECK.result["env"] = env
    CHECK.save()
    if not smoke:
        torch.backends.cuda.matmul.allow_tf32 = True  # as setup_runtime
        torch.backends.cudnn.allow_tf32 = True
    chosen = opts.stages.split(",")
    unknown = set(chosen) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {','.join(STAGES)}")
    shapes = (2, 8, 4, 128, 16) if smoke else (48, 8, 4, 2048, 64)
    runs = dict(attention=(attention_stage, DEV, *shapes), kernels=(kernels_stage, smoke), flex=(flex_stage, smoke), step=(step_stage, smoke), gptq=(gptq_stage, smoke),
                eval=(eval_stage, smoke))
    for name in chosen:
        fn, *args = runs[name]
        CHECK.stage(name, fn, STAGES[name], *args)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    CHECK.save()
    print(f"wrote {CHECK.path} in {CHECK.result['wall_s']}s", flush=True)


DEV, CHECK, EXTRA_ENV = torch.device("cpu"), None, {}

if __name__ == "__main__":
    main()
