"""Regenerates tests/golden/record0409.npz and sota1855.npz by running the records' own train_gpt.py (read from a local
git mirror of openai/parameter-golf, never copied here) on CPU in float32, with FlashAttention-3 and Triton replaced
by small shims (SDPA; varlen = causal within segments) and the records' bf16 casts made float32. Usage:
    python tests/golden/make_records.py /path/to/parameter-golf.git [record0409 sota1855 seeds frontier2135]
See tests/golden/README.md for the commits and inputs."""
import inspect, linecache, lzma, base64, os, re, subprocess, sys, tempfile, textwrap, types

import numpy as np
import torch
import torch._dynamo  # imported before the Triton shim is on sys.path (dynamo probes for triton at import)
import torch.optim

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
torch.set_num_threads(1)
import test_golden as tg  # noqa: E402

COMMIT = "4908dc46f21ed3fdd08d2fdca285deb2194b9599"
RECORDS = "records/track_10min_16mb/"
R0409 = RECORDS + "2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT/train_gpt.py"
R1855 = RECORDS + "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/train_gpt.py"
SEEDS = dict(  # PR number: (head commit, the scored train_gpt.py)
    s156=(156, "2c12ff54420b2a2d94831ef013f0877e483a1284",
          RECORDS + "2026-03-20_Int6STE_NorMuon_SWA_SlidingWindow/train_gpt.py"),
    s88=(88, "5d3054865de0461a5c6ef099926724e8c27648f7", RECORDS + "2026-03-19_Int6_MLP3x_MTP_SlideEval/train_gpt.py"),
    s488=(488, "af3eeb9d9817cc359028b2d1ad048192d5ba9849", RECORDS + "2026-03-22_Phase2_A_Warmdown/train_gpt.py"))
# PR #2135 (1.05651) at its head; AWQ-lite (PR #1908) as PR #1945 ships it (#2135's code has no AWQ-lite)
R2135 = (2135, "ff905226136eb2506fe9505feff87f58eb6dc4ff",
         RECORDS + "2026-05-01_SP8192_PR2130Base_Calib32/train_gpt.py")
R1945 = (1945, "46c75f4dfec0b98ae37db6249f515447a0cff572",
         RECORDS + "2026-04-30_V19_PR1908_AsymLogit_WD2/train_gpt.py")
OUT = os.path.join(REPO, "tests", "golden")
SHIMS = {
    "flash_attn_interface.py": "# CPU shim: FlashAttention-3's [B, T, H, D] causal attention through SDPA, float32; varlen = causal within segments\nimport torch, torch.nn.functional as F\ndef flash_attn_func(q, k, v, causal=True, **kw):\n    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,\n                                       enable_gqa=k.size(2) != q.size(2))\n    return o.transpose(1, 2)\ndef flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, **kw):\n    n = q.size(0)\n    seg = torch.zeros(n, dtype=torch.long)\n    for b in cu_seqlens_q[1:-1].tolist():\n        seg[b:] += 1\n    pos = torch.arange(n)\n    mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])\n    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],\n                                       attn_mask=mask, enable_gqa=k.size(1) != q.size(1))\n    return o[0].transpose(0, 1)\n",
    "triton/__init__.py": "def jit(f=None, **kw):\n    return f if f is not None else (lambda g: g)\n",
    "triton/language/__init__.py": "class constexpr: pass\ndef __getattr__(n): return constexpr\n",
    "triton/tools/__init__.py": "",
    "triton/tools/tensor_descriptor.py": "class TensorDescriptor: pass\n",
}


def record_source(git_dir, path, commit=COMMIT):
    src = subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"], check=True, capture_output=True,
                         text=True).stdout
    packed = re.search(r'b85decode\("(.*?)"\)', src, re.S)  # the 04-09 record ships an lzma + base85 stub
    if not (packed and "exec(" in src[:200]):
        return src
    return lzma.decompress(base64.b85decode(packed.group(1)), format=lzma.FORMAT_RAW,
                           filters=[{"id": lzma.FILTER_LZMA2}]).decode()


