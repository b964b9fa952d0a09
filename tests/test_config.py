"""Configuration: presets, explicit overrides, one-line errors for malformed, misspelled or inconsistent variables."""
import dataclasses
import os
import subprocess
import sys

import pytest

from conftest import ROOT
import train_gpt

H = train_gpt.Hyperparameters


def n_params(args):
    return sum(t.numel() for t in train_gpt.GPT(args).state_dict().values())


def test_baseline_preset_is_the_upstream_baseline():
    a = H.from_env({"PRESET": "baseline"})
    assert a.preset == "baseline"
    assert (a.num_layers, a.model_dim, a.num_heads, a.num_kv_heads, a.mlp_mult, a.vocab_size) == \
        (9, 512, 8, 4, 2.0, 1024)
    assert (a.tie_embeddings, a.rope_base, a.logit_softcap, a.qk_gain_init, a.tied_embed_init_std) == \
        (True, 10000.0, 30.0, 1.5, 0.005)
    assert (a.train_seq_len, a.train_batch_tokens, a.iterations, a.warmdown_iters, a.warmup_steps) == \
        (1024, 524288, 20000, 1200, 20)
    assert (a.max_wallclock_seconds, a.val_batch_size, a.val_loss_every, a.train_log_every, a.seed) == \
        (600.0, 524288, 1000, 200, 1337)
    assert (a.embed_lr, a.head_lr, a.tied_embed_lr, a.matrix_lr, a.scalar_lr) == (0.6, 0.008, 0.05, 0.04, 0.04)
    assert (a.muon_momentum, a.muon_backend_steps, a.muon_momentum_warmup_start, a.muon_momentum_warmup_steps) == \
        (0.95, 5, 0.85, 500)
    assert (a.beta1, a.beta2, a.adam_eps) == (0.9, 0.95, 1e-8)
    assert a.eval_stride == 0  # no sliding window
    assert a.warmdown_frac == 0 and not (a.qat or a.swa or a.ema_decay or a.normuon)
    assert not (a.smear_gate or a.bigram_buckets or a.ortho_init or a.mtp_heads)
    assert a.muon_wd == a.adam_wd == a.grad_clip_norm == 0
    assert (a.quant_attn_bits, a.quant_mlp_bits, a.quant_other_bits, a.quant_clip_search, a.fp16_keep_patterns) == \
        (8, 8, 8, False, "")
    assert (a.compressor, a.compress_level) == ("zlib", 9)
    assert train_gpt.artifact_label(a) == "int8_zlib"
    assert n_params(a) == 17_059_912  # the upstream baseline's parameter count (reference.md section 3)


def test_seed162_preset_matches_the_record():
    a = H.from_env({"PRESET": "seed162"})
    assert (a.num_layers, a.model_dim, a.num_heads, a.num_kv_heads, a.mlp_mult) == (9, 512, 8, 4, 3.0)
    assert (a.train_seq_len, a.train_batch_tokens, a.warmdown_iters) == (2048, 786432, 3000)
    assert (a.matrix_lr, a.scalar_lr, a.tied_embed_lr) == (0.02, 0.02, 0.03)
    assert (a.muon_momentum_warmup_start, a.muon_momentum, a.muon_momentum_warmup_steps) == (0.92, 0.99, 1500)
    assert (a.muon_wd, a.adam_wd, a.grad_clip_norm) == (0.04, 0.01, 0.3)
    assert a.smear_gate and (a.bigram_buckets, a.bigram_dim) == (4096, 128) and a.ortho_init
    assert a.swa and a.swa_every == 50 and a.ema_decay == 0 and not a.qat
    assert (a.eval_stride, a.eval_batch_seqs) == (64, 32)
    assert (a.quant_attn_bits, a.quant_mlp_bits, a.compressor, a.compress_level) == (6, 6, "zstd", 22)
    assert train_gpt.matches_any("blocks.8.attn.c_k.weight", a.fp16_keep_patterns)  # #162 keeps it in fp16
    assert train_gpt.matches_any("tok_emb.weight", a.fp16_keep_patterns)
    assert n_params(a) == 22_368_841  # as #162's log prints


