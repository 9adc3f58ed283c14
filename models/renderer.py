"""The GAR generator G: rasterized point features + a global code z -> RGB image.

Generative adversarial renderer of "Efficient Realistic Avatar Generation via Model Compression
and Enhanced Rendering" (ICLR 2024 submission; DESIGN.md, "GAR"), built from two works:

* GAR (Piao et al., CVPR 2021, "Inverting Generative Adversarial Renderer for Face
  Reconstruction"): render blocks modulated by a low-dimensional code z through a mapping
  network, the normal map resized to every block, optional per-block noise;
* NPBG (Aliev et al., ECCV 2020, "Neural Point-Based Graphics"): per-point descriptors (here the
  student's latent codes f_s) rasterized at several scales and fused by a U-Net.

Modulation is StyleGAN2's modulated convolution with demodulation (Karras et al., CVPR 2020,
Eq. 1-3), chosen over AdaIN/FiLM because it is what StyleGAN2 and GAR's render blocks use and it
keeps activations at unit scale without normalisation layers (no batch statistics under DDP):

    w'_{oik} = s_i * w_{oik},   w''_{oik} = w'_{oik} / sqrt(sum_{i,k} w'_{oik}^2 + eps),

computed "non-fused" (scale the input by s, plain convolution, scale the output by the
demodulation coefficient), which equals the per-sample weight exactly and uses one ordinary
convolution for the whole batch.

Inputs of :class:`GARGenerator` (the GAR stage rasterizes them with ``models/rasterizer.py``):
``inputs[s]`` is (B, C_s + 3 + 1, H / 2^s, W / 2^s) for s = 0 .. num_scales - 1, the channels
being the features f_s (C_s = ``feature_channels``), the camera-space normal map (3) and the alpha
mask (1) in that order (:func:`pack_raster_inputs`). H and W must be divisible by
2^(num_scales - 1) (the stage renders square 64 or 128 images).

Default architecture (``feature_channels=32, z_dim=16, num_scales=3, base_channels=32,
mapping_layers=2, w_dim=64``; channels per level ``min(base * 2^s, 2 * base)`` = 32, 64, 64):

==========  =====================================================  =========================
block       convolutions (3x3, modulated + demodulated)             resolution
==========  =====================================================  =========================
mapping     z 16 -> 64 -> 64 (Linear + LeakyReLU 0.2)                -
enc 0       (32+4) -> 32, 32 -> 32                                  H
enc 1       [avgpool(enc 0) 32, input 36] -> 64, 64 -> 64           H/2
enc 2       [avgpool(enc 1) 64, input 36] -> 64, 64 -> 64           H/4
dec 1       [up(enc 2) 64, enc 1 64] -> 64, 64 -> 64                H/2
dec 0       [up(dec 1) 64, enc 0 32] -> 32, 32 -> 32                H
to_rgb      1x1 modulated, not demodulated, 32 -> 3, sigmoid        H
==========  =====================================================  =========================

Every modulated convolution has its own affine style layer (w_dim -> its input channels, bias 1
at init) and an output bias; 389,935 parameters in all at the defaults (in the 0.1-0.5 M range
asked for a CPU demo). ``up`` is bilinear x2, ``avgpool`` a 2x2 mean.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.camera import pixel_radius, rotate_normals
from models.frame import deform_points, shade_points
from models.rasterizer import rasterize_points, rasterize_points_exportable
from models.tile_rasterizer import rasterize_points_tiled, required_tile_capacity

__all__ = [
    "GARFrame", "GARGenerator", "GeneratorInputs", "MappingNetwork", "ModulatedConv2d", "ema_update", "generator_inputs",
    "pack_raster_inputs", "PointFrame", "plan_capacity", "TILE_MARGIN",
]

_LEAK = 0.2
_BASE_EPS = 1e-3  # logit(base) is taken of base clamped to [eps, 1 - eps]


def pack_raster_inputs(features: Tensor, normals: Tensor, alpha: Tensor) -> Tensor:
    """Concatenate the rasterized channels in the order :class:`GARGenerator` expects.

    Args:
        features: (B, C_s, H, W) rasterized latent codes f_s.
        normals: (B, 3, H, W) rasterized camera-space normal map (OpenCV camera, alpha-composited).
        alpha: (B, 1, H, W) accumulated alpha (the rendered mask), in [0, 1].

    Returns:
        (B, C_s + 4, H, W): [features, normals, alpha].

    Raises:
        ValueError: when the shapes disagree.
    """
    if features.dim() != 4 or normals.dim() != 4 or alpha.dim() != 4:
        raise ValueError("features, normals and alpha must all be (B, C, H, W) tensors")
    b, _, h, w = features.shape
    if normals.shape != (b, 3, h, w) or alpha.shape != (b, 1, h, w):
        raise ValueError(
            f"expected normals (B, 3, H, W) and alpha (B, 1, H, W) with (B, H, W) = {(b, h, w)} as the "
            f"features, got {tuple(normals.shape)} and {tuple(alpha.shape)}"
        )
    return torch.cat([features, normals, alpha], dim=1)


class GeneratorInputs(NamedTuple):
    """What :func:`generator_inputs` rasterizes for G from a posed point cloud.

    Attributes:
        inputs: list over scales s of (B, C_s + 4, H / 2^s, W / 2^s) [f_s, normal map, alpha].
        normal_map: (B, 3, H, W) full-size camera-space normal map (background 0).
        alpha: (B, 1, H, W) full-size accumulated alpha.
        base: (B, 3, H, W) the rasterized colours on white, the image a residual G refines; None
            without colours.
    """

    inputs: list
    normal_map: Tensor
    alpha: Tensor
    base: Tensor | None


def generator_inputs(
    points: Tensor,
    latent: Tensor,
    normals_cam: Tensor,
    world_mat: Tensor,
    K: Tensor,
    image_size: Sequence[int],
    num_scales: int,
    radius: Tensor,
    points_per_pixel: int = 10,
    colors: Tensor | None = None,
    rasterize: Callable | Sequence[Callable] = rasterize_points,
) -> GeneratorInputs:
    """The generator's inputs: [f_s, camera-space normal] rasterized at ``num_scales`` sizes (NPBG).

    Scale s renders at (H / 2^s, W / 2^s) with the intrinsics' first two rows divided by 2^s (pixel
    edges scale with the image, centres at +0.5) and each point's world-space disk of ``radius``
    turned into pixels at that scale (:func:`models.camera.pixel_radius`), on a background of 0.
    With ``colors``, scale 0 also rasterizes them, and ``base`` is their render on white. The GAR
    stage (``rasterize_points``) and the ONNX export (``rasterize_points_exportable``) both call
    this, so they render the same inputs.

    Args:
        points: (B, N, 3) posed (deformed) world points.
        latent: (N, C_s) or (B, N, C_s) per-point latent codes f_s.
        normals_cam: (B, N, 3) camera-space unit normals.
        world_mat: (B, 3, 4) world->camera; K: (B, 3, 3) pixel intrinsics at full size.
        image_size: (H, W) full size, divisible by 2^(num_scales - 1).
        num_scales: number of scales.
        radius: () splat radius in world units.
        points_per_pixel: rasterizer setting.
        colors: optional (B, N, 3) colours for the base image.
        rasterize: :func:`models.rasterizer.rasterize_points`, its exportable form or the tile rasterizer
            (:func:`models.tile_rasterizer.rasterize_points_tiled` with its settings bound), or a list
            of ``num_scales`` of them, one per scale.

    Returns:
        :class:`GeneratorInputs`.
    """
    if latent.dim() == 2:
        latent = latent.expand(points.shape[0], -1, -1)
    c = latent.shape[-1]
    features = torch.cat([latent, normals_cam], -1)  # (B, N, C_s + 3)
    h, w = int(image_size[0]), int(image_size[1])
    rasterizers = list(rasterize) if isinstance(rasterize, (list, tuple)) else [rasterize] * num_scales
    if len(rasterizers) != num_scales:
        raise ValueError(f"rasterize must be one rasterizer or one per scale ({num_scales}), got {len(rasterizers)}")
    inputs, normal_map, alpha, base = [], None, None, None
    for s in range(num_scales):
        K_s = _intrinsics_at_scale(K, s)
        r_px = pixel_radius(points, world_mat, K_s, radius)  # (B, N)
        channels = torch.cat([features, colors], -1) if s == 0 and colors is not None else features
        out = rasterizers[s](points, channels, world_mat, K_s, (h // 2**s, w // 2**s), r_px, points_per_pixel,
                             background=0.0)
        inputs.append(pack_raster_inputs(out.image[:, :c], out.image[:, c : c + 3], out.alpha))
        if s == 0:
            normal_map, alpha = out.image[:, c : c + 3], out.alpha
            if colors is not None:
                base = out.image[:, c + 3 :] + (1.0 - out.alpha)  # the colours on white
    return GeneratorInputs(inputs, normal_map, alpha, base)


class MappingNetwork(nn.Module):
    """z -> w: ``num_layers`` Linear layers with LeakyReLU(0.2) (StyleGAN's mapping network).

    z comes from the inverse encoder E, not from a fixed prior, so its magnitude carries
    information: unlike StyleGAN, z is not pixel-normalised.

    Args:
        z_dim: size of z.
        w_dim: size of w (and of every hidden layer).
        num_layers: number of Linear layers, >= 1.

    Shapes:
        z (B, z_dim) -> w (B, w_dim).
    """

    def __init__(self, z_dim: int, w_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"mapping_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [nn.Linear(z_dim if i == 0 else w_dim, w_dim), nn.LeakyReLU(_LEAK)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution (Karras et al., CVPR 2020, Sec. 2.2, Eq. 1-3).

    The style s = A(w) (an affine layer with bias 1 at init) scales every input channel; with
    ``demodulate`` the result is divided per sample and output channel by
    sqrt(sum_{i,k} (s_i w_{oik})^2 + eps), so the output has about unit variance for unit-variance
    inputs whatever the style's scale. Computed non-fused: conv(x * s, w) * d, which equals a
    convolution with the per-sample weight d_o s_i w_{oik} (tested against it).

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: odd kernel size (padding keeps the spatial size).
        w_dim: size of the style vector w.
        demodulate: divide by the weight norm (False for the to-RGB layer, as in StyleGAN2).
        eps: added under the square root.

    Shapes:
        x (B, in_channels, H, W), w (B, w_dim) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        w_dim: int,
        demodulate: bool = True,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.eps = demodulate, eps
        fan_in = in_channels * kernel_size * kernel_size
        # Demodulated weights are scale-free; the to-RGB layer starts at unit gain (1 / sqrt(fan_in)).
        std = 1.0 if demodulate else 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) * std)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.affine = nn.Linear(w_dim, in_channels)
        nn.init.ones_(self.affine.bias)

    def style(self, w: Tensor) -> Tensor:
        """s = A(w): (B, w_dim) -> (B, in_channels)."""
        return self.affine(w)

    def forward_with_style(self, x: Tensor, s: Tensor) -> Tensor:
        """The modulated convolution with an explicit style ``s`` (B, in_channels)."""
        pad = self.kernel_size // 2
        y = F.conv2d(x * s[:, :, None, None], self.weight, padding=pad)  # (B, O, H, W)
        if self.demodulate:
            if torch.onnx.is_in_onnx_export():  # one reduction over the stored weight: the exporter's constant
                # folding would otherwise store weight.square() beside the weight (twice the bytes on disk)
                wsq = torch.linalg.vector_norm(self.weight, dim=(2, 3)).square()  # (O, I)
            else:
                wsq = self.weight.square().sum(dim=(2, 3))  # (O, I)
            d = torch.rsqrt(s.square() @ wsq.t() + self.eps)  # (B, O)
            y = y * d[:, :, None, None]
        return y + self.bias[None, :, None, None]

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.forward_with_style(x, self.style(w))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"demodulate={self.demodulate}"
        )


class _RenderBlock(nn.Module):
    """Two modulated 3x3 convolutions, each followed by optional noise and LeakyReLU(0.2) times ``gain``."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, use_noise: bool, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = float(gain)
        self.conv1 = ModulatedConv2d(in_channels, out_channels, 3, w_dim)
        self.conv2 = ModulatedConv2d(out_channels, out_channels, 3, w_dim)
        self.use_noise = use_noise
        if use_noise:  # GAR/StyleGAN2 per-block noise, strength learned per layer, 0 at init
            self.noise_strength = nn.Parameter(torch.zeros(2))

    def _noise(self, y: Tensor, i: int) -> Tensor:
        if not (self.use_noise and self.training):
            return y
        noise = torch.randn(y.shape[0], 1, y.shape[2], y.shape[3], device=y.device, dtype=y.dtype)
        return y + self.noise_strength[i] * noise

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        x = F.leaky_relu(self._noise(self.conv1(x, w), 0), _LEAK)
        x = x * self.gain if self.gain != 1.0 else x
        x = F.leaky_relu(self._noise(self.conv2(x, w), 1), _LEAK)
        return x * self.gain if self.gain != 1.0 else x


class GARGenerator(nn.Module):
    """GAR generator: multi-scale rasterized features + normal map + mask, modulated by z -> RGB.

    A U-Net (NPBG, Aliev et al. ECCV 2020) whose encoder level s takes the average-pooled output of
    level s - 1 concatenated with the rasterized input at that scale, and whose decoder upsamples
    and concatenates the encoder's skips. Every 3x3 convolution is a StyleGAN2 modulated,
    demodulated convolution (Karras et al., CVPR 2020) driven by w = mapping(z), as GAR's render
    blocks (Piao et al., CVPR 2021). The module docstring has the layer table.

    Args:
        feature_channels: C_s, channels of the student's latent codes f_s.
        z_dim: size of the global code z (lighting and other factors the geometry does not carry).
        num_scales: number of input scales (full, 1/2, 1/4, ... resolution) = U-Net levels.
        base_channels: channels at full resolution; level s has min(base * 2^s, 2 * base).
        mapping_layers: Linear layers of the mapping network (>= 1).
        w_dim: size of w.
        use_noise: per-block noise (GAR). Applied in training mode only, so evaluation is
            deterministic; off by default.
        residual: refine a base image instead of drawing from scratch: the output is
            sigmoid(to_rgb(x) + logit(base)) with ``to_rgb``'s weights zero at init, so G starts
            as the base (the student's rule-based render) and learns what the rasterizer misses
            (our choice; the paper's G draws from the features alone, which the default keeps).
        residual_space: where a residual G adds its correction. ``"logit"``: sigmoid(to_rgb(x) +
            logit(base)), base clamped to [1e-3, 1 - 1e-3] (turning a white pixel into skin then
            needs a logit step of about -6.5: the silhouette is stiff); ``"rgb"``: base + to_rgb(x),
            the same step everywhere, clamped to [0, 1] (in training mode a straight-through clamp:
            the gradient passes as if unclamped, so a pixel pushed past 1 can be pulled back).
        activation_gain: multiplies every LeakyReLU's output. StyleGAN2 uses sqrt(2) (its ``bias_act``
            gain for lrelu), which keeps unit-variance activations unit-variance through the
            demodulated convolutions; at 1.0 (the first version, kept for its checkpoints) each layer
            roughly halves the variance, the decoder's output is ~1/40 of its input's scale, and
            Adam's steps on ``to_rgb`` barely move the image (G learnt almost nothing in a CPU demo).
        input_pyramid: where the inputs of the lower levels come from. ``"rasterized"`` (NPBG, the
            default): one rasterization per scale, ``num_scales`` inputs. ``"pooled"``: one input at
            full size, and level s takes its 2x2 average-pooled copy at 1/2^s: a device rasterizes once
            instead of ``num_scales`` times (the channels are premultiplied by alpha on a zero
            background, so pooling is the alpha-weighted downsample; our choice, for the device path).

    Shapes:
        inputs: list of :attr:`input_scales` tensors (``num_scales``, or 1 when pooled), inputs[s]
        (B, C_s + 4, H / 2^s, W / 2^s) float, channels [f_s, camera-space normal (3), alpha (1)]
        (:func:`pack_raster_inputs`);
        z: (B, z_dim); base: (B, 3, H, W) in [0, 1], required when ``residual``, else None.
        Output: (B, 3, H, W) RGB in (0, 1) (sigmoid).

    Raises:
        ValueError: (forward) when the number of scales, a shape or the divisibility of H, W by
            2^(num_scales - 1) is wrong.
    """

    def __init__(
        self,
        feature_channels: int = 32,
        z_dim: int = 16,
        num_scales: int = 3,
        base_channels: int = 32,
        mapping_layers: int = 2,
        w_dim: int = 64,
        use_noise: bool = False,
        residual: bool = False,
        residual_space: str = "logit",
        activation_gain: float = 1.0,
        input_pyramid: str = "rasterized",
    ) -> None:
        super().__init__()
        if residual_space not in ("logit", "rgb"):
            raise ValueError(f"residual_space must be 'logit' or 'rgb', got {residual_space!r}")
        if input_pyramid not in ("rasterized", "pooled"):
            raise ValueError(f"input_pyramid must be 'rasterized' or 'pooled', got {input_pyramid!r}")
        self.input_pyramid = input_pyramid
        #: how many rasterized inputs :meth:`forward` takes (``num_scales``, or 1 when pooled)
        self.input_scales = num_scales if input_pyramid == "rasterized" else 1
        if feature_channels < 1 or z_dim < 1 or num_scales < 1 or base_channels < 1 or w_dim < 1:
            raise ValueError(
                "feature_channels, z_dim, num_scales, base_channels and w_dim must be positive, got "
                f"{feature_channels}, {z_dim}, {num_scales}, {base_channels}, {w_dim}"
            )
        self.feature_channels, self.z_dim, self.num_scales = feature_channels, z_dim, num_scales
        self.in_channels = feature_channels + 4
        ch = [min(base_channels * 2**s, 2 * base_channels) for s in range(num_scales)]
        self.channels = ch
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers)
        self.encoder = nn.ModuleList(
            _RenderBlock(self.in_channels + (ch[s - 1] if s > 0 else 0), ch[s], w_dim, use_noise, activation_gain)
            for s in range(num_scales)
        )
        self.decoder = nn.ModuleList(
            _RenderBlock(ch[s + 1] + ch[s], ch[s], w_dim, use_noise, activation_gain) for s in range(num_scales - 1)
        )  # decoder[s] outputs level s
        self.to_rgb = ModulatedConv2d(ch[0], 3, 1, w_dim, demodulate=False)
        self.residual = bool(residual)
        self.residual_space = residual_space
        if self.residual:
            nn.init.zeros_(self.to_rgb.weight)  # start as the base image

    def _check(self, inputs: Sequence[Tensor], z: Tensor, base: Tensor | None = None) -> None:
        if not isinstance(inputs, (list, tuple)) or len(inputs) != self.input_scales:
            got = len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__
            what = "one per scale" if self.input_pyramid == "rasterized" else "the full-size one: input_pyramid='pooled'"
            raise ValueError(f"inputs must be a list of {self.input_scales} maps ({what}), got {got}")
        x0 = inputs[0]
        if x0.dim() != 4 or x0.shape[1] != self.in_channels:
            raise ValueError(
                f"inputs[0] must be (B, {self.in_channels}, H, W) = features ({self.feature_channels}) + "
                f"normal (3) + alpha (1), got {tuple(x0.shape)}"
            )
        b, _, h, w = x0.shape
        m = 2 ** (self.num_scales - 1)
        if h % m or w % m:
            raise ValueError(
                f"H and W must be divisible by 2^(num_scales - 1) = {m}, got {h}x{w}: render at a size "
                "that is a multiple of it (e.g. 64 or 128)"
            )
        for s, x in enumerate(inputs):
            want = (b, self.in_channels, h >> s, w >> s)
            if tuple(x.shape) != want:
                raise ValueError(f"inputs[{s}] must be (B, C_s + 4, H/2^{s}, W/2^{s}) = {want}, got {tuple(x.shape)}")
        if z.shape != (b, self.z_dim):
            raise ValueError(f"z must be (B, z_dim) = ({b}, {self.z_dim}), got {tuple(z.shape)}")
        if self.residual and (base is None or tuple(base.shape) != (b, 3, h, w)):
            got = None if base is None else tuple(base.shape)
            raise ValueError(f"this generator refines a base image (residual=True): pass base (B, 3, H, W) = "
                             f"{(b, 3, h, w)}, got {got}")
        if not self.residual and base is not None:
            raise ValueError("base is only used by a generator built with residual=True")

    def forward(self, inputs: Sequence[Tensor], z: Tensor, base: Tensor | None = None) -> Tensor:
        self._check(inputs, z, base)
        if self.input_pyramid == "pooled":
            inputs = list(inputs)
            while len(inputs) < self.num_scales:
                inputs.append(F.avg_pool2d(inputs[-1], 2))  # (B, C_s + 4, H / 2^s, W / 2^s)
        w = self.mapping(z)  # (B, w_dim)
        skips = []
        x = inputs[0]
        for s, block in enumerate(self.encoder):
            if s > 0:
                x = torch.cat([F.avg_pool2d(x, 2), inputs[s]], dim=1)  # (B, ch[s-1] + C_s + 4, H/2^s, W/2^s)
            x = block(x, w)  # (B, ch[s], H/2^s, W/2^s)
            skips.append(x)
        for s in range(self.num_scales - 2, -1, -1):
            up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.decoder[s](torch.cat([up, skips[s]], dim=1), w)  # (B, ch[s], H/2^s, W/2^s)
        logits = self.to_rgb(x, w)  # (B, 3, H, W)
        if self.residual and self.residual_space == "rgb":
            out = base + logits
            clamped = out.clamp(0.0, 1.0)
            # training: straight-through (the value clamped, the gradient as if not), so D, N and E see
            # images in [0, 1] while a pixel pushed past 1 can still be pulled back
            return out + (clamped - out).detach() if self.training else clamped
        if self.residual:
            logits = logits + torch.logit(base.clamp(0.0, 1.0), eps=_BASE_EPS)
        return torch.sigmoid(logits)


