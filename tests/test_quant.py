"""Quantization error bounds, a bitwise artifact round trip, what the artifact holds, and exact size accounting."""
import os

import pytest
import torch

from conftest import cpu_runtime, tiny_args
import train_gpt


@pytest.mark.parametrize("bits,group", [(5, 0), (6, 0), (8, 0), (6, 16)])
def test_per_row_error_bound(bits, group):
    torch.manual_seed(bits)
    w = torch.randn(24, 64) * torch.rand(24, 1) * 3
    w[3] = 0
    q, s = train_gpt.quantize_tensor(w, bits, group)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() <= qmax
    assert s.dtype == torch.float16 and s.numel() == (w.numel() // group if group else 24)
    deq = train_gpt.dequantize_tensor(q, s, group)
    rows = lambda t: t.reshape(-1, group) if group else t  # noqa: E731
    err = rows((deq - w).abs())
    assert (err <= rows(torch.ones_like(w)) * s.float() / 2 + 1e-6).all()
    assert (deq[3] == 0).all()


def test_clip_search_never_increases_row_error():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    w[:, 0] *= 20  # outliers make clipping worthwhile
    plain = train_gpt.dequantize_tensor(*train_gpt.quantize_tensor(w, 6))
    searched = train_gpt.dequantize_tensor(*train_gpt.quantize_tensor(w, 6, clip_search=True))
    e_plain, e_search = (plain - w).square().sum(1), (searched - w).square().sum(1)
    assert (e_search <= e_plain + 1e-6).all() and (e_search < e_plain).any()


def model_and_args(**kw):
    args = tiny_args(MODEL_DIM=384, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=1, ORTHO_INIT=1, **kw)
    torch.manual_seed(0)
    return train_gpt.GPT(args), args


def test_export_plan_and_mtp_heads_left_out():
    model, args = model_and_args(QUANT_MLP_BITS=5, MTP_HEADS=2, MTP_WEIGHT=0.5, BIGRAM_BUCKETS=1024, BIGRAM_DIM=128)
    state = train_gpt.export_state(model)
    assert not any(k.startswith("mtp_heads.") for k in state) and any(k.startswith("mtp_heads.") for k in model.state_dict())
    q = train_gpt.quantize_state(state, args)
    assert q["blocks.0.mlp.fc.weight"]["bits"] == 5 and q["blocks.0.attn.c_q.weight"]["bits"] == 6
    assert q["tok_emb.weight"]["raw"].dtype == torch.float16  # FP16_KEEP_PATTERNS
    assert q["bigram.proj.weight"]["raw"].dtype == torch.float16  # 384x128: small tensors stay fp16
    assert q["bigram.embed.weight"]["bits"] == 8 and "raw" in q["blocks.0.attn_scale"]
    fresh = train_gpt.GPT(train_gpt.dataclasses.replace(args, mtp_heads=0))
    fresh.load_state_dict(train_gpt.dequantize_state(q), strict=True)


@pytest.mark.parametrize("compressor,group", [("zstd", 0), ("zlib", 0), ("zstd", 32)])
def test_artifact_round_trip_is_bitwise(compressor, group):
    model, args = model_and_args(COMPRESSOR=compressor, QUANT_GROUP_SIZE=group)
    q = train_gpt.quantize_state(train_gpt.export_state(model), args)
    in_memory = train_gpt.dequantize_state(q)
    reloaded = train_gpt.dequantize_state(train_gpt.unpack(train_gpt.pack(q, args)))
    assert in_memory.keys() == reloaded.keys()
    for k in in_memory:
        assert torch.equal(in_memory[k], reloaded[k]), k


class Lines(list):
    def __call__(self, msg):
        self.append(msg)


def test_finish_accounts_sizes_reloads_from_disk_and_reports_over_cap(tmp_path, tokenizer_path, monkeypatch):
    import sentencepiece as spm
    model, args = model_and_args(LOG_DIR=str(tmp_path), RUN_ID="acc", EVAL_STRIDE=8, TRAIN_SEQ_LEN=16)
    luts = train_gpt.build_byte_luts(spm.SentencePieceProcessor(model_file=tokenizer_path), 1024)
    val = torch.randint(4, 1024, (200,))
    val[::50] = 1
    log = Lines()
    out = train_gpt.finish(args, cpu_runtime(), model, val, luts, log)
    assert out["bytes_model"] == os.path.getsize(out["artifact_path"]) == os.path.getsize(tmp_path / "acc.int6_zstd.ptz")
    assert out["bytes_code"] == os.path.getsize(train_gpt.__file__)
    assert out["bytes_total"] == out["bytes_model"] + out["bytes_code"] and out["artifact_valid"]
    assert out["final"]["tokens"] == 199 and out["final"]["stride"] == 8
    # the score is that of the in-memory dequantized weights: the file on disk holds exactly them
    same = train_gpt.GPT(args)
    same.load_state_dict(train_gpt.dequantize_state(train_gpt.quantize_state(train_gpt.export_state(model), args)))
    expect = train_gpt.evaluate(same, val, luts, args, cpu_runtime(), stride=8)
    assert out["final"]["val_loss"] == expect["val_loss"] and out["final"]["bytes"] == expect["bytes"]
    assert not any("OVER CAP" in line for line in log)
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", 1000)
    over = train_gpt.finish(args, cpu_runtime(), model, val, luts, log)
    assert not over["artifact_valid"]
    overshoot = over["bytes_total"] - 1000
    assert any(line.startswith("ARTIFACT OVER CAP") and f"{overshoot} over 1000" in line for line in log)
