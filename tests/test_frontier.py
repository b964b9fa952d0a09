"""The frontier pieces (frontier.md sections 3-4), each against a hand computation, then the whole stack: causality
with every switch on, document masking, parameter sharing under recurrence, and compiled graphs per context."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_runtime, tiny_args
from test_techniques import randomize
import train_gpt
from train_gpt import Ctx

BOS = train_gpt.BOS_ID
LOOPING = Ctx(looping=True)
# every model switch on, over 4 layers: order 0 1 2 1 | 2 1 2 3, blocks 2-3 two-lane, so a plain block follows a
# two-lane one inside the loop
ALL_ON = dict(NUM_LAYERS=4, XSA_LAST_N=4, ROPE_DIMS=8, LN_SCALE=1, MLP_ACT="leaky_relu2", SKIP_GATES_ENABLED=1,
              NUM_LOOPS=2, LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=2, SPARSE_ATTN_GATE_ENABLED=1,
              SMEAR_GATE=0, SMEAR_GATE_ENABLED=1, BIGRAM_BUCKETS=0, VOCAB_SIZE=64, MODEL_DIM=32, NUM_HEADS=4,
              NUM_KV_HEADS=2, GATE_WINDOW=6)


def plain_args(**kw):
    """Field defaults (every frontier piece off) plus the tiny test shape; each test turns on what it checks."""
    return tiny_args(**dict(dict(PRESET="baseline", ROPE_DIMS=0, PARALLEL_START_LAYER=1000), **kw))


def capture_input(module):
    """Records the first positional input of every call of module."""
    seen = []
    module.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    return seen


# ----------------------------------------------------------------------------------------------------------------------
# Attention pieces

def test_xsa_output_is_orthogonal_to_its_own_value_with_gqa():
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    out = train_gpt.exclude_self_value(y, v)
    for h in range(4):
        vh = v[:, h // 2]  # heads 0,1 share kv group 0; heads 2,3 group 1
        assert torch.allclose((out[:, h] * vh).sum(-1), torch.zeros(2, 5), atol=1e-5)
        removed = y[:, h] - out[:, h]  # a multiple of v: (y.v / v.v) v
        coef = (y[:, h] * vh).sum(-1, keepdim=True) / (vh * vh).sum(-1, keepdim=True)
        assert torch.allclose(removed, coef * vh, atol=1e-5)


def test_xsa_runs_in_the_last_n_layers_inside_attention():
    args = plain_args(NUM_LAYERS=4, XSA_LAST_N=2, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2)
    assert [train_gpt.Attention(args, i).xsa for i in range(4)] == [False, False, True, True]
    attn = randomize(train_gpt.Attention(args, 3), 1)
    ys, vs = capture_input(attn.proj), []
    attn.c_v.register_forward_hook(lambda m, i, out: vs.append(out.detach()))
    with torch.no_grad():
        attn(torch.randn(2, 6, 32), train_gpt.PLAIN)
    y, v = ys[0].view(2, 6, 4, 8), vs[0].view(2, 6, 2, 8)
    for h in range(4):
        assert (y[:, :, h] * v[:, :, h // 2]).sum(-1).abs().max() < 1e-4


def test_partial_rope_rotates_the_first_dims_and_leaves_the_rest():
    base, T = 100.0, 5
    x = torch.randn(1, 2, T, 8, generator=torch.Generator().manual_seed(1))
    out = train_gpt.rotary(x, base, dims=4)
    assert torch.equal(out[..., 4:], x[..., 4:])
    for t in range(T):
        for i in range(2):  # half-split pairs (i, i + 2) of the 4 rotated dims, angle t * base^(-2i/4)
            a = t * base ** (-2 * i / 4)
            x1, x2 = x[..., t, i], x[..., t, i + 2]
            assert torch.allclose(out[..., t, i], x1 * math.cos(a) + x2 * math.sin(a), atol=1e-5)
            assert torch.allclose(out[..., t, i + 2], x2 * math.cos(a) - x1 * math.sin(a), atol=1e-5)
    assert torch.equal(train_gpt.rotary(x, base, 0), train_gpt.rotary(x, base, 8))  # 0 = all dims


def test_sparse_attention_gate_is_half_at_init_and_a_per_head_sigmoid_after():
    args = plain_args(MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, SPARSE_ATTN_GATE_ENABLED=1, GATE_WINDOW=6,
                     SPARSE_ATTN_GATE_SCALE=0.7)
    gated, plain = train_gpt.Attention(args, 0), train_gpt.Attention(plain_args(MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2), 0)
    randomize(plain, 2)
    gated.load_state_dict(plain.state_dict(), strict=False)
    assert gated.attn_gate.shape == (4, 6) and (gated.attn_gate == 0).all()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(gated(x, train_gpt.PLAIN), 0.5 * plain(x, train_gpt.PLAIN), atol=1e-6)
        gated.attn_gate.normal_()
        y_gated, y_plain = capture_input(gated.proj), capture_input(plain.proj)
        gated(x, train_gpt.PLAIN), plain(x, train_gpt.PLAIN)
    for h in range(4):
        sig = torch.sigmoid(0.7 * (x[..., :6] * gated.attn_gate[h]).sum(-1, keepdim=True))  # [B, T, 1]
        heads = slice(8 * h, 8 * h + 8)
        assert torch.allclose(y_gated[0][..., heads], sig * y_plain[0][..., heads], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Blocks, MLP, skips, SmearGate

def test_ln_scale_divides_both_block_inputs_by_sqrt_layer_plus_one():
    args = plain_args(LN_SCALE=1, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=4)
    block = randomize(train_gpt.Block(args, 3), 3, std=0.3)
    a_in, m_in = capture_input(block.attn), capture_input(block.mlp)
    x, x0 = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    with torch.no_grad():
        (out,) = block((x,), x0, train_gpt.PLAIN)
        mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
        assert torch.allclose(a_in[0], F.rms_norm(mixed, (32,)) / 2, atol=1e-6)  # 1/sqrt(3+1)
        after_attn = mixed + block.attn_scale * block.attn(a_in[0], train_gpt.PLAIN)
        assert torch.allclose(m_in[0], F.rms_norm(after_attn, (32,)) / 2, atol=1e-5)
    assert train_gpt.Block(plain_args(LN_SCALE=0), 3).ln == 1.0


def test_leaky_relu_squared_values():
    args = plain_args(MODEL_DIM=4, NUM_HEADS=2, NUM_KV_HEADS=1, MLP_MULT=1, MLP_ACT="leaky_relu2", MLP_LEAKY_SLOPE=0.5)
    mlp = train_gpt.MLP(args)
    with torch.no_grad():
        mlp.fc.weight.copy_(torch.eye(4))
        mlp.proj.weight.copy_(torch.eye(4))
        out = mlp(torch.tensor([[-2.0, 3.0, -0.5, 0.0]]), train_gpt.PLAIN)
    assert torch.allclose(out, torch.tensor([[1.0, 9.0, 0.0625, 0.0]]))  # (-2*0.5)^2, 3^2, (-0.25)^2
    relu2 = train_gpt.MLP(plain_args(MODEL_DIM=4, NUM_HEADS=2, NUM_KV_HEADS=1, MLP_MULT=1))
    relu2.load_state_dict(mlp.state_dict())
    with torch.no_grad():
        assert torch.allclose(relu2(torch.tensor([[-2.0, 3.0]]).repeat(1, 2), train_gpt.PLAIN),
                              torch.tensor([[0.0, 9.0, 0.0, 9.0]]))


def test_skip_gate_is_a_lerp_between_weighted_skip_and_x():
    model = train_gpt.GPT(plain_args(SKIP_GATES_ENABLED=1, NUM_LAYERS=4, MODEL_DIM=8, NUM_HEADS=2, NUM_KV_HEADS=1))
    x, s = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    with torch.no_grad():
        assert torch.allclose(model.skip(1, x, s), 0.5 * x + 0.5 * s, atol=1e-6)  # w = 1, g = 0 at init
        model.skip_weights.normal_()
        model.skip_gates.normal_()
        g, w = torch.sigmoid(model.skip_gates[1]), model.skip_weights[1]
        assert torch.allclose(model.skip(1, x, s), g * x + (1 - g) * w * s, atol=1e-6)
    plain = train_gpt.GPT(plain_args(NUM_LAYERS=4, MODEL_DIM=8, NUM_HEADS=2, NUM_KV_HEADS=1))
    assert plain.skip_gates is None and torch.equal(plain.skip(0, x, s), x + s)


def test_two_lane_block_update_formulas():
    """PR #1855's _parallel_block: attention reads lane 0 mixed with x0, but lane 0 carries on unmixed."""
    args = plain_args(MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=4, PARALLEL_START_LAYER=2)
    assert [train_gpt.Block(args, i).parallel for i in range(4)] == [False, False, True, True]
    block = randomize(train_gpt.Block(args, 2), 4, std=0.3)
    fresh = train_gpt.Block(args, 2)
    assert torch.equal(fresh.lane_resid, torch.full((2,), 1.1)) and torch.equal(fresh.lane_mix, torch.ones(2, 2))
    l0, l1, x0 = torch.randn(3, 1, 4, 32).unbind(0)
    P = train_gpt.PLAIN
    with torch.no_grad():
        out0, out1 = block((l0, l1), x0, P)
        mixed = block.resid_mix[0] * l0 + block.resid_mix[1] * x0
        a = block.attn_scale * block.attn(F.rms_norm(mixed, (32,)), P)  # attention reads lane 0 mixed with x0
        m = block.mlp_scale * block.mlp(F.rms_norm(l1, (32,)), P)  # the MLP reads lane 1, not after attention
        r, p = block.lane_resid, block.lane_mix
        assert torch.allclose(out0, r[0] * l0 + p[0, 0] * a + p[0, 1] * m, atol=1e-5)  # lane 0 itself unmixed
        assert torch.allclose(out1, r[1] * l1 + p[1, 0] * a + p[1, 1] * m, atol=1e-5)
        # entering the lanes from one stream: both lanes start as that stream
        assert all(torch.allclose(u, v) for u, v in zip(block((l0,), x0, P), block((l0, l0), x0, P)))
    lanes = (l0, l1)
    assert torch.equal(train_gpt.merge_lanes(lanes), (l0 + l1) / 2) and train_gpt.merge_lanes((l0,)) is l0


