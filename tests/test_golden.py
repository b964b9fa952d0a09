"""Golden values: numbers produced by the records' own train_gpt.py (run once, outside this repo, on CPU in float32;
tests/golden/README.md names each file, its upstream commit and the exact inputs), and our presets held to them.
No upstream code is here, only its outputs."""
import json
import pathlib
import zlib

import numpy as np
import pytest
import torch

import train_gpt

GOLDEN = pathlib.Path(__file__).parent / "golden"
H = train_gpt.Hyperparameters

# The tiny shape both codes were run at: 6 layers (3 encoder / 3 decoder plain; looped layers 1-2, three passes:
# encoder [0 1 2 1 2], decoder [1 2 3 4 5]), width 32, 4 heads / 2 KV heads, partial RoPE on 4 of 8 dims, XSA on all.
TINY_RECORD = dict(VOCAB_SIZE=64, NUM_LAYERS=6, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, ROPE_DIMS=4,
                   XSA_LAST_N=6, LOOP_START=1, LOOP_END=2, TRAIN_SEQ_LEN=32)
TINY = {"record0409": dict(TINY_RECORD, PARALLEL_RESIDUAL_START=4),
        "sota1855": dict(TINY_RECORD, PARALLEL_START_LAYER=4),
        "frontier2135": dict(TINY_RECORD, PARALLEL_START_LAYER=4)}


def tiny_record_args(preset, **kw) -> "train_gpt.Hyperparameters":
    return H.from_env({k: str(v) for k, v in dict(TINY[preset], PRESET=preset, **kw).items()})


def golden_weights(args) -> dict[str, torch.Tensor]:
    """The weights both codes ran with, from each parameter's name alone: noise n ~ N(0, 1) from numpy's PCG64 seeded
    with crc32(name); matrices (embedding, linears) n / sqrt(fan_in), every other tensor (gains, mixes, gates, lane
    scalars) its initial value + 0.3 n, so no control tensor sits at an identity value that would hide a wrong form."""
    out = {}
    for name, p in train_gpt.GPT(args).named_parameters():  # a fresh model: control tensors at their init
        n = torch.from_numpy(np.random.default_rng(zlib.crc32(name.encode())).standard_normal(tuple(p.shape))).float()
        control = p.ndim != 2 or train_gpt.matches_any(name, train_gpt.CONTROL_TENSOR_PATTERNS)
        out[name] = p.detach() + 0.3 * n if control else n / p.shape[1] ** 0.5
        if name.startswith("softcap_"):  # AsymLogit's caps: small (4 to 6), so they shape logits of size ~4
            out[name] = 5 + n
    return out


def golden_model(preset, **kw):
    args = tiny_record_args(preset, **kw)
    model = train_gpt.GPT(args)
    model.load_state_dict(golden_weights(args))
    return model.eval()


def rng(seed):
    return np.random.default_rng(seed)


