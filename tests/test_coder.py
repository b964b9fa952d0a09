"""The range coder (COMPRESSOR=constriction): bit-exact round trips, size against the empirical entropy, corruption."""
import math

import numpy as np
import pytest
import torch

from conftest import assert_every_corruption_fails, tiny_args
import train_gpt

pytest.importorskip("constriction")


def entropy_bytes(q: torch.Tensor) -> float:
    counts = np.bincount(q.flatten().numpy().astype(np.int64) - int(q.min()))
    p = counts[counts > 0] / q.numel()
    return float(-(p * np.log2(p)).sum() * q.numel() / 8)


def round_trip(q: torch.Tensor) -> tuple[torch.Tensor, int]:
    lo, counts, words = train_gpt.range_encode(q)
    x = train_gpt.range_decode(words, lo, counts, q.numel())
    return torch.from_numpy(x.astype(np.int64)).to(q.dtype).reshape(q.shape), 4 * len(words)


def adversarial():
    g = torch.Generator().manual_seed(0)
    single = torch.zeros(64, 64, dtype=torch.int8)
    single[17, 3] = 5
    alternating = torch.full((64, 64), -127, dtype=torch.int8)
    alternating[:, ::2] = 127
    return {"all equal": torch.full((100, 33), 7, dtype=torch.int8),
            "all zero": torch.zeros(1000, dtype=torch.int8),
            "one nonzero": single,
            "extremes -127/127": alternating,
            "extremes of int6": torch.randint(0, 2, (50, 50), generator=g).to(torch.int8) * 62 - 31,
            "uniform over int8": torch.randint(-128, 128, (300, 100), generator=g).to(torch.int8),
            "one element": torch.tensor([[-128]], dtype=torch.int8),
            "empty": torch.zeros(0, 8, dtype=torch.int8),
            "gaussian": (torch.randn(200, 300, generator=g) * 5).round().clamp(-31, 31).to(torch.int8)}


@pytest.mark.parametrize("name", list(adversarial()))
def test_round_trip_is_bit_exact(name):
    q = adversarial()[name]
    back, _ = round_trip(q)
    assert back.dtype == q.dtype and back.shape == q.shape and torch.equal(back, q)


def test_size_is_within_half_a_percent_of_the_empirical_entropy():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(512, 1536, generator=g)
    q, _ = train_gpt.quantize_tensor(w, 6, sigmas=12.85)  # Gaussian-like int6 codes at the frontier's k
    _, size = round_trip(q)
    h = entropy_bytes(q)
    assert h < size <= 1.005 * h, (size, h)


def test_a_constant_tensor_costs_almost_nothing():
    _, size = round_trip(torch.full((512, 512), 3, dtype=torch.int8))
    assert size <= 16


def coded_artifact(**kw):
    args = tiny_args(COMPRESSOR="constriction", MODEL_DIM=320, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=1,
                     MATRIX_CLIP_SIGMAS=12.85, MATRIX_BITS=6, EMBED_BITS=8, FP16_KEEP_PATTERNS="", **kw)
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    q = train_gpt.quantize_state(train_gpt.export_state(model), args)
    return q, train_gpt.pack(q, args), args


def test_artifact_round_trip_with_the_range_coder_is_bitwise():
    q, blob, args = coded_artifact()
    assert blob[:4] == train_gpt.CODED_MAGIC
    out, header = train_gpt.unpack(blob, "x.ptz")
    assert header["version"] == train_gpt.ARTIFACT_VERSION and header["label"] == "int6_constriction"
    assert list(out) == list(q)
    for k, e in q.items():
        for field, value in e.items():
            assert (torch.equal(value, out[k][field]) and value.dtype == out[k][field].dtype
                    if isinstance(value, torch.Tensor) else value == out[k][field]), (k, field)
    coded = [a for t in header["tensors"] for a in t["arrays"] if "word_offset" in a]
    assert len(coded) == sum("q" in e for e in q.values()) >= 5  # every code array is range-coded


def test_coded_artifact_is_smaller_than_zstd_of_the_same_codes():
    q, blob, args = coded_artifact()
    import dataclasses
    zstd = train_gpt.pack(q, dataclasses.replace(args, compressor="zstd", compress_level=22))
    assert len(blob) < len(zstd)


def test_every_altered_or_truncated_coded_artifact_fails_with_one_line():
    _, blob, _ = coded_artifact()
    rng = np.random.default_rng(0)
    spots = sorted(set(rng.integers(0, len(blob), 40).tolist()) | {0, 4, 36, 40, len(blob) - 1})
    assert_every_corruption_fails(blob, spots, (0, 3, 20, 39, 41, len(blob) // 2, len(blob) - 1))


def test_words_that_pass_the_checksum_but_decode_wrongly_are_caught_by_the_histogram():
    """Defence in depth, beyond the SHA-256: decoded codes are counted against the stored histogram."""
    q = torch.tensor([1, 2, 3, 3, 3, 2], dtype=torch.int8)
    lo, counts, words = train_gpt.range_encode(q)
    fake = words.copy()
    fake[0] ^= 0xFFFF
    header_entry = dict(dtype="int8", shape=[6], lo=lo, counts=counts, word_offset=0, words=len(fake))
    bad = lambda why: train_gpt.UserError(f"x: {why}")  # noqa: E731
    try:
        out = train_gpt.read_array(header_entry, memoryview(b""), fake, bad)
    except train_gpt.UserError as e:
        assert "histogram" in str(e)
    else:
        assert torch.equal(out, q)  # only acceptable if the flip happened to decode to the same codes
    assert math.isclose(sum(counts), 6)


def test_a_missing_package_is_one_line_naming_it(monkeypatch):
    """The GPU image may lack constriction or zstandard: packing or reading then stops with one line, not a trace."""
    q, blob, args = coded_artifact()
    import sys
    monkeypatch.setitem(sys.modules, "constriction", None)  # makes `import constriction` raise ImportError
    with pytest.raises(train_gpt.UserError, match="^COMPRESSOR=constriction needs the constriction package: pip "
                                                  "install constriction"):
        train_gpt.pack(q, args)
    with pytest.raises(train_gpt.UserError, match="^reading this artifact needs the constriction package"):
        train_gpt.unpack(blob, "x.ptz")
    import dataclasses
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(train_gpt.UserError, match="^COMPRESSOR=zstd needs the zstandard package"):
        train_gpt.pack(q, dataclasses.replace(args, compressor="zstd"))
    train_gpt.unpack(train_gpt.pack(q, dataclasses.replace(args, compressor="zlib", compress_level=9)))  # zlib: stdlib
