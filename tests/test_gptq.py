"""SDClip and GPTQ against hand computations; Hessians from forward hooks, the same on 1 and 2 ranks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import cpu_runtime, tiny_args
import train_gpt


def test_sdclip_step_is_k_std_over_qmax_and_codes_stay_in_range():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0, 100.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.5, 0.5, -0.5, -0.5, 0.0]])
    for bits, k in ((6, 12.85), (8, 20.0), (6, 2.0)):
        qmax = 2 ** (bits - 1) - 1
        q, s = train_gpt.quantize_tensor(w, bits, sigmas=k)
        for r in range(3):
            row = w[r].tolist()
            mean = sum(row) / 5
            std = (sum((v - mean) ** 2 for v in row) / 4) ** 0.5  # Bessel-corrected (the records' torch.std), by hand
            step = max(k * std / qmax, 1e-6)
            assert float(s[r]) == float(torch.tensor(step).half()), (bits, k, r)
            expect = [max(-qmax, min(qmax, round(v / float(s[r])))) for v in row]
            assert q[r].tolist() == expect, (bits, k, r)
        assert int(q.abs().max()) <= qmax and q.dtype == torch.int8
    q, _ = train_gpt.quantize_tensor(w, 6, sigmas=2.0)
    assert q[0, 4] == 31  # 100 is far beyond 2 std: clipped to the top code
    assert (q[1] == 0).all()  # a zero row stays zero (its step is the floor, not NaN)


def rtn(w, scale, bits):
    qmax = 2 ** (bits - 1) - 1
    return (w / scale.float()).round().clamp(-qmax, qmax).to(torch.int8)


def correlated_inputs(n=4096, d=96, seed=0):
    """x = z A with a random mixing A: strongly correlated columns, a known covariance A^T A."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d) * 0.3
    return torch.randn(n, d, generator=g) @ A


@pytest.mark.parametrize("bits,k", [(6, 12.85), (4, 6.0), (8, 20.0)])
def test_gptq_beats_round_to_nearest_on_output_error(bits, k):
    X = correlated_inputs()
    W = torch.randn(48, X.size(1), generator=torch.Generator().manual_seed(1))
    H = X.T @ X / X.size(0)
    _, s = train_gpt.quantize_tensor(W, bits, sigmas=k)
    q_rtn, q_gptq = rtn(W, s, bits), train_gpt.gptq_quantize(W, H, s, bits)
    err = {name: (X @ W.T - X @ (q.float() * s.float()).T).norm() for name, q in (("rtn", q_rtn), ("gptq", q_gptq))}
    assert err["gptq"] < 0.75 * err["rtn"], err
    assert int(q_gptq.abs().max()) <= 2 ** (bits - 1) - 1 and q_gptq.dtype == torch.int8


@pytest.mark.parametrize("diag", ["identity", "diagonal"])
def test_gptq_equals_round_to_nearest_when_the_hessian_is_diagonal(diag):
    """With a diagonal H (identity or not), H^-1 and its Cholesky factor are diagonal: no error is spread to other
    columns, so every column rounds its own weights to nearest, whatever the column order. Bitwise equal."""
    W = torch.randn(40, 300, generator=torch.Generator().manual_seed(2))
    d = torch.ones(300) if diag == "identity" else torch.rand(300, generator=torch.Generator().manual_seed(3)) + 0.1
    _, s = train_gpt.quantize_tensor(W, 6, sigmas=12.85)
    assert torch.equal(train_gpt.gptq_quantize(W, torch.diag(d), s, 6), rtn(W, s, 6))