def golden_inputs() -> dict[str, np.ndarray]:
    """The fixed inputs, each from its own numpy PCG64 seed (not stored: regenerated here and by the generator)."""
    tokens = rng(0).integers(2, 64, (2, 16))
    tokens[0, 0] = tokens[0, 7] = tokens[1, 10] = train_gpt.BOS_ID
    packed = rng(1).integers(2, 64, (1, 32))  # three documents in one row (BOS at 0, 9, 20)
    packed[0, [0, 9, 20]] = train_gpt.BOS_ID
    out = dict(tokens=tokens, packed=packed)
    for i, shape in enumerate(((24, 16), (16, 40))):  # Muon: two matrices, two steps of fixed gradients
        out[f"muon_p{i}"] = rng(10 + i).standard_normal(shape).astype(np.float32)
        out[f"muon_g{i}"] = rng(20 + i).standard_normal((2, *shape)).astype(np.float32)
    w = rng(30).standard_normal((48, 160)).astype(np.float32) * 0.05
    w[3, 5] = 0.9  # an outlier
    x = rng(31).standard_normal((400, 160)).astype(np.float32) * np.linspace(0.2, 2, 160, dtype=np.float32)
    x[:, 17] = 0  # a dead input column
    out.update(gptq_w=w, gptq_h=x.T @ x / 400)
    out["pe_wide"] = rng(40).standard_normal((16, 40)).astype(np.float32)
    out["pe_tall"] = rng(41).standard_normal((40, 16)).astype(np.float32)
    out["gate_w"] = rng(50).standard_normal((8, 12)).astype(np.float32) * 0.4
    seed_w = rng(60).standard_normal((48, 160)).astype(np.float32) * np.geomspace(0.003, 0.2, 48, dtype=np.float32)[:, None]
    seed_w[40:, 3] = 1.5  # rows whose max passes 1: above the 1/31 floor
    out["seed_w"] = seed_w
    for i, (scale, seed) in enumerate(((0.07, 70), (0.06, 72))):  # AWQ-lite: attention 288x256, MLP 272x256
        w = rng(seed).standard_normal((288 - 16 * i, 256)).astype(np.float32) * scale
        w[:, 64:96] *= 1 + 2 * i  # the MLP's third group: large weights at middling activations
        x = rng(seed + 1).standard_normal((600, 256)).astype(np.float32) * np.linspace(0.2, 2, 256, dtype=np.float32)
        out.update({f"awq_w{i}": w, f"awq_h{i}": x.T @ x / 600})
    return out


def load(name):
    return dict(np.load(GOLDEN / f"{name}.npz"))


def our_logits(model, ids, looping):
    with torch.no_grad():
        h = model.hidden(torch.as_tensor(ids), train_gpt.Ctx(looping=looping))
        return model.logits(h).numpy()


@pytest.mark.parametrize("preset", ["record0409", "sota1855", "frontier2135"])
@pytest.mark.parametrize("looping", [False, True], ids=["plain", "looped"])
def test_logits_equal_the_records(preset, looping):
    """Same weights, same tokens: our forward at the preset equals the record's forward_logits (float32). sota1855's
    plain-causal rows run with DOC_MASK=0 (the record's non-varlen path: attention crosses the BOS at t = 7, 10)."""
    model = golden_model(preset, DOC_MASK=0, TRAIN_LOADER="stream")  # the packed loader needs the mask
    want = load(preset)["looped" if looping else "plain"]
    got = our_logits(model, golden_inputs()["tokens"], looping)
    assert np.abs(got - want).max() < 1e-5  # logits of size ~4


@pytest.mark.parametrize("preset", ["sota1855", "frontier2135"])
def test_document_packed_logits_equal_the_records_varlen_path(preset):
    """Three documents packed in one row: the record's flash_attn_varlen_func (cu_seqlens at each BOS) against our
    DOC_MASK=1. #1855's SmearGate adds nothing at a BOS, so no document sees the one before it; #2135's run
    (SMEAR_GATE_BOS_FIX=0) smears the previous document's last token into each BOS."""
    model = golden_model(preset)
    assert model.args.doc_mask and model.args.smear_gate_bos_fix == (preset == "sota1855")
    got = our_logits(model, golden_inputs()["packed"], True)
    assert np.abs(got - load(preset)["packed_looped"]).max() < 1e-5


@pytest.mark.parametrize("preset", ["record0409", "sota1855", "frontier2135"])
def test_lr_multiplier_equals_the_records_lr_mul(preset):
    """The record's lr_mul(frac) at 41 wall-clock fractions (warmdown floored at MIN_LR): ours by wall clock."""
    g = load(preset)
    args = H.from_env(dict(PRESET=preset, MAX_WALLCLOCK_SECONDS="100", ITERATIONS="1000000000"))
    ours = [train_gpt.lr_scale(args, 0, f * 100_000) for f in g["lr_frac"]]
    np.testing.assert_allclose(ours, g["lr_mul"], rtol=0, atol=1e-12)


def two_muon_steps(opt, ps, i):
    """The golden inputs' two steps: gradients muon_g{k}[step] for parameter k."""
    for s in range(2):
        for k, p in enumerate(ps):
            p.grad = torch.from_numpy(i[f"muon_g{k}"][s]).clone()
        opt.step()