def load(src, name, env):
    """The record as a module: env read by its Hyperparameters, bf16 -> float32, torch.compile off, and two
    Python 3.12 f-strings rewritten for 3.11."""
    os.environ.update({k: str(v) for k, v in env.items()})
    src = (src.replace(".bfloat16()", ".float()").replace("dtype=torch.bfloat16", "dtype=torch.float32")
           .replace('{", ".join(', "{', '.join(").replace('glob("fineweb_train_*.bin")', "glob('fineweb_train_*.bin')"))
    mod = types.ModuleType(name)
    linecache.cache[name + ".py"] = (len(src), None, src.splitlines(True), name + ".py")  # for inspect.getsource
    compile_ = torch.compile
    torch.compile = lambda f=None, **k: f if f is not None else (lambda g: g)
    try:
        exec(compile(src, name + ".py", "exec"), mod.__dict__)
    finally:
        torch.compile = compile_
    return mod


I = tg.golden_inputs()
tokens, packed = I["tokens"], I["packed"]
T = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731


def tiny_env(preset):
    env = {k: str(v) for k, v in tg.TINY[preset].items()}
    return env

def nested_fn(outer, name, **scope):
    """A function defined inside one of the record's functions (e.g. lr_mul inside train_model), compiled from the
    record's own source text with the names it closes over given in scope."""
    src = textwrap.dedent(inspect.getsource(outer))
    lines = src.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith(f"def {name}("))
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = [lines[start]]
    for l in lines[start + 1:]:
        if l.strip() and len(l) - len(l.lstrip()) <= indent:
            break
        body.append(l)
    ns = dict(scope)
    exec(textwrap.dedent("\n".join(body)), ns)
    return ns[name]

def logits(up, ids, looping, **kw):
    up.looping_active = looping
    with torch.no_grad():
        return up.forward_logits(torch.as_tensor(ids), **kw).float().numpy()

def run_0409():
    env = dict(tiny_env("record0409"), EMBEDDING_DIM=32, QK_GAIN_INIT=5.25, NUM_LOOPS=2, PARALLEL_RESIDUAL_START=4)
    rec = load(SRC["r0409"], "r0409", env)
    h = rec.Hyperparameters()
    up = rec.GPT(h).eval()
    w = tg.golden_weights(tg.tiny_record_args("record0409"))
    sd = up.state_dict()
    assert set(sd) == set(w), (set(sd) ^ set(w))
    up.load_state_dict(w, strict=True)
    out = dict(plain=logits(up, tokens, False), looped=logits(up, tokens, True))
    # LR multiplier (lr_mul inside train_model) at wall-clock fractions, the record's WARMDOWN_FRAC 0.72, MIN_LR 0
    fr = np.linspace(0, 1, 41)
    lr_mul = nested_fn(rec.train_model, "lr_mul", h=types.SimpleNamespace(warmdown_frac=0.72, min_lr=0.0))
    out.update(lr_frac=fr, lr_mul=np.array([lr_mul(f) for f in fr]))
    # Muon (Nesterov, MuonEq-R, NS5, decoupled WD) on two fixed matrices, two steps of fixed gradients
    ps = [torch.nn.Parameter(T(I[f"muon_p{i}"])) for i in range(2)]
    opt = rec.Muon(ps, lr=0.022, momentum=0.99, backend_steps=5, weight_decay=0.095, row_normalize=True)
    for s in range(2):
        for i, p in enumerate(ps):
            p.grad = T(I[f"muon_g{i}"][s])
        opt.step()
    for i in range(2):
        out[f"muon_after{i}"] = ps[i].detach().numpy()
    # GPTQ codes: a fixed matrix and Hessian (one dead column), int6 at k 12.85 and int8 at k 20 (its embedding)
    q6, s6 = rec.gptq_quantize_weight(T(I["gptq_w"]), T(I["gptq_h"]), clip_sigmas=12.85, clip_range=31)
    q8, s8 = rec.gptq_quantize_weight(T(I["gptq_w"]), T(I["gptq_h"]), clip_sigmas=20.0, clip_range=127)
    out.update(gptq_q6=q6.numpy(), gptq_s6=s6.numpy(), gptq_q8=q8.numpy(), gptq_s8=s8.numpy())
    np.savez_compressed(os.path.join(OUT, "record0409.npz"), **out)

