"""Token n-gram tilt (#2135, NGRAM_TILT_ENABLED): upstream's proposals exactly (golden numbers from its C state), a
tilted distribution that sums to 1, hints that read only already scored tokens (an instrumented sequential reference
and poisoned suffixes), prefix invariance of every final eval path on 1 and 2 gloo ranks, exactly-once, the
projection's fixed precompute, and one-line errors for bad settings."""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_runtime, scores_on_two_ranks, tiny_args
from test_ttt import noisy_model, ones_luts
import train_gpt

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tilt2135.npz")
SEQ, STRIDE, CHUNK = 16, 8, 48
M64 = (1 << 64) - 1


# ---- the tilt itself

def test_tilted_distribution_sums_to_one():
    g = torch.Generator().manual_seed(0)
    V, b = 7, 2.625
    z = torch.randn(3, 5, V, generator=g, dtype=torch.float64) * 3
    hint = torch.randint(-1, V, (3, 5), generator=g)
    p = torch.stack([torch.exp(-train_gpt.tilted(z, torch.full((3, 5), a), hint, b)) for a in range(V)], -1)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 5, dtype=torch.float64), rtol=0, atol=1e-6)
    plain = torch.softmax(z, -1)
    direct = plain * torch.exp(b * F.one_hot(hint.clamp(min=0), V) * (hint >= 0)[..., None])
    torch.testing.assert_close(p, direct / direct.sum(-1, keepdim=True), rtol=0, atol=1e-7)
    torch.testing.assert_close(p[hint < 0], plain[hint < 0], rtol=1e-12, atol=0)  # no hint: the model's own distribution


def test_model_forward_tilts_its_per_token_nats():
    args = tiny_args(TRAIN_SEQ_LEN=SEQ)
    model = noisy_model(args).eval()
    x = torch.randint(0, args.vocab_size, (2, SEQ))
    y, hint = torch.randint(0, args.vocab_size, (2, 4)), torch.tensor([[-1, 3, 5, -1], [7, 7, -1, 2]])
    with torch.no_grad():
        plain, tilt = model(x, y, per_token=True), model(x, y, per_token=True, hint=hint)
        q = torch.exp(-model(x, hint.clamp(min=0), per_token=True).double())  # p(hint), from the plain nats
    want = plain.double() - 2.625 * (y == hint) + torch.log1p(q * math.expm1(2.625))
    torch.testing.assert_close(tilt.double(), torch.where(hint >= 0, want, plain.double()), rtol=1e-5, atol=1e-5)


# ---- proposals: upstream's rule

def test_golden_proposals_of_upstream_state():
    """#2135's state seeds its context with the first target (val[1]); a stream with val[0] == val[1] is the same."""
    g = np.load(GOLDEN)
    for name in ("seq", "small"):
        t = torch.from_numpy(g[name])
        val = torch.cat((t[:1], t))
        for order in (16, 3, 1):
            tok, prob = g[f"{name}_o{order}_tok"], g[f"{name}_o{order}_prob"]
            for th in (0.8, 0.5, 1.0, 1e-9):
                want = np.where(prob >= np.float32(th), tok, -1)
                assert np.array_equal(train_gpt.tilt_hints(val, order, th).numpy(), want), (name, order, th)
    assert (np.load(GOLDEN)["seq_o16_prob"] >= np.float32(0.8)).sum() > 1000  # the order-16 hints fire often


def reference_hints(val, order, threshold, log):
    """Upstream's rule token by token; every read of the stream goes through read(), logged with the target being
    proposed for at that moment."""
    k, n, C = order - 1, len(val) - 1, train_gpt.NG_C
    total, top, pairs, out = {}, {}, {}, []

    def read(i, now):
        log.append((i, now))
        return int(val[i])
    for t in range(n):  # propose for target val[t + 1] from val[.. t], then add it
        ctx = [read(i, t) for i in range(t + 1 - k, t + 1)] if t + 1 >= k else None
        key = None if ctx is None else 0
        for j, tok in enumerate(ctx or []):
            key ^= tok * C[j] & M64
        hint = -1
        if key is not None and key in total and np.float32(top[key][0]) / np.float32(total[key]) >= np.float32(threshold):
            hint = top[key][1]
        out.append(hint)
        y = read(t + 1, t + 1)  # target t + 1 has been scored once its own proposal is out
        if key is not None:
            pk = ((key * 1000003) & M64) ^ (y * C[k % 32])
            pairs[pk] = pairs.get(pk, 0) + 1
            total[key] = total.get(key, 0) + 1
            if key not in top or pairs[pk] > top[key][0]:
                top[key] = (pairs[pk], y)
    return out