@torch.no_grad()
def ema_update(ema_module: nn.Module, module: nn.Module, decay: float) -> None:
    """Exponential moving average of a module's parameters, in place (the EMA generator).

    ema <- lerp(module, ema, decay), i.e. ema = decay * ema + (1 - decay) * module, via
    ``torch.lerp(ema, param, 1 - decay)`` for every parameter (as StyleGAN2-ADA's G_ema); buffers
    are copied as they are (spectral-norm vectors, counters).

    Args:
        ema_module: the averaged copy (same class and structure as ``module``); updated in place.
        module: the trained module.
        decay: in [0, 1]; 0 copies ``module``, 1 leaves ``ema_module`` unchanged.

    Raises:
        ValueError: when decay is outside [0, 1] or the two modules' parameter/buffer names or
            shapes differ.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    ema_params, params = dict(ema_module.named_parameters()), dict(module.named_parameters())
    ema_bufs, bufs = dict(ema_module.named_buffers()), dict(module.named_buffers())
    if ema_params.keys() != params.keys() or ema_bufs.keys() != bufs.keys():
        raise ValueError("ema_module and module must have the same parameter and buffer names (an EMA copy)")
    for name, p in params.items():
        e = ema_params[name]
        if e.shape != p.shape:
            raise ValueError(f"parameter {name!r}: ema shape {tuple(e.shape)} != module shape {tuple(p.shape)}")
        e.lerp_(p.to(e.dtype), 1.0 - decay)
    for name, b in bufs.items():
        ema_bufs[name].copy_(b)


#: A planned tile capacity = the required one on the planning frames x this (poses not planned on).
TILE_MARGIN = 1.25


def plan_capacity(required: int, margin: float = TILE_MARGIN, multiple: int = 8) -> int:
    """A tile capacity for :func:`models.tile_rasterizer.rasterize_points_tiled`: ``required`` (the
    smallest exact one on the frames planned on, :func:`~models.tile_rasterizer.required_tile_capacity`)
    times ``margin`` for poses not planned on, rounded up to a multiple of ``multiple``.

    Raises:
        ValueError: ``required < 1``, ``margin`` not a finite number >= 1, or ``multiple < 1``.
    """
    if required < 1 or not (math.isfinite(margin) and margin >= 1) or multiple < 1:
        raise ValueError(f"need required >= 1, a finite margin >= 1 and multiple >= 1, got {required}, {margin}, "
                         f"{multiple}")
    return -(-math.ceil(required * margin) // multiple) * multiple


def _intrinsics_at_scale(K: Tensor, s: int) -> Tensor:
    """K (B, 3, 3) for an image 2^s times smaller: the first two rows divided by 2^s (pixel edges scale
    with the image, centres stay at +0.5)."""
    K_s = K.clone()
    K_s[:, :2] = K_s[:, :2] / 2**s
    return K_s


class _Rasterizes:
    """The rasterizer choice of the frame modules: the fragment rasterizer (eager, or its exportable
    form) or, with ``tile_capacity`` set (one per scale), the tile rasterizer, in eager and export alike."""

    num_scales = 1
    tile_capacity: list[int] | None
    tile_size: int | None
    exportable: bool
    #: set by :meth:`plan_tiles`: the exact capacity per scale on the frames planned on, and how many
    tile_required: list[int] | None = None
    tile_planned_frames: int | None = None

    def _set_tiles(self, tile_capacity: Sequence[int] | None, tile_size: int | None) -> None:
        if tile_capacity is not None:
            tile_capacity = [int(c) for c in tile_capacity]
            if len(tile_capacity) != self.num_scales or min(tile_capacity) < 1:
                raise ValueError(f"tile_capacity must be {self.num_scales} positive ints (one per scale), "
                                 f"got {tile_capacity}")
        if tile_size is not None and (not isinstance(tile_size, int) or tile_size < 1):
            raise ValueError(f"tile_size must be a positive int or None (by image size), got {tile_size!r}")
        self.tile_capacity, self.tile_size = tile_capacity, tile_size

    def rasterizers(self) -> list[Callable]:
        """One rasterizer per scale."""
        if self.tile_capacity is not None:
            return [functools.partial(rasterize_points_tiled, tile_size=self.tile_size, tile_capacity=c)
                    for c in self.tile_capacity]
        return [rasterize_points_exportable if self.exportable else rasterize_points] * self.num_scales

    @torch.no_grad()
    def required_capacity(self, expression: Tensor, world_mat: Tensor, K: Tensor, chunk: int | None = None
                          ) -> list[int]:
        """Per scale, the smallest tile capacity that renders these frames exactly
        (:func:`models.tile_rasterizer.required_tile_capacity`, ``chunk`` frames at a time).

        Args:
            expression (B, E), world_mat (B, 3, 4), K (B, 3, 3): the frames, K at full size.
            chunk: frames per pass (default: 8 at 128 pixels, scaled by the image area; the memory is about
                chunk x pixels x the largest tile overlap).

        Returns:
            one int per scale.
        """
        need = [1] * self.num_scales
        chunk = chunk or max(1, 8 * 128 * 128 // self.image_size**2)
        for i in range(0, expression.shape[0], chunk):
            e, w, k = expression[i : i + chunk], world_mat[i : i + chunk, :3], K[i : i + chunk]
            points = deform_points(self.points, self.offset, self.blendshapes, e)
            for s in range(self.num_scales):
                k_s = _intrinsics_at_scale(k, s)
                size = self.image_size // 2**s
                r_px = pixel_radius(points, w, k_s, self.radius)
                need[s] = max(need[s], required_tile_capacity(points, w, k_s, size, r_px, self.points_per_pixel,
                                                              tile_size=self.tile_size)[0])
        return need

    def plan_tiles(self, expression: Tensor, world_mat: Tensor, K: Tensor, margin: float = TILE_MARGIN) -> list[int]:
        """Rasterize with the tile rasterizer from now on, its capacity per scale planned on these frames:
        :func:`plan_capacity` of :meth:`required_capacity` (kept in ``tile_required``, with the number of
        frames in ``tile_planned_frames``). Arguments as :meth:`required_capacity`; returns the required
        capacities.

        Raises:
            ValueError: a margin that is not a finite number >= 1.
        """
        required = self.required_capacity(expression, world_mat, K)
        self._set_tiles([plan_capacity(n, margin) for n in required], self.tile_size)
        self.tile_required, self.tile_planned_frames = required, int(expression.shape[0])
        return required


class GARFrame(_Rasterizes, nn.Module):
    """One frame of the GAR from the student's cached canonical outputs: deform by the expression,
    shade (a residual G's base image), rasterize [f_s, camera-space normal] at every scale, generate.

    The one frame path: the GAR stage renders every row through it (with its EMA generator, or G
    while training) and the ONNX export writes it as it is, with ``exportable=True`` (the
    export-friendly rasterizer, bit-equal to :func:`models.rasterizer.rasterize_points` in PyTorch).

    Args:
        points, offset, normals: (N, 3) canonical points, offsets and unit normals.
        blendshapes: (N, E, 3) expression blendshapes.
        feature: (N, C_s) the student's latent codes f_s.
        albedo: (N, 3) the student's albedo (the base image of a residual generator; else unused).
        radius: () splat radius in canonical (world) units.
        shading: the student's shading MLP (camera-space normals -> shading; residual generators).
        generator: the :class:`GARGenerator` it renders with (shared, not copied).
        image_size: S, the square output size (a multiple of 2^(num_scales - 1)).
        points_per_pixel: rasterizer setting.
        exportable: rasterize with :func:`models.rasterizer.rasterize_points_exportable` (ONNX).
        tile_capacity: one capacity per scale: rasterize with the tile rasterizer
            (:func:`models.tile_rasterizer.rasterize_points_tiled`, the fast exported path; exact while
            no tile needs more, :meth:`required_capacity`), in eager mode and in the export alike;
            None (default): the fragment rasterizer.
        tile_size: the tile rasterizer's tile side in pixels at every scale; None (default): by each
            scale's size (:func:`models.tile_rasterizer.default_tile_size`).

    Shapes:
        forward(expression (B, E), world_mat (B, 3, 4), K (B, 3, 3), z (B, z_dim)) -> (B, 3, S, S)
        RGB in (0, 1).

    Raises:
        ValueError: inconsistent shapes, or an ``image_size`` the generator's scales cannot divide.
    """

    def __init__(self, points: Tensor, offset: Tensor, blendshapes: Tensor, normals: Tensor, feature: Tensor,
                 albedo: Tensor, radius: Tensor, shading: nn.Module, generator: GARGenerator, image_size: int,
                 points_per_pixel: int = 10, exportable: bool = False, tile_capacity: Sequence[int] | None = None,
                 tile_size: int | None = None) -> None:
        super().__init__()
        n = points.shape[0]
        for name, t, shape in (("points", points, (n, 3)), ("offset", offset, (n, 3)), ("normals", normals, (n, 3)),
                               ("albedo", albedo, (n, 3)), ("feature", feature, (n, generator.feature_channels))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must be {shape} for this generator, got {tuple(t.shape)}")
        if blendshapes.dim() != 3 or blendshapes.shape[0] != n or blendshapes.shape[2] != 3:
            raise ValueError(f"blendshapes must be (N, E, 3) with N = {n}, got {tuple(blendshapes.shape)}")
        if image_size < 1 or image_size % 2 ** (generator.num_scales - 1):
            raise ValueError(f"image_size must be a positive multiple of 2^(num_scales - 1) = "
                             f"{2 ** (generator.num_scales - 1)}, got {image_size}")
        for name, t in (("points", points), ("offset", offset), ("blendshapes", blendshapes), ("normals", normals),
                        ("feature", feature), ("albedo", albedo)):
            self.register_buffer(name, t)
        self.register_buffer("radius", torch.as_tensor(radius).reshape(()))
        self.shading, self.generator = shading, generator
        self.image_size, self.points_per_pixel, self.exportable = int(image_size), int(points_per_pixel), exportable
        self.num_scales = generator.input_scales  # the scales it rasterizes
        self._set_tiles(tile_capacity, tile_size)

    @classmethod
    def from_canonical(cls, canonical, radius: Tensor, shading: nn.Module, generator: GARGenerator, image_size: int,
                       points_per_pixel: int = 10, exportable: bool = False, **tiles) -> GARFrame:
        """The frame of a student's canonical outputs (``points``, ``offset``, ``blendshapes``, ``normals``,
        ``feature``, ``albedo``); the other arguments as the constructor's (``tiles``: ``tile_capacity``,
        ``tile_size``)."""
        return cls(canonical.points, canonical.offset, canonical.blendshapes, canonical.normals, canonical.feature,
                   canonical.albedo, radius, shading, generator, image_size, points_per_pixel, exportable, **tiles)

    @property
    def expression_dim(self) -> int:
        """E, the expression code size."""
        return self.blendshapes.shape[1]

    def raster_inputs(self, expression: Tensor, world_mat: Tensor, K: Tensor, feature: Tensor | None = None,
                      rasterize: Callable | None = None) -> GeneratorInputs:
        """The generator's inputs (:func:`generator_inputs`) of frames posed by ``expression`` (B, E).

        Args:
            expression, world_mat, K: (B, E), (B, 3, 4), (B, 3, 3).
            feature: (N, C_s) point features to rasterize instead of the held f_s (the feature ablation).
            rasterize: the rasterizer, or one per scale (default :meth:`rasterizers`).
        """
        points = deform_points(self.points, self.offset, self.blendshapes, expression)  # (B, N, 3)
        normals_cam = rotate_normals(self.normals, world_mat)  # (B, N, 3)
        colors = shade_points(self.shading, self.normals, self.albedo, world_mat)[0] if self.generator.residual else None
        if rasterize is None:
            rasterize = self.rasterizers()
        return generator_inputs(
            points, self.feature if feature is None else feature, normals_cam, world_mat, K,
            (self.image_size, self.image_size), self.generator.input_scales, self.radius, self.points_per_pixel,
            colors, rasterize=rasterize,
        )

    def forward(self, expression: Tensor, world_mat: Tensor, K: Tensor, z: Tensor) -> Tensor:
        inputs = self.raster_inputs(expression, world_mat, K)
        return self.generator(inputs.inputs, z, inputs.base)


class PointFrame(_Rasterizes, nn.Module):
    """One frame of a rasterized point avatar (the teacher's or a student's per-frame path) from its
    cached canonical outputs: deform by the expression, shade for the camera, rasterize the colours
    on white. What the teacher and distillation stages render per frame, as one module a runtime can
    take: the per-frame budget (``benchmarks/bench_budget.py``) times it in PyTorch and, exported with
    ``exportable=True``, in ONNX Runtime.

    Args:
        points, offset, normals, albedo: (N, 3) canonical points, offsets, unit normals and albedo.
        blendshapes: (N, E, 3) expression blendshapes.
        radius: () splat radius in canonical (world) units.
        shading: the avatar's shading MLP (camera-space normals -> shading).
        image_size: S, the square output size.
        points_per_pixel: rasterizer setting.
        exportable: rasterize with :func:`models.rasterizer.rasterize_points_exportable` (ONNX).
        tile_capacity: ``[capacity]``: rasterize with the tile rasterizer, as :class:`GARFrame`.
        tile_size: the tile rasterizer's tile side in pixels; None (default): by the image size.

    Shapes:
        forward(expression (B, E), world_mat (B, 3, 4), K (B, 3, 3)) -> (B, 3, S, S) RGB in [0, 1].

    Raises:
        ValueError: inconsistent shapes or an ``image_size`` < 1.
    """

    def __init__(self, points: Tensor, offset: Tensor, blendshapes: Tensor, normals: Tensor, albedo: Tensor,
                 radius: Tensor, shading: nn.Module, image_size: int, points_per_pixel: int = 10,
                 exportable: bool = False, tile_capacity: Sequence[int] | None = None,
                 tile_size: int | None = None) -> None:
        super().__init__()
        n = points.shape[0]
        for name, t in (("offset", offset), ("normals", normals), ("albedo", albedo), ("points", points)):
            if tuple(t.shape) != (n, 3):
                raise ValueError(f"{name} must be ({n}, 3), got {tuple(t.shape)}")
        if blendshapes.dim() != 3 or blendshapes.shape[0] != n or blendshapes.shape[2] != 3:
            raise ValueError(f"blendshapes must be (N, E, 3) with N = {n}, got {tuple(blendshapes.shape)}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        for name, t in (("points", points), ("offset", offset), ("blendshapes", blendshapes), ("normals", normals),
                        ("albedo", albedo)):
            self.register_buffer(name, t)
        self.register_buffer("radius", torch.as_tensor(radius).reshape(()))
        self.shading = shading
        self.image_size, self.points_per_pixel, self.exportable = int(image_size), int(points_per_pixel), exportable
        self._set_tiles(tile_capacity, tile_size)

    @classmethod
    def from_canonical(cls, canonical, radius: Tensor, shading: nn.Module, image_size: int,
                       points_per_pixel: int = 10, exportable: bool = False, **tiles) -> PointFrame:
        """The frame of a model's canonical outputs (``points``, ``offset``, ``blendshapes``, ``normals``,
        ``albedo``: the teacher's or a student's); the other arguments as the constructor's (``tiles``:
        ``tile_capacity``, ``tile_size``)."""
        return cls(canonical.points, canonical.offset, canonical.blendshapes, canonical.normals, canonical.albedo,
                   radius, shading, image_size, points_per_pixel, exportable, **tiles)

    @property
    def expression_dim(self) -> int:
        """E, the expression code size."""
        return self.blendshapes.shape[1]

    def forward(self, expression: Tensor, world_mat: Tensor, K: Tensor) -> Tensor:
        points = deform_points(self.points, self.offset, self.blendshapes, expression)  # (B, N, 3)
        colors = shade_points(self.shading, self.normals, self.albedo, world_mat)[0]  # (B, N, 3)
        r_px = pixel_radius(points, world_mat, K, self.radius)  # (B, N)
        return self.rasterizers()[0](points, colors, world_mat, K, (self.image_size, self.image_size), r_px,
                                     self.points_per_pixel, background=1.0).image