def load_1855_weights(up, h, w):
    """Our golden weights into a #1855-family model (its parameter banks and names)."""
    L = h.num_layers
    sd = {k: v.clone() for k, v in up.state_dict().items()}
    for i in range(L):
        b = f"blocks.{i}."
        sd["qo_bank"][i], sd["qo_bank"][L + i] = w[b + "attn.c_q.weight"], w[b + "attn.proj.weight"]
        sd["kv_bank"][i], sd["kv_bank"][L + i] = w[b + "attn.c_k.weight"], w[b + "attn.c_v.weight"]
        sd["mlp_up_bank"][i], sd["mlp_down_bank"][i] = w[b + "mlp.fc.weight"], w[b + "mlp.proj.weight"]
        for k in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain"):
            sd[b + k] = w[b + k]
        sd[b + "attn.attn_gate_w"] = w[b + "attn.attn_gate"]
        if b + "lane_mix" in w:  # ours [lane, source]; the record's post lambdas [layer, source, lane]
            sd["parallel_post_lambdas"][i] = w[b + "lane_mix"].T
            sd["parallel_resid_lambdas"][i] = w[b + "lane_resid"]
    for k in ("tok_emb.weight", "skip_weights", "skip_gates", "softcap_pos", "softcap_neg"):
        if k in sd:
            sd[k] = w[k]
    sd["smear_gate.weight"], sd["smear_lambda"] = w["smear.gate"][None], w["smear.lam"]
    up.load_state_dict(sd, strict=True)


def model_and_schedule(src, preset, env):
    """A #1855-line record (#1855, #2135) with the golden weights of our `preset`: its logits plain, looped and
    document-packed (its varlen path; cu_seqlens at each BOS), and its lr_mul at 41 fractions."""
    rec = load(SRC[src], src, env)
    rec.BOS_ID = 1
    h = rec.Hyperparameters()
    up = rec.GPT(h).eval()
    load_1855_weights(up, h, tg.golden_weights(tg.tiny_record_args(preset)))
    out = dict(plain=logits(up, tokens, False), looped=logits(up, tokens, True))
    bos = [int(i) for i in np.flatnonzero(packed[0] == 1) if i > 0]
    cu = torch.tensor([0, *bos, packed.shape[1]], dtype=torch.int32)
    out.update(packed_looped=logits(up, packed, True, cu_seqlens=cu, max_seqlen=32))
    fr = np.linspace(0, 1, 41)
    lr_mul = nested_fn(rec.train_model, "lr_mul", h=types.SimpleNamespace(warmdown_frac=0.85, min_lr=0.1))
    out.update(lr_frac=fr, lr_mul=np.array([lr_mul(f) for f in fr]))
    return rec, out


def run_2135():
    """PR #2135: its model (AsymLogit caps at the golden weights' values, SmearGate without the BOS fix, as its
    SMEAR_GATE_BOS_FIX=0 run) and lr_mul; AWQ-lite from PR #1945's code on two matrices."""
    env = dict(tiny_env("frontier2135"), QK_GAIN_INIT=5.0, NUM_LOOPS=2, PARALLEL_START_LAYER=4, SMEAR_GATE_ENABLED=1,
               SPARSE_ATTN_GATE_ENABLED=1, SPARSE_ATTN_GATE_SCALE=0.5, GATE_WINDOW=12, ASYM_LOGIT_RESCALE=1,
               SMEAR_GATE_BOS_FIX=0)
    rec, out = model_and_schedule("r2135", "frontier2135", env)
    # AWQ-lite: gptq_mixed_quantize on two GPTQ'd matrices (int6, SDClip k 13 attention / 11.5 MLP), activation RMS
    # sqrt(diag H), 32-column groups, the top 2 groups int8
    r45 = load(SRC["r1945"], "r1945", {})
    hp = types.SimpleNamespace(embed_bits=7, matrix_bits=6, awq_lite_enabled=True, awq_lite_bits=8,
                               awq_lite_group_top_k=2, awq_lite_group_size=32, embed_clip_sigmas=14.0,
                               mlp_clip_sigmas=11.5, attn_clip_sigmas=13.0, matrix_clip_sigmas=12.85,
                               gated_attn_quant_gate=False, lqer_enabled=False)
    names = ("blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight")
    sd = {n: T(I[f"awq_w{i}"]) for i, n in enumerate(names)}
    H = {n: T(I[f"awq_h{i}"]) for i, n in enumerate(names)}
    act = {n: H[n].diag().sqrt() for n in names}
    res, meta = r45.gptq_mixed_quantize(sd, H, act, hp)
    for i, n in enumerate(names):
        out[f"awq_scores{i}"] = np.array([c[0] for c in r45._awq_lite_group_candidates(sd[n], act[n], 32)])
        out[f"awq_q{i}"], out[f"awq_s{i}"] = res[n + ".q"].numpy(), res[n + ".scale"].numpy()
        if n + ".awqg_start" in res:
            out[f"awq_start{i}"], out[f"awq_s_hi{i}"] = res[n + ".awqg_start"].numpy(), res[n + ".awqg_s_hi"].numpy()
    np.savez_compressed(os.path.join(OUT, "frontier2135.npz"), **out)


