"""Weight averaging: EMA and SWA against hand computations, the averaged weights are what gets serialised, the SWA
window, and how many updates a real run averages."""
import pytest
import torch

from conftest import cpu_runtime, tiny_args, tiny_env
import train_gpt


def dyadic(shape, gen):
    """Multiples of 1/64 in [-4, 4]: EMA with decay 0.75 on these is exact in float32, in any evaluation order."""
    return torch.randint(-256, 257, shape, generator=gen).float() / 64


def averaged_run(decay, swa, updates=3):
    """A model whose MLP matrices are exported as int6 (512x256 > 65536 elements); weights changed by hand between
    averager updates. Returns the model, args, averager and the hand-computed average."""
    args = tiny_args(MODEL_DIM=256, MLP_MULT=2, NUM_LAYERS=2, NUM_HEADS=4, NUM_KV_HEADS=2, VOCAB_SIZE=64, MTP_HEADS=0,
                     EMA_DECAY=decay, SWA=int(swa), LQER_ENABLED=0)  # LQER's top-k may pick other matrices
    model = train_gpt.GPT(args)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(dyadic(p.shape, g))
    averager = train_gpt.build_averager(args, model)
    assert isinstance(averager, train_gpt.Averager)
    names = [n for n, _ in model.named_parameters()]
    snapshots = []
    for k in range(updates):
        if k:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(dyadic(p.shape, g))  # a known change between updates
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        averager.update(model)
    if swa:
        hand = {n: sum(s[n] for s in snapshots) / len(snapshots) for n in names}
    else:
        hand = dict(snapshots[0])  # the first update copies the weights
        for t, s in enumerate(snapshots[1:], start=1):  # then the decay warms up: min(decay, (1+t)/(10+t))
            d = min(decay, (1 + t) / (10 + t))
            hand = {n: d * hand[n] + (1 - d) * s[n] for n in names}
    return model, args, averager, hand, snapshots


CASES = [pytest.param(0.9, False, id="ema0.9"), pytest.param(0.2, False, id="ema0.2"),
         pytest.param(0.0, True, id="swa")]


@pytest.mark.parametrize("decay,swa", CASES)
def test_averager_holds_the_hand_computed_average(decay, swa):
    model, _, averager, hand, snapshots = averaged_run(decay, swa)
    assert averager.n == 3
    for (n, _), p in zip(model.named_parameters(), averager.params):
        assert torch.allclose(p, hand[n], rtol=1e-6, atol=1e-6), n
        assert not torch.allclose(p, snapshots[-1][n]), n  # the average is not just the last weights
    for n, p in model.named_parameters():  # updating the average leaves the model alone
        assert torch.equal(p, snapshots[-1][n]), n