def test_gptj_block_reads_one_input_for_attention_and_mlp():
    """Record 2026-04-09's parallel block: x = mix(x, x0); x + attn(norm x) + mlp(norm x), one stream."""
    args = plain_args(MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=4, PARALLEL_RESIDUAL_START=2)
    assert [train_gpt.Block(args, i).gptj for i in range(4)] == [False, False, True, True]
    block = randomize(train_gpt.Block(args, 2), 4, std=0.3)
    assert not hasattr(block, "lane_mix")  # no lane scalars: the record's parameter count
    x, x0 = torch.randn(2, 1, 4, 32).unbind(0)
    with torch.no_grad():
        (out,) = block((x,), x0, train_gpt.PLAIN)
        mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
        n = F.rms_norm(mixed, (32,))
        want = mixed + block.attn_scale * block.attn(n, train_gpt.PLAIN) + block.mlp_scale * block.mlp(n, train_gpt.PLAIN)
        assert torch.allclose(out, want, atol=1e-5)


def test_decoder_skips_reach_lane_zero_only():
    """PR #1855's decoder loop: when the lanes start both take the stream, then each skip goes into lane 0 alone."""
    args = plain_args(MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=4, PARALLEL_START_LAYER=2)
    model = randomize(train_gpt.GPT(args), 5, std=0.3)
    seen = []
    for blk in model.blocks[2:]:
        blk.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    with torch.no_grad():
        x0 = model.embed(torch.tensor([[1, 5, 9, 3]]), train_gpt.PLAIN)
        model.hidden(torch.tensor([[1, 5, 9, 3]]), train_gpt.PLAIN)
        h = x0
        for blk in model.blocks[:2]:
            (h,) = blk((h,), x0, train_gpt.PLAIN)
    lane0, lane1 = seen[0]
    assert torch.allclose(lane1, h, atol=1e-6)  # lane 1: the stream, no skip
    assert model.skip_gates is None and torch.allclose(lane0, h + model.skip_weights[0] * h, atol=1e-6)