def test_gptq_two_columns_by_hand_with_damping_and_order():
    """Columns go in order of diag(H) descending; the first column's rounding error e spreads to the second as
    e * H01 / (H11 + damp), damp = 0.01 * mean(diag H). Here H = [[1, 1], [1, 100]]: column 1 goes first,
    e = 0.4 - 0 = 0.4, damp = 0.01 * 101 / 2 = 0.505, so column 0 becomes 0.15 + 0.4 / 1.505 = 0.4158 -> 0.
    Without damping it would be 0.15 + 0.4 = 0.55 -> 1; in the natural order, 0.15 first: 0.4 + 0.15/100.505 -> 0."""
    W, H, s = torch.tensor([[0.15, 0.4]]), torch.tensor([[1.0, 1.0], [1.0, 100.0]]), torch.tensor([[1.0]])
    assert train_gpt.gptq_quantize(W, H, s, 6).tolist() == [[0, 0]]
    W2 = torch.tensor([[0.25, 0.4]])  # 0.25 + 0.2658 = 0.5158 -> 1 (undamped it would be 0.65 -> 1 too)
    assert train_gpt.gptq_quantize(W2, H, s, 6).tolist() == [[1, 0]]
    W3 = torch.tensor([[0.22, 0.4]])  # 0.22 + 0.2658 = 0.4858 -> 0, but 0.62 -> 1 without damping
    assert train_gpt.gptq_quantize(W3, H, s, 6).tolist() == [[0, 0]]


def test_gptq_dead_columns_and_a_singular_hessian():
    X = correlated_inputs(n=64, d=96)  # fewer samples than columns: H is singular; damping makes it invertible
    X[:, 5] = 0  # an input that is always zero: a dead column
    X[:, 7] = X[:, 8]  # two identical inputs
    W = torch.randn(16, 96, generator=torch.Generator().manual_seed(4))
    H = X.T @ X / X.size(0)
    _, s = train_gpt.quantize_tensor(W, 6, sigmas=12.85)
    q = train_gpt.gptq_quantize(W, H, s, 6)
    assert (q[:, 5] == 0).all()  # the dead column's weight is dropped (it never mattered)
    deq = q.float() * s.float()
    assert torch.isfinite(deq).all()
    e_gptq, e_rtn = (X @ (W - deq).T).norm(), (X @ (W - rtn(W, s, 6).float() * s.float()).T).norm()
    assert e_gptq < e_rtn
    assert torch.equal(train_gpt.gptq_quantize(W, H, s, 6), q)  # deterministic


def test_a_hessian_that_does_not_factor_gets_more_damping_and_a_warning():
    """A Hessian summed in low precision can have a negative eigenvalue larger than the 1% damping: the damping is
    raised tenfold until it factors, and the export log says which matrix needed it."""
    X = correlated_inputs(n=256, d=32)
    H = X.T @ X / X.size(0)
    vals, vecs = torch.linalg.eigh(H.double())
    vals[0] = -0.05 * float(H.diagonal().mean())  # beyond 1% of mean(diag), within 10%
    bad = (vecs @ torch.diag(vals) @ vecs.T).float()
    assert torch.linalg.cholesky_ex(bad.double() + 0.01 * bad.diagonal().mean() * torch.eye(32, dtype=torch.float64))[1]
    f = train_gpt.gptq_factor(bad)
    assert f.damp == pytest.approx(0.1) and torch.isfinite(f.U).all()
    assert train_gpt.gptq_factor(H).damp == train_gpt.GPTQ_DAMP
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    _, s = train_gpt.quantize_tensor(W, 6, sigmas=12.85)
    assert torch.equal(train_gpt.gptq_quantize(W, f, s, 6), train_gpt.gptq_quantize(W, bad, s, 6))  # factor = raw H
    with pytest.raises(train_gpt.UserError, match="GPTQ: a Hessian is not positive definite .*set GPTQ=0"):
        train_gpt.gptq_factor(-torch.eye(4) * 100 + torch.ones(4, 4) * 0.01)


