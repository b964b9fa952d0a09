"""AWQ-lite GPTQ (PR #1908), AsymLogit (PR #1923) and the PR #2135 settings, against hand computations. The records'
own numbers for these are in tests/test_golden.py (frontier2135.npz)."""
import copy
import math

import numpy as np
import pytest
import torch

from conftest import cpu_runtime, tiny_args
from test_ttt import random_docs
import train_gpt

H = train_gpt.Hyperparameters


# ---- AsymLogit

def test_softcap_by_hand():
    z = torch.tensor([-50.0, -3.0, -0.0, 0.0, 2.5, 40.0])
    want_one = [30 * math.tanh(v / 30) for v in z.tolist()]
    assert torch.allclose(train_gpt.softcap(z, 30.0), torch.tensor(want_one), atol=1e-6)
    pos, neg = torch.tensor(4.0), torch.tensor(7.0)
    want = [(4 if v >= 0 else 7) * math.tanh(v / (4 if v >= 0 else 7)) for v in z.tolist()]
    assert torch.allclose(train_gpt.softcap(z, pos, neg), torch.tensor(want), atol=1e-6)
    z.requires_grad_(True)
    pos.requires_grad_(True), neg.requires_grad_(True)
    train_gpt.softcap(torch.tensor([2.0, -3.0]), pos, neg).sum().backward()
    # d/dc c tanh(z/c) = tanh(z/c) - (z/c) sech^2(z/c): each cap sees only the logits of its sign
    d = lambda v, c: math.tanh(v / c) - v / c / math.cosh(v / c) ** 2  # noqa: E731
    assert math.isclose(float(pos.grad), d(2.0, 4.0), rel_tol=1e-5)
    assert math.isclose(float(neg.grad), d(-3.0, 7.0), rel_tol=1e-5)


def asym_model(**kw):
    args = tiny_args(ASYM_LOGIT_RESCALE=1, BIGRAM_BUCKETS=0, **kw)
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.softcap_pos.fill_(3.0), model.softcap_neg.fill_(6.0)
    return model


def test_asym_caps_start_at_the_cap_are_frozen_in_training_and_used_by_evaluation():
    args = tiny_args(ASYM_LOGIT_RESCALE=1)
    fresh = train_gpt.GPT(args)
    assert float(fresh.softcap_pos) == float(fresh.softcap_neg) == 30.0
    model = asym_model()
    assert not model.softcap_pos.requires_grad and not model.softcap_neg.requires_grad
    one = train_gpt.GPT(tiny_args(BIGRAM_BUCKETS=0, ASYM_LOGIT_RESCALE=0))
    one.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("softcap_")})
    x = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, 1)
    # training: the single LOGIT_SOFTCAP (30), the same loss as without AsymLogit, and no gradient reaches the caps
    loss = model(x, y, train_gpt.Ctx())
    assert torch.equal(loss, one(x, y, train_gpt.Ctx()))
    loss.backward()
    assert model.softcap_pos.grad is None and model.softcap_neg.grad is None
    # evaluation: the caps, by hand
    with torch.no_grad():
        h = model.hidden(x, model.final_ctx)
        z = torch.nn.functional.linear(h, model.tok_emb.weight).float()
        c = torch.where(z >= 0, 3.0, 6.0)
        want = torch.nn.functional.cross_entropy((c * torch.tanh(z / c)).flatten(0, 1), y.flatten(), reduction="none")
        torch.testing.assert_close(model(x, y, per_token=True).flatten(), want, rtol=1e-5, atol=1e-5)
    # the optimizers hold them (every parameter routed once) but never move them: no gradient
    opts = train_gpt.build_optimizers(model, model.args, cpu_runtime())
    for o in opts:
        o.step()
    assert float(model.softcap_pos) == 3.0 and float(model.softcap_neg) == 6.0


