"""Writing token shards in the upstream Parameter Golf format (the reader lives in train_gpt.py).

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros) followed by the
tokens as little-endian uint16. Documents are stored as [BOS] + tokens, back to back, with no EOS.
"""
import glob
import os

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID = 1


def write_shard(path, tokens) -> None:
    """Writes integer token ids (a list or an array, any integer dtype) as one shard."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got {tokens.dtype}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**16):
        raise ValueError(f"{path}: token ids must lie in [0, 65536) to fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def with_bos(encoded) -> np.ndarray:
    """[BOS] + ids for each document's token ids, concatenated into one uint16 array (no EOS: the upstream rule)."""
    parts = [np.array([BOS_ID, *ids], dtype=np.uint16) for ids in encoded]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def encode_docs(sp, texts) -> np.ndarray:
    """[BOS] + sp.encode(text) for each document, concatenated; one sp.encode call for the whole batch."""
    return with_bos(sp.encode(list(texts)))


def write_split(out_dir, split, tokens, shard_size=10**8) -> list[str]:
    """Writes fineweb_{split}_000000.bin, ... of at most shard_size tokens each (one empty shard for no tokens).
    Shards of this split left in out_dir by an earlier, larger run are deleted first: readers glob them all."""
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, f"fineweb_{split}_*.bin")):
        os.remove(stale)
    paths = []
    for i, start in enumerate(range(0, max(len(tokens), 1), shard_size)):
        path = os.path.join(out_dir, f"fineweb_{split}_{i:06d}.bin")
        write_shard(path, tokens[start:start + shard_size])
        paths.append(path)
    return paths