def test_record0409_muon_two_steps():
    """Nesterov momentum 0.99, MuonEq-R rows, NS5 (5 steps), sqrt(max(1, rows/cols)), decoupled WD 0.095."""
    i, g = golden_inputs(), load("record0409")
    ps = [torch.nn.Parameter(torch.from_numpy(i[f"muon_p{k}"]).clone()) for k in range(2)]
    opt = train_gpt.Muon(ps, lr=0.022, momentum=0.99, steps=5, wd=0.095, row_normalize=True, ns="ns5")
    two_muon_steps(opt, ps, i)
    for k, p in enumerate(ps):
        np.testing.assert_allclose(p.detach().numpy(), g[f"muon_after{k}"], rtol=0, atol=2e-6)


def test_sota1855_polar_express_output():
    g, i = load("sota1855"), golden_inputs()
    for tag in ("wide", "tall"):
        got = train_gpt.newton_schulz(torch.from_numpy(i[f"pe_{tag}"]), 5, "polar").numpy()
        np.testing.assert_allclose(got, g[f"pe_{tag}"], rtol=0, atol=2e-6)


@pytest.mark.parametrize("preset,bits,k", [("record0409", 6, 12.85), ("record0409", 8, 20.0),
                                           ("sota1855", 6, 13.0), ("sota1855", 7, 14.0)])
def test_gptq_codes_and_sdclip_steps_equal_the_records(preset, bits, k):
    """The record's gptq_quantize_weight on a fixed matrix and Hessian (a dead column, an outlier): the same fp16
    steps (k * Bessel std / qmax) and the same integer codes."""
    g, i = load(preset), golden_inputs()
    w, h = torch.from_numpy(i["gptq_w"]), torch.from_numpy(i["gptq_h"])
    s = train_gpt.sdclip_scale(w, bits, k)
    assert torch.equal(s.half().flatten(), torch.from_numpy(g[f"gptq_s{bits}"]))
    q = train_gpt.gptq_quantize(w, h, s, bits)
    assert torch.equal(q, torch.from_numpy(g[f"gptq_q{bits}"]))


def test_sota1855_attention_gate_is_int8_per_row():
    g, w = load("sota1855"), torch.from_numpy(golden_inputs()["gate_w"])
    e = train_gpt.quantize_entry("blocks.3.attn.attn_gate", w, H.from_env({"PRESET": "sota1855"}))
    assert e["bits"] == 8 and torch.equal(e["q"], torch.from_numpy(g["gate_q"]))
    assert torch.equal(e["scale"].flatten(), torch.from_numpy(g["gate_s"]))
    assert "raw" in train_gpt.quantize_entry("blocks.3.attn.attn_gate", w, H.from_env({}))  # fp16 elsewhere


@pytest.mark.parametrize("preset,change", [
    ("record0409", dict(PARALLEL_RESIDUAL_START=1000)),  # sequential blocks instead of GPT-J
    ("sota1855", dict(SMEAR_PRE_NORM=0)),  # smearing the normed embedding
    ("sota1855", dict(PARALLEL_START_LAYER=1000, PARALLEL_RESIDUAL_START=4)),  # GPT-J instead of two lanes
    ("frontier2135", dict(ASYM_LOGIT_RESCALE=0)),  # one cap (30) instead of the golden caps 5 + n
    ("frontier2135", dict(SMEAR_GATE_BOS_FIX=1))])  # no smearing into the BOS at t = 7, 10
def test_the_golden_logits_tell_the_forms_apart(preset, change):
    """Each form switch moves these logits far beyond the tolerance above, so the equalities are not vacuous."""
    model = golden_model(preset, DOC_MASK=0, TRAIN_LOADER="stream", **change)  # the packed loader needs the mask
    got = our_logits(model, golden_inputs()["tokens"], True)
    assert np.abs(got - load(preset)["looped"]).max() > 0.05