def test_sota_smear_gate_formula_and_bos_reset():
    smear = train_gpt.LambdaSmear(plain_args(GATE_WINDOW=3))
    x = torch.randn(1, 6, 8)
    tokens = torch.tensor([[5, 6, BOS, 7, 8, 9]])
    assert torch.equal(smear(x, tokens), x)  # lam = 0: identity at init
    with torch.no_grad():
        smear.gate.copy_(torch.tensor([0.5, -1.0, 2.0]))
        smear.lam.fill_(0.8)
        out = smear(x, tokens)
    for t in range(6):
        g = torch.sigmoid((x[0, t, :3] * torch.tensor([0.5, -1.0, 2.0])).sum())
        prev = x[0, t - 1] if t > 0 and t != 2 else torch.zeros(8)  # row start and BOS get nothing
        assert torch.allclose(out[0, t], x[0, t] + 0.8 * g * prev, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Depth recurrence

@pytest.mark.parametrize("L,start,end,loops,expected", [
    (11, 3, 5, 2, [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]),
    (11, 4, 5, 1, [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]),
    (4, 0, 0, 2, [0, 0, 0, 1, 2, 3]),
    (3, 0, 2, 1, [0, 1, 2, 0, 1, 2]),
    (5, 2, 4, 0, [0, 1, 2, 3, 4]),
])
def test_layer_order_lists(L, start, end, loops, expected):
    assert train_gpt.layer_order(L, start, end, loops) == expected


def test_frontier_encoder_decoder_orders_and_skip_count():
    args = plain_args(NUM_LAYERS=11, NUM_LOOPS=2, LOOP_START=3, LOOP_END=5, MODEL_DIM=16, NUM_HEADS=2, NUM_KV_HEADS=1)
    model = train_gpt.GPT(args)
    assert model.orders[1] == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])  # frontier.md section 2
    assert model.orders[0] == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert model.skip_weights.shape == (8, 16)  # min(8, 9) skips once looping
    assert train_gpt.GPT(plain_args(NUM_LAYERS=11, NUM_LOOPS=0)).orders[1] == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])