def test_default_preset_is_frontier2135_with_our_export():
    """PRESET=frontier2135 (PR #2135's code, pinned by tests/test_golden.py) with our size fit and measured reserve."""
    a, f = H.from_env({}), H.from_env({"PRESET": "frontier2135"})
    assert a.preset == "default"
    differ = {x.name for x in dataclasses.fields(a) if getattr(a, x.name) != getattr(f, x.name)}
    assert differ == {"preset", "target_bytes", "gptq_reserve_seconds", "ema_warmup"}
    assert (a.target_bytes, a.gptq_reserve_seconds, f.target_bytes, a.ema_warmup, f.ema_warmup) == \
        (15_990_000, -1, 0, True, False)
    assert (a.compressor, a.gptq, a.caseops_enabled, a.train_loader, a.ttt_mode) == \
        ("constriction", True, True, "packed", "lora")
    assert (a.eval_seq_len, a.ttt_eval_seq_len, a.train_seq_len) == (2560, 2560, 2048)  # #2135's logged values
    assert a.ngram_tilt_enabled and a.asym_logit_rescale and a.val_loss_every == 0
    assert H.from_env({"PRESET": "default"}) == a


def test_explicit_env_wins_over_the_preset():
    b = H.from_env({"PRESET": "seed162", "NUM_LAYERS": "7", "SWA": "0", "MATRIX_LR": "0.5", "TIE_EMBEDDINGS": "false"})
    assert (b.num_layers, b.swa, b.matrix_lr, b.tie_embeddings) == (7, False, 0.5, False)
    assert (b.mlp_mult, b.scalar_lr, b.bigram_buckets) == (3.0, 0.02, 4096)  # the rest of the preset stays
    c = H.from_env({"EMA_DECAY": "0", "QAT": "0", "EVAL_STRIDE": "0", "COMPRESSOR": "zlib", "COMPRESS_LEVEL": "9",
                    "MLP_MULT": "2.5"})
    assert (c.ema_decay, c.qat, c.eval_stride, c.compressor, c.mlp_mult, c.num_layers) == \
        (0.0, False, 0, "zlib", 2.5, 11)
    d = H.from_env({"PRESET": "baseline", "EVAL_STRIDE": "64", "QUANT_MLP_BITS": "6"})
    assert (d.eval_stride, d.quant_mlp_bits, d.quant_attn_bits) == (64, 6, 8)


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("True", True), (" TRUE ", True),
                                            ("0", False), ("false", False), ("FALSE", False)])
def test_booleans_accept_0_1_true_false(value, expected):
    assert H.from_env({"TIE_EMBEDDINGS": value}).tie_embeddings is expected


@pytest.mark.parametrize("key,value", [("NUM_LAYERS", "abc"), ("TIE_EMBEDDINGS", "maybe"), ("MATRIX_LR", ""),
                                       ("ITERATIONS", "1.5"), ("QAT", "2"), ("SWA", "yes"), ("EMA_DECAY", "0.9x")])
def test_malformed_values_name_the_variable(key, value):
    with pytest.raises(train_gpt.UserError, match=f"^{key}=") as e:
        H.from_env({key: value})
    assert repr(value) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("typo,meant", [("NUM_LAYER", "NUM_LAYERS"), ("MATRIX_LRR", "MATRIX_LR"),
                                        ("EVAL_STRIDES", "EVAL_STRIDE"), ("TRAIN_SEQLEN", "TRAIN_SEQ_LEN"),
                                        ("LOGDIR", "LOG_DIR"), ("TIE_EMBEDDING", "TIE_EMBEDDINGS")])
def test_misspelled_variables_are_rejected_with_a_suggestion(typo, meant):
    with pytest.raises(train_gpt.UserError, match=f"unknown environment variable {typo} ") as e:
        H.from_env({typo: "1"})
    assert f"(did you mean {meant}?)" in str(e.value)


def test_ambiguous_near_miss_suggests_one_of_the_candidates():
    with pytest.raises(train_gpt.UserError, match="unknown environment variable MUON_MOMENTUM_WARMUP ") as e:
        H.from_env({"MUON_MOMENTUM_WARMUP": "1"})
    assert "did you mean MUON_MOMENTUM_WARMUP_STEPS?" in str(e.value) or \
        "did you mean MUON_MOMENTUM_WARMUP_START?" in str(e.value)


@pytest.mark.parametrize("name", ["QUANT_BITS", "BIGRAM_SIZE", "EVAL_WINDOW", "MUON_LR"])
def test_unknown_names_in_our_families_are_rejected(name):
    with pytest.raises(train_gpt.UserError, match=f"unknown environment variable {name}"):
        H.from_env({name: "1"})


