"""GAR models: one shared contract for G, D, E and the normal estimator, then model-specific checks.

The contract (as huggingface/diffusers' ``tests/models/testing_utils/common.py`` mixin): a tiny
init dict and dummy inputs per model; every model is checked for output shapes, determinism
under a seed, gradients reaching every parameter and a state_dict round trip through a file.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from models.discriminator import MultiScalePatchDiscriminator
from models.encoder import InverseEncoder, NormalEstimator
from models.gan_losses import normal_consistency_loss
from models.renderer import GARGenerator, ModulatedConv2d, ema_update, pack_raster_inputs

B, H, W = 2, 32, 32


def _outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def generator_inputs(feature_channels: int, z_dim: int, num_scales: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for s in range(num_scales):
        h, w = H >> s, W >> s
        feats = torch.randn(B, feature_channels, h, w, generator=g)
        normals = F.normalize(torch.randn(B, 3, h, w, generator=g), dim=1)
        alpha = (torch.rand(B, 1, h, w, generator=g) > 0.3).float()
        inputs.append(pack_raster_inputs(feats * alpha, normals * alpha, alpha))
    return inputs, torch.randn(B, z_dim, generator=g)


class ModelContract:
    """Shared checks; subclasses set ``model_class``, ``init_kwargs``, ``expected_shapes`` and
    implement ``make_inputs() -> (args, kwargs)``."""

    model_class: type[nn.Module]
    init_kwargs: dict = {}
    expected_shapes: list[tuple[int, ...]] = []

    def make_inputs(self) -> tuple[tuple, dict]:
        raise NotImplementedError

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.model_class(**self.init_kwargs)

    def run(self, model: nn.Module) -> list[torch.Tensor]:
        args, kwargs = self.make_inputs()
        return _outputs(model(*args, **kwargs))

    def test_output_shapes(self):
        model = self.build().eval()
        with torch.no_grad():
            outs = self.run(model)
        assert [tuple(o.shape) for o in outs] == self.expected_shapes
        assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outs)

    def test_determinism_under_a_seed(self):
        a, b, c = self.build(0).eval(), self.build(0).eval(), self.build(1).eval()
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), name
        with torch.no_grad():
            out_a, out_a2, out_b, out_c = self.run(a), self.run(a), self.run(b), self.run(c)
        for x, y, z in zip(out_a, out_a2, out_b):
            assert torch.equal(x, y) and torch.equal(x, z)
        assert any(not torch.allclose(x, y) for x, y in zip(out_a, out_c)), "another seed gave the same model"

    def test_gradients_reach_every_parameter(self):
        model = self.build().train()
        outs = self.run(model)
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"

    def test_state_dict_round_trip(self, tmp_path):
        model = self.build(0).eval()
        torch.save(model.state_dict(), tmp_path / "model.pt")
        other = self.build(1).eval()
        other.load_state_dict(torch.load(tmp_path / "model.pt"))
        assert other.state_dict().keys() == model.state_dict().keys()
        with torch.no_grad():
            for x, y in zip(self.run(model), self.run(other)):
                assert torch.equal(x, y)


class TestGARGeneratorContract(ModelContract):
    model_class = GARGenerator
    init_kwargs = dict(feature_channels=5, z_dim=4, num_scales=3, base_channels=8, mapping_layers=2, w_dim=8)
    expected_shapes = [(B, 3, H, W)]

    def make_inputs(self):
        inputs, z = generator_inputs(5, 4, 3)
        return (inputs, z), {}


class TestGARGeneratorWithNoiseContract(TestGARGeneratorContract):
    """Per-block noise on: gradients reach the noise strengths; evaluation stays deterministic."""

    init_kwargs = dict(TestGARGeneratorContract.init_kwargs, use_noise=True)


class TestResidualGARGeneratorContract(TestGARGeneratorContract):
    """The residual generator (refines a base image), after training has moved ``to_rgb`` off zero."""

    init_kwargs = dict(TestGARGeneratorContract.init_kwargs, residual=True)

    def build(self, seed: int = 0) -> nn.Module:
        model = super().build(seed)
        with torch.no_grad():
            model.to_rgb.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed))
        return model

    def make_inputs(self):
        (inputs, z), _ = super().make_inputs()
        base = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(3))
        return (inputs, z, base), {}


class TestDiscriminatorContract(ModelContract):
    model_class = MultiScalePatchDiscriminator
    init_kwargs = dict(base_channels=8)
    expected_shapes = [(B, 1, H // 4, W // 4), (B, 1, H // 8, W // 8)]

    def make_inputs(self):
        return (torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(0)),), {}


class TestConditionalSpectralDiscriminatorContract(TestDiscriminatorContract):
    init_kwargs = dict(base_channels=8, condition_channels=4, spectral_norm=True)

    def make_inputs(self):
        g = torch.Generator().manual_seed(0)
        return (torch.rand(B, 3, H, W, generator=g),), {"condition": torch.rand(B, 4, H, W, generator=g)}


class TestInverseEncoderContract(ModelContract):
    model_class = InverseEncoder
    init_kwargs = dict(z_dim=4, expression_dim=6, base_channels=8, num_blocks=3)
    expected_shapes = [(B, 4), (B, 6)]

    def make_inputs(self):
        g = torch.Generator().manual_seed(0)
        return (torch.rand(B, 3, H, W, generator=g), (torch.rand(B, 1, H, W, generator=g) > 0.5).float()), {}


class TestNormalEstimatorContract(ModelContract):
    model_class = NormalEstimator
    init_kwargs = dict(base_channels=4)
    expected_shapes = [(B, 3, H, W)]

    def make_inputs(self):
        return (torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(0)),), {}


# --------------------------------------------------------------------------- generator


def _modconv_params(c_in: int, c_out: int, k: int, w_dim: int) -> int:
    return c_out * c_in * k * k + c_out + w_dim * c_in + c_in  # weight, bias, affine (w_dim -> c_in)


def test_default_generator_parameter_count_by_hand():
    # Defaults: C_s 32 (+4 raster channels), z 16, w 64, 3 scales, channels 32, 64, 64.
    w_dim, c_in = 64, 36
    mapping = (16 * 64 + 64) + (64 * 64 + 64)
    enc = (_modconv_params(c_in, 32, 3, w_dim) + _modconv_params(32, 32, 3, w_dim)
           + _modconv_params(32 + c_in, 64, 3, w_dim) + _modconv_params(64, 64, 3, w_dim)
           + _modconv_params(64 + c_in, 64, 3, w_dim) + _modconv_params(64, 64, 3, w_dim))
    dec = (_modconv_params(64 + 64, 64, 3, w_dim) + _modconv_params(64, 64, 3, w_dim)
           + _modconv_params(64 + 32, 32, 3, w_dim) + _modconv_params(32, 32, 3, w_dim))
    to_rgb = _modconv_params(32, 3, 1, w_dim)
    expected = mapping + enc + dec + to_rgb
    count = sum(p.numel() for p in GARGenerator().parameters())
    assert count == expected == 389_935
    assert 100_000 <= count <= 500_000  # CPU-demo size asked for


def test_modulated_conv_equals_per_sample_demodulated_weights():
    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 7, 3, w_dim=4)
    nn.init.normal_(conv.bias)
    x, w = torch.randn(3, 5, 9, 11), torch.randn(3, 4)
    out = conv(x, w)
    s = conv.style(w)
    for b in range(3):  # brute force: StyleGAN2 Eq. 1-3 with an explicit weight per sample
        wb = conv.weight * s[b][None, :, None, None]
        wb = wb / torch.sqrt(wb.square().sum(dim=(1, 2, 3), keepdim=True) + conv.eps)
        ref = F.conv2d(x[b : b + 1], wb, conv.bias, padding=1)
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-5, rtol=1e-5)


def test_demodulation_removes_the_style_scale_and_to_rgb_keeps_it():
    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 7, 3, w_dim=4)
    x, s = torch.randn(2, 5, 8, 8), torch.rand(2, 5) + 0.5
    torch.testing.assert_close(conv.forward_with_style(x, 3.0 * s), conv.forward_with_style(x, s), atol=1e-5, rtol=1e-5)
    rgb = ModulatedConv2d(5, 3, 1, w_dim=4, demodulate=False)
    nn.init.normal_(rgb.bias)
    b = rgb.bias[None, :, None, None]
    torch.testing.assert_close(rgb.forward_with_style(x, 3.0 * s) - b, 3.0 * (rgb.forward_with_style(x, s) - b))


@pytest.mark.parametrize("residual", [False, True])
def test_generator_uses_point_features_normals_and_z(residual):
    """At init with random features (the residual G with to_rgb moved off zero, as after training),
    changing f_s (zeroed, or channels permuted), the normal map or z moves the output by a mean
    absolute difference > 1e-3 (output range (0, 1))."""
    torch.manual_seed(0)
    gen = GARGenerator(residual=residual).eval()  # the default size the stage uses
    image = None
    if residual:
        with torch.no_grad():
            gen.to_rgb.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(4))
        image = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(5))
    inputs, z = generator_inputs(32, 16, 3)
    with torch.no_grad():
        base = gen(inputs, z, image)
        zeroed = gen([torch.cat([torch.zeros_like(x[:, :32]), x[:, 32:]], 1) for x in inputs], z, image)
        perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
        permuted = gen([torch.cat([x[:, :32][:, perm], x[:, 32:]], 1) for x in inputs], z, image)
        flipped = gen([torch.cat([x[:, :32], -x[:, 32:35], x[:, 35:]], 1) for x in inputs], z, image)
        other_z = gen(inputs, torch.randn(B, 16, generator=torch.Generator().manual_seed(2)), image)
    for name, out in (("zeroed f_s", zeroed), ("permuted f_s", permuted), ("flipped normals", flipped), ("z", other_z)):
        assert (out - base).abs().mean() > 1e-3, name
    assert base.min() > 0 and base.max() < 1


def test_residual_generator_starts_as_its_base_and_checks_it():
    """residual=True: to_rgb starts at zero, so G returns sigmoid(logit(base)) = base (clamped to
    [1e-3, 1 - 1e-3]) whatever the features and z; the base is required, and refused otherwise."""
    torch.manual_seed(0)
    gen = GARGenerator(feature_channels=5, z_dim=4, base_channels=8, w_dim=8, residual=True)
    inputs, z = generator_inputs(5, 4, 3)
    base = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(3))
    base[0, :, :4] = 1.0  # white background
    base[0, :, 4:8] = 0.0
    with torch.no_grad():
        out = gen(inputs, z, base)
        out_other_z = gen(inputs, torch.randn(B, 4), base)
    torch.testing.assert_close(out, base.clamp(1e-3, 1 - 1e-3), atol=1e-6, rtol=0)
    assert torch.equal(out, out_other_z)
    with pytest.raises(ValueError, match="pass base"):
        gen(inputs, z)
    with pytest.raises(ValueError, match="pass base"):
        gen(inputs, z, base[:, :, :-1])
    with pytest.raises(ValueError, match="residual=True"):
        GARGenerator(feature_channels=5, z_dim=4, base_channels=8, w_dim=8)(inputs, z, base)
    # one gradient step moves it off the base, towards the target
    target = torch.full_like(base, 0.25)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    before = (gen(inputs, z, base) - target).abs().mean()
    for _ in range(5):
        opt.zero_grad()
        (gen(inputs, z, base) - target).abs().mean().backward()
        opt.step()
    assert (gen(inputs, z, base) - target).abs().mean() < before - 1e-3


def test_generator_noise_only_in_training_mode():
    torch.manual_seed(0)
    gen = GARGenerator(feature_channels=5, z_dim=4, base_channels=8, w_dim=8, use_noise=True)
    with torch.no_grad():
        for block in [*gen.encoder, *gen.decoder]:
            block.noise_strength.fill_(1.0)
    inputs, z = generator_inputs(5, 4, 3)
    with torch.no_grad():
        assert not torch.equal(gen.train()(inputs, z), gen(inputs, z))
        assert torch.equal(gen.eval()(inputs, z), gen(inputs, z))


@pytest.mark.parametrize(
    "case, match",
    [
        ("two_scales", "list of 3 maps"),
        ("not_a_list", "list of 3 maps"),
        ("channels", r"inputs\[0\] must be \(B, 9, H, W\)"),
        ("odd_size", "divisible by 2\\^\\(num_scales - 1\\) = 4"),
        ("scale_size", r"inputs\[1\] must be"),
        ("z_shape", r"z must be \(B, z_dim\) = \(2, 4\)"),
    ],
)
def test_generator_rejects_bad_inputs(case, match):
    gen = GARGenerator(feature_channels=5, z_dim=4, base_channels=8, w_dim=8)
    inputs, z = generator_inputs(5, 4, 3)
    if case == "two_scales":
        inputs = inputs[:2]
    elif case == "not_a_list":
        inputs = inputs[0]
    elif case == "channels":
        inputs = [x[:, :-1] for x in inputs]
    elif case == "odd_size":
        inputs = [torch.zeros(B, 9, 30, 30), torch.zeros(B, 9, 15, 15), torch.zeros(B, 9, 7, 7)]
    elif case == "scale_size":
        inputs[1] = inputs[1][..., :-1, :]
    elif case == "z_shape":
        z = z[:, :3]
    with pytest.raises(ValueError, match=match):
        gen(inputs, z)


def test_pack_raster_inputs_order_and_errors():
    f, n, a = torch.full((1, 2, 4, 4), 5.0), torch.full((1, 3, 4, 4), 7.0), torch.full((1, 1, 4, 4), 9.0)
    x = pack_raster_inputs(f, n, a)
    assert x[0, :, 0, 0].tolist() == [5.0, 5.0, 7.0, 7.0, 7.0, 9.0]
    with pytest.raises(ValueError, match="normals"):
        pack_raster_inputs(f, n[:, :2], a)


def test_ema_update_values_and_buffers():
    torch.manual_seed(0)
    model = MultiScalePatchDiscriminator(base_channels=4, num_scales=1, spectral_norm=True)  # has buffers (_u, _v)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.0)
        for p in model.parameters():
            p.fill_(4.0)
        for b in model.buffers():
            b.fill_(2.0)
    ema_update(ema, model, decay=0.75)  # 0.75 * 0 + 0.25 * 4
    assert all(torch.equal(p, torch.ones_like(p)) for p in ema.parameters())
    assert all(torch.equal(b, torch.full_like(b, 2.0)) for b in ema.buffers())
    ema_update(ema, model, decay=1.0)
    assert all(torch.equal(p, torch.ones_like(p)) for p in ema.parameters())
    ema_update(ema, model, decay=0.0)
    assert all(torch.equal(p, torch.full_like(p, 4.0)) for p in ema.parameters())
    with pytest.raises(ValueError, match="decay"):
        ema_update(ema, model, decay=1.5)
    with pytest.raises(ValueError, match="same parameter"):
        ema_update(ema, MultiScalePatchDiscriminator(base_channels=4, num_scales=2), decay=0.5)


# --------------------------------------------------------------------------- discriminator


def test_discriminator_scales_see_the_pooled_image():
    torch.manual_seed(0)
    disc = MultiScalePatchDiscriminator(base_channels=4).eval()
    x = torch.rand(1, 3, 32, 32)
    out = disc(x)
    torch.testing.assert_close(out[0], disc.scales[0](x))
    pooled = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    torch.testing.assert_close(out[1], disc.scales[1](pooled))


def test_spectral_norm_wraps_every_convolution():
    disc = MultiScalePatchDiscriminator(base_channels=4, spectral_norm=True)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 * 4 and all(parametrize.is_parametrized(m, "weight") for m in convs)
    plain = MultiScalePatchDiscriminator(base_channels=4)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules() if isinstance(m, nn.Conv2d))


def test_discriminator_rejects_bad_inputs():
    cond = MultiScalePatchDiscriminator(base_channels=4, condition_channels=4)
    with pytest.raises(ValueError, match="conditional"):
        cond(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unconditional"):
        MultiScalePatchDiscriminator(base_channels=4)(torch.rand(1, 3, 32, 32), torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="too small"):
        cond(torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        cond(torch.rand(1, 1, 32, 32))


# --------------------------------------------------------------------------- encoder and normals


def test_inverse_encoder_mask_handling():
    enc = InverseEncoder(z_dim=4, expression_dim=6, base_channels=4, num_blocks=2)
    with pytest.raises(ValueError, match="takes the head mask"):
        enc(torch.rand(1, 3, 16, 16))
    no_mask = InverseEncoder(z_dim=4, expression_dim=6, use_mask=False, base_channels=4, num_blocks=2)
    z, e = no_mask(torch.rand(1, 3, 16, 16))
    assert z.shape == (1, 4) and e.shape == (1, 6)
    with pytest.raises(ValueError, match="use_mask=False"):
        no_mask(torch.rand(1, 3, 16, 16), torch.ones(1, 1, 16, 16))


def test_inverse_encoder_learns_expressions_of_a_tiny_batch():
    """E's expression head fits tracked codes: 80 Adam steps on 4 frames cut the L1 by 4x."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    enc = InverseEncoder(z_dim=4, expression_dim=6, base_channels=8, num_blocks=3)
    # 4 frames: one texture tinted by a different colour each
    images = torch.rand(4, 3, 1, 1, generator=g) * torch.rand(1, 3, 32, 32, generator=g)
    mask = torch.ones(4, 1, 32, 32)
    target = torch.randn(4, 6, generator=g)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        loss = (enc(images, mask)[1] - target).abs().mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 4


