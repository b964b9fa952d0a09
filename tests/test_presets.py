"""Preset fidelity: PRESET=seed162 and PRESET=baseline reproduce their records' code (where a record's README and
code disagree, the code is what scored). Each item against a hand computation; the SWA window of #162 is pinned in
test_averaging.py (swa-162-lr-below-half), the parameter count in test_config.py."""
import math

import numpy as np
import pytest
import torch

import train_gpt

H = train_gpt.Hyperparameters


def is_orthogonal(w, gain=1.0):
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.allclose(gram, gain ** 2 * torch.eye(gram.size(0)), atol=1e-4)


def test_seed162_init_leaves_block_outputs_zero_and_scales_only_the_bigram_projection():
    """#162's _init_weights checks _zero_init first, so attn.proj and mlp.proj stay zero; only bigram.proj
    (128x512, not _zero_init) gets orthogonal x 1/sqrt(2 x 9 layers)."""
    torch.manual_seed(0)
    model = train_gpt.GPT(H.from_env({"PRESET": "seed162"}))
    for block in model.blocks:
        assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.proj.weight.abs().sum() == 0
        for m in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
            assert is_orthogonal(m.weight.detach())
    assert is_orthogonal(model.bigram.proj.weight.detach(), gain=1 / math.sqrt(18))
    assert model.bigram.embed.weight.abs().sum() == 0 and model.bigram.scale.item() == pytest.approx(0.05)


def outlier_rows(rows=8, cols=1536, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, 7] = 0.3  # one outlier per row: clip search would cut it, row-max keeps it
    return w


def test_seed162_export_is_plain_row_max_over_31():
    args = H.from_env({"PRESET": "seed162"})
    assert not args.quant_clip_search
    w = outlier_rows(rows=64)  # 64 x 1536 > 65,536 elements: quantized, not kept
    e = train_gpt.quantize_state({"blocks.0.mlp.fc.weight": w}, args)["blocks.0.mlp.fc.weight"]
    scale = (w.abs().amax(dim=1, keepdim=True) / 31).half()
    assert e["bits"] == 6 and torch.equal(e["scale"], scale)
    assert torch.equal(e["q"], (w / scale.float()).round().clamp(-31, 31).to(torch.int8))
    searched = train_gpt.quantize_state({"blocks.0.mlp.fc.weight": w}, H.from_env({}))["blocks.0.mlp.fc.weight"]
    assert not torch.equal(searched["scale"], scale)  # the default stack's clip search does differ


def upstream_int8_by_hand(w):
    """Upstream quantize_float_tensor, per row in numpy: clip at the 99.99984th percentile of |w| (linear
    interpolation), scale = max(clip / 127, 1/127) in fp32 for rounding, stored as fp16."""
    w = w.double().numpy()
    clip = np.quantile(np.abs(w), 0.9999984, axis=1, keepdims=True)
    scale = np.maximum(clip / 127, 1 / 127).astype(np.float32)
    q = np.clip(np.round(np.clip(w, -clip, clip).astype(np.float32) / scale), -127, 127).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(scale).half()


@pytest.mark.parametrize("preset,name", [("baseline", "blocks.0.mlp.fc.weight"), ("baseline", "tok_emb.weight"),
                                         ("seed162", "bigram.embed.weight")])
def test_int8_tensors_use_upstreams_quantizer_with_its_scale_floor(preset, name):
    args = H.from_env({"PRESET": preset})
    w = outlier_rows(rows=300, cols=512)
    w[:100] *= 0.01  # rows whose clip / 127 falls below the 1/127 floor
    e = train_gpt.quantize_state({name: w}, args)[name]
    q, scale = upstream_int8_by_hand(w)
    assert e["bits"] == 8
    assert torch.equal(e["scale"], scale) and (e["scale"][:100] == torch.tensor(1 / 127).half()).all()
    assert torch.equal(e["q"], q)


def test_default_stack_int8_has_no_floor():
    w = outlier_rows(rows=300, cols=512) * 0.01
    e = train_gpt.quantize_state({"bigram.embed.weight": w}, H.from_env({}))["bigram.embed.weight"]
    assert (e["scale"].float() < 1 / 127).all()


def test_baseline_keeps_control_tensors_in_fp32_and_seed162_in_fp16():
    state = {"blocks.0.attn_scale": torch.rand(512), "blocks.0.resid_mix": torch.rand(2, 512),
             "skip_weights": torch.rand(4, 512), "blocks.0.attn.q_gain": torch.rand(8)}
    base = train_gpt.quantize_state(state, H.from_env({"PRESET": "baseline"}))
    seed = train_gpt.quantize_state(state, H.from_env({"PRESET": "seed162"}))
    for name, t in state.items():
        assert base[name]["raw"].dtype == torch.float32 and torch.equal(base[name]["raw"], t), name
        assert seed[name]["raw"].dtype == torch.float16, name


@pytest.mark.parametrize("preset", [p for p in train_gpt.PRESETS if p != "default"])
def test_every_preset_runs_by_name(preset, markov_data):
    """Each named system trains, exports, reloads and scores at the tiny shape (the default is run elsewhere), on the
    generated plain-tokenizer data (so CaseOps off: tests/test_caseops.py runs CaseOps data)."""
    from conftest import cpu_runtime, tiny_env
    env = tiny_env(**markov_data, PRESET=preset, ITERATIONS=3, VAL_MAX_TOKENS=256, GPTQ_CALIBRATION_BATCHES=1,
                   TRAIN_LOG_EVERY=0, RUN_ID=f"smoke_{preset}", CASEOPS_ENABLED=0)
    s = train_gpt.run(H.from_env(env), cpu_runtime())
    assert math.isfinite(s["final"]["val_loss"]) and s["config"]["preset"] == preset