@pytest.mark.parametrize("prefix,moves", [(4, True), (0, False)])
def test_only_the_global_ttt_phase_trains_the_caps(prefix, moves):
    """TTT_MODE=lora: the per-document LoRA steps never touch them; the global SGD phase (PHASED_TTT_PREFIX_DOCS > 0)
    trains them with the rest of the model."""
    args = tiny_args(ASYM_LOGIT_RESCALE=1, TRAIN_SEQ_LEN=16, EVAL_BATCH_SEQS=3, TTT_MODE="lora", TTT_CHUNK_SIZE=5,
                     TTT_BATCH_SIZE=3, TTT_LORA_RANK=4, TTT_LORA_LR=0.01, PHASED_TTT_PREFIX_DOCS=prefix,
                     PHASED_TTT_NUM_PHASES=1, GLOBAL_TTT_LR=0.5, GLOBAL_TTT_CHUNK_TOKENS=64, GLOBAL_TTT_BATCH_SEQS=4)
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():  # logits of size ~5 against caps of 5: a real gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.softcap_pos.fill_(5.0), model.softcap_neg.fill_(5.0)
    val = torch.from_numpy(np.concatenate(random_docs(np.random.default_rng(0), 8)).astype(np.int64))
    luts = (torch.ones(1024, dtype=torch.int64), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
    m = copy.deepcopy(model)
    train_gpt.evaluate_ttt_lora(m, val, luts, args, cpu_runtime(), lambda msg: None)
    moved = [float(m.softcap_pos) != 5.0, float(m.softcap_neg) != 5.0]
    assert moved == [moves, moves]
    assert not m.softcap_pos.requires_grad  # frozen again afterwards


# ---- AWQ-lite

def awq_args(**kw):
    return tiny_args(**{**dict(MODEL_DIM=64, NUM_LAYERS=1, MLP_MULT=2, BIGRAM_BUCKETS=0, AWQ_LITE_ENABLED=1,
                               AWQ_LITE_GROUP_SIZE=16, LQER_ENABLED=0), **kw})


def test_awq_groups_by_hand():
    """Salience of a group = sum over its columns of rms_c * mean_r |W_rc|, rms_c = sqrt(H_cc); the top k over all
    matrices narrower than AWQ_LITE_BITS (an 8-bit one is never a candidate)."""
    args = awq_args(AWQ_LITE_GROUP_TOP_K=3)
    g = torch.Generator().manual_seed(0)
    state = {"a.attn.c_q.weight": torch.randn(1040, 64, generator=g), "b.mlp.proj.weight": torch.randn(520, 128, generator=g),
             "c.other.weight": torch.randn(1040, 64, generator=g) * 9}  # quant_other_bits 8: excluded
    diag = {n: torch.rand(t.shape[1], generator=g) * 3 for n, t in state.items()}
    factors = {n: train_gpt.gptq_factor(torch.diag(d)) for n, d in diag.items()}
    assert train_gpt.export_bits("c.other.weight", state["c.other.weight"], args) == 8
    scores = []
    for n in ("a.attn.c_q.weight", "b.mlp.proj.weight"):
        w = state[n].tolist()
        for k in range(len(w[0]) // 16):
            s = sum(math.sqrt(float(diag[n][c])) * sum(abs(r[c]) for r in w) / len(w) for c in range(16 * k, 16 * k + 16))
            scores.append((s, n, 16 * k))
    want = {}
    for _, n, c in sorted(scores, reverse=True)[:3]:
        want.setdefault(n, []).append([c, c + 16])
    got = train_gpt.awq_groups(state, factors, args)
    assert {n: sorted(v) for n, v in got.items()} == {n: sorted(v) for n, v in want.items()}
    assert train_gpt.awq_groups(state, factors, awq_args(AWQ_LITE_ENABLED=0)) == {}


def test_awq_quantize_by_hand_and_dequantize():
    """With a diagonal Hessian GPTQ is round-to-nearest: the chosen group's codes are round(w / s8) in [-127, 127]
    with s8 = k std(row) / 127 (fp16), the others round(w / s6) in [-31, 31]; dequantization uses each one's step."""
    args = awq_args(AWQ_LITE_GROUP_TOP_K=1)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1040, 64, generator=g) * 0.1
    w[:, 32:48] *= 4  # the salient group
    hess = torch.eye(64)
    e = train_gpt.quantize_state({"blocks.0.attn.c_q.weight": w}, args, {"blocks.0.attn.c_q.weight": hess})
    e = e["blocks.0.attn.c_q.weight"]
    assert e["awq"] == [[32, 48]] and e["bits"] == 6
    k = train_gpt.export_sigmas("blocks.0.attn.c_q.weight", args)
    std = w.std(dim=1, keepdim=True)
    s6, s8 = (k * std / 31).half().float(), (k * std / 127).half().float()
    assert torch.equal(e["scale"].float(), s6) and torch.equal(e["awq_scale"].float(), s8)
    want = (w / s6).round().clamp(-31, 31)
    want[:, 32:48] = (w[:, 32:48] / s8).round().clamp(-127, 127)
    assert torch.equal(e["q"].float(), want)
    deq = want * s6
    deq[:, 32:48] = want[:, 32:48] * s8
    assert torch.equal(train_gpt.dequantize_entry(e), deq)
    plain = train_gpt.quantize_state({"blocks.0.attn.c_q.weight": w}, awq_args(AWQ_LITE_ENABLED=0),
                                     {"blocks.0.attn.c_q.weight": hess})["blocks.0.attn.c_q.weight"]
    err = lambda x: float((train_gpt.dequantize_entry(x) - w)[:, 32:48].square().sum())  # noqa: E731
    assert err(e) < err(plain) / 10  # 4x finer steps there


@pytest.mark.parametrize("compressor", ["zstd", "constriction"])
def test_awq_and_lqer_survive_the_artifact_round_trip(compressor):
    """LQER corrects the realized codes (AWQ groups included), and both come back from the artifact."""
    if compressor == "constriction":
        pytest.importorskip("constriction")
    args = awq_args(MODEL_DIM=256, AWQ_LITE_GROUP_SIZE=32, AWQ_LITE_GROUP_TOP_K=2, LQER_ENABLED=1, LQER_TOP_K=1,
                    LQER_ASYM_GROUP=32, COMPRESSOR=compressor)  # MLP matrices 512 x 256: int6 GPTQ
    torch.manual_seed(0)
    state = train_gpt.export_state(train_gpt.GPT(args))
    g = torch.Generator().manual_seed(2)
    hs = {n: (lambda x: x.T @ x / 500)(torch.randn(500, t.shape[1], generator=g))
          for n, t in state.items() if train_gpt.export_bits(n, t, args) == 6}
    q = train_gpt.quantize_state(state, args, hs)
    awq = [n for n, e in q.items() if "awq" in e]
    lqer = [n for n, e in q.items() if "lqer_a" in e]
    assert 1 <= len(awq) <= 2 and len(lqer) == 1
    e = q[lqer[0]]
    assert torch.allclose(train_gpt.dequantize_entry(e) - train_gpt.dequantize_codes(e), train_gpt.lqer_correction(e))
    assert e["lqer_b_scale"].shape[0] == e["lqer_b"].numel() // 32  # LQER_ASYM_GROUP=32
    out = train_gpt.unpack(train_gpt.pack(q, args))[0]
    for n, x in q.items():
        assert torch.equal(train_gpt.dequantize_entry(out[n]), train_gpt.dequantize_entry(x)), n
    assert all(out[n]["awq"] == q[n]["awq"] for n in awq)


def test_looped_blocks_hessian_is_the_mean_over_every_pass():
    """A block applied three times per forward (NUM_LOOPS=2) averages x^T x over all 3 x tokens rows: its RMS is the
    activations' (AWQ-lite's salience compares matrices), not sqrt(3) times it."""
    args = tiny_args(BIGRAM_BUCKETS=0, MODEL_DIM=320)  # c_q 320 x 320: quantized, so it has a Hessian
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    assert model.final_ctx.looping and model.orders[1][0].count(0) + model.orders[1][1].count(0) == 3
    seen = []
    hook = model.blocks[0].attn.c_q.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, 320)))
    x = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(x, x, per_token=True)
    hook.remove()
    rows = torch.cat(seen)
    assert rows.shape[0] == 3 * 64
    got = train_gpt.collect_hessians(model, [[(x, x)]], args, cpu_runtime())["blocks.0.attn.c_q.weight"]
    torch.testing.assert_close(got, rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)


