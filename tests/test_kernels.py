"""Attention backends and the fused Triton CE (issue 18). CPU runs SDPA's reference math and the plain paths; the
Triton kernel runs under the interpreter (TRITON_INTERPRET=1) on float32 tensors, tiny shapes, against those paths."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import train_gpt
from conftest import cpu_runtime, qkv, tiny_args

needs_triton = pytest.mark.skipif(train_gpt.triton is None, reason="triton is not installed (CI installs it)")


def reference_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(hd)) v over the allowed (q, k) pairs [B or 1, 1, T, T], each kv head shared by its group."""
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def test_attend_on_cpu_is_the_reference_math_whatever_the_backend_flag():
    q, k, v = qkv()
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    for flash in (False, True):  # no FlashAttention on CPU: the flag falls back to SDPA
        torch.testing.assert_close(train_gpt.attend(q, k, v, None, flash), reference_attention(q, k, v, causal))
    idx = torch.randint(2, 50, (2, 12))
    idx[0, 4], idx[1, 9] = train_gpt.BOS_ID, train_gpt.BOS_ID
    mask = train_gpt.document_mask(idx, flex=False)
    torch.testing.assert_close(train_gpt.attend(q, k, v, mask, True), reference_attention(q, k, v, mask))


def test_segments_fall_back_to_the_document_mask_of_the_same_boundaries():
    q, k, v = qkv(T=16, seed=1)
    idx = torch.randint(2, 50, (2, 16))
    idx[0, [3, 10]], idx[1, 7] = train_gpt.BOS_ID, train_gpt.BOS_ID
    starts = [0, 3, 10, 16, 23, 32]  # every row start and every BOS of the flattened 2 x 16 tokens, then B*T
    seg = train_gpt.Segments(torch.tensor(starts, dtype=torch.int32), max_len=9)
    expected = train_gpt.attend(q, k, v, train_gpt.document_mask(idx, flex=False))
    assert torch.equal(train_gpt.attend(q, k, v, seg, flash=True), expected)


def test_cpu_runs_sdpa_and_the_plain_paths_by_default():
    rt = cpu_runtime()
    assert train_gpt.set_kernels(tiny_args(), rt) == "attention:sdpa fused_kernels:0"
    assert rt.sdpa is None  # the SDPA backend order is left alone
    x = torch.zeros(1, requires_grad=True)
    assert not train_gpt.fused(tiny_args(), x) and not train_gpt.fused(tiny_args(FUSED_KERNELS=0), x)


def test_kernel_switches_that_cannot_work_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(train_gpt, "triton", None)
    with pytest.raises(train_gpt.UserError, match="FUSED_KERNELS=1: needs triton"):
        tiny_args(FUSED_KERNELS=1)
    monkeypatch.setattr(train_gpt, "FLASH", None)
    with pytest.raises(train_gpt.UserError, match="ATTN_BACKEND='fa': needs FlashAttention"):
        tiny_args(ATTN_BACKEND="fa")


# ---- Triton kernels under the interpreter -------------------------------------------------------------------------

@pytest.fixture
def dev(monkeypatch):
    """Where the kernel runs: CUDA, or else Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA), on
    small blocks so that tiny shapes span several."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 set before triton is imported")
    monkeypatch.setattr(train_gpt, "CE_BLOCK", 16)
    return "cuda" if torch.cuda.is_available() else "cpu"


def plain_ce(z, y, cap):
    return F.cross_entropy(cap * torch.tanh(z.float() / cap), y, reduction="none")


def close(dev):
    """Tolerances: float32 throughout in the interpreter; on CUDA the model's float32 matmuls run as tf32."""
    return dict(rtol=1e-5, atol=1e-5) if dev == "cpu" else dict(rtol=2e-3, atol=2e-3)


@needs_triton
def test_softcap_ce_kernel_matches_the_plain_loss_and_gradient(dev):
    g = torch.Generator().manual_seed(0)
    N, V, cap = 5, 50, 4.0  # 50 columns: three full blocks of 16 and a masked one
    z = (torch.randn(N, V, generator=g) * 8).to(dev).requires_grad_()  # well past the cap: tanh saturates
    y, w = torch.randint(0, V, (N,), generator=g).to(dev), torch.randn(N, generator=g).to(dev)  # w: d loss per row
    loss = train_gpt.softcap_ce(z, y, cap)[0]
    ref = plain_ce(z, y, cap)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    (dz,), (dref,) = torch.autograd.grad(loss, z, w), torch.autograd.grad(ref, z, w)
    torch.testing.assert_close(dz, dref, rtol=1e-5, atol=1e-6)


