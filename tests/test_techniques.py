"""Model techniques: SmearGate and BigramHash stay causal and inside their document, the full GPT is causal,
BigramHash helps on a pair-dependent source, orthogonal init, shapes, QAT (STE, export fidelity, torch.compile), MTP."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_runtime, markov_tokens, tiny_args
import train_gpt

BOS = train_gpt.BOS_ID


def randomize(module, seed=0, std=0.5):
    """Every parameter random and non-zero (zero-initialised projections would hide any dependence)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def docs_row(T=40, vocab=64, bos_at=(0, 9, 10, 23), seed=0):
    """A random row of ids in [2, vocab) with BOS (a document start) at bos_at; 9 and 10 make a one-token document."""
    t = torch.randint(2, vocab, (1, T), generator=torch.Generator().manual_seed(seed))
    t[0, list(bos_at)] = BOS
    return t


def other_token(tok, vocab=64):
    """A different id that is not BOS, so document boundaries stay where they were."""
    return 2 + (int(tok) - 2 + 7) % (vocab - 2)


# ----------------------------------------------------------------------------------------------------------------------
# SmearGate and BigramHash as modules

def smear_fn(dim=16, vocab=64):
    smear, emb = randomize(train_gpt.SmearGate(dim), 1), randomize(torch.nn.Embedding(vocab, dim), 2)
    return lambda t: smear(emb(t), t)


def bigram_fn(vocab=64):
    args = tiny_args(VOCAB_SIZE=vocab, MODEL_DIM=16, NUM_HEADS=2, NUM_KV_HEADS=1, BIGRAM_BUCKETS=97, BIGRAM_DIM=8)
    bigram = randomize(train_gpt.BigramHash(args), 3)
    return lambda t: bigram(t, train_gpt.PLAIN)


@pytest.mark.parametrize("make", [smear_fn, bigram_fn], ids=["smear", "bigram"])
def test_changing_a_token_never_reaches_earlier_positions_or_later_documents(make):
    f = make()
    with torch.no_grad():
        row = docs_row()
        starts = [i for i in range(row.size(1)) if row[0, i] == BOS]
        out = f(row)
        for t in range(row.size(1)):
            if row[0, t] == BOS:
                continue
            changed = row.clone()
            changed[0, t] = other_token(row[0, t])
            diff = (f(changed) - out).abs().amax(-1)[0]
            assert (diff[:t] == 0).all(), f"changing position {t} changed an earlier position"
            assert diff[t] > 0, f"position {t} ignores its own token"
            next_doc = min([s for s in starts if s > t], default=row.size(1))
            assert (diff[next_doc:] == 0).all(), f"position {t} leaked into the document starting at {next_doc}"
            if t + 1 < next_doc:
                assert diff[t + 1] > 0, f"position {t + 1} ignores the previous token"
            # both mixes reach one token back, no further
            assert (diff[t + 2:] == 0).all(), f"position {t} reached beyond the next position"


@pytest.mark.parametrize("make", [smear_fn, bigram_fn], ids=["smear", "bigram"])
def test_rows_of_a_batch_are_independent(make):
    f = make()
    with torch.no_grad():
        rows = torch.cat([docs_row(T=16, bos_at=(5,), seed=s) for s in (1, 2)])  # row 1 starts mid-document
        out = f(rows)
        changed = rows.clone()
        changed[0, -1] = other_token(rows[0, -1])  # the last token of row 0 sits right before row 1's start
        assert torch.equal(f(changed)[1], out[1])


def test_smear_gate_mixes_in_the_previous_position_except_at_row_and_document_starts():
    smear = train_gpt.SmearGate(8)
    assert torch.equal(torch.sigmoid(smear.gate), torch.full((8,), 0.5))  # gate starts at sigmoid(0)
    randomize(smear, 4)
    tokens = docs_row(T=12, bos_at=(6,))
    tokens[0, 0] = 5  # row start without BOS: still nothing before it
    x = torch.randn(1, 12, 8)
    g = torch.sigmoid(smear.gate.detach())
    expected = (1 - g) * x
    for t in range(1, 12):
        if t != 6:
            expected[0, t] += g * x[0, t - 1]
    assert torch.allclose(smear(x, tokens), expected, atol=1e-6)


