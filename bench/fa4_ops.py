"""FlashAttention 4 as torch custom ops: a stand-in for train_gpt.FLASH that torch.compile's full graph takes.

train_gpt.py imports only FA3's `flash_attn_interface`, whose functions are custom ops. FA4's public functions
(`flash_attn.cute.interface`, package flash-attn-4) are an autograd.Function that dynamo refuses inside a full graph,
so a compiled step cannot call them. This module wraps FA4's forward and backward (its `_flash_attn_fwd` and
`_flash_attn_bwd`, the functions its own autograd.Function calls) as two opaque ops with shape-only fake kernels and
an autograd formula, and offers the two calls train_gpt.attend makes (`flash_attn_func`, `flash_attn_varlen_func`),
so gpu_check.py's `step` stage with `--flash fa4` can time the default's compiled step with a FlashAttention-class
kernel on a machine without FA3. Bench code, not counted: if it pays, the same wrapper would have to move into
train_gpt.py.

FA4 is flash-attn-4's interface module, or None. KERNELS holds the two functions the ops run: FA4's, which need
CUDA; tests/test_fa4_ops.py puts float32 reference math in their place on CPU, so the op plumbing (schemas, fakes,
autograd, a full graph) is checked without a GPU. Layouts are FlashAttention's: q [B, T, H, hd] (or [total, H, hd]
with cu_seqlens), k and v with H or fewer heads (GQA), the log-sum-exp [B, H, T] (or [H, total]).
"""
from typing import Optional

import torch
from torch import Tensor

try:
    from flash_attn.cute import interface as FA4
except (ImportError, OSError, RuntimeError):  # none, or a broken install (bench/fa4_carry.sh packs it for the device)
    FA4 = None


def _fa4_forward(q, k, v, cu, max_len):
    out, lse, *_ = FA4._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                        max_seqlen_k=max_len, causal=True, return_lse=True)
    return out, lse


def _fa4_backward(dout, q, k, v, out, lse, cu, max_len):
    dq, dk, dv, *_ = FA4._flash_attn_bwd(q, k, v, out, dout, lse, None, True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                          max_seqlen_q=max_len, max_seqlen_k=max_len)
    return dq, dk, dv


KERNELS = {"forward": _fa4_forward, "backward": _fa4_backward}


@torch.library.custom_op("fa4_bench::forward", mutates_args=())
def forward_op(q: Tensor, k: Tensor, v: Tensor, cu: Optional[Tensor], max_len: int) -> tuple[Tensor, Tensor]:
    out, lse = KERNELS["forward"](q, k, v, cu, max_len if cu is not None else None)
    return out.contiguous(), lse.contiguous()  # the fakes' layout, whatever the kernel's (a no-op for FA4's)


@forward_op.register_fake
def _(q, k, v, cu, max_len):
    lse = q.new_empty((q.size(1), q.size(0)) if cu is not None else (q.size(0), q.size(2), q.size(1)),
                      dtype=torch.float32)
    return q.new_empty(q.shape), lse


@torch.library.custom_op("fa4_bench::backward", mutates_args=())
def backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu: Optional[Tensor],
                max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    grads = KERNELS["backward"](dout.contiguous(), q, k, v, out, lse, cu, max_len if cu is not None else None)
    return tuple(g.contiguous() for g in grads)


@backward_op.register_fake
def _(dout, q, k, v, out, lse, cu, max_len):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu, ctx.max_len = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    return (*backward_op(dout, q, k, v, out, lse, cu, ctx.max_len), None, None)


forward_op.register_autograd(_backward, setup_context=_setup)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """Causal attention over q, k, v [B, T, H, hd] (FA3's call as train_gpt.attend makes it)."""
    assert causal
    return forward_op(q, k, v, None, 0)[0]


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True) -> Tensor:
    """Causal attention within the segments cu_seqlens of q, k, v [total, H, hd] (FA3's varlen call)."""
    assert causal and max_seqlen_q == max_seqlen_k  # self-attention: the keys' segments are the queries'
    return forward_op(q, k, v, cu_seqlens_q, max_seqlen_q)[0]