class Allocations(TorchDispatchMode):
    """The shapes and dtypes of the tensors the ops inside produce, outside kernel launches (the interpreter copies
    a kernel's arguments to and from its host buffers with torch ops; a GPU launch makes no tensors)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.made, self.paused = [], False
        kernel = train_gpt.softcap_ce_kernel
        monkeypatch.setattr(train_gpt, "softcap_ce_kernel", self)
        self.launch = lambda grid: lambda *a, **k: self.unrecorded(kernel[grid], *a, **k)

    def __getitem__(self, grid):
        return self.launch(grid)

    def unrecorded(self, fn, *args, **kwargs):
        self.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # new memory only: views and detach() share their input's
            if isinstance(t, torch.Tensor) and not self.paused and t.untyped_storage().data_ptr() not in inputs:
                self.made.append((tuple(t.shape), t.dtype))
        return out


@needs_triton
def test_softcap_ce_kernel_never_makes_float32_logits(dev, monkeypatch):
    N, V, cap = 4, 40, 3.0
    y = torch.randint(0, V, (N,), device=dev)
    for dtype in (torch.float32, torch.float16):  # fp16 as autocast's logits (the interpreter mishandles bf16)
        z = torch.randn(N, V, device=dev).to(dtype).requires_grad_()
        with monkeypatch.context() as m, Allocations(m) as fused:
            loss = train_gpt.softcap_ce(z, y, cap)[0].mean()
            loss.backward()
        assert [m for m in fused.made if math.prod(m[0]) == N * V] == [((N, V), dtype)]  # only dz, in z's dtype
        with monkeypatch.context() as m, Allocations(m) as plain:
            plain_ce(z.detach().requires_grad_(), y, cap).mean().backward()
        assert sum(m == ((N, V), torch.float32) for m in plain.made) >= 3  # what the plain path makes
        torch.testing.assert_close(loss, plain_ce(z.float(), y, cap).mean(), rtol=1e-5, atol=1e-5)


@needs_triton
def test_a_model_with_fused_kernels_trains_as_the_plain_one(dev, monkeypatch):
    monkeypatch.setattr(train_gpt, "CE_BLOCK", 512)  # fewer, larger steps: the interpreter's cost is per step
    x, y = torch.randint(0, 1024, (2, 2, 8), device=dev)
    runs = []
    for fused in (0, 1):
        torch.manual_seed(0)
        args = tiny_args(FUSED_KERNELS=fused, MLP_ACT="leaky_relu2", MTP_HEADS=1, MTP_WEIGHT=0.3)
        model = train_gpt.GPT(args).to(dev)
        for name, p in model.named_parameters():  # zero-init projections would hide most gradients
            if name.endswith("proj.weight"):
                torch.nn.init.normal_(p, std=0.02)
        loss = model(x, y)
        loss.backward()
        with torch.no_grad():  # evaluation: the plain path whatever FUSED_KERNELS says
            nats = model(x, y, per_token=True)
        runs.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, nats))
    (l0, g0, n0), (l1, g1, n1) = runs
    torch.testing.assert_close(l1, l0, **close(dev))
    assert g0.keys() == g1.keys()
    for n in g0:
        scale = 1 + g0[n].abs().max().item()
        torch.testing.assert_close(g1[n] / scale, g0[n] / scale, **close(dev), msg=n)
    assert torch.equal(n0, n1)


@needs_triton
def test_the_fused_loss_traces_into_one_compiled_graph(dev, monkeypatch):
    """softcap_ce is a custom op (opaque to the compiler, as the records' CE): torch.compile(fullgraph=True) traces
    it through its fake and autograd registrations and gives the eager loss and gradient."""
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(6, 50, generator=g) * 8).to(dev).requires_grad_()
    y = torch.randint(0, 50, (6,), generator=g).to(dev)
    f = lambda z, y: train_gpt.softcap_ce(z * 1.5, y, 4.0)[0].mean()
    ref = f(z, y)
    (dref,) = torch.autograd.grad(ref, z)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(z, y)
    (dz,) = torch.autograd.grad(compiled, z)
    torch.testing.assert_close(compiled, ref, rtol=0, atol=0)
    torch.testing.assert_close(dz, dref, rtol=0, atol=0)
    torch.testing.assert_close(ref, plain_ce(z * 1.5, y, 4.0).mean(), rtol=1e-5, atol=1e-5)
