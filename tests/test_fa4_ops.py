"""bench/fa4_ops.py, FA4 as custom ops for gpu_check.py's `--flash fa4`: without a GPU, float32 reference math stands in
for FA4's kernels, and the ops around them (schemas, fake kernels, autograd, a full compiled graph) are checked
against train_gpt.attend on the dense document mask."""
import math

import pytest
import torch

from bench import fa4_ops
from conftest import qkv
import train_gpt


def segment_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    return torch.searchsorted(cu, torch.arange(total, dtype=cu.dtype), right=True)


def scores(q, k, cu):
    """Batched [B, T, H, hd] (or [total, H, hd] with cu) -> masked scores [B, H, T, T] and k's head repeat."""
    qb, kb = (q, k) if cu is None else (q[None], k[None])
    rep = qb.size(2) // kb.size(2)
    s = torch.einsum("bqhd,bkhd->bhqk", qb, kb.repeat_interleave(rep, 2)) / math.sqrt(q.size(-1))
    T = qb.size(1)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    if cu is not None:
        seg = segment_ids(cu, T)
        allowed = allowed & (seg[:, None] == seg[None, :])
    return s.masked_fill(~allowed, float("-inf")), rep


def reference_forward(q, k, v, cu, max_len):
    s, rep = scores(q, k, cu)
    lse = s.logsumexp(-1)  # [B, H, T]
    vb = v if cu is None else v[None]
    out = torch.einsum("bhqk,bkhd->bqhd", (s - lse[..., None]).exp(), vb.repeat_interleave(rep, 2))
    return (out, lse) if cu is None else (out[0], lse[0])


def reference_backward(dout, q, k, v, out, lse, cu, max_len):
    """FlashAttention's backward from the saved output and log-sum-exp."""
    s, rep = scores(q, k, cu)
    if cu is not None:
        q, k, v, out, dout, lse = q[None], k[None], v[None], out[None], dout[None], lse[None]
    p = (s - lse[..., None]).exp()  # [B, H, T, T]
    kr, vr = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, vr)
    ds = p * (dp - (dout * out).sum(-1).transpose(1, 2)[..., None]) / math.sqrt(q.size(-1))
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kr)
    group = lambda t: t.unflatten(2, (k.size(2), rep)).sum(3)  # the GQA heads' gradients summed per kv head
    dk = group(torch.einsum("bhqk,bqhd->bkhd", ds, q))
    dv = group(torch.einsum("bhqk,bqhd->bkhd", p, dout))
    return (dq, dk, dv) if cu is None else (dq[0], dk[0], dv[0])


@pytest.fixture
def reference_kernels(monkeypatch):
    monkeypatch.setitem(fa4_ops.KERNELS, "forward", reference_forward)
    monkeypatch.setitem(fa4_ops.KERNELS, "backward", reference_backward)


def with_grads(f, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    y = f(q, k, v)
    y.backward(g)
    return y.detach(), q.grad, k.grad, v.grad


def test_the_ops_pass_torchs_custom_op_checks(reference_kernels):
    """opcheck: schema, fake kernels against the real ones' shapes, autograd registration, AOT dispatch."""
    q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in qkv(T=24))
    torch.library.opcheck(fa4_ops.forward_op, (q, k, v, None, 0))
    cu = torch.tensor([0, 5, 24, 30, 48, 48], dtype=torch.int32)
    flat = [t.detach().flatten(0, 1).requires_grad_(True) for t in (q, k, v)]
    torch.library.opcheck(fa4_ops.forward_op, (*flat, cu, 19))


@pytest.mark.parametrize("varlen", [False, True])
def test_compiled_full_graph_equals_attend_on_the_dense_mask(reference_kernels, varlen):
    """train_gpt.attend's FlashAttention calls (its layout changes and arguments) through the ops, compiled as one
    graph (aot_eager: AOT autograd traces the fakes, no inductor), against attend's SDPA path: outputs and the three
    gradients."""
    q, k, v = qkv(T=24, seed=int(varlen))
    B, T = q.size(0), q.size(2)
    idx = torch.randint(2, 50, (B, T), generator=torch.Generator().manual_seed(3))
    idx[0, [5, 17]], idx[1, 11] = train_gpt.BOS_ID, train_gpt.BOS_ID
    cu = torch.tensor([0, 5, 17, 24, 35, 48, 48, 48], dtype=torch.int32)  # row starts and BOS of the flattened rows
    mask = train_gpt.document_mask(idx, flex=False) if varlen else None

    def flash(q, k, v):  # what attend does on CUDA with FLASH = fa4_ops
        t = [x.transpose(1, 2) for x in (q, k, v)]
        if not varlen:
            return fa4_ops.flash_attn_func(*t, causal=True).transpose(1, 2)
        y = fa4_ops.flash_attn_varlen_func(*(x.flatten(0, 1) for x in t), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                           max_seqlen_q=12, max_seqlen_k=12, causal=True)
        return y.view_as(t[0]).transpose(1, 2)

    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    expected = with_grads(lambda q, k, v: train_gpt.attend(q, k, v, mask), q, k, v, g)
    compiled = torch.compile(flash, backend="aot_eager", fullgraph=True)
    for got in (with_grads(flash, q, k, v, g), with_grads(compiled, q, k, v, g)):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
