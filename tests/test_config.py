"""Configuration: presets, explicit overrides, and one-line errors for malformed or misspelled variables."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
import train_gpt

H = train_gpt.Hyperparameters


def test_baseline_preset_is_the_upstream_baseline():
    a = H.from_env({"PRESET": "baseline"})
    assert (a.num_layers, a.model_dim, a.num_heads, a.num_kv_heads, a.mlp_mult) == (9, 512, 8, 4, 2.0)
    assert (a.train_seq_len, a.train_batch_tokens, a.iterations, a.warmdown_iters) == (1024, 524288, 20000, 1200)
    assert (a.matrix_lr, a.scalar_lr, a.tied_embed_lr, a.muon_momentum, a.muon_momentum_warmup_start) == \
        (0.04, 0.04, 0.05, 0.95, 0.85)
    assert a.eval_stride == 0 and a.warmdown_frac == 0 and not (a.qat or a.swa or a.ema_decay)
    assert not (a.smear_gate or a.bigram_buckets or a.ortho_init) and a.muon_wd == a.adam_wd == a.grad_clip_norm == 0
    assert (a.quant_attn_bits, a.quant_mlp_bits, a.compressor, a.compress_level) == (8, 8, "zlib", 9)
    assert train_gpt.artifact_label(a) == "int8_zlib"


def test_seed162_preset_matches_the_record():
    a = H.from_env({"PRESET": "seed162"})
    assert (a.num_layers, a.mlp_mult, a.train_seq_len, a.train_batch_tokens, a.warmdown_iters) == (9, 3.0, 2048, 786432, 3000)
    assert (a.matrix_lr, a.scalar_lr, a.tied_embed_lr) == (0.02, 0.02, 0.03)
    assert (a.muon_momentum_warmup_start, a.muon_momentum, a.muon_momentum_warmup_steps) == (0.92, 0.99, 1500)
    assert (a.muon_wd, a.adam_wd, a.grad_clip_norm) == (0.04, 0.01, 0.3)
    assert a.smear_gate and (a.bigram_buckets, a.bigram_dim) == (4096, 128) and a.ortho_init
    assert a.swa and a.swa_every == 50 and not a.qat and a.eval_stride == 64
    assert (a.quant_attn_bits, a.quant_mlp_bits, a.compressor, a.compress_level) == (6, 6, "zstd", 22)


def test_default_stack_and_explicit_env_wins():
    a = H.from_env({})
    assert a.preset == "default" and a.num_layers == 11 and a.mlp_mult == 3.0 and a.ema_decay == 0.997 and a.qat
    assert not a.swa and a.warmdown_frac == 0.5
    b = H.from_env({"PRESET": "seed162", "NUM_LAYERS": "7", "SWA": "0", "MATRIX_LR": "0.5", "TIE_EMBEDDINGS": "false"})
    assert (b.num_layers, b.swa, b.matrix_lr, b.tie_embeddings, b.mlp_mult) == (7, False, 0.5, False, 3.0)


@pytest.mark.parametrize("key,value", [("NUM_LAYERS", "abc"), ("TIE_EMBEDDINGS", "maybe"), ("MATRIX_LR", ""),
                                       ("ITERATIONS", "1.5"), ("QAT", "2")])
def test_malformed_values_name_the_variable(key, value):
    with pytest.raises(train_gpt.UserError, match=f"^{key}="):
        H.from_env({key: value})


@pytest.mark.parametrize("typo,meant", [("NUM_LAYER", "NUM_LAYERS"), ("MATRIX_LRR", "MATRIX_LR"),
                                        ("EVAL_STRIDES", "EVAL_STRIDE"), ("MUON_MOMENTUM_WARMUP", None),
                                        ("QUANT_BITS", None), ("TRAIN_SEQLEN", "TRAIN_SEQ_LEN")])
def test_misspelled_variables_are_rejected(typo, meant):
    with pytest.raises(train_gpt.UserError, match=f"unknown environment variable {typo}") as e:
        H.from_env({typo: "1"})
    if meant:
        assert f"did you mean {meant}?" in str(e.value)


def test_other_programs_variables_are_accepted():
    env = {k: "1" for k in ("PATH", "HOME", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                            "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTHONPATH", "CI", "MAX_JOBS",
                            "TORCHELASTIC_RUN_ID", "NCCL_DEBUG", "LANG", "TERM", "USER", "SHELL", "PWD")}
    H.from_env(env)
    H.from_env(dict(os.environ))


@pytest.mark.parametrize("env,var", [({"PRESET": "best"}, "PRESET"), ({"NUM_HEADS": "7"}, "NUM_HEADS"),
                                     ({"SWA": "1", "EMA_DECAY": "0.9"}, "EMA_DECAY"),
                                     ({"QUANT_MLP_BITS": "9"}, "QUANT_MLP_BITS"), ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
                                     ({"COMPRESSOR": "lzma"}, "COMPRESSOR"), ({"ITERATIONS": "0"}, "ITERATIONS")])
def test_invalid_combinations_are_rejected(env, var):
    with pytest.raises(train_gpt.UserError, match=var):
        H.from_env(env)


def test_main_prints_one_line_and_fails():
    env = dict(os.environ, NUM_LAYER="3")
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith("train_gpt.py: error: unknown environment variable NUM_LAYER") and "\n" not in err, err