def test_record_ema_is_a_constant_decay_from_the_initial_weights():
    """Both records: ema = init, then ema = d ema + (1 - d) w after every step (EMA_WARMUP=0); ours ramps by default."""
    for preset in ("record0409", "sota1855"):
        args = tiny_record_args(preset)
        assert args.ema_decay == 0.9965 and not args.ema_warmup
    args = tiny_record_args("record0409")
    model = torch.nn.Linear(3, 2)
    init = model.weight.detach().clone()
    ema = train_gpt.build_averager(args, model)
    want = init.clone()
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3))
        ema.update(model)
        want = 0.9965 * want + (1 - 0.9965) * model.weight.detach()
    assert torch.allclose(ema.params[0], want, atol=1e-6)


# The hyperparameters each record logged (train_seed42.log), by our field names: the preset carries every one. But
# EVAL_STRIDE: #1855 and #2135 log 64 and read it nowhere (their code runs no sliding eval), so their presets set 0.
LOGGED = {
    "record0409": dict(vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4.0,
                       train_seq_len=2048, eval_seq_len=2048, train_batch_tokens=786432, rope_dims=16, ln_scale=True,
                       qk_gain_init=5.25, xsa_last_n=11, skip_gates_enabled=True, num_loops=2, loop_start=3,
                       loop_end=5, enable_looping_at=0.35, parallel_residual_start=7, matrix_lr=0.022,
                       scalar_lr=0.02, tied_embed_lr=0.03, muon_momentum=0.99, muon_momentum_warmup_start=0.92,
                       muon_momentum_warmup_steps=1500, muon_row_normalize=True, muon_wd=0.095, beta1=0.9,
                       beta2=0.95, adam_wd=0.02, embed_wd=0.085, grad_clip_norm=0.3, ema_decay=0.9965,
                       warmdown_frac=0.72, min_lr=0.0, warmup_steps=20, eval_stride=64, ttt_enabled=True,
                       ttt_lr=0.005, ttt_epochs=3, ttt_momentum=0.9, ttt_chunk_tokens=32768, matrix_bits=6,
                       embed_bits=8, matrix_clip_sigmas=12.85, embed_clip_sigmas=20.0, gptq_calibration_batches=64,
                       gptq_reserve_seconds=12.0, tied_embed_init_std=0.005, logit_softcap=30.0),
    "sota1855": dict(vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4.0,
                     train_seq_len=2048, eval_seq_len=2048, train_batch_tokens=786432, rope_dims=16, ln_scale=True,
                     qk_gain_init=5.0, xsa_last_n=11, skip_gates_enabled=True, num_loops=2, loop_start=3, loop_end=5,
                     enable_looping_at=0.35, parallel_start_layer=8, gate_window=12,
                     smear_gate_enabled=True, sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5,
                     matrix_lr=0.026, scalar_lr=0.02, tied_embed_lr=0.03, muon_momentum=0.97,
                     muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500, muon_row_normalize=True,
                     muon_backend_steps=5, muon_wd=0.095, beta1=0.9, beta2=0.99, adam_wd=0.02, embed_wd=0.085,
                     grad_clip_norm=0.3, ema_decay=0.9965, warmdown_frac=0.85, min_lr=0.1, warmup_steps=20,
                     eval_stride=0, matrix_bits=6, embed_bits=7, matrix_clip_sigmas=12.85, embed_clip_sigmas=14.0,
                     attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5, gated_attn_quant_gate=True, lqer_enabled=True,
                     lqer_rank=4, lqer_top_k=3, gptq_calibration_batches=16, gptq_reserve_seconds=0.5,
                     ttt_enabled=True, ttt_lora_rank=80, ttt_lora_lr=1e-4, ttt_chunk_size=48, ttt_eval_seq_len=2048,
                     ttt_batch_size=64, ttt_weight_decay=0.5, ttt_beta1=0.0, ttt_beta2=0.99, ttt_k_lora=True,
                     ttt_mlp_lora=True, ttt_o_lora=True, phased_ttt_prefix_docs=2500, phased_ttt_num_phases=3,
                     global_ttt_lr=0.001, global_ttt_momentum=0.9, global_ttt_epochs=1, global_ttt_chunk_tokens=32768,
                     global_ttt_batch_seqs=32, global_ttt_grad_clip=1.0, tied_embed_init_std=0.005,
                     logit_softcap=30.0),
}