def test_export_logs_the_matrices_that_needed_more_damping(tmp_path):
    args = tiny_args(LOG_DIR=tmp_path, RUN_ID="damp", GPTQ=1, MATRIX_CLIP_SIGMAS=12.85, MATRIX_BITS=6, TARGET_BYTES=0)
    model = train_gpt.GPT(args)
    name = "blocks.0.mlp.fc.weight"
    d = model.state_dict()[name].size(1)
    H = {name: torch.eye(d), "blocks.0.attn.c_q.weight": torch.eye(d)}
    H[name][0, 0] = -0.5  # a negative eigenvalue of 0.5 / mean(diag) ~ 0.5: only damping 1.0 factors it
    lines = []
    train_gpt.export_artifact(args, cpu_runtime(), model, H, lines.append)
    warned = [l for l in lines if l.startswith("WARNING: GPTQ")]
    assert warned == [f"WARNING: GPTQ {name}: its Hessian only factored with damping 1 x mean(diag)"]


def hessian_args(**kw):
    return tiny_args(MODEL_DIM=320, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=1, BIGRAM_BUCKETS=0, GPTQ=1,
                     MATRIX_CLIP_SIGMAS=12.85, MATRIX_BITS=6, EMBED_BITS=8, EMBED_CLIP_SIGMAS=20, FP16_KEEP_PATTERNS="",
                     **kw)


def batches(n_micro, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randint(0, 1024, (2, 32), generator=g), torch.randint(0, 1024, (2, 32), generator=g))]
            for _ in range(n_micro)]


def test_hessians_cover_every_quantized_matrix_and_match_a_hand_computation():
    args = hessian_args()
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    bs = batches(3)
    H = train_gpt.collect_hessians(model, bs, args, cpu_runtime())
    quantized = {n for n, t in train_gpt.export_state(model).items() if t.is_floating_point()
                 and train_gpt.export_bits(n, t, args)}
    assert set(H) == quantized and "tok_emb.weight" in H and "blocks.0.mlp.proj.weight" in H
    # the tied embedding's Hessian is that of the final-norm output, the head's input; c_q's that of the normed
    # block input, shared with c_k and c_v (all three are quantized here only if large enough)
    with torch.no_grad():
        hs = torch.cat([model.hidden(x, model.final_ctx).reshape(-1, 320) for b in bs for x, _ in b])
    assert torch.allclose(H["tok_emb.weight"], hs.T @ hs / hs.size(0), rtol=1e-4, atol=1e-6)
    assert H["blocks.0.mlp.proj.weight"].shape == (640, 640)
    assert not hasattr(model.__dict__, "logits") and "logits" not in model.__dict__  # the wrapper is gone
    assert all(not m._forward_hooks for m in model.modules())  # and so are the hooks
    assert torch.equal(train_gpt.collect_hessians(model, bs, args, cpu_runtime())["tok_emb.weight"],
                       H["tok_emb.weight"])  # deterministic


def test_calibration_attends_plainly_causally_as_the_records():
    """#1855's and #2135's calibration (forward_logits without cu_seqlens) attends across documents; ours too, with
    DOC_MASK=1 (the default's): the Hessians equal those of the same weights without the mask, although the mask
    moves this row's hidden states."""
    rows = torch.randint(4, 1024, (2, 32), generator=torch.Generator().manual_seed(5))
    rows[:, 12] = train_gpt.BOS_ID
    H = {}
    for mask in (0, 1):
        args = hessian_args(DOC_MASK=mask, TRAIN_LOADER="shuffled")
        torch.manual_seed(0)
        model = train_gpt.GPT(args)
        with torch.no_grad():  # the zero-initialised projections would keep attention out of every output
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        H[mask] = train_gpt.collect_hessians(model, [[(rows, rows)]], args, cpu_runtime())
    assert H[0].keys() == H[1].keys() and all(torch.equal(H[0][k], H[1][k]) for k in H[0])
    with torch.no_grad():
        assert not torch.allclose(model.hidden(rows, model.final_ctx), model.hidden(rows, model.final_ctx, -1))