@pytest.mark.parametrize("order,vocab,seed", [(16, 6, 0), (3, 4, 1), (2, 3, 2), (1, 5, 3)])
def test_state_reads_only_scored_tokens(order, vocab, seed):
    """The instrumented reference reads val[i] only once target val[i] is scored (or i = 0, the stream's first
    token); the vectorized hints equal it, and changing any suffix leaves every earlier proposal alone."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, vocab, 40)
    val = torch.from_numpy(np.concatenate([base, rng.integers(0, vocab, 7), base, base[:25], rng.integers(0, vocab, 30)]))
    log = []
    ref = reference_hints(val, order, 0.5, log)
    assert all(i <= now for i, now in log)  # proposing for target now+1 reads val[.. now]: only scored tokens
    hints = train_gpt.tilt_hints(val, order, 0.5)
    assert hints.tolist() == ref and (hints >= 0).sum() > 5
    for m in range(0, len(val) - 1, 5):
        poisoned = val.clone()
        poisoned[m + 1:] = torch.from_numpy(rng.integers(0, vocab, len(val) - m - 1))
        assert torch.equal(train_gpt.tilt_hints(poisoned, order, 0.5)[:m + 1], hints[:m + 1])


# ---- every final eval path: prefix invariance, exactly once, 1 and 2 ranks

def tilt_streams():
    """Two streams of one length with their first 3 documents in common; documents repeat phrases so hints fire."""
    rng = np.random.default_rng(5)
    phrases = [rng.integers(4, 60, 12) for _ in range(3)]

    def doc():
        parts = [phrases[int(rng.integers(3))] for _ in range(int(rng.integers(2, 5)))]
        return np.concatenate([[train_gpt.BOS_ID]] + parts)
    shared = [doc() for _ in range(3)]
    a, b = (torch.from_numpy(np.concatenate(shared + [doc() for _ in range(3)]).astype(np.int64)) for _ in range(2))
    return a[:min(len(a), len(b))], b[:min(len(a), len(b))]  # one length: the same TTT chunks and LR schedule


def path_scores(rt, tilt=True) -> dict:
    env = dict(NGRAM_TILT_ENABLED=int(tilt), TOKEN_ORDER=4, TRAIN_SEQ_LEN=SEQ, EVAL_BATCH_SEQS=3,
               TTT_CHUNK_TOKENS=CHUNK, TTT_BATCH_SEQS=4, TTT_EPOCHS=1, TTT_LR=0.05, TTT_CHUNK_SIZE=5,
               TTT_BATCH_SIZE=2, TTT_LORA_RANK=4, TTT_LORA_LR=0.01, PHASED_TTT_PREFIX_DOCS=2,
               PHASED_TTT_NUM_PHASES=1, GLOBAL_TTT_CHUNK_TOKENS=64, GLOBAL_TTT_BATCH_SEQS=4)
    args = tiny_args(**env)
    model, out = noisy_model(args), {}
    for s, val in enumerate(tilt_streams()):
        docs, luts = train_gpt.document_ids(val)[0], ones_luts(args.vocab_size)
        out[s, "plain"] = train_gpt.evaluate(model, val, luts, args, rt, STRIDE, docs=docs)["docs"]
        m = copy.deepcopy(model)
        out[s, "sgd"] = train_gpt.evaluate_ttt(m, m, val, luts, args, rt, STRIDE, lambda _: None, docs=docs)["docs"]
        out[s, "lora"] = train_gpt.evaluate_ttt_lora(copy.deepcopy(model), val, luts, args, rt, lambda _: None,
                                                     docs=docs)["docs"]
    return out


def check_paths(scores, plain):
    a, b = tilt_streams()
    first_diff = int(torch.nonzero(a[:min(len(a), len(b))] != b[:min(len(a), len(b))])[0])
    assert first_diff == 148 and train_gpt.document_ids(a)[1][3] == 135
    for path in ("plain", "sgd", "lora"):
        r = scores[0, path]
        assert int(r[:, 1].sum()) == len(a) - 1 and torch.equal(r[:, 1:], plain[0, path][:, 1:])  # exactly once
        assert not torch.allclose(r[:, 0], plain[0, path][:, 0])  # the tilt changed the scores
        # documents 0-2 end (target 134) before the streams differ (148), and so do the windows and TTT chunks
        # (48 targets) that score them; the later documents differ
        assert torch.equal(scores[0, path][:3], scores[1, path][:3])
        assert not torch.equal(scores[0, path][3:5, 0], scores[1, path][3:5, 0])


@pytest.fixture(scope="module")
def one_rank():
    return path_scores(cpu_runtime()), path_scores(cpu_runtime(), tilt=False)


def test_every_eval_path_is_tilted_prefix_invariant_and_exactly_once(one_rank):
    check_paths(*one_rank)


def test_two_ranks_match_one_rank(tmp_path, one_rank):
    two = scores_on_two_ranks(tmp_path, path_scores)
    check_paths(two, one_rank[1])
    for key, v in one_rank[0].items():
        assert torch.equal(v[:, 1:], two[key][:, 1:])
        torch.testing.assert_close(two[key][:, 0], v[:, 0], rtol=2e-5, atol=1e-5)  # all-reduce order: rounding


# ---- time projection, settings

def test_projection_counts_the_precompute_once():
    args, val = tiny_args(), torch.zeros(1001, dtype=torch.long)
    p = train_gpt.ttt_projection(args, cpu_runtime(), val, 12.0, 1, 4, 0.0, lambda _: None, pre=10.0)
    assert p["projected_ttt_s"] == 10.0 + 2.0 * 4


def test_settings():
    assert not train_gpt.Hyperparameters().ngram_tilt_enabled and tiny_args().ngram_tilt_enabled  # on in the default
    a = train_gpt.Hyperparameters.from_env({"PRESET": "frontier2135"})
    assert (a.ngram_tilt_enabled, a.token_order, a.token_threshold, a.token_boost) == (True, 16, 0.8, 2.625)
    for bad in (dict(TOKEN_ORDER="0"), dict(TOKEN_ORDER="33"), dict(TOKEN_THRESHOLD="0"), dict(TOKEN_THRESHOLD="1.5"),
                dict(TOKEN_BOOST="-1"), dict(TOKEN_BOST="1")):
        with pytest.raises(train_gpt.UserError) as e:
            train_gpt.Hyperparameters.from_env(bad)
        assert "\n" not in str(e.value) and next(iter(bad)) in str(e.value)
