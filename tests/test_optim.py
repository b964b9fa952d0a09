"""Optimizers and schedule: Newton-Schulz, Muon/NorMuon against a hand computation, the batched path, 2 and 4 gloo
ranks (reduce-scattered gradients) against 1 rank, parameter routing, AdamW/Muon settings and decoupled decay, LR
warmup/warmdown (iterations and wall clock), momentum warmup."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import cpu_runtime, tiny_args
import train_gpt


def gen(seed):
    return torch.Generator().manual_seed(seed)


def with_spectrum(shape, low, high, seed):
    """Random matrices [..., n, n] with singular values spread log-uniformly over [low, high]."""
    n = shape[-1]
    U, _ = torch.linalg.qr(torch.randn(shape, generator=gen(seed)))
    V, _ = torch.linalg.qr(torch.randn(shape, generator=gen(seed + 1)))
    s = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), n).expand(*shape[:-1])
    return U @ torch.diag_embed(s) @ V.mT


# ----------------------------------------------------------------------------------------------------------------------
# Newton-Schulz

@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 48, 48)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    # random rectangular matrices are well conditioned; random square ones are not (tiny singular values stay
    # tiny after 5 steps, as in Muon), so the square batch gets a spread-out but bounded spectrum
    G = torch.randn(shape, generator=gen(0)) if shape[-1] != shape[-2] else with_spectrum(shape, 0.1, 3.0, 0)
    X = train_gpt.newton_schulz(G, 5)
    assert X.shape == G.shape and X.dtype == torch.float32
    sv = torch.linalg.svdvals(X)
    assert sv.min() > 0.6 and sv.max() < 1.3, (sv.min(), sv.max())
    if G.ndim == 3:  # the batch is orthogonalised matrix by matrix
        for i in range(G.size(0)):
            assert torch.allclose(X[i], train_gpt.newton_schulz(G[i], 5), atol=1e-6)
    # the result keeps G's singular vectors: X = U f(S) V^T, so U^T X V is diagonal
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    core = U.mT @ X @ Vh.mT
    off = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
    assert off.abs().max() < 1e-4


def test_newton_schulz_approximates_the_polar_factor():
    G = with_spectrum((32, 32), 0.5, 1.0, 3)
    U, _, Vh = torch.linalg.svd(G)
    polar = U @ Vh
    X = train_gpt.newton_schulz(G, 5)
    assert (X - polar).norm() / polar.norm() < 0.3
    assert (train_gpt.newton_schulz(3.7 * G, 5) - X).abs().max() < 1e-5  # scale-free (Frobenius normalised)


# ----------------------------------------------------------------------------------------------------------------------
# Muon

def muon_by_hand(p0, grads, lr, momentum, steps=5, wd=0.0, normuon=False, beta2=0.95):
    rows, cols = p0.shape
    p, buf, v = p0.clone(), torch.zeros_like(p0), torch.zeros(rows)
    for g in grads:
        buf = momentum * buf + g
        u = g + momentum * buf  # Nesterov
        O = train_gpt.newton_schulz(u[None], steps)[0]
        if normuon:
            v = beta2 * v + (1 - beta2) * (O ** 2).mean(dim=1)
            On = O / (v.sqrt() + 1e-8)[:, None]
            O = On * (O.norm() / On.norm())
        O = O * max(1.0, rows / cols) ** 0.5
        p = p * (1 - lr * wd) - lr * O
    return p


@pytest.mark.parametrize("normuon", [False, True], ids=["muon", "normuon"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide", "tall"])
@pytest.mark.parametrize("n_steps", [1, 2])
def test_muon_matches_a_hand_computation(shape, wd, normuon, n_steps):
    p0 = torch.randn(shape, generator=gen(1))
    grads = [torch.randn(shape, generator=gen(10 + i)) for i in range(n_steps)]
    p = torch.nn.Parameter(p0.clone())
    opt = train_gpt.Muon([p], lr=0.05, momentum=0.9, steps=5, wd=wd, normuon=normuon, beta2=0.95)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = muon_by_hand(p0, grads, 0.05, 0.9, 5, wd, normuon, 0.95)
    assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p.detach(), p0, atol=1e-3)
    # the state is what the hand computation carries
    buf = torch.zeros(shape)
    for g in grads:
        buf = 0.9 * buf + g
    assert torch.allclose(opt.state[p]["momentum_buffer"], buf, atol=1e-6)


def test_normuon_differs_from_muon_and_keeps_the_update_norm():
    p0 = torch.randn(8, 12, generator=gen(2))
    g = torch.randn(8, 12, generator=gen(3)) * torch.linspace(0.1, 3, 8)[:, None]  # rows of unequal size
    plain, norm = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    for p, flag in ((plain, False), (norm, True)):
        p.grad = g.clone()
        train_gpt.Muon([p], lr=1.0, momentum=0.0, steps=5, normuon=flag).step()
    d_plain, d_norm = (p0 - plain.detach()), (p0 - norm.detach())
    assert not torch.allclose(d_plain, d_norm, atol=1e-3)
    assert torch.allclose(d_plain.norm(), d_norm.norm(), rtol=1e-5)  # MATRIX_LR keeps its meaning
    row_rms = d_norm.square().mean(1).sqrt()
    assert torch.allclose(row_rms, row_rms.mean().expand(8), rtol=1e-3)  # first step: every row equal RMS


@pytest.mark.parametrize("normuon", [False, True])
def test_batched_shapes_equal_stepping_each_alone(normuon):
    shapes = [(8, 16), (16, 8), (8, 16)]  # two of one shape (one batched NS), interleaved with another
    inits = [torch.randn(s, generator=gen(20 + i)) for i, s in enumerate(shapes)]
    grads = [[torch.randn(s, generator=gen(30 + 3 * k + i)) for i, s in enumerate(shapes)] for k in range(2)]
    together = [torch.nn.Parameter(t.clone()) for t in inits]
    alone = [torch.nn.Parameter(t.clone()) for t in inits]
    kw = dict(lr=0.03, momentum=0.95, steps=5, wd=0.05, normuon=normuon)
    opt = train_gpt.Muon(together, **kw)
    singles = [train_gpt.Muon([p], **kw) for p in alone]
    for step_grads in grads:
        for p, q, g in zip(together, alone, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for o in singles:
            o.step()
    for p, q in zip(together, alone):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Communication: Muon's gradients reduce-scattered to their owners, Adam's all-reduced; W gloo ranks == 1 rank

# 3 layers: shapes with 1, 3 and 6 matrices, so 2 and 4 ranks own unequal shares (some none of a shape) and 2 of 8
# ranks own none at all; every Muon option on; a clipping norm far below the gradients' (~1), so every step clips
COMM = dict(NUM_LAYERS=3, GRAD_CLIP_NORM=1e-3, GRAD_CLIP_LOCAL=0, NORMUON=1, MUON_WD=0.1, MUON_ROW_NORMALIZE=1, MUON_NS="polar",
            ADAM_WD=0.05, TIE_EMBEDDINGS=0, MATRIX_LR=0.05)
MICRO, STEPS = 8, 3  # micro-batches per global batch: 8 accumulated on 1 rank, 4 on each of 2, 2 on each of 4, 1 on 8


def comm_run(rank, world, store, out_dir, local=0):
    """STEPS train_steps on a global batch of MICRO micro-batches, rank r taking every world-th from r (as the
    loaders). Saves the weights, Muon's momentum buffers and, at each step, the gradients the optimizers were given
    (averaged and clipped): Adam's, and Muon's where this rank owns the matrix. local: GRAD_CLIP_LOCAL."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    args, rt = tiny_args(**{**COMM, "GRAD_CLIP_LOCAL": local}), train_gpt.Runtime(rank, world, torch.device("cpu"))
    torch.manual_seed(0)
    base, model = train_gpt.build_model(args, rt)
    (adam, muon), names = train_gpt.build_optimizers(base, args, rt), {p: n for n, p in base.named_parameters()}
    seen, adam_step = [], adam.step

    def step():  # Adam steps first: every gradient is reduced and clipped by then
        seen.append({names[p]: p.grad.clone() for p in base.parameters()
                     if p.grad is not None and (p not in muon.at or muon.at[p][0] == rank)})
        adam_step()
    adam.step = step
    g = gen(5)
    for _ in range(STEPS):
        x = torch.randint(args.vocab_size, (MICRO, 1, args.train_seq_len), generator=g)
        x[..., ::9] = train_gpt.BOS_ID
        y = torch.randint(args.vocab_size, x.shape, generator=g)
        train_gpt.train_step(model, list(zip(x, y))[rank::world], [adam, muon], args, rt, train_gpt.PLAIN)
    torch.save(dict(weights=base.state_dict(), grads=seen,
                    momentum={names[p]: s["momentum_buffer"] for p, s in muon.state.items()}),
               f"{out_dir}/rank{rank}_of{world}{'_local' * local}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def test_one_rank_step_is_clip_grad_norm_then_the_optimizers():
    """On one rank train_step is what it was with DDP: backward, torch's clip_grad_norm_ over every parameter (Adam's
    groups, then Muon's), AdamW, Muon; bit for bit."""
    args, rt = tiny_args(**COMM), cpu_runtime()
    x = torch.randint(args.vocab_size, (MICRO, 1, args.train_seq_len), generator=gen(5))
    batches = list(zip(x, x.roll(1, -1)))
    runs = []
    for plain in (False, True):
        torch.manual_seed(0)
        base, model = train_gpt.build_model(args, rt)
        opts = train_gpt.build_optimizers(base, args, rt)
        for _ in range(2):
            if plain:
                for xb, yb in batches:
                    (model(xb, yb, ctx=train_gpt.PLAIN, split=args.train_seq_len) / MICRO).backward()
                ps = [p for o in opts for g in o.param_groups for p in g["params"]]
                assert torch.nn.utils.clip_grad_norm_(ps, args.grad_clip_norm) > 10 * args.grad_clip_norm
                for o in opts:
                    o.step()
                    o.zero_grad(set_to_none=True)
            else:
                train_gpt.train_step(model, batches, opts, args, rt, train_gpt.PLAIN)
        runs.append(base.state_dict())
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ranks_with_reduce_scattered_gradients_match_one_rank(tmp_path, world):
    """W ranks (gradient accumulation on each but 8, the records' world size) end with 1 rank's weights; each
    receives the averaged, clipped gradients of its own matrices, the momentum buffers are split between the owners,
    and the clipping norm is the global one: the clipped gradients gathered from all ranks have norm GRAD_CLIP_NORM.
    With 8 ranks two own no matrix: they reduce, clip and gather with an empty share."""
    comm_run(0, 1, None, tmp_path)
    mp.start_processes(comm_run, args=(world, str(tmp_path / "store"), tmp_path), nprocs=world, start_method="spawn")
    one, *ranks = (torch.load(tmp_path / f"rank{r}_of{w}.pt") for r, w in [(0, 1)] + [(r, world) for r in range(world)])
    for many in ranks:
        for k, v in one["weights"].items():
            torch.testing.assert_close(many["weights"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    owned = [set(many["momentum"]) for many in ranks]
    assert set().union(*owned) == set(one["momentum"]) and sum(map(len, owned)) == len(one["momentum"])
    assert len(set(map(len, owned))) > 1 and all(owned) == (world < 8)  # unequal shares; at 8 some rank owns none
    for many in ranks:
        for k, v in many["momentum"].items():
            torch.testing.assert_close(v, one["momentum"][k], rtol=1e-4, atol=1e-6, msg=k)
    for s, want in enumerate(one["grads"]):
        got = {}
        for many in ranks:
            got.update(many["grads"][s])
        assert got.keys() == want.keys()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-8, msg=k)
        norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in got.values()]))
        assert float(norm) == pytest.approx(COMM["GRAD_CLIP_NORM"], rel=1e-3)


