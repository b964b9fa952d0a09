"""Shared test helpers: tiny configurations, generated shards, the real challenge tokenizer from ../shared/proxy."""
import os
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Without CUDA the Triton kernels' tests run them in Triton's interpreter. The variable is read when triton is
# imported and when a kernel is decorated, so it is set before train_gpt imports triton; nothing else here uses it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import train_gpt  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is as fast, and far faster when the cores are shared
from data.shards import write_shard  # noqa: E402

PROXY = ROOT.parent / "shared" / "proxy"
TOKENIZER = PROXY / "tokenizers" / "fineweb_1024_bpe.model"

# A model small enough for CPU tests; everything else keeps the default stack so the tests exercise it: 2 layers,
# layer 0 looped twice more once looping is on (order 0 0 | 0 1), layer 1 two-lane, RoPE on half of each head.
TINY = dict(NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, TRAIN_SEQ_LEN=32,
            TRAIN_BATCH_TOKENS=1024, BIGRAM_BUCKETS=64, BIGRAM_DIM=16, EVAL_BATCH_SEQS=8, WARMUP_STEPS=0,
            MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0, COMPRESS_LEVEL=3, VOCAB_SIZE=1024, LOOP_START=0, LOOP_END=0,
            PARALLEL_START_LAYER=1, ROPE_DIMS=8, TTT_ENABLED=0,  # TTT: on in the default stack, set by its tests
            CASEOPS_ENABLED=0, EVAL_SEQ_LEN=0, TTT_EVAL_SEQ_LEN=0,  # generated data has no byte sidecar; 2560 > tiny
            TTT_MODE="sgd")  # the LoRA form is the default stack's; its tests set TTT_MODE=lora


# The previous default export (row max with clip search, fp16 embedding, zstd), for tests of that path.
ROWMAX_EXPORT = dict(GPTQ=0, MATRIX_CLIP_SIGMAS=0, MATRIX_BITS=0, EMBED_BITS=0, FP16_KEEP_PATTERNS="tok_emb",
                     QUANT_CLIP_SEARCH=1, COMPRESSOR="zstd", TARGET_BYTES=0)


def tiny_env(**overrides) -> dict:
    env = {k: str(v) for k, v in TINY.items()}
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    # the default stride (64) exceeds tiny windows, which is an error: default to non-overlapping windows
    env.setdefault("EVAL_STRIDE", str(int(env.get("EVAL_SEQ_LEN", 0)) or int(env["TRAIN_SEQ_LEN"])))
    return env


def tiny_args(**overrides) -> "train_gpt.Hyperparameters":
    return train_gpt.Hyperparameters.from_env(tiny_env(**overrides))


def cpu_runtime() -> "train_gpt.Runtime":
    return train_gpt.Runtime(rank=0, world_size=1, device=torch.device("cpu"))


def markov_tokens(n, vocab=64, seed=0, order=1, branching=2) -> np.ndarray:
    """Tokens from a random sparse Markov source over ids [4, vocab): each context of `order` previous tokens has
    `branching` equally likely successors, so the best achievable loss is ln(branching) nats."""
    rng = np.random.default_rng(seed)
    ids = np.arange(4, vocab)
    picks = rng.integers(branching, size=n)
    table = {}
    out = [int(t) for t in rng.choice(ids, size=order)]
    for i in range(order, n):
        ctx = tuple(out[-order:])
        if ctx not in table:
            table[ctx] = rng.choice(ids, size=branching, replace=False).tolist()
        out.append(table[ctx][picks[i]])
    return np.array(out, dtype=np.uint16)


@pytest.fixture
def tokenizer_path():
    if not TOKENIZER.exists():
        pytest.skip(f"challenge tokenizer not found at {TOKENIZER}")
    return str(TOKENIZER)


def write_markov_data(folder, tokenizer_path, train_shards=1) -> dict:
    """A DATA_PATH with generated train shards (60,000 tokens in all) and a val shard (vocab 1024 ids, BOS every 200
    tokens). Several train shards: for runs on several ranks of the loaders that give each rank its own shards."""
    tokens = markov_tokens(63000, seed=1)  # one source: train and val share its transition table
    tokens[::200] = train_gpt.BOS_ID
    for i, part in enumerate(np.array_split(tokens[:60000], train_shards)):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", part)
    write_shard(folder / "fineweb_val_000000.bin", tokens[60000:])
    return dict(DATA_PATH=str(folder), TOKENIZER_PATH=tokenizer_path, LOG_DIR=str(folder / "logs"),
                SUBMISSION_JSON=str(folder / "submission.json"))


@pytest.fixture
def markov_data(tmp_path, tokenizer_path):
    return write_markov_data(tmp_path, tokenizer_path)


def assert_every_corruption_fails(blob: bytes, positions, lengths, name="x.ptz"):
    """Each single-byte flip at `positions` and each truncation to `lengths` fails to load with one line naming
    the file."""
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 0x5A
        with pytest.raises(train_gpt.UserError, match=f"^{name}: ") as e:
            train_gpt.unpack(bytes(bad), name)
        assert "\n" not in str(e.value)
    for n in lengths:
        with pytest.raises(train_gpt.UserError, match=f"^{name}: .*truncated or corrupt"):
            train_gpt.unpack(blob[:n], name)


def gloo_scores_worker(rank, store, out, score_fn):
    """One of two spawned gloo ranks: rank 0 saves score_fn(its Runtime) to `out`."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        scores = score_fn(train_gpt.Runtime(rank, 2, torch.device("cpu")))
        if rank == 0:
            torch.save(scores, out)
        dist.barrier()  # as train_gpt.main(): no rank tears the group down while the other still works
    finally:
        dist.destroy_process_group()


def scores_on_two_ranks(tmp_path, score_fn):
    """score_fn(Runtime) run on 2 spawned gloo ranks (score_fn: a module-level function); rank 0's result."""
    import torch.multiprocessing as mp
    out = tmp_path / "scores.pt"
    mp.start_processes(gloo_scores_worker, args=(str(tmp_path / "store"), str(out), score_fn), nprocs=2,
                       start_method="spawn")
    return torch.load(out)


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")  # each a host sync on CUDA


def record_host_reads(monkeypatch, active, calls: list, names=HOST_READS):
    """Patches the tensor methods `names` to append "name from file:line" to calls while active() is true. Exempt:
    AdamW's foreach step reads its step counters (host tensors) through _get_value."""
    def counting(name, real):
        def method(self, *a, **k):
            frame = sys._getframe(1)
            if active() and frame.f_code.co_name != "_get_value":
                calls.append(f"{name} from {frame.f_code.co_filename}:{frame.f_lineno}")
            return real(self, *a, **k)
        return method
    for name in names:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))


def qkv(B=2, H=4, H_kv=2, T=12, hd=8, seed=0):
    """Random q, k, v [B, heads, T, hd]: H query heads, H_kv key/value heads (GQA when fewer)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, h, T, hd, generator=g) for h in (H, H_kv, H_kv))
