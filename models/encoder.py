"""The inverse renderer E (image -> z, expression) and the normal estimator of the GAR stage.

Inverting GAR (Piao et al., CVPR 2021) maps an image to the renderer's inputs: geometry
parameters and the global code z. Here the geometry is the student's avatar driven by an
expression code (DESIGN.md, "GAR"), so :class:`InverseEncoder` predicts (z, expression) with a
small convolutional encoder, global average pooling and two linear heads. Its expression head is
supervised by the tracked expression; z is learned through the reconstruction loss of
G(raster(student(E_expr(frame))), E_z(frame)).

GAR's normal-consistency loss compares the normals estimated from a generated image with the
input normal map, using a pretrained face-normal estimator. None can be downloaded here, so
:class:`NormalEstimator` is a tiny learnable U-Net trained jointly in the GAR stage on the real
frames against their rasterized normal maps (under the mask); the normal-consistency and z-swap
losses (``models/gan_losses.py``) then apply it to G's outputs. This is our adaptation, not
GAR's exact setup: the estimator is only as good as what it learned from the student's normals on
real frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InverseEncoder", "NormalEstimator"]

_LEAK = 0.2


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.LeakyReLU(_LEAK))


class InverseEncoder(nn.Module):
    """Inverse renderer E: frame (+ head mask) -> (z, expression).

    Layers: a 3x3 stem (in -> c), then ``num_blocks`` 3x3 stride-2 convolutions with channels
    min(c * 2^(i+1), max_channels), each + LeakyReLU(0.2); global average pooling; two Linear
    heads. At the defaults (c = 32, 4 blocks, cap 128, z 16, E 16): 392,832 parameters.

    Args:
        z_dim: size of the global code z (the generator's ``z_dim``).
        expression_dim: E, the dataset's expression-code size (the student's input space).
        use_mask: take the head mask as a 4th input channel (then ``mask`` is required).
        base_channels: c.
        num_blocks: number of stride-2 blocks.
        max_channels: channel cap.

    Shapes:
        image (B, 3, H, W) float in [0, 1]; mask (B, 1, H, W) in [0, 1] when ``use_mask``.
        Returns (z (B, z_dim), expression (B, expression_dim)), float.

    Raises:
        ValueError: (forward) on wrong shapes, a missing mask when ``use_mask``, or a mask passed
            to an encoder built without one.
    """

    def __init__(
        self,
        z_dim: int = 16,
        expression_dim: int = 16,
        use_mask: bool = True,
        base_channels: int = 32,
        num_blocks: int = 4,
        max_channels: int = 128,
    ) -> None:
        super().__init__()
        if min(z_dim, expression_dim, base_channels, num_blocks, max_channels) < 1:
            raise ValueError("z_dim, expression_dim, base_channels, num_blocks and max_channels must be positive")
        self.z_dim, self.expression_dim, self.use_mask = z_dim, expression_dim, use_mask
        layers: list[nn.Module] = [_conv(4 if use_mask else 3, base_channels)]
        c = base_channels
        for i in range(num_blocks):
            c_next = min(base_channels * 2 ** (i + 1), max_channels)
            layers.append(_conv(c, c_next, stride=2))
            c = c_next
        self.features = nn.Sequential(*layers)
        self.z_head = nn.Linear(c, z_dim)
        self.expression_head = nn.Linear(c, expression_dim)

    def forward(self, image: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        x = image
        if self.use_mask:
            if mask is None or mask.shape != (image.shape[0], 1, *image.shape[2:]):
                got = None if mask is None else tuple(mask.shape)
                raise ValueError(f"this encoder takes the head mask: pass mask (B, 1, H, W) like the image, got {got}")
            x = torch.cat([image, mask.to(image.dtype)], dim=1)  # (B, 4, H, W)
        elif mask is not None:
            raise ValueError("this encoder was built with use_mask=False: do not pass a mask")
        h = self.features(x).mean(dim=(2, 3))  # (B, C)
        return self.z_head(h), self.expression_head(h)


class NormalEstimator(nn.Module):
    """Tiny U-Net image -> camera-space normal map (unit vectors), our stand-in for GAR's
    pretrained normal estimator (see the module docstring).

    Levels (c = ``base_channels``): two 3x3 convs at H (3 -> c -> c), at H/2 (c -> 2c -> 2c) and at
    H/4 (2c -> 4c -> 4c); the decoder upsamples (bilinear x2), concatenates the skip and applies one
    3x3 conv per level (4c + 2c -> 2c, 2c + c -> c); a 1x1 conv to 3 channels, normalised.
    LeakyReLU(0.2) after every 3x3 conv. 106,739 parameters at c = 16.

    Args:
        base_channels: c.

    Shapes:
        image (B, 3, H, W) float in [0, 1], H and W divisible by 4 -> (B, 3, H, W) unit normals in
        the OpenCV camera frame (the rasterized normal maps' frame).

    Raises:
        ValueError: (forward) on a wrong shape or H, W not divisible by 4.
    """

    def __init__(self, base_channels: int = 16) -> None:
        super().__init__()
        c = base_channels
        self.enc0 = nn.Sequential(_conv(3, c), _conv(c, c))
        self.enc1 = nn.Sequential(_conv(c, 2 * c), _conv(2 * c, 2 * c))
        self.enc2 = nn.Sequential(_conv(2 * c, 4 * c), _conv(4 * c, 4 * c))
        self.dec1 = _conv(6 * c, 2 * c)
        self.dec0 = _conv(3 * c, c)
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, image: Tensor) -> Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        if image.shape[2] % 4 or image.shape[3] % 4:
            raise ValueError(f"H and W must be divisible by 4, got {image.shape[2]}x{image.shape[3]}")
        e0 = self.enc0(image)  # (B, c, H, W)
        e1 = self.enc1(F.avg_pool2d(e0, 2))  # (B, 2c, H/2, W/2)
        e2 = self.enc2(F.avg_pool2d(e1, 2))  # (B, 4c, H/4, W/4)
        up = F.interpolate(e2, scale_factor=2, mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up, e1], dim=1))  # (B, 2c, H/2, W/2)
        up = F.interpolate(d1, scale_factor=2, mode="bilinear", align_corners=False)
        d0 = self.dec0(torch.cat([up, e0], dim=1))  # (B, c, H, W)
        return F.normalize(self.out(d0), dim=1, eps=1e-6)  # (B, 3, H, W)