@pytest.mark.parametrize("env,message", [
    (dict(NUM_LAYERS=4, NUM_LOOPS=1, LOOP_START=1, LOOP_END=4), "LOOP_END=4: must be < NUM_LAYERS=4"),
    (dict(NUM_LAYERS=6, NUM_LOOPS=1, LOOP_START=3, LOOP_END=2), "LOOP_START=3: must be <= LOOP_END"),
    (dict(ROPE_DIMS=5), "ROPE_DIMS=5"),
    (dict(MLP_ACT="gelu"), "MLP_ACT='gelu': must be one of relu2, leaky_relu2"),
    (dict(SMEAR_GATE=1, SMEAR_GATE_ENABLED=1), "SMEAR_GATE_ENABLED"),
    (dict(MUON_NS="ns7"), "MUON_NS"),
])
def test_invalid_frontier_settings_are_one_line_errors(env, message):
    with pytest.raises(train_gpt.UserError, match=message.replace("(", r"\(")):
        plain_args(**env)


def test_looped_blocks_share_tensors_and_the_artifact_stores_them_once():
    args = plain_args(**ALL_ON)
    model = train_gpt.GPT(args)
    order = [i for part in model.orders[1] for i in part]
    assert order.count(1) == 3 and order.count(2) == 3
    assert len(model.blocks) == 4  # applications share the physical blocks, nothing is copied
    state = train_gpt.export_state(model)
    assert sorted({k.split(".")[1] for k in state if k.startswith("blocks.")}) == ["0", "1", "2", "3"]
    plain = train_gpt.export_state(train_gpt.GPT(plain_args(**dict(ALL_ON, NUM_LOOPS=0))))
    assert {k for k in state if k.startswith("blocks.")} == {k for k in plain if k.startswith("blocks.")}
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(v.numel() for v in state.values())