# #2135's log (train_seed42.log) differs from #1855's in these
LOGGED["frontier2135"] = dict(LOGGED["sota1855"], asym_logit_rescale=True, gated_attn_quant_gate=False,
                              matrix_lr=0.028, lqer_asym_group=32, gptq_calibration_batches=32, ttt_lora_lr=8e-5,
                              ttt_weight_decay=2.0, ttt_k_lora=False, phased_ttt_num_phases=1, ngram_tilt_enabled=True,
                              token_order=16, token_threshold=0.8, token_boost=2.625, eval_seq_len=2560,
                              ttt_eval_seq_len=2560, gptq_reserve_seconds=8.0)  # logged 0.5: ours keeps calibration inside the 600 s


@pytest.mark.parametrize("preset", LOGGED)
def test_record_presets_carry_the_logged_hyperparameters(preset):
    args = H.from_env({"PRESET": preset})
    assert {k: getattr(args, k) for k in LOGGED[preset]} == LOGGED[preset]
    assert args.gptq and args.ortho_init and args.mlp_act == "leaky_relu2" and args.tie_embeddings


@pytest.mark.parametrize("preset,params", [("record0409", 35_944_536), ("sota1855", 35_945_671 - 48),
                                           ("frontier2135", 35_945_673 - 48)])
def test_record_preset_parameter_counts(preset, params):
    """04-09 logged model_params:35944536. #1855 logged 35945671: its lane scalars exist for all 11 layers (66), ours
    only for the 3 two-lane layers (18); the other 48 never enter its forward. #2135: #1855's plus the two caps."""
    model = train_gpt.GPT(H.from_env({"PRESET": preset}))
    assert sum(p.numel() for p in model.parameters()) == params


# ----------------------------------------------------------------------------------------------------------------------
# Seed PRs #88, #156, #488 (seeds.npz): their int6 exporters and #156's NorMuon


def seed_export(w, preset):
    """What the preset's export does to a large MLP matrix (the golden matrix is small, so quantize it directly)."""
    args = H.from_env({"PRESET": preset})
    assert train_gpt.export_bits("blocks.0.mlp.fc.weight", torch.zeros(1536, 512), args) == 6
    q, s = train_gpt.quantize_tensor(w, 6, 0, args.quant_clip_search, args.quant_int8_upstream, 0.0,
                                     args.quant_scale_floor)
    return dict(q=q, scale=s)

@pytest.mark.parametrize("seed", ["s88", "s488"])
def test_seed_int6_export_is_row_max_over_31_floored_at_1_over_31(seed):
    """#88 (INT6_QUANT=1) and #488 (per-row mode): step = max(row max / 31, 1/31), stored fp16; ours
    QUANT_SCALE_FLOOR=1. #488 rounds with the stored fp16 step, as ours: equal codes. #88 rounds with the fp32 step
    before storing it: a few codes at rounding ties move by one (not reproduced; README table)."""
    g, w = load("seeds"), torch.from_numpy(golden_inputs()["seed_w"])
    e = seed_export(w, "seed88" if seed == "s88" else "seed488")
    assert torch.equal(e["scale"].flatten(), torch.from_numpy(g[f"{seed}_s"]))
    diff = (e["q"].int() - torch.from_numpy(g[f"{seed}_q"]).int()).abs()
    assert int(diff.max()) <= (1 if seed == "s88" else 0) and float((diff > 0).float().mean()) < 0.01