def test_local_clipping_clips_each_ranks_gradient_before_the_average(tmp_path):
    """GRAD_CLIP_LOCAL=1 (#1855, #2135: clip_grad_norm_ on each rank's own gradient, then the optimizers' reduction):
    2 gloo ranks end with the weights of one process that clips each rank's accumulated gradient by its own norm and
    then averages them. Not the global clip's weights: every step clips here."""
    world = 2
    mp.start_processes(comm_run, args=(world, str(tmp_path / "store"), tmp_path, 1), nprocs=world, start_method="spawn")
    args, rt = tiny_args(**{**COMM, "GRAD_CLIP_LOCAL": 1}), cpu_runtime()
    torch.manual_seed(0)
    base, model = train_gpt.build_model(args, rt)
    opts = train_gpt.build_optimizers(base, args, rt)
    ps = [p for o in opts for g in o.param_groups for p in g["params"]]
    g = gen(5)
    for _ in range(STEPS):  # comm_run's batches
        x = torch.randint(args.vocab_size, (MICRO, 1, args.train_seq_len), generator=g)
        x[..., ::9] = train_gpt.BOS_ID
        y = torch.randint(args.vocab_size, x.shape, generator=g)
        mean = [torch.zeros_like(p) for p in ps]
        for r in range(world):
            mine = list(zip(x, y))[r::world]
            for xb, yb in mine:
                (model(xb, yb, ctx=train_gpt.PLAIN, split=args.train_seq_len) / len(mine)).backward()
            assert torch.nn.utils.clip_grad_norm_(ps, args.grad_clip_norm) > 10 * args.grad_clip_norm
            used = [p.grad is not None for p in ps]
            for m, p in zip(mean, ps):
                if p.grad is not None:
                    m += p.grad / world
                p.grad = None
        for m, p, u in zip(mean, ps, used):
            p.grad = m if u else None
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    comm_run(0, 1, None, tmp_path)
    one = torch.load(tmp_path / "rank0_of1.pt")["weights"]
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}_of{world}_local.pt")["weights"]
        for k, v in base.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
        assert any((got[k] - v).abs().max() > 1e-3 for k, v in one.items())  # the global clip ends elsewhere