# ----------------------------------------------------------------------------------------------------------------------
# The whole stack

def all_on_model(seed=6, **kw):
    model = randomize(train_gpt.GPT(plain_args(**dict(ALL_ON, **kw))), seed, std=0.3)
    return model.eval()


def doc_row(T=24):
    row = torch.randint(2, 64, (1, T), generator=torch.Generator().manual_seed(3))
    row[0, [0, 7, 15]] = BOS
    return row


@pytest.mark.parametrize("doc_mask", [0, 1])
def test_every_switch_on_and_looping_stays_causal_and_masks_documents(doc_mask):
    model = all_on_model(DOC_MASK=doc_mask)
    row = doc_row()
    starts = [0, 7, 15, row.size(1)]
    with torch.no_grad():
        base = model.logits(model.hidden(row, LOOPING))
        leaked = False
        for t in (3, 8, 14, 16, 23):
            changed = row.clone()
            changed[0, t] = 2 + (int(row[0, t]) + 5) % 60
            diff = (model.logits(model.hidden(changed, LOOPING)) - base).abs().amax(-1)[0]
            assert (diff[:t] == 0).all(), f"changing token {t} changed an earlier logit"
            assert diff[t] > 0
            end = min(s for s in starts if s > t)
            leaked |= bool((diff[end:] > 0).any())
            if doc_mask:
                assert (diff[end:] == 0).all(), f"token {t} leaked into the next document"
    assert leaked != bool(doc_mask)  # without the mask attention does cross documents