def test_normal_estimator_outputs_unit_normals_and_learns_a_normal_map():
    torch.manual_seed(0)
    est = NormalEstimator(base_channels=4)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 16, 16, generator=g)
    target = F.normalize(torch.randn(1, 3, 1, 1, generator=g), dim=1).expand(1, 3, 16, 16)
    out = est(image)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1, 16, 16))
    opt = torch.optim.Adam(est.parameters(), lr=1e-2)
    first = normal_consistency_loss(out, target).item()
    for _ in range(40):
        loss = normal_consistency_loss(est(image), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < min(0.05, first / 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        est(torch.rand(1, 3, 18, 16))


def test_generator_inputs_rasterize_every_scale_and_the_base_on_white():
    from models.camera import pixel_radius
    from models.rasterizer import rasterize_points
    from models.renderer import generator_inputs

    gen = torch.Generator().manual_seed(0)
    points = (torch.rand(1, 200, 3, generator=gen) - 0.5) * 0.6  # a cloud 2.5 units in front of the camera
    world_mat = torch.cat([torch.eye(3), torch.tensor([[0.0], [0.0], [2.5]])], 1)[None]
    K = torch.tensor([[[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]]])
    latent = torch.rand(200, 5, generator=gen)
    normals = torch.nn.functional.normalize(torch.randn(1, 200, 3, generator=gen), dim=-1)
    colors = torch.rand(1, 200, 3, generator=gen)
    radius = torch.tensor(0.05)
    out = generator_inputs(points, latent, normals, world_mat, K, (32, 32), 3, radius, 10, colors)
    assert [tuple(x.shape) for x in out.inputs] == [(1, 9, 32, 32), (1, 9, 16, 16), (1, 9, 8, 8)]
    # scale 1 is the rasterizer at half size with K's first two rows halved and the radius in its pixels
    K1 = K.clone()
    K1[:, :2] /= 2
    ref = rasterize_points(points, torch.cat([latent[None], normals], -1), world_mat, K1, (16, 16),
                           pixel_radius(points, world_mat, K1, radius), 10, background=0.0)
    torch.testing.assert_close(out.inputs[1], torch.cat([ref.image, ref.alpha], 1), rtol=0, atol=0)
    # the base is the colours on white; the normal map and alpha are scale 0's
    ref0 = rasterize_points(points, colors, world_mat, K, (32, 32), pixel_radius(points, world_mat, K, radius), 10,
                            background=1.0)
    torch.testing.assert_close(out.base, ref0.image, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.alpha, out.inputs[0][:, -1:], rtol=0, atol=0)
    assert generator_inputs(points, latent, normals, world_mat, K, (32, 32), 3, radius).base is None


def test_rgb_residual_adds_to_the_base_and_clamps_straight_through():
    """residual_space="rgb": G returns base + to_rgb(x) (exactly the base at init, white included),
    clamped to [0, 1]; in training mode the clamp is straight-through: a value pushed above 1 reads 1
    but keeps its gradient."""
    torch.manual_seed(0)
    gen = GARGenerator(feature_channels=5, z_dim=4, base_channels=8, w_dim=8, residual=True, residual_space="rgb")
    inputs, z = generator_inputs(5, 4, 3)
    base = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(3))
    base[0, :, :4] = 1.0
    gen.eval()
    with torch.no_grad():
        assert torch.equal(gen(inputs, z, base), base)  # to_rgb is zero at init: the base, white stays 1.0
        gen.to_rgb.bias.fill_(0.5)
        assert torch.equal(gen(inputs, z, base), (base + 0.5).clamp(0, 1))
    gen.train()
    out = gen(inputs, z, base)
    assert torch.equal(out.detach(), (base + 0.5).clamp(0, 1))
    out[0, :, :4].sum().backward()  # pixels at 1.5 read 1.0: still a gradient
    assert gen.to_rgb.bias.grad.abs().min() > 0
    with pytest.raises(ValueError, match="residual_space must be"):
        GARGenerator(residual=True, residual_space="linear")


def test_activation_gain_keeps_the_decoder_at_the_input_scale():
    """StyleGAN2's sqrt(2) after each LeakyReLU: unit-variance inputs stay about unit-variance through
    the five render blocks (ten demodulated convolutions); without it (gain 1) each layer about halves
    the variance and the decoder's output shrinks several-fold (the skips re-inject the input's scale)."""
    def decoder_std(gain: float) -> float:
        torch.manual_seed(0)
        gen = GARGenerator(feature_channels=28, z_dim=4, base_channels=16, w_dim=8, activation_gain=gain)
        inputs = [torch.randn(2, 32, 64 >> s, 64 >> s) for s in range(3)]
        seen = {}
        gen.decoder[0].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
        with torch.no_grad():
            gen(inputs, torch.zeros(2, 4))
        return float(seen["out"].std())

    assert 0.4 < decoder_std(2 ** 0.5) < 2.5
    assert decoder_std(1.0) < 0.3 * decoder_std(2 ** 0.5)


def test_pooled_pyramid_generator_takes_one_input_and_pools_the_rest_itself():
    """input_pyramid='pooled': G takes the full-size rasterization only and feeds level s its 2x2
    average-pooled copy; with the same weights it equals a rasterized-pyramid G given those pools."""
    torch.manual_seed(0)
    pooled = GARGenerator(feature_channels=5, z_dim=4, base_channels=8, w_dim=8, input_pyramid="pooled").eval()
    per_scale = GARGenerator(feature_channels=5, z_dim=4, base_channels=8, w_dim=8).eval()
    per_scale.load_state_dict(pooled.state_dict())  # the setting adds no parameter
    assert (pooled.input_scales, per_scale.input_scales) == (1, 3)
    x0, z = torch.rand(2, 9, 16, 16), torch.randn(2, 4)
    pools = [x0, F.avg_pool2d(x0, 2), F.avg_pool2d(F.avg_pool2d(x0, 2), 2)]  # level by level
    with torch.no_grad():
        torch.testing.assert_close(pooled([x0], z), per_scale(pools, z), rtol=0, atol=0)
        assert not torch.equal(per_scale(pools, z), per_scale([x0, torch.rand_like(pools[1]), pools[2]], z))
    with pytest.raises(ValueError, match=r"1 maps \(the full-size one: input_pyramid='pooled'\), got 3"):
        pooled(pools, z)
    with pytest.raises(ValueError, match="input_pyramid must be 'rasterized' or 'pooled'"):
        GARGenerator(input_pyramid="mean")


def test_gar_frame_rasterizes_once_for_a_pooled_generator_and_tiles_match_fragments():
    """The frame rasterizes the scales its generator takes; with the tile rasterizer at the required
    capacity (per scale) its generator inputs equal the fragment rasterizer's."""
    from models.renderer import GARFrame, plan_capacity
    from models.teacher import fibonacci_sphere

    gen = torch.Generator().manual_seed(1)
    n = 300
    points = fibonacci_sphere(n, 0.5)
    args = (points, torch.zeros(n, 3), 0.01 * torch.randn(n, 2, 3, generator=gen), F.normalize(points, dim=-1),
            torch.rand(n, 5, generator=gen), torch.rand(n, 3, generator=gen), torch.tensor(0.06), nn.Identity())
    world_mat = torch.cat([torch.eye(3), torch.tensor([[0.0], [0.0], [2.5]])], 1)[None].repeat(2, 1, 1)
    world_mat[1, 0, 3] = 0.2
    K = torch.tensor([[[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]]]).repeat(2, 1, 1)
    expression = torch.randn(2, 2, generator=gen)
    for pyramid, scales in (("rasterized", 3), ("pooled", 1)):
        g = GARGenerator(feature_channels=5, z_dim=4, base_channels=8, w_dim=8, input_pyramid=pyramid)
        frame = GARFrame(*args, g, 32)
        need = frame.required_capacity(expression, world_mat, K)
        assert len(need) == scales and min(need) >= 10  # ten layers where the sphere's two sides overlap
        tiled = GARFrame(*args, g, 32, tile_capacity=need)
        with torch.no_grad():
            ref, got = frame.raster_inputs(expression, world_mat, K), tiled.raster_inputs(expression, world_mat, K)
        assert len(ref.inputs) == len(got.inputs) == scales
        for a, b in zip(ref.inputs, got.inputs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert plan_capacity(44) == 56 and plan_capacity(64, 1.0) == 64 and plan_capacity(1) == 8
    for margin in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="a finite margin >= 1"):
            plan_capacity(44, margin)
    frame = GARFrame(*args, g, 32)  # plan_tiles: the tile rasterizer at the planned capacity from now on
    assert frame.plan_tiles(expression, world_mat, K) == need and frame.tile_planned_frames == 2
    assert frame.tile_capacity == [plan_capacity(n) for n in need] and frame.tile_required == need
    with pytest.raises(ValueError, match="tile_capacity must be 1 positive ints"):
        GARFrame(*args, g, 32, tile_capacity=[8, 8, 8])