# ---- settings that cannot work, and the preset

@pytest.mark.parametrize("env,var", [
    (dict(AWQ_LITE_ENABLED=1, GPTQ=0), "AWQ_LITE_ENABLED"),  # AWQ-lite reads GPTQ's Hessians
    (dict(AWQ_LITE_ENABLED=1, AWQ_LITE_BITS=6), "AWQ_LITE_BITS"),  # not wider than the int6 matrices
    (dict(AWQ_LITE_ENABLED=1, AWQ_LITE_GROUP_SIZE=48), "AWQ_LITE_GROUP_SIZE"),  # 512 % 48
    (dict(AWQ_LITE_ENABLED=1, MLP_MULT=4.1, AWQ_LITE_GROUP_SIZE=64), "AWQ_LITE_GROUP_SIZE"),  # hidden 2099
    (dict(AWQ_LITE_BITS=9), "AWQ_LITE_BITS"), (dict(AWQ_LITE_GROUP_TOP_K=0), "AWQ_LITE_GROUP_TOP_K"),
    (dict(AWQ_LITE_GROUP_SIZE=0), "AWQ_LITE_GROUP_SIZE"), (dict(LQER_ASYM_GROUP=0), "LQER_ASYM_GROUP"),
    (dict(ASYM_LOGIT_RESCALE=2), "ASYM_LOGIT_RESCALE")])
def test_settings_that_cannot_work_fail_in_one_line(env, var):
    with pytest.raises(train_gpt.UserError, match=var) as e:
        H.from_env({k: str(v) for k, v in env.items()})
    assert "\n" not in str(e.value)


def test_frontier2135_is_sota1855_with_its_levers():
    a, b = H.from_env({"PRESET": "frontier2135"}), H.from_env({"PRESET": "sota1855"})
    diff = {k: (getattr(b, k), getattr(a, k)) for k in vars(a) if getattr(a, k) != getattr(b, k)}
    assert diff == dict(preset=("sota1855", "frontier2135"), asym_logit_rescale=(False, True),
                        smear_gate_bos_fix=(True, False), gated_attn_quant_gate=(True, False),
                        matrix_lr=(0.026, 0.028), lqer_asym_group=(64, 32), ttt_lora_lr=(1e-4, 8e-5),
                        ttt_weight_decay=(0.5, 2.0), ttt_k_lora=(True, False), phased_ttt_num_phases=(3, 1),
                        gptq_calibration_batches=(16, 32), gptq_reserve_seconds=(0.5, 8.0),
                        ngram_tilt_enabled=(False, True), eval_seq_len=(2048, 2560), ttt_eval_seq_len=(2048, 2560))
    assert not a.awq_lite_enabled  # #2135's code has no AWQ-lite
    assert a.ttt_lora_alpha == b.ttt_lora_alpha == 144  # both records' code default (TTT_LORA_ALPHA, not logged)