def test_flex_attention_block_mask_equals_the_dense_mask(monkeypatch):
    """The CUDA route (flex_attention, BlockMask) and the CPU route (SDPA, dense mask), both run on CPU (forward
    only: flex_attention has no CPU backward, so the CUDA backward is untested here)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    row = torch.cat((doc_row(), doc_row().roll(5, 1)))
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 4, 24, 8, generator=g), torch.randn(2, 2, 24, 8, generator=g), torch.randn(2, 2, 24, 8, generator=g)
    dense, flex = train_gpt.document_mask(row, flex=False), train_gpt.document_mask(row, flex=True)
    assert isinstance(dense, torch.Tensor) and not isinstance(flex, torch.Tensor)
    assert torch.allclose(train_gpt.attend(q, k, v, dense), train_gpt.attend(q, k, v, flex), atol=1e-5)
    model = all_on_model(DOC_MASK=1)
    with torch.no_grad():
        want = model.logits(model.hidden(row, LOOPING))
        monkeypatch.setattr(train_gpt, "document_mask", functools.partial(train_gpt.document_mask, flex=True))
        got = model.logits(model.hidden(row, LOOPING))
        assert torch.allclose(got, want, atol=1e-4)
        # the CUDA route builds its BlockMask inside the compiled forward: it must trace as one graph
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
            assert torch.allclose(compiled(row, row, ctx=LOOPING), model(row, row, ctx=LOOPING), rtol=1e-5)
        finally:
            torch._dynamo.reset()


def test_cuda_builds_the_block_mask_only_where_the_forward_is_compiled(monkeypatch):
    """Eager flex_attention computes every score unfused (slower than SDPA's masked kernel by far), and GPTQ
    calibration and the LoRA TTT's global SGD run eager: on CUDA an eager forward gets the dense mask, a compiled one
    the BlockMask. (A CPU tensor that says it is on CUDA stands in for one.)"""
    pytest.importorskip("torch.nn.attention.flex_attention")

    class OnCuda(torch.Tensor):
        is_cuda = True
    row = doc_row().as_subclass(OnCuda)
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        assert isinstance(train_gpt.document_mask(row), torch.Tensor) != compiling
    assert isinstance(train_gpt.document_mask(doc_row()), torch.Tensor)  # CPU: always dense


def block_sets(bm, side="kv"):
    """Per (row, q block): the kv blocks run with the mask and the kv blocks run without it (full); side="q": per
    (row, kv block) the q blocks, as the backward's dK/dV pass runs them."""
    num, ind = getattr(bm, f"{side}_num_blocks"), getattr(bm, f"{side}_indices")
    full_num, full_ind = getattr(bm, f"full_{side}_num_blocks"), getattr(bm, f"full_{side}_indices")
    B, _, n = num.shape
    return [(set(ind[b, 0, i, :num[b, 0, i]].tolist()), set(full_ind[b, 0, i, :full_num[b, 0, i]].tolist()))
            for b in range(B) for i in range(n)]


@pytest.mark.parametrize("B,T,split", [(3, 384, 0), (2, 1024, 0), (1, 768, 100), (4, 512, 50), (2, 2560, 0)])
def test_the_block_mask_from_segment_ids_is_create_block_masks(B, T, split):
    """document_mask's BlockMask (built from each 128-token block's first and last segment id, as create_block_mask
    inside a compiled graph read out of bounds at B = 64 on CUDA) runs the same blocks, with and without the mask,
    for queries and for keys, as create_block_mask's from the dense mask; and attention through it is the dense one."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(B * T + split)
    idx = torch.randint(2, 64, (B, T), generator=g)
    idx[torch.rand(B, T, generator=g) < 1 / 300] = BOS
    idx[0, 128] = BOS  # a document starting exactly at a block edge
    dense = train_gpt.document_mask(idx, flex=False, split=split)[:, 0]
    ours = train_gpt.document_mask(idx, flex=True, split=split)
    ref = flex_attention.create_block_mask(lambda b, h, q, k: dense[b, q, k], B, None, T, T, device="cpu")
    assert block_sets(ours) == block_sets(ref)
    assert block_sets(ours, "q") == block_sets(ref, "q")  # the backward's query-side blocks (untested on CPU else)
    assert any(len(p) > 1 for p, _ in block_sets(ours))  # off-diagonal masked blocks occur
    assert any(f for _, f in block_sets(ours)) == (not split)  # full blocks too, unless split cuts under 128
    q, k, v = torch.randn(B, 4, T, 8, generator=g), torch.randn(B, 2, T, 8, generator=g), torch.randn(B, 2, T, 8, generator=g)
    torch.testing.assert_close(train_gpt.attend(q, k, v, ours), train_gpt.attend(q, k, v, dense[:, None]))


def test_a_block_mask_past_the_last_full_block_still_masks_exactly():
    """T not a multiple of 128: the last block is padded (the ids repeat the last one, so the kernel may read past T);
    the blocks it runs allow exactly the dense mask's pairs below T."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    idx = torch.randint(2, 64, (2, 300), generator=torch.Generator().manual_seed(7))
    idx[0, [5, 200]], idx[1, 290] = BOS, BOS
    ours, dense = train_gpt.document_mask(idx, flex=True), train_gpt.document_mask(idx, flex=False)[:, 0]
    allowed = ours.to_dense().repeat_interleave(128, -1).repeat_interleave(128, -2)[:, 0, :300, :300].bool()
    assert not (dense & ~allowed).any()  # every allowed pair lies in a block that runs
    for b, i, j in ((b, i, j) for b in range(2) for i in range(3) for j in range(3)):
        if j in block_sets(ours)[b * 3 + i][1]:  # a full block: every real pair in it is allowed
            assert dense[b, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].all()


def test_every_reachable_context_compiles_as_a_full_graph_and_matches_eager():
    args = plain_args(**dict(ALL_ON, QAT=1, QAT_START_FRAC=0.6, ENABLE_LOOPING_AT=0.3))
    assert train_gpt.reachable_ctxs(args) == [Ctx(False, False), Ctx(False, True), Ctx(True, True)]
    assert [train_gpt.ctx_for(args, p) for p in (0.0, 0.29, 0.3, 0.6, 1.0)] == [
        Ctx(False, False), Ctx(False, False), Ctx(False, True), Ctx(True, True), Ctx(True, True)]
    model = randomize(train_gpt.GPT(args), 8, std=0.2)
    for m in model.modules():  # tiny matrices would be exported as fp16 and left alone by QAT
        if isinstance(m, train_gpt.CastedLinear):
            m.qat_bits = 6
    x, y = doc_row().repeat(2, 1), doc_row().roll(1, 1).repeat(2, 1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False, fullgraph=True)
    try:
        with torch.no_grad():
            eager = {c: model(x, y, ctx=c) for c in train_gpt.reachable_ctxs(args)}
            assert len({float(v) for v in eager.values()}) == 3  # each switch changes the loss
            for c in [*train_gpt.reachable_ctxs(args), Ctx(False, False)]:
                assert torch.allclose(compiled(x, y, ctx=c), eager[c], rtol=1e-5), c
    finally:
        torch._dynamo.reset()  # recompile limits count per code object across the whole test session


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer pieces

def test_polar_express_first_step_by_hand():
    G = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    X = (G / (G.norm() + 1e-7)).T  # tall matrices are iterated transposed
    A = X @ X.T
    a, b, c = 8.156554524902461, -22.48329292557795, 15.878769915207462  # PR #1855's _PE_COEFFS[0]
    assert torch.allclose(train_gpt.newton_schulz(G, 1, "polar"), (a * X + (b * A + c * A @ A) @ X).T, atol=1e-5)
    a, b, c = 3.4445, -4.7750, 2.0315
    assert torch.allclose(train_gpt.newton_schulz(G, 1, "ns5"), (a * X + (b * A + c * A @ A) @ X).T, atol=1e-5)


def test_polar_express_five_steps_are_nearly_orthogonal():
    G = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(6))
    s = torch.linalg.svdvals(train_gpt.newton_schulz(G, 5, "polar"))
    assert s.min() > 0.8 and s.max() < 1.2, s