@pytest.mark.parametrize("decay,swa", CASES)
def test_applied_average_is_what_gets_serialised(decay, swa):
    model, args, averager, hand, _ = averaged_run(decay, swa)
    names = [n for n, _ in model.named_parameters()]
    train_gpt.apply_average(model, averager)
    for n, p in model.named_parameters():
        assert torch.equal(p, averager.params[names.index(n)]), n
    artifact = train_gpt.quantize_state(train_gpt.export_state(model), args)
    assert artifact["blocks.0.mlp.fc.weight"]["bits"] == 6  # the check covers quantized and fp16-kept tensors
    ours = train_gpt.dequantize_state(artifact)
    theirs = train_gpt.dequantize_state(train_gpt.quantize_state(hand, args))
    assert ours.keys() == theirs.keys() == hand.keys()
    for n in ours:
        # a value within float rounding of a rounding boundary may land one step away
        step = artifact[n]["scale"].float().max() if "scale" in artifact[n] else 1e-3 * theirs[n].abs().max()
        assert ((ours[n] - theirs[n]).abs() <= step * 1.001 + 1e-7).all(), n
        assert (ours[n] != theirs[n]).sum() <= max(1, ours[n].numel() // 1000), n


def test_ema_warmup_matches_plain_ema_on_a_long_run():
    """After enough updates (1+t)/(10+t) exceeds the decay and the warm-up is forgotten: the result matches torch's
    plain EMA to float rounding, while early on it follows the newest weights far more closely."""
    model = torch.nn.Linear(8, 8)
    ours = train_gpt.build_averager(tiny_args(EMA_DECAY=0.9, SWA=0), model)
    plain = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    g = torch.Generator().manual_seed(0)
    for t in range(400):
        with torch.no_grad():
            model.weight.add_(torch.randn(8, 8, generator=g))
        ours.update(model)
        plain.update_parameters(model)
        if t == 5:  # t=5: ours weights the newest snapshot by 1 - 6/15 = 0.6, plain EMA by 0.1
            gap_new = (ours.params[0] - model.weight).abs().mean()
            assert gap_new < (plain.module.weight - model.weight).abs().mean() / 2
    assert torch.allclose(ours.params[0], plain.module.weight, rtol=1e-5, atol=1e-5)


def test_ema_does_not_hurt_a_short_run(markov_data):
    """EMA_DECAY=0.997 on a 40-step run: without the warm-up the average would still hold ~90% of the first weights;
    with it the averaged model scores within noise of the raw one (or better)."""
    raw = run_tiny(markov_data, ITERATIONS=40, EMA_DECAY=0, WARMDOWN_FRAC=0.3)
    ema = run_tiny(markov_data, ITERATIONS=40, EMA_DECAY=0.997, WARMDOWN_FRAC=0.3)
    assert ema["averaged_updates"] == 40
    assert ema["pre_quant"]["val_loss"] < raw["pre_quant"]["val_loss"] + 0.02, (ema["pre_quant"], raw["pre_quant"])


def test_no_averager_without_ema_or_swa():
    assert train_gpt.build_averager(tiny_args(EMA_DECAY=0, SWA=0), torch.nn.Linear(2, 2)) is None


def test_swa_window():
    during_warmdown = tiny_args(SWA=1, EMA_DECAY=0)
    for p in (0.0, 0.5, 0.99, 1.0):
        assert not train_gpt.swa_window(during_warmdown, p, 1.0)
        assert train_gpt.swa_window(during_warmdown, p, 0.999)
        assert train_gpt.swa_window(during_warmdown, p, 0.0)
    lr_below_half = tiny_args(SWA=1, EMA_DECAY=0, SWA_START_FRAC=0.5)  # #162's rule
    for p in (0.0, 0.9):
        for scale, inside in [(1.0, False), (0.5, False), (0.49, True), (0.0, True)]:
            assert train_gpt.swa_window(lr_below_half, p, scale) == inside, (p, scale)


# ----------------------------------------------------------------------------------------------------------------------
# Through a real (tiny) run

def run_tiny(data, **overrides):
    env = dict(ITERATIONS=4, QAT=0, VAL_MAX_TOKENS=512, TRAIN_LOG_EVERY=0, EVAL_STRIDE=0, MTP_HEADS=0)
    env.update(overrides)
    args = train_gpt.Hyperparameters.from_env(tiny_env(**data, **env))
    return train_gpt.run(args, cpu_runtime())


@pytest.mark.parametrize("overrides,expected", [
    # WARMDOWN_FRAC=1 over 4 steps: the scale is below 1 from step 1, so steps 1-3 collect (counted 2, 3, 4)
    (dict(SWA=1, EMA_DECAY=0, SWA_EVERY=1, WARMDOWN_FRAC=1.0), 3),
    (dict(SWA=1, EMA_DECAY=0, SWA_EVERY=2, WARMDOWN_FRAC=1.0), 2),
    (dict(SWA=0, EMA_DECAY=0.5), 4),
    # WARMDOWN_FRAC=0.5 over 8 steps: the scale drops below 1 from step 5 (progress 5/8), so steps 5, 6, 7 collect
    (dict(SWA=1, EMA_DECAY=0, SWA_EVERY=1, WARMDOWN_FRAC=0.5, ITERATIONS=8), 3),
    (dict(SWA=0, EMA_DECAY=0), 0),
    # #162: WARMDOWN_ITERS=10 of 20 steps, scale (20-s)/10 < 0.5 for steps s = 16..19; counted after the step
    # (s+1 = 17..20) every 2: 18 and 20
    (dict(PRESET="seed162", ITERATIONS=20, WARMDOWN_ITERS=10, SWA_EVERY=2, BIGRAM_BUCKETS=64, BIGRAM_DIM=16,
          EVAL_BATCH_SEQS=8), 2),
], ids=["swa-every-step", "swa-every-2", "ema", "swa-warmdown", "none", "swa-162-lr-below-half"])
def test_run_counts_averaged_updates(markov_data, overrides, expected):
    s = run_tiny(markov_data, **overrides)
    assert s["steps"] == overrides.get("ITERATIONS", 4)
    assert s["averaged_updates"] == expected


def test_run_serialises_the_averaged_weights(markov_data, monkeypatch):
    seen = {}
    real = train_gpt.apply_average

    def spy(base, averager):
        seen.update({n: a.clone() for (n, _), a in zip(base.named_parameters(), averager.params)})
        seen["trained"] = {n: p.detach().clone() for n, p in base.named_parameters()}
        real(base, averager)

    monkeypatch.setattr(train_gpt, "apply_average", spy)
    s = run_tiny(markov_data, SWA=0, EMA_DECAY=0.5)
    trained = seen.pop("trained")
    assert any(not torch.equal(trained[n], seen[n]) for n in seen)  # the average differs from the last weights
    args = train_gpt.Hyperparameters(**s["config"])
    with open(s["artifact_path"], "rb") as f:
        stored = train_gpt.dequantize_state(train_gpt.unpack(f.read())[0])
    expected = train_gpt.dequantize_state(train_gpt.quantize_state(seen, args))
    assert stored.keys() == expected.keys()
    for n in stored:
        assert torch.equal(stored[n], expected[n]), n


def device_counted_ema(decay, warmup=True):
    """The EMA as it was before the host-side counter: torch's AveragedModel, the warm-up ramp computed on the device
    from its n_averaged tensor (two host syncs per update); warmup=False: the records' constant decay."""
    def update(avg, cur, t):
        d = ((1 + t) / (10 + t)).clamp(max=decay).to(avg[0].dtype) if warmup else decay
        torch._foreach_mul_(avg, d)
        torch._foreach_add_(avg, torch._foreach_mul(cur, 1 - d))
    return update


@pytest.mark.parametrize("decay,swa,warmup", [(0.9965, False, 1), (0.9, False, 1), (0.0, True, 1), (0.9965, False, 0)],
                         ids=["ema-default", "ema0.9", "swa", "ema-records"])
def test_host_counted_average_gives_the_same_weights_as_before(decay, swa, warmup):
    """Over 300 updates of randomly moving weights the host-counted average (one foreach lerp) stays within float32
    rounding of the previous device-counted one; the first update is an exact copy in both (EMA_WARMUP=0: the
    records' EMA starts as a copy of the initial weights)."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 8))
    ours = train_gpt.build_averager(tiny_args(EMA_DECAY=decay, SWA=int(swa), EMA_WARMUP=warmup), model)
    before = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=None if swa else device_counted_ema(decay, warmup))
    if not warmup:
        before.update_parameters(model)
    g = torch.Generator().manual_seed(0)
    for t in range(300):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ours.update(model)
        before.update_parameters(model)
        if t == 0 and warmup:
            assert all(torch.equal(a, b) for a, b in zip(ours.params, model.parameters()))
    assert ours.n == int(before.n_averaged) == 300 + (not warmup)
    for a, b in zip(ours.params, map(torch.Tensor.detach, before.module.parameters())):
        assert not torch.equal(a, next(p for p in model.parameters() if p.shape == a.shape))
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6 * float(b.abs().max()))
