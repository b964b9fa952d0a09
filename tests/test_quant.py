"""Quantization error bounds, a bitwise artifact round trip, what the artifact holds, and exact size accounting."""
import dataclasses
import os

import pytest
import sentencepiece as spm
import torch

from conftest import ROWMAX_EXPORT, cpu_runtime, tiny_args
import train_gpt


def rows_of(t, group):
    return t.reshape(-1, group) if group else t.reshape(t.shape[0], -1)


@pytest.mark.parametrize("bits,group", [(5, 0), (6, 0), (8, 0), (6, 16), (5, 16), (2, 0)])
def test_per_row_error_bound_without_clip_search(bits, group):
    torch.manual_seed(bits + group)
    w = torch.randn(24, 64) * torch.rand(24, 1) * 3
    w[3] = 0  # a zero row
    w[5] *= 1e-4  # a row of tiny values
    w[7, 10] = 40.0  # an outlier
    q, s = train_gpt.quantize_tensor(w, bits, group)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.shape == w.shape and int(q.abs().max()) <= qmax
    assert s.dtype == torch.float16 and s.shape == ((w.numel() // group, 1) if group else (24, 1))
    assert (s.float() > 0).all()
    deq = train_gpt.dequantize_tensor(q, s, group)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    err = rows_of((deq - w).abs(), group)
    assert (err <= s.float() / 2 * (1 + 1e-6) + 1e-7).all()  # the round-to-nearest bound, per row (or group)
    assert (deq[3] == 0).all()
    # every row (group) uses its range: the largest |q| is qmax or one short of it (the scale is rounded to fp16)
    used = rows_of(q, group).abs().amax(1)[rows_of(w, group).abs().amax(1) > 1e-3]
    assert (used >= qmax - 1).all()


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_clip_search_never_increases_row_error(bits):
    torch.manual_seed(bits)
    w = torch.randn(32, 256)
    w[:, 0] *= 20  # outliers make clipping worthwhile
    w[1] = 0
    plain = train_gpt.dequantize_tensor(*train_gpt.quantize_tensor(w, bits))
    q, s = train_gpt.quantize_tensor(w, bits, clip_search=True)
    assert int(q.abs().max()) <= 2 ** (bits - 1) - 1
    searched = train_gpt.dequantize_tensor(q, s)
    e_plain, e_search = (plain - w).square().sum(1), (searched - w).square().sum(1)
    assert (e_search <= e_plain).all()
    if bits <= 6:  # with 31 levels or fewer, clipping one 20x outlier per row pays off somewhere
        assert (e_search < e_plain).any()
    assert (searched[1] == 0).all()


def test_grouped_scales_cover_consecutive_columns_of_one_row():
    w = torch.zeros(2, 32)
    w[0, :16], w[0, 16:], w[1, :16], w[1, 16:] = 1.0, 100.0, 0.01, 7.0
    q, s = train_gpt.quantize_tensor(w, 6, group=16)
    assert s.flatten().tolist() == pytest.approx([1 / 31, 100 / 31, 0.01 / 31, 7 / 31], rel=1e-3)
    assert torch.allclose(train_gpt.dequantize_tensor(q, s, 16), w, rtol=1e-3)


def model_and_args(**kw):
    """MODEL_DIM=320: c_q, attn.proj (320x320) and the MLP (640x320) have > 65,536 elements, so they are quantized;
    c_k and c_v (160x320) do not. The row-max export unless kw says otherwise."""
    args = tiny_args(MODEL_DIM=320, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=1, MLP_MULT=2, ORTHO_INIT=0,
                     **dict(ROWMAX_EXPORT, **kw))
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():  # trained-looking weights: nothing left at its zero or one init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, args


def test_export_plan():
    model, args = model_and_args(QUANT_MLP_BITS=5, BIGRAM_BUCKETS=1024, BIGRAM_DIM=128, FP16_KEEP_PATTERNS="tok_emb")
    state = train_gpt.export_state(model)
    q = train_gpt.quantize_state(state, args)
    assert q.keys() == state.keys()
    bits = {k: e.get("bits", 0) for k, e in q.items()}
    assert bits["blocks.0.mlp.fc.weight"] == bits["blocks.0.mlp.proj.weight"] == 5  # int5 MLP
    for name in ("c_q", "c_k", "c_v", "proj"):  # int6 attention; c_k, c_v (51,200 elements) stay fp16
        assert bits[f"blocks.0.attn.{name}.weight"] == (6 if name in ("c_q", "proj") else 0), name
    assert bits["bigram.embed.weight"] == 8  # 1024x128, neither MLP nor attention: QUANT_OTHER_BITS
    assert q["tok_emb.weight"]["raw"].dtype == torch.float16  # FP16_KEEP_PATTERNS, though 1024x320 is large
    assert q["bigram.proj.weight"]["raw"].dtype == torch.float16  # 320x128 = 40,960 elements: small, kept fp16
    for name in ("blocks.0.attn_scale", "blocks.0.resid_mix", "blocks.0.attn.q_gain", "skip_weights"):
        assert "raw" in q[name] and q[name]["raw"].dtype == torch.float16, name
    assert {k for k, b in bits.items() if b} == {"blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight",
                                                  "blocks.0.attn.c_q.weight", "blocks.0.attn.proj.weight",
                                                  "bigram.embed.weight"}
    for k, e in q.items():
        if "raw" in e:  # passthrough is exactly the fp16 value
            assert torch.equal(e["raw"], state[k].half()), k
    # the QAT fake quantization of each CastedLinear uses the width it is exported at
    assert model.blocks[0].mlp.fc.qat_bits == 5 and model.blocks[0].attn.c_q.qat_bits == 6
    assert model.blocks[0].attn.c_k.qat_bits == 0 and model.bigram.proj.qat_bits == 0


def test_mtp_heads_are_left_out_and_a_plain_model_loads_the_rest():
    model, args = model_and_args(MTP_HEADS=2, MTP_WEIGHT=0.5)
    assert sum(k.startswith("mtp_heads.") for k in model.state_dict()) == 2
    state = train_gpt.export_state(model)
    assert not any(k.startswith("mtp_heads.") for k in state)
    assert state.keys() == {k for k in model.state_dict() if not k.startswith("mtp_heads.")}
    fresh = train_gpt.GPT(dataclasses.replace(args, mtp_heads=0))
    fresh.load_state_dict(train_gpt.dequantize_state(train_gpt.quantize_state(state, args)), strict=True)


@pytest.mark.parametrize("compressor,group,mlp_bits", [("zstd", 0, 6), ("zlib", 0, 6), ("zstd", 32, 5),
                                                        ("zlib", 64, 8)])
def test_artifact_round_trip_is_bitwise(compressor, group, mlp_bits):
    model, args = model_and_args(COMPRESSOR=compressor, QUANT_GROUP_SIZE=group, QUANT_MLP_BITS=mlp_bits)
    q = train_gpt.quantize_state(train_gpt.export_state(model), args)
    blob = train_gpt.pack(q, args)
    assert blob[:4] == b"\x28\xb5\x2f\xfd" if compressor == "zstd" else blob[:1] == b"\x78"
    unpacked, header = train_gpt.unpack(blob)
    assert header["version"] == train_gpt.ARTIFACT_VERSION and header["config"]["model_dim"] == args.model_dim
    assert list(unpacked) == list(q)
    for k, e in q.items():
        u = unpacked[k]
        assert u.keys() == e.keys(), k
        for field, value in e.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == u[field].dtype and torch.equal(value, u[field]), (k, field)
            else:
                assert value == u[field], (k, field)
    in_memory, reloaded = train_gpt.dequantize_state(q), train_gpt.dequantize_state(unpacked)
    assert in_memory.keys() == reloaded.keys()
    for k in in_memory:
        assert reloaded[k].dtype == torch.float32 and torch.equal(in_memory[k], reloaded[k]), k
    if group:
        assert q["blocks.0.mlp.fc.weight"]["group"] == group and q["blocks.0.mlp.fc.weight"]["bits"] == mlp_bits


def test_round_trip_of_odd_tensors():
    args = tiny_args()
    state = {"empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5), "ints": torch.arange(6).view(2, 3),
             "big": torch.randn(300, 256), "vec": torch.randn(7)}
    q = train_gpt.quantize_state(state, args)
    assert q["big"]["bits"] == 8 and q["ints"]["raw"].dtype == torch.int64
    out = train_gpt.unpack(train_gpt.pack(q, args))[0]
    back = train_gpt.dequantize_state(out)
    assert back["empty"].shape == (0, 4) and back["scalar"].shape == () and float(back["scalar"]) == 2.5
    assert torch.equal(out["ints"]["raw"], state["ints"])
    for k, v in train_gpt.dequantize_state(q).items():
        assert torch.equal(v, back[k]), k


class Lines(list):
    def __call__(self, msg):
        self.append(msg)


@pytest.fixture(scope="module")
def luts():
    from conftest import TOKENIZER
    if not TOKENIZER.exists():
        pytest.skip(f"challenge tokenizer not found at {TOKENIZER}")
    return train_gpt.build_byte_luts(spm.SentencePieceProcessor(model_file=str(TOKENIZER)), 1024)


def make_val():
    g = torch.Generator().manual_seed(0)
    val = torch.randint(4, 1024, (200,), generator=g)
    val[::50] = 1
    return val


def finish(args, rt, model, val, luts, log):
    return train_gpt.score_artifact(args, rt, train_gpt.export_artifact(args, rt, model)[0], val, luts, log)


def test_finish_accounts_sizes_and_scores_what_is_on_disk(tmp_path, luts):
    model, args = model_and_args(LOG_DIR=str(tmp_path), RUN_ID="acc", EVAL_STRIDE=8, TRAIN_SEQ_LEN=16, MTP_HEADS=1)
    val, log = make_val(), Lines()
    out = finish(args, cpu_runtime(), model, val, luts, log)
    path = tmp_path / "acc.int6_zstd.ptz"
    assert out["artifact_path"] == str(path)
    assert out["bytes_model"] == os.path.getsize(path) > 0
    assert out["bytes_code"] == os.path.getsize(train_gpt.__file__)
    assert out["bytes_total"] == out["bytes_model"] + out["bytes_code"] and out["artifact_valid"] is True
    assert any(f"{out['bytes_model']} bytes" in line and f"Total submission size: {out['bytes_total']} bytes" in line
               for line in log)
    assert not any("OVER CAP" in line for line in log)
    assert (out["final"]["tokens"], out["final"]["stride"]) == (199, 8)
    assert (out["roundtrip"]["tokens"], out["roundtrip"]["stride"]) == (199, 16)
    # what was scored is exactly the in-memory dequantized weights, loaded into a model without MTP heads
    same = train_gpt.GPT(dataclasses.replace(args, mtp_heads=0))
    same.load_state_dict(train_gpt.dequantize_state(train_gpt.quantize_state(train_gpt.export_state(model), args)),
                         strict=True)
    for stride, key in ((8, "final"), (0, "roundtrip")):
        expect = train_gpt.evaluate(same, val, luts, args, cpu_runtime(), stride=stride)
        assert out[key]["val_loss"] == expect["val_loss"] and out[key]["val_bpb"] == expect["val_bpb"]
        assert out[key]["bytes"] == expect["bytes"] == int(train_gpt.target_bytes(val[:-1], val[1:], luts).sum())
    # and it differs from the unquantized model's score (the artifact really is quantized)
    assert train_gpt.evaluate(model, val, luts, args, cpu_runtime(), stride=8)["val_loss"] != out["final"]["val_loss"]
    # the file is the packed quantized state, byte for byte
    assert path.read_bytes() == train_gpt.pack(train_gpt.quantize_state(train_gpt.export_state(model), args), args)


def test_finish_reports_an_artifact_over_the_cap(tmp_path, luts, monkeypatch):
    model, args = model_and_args(LOG_DIR=str(tmp_path), RUN_ID="big", EVAL_STRIDE=0, TRAIN_SEQ_LEN=16,
                                 COMPRESSOR="zlib")
    val, log = make_val(), Lines()
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", 1000)
    out = finish(args, cpu_runtime(), model, val, luts, log)
    assert out["artifact_valid"] is False and out["artifact_path"].endswith("big.int6_zlib.ptz")
    overshoot = out["bytes_total"] - 1000
    assert overshoot > 0
    over = [line for line in log if "ARTIFACT OVER CAP" in line]
    assert len(over) == 1 and f"{out['bytes_total']} bytes is {overshoot} over 1000" in over[0]
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", out["bytes_total"])  # exactly at the cap is valid
    log.clear()
    again = finish(args, cpu_runtime(), model, val, luts, log)
    assert again["bytes_total"] == out["bytes_total"] and again["artifact_valid"] is True
    assert not any("OVER CAP" in line for line in log)