def _two_ranks(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    args = hessian_args()
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    rt = train_gpt.Runtime(rank=rank, world_size=2, device=torch.device("cpu"))
    mine = [[b[0] for b in batches(4)][2 * i + rank] for i in range(2)]  # micro-batch m*world + rank, as TrainLoader
    H = train_gpt.collect_hessians(model, [[m] for m in mine], args, rt)
    torch.save(H, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # as train_gpt.main(): no rank tears the group down while the other still works
    dist.destroy_process_group()


def test_hessians_are_identical_on_one_and_two_ranks(tmp_path):
    """Two gloo ranks, each with half the micro-batches, all-reduce to the Hessians one rank computes from all of
    them: the float64 sums of float32 products round to the same float32 H."""
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    args = hessian_args()
    torch.manual_seed(0)
    one = train_gpt.collect_hessians(train_gpt.GPT(args), [[b[0] for b in batches(4)]], args, cpu_runtime())
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert set(r0) == set(r1) == set(one)
    for n in one:
        assert torch.equal(r0[n], r1[n]), n  # every rank quantizes with the same H
        assert torch.equal(r0[n], one[n]), n  # and it is the one-rank H


def test_quantize_state_uses_gptq_for_matrices_with_a_hessian():
    args = hessian_args()
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    H = train_gpt.collect_hessians(model, batches(2), args, cpu_runtime())
    state = train_gpt.export_state(model)
    plain, gptq = train_gpt.quantize_state(state, args), train_gpt.quantize_state(state, args, H)
    name = "blocks.0.mlp.fc.weight"
    assert torch.equal(plain[name]["scale"], gptq[name]["scale"])  # same SDClip steps
    assert torch.equal(gptq[name]["q"], train_gpt.gptq_quantize(state[name], H[name], plain[name]["scale"], 6))
    assert not torch.equal(plain[name]["q"], gptq[name]["q"])
    assert gptq["tok_emb.weight"]["bits"] == 8 and gptq[name]["bits"] == 6
    assert float(gptq["tok_emb.weight"]["scale"][0]) == pytest.approx(
        20 * float(state["tok_emb.weight"][0].std()) / 127, rel=1e-3)  # EMBED_CLIP_SIGMAS


def test_a_whole_run_with_gptq_the_range_coder_and_a_size_target(markov_data, monkeypatch):
    """Hessians are collected from training batches after training, inside the budget: GPTQ_RESERVE_SECONDS is
    taken off MAX_WALLCLOCK_SECONDS (here all but 0.05 s of it, so the run stops early)."""
    pytest.importorskip("constriction")
    from conftest import tiny_env
    seen, target = [], os.path.getsize(train_gpt.__file__) + 480_000
    real = train_gpt.collect_hessians
    monkeypatch.setattr(train_gpt, "collect_hessians", lambda m, b, *a: real(m, seen.extend(b) or seen, *a))
    env = tiny_env(**markov_data, MODEL_DIM=320, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=1, ITERATIONS=1000,
                   GPTQ=1, MATRIX_CLIP_SIGMAS=12.85, MATRIX_BITS=6, EMBED_BITS=8, FP16_KEEP_PATTERNS="",
                   COMPRESSOR="constriction", GPTQ_CALIBRATION_BATCHES=2, MAX_WALLCLOCK_SECONDS=100,
                   GPTQ_RESERVE_SECONDS=99.95, TARGET_BYTES=target, VAL_MAX_TOKENS=256, RUN_ID="gptq")
    s = train_gpt.run(train_gpt.Hyperparameters.from_env(env), cpu_runtime())
    log = open(os.path.join(markov_data["LOG_DIR"], "gptq.txt")).read()
    assert s["steps"] < 1000 and "stopping_early: wallclock_cap" in log
    assert len(seen) == 2 and all(len(b) == 8 for b in seen)  # 2 training batches of 8 micro-batches
    assert "gptq_calibration: batches:2 " in log and "size_fit: fits matrix_clip_sigmas:" in log and s["size_fit"]["fits"]
    assert "export: gptq constriction" in log and s["bytes_total"] <= target and "SIZE FIT FAILED" not in log
    assert s["artifact_path"].endswith("gptq.int6_constriction.ptz") and s["artifact_valid"]