def test_bigram_bucket_ids_use_only_the_input_pair_and_reserve_the_last_bucket():
    args = tiny_args(BIGRAM_BUCKETS=97)
    bigram = train_gpt.BigramHash(args)
    tokens = torch.randint(2, 1024, (4, 64), generator=torch.Generator().manual_seed(0))
    tokens[:, 7::13] = BOS
    tokens[:2, 0] = BOS  # two rows start with a document, two mid-document: position 0 is reserved either way
    ids = bigram.bucket_ids(tokens)
    assert ids.dtype == torch.long and ids.shape == tokens.shape
    assert ids.min() >= 0 and ids.max() < 97
    reserved = (tokens == BOS)
    reserved[:, 0] = True
    assert (ids[reserved] == 96).all()
    assert (ids[~reserved] < 96).all()  # only position 0 and BOS positions use the reserved bucket
    assert len(set(ids[~reserved].tolist())) > 60  # the pairs spread over the buckets
    # a pure function of (previous token, token): the same pair anywhere gets the same bucket
    pairs = {}
    for r in range(4):
        for t in range(1, 64):
            if not reserved[r, t]:
                key = (int(tokens[r, t - 1]), int(tokens[r, t]))
                assert pairs.setdefault(key, int(ids[r, t])) == int(ids[r, t])


def test_bigram_key_is_built_from_inputs_never_targets():
    args = tiny_args(BIGRAM_BUCKETS=64, VOCAB_SIZE=64)
    model = randomize(train_gpt.GPT(args), 5, std=0.1)
    seen = []
    model.bigram.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    x, y = torch.randint(2, 64, (2, 16)), torch.randint(2, 64, (2, 16))
    with torch.no_grad():
        model(x, y)
        model(x, y, per_token=True)
    assert len(seen) == 2 and all(torch.equal(s, x) for s in seen)


# ----------------------------------------------------------------------------------------------------------------------
# The full model