OTHER_PROGRAMS = ("PATH", "HOME", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                  "PYTHONPATH", "PYTHONHASHSEED", "CI", "MAX_JOBS", "TORCHELASTIC_RUN_ID", "NCCL_DEBUG",
                  "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_CUDA_ALLOC_CONF", "TOKENIZERS_PARALLELISM", "HF_HOME",
                  "WANDB_PROJECT", "SLURM_PROCID", "GITHUB_RUN_ID", "VIRTUAL_ENV", "LANG", "TERM", "USER", "SHELL",
                  "PWD", "XDG_RUNTIME_DIR", "WAYLAND_DISPLAY")


def test_other_programs_variables_are_accepted():
    a = H.from_env({k: "1" for k in OTHER_PROGRAMS})
    assert a == H.from_env({})
    H.from_env(dict(os.environ))  # what main() sees in this very process


def test_desktop_session_variables_are_accepted():
    H.from_env({"SWAYSOCK": "/run/user/1000/sway-ipc.1000.1234.sock"})


@pytest.mark.parametrize("env,var", [({"PRESET": "best"}, "PRESET"), ({"PRESET": ""}, "PRESET"),
                                     ({"NUM_HEADS": "7"}, "NUM_HEADS"), ({"MODEL_DIM": "500"}, "NUM_HEADS"),
                                     ({"SWA": "1", "EMA_DECAY": "0.9"}, "EMA_DECAY"),
                                     ({"PRESET": "seed162", "EMA_DECAY": "0.99"}, "EMA_DECAY"),
                                     ({"EMA_DECAY": "1.0"}, "EMA_DECAY"),
                                     ({"QUANT_MLP_BITS": "9"}, "QUANT_MLP_BITS"),
                                     ({"QUANT_ATTN_BITS": "1"}, "QUANT_ATTN_BITS"),
                                     ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
                                     ({"MODEL_DIM": "24", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"}, "MODEL_DIM"),
                                     ({"NUM_LAYERS": "0"}, "NUM_LAYERS"), ({"COMPRESSOR": "lzma"}, "COMPRESSOR"),
                                     ({"ITERATIONS": "0"}, "ITERATIONS"), ({"TRAIN_SEQ_LEN": "0"}, "TRAIN_SEQ_LEN"),
                                     ({"BIGRAM_BUCKETS": "1"}, "BIGRAM_BUCKETS"),
                                     ({"EVAL_STRIDE": "-1"}, "EVAL_STRIDE")])
def test_invalid_values_and_combinations_are_rejected(env, var):
    with pytest.raises(train_gpt.UserError, match=var) as e:
        H.from_env(env)
    assert "\n" not in str(e.value)


def test_ttt_chunk_size_is_checked_only_where_lora_ttt_runs():
    """TTT_CHUNK_SIZE bounds LoRA TTT's chunks; with TTT off (or in SGD mode) it is never read, so any size passes."""
    big = {"TTT_CHUNK_SIZE": "100000"}
    with pytest.raises(train_gpt.UserError, match=r"^TTT_CHUNK_SIZE=100000: must be <= the TTT context \(\d+\)"):
        H.from_env(big)  # the default stack: TTT_ENABLED=1, TTT_MODE=lora
    assert H.from_env({**big, "TTT_ENABLED": "0"}).ttt_chunk_size == 100000
    assert H.from_env({**big, "TTT_MODE": "sgd"}).ttt_chunk_size == 100000


@pytest.mark.parametrize("env", [{"NUM_HEADS": "0"}, {"NUM_KV_HEADS": "0"}, {"PRESET": "seed162", "SWA_EVERY": "0"}])
def test_zero_divisors_are_rejected_up_front(env):
    with pytest.raises(train_gpt.UserError):
        H.from_env(env)


@pytest.mark.parametrize("key,value,words", [("NUM_LAYER", "3", "unknown environment variable NUM_LAYER "),
                                             ("NUM_LAYERS", "abc", "NUM_LAYERS='abc' is not a valid int")])
def test_main_prints_one_line_and_fails(key, value, words):
    env = dict(os.environ, **{key: value})
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("train_gpt.py: error: ") and words in lines[0], lines[0]
    assert key in lines[0] and "Traceback" not in proc.stderr and proc.stdout == ""