def test_seed156_int6_export_differs_only_where_its_quantile_clip_passes_the_floor():
    """#156 clips each row at its 99.99984th percentile before the floored step: the same codes wherever the floor
    (1/31) sets the step, a slightly smaller step in rows whose max passes 1 (not reproduced; README table)."""
    g, w = load("seeds"), torch.from_numpy(golden_inputs()["seed_w"])
    e = seed_export(w, "seed156")
    floored = w.abs().amax(1) < 1
    assert torch.equal(e["scale"].flatten()[floored], torch.from_numpy(g["s156_s"])[floored])
    assert torch.equal(e["q"][floored], torch.from_numpy(g["s156_q"])[floored])
    rel = (e["scale"].flatten()[~floored].float() / torch.from_numpy(g["s156_s"])[~floored].float() - 1).abs()
    assert float(rel.max()) < 2e-3


def test_seed156_normuon_two_steps():
    """#156's NorMuon (EMA momentum 0.99, Nesterov, NS5, per-row second moment 0.95, Frobenius rescale): our Muon with
    NORMUON=1; its EMA momentum is ours times (1 - momentum), which Newton-Schulz's normalisation removes."""
    i, g = golden_inputs(), load("seeds")
    args = H.from_env({"PRESET": "seed156"})
    ps = [torch.nn.Parameter(torch.from_numpy(i[f"muon_p{k}"]).clone()) for k in range(2)]
    opt = train_gpt.Muon(ps, lr=args.matrix_lr, momentum=args.muon_momentum, steps=5, normuon=args.normuon,
                         beta2=args.normuon_beta2)
    two_muon_steps(opt, ps, i)
    for k, p in enumerate(ps):
        np.testing.assert_allclose(p.detach().numpy(), g[f"s156_normuon_after{k}"], rtol=0, atol=2e-6)


@pytest.mark.parametrize("preset,params", [("seed156", 21_778_504), ("seed88", 21_778_504), ("seed488", 26_501_720)])
def test_seed_preset_parameter_counts(preset, params):
    """#156 and #88 logged model_params 21,778,504 (#88 plus its 524,288-parameter MTP head, training only; ours is
    dim x dim, also never exported); #488: 11 layers of the same block (its README: 26.5M)."""
    model = train_gpt.GPT(H.from_env({"PRESET": preset}))
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp_heads.")) == params


# ----------------------------------------------------------------------------------------------------------------------
# AWQ-lite (PR #1908, as PR #1945 ships it; frontier2135.npz)

AWQ_NAMES = ("blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight")


def test_awq_lite_salience_selection_codes_and_steps_equal_pr1945():
    """Its gptq_mixed_quantize on an attention (k 13) and an MLP (k 11.5) matrix, activation RMS sqrt(diag H),
    32-column groups, the top 2 int8: the same group scores, the same groups chosen (one per matrix here), the same
    fp16 steps (int6 and the int8 groups' own) and the same integer codes."""
    g, i = load("frontier2135"), golden_inputs()
    args = H.from_env(dict(PRESET="frontier2135", AWQ_LITE_ENABLED="1", AWQ_LITE_GROUP_SIZE="32",
                           AWQ_LITE_GROUP_TOP_K="2"))
    state = {n: torch.from_numpy(i[f"awq_w{k}"]) for k, n in enumerate(AWQ_NAMES)}
    hs = {n: torch.from_numpy(i[f"awq_h{k}"]) for k, n in enumerate(AWQ_NAMES)}
    q = train_gpt.quantize_state(state, args, hs)
    for k, n in enumerate(AWQ_NAMES):
        f = train_gpt.gptq_factor(hs[n])
        ours = (f.rms * state[n].abs().mean(0)).view(-1, 32).sum(1)
        np.testing.assert_allclose(ours.numpy(), g[f"awq_scores{k}"], rtol=1e-6)
        start = int(g[f"awq_start{k}"][0])
        assert q[n]["awq"] == [[start, start + 32]]
        assert torch.equal(q[n]["scale"].flatten(), torch.from_numpy(g[f"awq_s{k}"]))
        assert torch.equal(q[n]["awq_scale"].flatten(), torch.from_numpy(g[f"awq_s_hi{k}"]))
        assert torch.equal(q[n]["q"], torch.from_numpy(g[f"awq_q{k}"]))
        assert int(q[n]["q"][:, start:start + 32].abs().max()) > 31  # the protected group uses int8 codes