def test_full_model_is_causal_at_every_position():
    args = tiny_args(SMEAR_GATE=1, SMEAR_GATE_ENABLED=0, BIGRAM_BUCKETS=64, VOCAB_SIZE=64, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2,
                     NUM_KV_HEADS=1, ORTHO_INIT=1, MTP_HEADS=0)
    torch.manual_seed(0)
    model = randomize(train_gpt.GPT(args), 6, std=0.3)
    row = docs_row(T=24, bos_at=(0, 11))
    y = torch.randint(2, 64, (1, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        base = model(row, y, per_token=True)[0]
        base_h = model.hidden(row, train_gpt.PLAIN)[0]
        for t in range(24):
            changed = row.clone()
            changed[0, t] = other_token(row[0, t]) if row[0, t] != BOS else 7
            losses, h = model(changed, y, per_token=True)[0], model.hidden(changed, train_gpt.PLAIN)[0]
            assert torch.allclose(losses[:t], base[:t], rtol=0, atol=1e-6), f"input {t} changed an earlier loss"
            assert torch.allclose(h[:t], base_h[:t], rtol=0, atol=1e-6), f"input {t} changed an earlier state"
            assert (h[t] - base_h[t]).abs().max() > 1e-3


def train_tiny(bigram_buckets, seed, steps=150, vocab=32):
    """The default stack (SmearGate on) at 1 layer x 64 dims, trained on a source whose next token depends on the
    previous two tokens; returns the held-out loss."""
    # 64 dims: #162's bigram table starts at zero and its projection needs both dims >= 64 to be made orthogonal
    args = tiny_args(NUM_LAYERS=1, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, TRAIN_SEQ_LEN=32, VOCAB_SIZE=64,
                     BIGRAM_BUCKETS=bigram_buckets, BIGRAM_DIM=64, SEED=seed, MUON_WD=0, ADAM_WD=0,
                     TIED_EMBED_LR=0.05, MATRIX_LR=0.04, SCALAR_LR=0.04, MUON_MOMENTUM_WARMUP_STEPS=0)
    span = 16 * 32 + 1
    data = markov_tokens(steps * span + 4097, vocab=vocab, seed=seed, order=2, branching=2)
    data = torch.from_numpy(data.astype(np.int64))
    torch.manual_seed(seed)
    model = train_gpt.GPT(args)
    rt = cpu_runtime()
    opts = train_gpt.build_optimizers(model, args, rt)
    for step in range(steps):
        chunk = data[step * span:(step + 1) * span]
        train_gpt.train_step(model, [(chunk[:-1].view(16, 32), chunk[1:].view(16, 32))], opts, args, rt, train_gpt.PLAIN)
    held = data[steps * span:]
    with torch.no_grad():
        return float(model(held[:-1].view(-1, 32), held[1:].view(-1, 32)))


def test_bigram_hash_learns_a_second_order_source_faster():
    """ln 2 is the floor; locally (seeds 0, 1) held-out loss without BigramHash 1.38 / 1.33, with it 1.11 / 1.05."""
    seed = 0
    without, with_bigram = train_tiny(0, seed), train_tiny(1024, seed)
    assert with_bigram < without - 0.15, (without, with_bigram)


def is_orthogonal(w):
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # wide: orthonormal rows; tall: columns
    return torch.allclose(gram, torch.eye(gram.size(0)), atol=1e-4)


def test_orthogonal_init_follows_the_162_code():
    """#162's _init_weights: zero-init Linears first (they stay zero), then every Linear with both dims >= 64 becomes
    orthogonal, and those named *.proj (only bigram.proj is left) are scaled by 1/sqrt(2L)."""
    layers = 2
    args = tiny_args(ORTHO_INIT=1, NUM_LAYERS=layers, TIE_EMBEDDINGS=0, MTP_HEADS=1, MODEL_DIM=128, NUM_HEADS=2,
                     NUM_KV_HEADS=1, BIGRAM_DIM=64)
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    for block in model.blocks:
        for m in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):  # 128x128, 64x128, 256x128
            assert is_orthogonal(m.weight.detach())
        assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.proj.weight.abs().sum() == 0
    sv = torch.linalg.svdvals(model.bigram.proj.weight.detach())
    assert torch.allclose(sv, torch.full_like(sv, 1 / math.sqrt(2 * layers)), atol=1e-4)
    for zero in (model.lm_head, model.mtp_heads[0], model.bigram.embed):
        assert zero.weight.abs().sum() == 0
    assert model.bigram.scale.item() == pytest.approx(0.05)
    # a Linear with a dim under 64 keeps PyTorch's default init (the tiny config's 32x64 c_k)
    small = train_gpt.GPT(tiny_args(ORTHO_INIT=1))
    w = small.blocks[0].attn.c_k.weight.detach()
    assert w.shape == (32, 64) and w.abs().sum() > 0 and not is_orthogonal(w)
    assert small.bigram.proj.weight.abs().sum() == 0  # 16 < 64 columns: stays at its zero init, as in #162

    plain = train_gpt.GPT(tiny_args(ORTHO_INIT=0, NUM_LAYERS=layers))
    for block in plain.blocks:
        assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.proj.weight.abs().sum() == 0
        w = block.attn.c_q.weight.detach()
        assert w.abs().sum() > 0 and not torch.allclose(w @ w.T, torch.eye(64), atol=1e-2)  # default init
    assert plain.bigram.proj.weight.abs().sum() == 0


def test_shapes_of_wide_and_deep_configs():
    mlp = train_gpt.MLP(tiny_args(MODEL_DIM=512, MLP_MULT=3))
    assert mlp.fc.weight.shape == (1536, 512) and mlp.proj.weight.shape == (512, 1536)
    model = train_gpt.GPT(tiny_args(NUM_LAYERS=11, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, VOCAB_SIZE=64, NUM_LOOPS=0))
    assert len(model.blocks) == 11 and model.orders[0] == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]) and model.skip_weights.shape == (5, 32)
    x = torch.randint(2, 64, (1, 8))
    assert torch.isfinite(model(x, x)).all()  # every skip is pushed and popped


# ----------------------------------------------------------------------------------------------------------------------
# QAT

