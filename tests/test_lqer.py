"""LQER: a low-rank, low-bit correction of the worst-quantized matrices, stored beside their codes."""
import dataclasses

import pytest
import torch

from conftest import tiny_args
import train_gpt


def setup(**kw):
    args = tiny_args(MODEL_DIM=320, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=2, BIGRAM_BUCKETS=0, LQER_ENABLED=1,
                     LQER_RANK=4, LQER_TOP_K=3, **kw)
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if p.ndim == 2 and n.startswith("blocks.0.mlp"):  # low-rank structure: what LQER is for
                p.add_(torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]) * 0.5)
    return train_gpt.export_state(model), args


def test_lqer_factor_widths_and_a_hand_checked_correction():
    g = torch.Generator().manual_seed(0)
    err = torch.randn(96, 3, generator=g) @ torch.randn(3, 128, generator=g) + 0.01 * torch.randn(96, 128, generator=g)
    f = train_gpt.lqer_factors(err, 4)
    assert f["lqer_a"].shape == (96, 4) and int(f["lqer_a"].abs().max()) <= 1  # int2: -1, 0, 1
    assert f["lqer_a_scale"].shape == (1, 1) and f["lqer_a_scale"].dtype == torch.float16  # one scale for A
    assert f["lqer_b"].shape == (4, 128) and int(f["lqer_b"].abs().max()) <= 7  # int4
    assert f["lqer_group"] == 64 and f["lqer_b_scale"].shape == (8, 1)  # one scale per 64 columns of each row
    A = f["lqer_a"].float() * f["lqer_a_scale"].float()
    B = (f["lqer_b"].float().reshape(-1, 64) * f["lqer_b_scale"].float()).reshape(4, 128)
    assert torch.equal(train_gpt.lqer_correction(f), A @ B)
    assert (err - A @ B).norm() < 0.5 * err.norm()  # a rank-3 error is mostly removed, even at int2/int4


def test_lqer_reduces_the_error_of_exactly_the_top_k_tensors():
    state, args = setup()
    off = dataclasses.replace(args, lqer_enabled=False)
    q_off, q_on = train_gpt.quantize_state(state, off), train_gpt.quantize_state(state, args)
    errs = {n: float((state[n] - train_gpt.dequantize_entry(e)).norm()) for n, e in q_off.items() if "q" in e}
    top = sorted(errs, key=lambda n: -errs[n])[:3]
    touched = [n for n, e in q_on.items() if "lqer_a" in e]
    assert sorted(touched) == sorted(top)
    for n in touched:
        after = float((state[n] - train_gpt.dequantize_entry(q_on[n])).norm())
        assert after < errs[n], n
        assert torch.equal(q_on[n]["q"], q_off[n]["q"])  # the codes are unchanged; the correction is added
    assert "blocks.0.mlp.fc.weight" in touched  # the low-rank-perturbed matrices have the largest errors


@pytest.mark.parametrize("compressor", ["zstd", "constriction"])
def test_lqer_survives_the_artifact_round_trip(compressor):
    if compressor == "constriction":
        pytest.importorskip("constriction")
    state, args = setup(COMPRESSOR=compressor)
    q = train_gpt.quantize_state(state, args)
    out = train_gpt.unpack(train_gpt.pack(q, args))[0]
    for n, e in q.items():
        assert out[n].keys() == e.keys(), n
        for k, v in e.items():
            assert torch.equal(v, out[n][k]) if isinstance(v, torch.Tensor) else v == out[n][k], (n, k)
    back = train_gpt.dequantize_state(out)
    for n, w in train_gpt.dequantize_state(q).items():
        assert torch.equal(w, back[n]), n