def test_muon_eq_r_normalises_rows_before_newton_schulz():
    g = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    p = torch.nn.Parameter(torch.zeros(8, 16))
    opt = train_gpt.Muon([p], lr=1.0, momentum=0.0, steps=5, row_normalize=True)
    p.grad = g.clone()
    opt.step()
    expected = -train_gpt.newton_schulz(g / g.norm(dim=1, keepdim=True), 5)
    assert torch.allclose(p.detach(), expected, atol=1e-5)
    # so scaling any row of the gradient leaves the update unchanged
    q = torch.nn.Parameter(torch.zeros(8, 16))
    train_gpt.Muon([q], lr=1.0, momentum=0.0, steps=5, row_normalize=True)
    q.grad = g * torch.logspace(-2, 2, 8)[:, None]
    opt2 = train_gpt.Muon([q], lr=1.0, momentum=0.0, steps=5, row_normalize=True)
    opt2.step()
    assert torch.allclose(q.detach(), p.detach(), atol=1e-4)


def test_min_lr_is_the_floor_the_warmdown_ends_at():
    args = plain_args(ITERATIONS=100, WARMDOWN_FRAC=0.5, MIN_LR=0.1)
    assert train_gpt.lr_scale(args, 0, 0) == 1.0 and train_gpt.lr_scale(args, 50, 0) == 1.0
    assert train_gpt.lr_scale(args, 75, 0) == pytest.approx(0.5)  # a floor, not a remap onto [0.1, 1]
    assert train_gpt.lr_scale(args, 95, 0) == pytest.approx(0.1) and train_gpt.lr_scale(args, 91, 0) == pytest.approx(0.18)
    assert train_gpt.lr_scale(args, 100, 0) == pytest.approx(0.1)
    assert train_gpt.lr_scale(plain_args(ITERATIONS=100, WARMDOWN_FRAC=0.5), 100, 0) == 0.0