def run_1855():
    env = dict(tiny_env("sota1855"), QK_GAIN_INIT=5.0, NUM_LOOPS=2, PARALLEL_START_LAYER=4, SMEAR_GATE_ENABLED=1,
               SPARSE_ATTN_GATE_ENABLED=1, SPARSE_ATTN_GATE_SCALE=0.5, GATE_WINDOW=12)
    rec, out = model_and_schedule("r1855", "sota1855", env)
    # Polar Express (its zeropower_via_newtonschulz5, float32) on a wide and a tall fixed matrix, 5 steps
    for tag in ("wide", "tall"):
        out[f"pe_{tag}"] = rec.zeropower_via_newtonschulz5(T(I[f"pe_{tag}"]), steps=5).numpy()
    # GPTQ: attention int6 at k 13, embedding int7 at k 14; the attention gate int8 per row
    q6, s6 = rec.gptq_quantize_weight(T(I["gptq_w"]), T(I["gptq_h"]), clip_sigmas=13.0, clip_range=31)
    q7, s7 = rec.gptq_quantize_weight(T(I["gptq_w"]), T(I["gptq_h"]), clip_sigmas=14.0, clip_range=63)
    gq, gs = rec._quantize_gate_int8_row(T(I["gate_w"]))
    out.update(gptq_q6=q6.numpy(), gptq_s6=s6.numpy(), gptq_q7=q7.numpy(), gptq_s7=s7.numpy(), gate_q=gq.numpy(),
               gate_s=gs.numpy())
    np.savez_compressed(os.path.join(OUT, "sota1855.npz"), **out)

def run_seeds():
    """The int6 export quantizers of the seed PRs and #156's NorMuon, on the golden inputs."""
    out, w = {}, T(I["seed_w"])
    s88 = load(SRC["s88"], "s88", dict(INT6_QUANT=1))
    out["s88_q"], out["s88_s"] = (t.numpy() for t in s88.quantize_float_tensor(w))
    s156 = load(SRC["s156"], "s156", {})
    out["s156_q"], out["s156_s"] = (t.numpy() for t in s156.quantize_float_tensor(w, quant_range=31))
    s488 = load(SRC["s488"], "s488", {})
    q, sc, _ = s488.quantize_int6_tensor(w, 1)  # INT6_SCALE_MODE=row (its default group8 shares a step per 8 rows)
    out["s488_q"], out["s488_s"] = q.numpy(), sc.numpy()
    ps = [torch.nn.Parameter(T(I[f"muon_p{i}"])) for i in range(2)]
    opt = s156.NorMuon(ps, lr=0.025, momentum=0.99, beta2=0.95, backend_steps=5)
    for step in range(2):
        for i, p in enumerate(ps):
            p.grad = T(I[f"muon_g{i}"][step])
        opt.step()
    for i in range(2):
        out[f"s156_normuon_after{i}"] = ps[i].detach().numpy()
    np.savez_compressed(os.path.join(OUT, "seeds.npz"), **out)


if __name__ == "__main__":
    git_dir = sys.argv[1]
    SRC = dict(r0409=record_source(git_dir, R0409), r1855=record_source(git_dir, R1855))
    SRC.update({k: record_source(git_dir, path, commit) for k, (_, commit, path) in SEEDS.items()})
    SRC.update(r2135=record_source(git_dir, R2135[2], R2135[1]), r1945=record_source(git_dir, R1945[2], R1945[1]))
    with tempfile.TemporaryDirectory() as shim_dir:
        for rel, text in SHIMS.items():
            os.makedirs(os.path.dirname(os.path.join(shim_dir, rel)), exist_ok=True)
            open(os.path.join(shim_dir, rel), "w").write(text)
        sys.path.insert(0, shim_dir)
        only = sys.argv[2:]  # file names to write (default: all)
        for name, run in dict(record0409=run_0409, sota1855=run_1855, seeds=run_seeds, frontier2135=run_2135).items():
            if not only or name in only:
                run()
