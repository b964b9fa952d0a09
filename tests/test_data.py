"""Shard validation, tokenizer checks, and a train loader whose global batch is the same on any world size."""
import collections

import numpy as np
import pytest
import torch

from conftest import tiny_args
import train_gpt
from data.shards import write_shard


def test_good_shard_loads(tmp_path):
    write_shard(tmp_path / "a.bin", [1, 2, 3])
    assert train_gpt.load_shard(str(tmp_path / "a.bin"), 1024).tolist() == [1, 2, 3]


def corrupt(path, offset, value):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 4] = np.array([value], "<i4").tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage,message", [
    (lambda p: corrupt(p, 0, 12345), "bad magic"),
    (lambda p: corrupt(p, 4, 2), "shard version 2"),
    (lambda p: p.write_bytes(p.read_bytes()[:-2]), "truncated or corrupt"),
    (lambda p: corrupt(p, 8, 99), "truncated or corrupt"),
    (lambda p: p.write_bytes(b"short"), "bad magic"),
])
def test_damaged_shards_are_rejected_by_name(tmp_path, damage, message):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.arange(50))
    damage(path)
    with pytest.raises(train_gpt.UserError, match=message) as e:
        train_gpt.load_shard(str(path), 1024)
    assert str(path) in str(e.value)


def test_token_ids_beyond_the_vocabulary_are_rejected(tmp_path):
    write_shard(tmp_path / "a.bin", [1, 5, 1024])
    with pytest.raises(train_gpt.UserError, match="token id 1024 >= VOCAB_SIZE=1024"):
        train_gpt.load_shard(str(tmp_path / "a.bin"), 1024)


def test_missing_shards_and_tokenizer_problems(tmp_path, tokenizer_path):
    with pytest.raises(train_gpt.UserError, match="no train shards match .*fineweb_train_"):
        train_gpt.shard_files(str(tmp_path), "train")
    with pytest.raises(train_gpt.UserError, match="not found; set TOKENIZER_PATH"):
        train_gpt.load_tokenizer(tiny_args(TOKENIZER_PATH=str(tmp_path / "none.model")))
    with pytest.raises(train_gpt.UserError, match="1024 pieces but VOCAB_SIZE=512"):
        train_gpt.load_tokenizer(tiny_args(TOKENIZER_PATH=tokenizer_path, VOCAB_SIZE=512))


def test_token_stream_reads_files_in_order_and_wraps(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", [20, 21])
    write_shard(tmp_path / "fineweb_train_000000.bin", [10, 11, 12])
    stream = train_gpt.TokenStream(train_gpt.shard_files(str(tmp_path), "train"), 1024)
    assert stream.take(4).tolist() == [10, 11, 12, 20]
    assert stream.take(4).tolist() == [21, 10, 11, 12]


def step_rows(loader):
    return [(tuple(x.tolist()), tuple(y.tolist())) for x_b, y_b in loader.next_batch() for x, y in zip(x_b, y_b)]


def test_global_batch_is_the_same_for_any_world_size(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(3000) % 1000)
    args = tiny_args(DATA_PATH=str(tmp_path), TRAIN_SEQ_LEN=8, TRAIN_BATCH_TOKENS=128)
    cpu = torch.device("cpu")
    single = train_gpt.TrainLoader(args, train_gpt.Runtime(0, 1, cpu), accum=8)
    pair = [train_gpt.TrainLoader(args, train_gpt.Runtime(r, 2, cpu), accum=4) for r in range(2)]
    seen = set()
    for _ in range(3):
        rows1 = step_rows(single)
        rows2 = step_rows(pair[0]) + step_rows(pair[1])
        assert len(rows1) == 16 and collections.Counter(rows1) == collections.Counter(rows2)
        for x, y in rows1:
            assert x[1:] == y[:-1]  # targets are the inputs shifted by one
        spans = {x for x, _ in rows1}
        assert not spans & seen  # successive steps read new tokens
        seen |= spans
    with pytest.raises(train_gpt.UserError, match="TRAIN_BATCH_TOKENS=100 must be a multiple"):
        train_gpt.TrainLoader(tiny_args(DATA_PATH=str(tmp_path), TRAIN_SEQ_LEN=8, TRAIN_BATCH_TOKENS=100),
                              train_gpt.Runtime(0, 1, cpu), accum=8)


def test_validation_tokens_and_their_limit(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(100, 150))
    assert train_gpt.load_val_tokens(tiny_args(DATA_PATH=str(tmp_path))).tolist() == list(range(150))
    assert train_gpt.load_val_tokens(tiny_args(DATA_PATH=str(tmp_path), VAL_MAX_TOKENS=10)).tolist() == list(range(11))
