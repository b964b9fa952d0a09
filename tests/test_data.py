"""Shard validation, tokenizer checks, and a train loader whose global batch is the same on any world size."""
import collections
import os
import signal

import numpy as np
import pytest
import torch

from conftest import tiny_args
import train_gpt
from data.shards import write_shard

CPU = torch.device("cpu")


def test_good_shard_loads(tmp_path):
    write_shard(tmp_path / "a.bin", [1, 2, 3, 1023])
    tokens = train_gpt.load_shard(str(tmp_path / "a.bin"), 1024)
    assert tokens.tolist() == [1, 2, 3, 1023] and tokens.dtype == np.uint16
    write_shard(tmp_path / "empty.bin", [])
    assert train_gpt.load_shard(str(tmp_path / "empty.bin"), 1024).size == 0


def test_reads_the_upstream_layout_byte_for_byte(tmp_path):
    # written by hand, not by data/shards.py: 256 little-endian int32 (magic, version, count, zeros), then uint16 LE
    header = np.zeros(256, "<i4")
    header[:3] = (20240520, 1, 3)
    (tmp_path / "a.bin").write_bytes(header.tobytes() + bytes([1, 0, 0x34, 0x02, 0xff, 0x03]))
    assert train_gpt.load_shard(str(tmp_path / "a.bin"), 1024).tolist() == [1, 0x234, 0x3ff]


def corrupt(path, offset, value):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 4] = np.array([value], "<i4").tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage,message", [
    (lambda p: corrupt(p, 0, 12345), "bad magic"),
    (lambda p: p.write_bytes(b"short"), "bad magic"),
    (lambda p: p.write_bytes(b""), "bad magic"),
    (lambda p: corrupt(p, 4, 2), "shard version 2, expected 1"),
    (lambda p: p.write_bytes(p.read_bytes()[:-2]), "truncated or corrupt"),
    (lambda p: p.write_bytes(p.read_bytes()[:1024]), "truncated or corrupt"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), "truncated or corrupt"),
    (lambda p: corrupt(p, 8, 99), "truncated or corrupt"),
])
def test_damaged_shards_are_rejected_by_name(tmp_path, damage, message):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.arange(50))
    damage(path)
    with pytest.raises(train_gpt.UserError, match=message) as e:
        train_gpt.load_shard(str(path), 1024)
    assert str(e.value).startswith(str(path) + ":") and "\n" not in str(e.value)


def test_token_ids_beyond_the_vocabulary_are_rejected_by_name(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, [1, 5, 1024, 7])
    with pytest.raises(train_gpt.UserError, match="token id 1024 >= VOCAB_SIZE=1024") as e:
        train_gpt.load_shard(str(path), 1024)
    assert str(e.value).startswith(str(path) + ":")
    assert train_gpt.load_shard(str(path), 1025).tolist() == [1, 5, 1024, 7]


def test_missing_shards_name_the_pattern(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2])  # val shards do not count as train shards
    with pytest.raises(train_gpt.UserError) as e:
        train_gpt.shard_files(str(tmp_path), "train")
    assert str(tmp_path / "fineweb_train_*.bin") in str(e.value) and "DATA_PATH" in str(e.value)
    with pytest.raises(train_gpt.UserError, match="no train shards"):
        train_gpt.TrainLoader(tiny_args(DATA_PATH=str(tmp_path)), train_gpt.Runtime(0, 1, CPU), accum=8)
    with pytest.raises(train_gpt.UserError, match="no val shards"):
        train_gpt.load_val_tokens(tiny_args(DATA_PATH=str(tmp_path / "nowhere")))


def test_shard_files_are_sorted(tmp_path):
    for i in (10, 2, 0, 1):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [i])
    files = train_gpt.shard_files(str(tmp_path), "train")
    assert [os.path.basename(f) for f in files] == [f"fineweb_train_{i:06d}.bin" for i in (0, 1, 2, 10)]


