"""bench/compress_compare.py on a tiny shape: every container decodes to the quantized state it was given, the
row order is the greedy chain it claims to be, and the report is written from the results. No timings asserted."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from bench import compress_compare as cc

# 1 layer x 192, vocab 512: the embedding (int7) and both MLP matrices (int6) are quantized, LQER on all three; the
# attention matrices (<= 65,536 weights) stay fp16
TINY = dict(NUM_LAYERS="1", NUM_LOOPS="0", MODEL_DIM="192", VOCAB_SIZE="512")
needs_lrzip = pytest.mark.skipif(not cc.lrzip_available(), reason="lrzip is not on PATH (apt-get install lrzip)")


@pytest.fixture(scope="module")
def tiny():
    args = cc.preset_args(TINY)
    qstate, args, looping, _ = cc.quantized_state("synthetic", args)
    return qstate, args, looping


def test_tiny_state_has_int6_int7_and_lqer(tiny):
    qstate, _, _ = tiny
    bits = sorted(e["bits"] for e in qstate.values() if "q" in e)
    assert bits == [6, 6, 7]
    assert sum("lqer_a" in e for e in qstate.values()) == 3
    stats = cc.code_stats(qstate)
    assert stats["codes"] == 512 * 192 + 2 * 768 * 192
    assert 0 < stats["int6_bits_per_code"] < 6


def naive_chain(codes):
    """The definition, spelled out: from row 0, always the nearest (L1) row not yet taken, lowest index on a tie."""
    w, order, left = codes.astype(np.int64), [0], set(range(1, len(codes)))
    while left:
        last = w[order[-1]]
        order.append(min(left, key=lambda i: (np.abs(w[i] - last).sum(), i)))
        left.remove(order[-1])
    return np.array(order)


@pytest.mark.parametrize("rows,cols,spread", [(1, 4, 3), (2, 3, 1), (40, 6, 1), (97, 16, 4), (64, 8, 0)])
def test_similarity_order_is_the_greedy_chain(rows, cols, spread):
    codes = np.random.default_rng(rows).integers(-spread, spread + 1, size=(rows, cols)).astype(np.int8)
    order = cc.similarity_order(codes)
    assert np.array_equal(order, naive_chain(codes))  # ties included (spread 0, 1: many equal distances)
    assert sorted(order.tolist()) == list(range(rows))


def test_byte_shuffle_round_trips():
    for n in (0, 1, 2, 7, 1000):
        data = bytes(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8))
        assert cc.byte_unshuffle(cc.byte_shuffle(data)) == data


@pytest.mark.parametrize("method", ["constriction", "zstd", "brotli"])
def test_our_containers_and_torchsave_brotli_decode_exactly(tiny, method):
    qstate, args, looping = tiny
    r = cc.run_method(method, qstate, args, looping)
    assert r["lossless"], r["mismatches"]
    assert r["bytes"] > 0
    if method == "constriction":  # the coded words cost about the codes' entropy
        assert r["parts"]["codes"] + r["parts"]["rest"] == r["bytes"]
        assert r["parts"]["codes"] == pytest.approx(cc.code_stats(qstate)["entropy_bytes"], rel=0.01)


@pytest.fixture(scope="module")
def pergroup_brotli(tiny):
    qstate, args, looping = tiny
    return cc.run_method("pergroup", qstate, args, looping, matrices="brotli")


def test_pergroup_with_brotli_matrices_round_trips(tiny, pergroup_brotli):
    qstate, _, _ = tiny
    r = pergroup_brotli
    assert r["lossless"], r["mismatches"]
    assert r["parts"]["codes"] + r["parts"]["rest"] + r["parts"]["frame_and_row_orders"] == r["bytes"]
    # the frame stores each matrix's row order raw: 2 bytes per row
    rows = sum(e["q"].shape[0] for e in qstate.values() if "q" in e)
    assert r["parts"]["frame_and_row_orders"] >= 2 * rows


def test_pergroup_frame_holds_rows_in_chain_order_transposed(tiny):
    import brotli
    qstate, args, looping = tiny
    frame, parts = cc.pergroup_pack(qstate, cc.header_meta(qstate, args, looping), "brotli")
    back, meta = cc.pergroup_unpack(frame)
    assert not cc.differences(qstate, back)
    assert meta["config"]["vocab_size"] == 512 and meta["looping"] == looping
    # the matrices' stream, read by hand: in name order, each one's rows in chain order, transposed
    start = len(frame) - parts["rest"] - 4 - parts["codes"]
    stream = brotli.decompress(frame[start:start + parts["codes"]])
    codes = {n: e["q"].numpy() for n, e in qstate.items() if "q" in e}
    expect = b"".join(np.ascontiguousarray(codes[n][cc.similarity_order(codes[n])].T).tobytes() for n in sorted(codes))
    assert stream == expect


def test_a_changed_code_is_caught(tiny):
    qstate, _, _ = tiny
    other = {n: dict(e) for n, e in qstate.items()}
    name = next(n for n, e in other.items() if "q" in e)
    other[name]["q"] = other[name]["q"].clone()
    other[name]["q"][0, 0] += 1
    assert cc.differences(qstate, other) == [f"{name}.q"]


@needs_lrzip
def test_lrzip_round_trips_bytes():
    data = bytes(np.random.default_rng(0).integers(-5, 6, 5000).astype(np.int8).tobytes()) + b"\0" * 3000
    packed = cc.lrzip(data)
    assert packed != data and cc.lrzip(packed, decompress=True) == data


@needs_lrzip
def test_pergroup_with_lrzip_round_trips(tiny):
    qstate, args, looping = tiny
    r = cc.run_method("pergroup", qstate, args, looping, matrices="lrzip")
    assert r["lossless"], r["mismatches"]
    assert r["bytes"] > r["parts"]["codes"] > 0


def test_run_and_report_write_json_and_markdown(tmp_path):
    out = tmp_path / "r.json"
    env = [f"{k}={v}" for k, v in TINY.items()]
    cc.main(["run", "--methods", "constriction,zstd", "--env", *env, "--json", str(out)])
    cc.main(["run", "--methods", "pergroup", "--no-lrzip", "--env", *env, "--json", str(out)])  # merges
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"constriction", "zstd", "pergroup"}
    assert all(r["lossless"] and r["bytes"] > 0 for r in results["runs"].values())
    md = tmp_path / "r.md"
    cc.main(["report", str(out), "--md", str(md)])
    text = md.read_text()
    assert f"{results['runs']['constriction']['bytes']:,}" in text
    assert "brotli-11 for the matrices, not lrzip" in text  # the stand-in is labelled as such
    with pytest.raises(SystemExit):  # another quantized state into the same file is refused
        cc.main(["run", "--methods", "constriction", "--seed", "1", "--env", *env, "--json", str(out)])


def test_an_artifact_is_compared_on_its_own_state(tmp_path, tiny):
    qstate, args, looping = tiny
    path = tmp_path / "a.ptz"
    path.write_bytes(cc.train_gpt.pack(qstate, args, looping))
    q2, args2, looping2, what = cc.quantized_state(f"artifact:{path}", None)
    assert not cc.differences(qstate, q2) and looping2 == looping and "a.ptz" in what
    assert torch.equal(q2["tok_emb.weight"]["q"], qstate["tok_emb.weight"]["q"])