# ----------------------------------------------------------------------------------------------------------------------
# Routing and optimizer settings

def routed_names(model, args):
    return {k: {n for n, _ in v} for k, v in train_gpt.route_params(model).items()}


def test_every_parameter_is_routed_once_to_the_right_group():
    args = tiny_args(TIE_EMBEDDINGS=0, SMEAR_GATE=1, SMEAR_GATE_ENABLED=0, BIGRAM_BUCKETS=64, MTP_HEADS=1, NUM_LAYERS=2)
    model = train_gpt.GPT(args)
    groups = train_gpt.route_params(model)
    names = [n for v in groups.values() for n, _ in v]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    g = routed_names(model, args)
    assert g["embed"] == {"tok_emb.weight", "bigram.embed.weight"}
    assert g["head"] == {"lm_head.weight"}
    matrices = {f"blocks.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}
    assert g["matrix"] == matrices | {"bigram.proj.weight", "mtp_heads.0.weight"}
    scalars = {f"blocks.{i}.{s}" for i in range(2) for s in ("attn.q_gain", "attn_scale", "mlp_scale", "resid_mix")}
    # new control tensors (skip gates, lane scalars of the two-lane block 1) land in scalar by module type
    assert g["scalar"] == scalars | {"skip_weights", "smear.gate", "bigram.scale", "skip_gates", "blocks.1.lane_resid",
                                     "blocks.1.lane_mix", "blocks.0.attn.attn_gate", "blocks.1.attn.attn_gate",
                                     "softcap_pos", "softcap_neg"}  # the sparse gates; AsymLogit's caps (frozen)
    tied = train_gpt.GPT(tiny_args(TIE_EMBEDDINGS=1))
    assert routed_names(tied, tied.args)["head"] == set() and tied.lm_head is None


@pytest.mark.parametrize("tied", [1, 0])
def test_build_optimizers_settings(tied):
    args = tiny_args(TIE_EMBEDDINGS=tied, ADAM_WD=0.03, EMBED_WD=0.06, MUON_WD=0.02, EMBED_LR=0.5, TIED_EMBED_LR=0.07, HEAD_LR=0.009,
                     SCALAR_LR=0.011, MATRIX_LR=0.021, MUON_MOMENTUM=0.97, BETA1=0.8, BETA2=0.9, ADAM_EPS=1e-7,
                     NORMUON=1, NORMUON_BETA2=0.9, MUON_BACKEND_STEPS=4)
    model = train_gpt.GPT(args)
    adam, muon = train_gpt.build_optimizers(model, args, cpu_runtime())
    assert type(adam) is torch.optim.AdamW and isinstance(muon, train_gpt.Muon)
    groups = routed_names(model, args)
    ids = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for g in adam.param_groups:
        assert g["weight_decay"] == (0.06 if g is adam.param_groups[0] else 0.03)  # EMBED_WD, then ADAM_WD
        assert g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7
        assert g["base_lr"] == g["lr"]
        for p in g["params"]:
            lrs[ids[id(p)]] = g["lr"]
    assert all(lrs[n] == (0.07 if tied else 0.5) for n in groups["embed"])
    assert all(lrs[n] == 0.009 for n in groups["head"]) and all(lrs[n] == 0.011 for n in groups["scalar"])
    assert set(lrs) == groups["embed"] | groups["head"] | groups["scalar"]
    (mg,) = muon.param_groups
    assert {ids[id(p)] for p in mg["params"]} == groups["matrix"]
    assert mg["wd"] == 0.02 and mg["lr"] == mg["base_lr"] == 0.021 and mg["momentum"] == 0.97
    assert muon.normuon and muon.beta2 == 0.9 and muon.steps == 4


def test_weight_decay_is_decoupled_in_both_optimizers():
    """With zero gradients the only change is p <- p (1 - lr*wd): ADAM_WD for AdamW groups (EMBED_WD < 0: the
    embedding too), MUON_WD for matrices."""
    args = tiny_args(ADAM_WD=0.5, EMBED_WD=-1, MUON_WD=0.25, SCALAR_LR=0.1, TIED_EMBED_LR=0.2, MATRIX_LR=0.4)
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opts = train_gpt.build_optimizers(model, args, cpu_runtime())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for o in opts:
        o.step()
    groups = routed_names(model, args)
    expected = {**{n: 1 - 0.2 * 0.5 for n in groups["embed"]}, **{n: 1 - 0.1 * 0.5 for n in groups["scalar"]},
                **{n: 1 - 0.4 * 0.25 for n in groups["matrix"]}}
    for n, p in model.named_parameters():
        assert torch.allclose(p, torch.full_like(p, expected[n]), atol=1e-6), n


# ----------------------------------------------------------------------------------------------------------------------
# Schedule

def test_warmdown_fraction_on_the_wall_clock():
    args = tiny_args(WARMDOWN_FRAC=0.5, MAX_WALLCLOCK_SECONDS=100, ITERATIONS=10**6, MIN_LR=0)
    for elapsed_s, scale in [(0, 1.0), (25, 1.0), (50, 1.0), (75, 0.5), (90, 0.2), (100, 0.0), (130, 0.0)]:
        assert train_gpt.lr_scale(args, 10, 1000 * elapsed_s) == pytest.approx(scale, abs=1e-9), elapsed_s
    # iterations still count when they are further along than the clock
    assert train_gpt.lr_scale(args, 750_000, 0) == pytest.approx(0.5)


def test_warmdown_fraction_by_iterations_without_a_cap():
    args = tiny_args(WARMDOWN_FRAC=0.5, MAX_WALLCLOCK_SECONDS=0, ITERATIONS=200, MIN_LR=0)
    for step, scale in [(0, 1.0), (100, 1.0), (150, 0.5), (190, 0.1), (200, 0.0)]:
        assert train_gpt.lr_scale(args, step, 1e12) == pytest.approx(scale), step  # the clock is ignored


def test_warmdown_iters_by_iterations_and_projected_onto_the_clock():
    no_cap = tiny_args(WARMDOWN_FRAC=0, WARMDOWN_ITERS=200, MAX_WALLCLOCK_SECONDS=0, ITERATIONS=1000, MIN_LR=0)
    for step, scale in [(0, 1.0), (800, 1.0), (900, 0.5), (1000, 0.0)]:
        assert train_gpt.lr_scale(no_cap, step, 123456.0) == pytest.approx(scale), step
    cap = tiny_args(WARMDOWN_FRAC=0, WARMDOWN_ITERS=200, MAX_WALLCLOCK_SECONDS=100, ITERATIONS=20000, MIN_LR=0)
    # 100 steps in 50 s: 500 ms a step, so 200 warmdown steps take 100 s; 50 s remain
    assert train_gpt.lr_scale(cap, 100, 50_000) == pytest.approx(0.5)
    assert train_gpt.lr_scale(cap, 100, 25_000) == pytest.approx(1.0)  # 250 ms/step: 50 s warmdown, 75 s left
    assert train_gpt.lr_scale(cap, 100, 90_000) == pytest.approx(10_000 / 180_000)
    assert train_gpt.lr_scale(cap, 100, 100_000) == 0.0
    assert train_gpt.lr_scale(cap, 19_900, 1_000) == pytest.approx(0.5)  # out of iterations before the clock
    off = tiny_args(WARMDOWN_FRAC=0, WARMDOWN_ITERS=0, MAX_WALLCLOCK_SECONDS=100, ITERATIONS=100)
    assert train_gpt.lr_scale(off, 99, 99_000) == 1.0


def test_set_schedule_scales_every_lr_and_warms_up_muon_momentum():
    args = tiny_args(MUON_MOMENTUM_WARMUP_START=0.85, MUON_MOMENTUM=0.95, MUON_MOMENTUM_WARMUP_STEPS=100)
    model = train_gpt.GPT(args)
    opts = train_gpt.build_optimizers(model, args, cpu_runtime())
    adam, muon = opts
    for step, momentum in [(0, 0.85), (50, 0.90), (100, 0.95), (400, 0.95)]:
        train_gpt.set_schedule(opts, args, step, 0.25)
        assert muon.param_groups[0]["momentum"] == pytest.approx(momentum), step
        for opt in opts:
            for g in opt.param_groups:
                assert g["lr"] == pytest.approx(0.25 * g["base_lr"])
        assert all(g["betas"] == (args.beta1, args.beta2) for g in adam.param_groups)
    train_gpt.set_schedule(opts, args, 10, 1.0)
    assert all(g["lr"] == g["base_lr"] for o in opts for g in o.param_groups)
    flat = tiny_args(MUON_MOMENTUM_WARMUP_STEPS=0, MUON_MOMENTUM=0.93)
    train_gpt.set_schedule(opts, flat, 0, 1.0)
    assert muon.param_groups[0]["momentum"] == 0.93