def test_tokenizer_problems_are_user_errors(tmp_path, tokenizer_path):
    missing = str(tmp_path / "none.model")
    with pytest.raises(train_gpt.UserError, match="not found; set TOKENIZER_PATH") as e:
        train_gpt.load_tokenizer(tiny_args(TOKENIZER_PATH=missing))
    assert missing in str(e.value)
    with pytest.raises(train_gpt.UserError, match="has 1024 pieces but VOCAB_SIZE=512; set VOCAB_SIZE=1024"):
        train_gpt.load_tokenizer(tiny_args(TOKENIZER_PATH=tokenizer_path, VOCAB_SIZE=512))
    assert train_gpt.load_tokenizer(tiny_args(TOKENIZER_PATH=tokenizer_path)).vocab_size() == 1024


def test_token_stream_reads_files_in_sorted_order_and_wraps(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", [20, 21])
    write_shard(tmp_path / "fineweb_train_000000.bin", [10, 11, 12])
    write_shard(tmp_path / "fineweb_train_000002.bin", [30])
    stream = train_gpt.TokenStream(train_gpt.shard_files(str(tmp_path), "train"), 1024)
    assert stream.take(4).tolist() == [10, 11, 12, 20]
    assert stream.take(4).tolist() == [21, 30, 10, 11]
    assert stream.take(7).tolist() == [12, 20, 21, 30, 10, 11, 12]  # more than one full pass in one take


def test_token_stream_skips_empty_shards(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [10, 11])
    write_shard(tmp_path / "fineweb_train_000001.bin", [])
    write_shard(tmp_path / "fineweb_train_000002.bin", [30])
    stream = train_gpt.TokenStream(train_gpt.shard_files(str(tmp_path), "train"), 1024)
    assert stream.take(7).tolist() == [10, 11, 30, 10, 11, 30, 10]


class Hang(Exception):
    pass


def test_train_shards_without_tokens_are_a_user_error(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [])
    write_shard(tmp_path / "fineweb_train_000001.bin", [])
    args = tiny_args(DATA_PATH=str(tmp_path), TRAIN_SEQ_LEN=8, TRAIN_BATCH_TOKENS=64)

    fired = []

    def hang(*_):
        fired.append(True)
        raise Hang
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        with pytest.raises(train_gpt.UserError):
            train_gpt.TrainLoader(args, train_gpt.Runtime(0, 1, CPU), accum=8).next_batch()
    except Exception:  # the alarm may surface wrapped (SystemError) when it lands inside numpy
        if fired:
            raise Hang("TrainLoader.next_batch() did not return within 5 s") from None
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def positions_data(tmp_path, n, sizes=None):
    """Train shards holding 0, 1, ..., n-1 (token id = position), split into files of the given sizes."""
    sizes = sizes or [n]
    tokens, start = np.arange(n), 0
    for i, size in enumerate(sizes):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", tokens[start:start + size])
        start += size
    assert start == n
    return dict(DATA_PATH=str(tmp_path), VOCAB_SIZE=n)


def step_rows(loader):
    return [(tuple(x.tolist()), tuple(y.tolist())) for x_b, y_b in loader.next_batch() for x, y in zip(x_b, y_b)]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_global_batch_is_the_same_for_any_world_size(tmp_path, world):
    data = positions_data(tmp_path, 3000, sizes=[1000, 700, 1300])  # steps cross shard boundaries
    args = tiny_args(**data, TRAIN_LOADER="stream", TRAIN_SEQ_LEN=8, TRAIN_BATCH_TOKENS=128)
    single = train_gpt.TrainLoader(args, train_gpt.Runtime(0, 1, CPU), accum=8)
    ranks = [train_gpt.TrainLoader(args, train_gpt.Runtime(r, world, CPU), accum=8 // world) for r in range(world)]
    for _ in range(5):
        batches = [loader.next_batch() for loader in ranks]
        assert all(len(b) == 8 // world for b in batches)
        for b in batches:
            for x, y in b:
                assert x.shape == y.shape == (2, 8) and x.dtype == y.dtype == torch.int64  # 16 tokens per micro-batch
        rows_world = [(tuple(x.tolist()), tuple(y.tolist())) for b in batches for xb, yb in b for x, y in zip(xb, yb)]
        rows_single = step_rows(single)
        assert len(rows_single) == 16
        assert collections.Counter(rows_single) == collections.Counter(rows_world)


def test_steps_read_consecutive_disjoint_spans_and_targets_are_shifted(tmp_path):
    # 8 micro-batches of 16 tokens: each reads 17 consecutive tokens (16 inputs + 1 target), 136 per step
    data = positions_data(tmp_path, 1000, sizes=[300, 300, 400])
    args = tiny_args(**data, TRAIN_LOADER="stream", TRAIN_SEQ_LEN=8, TRAIN_BATCH_TOKENS=128)
    loader = train_gpt.TrainLoader(args, train_gpt.Runtime(0, 1, CPU), accum=8)
    for step in range(7):  # 7 * 136 = 952 tokens, all within one pass over the data
        for m, (x, y) in enumerate(loader.next_batch()):
            first = step * 136 + m * 17
            assert x.flatten().tolist() == list(range(first, first + 16))
            assert y.flatten().tolist() == list(range(first + 1, first + 17))
    span = [t % 1000 for t in range(952, 952 + 136)]  # step 8 wraps around to the first shard: 952..999, 0, 1, ...
    for m, (x, y) in enumerate(loader.next_batch()):
        assert x.flatten().tolist() == span[m * 17:m * 17 + 16] and y.flatten().tolist() == span[m * 17 + 1:m * 17 + 17]
    loader.reset()
    assert loader.next_batch()[0][0].flatten().tolist() == list(range(16))


def test_rank_r_gets_micro_batches_r_r_plus_world_and_so_on(tmp_path):
    data = positions_data(tmp_path, 1000)
    args = tiny_args(**data, TRAIN_LOADER="stream", TRAIN_SEQ_LEN=8, TRAIN_BATCH_TOKENS=128)
    for r in range(2):
        batches = train_gpt.TrainLoader(args, train_gpt.Runtime(r, 2, CPU), accum=4).next_batch()
        assert [int(x[0, 0]) for x, _ in batches] == [(2 * m + r) * 17 for m in range(4)]


@pytest.mark.parametrize("world,accum,tokens", [(1, 8, 100), (1, 8, 64 * 3), (2, 4, 8 * 8 * 3), (1, 3, 128)])
def test_indivisible_batch_is_rejected(tmp_path, world, accum, tokens):
    data = positions_data(tmp_path, 1000)
    args = tiny_args(**data, TRAIN_LOADER="stream", TRAIN_SEQ_LEN=16, TRAIN_BATCH_TOKENS=tokens)
    with pytest.raises(train_gpt.UserError, match=f"TRAIN_BATCH_TOKENS={tokens} must be a multiple of "
                                                  f"WORLD_SIZE\\*accum\\*TRAIN_SEQ_LEN = {world * accum * 16}"):
        train_gpt.TrainLoader(args, train_gpt.Runtime(0, world, CPU), accum=accum)


def test_validation_tokens_and_their_limit(tmp_path):
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(100, 150))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100))
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(900, 1000))  # not validation
    val, cut = train_gpt.load_val_tokens(tiny_args(DATA_PATH=str(tmp_path)))
    assert val.tolist() == list(range(150)) and val.dtype == torch.int64 and not cut
    # VAL_MAX_TOKENS counts scored targets, so it keeps one more token than that; it only cuts below 149 targets
    def limited(n):
        val, cut = train_gpt.load_val_tokens(tiny_args(DATA_PATH=str(tmp_path), VAL_MAX_TOKENS=n))
        return val.tolist(), cut
    assert limited(10) == (list(range(11)), True) and limited(120) == (list(range(121)), True)
    assert limited(148) == (list(range(149)), True)
    assert limited(149) == (list(range(150)), False) and limited(10**6) == (list(range(150)), False)


def test_validation_set_needs_two_tokens(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1])
    with pytest.raises(train_gpt.UserError, match="holds 1 tokens; need at least 2"):
        train_gpt.load_val_tokens(tiny_args(DATA_PATH=str(tmp_path)))
