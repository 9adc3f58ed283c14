"""The GAR discriminator D: a multi-scale PatchGAN.

Chosen over a StyleGAN2 residual D because the GAR stage trains at 64-128 px on CPU: patch
logits give many real/fake decisions per image from a small network, and the coarse scale sees the
whole head. Structure as pix2pixHD's multi-scale discriminator (Wang et al., CVPR 2018; PatchGAN
of Isola et al., CVPR 2017), without normalisation layers (no batch statistics under DDP, and R1
(Mescheder et al., ICML 2018) is the regulariser, as in StyleGAN2, Karras et al. CVPR 2020);
spectral normalisation (Miyato et al., ICLR 2018) is optional.

Per scale (``base_channels = c``, ``num_layers = 3``): conv 4x4 stride 2 (in -> c), conv 4x4
stride 2 (c -> 2c), conv 3x3 (2c -> 4c), each + LeakyReLU(0.2), then conv 3x3 (4c -> 1) -> a
logit map of (H / 2^(s + 2), W / 2^(s + 2)) at scale s. Scale s + 1 sees the input average-pooled
(3x3, stride 2, padding 1, padding not counted). 2 x 109,409 = 218,818 parameters at the defaults.

Conditioning (``condition_channels``): off by default (0): D judges the image alone, and the
geometry is enforced on G by the normal-consistency and z-swap losses (``models/gan_losses.py``).
With ``condition_channels=4`` the stage can pass the rasterized normal map and mask, concatenated
to the image as extra input channels (a conditional PatchGAN, pix2pix style); the R1 penalty is
then taken w.r.t. the image only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = ["MultiScalePatchDiscriminator", "PatchDiscriminator"]

_LEAK = 0.2


class PatchDiscriminator(nn.Module):
    """One PatchGAN: ``num_layers`` LeakyReLU convolutions (the first ``num_layers - 1`` 4x4
    stride 2, the last 3x3 stride 1; channels c, 2c, 4c, ... capped at 8c) and a 3x3 logit conv.

    Args:
        in_channels: input channels (3 + condition channels).
        base_channels: c.
        num_layers: >= 2.
        spectral_norm: wrap every convolution in spectral normalisation.

    Shapes:
        (B, in_channels, H, W) -> (B, 1, H / 2^(num_layers - 1), W / 2^(num_layers - 1)) logits
        (floor division at each stride).
    """

    def __init__(self, in_channels: int, base_channels: int = 32, num_layers: int = 3, spectral_norm: bool = False):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2, got {num_layers}")
        wrap = _spectral_norm if spectral_norm else (lambda m: m)
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(num_layers):
            c_out = base_channels * min(2**i, 8)
            conv = nn.Conv2d(c_in, c_out, 4, 2, 1) if i < num_layers - 1 else nn.Conv2d(c_in, c_out, 3, 1, 1)
            layers += [wrap(conv), nn.LeakyReLU(_LEAK)]
            c_in = c_out
        layers.append(wrap(nn.Conv2d(c_in, 1, 3, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits (B, 1, h, w); with ``return_features`` also every LeakyReLU's output (feature matching)."""
        if not return_features:
            return self.net(x)
        features = []
        for layer in self.net:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                features.append(x)
        return x, features


class MultiScalePatchDiscriminator(nn.Module):
    """Multi-scale PatchGAN discriminator (pix2pixHD-style) for the GAR stage.

    Args:
        in_channels: image channels (3).
        condition_channels: extra input channels concatenated to the image (0: unconditional,
            the default; 4: normal map + mask).
        base_channels: channels of the first conv of each PatchGAN.
        num_scales: number of image scales (full, 1/2, ...), one PatchGAN each.
        num_layers: conv layers per PatchGAN (before the logit conv).
        spectral_norm: spectral normalisation on every convolution (off by default).

    Shapes:
        image (B, in_channels, H, W) float, typically [0, 1]; condition (B, condition_channels, H, W)
        or None. Output: list of ``num_scales`` logit maps, [s] of shape
        (B, 1, ~H / 2^(s + num_layers - 1), ~W / 2^(s + num_layers - 1)); losses average over them
        (``models/gan_losses.py``). With ``return_features=True``: (that list, per scale the list of
        its ``num_layers`` LeakyReLU outputs), the activations feature matching compares.

    Raises:
        ValueError: (forward) when the shapes are wrong, a condition is missing or unexpected, or
            the image is too small for the coarsest scale (min(H, W) >= 2^(num_scales + num_layers - 2)).
    """

    def __init__(
        self,
        in_channels: int = 3,
        condition_channels: int = 0,
        base_channels: int = 32,
        num_scales: int = 2,
        num_layers: int = 3,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_scales < 1 or in_channels < 1 or condition_channels < 0:
            raise ValueError(
                f"need num_scales >= 1, in_channels >= 1, condition_channels >= 0, got "
                f"{num_scales}, {in_channels}, {condition_channels}"
            )
        self.in_channels, self.condition_channels = in_channels, condition_channels
        self.num_scales, self.num_layers = num_scales, num_layers
        self.scales = nn.ModuleList(
            PatchDiscriminator(in_channels + condition_channels, base_channels, num_layers, spectral_norm)
            for _ in range(num_scales)
        )

    def forward(
        self, image: Tensor, condition: Tensor | None = None, return_features: bool = False
    ) -> list[Tensor] | tuple[list[Tensor], list[list[Tensor]]]:
        if image.dim() != 4 or image.shape[1] != self.in_channels:
            raise ValueError(f"image must be (B, {self.in_channels}, H, W), got {tuple(image.shape)}")
        b, _, h, w = image.shape
        min_size = 2 ** (self.num_scales + self.num_layers - 2)
        if min(h, w) < min_size:
            raise ValueError(f"image {h}x{w} is too small: this discriminator needs H, W >= {min_size}")
        x = image
        if self.condition_channels:
            if condition is None or condition.shape != (b, self.condition_channels, h, w):
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(
                    f"this discriminator is conditional: pass condition (B, {self.condition_channels}, H, W) = "
                    f"{(b, self.condition_channels, h, w)}, got {got}"
                )
            x = torch.cat([image, condition.to(image.dtype)], dim=1)  # (B, 3 + Cc, H, W)
        elif condition is not None:
            raise ValueError("this discriminator is unconditional (condition_channels=0): do not pass a condition")
        out, features = [], []
        for s, d in enumerate(self.scales):
            if s > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            if return_features:
                logits, feats = d(x, return_features=True)
                out.append(logits)  # (B, 1, h_s, w_s)
                features.append(feats)  # num_layers maps (B, C_i, h_i, w_i)
            else:
                out.append(d(x))
        return (out, features) if return_features else out