def qat_model(**kw):
    """fc and proj are 512x256 = 131072 > 65536 elements, so they are exported (and fake-quantized) as int6;
    the 256x256 attention matrices are not."""
    args = tiny_args(MODEL_DIM=256, MLP_MULT=2, NUM_LAYERS=1, NUM_HEADS=4, NUM_KV_HEADS=2, VOCAB_SIZE=64,
                     ORTHO_INIT=1, MTP_HEADS=0, LQER_ENABLED=0, **kw)  # QAT fakes the codes, not LQER's correction
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():  # output projections start at zero, which would hide what QAT does to them and to fc
        for block in model.blocks:
            torch.nn.init.normal_(block.mlp.proj.weight, std=0.05)
            torch.nn.init.normal_(block.attn.proj.weight, std=0.05)
    return model, args


def test_qat_bits_follow_the_export_plan():
    model, args = qat_model(QUANT_MLP_BITS=5, MATRIX_BITS=0)
    bits = {n: m.qat_bits for n, m in model.named_modules() if isinstance(m, train_gpt.CastedLinear)}
    assert bits["blocks.0.mlp.fc"] == bits["blocks.0.mlp.proj"] == 5
    assert bits["blocks.0.attn.c_q"] == 0 and bits["bigram.proj"] == 0
    for name, m in model.named_modules():
        if isinstance(m, train_gpt.CastedLinear):
            assert m.qat_bits == train_gpt.export_bits(name + ".weight", m.weight, args)


@pytest.mark.parametrize("group", [0, 16])
def test_qat_straight_through_gradient_on_one_linear(group):
    torch.manual_seed(1)
    lin = train_gpt.CastedLinear(64, 48)
    lin.qat_bits, lin.qat_group = 6, group
    x, r = torch.randn(5, 64), torch.randn(5, 48)
    w_q = train_gpt.dequantize_tensor(*train_gpt.quantize_tensor(lin.weight.detach(), 6, group), group)
    assert (w_q != lin.weight).float().mean() > 0.9
    out = lin(x, ctx=train_gpt.Ctx(qat=True))
    assert torch.allclose(out, x @ w_q.T, atol=1e-5)
    assert not torch.allclose(out, lin(x, ctx=train_gpt.PLAIN), atol=1e-4)
    (out * r).sum().backward()
    w_const = w_q.clone().requires_grad_(True)
    (F.linear(x, w_const) * r).sum().backward()
    assert torch.allclose(lin.weight.grad, w_const.grad, atol=1e-6)  # STE: as if w_q were the weight
    assert torch.allclose(lin.weight.grad, r.T @ x, atol=1e-5)


def test_qat_changes_the_loss_and_gradients_flow():
    model, _ = qat_model()
    x, y = torch.randint(2, 64, (2, 16)), torch.randint(2, 64, (2, 16))
    plain = model(x, y, ctx=train_gpt.PLAIN)
    fake = model(x, y, ctx=train_gpt.Ctx(qat=True))
    assert abs(float(fake.detach()) - float(plain.detach())) > 1e-5
    fake.backward()
    for name, p in model.named_parameters():
        if name.startswith("blocks.0.mlp."):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("group", [0, 64])
def test_qat_forward_is_the_exported_model_forward(group):
    """With the export's own quantizer (no clip search), training under QAT sees exactly the weights the artifact
    will hold: the QAT forward equals the forward of the model reloaded from the artifact."""
    model, args = qat_model(QUANT_CLIP_SEARCH=0, QUANT_GROUP_SIZE=group, GPTQ=0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # the fp16-kept tensors round-trip exactly
    x, y = torch.randint(2, 64, (2, 16)), torch.randint(2, 64, (2, 16))
    with torch.no_grad():
        fake = model(x, y, ctx=train_gpt.Ctx(qat=True))
        reloaded = train_gpt.GPT(args)
        qstate = train_gpt.quantize_state(train_gpt.export_state(model), args)
        assert qstate["blocks.0.mlp.fc.weight"]["group"] == group
        reloaded.load_state_dict(train_gpt.dequantize_state(qstate), strict=True)
        assert torch.allclose(reloaded(x, y, ctx=train_gpt.PLAIN), fake, rtol=1e-5, atol=1e-6)
        assert abs(float(model(x, y, ctx=train_gpt.PLAIN)) - float(fake)) > 1e-5


@pytest.mark.parametrize("export", ["sdclip", "rowmax"])
def test_qat_simulates_the_configured_export_quantizer(export):
    """QAT fakes round-to-nearest with the export's scales: SDClip (the default; with GPTQ=1 the codes then differ
    by GPTQ's error feedback, the steps are the same) or the row max with clip search."""
    from conftest import ROWMAX_EXPORT
    model, args = qat_model(**(ROWMAX_EXPORT if export == "rowmax" else dict(GPTQ=0)))
    assert args.quant_clip_search == (export == "rowmax") and (args.matrix_clip_sigmas > 0) == (export == "sdclip")
    exported = train_gpt.dequantize_state(train_gpt.quantize_state(train_gpt.export_state(model), args))
    checked = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, train_gpt.CastedLinear) and m.qat_bits:
                seen_by_qat = m(torch.eye(m.in_features), ctx=train_gpt.Ctx(qat=True)).T  # the weight the QAT forward multiplies by
                assert torch.allclose(seen_by_qat, exported[name + ".weight"], rtol=0, atol=1e-6), name
                checked += 1
    assert checked == 2


