"""Speed by construction (issue 18), checked on CPU: each change leaves the numbers as they were. The bf16 residual
stream is CUDA's alone; evaluation computes logits only where a window scores; every eval graph is compiled while
priming; GPTQ's reserve is measured; bench/gpu_check.py runs end to end at tiny shapes."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_runtime, tiny_args
import train_gpt


def tokens(args, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(args.vocab_size, (rows, args.train_seq_len), generator=g)
    x[:, ::7] = train_gpt.BOS_ID
    return x, torch.randint(args.vocab_size, x.shape, generator=g)


def embed_before(self, idx, ctx):
    """GPT.embed as it was before the residual stream had a dtype of its own."""
    x = self.tok_emb(idx)
    if self.bigram is not None:
        x = x + self.bigram(idx, ctx)
    x = F.rms_norm(x, (x.size(-1),))
    return x if self.smear is None else self.smear(x, idx)


def trained_like(args, seed=0):
    """A model whose zero-initialised pieces (projections, gates, bigram) are random too, so every path matters."""
    torch.manual_seed(seed)
    base, _ = train_gpt.build_model(args, cpu_runtime())
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base


@pytest.mark.parametrize("looping", [False, True])
def test_cpu_residual_stream_is_float32_and_bit_identical(monkeypatch, looping):
    args = tiny_args(SMEAR_GATE_ENABLED=1, SPARSE_ATTN_GATE_ENABLED=1, MTP_HEADS=1, MTP_WEIGHT=0.3)
    assert cpu_runtime().act_dtype == torch.float32
    base = trained_like(args)
    assert base.act_dtype == torch.float32
    x, y = tokens(args)
    ctx = train_gpt.Ctx(looping=looping)
    now = base(x, y, ctx=ctx), base(x, y, ctx=ctx, per_token=True)
    monkeypatch.setattr(train_gpt.GPT, "embed", embed_before)
    before = base(x, y, ctx=ctx), base(x, y, ctx=ctx, per_token=True)
    assert all(torch.equal(a, b) for a, b in zip(now, before))


def test_bf16_residual_stream_stays_bf16_and_near_float32():
    """What CUDA gets (act_dtype bf16, here without autocast, so everything runs in bf16): the embedding output and
    every lane of every block output are bf16, the logits float32 (soft-capped in float32), and the loss is close to
    the float32 one."""
    args = tiny_args(SMEAR_GATE_ENABLED=1)
    base = trained_like(args)
    x, y = tokens(args)
    fp32 = base(x, y, per_token=True)
    base.act_dtype = torch.bfloat16
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, out: seen.extend(t.dtype for t in out)) for b in base.blocks]
    bf16 = base(x, y, per_token=True)
    for h in hooks:
        h.remove()
    assert base.embed(x, train_gpt.PLAIN).dtype == torch.bfloat16
    assert len(seen) >= len(base.blocks) and set(seen) == {torch.bfloat16}
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert float(bf16.detach().mean()) == pytest.approx(float(fp32.detach().mean()), rel=2e-2)
