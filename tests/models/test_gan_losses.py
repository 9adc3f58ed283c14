"""GAR losses: hand-computed values, float32 under low-precision logits, R1 against closed forms,
normal consistency, z-swap and the collapse monitor on synthetic traces."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.gan_losses import (
    CollapseMonitor,
    DivergenceGuard,
    d_loss,
    discriminator_accuracy,
    feature_matching_loss,
    g_loss,
    normal_consistency_loss,
    r1_penalty,
    z_swap_loss,
    z_swap_permutation,
)

LN2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------- adversarial losses


def test_logistic_losses_hand_values():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 0.0])
    want_d = (softplus(0.0) + softplus(-2.0)) / 2 + (softplus(-1.0) + softplus(0.0)) / 2
    assert d_loss(real, fake, "logistic").item() == pytest.approx(want_d, rel=1e-6)
    assert d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2 * LN2, rel=1e-6)  # default kind
    assert g_loss(fake, "logistic").item() == pytest.approx((softplus(1.0) + softplus(0.0)) / 2, rel=1e-6)


def test_hinge_losses_hand_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # real: relu(1 - 2) = 0, relu(1 - 0.5) = 0.5 -> 0.25; fake: relu(1 - 2) = 0, relu(1 + 0) = 1 -> 0.5
    assert d_loss(real, fake, "hinge").item() == pytest.approx(0.75)
    assert g_loss(fake, "hinge").item() == pytest.approx(1.0)  # -mean(-2, 0)


def test_losses_over_scales_are_the_mean_of_per_scale_means():
    real = [torch.zeros(2, 1, 4, 4), torch.full((2, 1, 2, 2), 3.0)]
    fake = [torch.full((2, 1, 4, 4), -3.0), torch.zeros(2, 1, 2, 2)]
    want = ((1.0 + 0.0) + (0.0 + 1.0)) / 2  # hinge: scale 0: relu(1)+relu(-2); scale 1: relu(-2)+relu(1)
    assert d_loss(real, fake, "hinge").item() == pytest.approx(want)
    assert g_loss(fake, "hinge").item() == pytest.approx((3.0 + 0.0) / 2)
    with pytest.raises(ValueError, match="2 scales but fake_logits has 1"):
        d_loss(real, fake[:1])
    with pytest.raises(ValueError, match="kind must be one of"):
        g_loss(fake, "wasserstein")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["logistic", "hinge"])
def test_losses_are_float32_whatever_the_logits_dtype(dtype, kind):
    g = torch.Generator().manual_seed(0)
    real = (3 * torch.randn(2, 1, 8, 8, generator=g)).to(dtype)
    fake = [(3 * torch.randn(2, 1, 8, 8, generator=g)).to(dtype), (3 * torch.randn(2, 1, 4, 4, generator=g)).to(dtype)]
    real_l = [real, real[..., :4, :4]]
    ref_d = d_loss([t.float() for t in real_l], [t.float() for t in fake], kind)
    ref_g = g_loss([t.float() for t in fake], kind)
    for ctx in (torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False)):
        with ctx:
            out_d, out_g = d_loss(real_l, fake, kind), g_loss(fake, kind)
        assert out_d.dtype == torch.float32 and out_g.dtype == torch.float32
        assert out_d.item() == ref_d.item() and out_g.item() == ref_g.item()


def test_loss_gradients_reach_low_precision_logits():
    fake = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    g_loss(fake, "logistic").backward()
    # d/dx softplus(-x) = -sigmoid(-x) = -0.5 at 0, divided by the 4 elements of the mean
    assert fake.grad.dtype == torch.bfloat16
    torch.testing.assert_close(fake.grad.float(), torch.full((4,), -0.125))


# --------------------------------------------------------------------------- R1


def test_r1_of_a_linear_discriminator_is_the_squared_weight_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 4, generator=g, requires_grad=True)
    x = torch.rand(5, 3, 4, 4, generator=g, requires_grad=True)
    logits = (x * w).sum(dim=(1, 2, 3))  # (B,): D(x) = <w, x>, gradient w for every image
    pen = r1_penalty(logits, x)
    assert pen.item() == pytest.approx(w.square().sum().item(), rel=1e-6)
    (grad_w,) = torch.autograd.grad(pen, w)  # create_graph: the penalty trains D; d||w||^2/dw = 2w
    torch.testing.assert_close(grad_w, 2 * w.detach())


def test_r1_of_patch_maps_over_scales_hand_value():
    """D(x)_s = 1x1 conv with weights a (scale 0, 4x4 map) and b on the 2x2-mean-pooled image
    (scale 1, 2x2 map). Per-image D = mean over scales of mean over patches, so the gradient at
    every pixel is (a / 16 + b / 16) / 2 per channel (pooling spreads b / 4 over 4 pixels of each
    of the 4 patches) and R1 = 16 * |(a + b) / 32|^2."""
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, 2.0])
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    s0 = torch.einsum("c,bchw->bhw", a, x)[:, None]  # (B, 1, 4, 4)
    s1 = torch.einsum("c,bchw->bhw", b, F.avg_pool2d(x, 2))[:, None]  # (B, 1, 2, 2)
    want = 16 * ((a + b) / 32).square().sum().item()
    assert r1_penalty([s0, s1], x).item() == pytest.approx(want, rel=1e-6)


def test_r1_matches_finite_differences_for_a_small_cnn():
    torch.manual_seed(0)
    d = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 3)).double()
    x = torch.rand(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    pen = r1_penalty(d(x), x)
    h, grad = 1e-6, torch.zeros_like(x)
    with torch.no_grad():
        for idx in range(x.numel()):
            e = torch.zeros(x.numel(), dtype=torch.float64)
            e[idx] = h
            e = e.view_as(x)
            grad.view(-1)[idx] = (d(x + e).mean() - d(x - e).mean()) / (2 * h)
    assert pen.item() == pytest.approx(grad.square().sum().item(), rel=1e-6)


def test_r1_needs_images_with_grad():
    with pytest.raises(ValueError, match="requires_grad=True"):
        r1_penalty(torch.zeros(2), torch.zeros(2, 3, 4, 4))


# --------------------------------------------------------------------------- normal consistency


def test_normal_consistency_hand_values():
    n = torch.zeros(1, 3, 1, 4)
    n[0, 2] = 1.0  # all +z
    t = torch.zeros(1, 3, 1, 4)
    t[0, :, 0, 0] = torch.tensor([0.0, 0.0, 5.0])  # parallel (not unit): 1 - cos = 0
    t[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # orthogonal: 1
    t[0, :, 0, 2] = torch.tensor([0.0, 0.0, -1.0])  # opposite: 2
    t[0, :, 0, 3] = torch.tensor([0.0, 1.0, 1.0])  # 45 degrees: 1 - 1/sqrt(2)
    per_pixel = [0.0, 1.0, 2.0, 1.0 - 1.0 / math.sqrt(2.0)]
    assert normal_consistency_loss(n, t).item() == pytest.approx(sum(per_pixel) / 4, rel=1e-6)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.5]).view(1, 1, 1, 4)
    want = (per_pixel[0] + per_pixel[2] + 0.5 * per_pixel[3]) / 2.5
    assert normal_consistency_loss(n, t, mask).item() == pytest.approx(want, rel=1e-6)
    assert normal_consistency_loss(n, t, torch.zeros_like(mask)).item() == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert normal_consistency_loss(n.bfloat16(), t.bfloat16(), mask).dtype == torch.float32
    with pytest.raises(ValueError, match="mask must be"):
        normal_consistency_loss(n, t, mask[..., :2])


# --------------------------------------------------------------------------- z-swap


def test_z_swap_permutation_is_a_reproducible_derangement():
    for b in (2, 3, 7):
        perm = z_swap_permutation(b, generator=torch.Generator().manual_seed(b))
        assert sorted(perm.tolist()) == list(range(b)) and all(perm[i] != i for i in range(b))
        again = z_swap_permutation(b, generator=torch.Generator().manual_seed(b))
        assert torch.equal(perm, again)
    with pytest.raises(ValueError, match="at least 2"):
        z_swap_permutation(1)


def test_z_swap_loss_hand_values():
    normals = F.normalize(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    z_b = torch.tensor([[1.0, -1.0], [2.0, 0.0]])  # mean square 6 / 4 = 1.5
    z_rec = torch.tensor([[1.0, 0.0], [2.0, 1.0]], requires_grad=True)  # squared errors 0, 1, 0, 1 -> 0.5
    out = z_swap_loss(normals, normals, None, z_rec, z_b, normal_weight=2.0, z_weight=3.0)
    assert out.normal.item() == pytest.approx(0.0, abs=1e-6)
    assert out.z.item() == pytest.approx(0.5 / 1.5, rel=1e-6)
    assert out.total.item() == pytest.approx(3.0 * 0.5 / 1.5, rel=1e-5)
    raw = z_swap_loss(normals, -normals, None, z_rec, z_b, normalize_z=False)
    assert raw.normal.item() == pytest.approx(2.0, rel=1e-6) and raw.z.item() == pytest.approx(0.5)
    assert raw.total.item() == pytest.approx(2.5, rel=1e-6)
    # scale invariance: shrinking every code does not shrink the normalised loss
    small = z_swap_loss(normals, normals, None, 1e-2 * z_rec, 1e-2 * z_b)  # eps 1e-8 vs 1.5e-4
    assert small.z.item() == pytest.approx(out.z.item(), rel=1e-3)
    # the target is detached: gradient flows only into the recovered code
    z_b_leaf = z_b.clone().requires_grad_(True)
    z_swap_loss(normals, normals, None, z_rec, z_b_leaf).total.backward()
    assert z_b_leaf.grad is None
    # d/dz_rec of mean((z_rec - z_b)^2) / mean(z_b^2) = 2 (z_rec - z_b) / (4 * 1.5)
    torch.testing.assert_close(z_rec.grad, torch.tensor([[0.0, 1.0 / 3.0], [0.0, 1.0 / 3.0]]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="z_recovered and z_b"):
        z_swap_loss(normals, normals, None, z_rec[:, :1], z_b)


# --------------------------------------------------------------------------- collapse monitor


def test_collapse_monitor_flags_a_collapsing_trace_at_the_right_step():
    monitor = CollapseMonitor(threshold=1e-2, patience=20)
    trace = [1.4 * 0.8**t for t in range(100)]  # first below 1e-2 at t = ceil(log(1/140)/log(0.8)) = 23
    first_below = next(t for t, v in enumerate(trace) if v < 1e-2)
    assert first_below == math.ceil(math.log(1e-2 / 1.4) / math.log(0.8)) == 23
    flags = [monitor.update(v) for v in trace]
    assert flags.index(True) == first_below + 20 - 1  # the 20th consecutive step below
    assert all(flags[first_below + 19 :]) and monitor.collapsed


def test_collapse_monitor_stays_false_on_a_healthy_trace_and_resets():
    monitor = CollapseMonitor(threshold=1e-2, patience=5)
    g = torch.Generator().manual_seed(0)
    healthy = (1.2 + 0.2 * torch.randn(500, generator=g)).abs().tolist()
    assert not any(monitor.update(v) for v in healthy)
    dips = [1e-3] * 4 + [0.5] + [1e-3] * 4 + [float("nan")] + [1e-3] * 4  # never 5 in a row
    assert not any(monitor.update(v) for v in dips)
    assert monitor.steps_below == 4
    assert monitor.update(torch.tensor(1e-4))  # the 5th consecutive step (a 0-dim tensor is accepted)
    state = monitor.state_dict()
    restored = CollapseMonitor()
    restored.load_state_dict(state)
    assert restored.collapsed and restored.patience == 5
    assert not monitor.update(0.02) and monitor.steps_below == 0
    with pytest.raises(ValueError, match="patience"):
        CollapseMonitor(patience=0)


# --------------------------------------------------------------------------- feature matching, D accuracy


def test_feature_matching_hand_value_and_gradient_reaches_the_fake_only():
    """Two scales: scale 0 has layers with |diff| means 1 and 0.5, scale 1 one layer with mean 2;
    the loss is the mean over scales of the per-scale sums: ((1 + 0.5) + 2) / 2 = 1.75."""
    real = [[torch.zeros(1, 2, 2, 2), torch.ones(1, 1, 2, 2)], [torch.zeros(2, 1, 1, 1)]]
    fake = [[torch.ones(1, 2, 2, 2), torch.tensor([[[[1.5, 0.5], [1.0, 1.0]]]])],
            [torch.tensor([[[[2.0]]], [[[-2.0]]]])]]
    # scale 0 layer 1: |0.5| + |-0.5| + 0 + 0 over 4 elements = 0.25
    want = ((1.0 + 0.25) + 2.0) / 2
    fake = [[t.clone().requires_grad_(True) for t in scale] for scale in fake]
    real = [[t.clone().requires_grad_(True) for t in scale] for scale in real]
    loss = feature_matching_loss(real, fake)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want)
    loss.backward()
    assert all(t.grad is None for scale in real for t in scale)  # the real activations are targets
    # d/dfake of mean|fake - real| is sign / numel: scale 0 layer 0 (8 elements, mean over scales: / 2)
    assert torch.allclose(fake[0][0].grad, torch.full((1, 2, 2, 2), 1 / 8 / 2))
    assert feature_matching_loss(real, [[t.detach() for t in scale] for scale in real]).item() == 0.0


def test_feature_matching_rejects_mismatched_features():
    a = [[torch.zeros(1, 2, 4, 4)]]
    with pytest.raises(ValueError, match="same non-zero number of scales"):
        feature_matching_loss(a, a + a)
    with pytest.raises(ValueError, match=r"scale 0, layer 0: real \(1, 2, 4, 4\) and fake \(1, 2, 2, 2\)"):
        feature_matching_loss(a, [[torch.zeros(1, 2, 2, 2)]])
    with pytest.raises(ValueError, match="scale 0: 1 real and 2 fake"):
        feature_matching_loss(a, [[torch.zeros(1, 2, 4, 4)] * 2])


def test_discriminator_features_are_the_activations_before_the_logits():
    from models.discriminator import MultiScalePatchDiscriminator

    torch.manual_seed(0)
    d = MultiScalePatchDiscriminator(base_channels=4, num_scales=2, num_layers=3)
    x = torch.rand(2, 3, 32, 32)
    logits, features = d(x, return_features=True)
    plain = d(x)
    assert all(torch.equal(a, b) for a, b in zip(logits, plain))
    assert [len(f) for f in features] == [3, 3]
    assert [tuple(f.shape) for f in features[0]] == [(2, 4, 16, 16), (2, 8, 8, 8), (2, 16, 8, 8)]
    last_conv = d.scales[0].net[-1]
    assert torch.allclose(last_conv(features[0][-1]), logits[0])  # the last activation feeds the logit conv


def test_discriminator_accuracy_hand_values():
    real = [torch.tensor([2.0, -1.0, 3.0, 0.5]), torch.tensor([1.0, 1.0])]
    fake = [torch.tensor([-1.0, -2.0, 1.0, -3.0]), torch.tensor([0.5, -0.5])]
    acc = discriminator_accuracy(real, fake)
    # real: scale 0 3/4 judged real, scale 1 2/2 -> 0.875; fake: 3/4 and 1/2 judged fake -> 0.625
    assert acc.real.item() == pytest.approx(0.875) and acc.fake.item() == pytest.approx(0.625)
    assert acc.accuracy.item() == pytest.approx(0.75)
    # gap: scale 0: 1.125 - (-1.25) = 2.375; scale 1: 1 - 0 = 1 -> 1.6875
    assert acc.logit_gap.item() == pytest.approx(1.6875)
    chance = discriminator_accuracy(torch.zeros(4), torch.zeros(4))  # logit 0 is neither judged real nor fake
    assert chance.accuracy.item() == 0.0 and chance.logit_gap.item() == 0.0
    with pytest.raises(ValueError, match="2 scales but fake_logits has 1"):
        discriminator_accuracy(real, fake[:1])


# --------------------------------------------------------------------------- divergence guard


def test_divergence_guard_fires_on_the_third_consecutive_spike():
    guard = DivergenceGuard(factor=4.0, window=5, patience=3)
    healthy = [0.05, 0.04, 0.06, 0.05, 0.05, 0.045, 0.05]
    assert not any(guard.update(v, step) for step, v in enumerate(healthy))
    assert guard.median() == pytest.approx(0.05)
    # one spike, then normal: reset; then 0.25 (5x the median) three times: fires at the third
    assert not guard.update(0.3, 7) and guard.spikes == 1
    assert not guard.update(0.05, 8) and guard.spikes == 0
    assert not guard.update(0.25, 9) and not guard.update(0.25, 10)
    assert guard.update(0.25, 11) and guard.diverged and guard.diverged_at == 11
    assert not guard.update(0.25, 12) and guard.diverged  # fires once, stays set
    state = guard.state_dict()
    again = DivergenceGuard()
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_divergence_guard_needs_a_full_window_and_flags_nan_at_once():
    guard = DivergenceGuard(factor=2.0, window=4, patience=2)
    assert not guard.update(1.0, 0) and not guard.update(100.0, 1)  # no median yet: no spike counted
    assert guard.median() is None
    assert guard.update(float("nan"), 2) and guard.diverged_at == 2
    with pytest.raises(ValueError, match="factor > 1"):
        DivergenceGuard(factor=1.0)


def test_divergence_guard_flags_a_val_score_falling_under_its_best():
    guard = DivergenceGuard(margin=1.0)
    assert not guard.update_val(20.0, 10) and not guard.update_val(21.5, 20)  # climbing: no flag
    assert not guard.update_val(20.6, 30) and guard.best_val == 21.5  # 0.9 dB under the best
    assert not guard.update_val(float("nan"), 35) and guard.best_val == 21.5  # ignored
    assert guard.update_val(20.4, 40) and guard.diverged_at == 40  # 1.1 dB under: flagged once
    assert not guard.update_val(19.0, 50) and not guard.update(float("nan"), 51) and guard.diverged_at == 40
    again = DivergenceGuard()
    again.load_state_dict(guard.state_dict())
    assert again.state_dict() == guard.state_dict()
    with pytest.raises(ValueError, match="margin >= 0"):
        DivergenceGuard(margin=-1.0)


def test_r1_under_mixed_precision_is_the_float32_penalty():
    """R1 inside autocast (what 16-mixed/bf16-mixed training runs) equals the float32 penalty; the
    naive form (D's forward under autocast) does not, so the check can fail."""
    from models.discriminator import MultiScalePatchDiscriminator
    from models.gan_losses import r1_penalty, r1_regularizer

    torch.manual_seed(0)
    d = MultiScalePatchDiscriminator(base_channels=4, num_scales=1, num_layers=2)
    x = torch.rand(2, 3, 16, 16)
    real = x.clone().requires_grad_(True)
    reference = r1_penalty(d(real), real)  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = r1_regularizer(d, x)
        naive_in = x.clone().requires_grad_(True)
        naive = r1_penalty(d(naive_in), naive_in)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=0)
    assert abs(naive.item() - reference.item()) > 1e-4 * reference.item()  # bfloat16's gradient is off
    (grad,) = torch.autograd.grad(mixed, list(d.parameters())[0])  # back-propagates into D
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