def test_qat_flag_takes_effect_after_compiling():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    model, _ = qat_model()
    x, y = torch.randint(2, 64, (2, 16)), torch.randint(2, 64, (2, 16))
    with torch.no_grad():
        eager = {flag: model(x, y, ctx=train_gpt.Ctx(qat=flag)) for flag in (False, True)}
        assert not torch.allclose(eager[False], eager[True], rtol=1e-6, atol=0)
        try:
            compiled = torch.compile(model, backend="aot_eager", dynamic=False)
            first = compiled(x, y, ctx=train_gpt.PLAIN)
        except Exception as e:  # a platform without a working dynamo
            pytest.skip(f"torch.compile(backend='aot_eager') does not run here: {type(e).__name__}: {e}")
        assert torch.allclose(first, eager[False], rtol=1e-6, atol=1e-7)
        for flag in (True, False, True):
            assert torch.allclose(compiled(x, y, ctx=train_gpt.Ctx(qat=flag)), eager[flag], rtol=1e-6, atol=1e-7), flag


# ----------------------------------------------------------------------------------------------------------------------
# Multi-token prediction

def test_mtp_heads_add_weighted_k_ahead_losses_and_are_never_exported():
    common = dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1)
    torch.manual_seed(0)
    base = randomize(train_gpt.GPT(tiny_args(MTP_HEADS=0, **common)), 7, std=0.2)
    mtp_args = tiny_args(MTP_HEADS=2, MTP_WEIGHT=0.5, **common)
    model = train_gpt.GPT(mtp_args)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mtp_heads.") for k in missing)
    x, y = torch.randint(2, 64, (2, 16)), torch.randint(2, 64, (2, 16))

    # weight 0: exactly the base loss; weight 0.5 with zero heads already adds the k-ahead terms
    zero_weight = train_gpt.GPT(tiny_args(MTP_HEADS=2, MTP_WEIGHT=0, **common))
    zero_weight.load_state_dict(base.state_dict(), strict=False)
    assert torch.equal(zero_weight(x, y), base(x, y))
    assert not torch.allclose(model(x, y), base(x, y))

    with torch.no_grad():
        for head in model.mtp_heads:
            randomize(head, 8, std=0.2)
    loss = model(x, y)
    with torch.no_grad():  # head k at position t predicts y[t + k], i.e. input token t + k + 1
        h = model.hidden(x, model.final_ctx)  # what a call without ctx runs
        expected = F.cross_entropy(model.logits(h, train=True).flatten(0, 1), y.flatten())  # training's one cap
        for k, head in enumerate(model.mtp_heads, start=1):
            for t in range(16 - k):
                hk = F.rms_norm(h[:, t] + head(h[:, t]), (32,))
                expected += 0.5 * F.cross_entropy(model.logits(hk, train=True), y[:, t + k]) / (16 - k)
    assert torch.allclose(loss, expected, rtol=1e-5)
    loss.backward()
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in model.mtp_heads)

    # evaluation and the artifact ignore the heads
    assert torch.equal(model(x, y, per_token=True), base(x, y, per_token=True))
    state = train_gpt.export_state(model)
    assert not any(k.startswith("mtp_heads.") for k in state)
    plain = train_gpt.GPT(tiny_args(MTP_HEADS=0, **common))
    plain.load_state_dict(state, strict=True)
    assert torch.equal(plain(x, y, per_token=True), base(x, y, per_token=True))
