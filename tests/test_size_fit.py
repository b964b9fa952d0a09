"""TARGET_BYTES: the bisection over the matrix SDClip k converges and never writes an artifact over the target."""
import re

import pytest
import torch

from conftest import tiny_args
import train_gpt

pytest.importorskip("constriction")


class Lines(list):
    def __call__(self, msg):
        self.append(msg)


def setup(**kw):
    args = tiny_args(COMPRESSOR="constriction", MODEL_DIM=320, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=1,
                     MATRIX_CLIP_SIGMAS=12.85, MATRIX_BITS=6, EMBED_BITS=8, FP16_KEEP_PATTERNS="",
                     TARGET_BYTES=10**7, LQER_ENABLED=0, EMBED_CLIP_SIGMAS=20, **kw)
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return train_gpt.export_state(model), args


def size_at(state, args, k):
    return len(train_gpt.pack(train_gpt.quantize_state(state, args, matrix_sigmas=k), args))


def trials(log):
    return [(float(m[1]), int(m[2]), m[3]) for m in
            (re.search(r"matrix_clip_sigmas:([\d.]+) bytes_model:(\d+) .* (fits|over)$", l) for l in log
             if l.startswith("size_fit trial:")) if m]


def test_size_falls_as_k_grows():
    state, args = setup()
    sizes = [size_at(state, args, k) for k in (4, 8, 12.85, 24, 48)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 1.5 * sizes[-1]


@pytest.mark.parametrize("where", [0.3, 0.7])
def test_fit_converges_to_the_smallest_k_that_fits_and_never_exceeds(where):
    state, args = setup()
    code = 1000
    small, big = size_at(state, args, 48.0), size_at(state, args, 4.0)
    args.target_bytes = code + int(small + where * (big - small))
    log = Lines()
    blob, fit = train_gpt.fit_artifact(state, args, None, code, log)
    assert len(blob) + code <= args.target_bytes and fit["fits"] and fit["bytes_total"] == len(blob) + code
    t = trials(log)
    assert len(t) == 2 + train_gpt.FIT_BISECTIONS and [x[2] for x in t[:2]] == ["fits", "over"]
    fits = [k for k, _, v in t if v == "fits"]
    over = [k for k, _, v in t if v == "over"]
    chosen = float(re.search(r"size_fit: fits matrix_clip_sigmas:([\d.]+)", log[-1])[1])
    assert fit["matrix_clip_sigmas"] == pytest.approx(chosen, abs=1e-4) and fit["trials"] == len(t)
    assert chosen == pytest.approx(min(fits), abs=1e-4) and max(over) < chosen
    assert chosen / max(over) < 1.03  # converged: the bracket is under 3% wide
    assert len(blob) == [b for k, b, v in t if abs(k - chosen) < 1e-4][0]  # the written blob is the fitted trial's
    for k, b, v in t:  # every trial logged its real size and verdict
        assert (b + code <= args.target_bytes) == (v == "fits")


def test_everything_fits_takes_the_finest_k_and_nothing_fits_says_so():
    state, args = setup()
    log = Lines()
    blob, _ = train_gpt.fit_artifact(state, args, None, 0, log)  # TARGET_BYTES 10 MB: even k = 4 fits
    assert [k for k, _, _ in trials(log)] == [48.0, 4.0] and len(blob) == size_at(state, args, 4.0)
    args.target_bytes = 100
    log = Lines()
    blob, fit = train_gpt.fit_artifact(state, args, None, 0, log)
    assert len(trials(log)) == 1 and any(l.startswith("WARNING: SIZE FIT FAILED") for l in log)
    assert len(blob) == size_at(state, args, 48.0)
    assert not fit["fits"] and fit["matrix_clip_sigmas"] is None and "size_fit: FAILED" in log[-1]


def test_a_fit_with_nothing_to_move_says_so_and_runs_no_trial():
    """Matrices of at most 65,536 weights are kept in fp16: no k moves anything, with GPTQ on or off (the fit used to
    run its trials anyway, every one of the same size, and report the floor k)."""
    for gptq in (0, 1):
        args = tiny_args(GPTQ=gptq, TARGET_BYTES=10_000_000)
        state = train_gpt.export_state(train_gpt.GPT(args))
        log = Lines()
        blob, fit = train_gpt.fit_artifact(state, args, None, 0, log)
        assert trials(log) == [] and any("nothing to fit" in l for l in log)
        assert fit == dict(target_bytes=10_000_000, bytes_total=len(blob), fits=True, matrix_clip_sigmas=None, trials=0)


def test_only_the_block_matrices_move_with_the_fitted_k():
    state, args = setup(ATTN_CLIP_SIGMAS=13.0, MLP_CLIP_SIGMAS=10.0)
    assert train_gpt.export_sigmas("blocks.0.attn.c_q.weight", args, 25.7) == pytest.approx(26.0)
    assert train_gpt.export_sigmas("blocks.0.mlp.fc.weight", args, 25.7) == pytest.approx(20.0)
    assert train_gpt.export_sigmas("tok_emb.weight", args, 25.7) == 20.0  # EMBED_CLIP_SIGMAS stays
    assert train_gpt.export_sigmas("lm_head.weight", args, 25.7) == 25.7
