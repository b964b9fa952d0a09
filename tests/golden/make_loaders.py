"""Regenerates tests/golden/loader_shuffled_0409.json and loader_packed_1855.json by running the records' own loader
classes (cut at run time from a local git mirror of openai/parameter-golf, never copied here) on tiny fixed shards, on
CPU. Usage:
    python tests/golden/make_loaders.py /path/to/parameter-golf.git [OUT_DIR]
See tests/golden/README.md for the commit and inputs."""
import glob, json, subprocess, sys, types
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
import numpy as np, torch

COMMIT = "4908dc46f21ed3fdd08d2fdca285deb2194b9599"
R0409 = "records/track_10min_16mb/2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT/train_gpt.py"
SOTA = "records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/train_gpt.py"
GIT_DIR = sys.argv[1]
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).parent)

# CPU-only torch has no pinned memory: the record asks for it; pinning does not change values
_empty = torch.empty
torch.empty = lambda *a, pin_memory=False, **k: _empty(*a, **k)
torch.Tensor.pin_memory = lambda self: self

def upstream_source(path):
    return subprocess.run(["git", "--git-dir", GIT_DIR, "show", f"{COMMIT}:{path}"], capture_output=True, text=True,
                          check=True).stdout

def record_0409():
    import re, lzma, base64
    stub = upstream_source(R0409)
    blob = re.search(r'b85decode\("(.*?)"\)', stub, re.S).group(1)
    src = lzma.decompress(base64.b85decode(blob), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode()
    lines = src.split("\n")
    start = next(i for i, l in enumerate(lines) if l.startswith("def load_data_shard"))
    end = next(i for i, l in enumerate(lines) if l.startswith("class RMSNorm"))
    ns = dict(np=np, torch=torch, glob=glob, Path=Path)
    exec("\n".join(lines[start:end]), ns)
    return ns

def record_sota():
    lines = upstream_source(SOTA).split("\n")
    start = next(i for i, l in enumerate(lines) if l.startswith("def load_data_shard"))
    end = next(i for i, l in enumerate(lines) if l.startswith("class RMSNorm"))
    ns = dict(np=np, torch=torch, glob=glob, Path=Path, ThreadPoolExecutor=ThreadPoolExecutor)
    exec("\n".join(lines[start:end]), ns)
    return ns

# ---- the inputs (also written out, and described in tests/golden/README.md)
DOC_LENGTHS = [5, 40, 3, 1, 17, 70, 9, 33, 2, 16, 48, 6, 55, 45, 12, 25, 4, 60, 8, 35, 20, 80, 17, 30, 11, 100, 30, 10, 22,
               3, 45, 13, 38]
SHARD_SIZES = [300, 40, 250, 10, 300]
SEQ_LEN, GLOBAL_TOKENS = 16, 128

def stream_tokens():
    n = sum(SHARD_SIZES)
    starts = np.cumsum([0] + DOC_LENGTHS)[:-1]
    assert starts[-1] < n <= starts[-1] + DOC_LENGTHS[-1]
    tokens = 2 + np.arange(n) % 1000
    tokens[starts] = 1
    return tokens.astype(np.uint16)

def write_shards(folder):
    folder.mkdir(parents=True, exist_ok=True)
    tokens, at = stream_tokens(), 0
    for i, size in enumerate(SHARD_SIZES):
        header = np.zeros(256, "<i4"); header[:3] = (20240520, 1, size)
        (folder / f"fineweb_train_{i:06d}.bin").write_bytes(header.tobytes() + tokens[at:at + size].astype("<u2").tobytes())
        at += size
    return str(folder / "fineweb_train_*.bin")

def stream_position(row):
    """Where a row starts in the concatenated shards: its tokens identify it (content = 2 + position % 1000)."""
    row = row.tolist()
    j = next(j for j, t in enumerate(row) if t != 1)
    pos = row[j] - 2 - j
    assert row == TOKENS[pos:pos + len(row)].tolist()
    return pos

def h(pattern, rank, world):
    return types.SimpleNamespace(train_files=pattern, rank=rank, world_size=world, train_seq_len=SEQ_LEN)

def run_shuffled(ns, pattern, world, accum, calls):
    out = []
    for rank in range(world):
        loader = ns["ShuffledSequenceLoader"](h(pattern, rank, world), torch.device("cpu"))
        xs = []
        for _ in range(calls):
            x, y = loader.next_batch(GLOBAL_TOKENS, accum)
            assert torch.equal(x[:, 1:], y[:, :-1])
            assert all(y[i, -1].item() == TOKENS[p + SEQ_LEN] for i, p in enumerate(stream_position(r) for r in x))
            xs.append([stream_position(row) for row in x])
        out.append(xs)
    return out

def run_packed(ns, pattern, world, accum, calls):
    out = []
    for rank in range(world):
        ns["BOS_ID"] = None
        loader = ns["DocumentPackingLoader"](h(pattern, rank, world), torch.device("cpu"))
        bs = []
        for _ in range(calls):
            x, y, cu, max_seqlen = loader.next_batch(GLOBAL_TOKENS, accum)
            assert x.shape[0] == 1 and torch.equal(x[0, 1:], y[0, :-1])
            cu = cu.tolist(); n = x.size(1)
            bounds = cu[:cu.index(n) + 1]
            assert all(v == n for v in cu[len(bounds):]) and len(cu) % 64 == 0
            bs.append(dict(start=stream_position(x[0]), cu_seqlens=bounds, max_seqlen=max_seqlen))
            assert y[0, -1].item() == TOKENS[bs[-1]["start"] + n]
        out.append(bs)
    return out

TOKENS = stream_tokens()

if __name__ == "__main__":
    import tempfile
    pattern = write_shards(Path(tempfile.mkdtemp()) / "shards")
    r0409, sota = record_0409(), record_sota()
    configs = [(1, 2), (2, 1), (1, 1)]
    shuffled = {f"world{w}_accum{a}": run_shuffled(r0409, pattern, w, a, 20) for w, a in configs[:2]}
    again = {f"world{w}_accum{a}": run_shuffled(sota, pattern, w, a, 20) for w, a in configs[:2]}
    assert again == shuffled, "the SOTA's ShuffledSequenceLoader differs from 04-09's"
    packed = {f"world{w}_accum{a}": run_packed(sota, pattern, w, a, 12) for w, a in configs}
    inputs = dict(doc_lengths=DOC_LENGTHS, shard_sizes=SHARD_SIZES, bos_id=1,
                  content="token at stream position i: 1 (BOS) at each document start, else 2 + i % 1000; a row is stored as "
                          "the stream position of its first input token",
                  train_seq_len=SEQ_LEN, global_tokens=GLOBAL_TOKENS)
    json.dump(dict(inputs=inputs, batches=shuffled), open(OUT / "loader_shuffled_0409.json", "w"), separators=(",", ":"))
    json.dump(dict(inputs=inputs, batches=packed), open(OUT / "loader_packed_1855.json", "w"), separators=(",", ":"))
    print("ok")