def test_embed_wd_decays_embeddings_and_adam_wd_the_rest():
    args = plain_args(TIE_EMBEDDINGS=0, SMEAR_GATE=0, BIGRAM_BUCKETS=64, ADAM_WD=0.02, EMBED_WD=0.3, EMBED_LR=0.5,
                     HEAD_LR=0.1, SCALAR_LR=0.2)
    model = train_gpt.GPT(args)
    adam = train_gpt.build_optimizers(model, args, cpu_runtime())[0]
    groups = train_gpt.route_params(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient leaves only the decoupled decay: p *= 1 - lr * wd
    adam.step()
    factor = {"embed": 1 - 0.5 * 0.3, "head": 1 - 0.1 * 0.02, "scalar": 1 - 0.2 * 0.02}
    for kind, f in factor.items():
        for name, p in groups[kind]:
            assert torch.allclose(p.detach(), before[name] * f, atol=1e-7), name
    assert {n for n, _ in groups["embed"]} == {"tok_emb.weight", "bigram.embed.weight"}
    follow = train_gpt.build_optimizers(model, plain_args(ADAM_WD=0.02), cpu_runtime())[0]
    assert all(g["weight_decay"] == 0.02 for g in follow.param_groups)  # EMBED_WD < 0: ADAM_WD


# ----------------------------------------------------------------------------------------------------------------------
# Learning on real text

@pytest.fixture(scope="module")
def real_text_data(tmp_path_factory):
    """400 proxy validation documents (~508k tokens): 370 to train on, 30 held out."""
    from conftest import TOKENIZER
    from test_bpb import real_documents
    import sentencepiece as spm
    from data.shards import encode_docs, write_shard
    if not TOKENIZER.exists():
        pytest.skip(f"challenge tokenizer not found at {TOKENIZER}")
    sp, docs = spm.SentencePieceProcessor(model_file=str(TOKENIZER)), real_documents(400)
    path = tmp_path_factory.mktemp("real")
    write_shard(path / "fineweb_train_000000.bin", encode_docs(sp, docs[:370]))
    write_shard(path / "fineweb_val_000000.bin", encode_docs(sp, docs[370:]))
    return dict(DATA_PATH=str(path), TOKENIZER_PATH=str(TOKENIZER), LOG_DIR=str(path / "logs"), SUBMISSION_JSON="")


def test_shrunk_default_learns_at_least_as_well_as_shrunk_seed162(real_text_data):
    """Equal steps (100 x 2,048 tokens, seq 128, 2 layers x 64, the tiny test shape for both), same warmdown
    (seed162's WARMDOWN_ITERS=3000 would keep its LR near 0 over 100 steps), no averaging. Measured pre-quant bpb,
    default vs seed162: seed 1 2.9045 vs 2.9228, seed 2 2.9090 vs 2.9189 (mean -0.014); seed 3, not in the test,
    2.9186 vs 2.9152 (+0.003). At this scale the margin is about the seed spread: the claim is 'not worse'."""
    common = dict(real_text_data, ITERATIONS=100, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=2048, GRAD_ACCUM_STEPS=1,
                  WARMDOWN_FRAC=0.5, EMA_DECAY=0, SWA=0, VAL_MAX_TOKENS=8192, EVAL_STRIDE=0, TRAIN_LOG_EVERY=0)
    seed162_only = dict(PRESET="seed162", LOOP_START=3, LOOP_END=5, PARALLEL_START_LAYER=1000, ROPE_DIMS=0)
    bpb = {}
    for name, extra in (("default", {}), ("seed162", seed162_only)):
        for seed in (1, 2):
            args = tiny_args(**dict(common, SEED=seed, **extra))
            bpb.setdefault(name, []).append(train_gpt.run(args, cpu_runtime())["pre_quant"]["val_bpb"])
    mean = {k: sum(v) / len(v) for k, v in bpb.items()}
    assert mean["default"] <= mean["seed162"], bpb
    assert mean["default"] < 3.0  # a uniform guess is 10 bits over ~2.6 bytes a token, ~3.9 bpb: it learned
