"""Sliced Wasserstein distance on Laplacian-pyramid patches (the realism metric ``swd``).

ProGAN's SWD (Karras et al., ICLR 2018, "Progressive Growing of GANs", Sec. 5 and App. D): no
pretrained network, so it runs here where Inception/AlexNet weights cannot be downloaded.

1. Build a Laplacian pyramid of every image (5-tap binomial filter [1, 4, 6, 4, 1] / 16,
   reflection padding, factor 2): levels L_0 .. L_{n-2} are band-pass images and the last level is
   the low-pass image G_{n-1} (so ``num_levels=3`` at 64x64 gives 64, 32 and 16 px levels).
2. From every level of every image take ``patches_per_image`` random ``patch_size`` x
   ``patch_size`` neighbourhoods (C * p * p descriptors). Within one ``update`` the predicted and
   the target image at the same batch index share the same patch positions.
3. At ``compute``: per level, normalise each set (predicted, target) by its own per-channel mean
   and standard deviation over all its descriptors and pixels (as ProGAN does), project both on
   ``num_projections`` random unit directions, sort each projection and take the mean absolute
   difference of the sorted values (the 1-D Wasserstein-1 distance between the empirical
   distributions of equal size, averaged over directions).
4. Average over levels. ProGAN reports this value x 1e3; we return it unscaled.

The result is symmetric in (preds, target) and 0 for identical image sets (same images, same
order and batches). Deterministic given ``seed`` and the sequence of ``update`` calls (patch
positions come from a generator seeded with ``seed`` and the update count; projection directions
from ``seed`` and the level). Descriptors are "cat" states: under DDP every rank's descriptors are
gathered before ``compute``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["SlicedWasserstein", "laplacian_pyramid", "sample_patches", "sliced_wasserstein"]


def _binomial(channels: int, device, dtype) -> Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device, dtype=dtype) / 16.0
    return (k[:, None] * k[None, :]).expand(channels, 1, 5, 5).contiguous()  # (C, 1, 5, 5)


def _blur(x: Tensor, kernel: Tensor) -> Tensor:
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def laplacian_pyramid(images: Tensor, num_levels: int) -> list[Tensor]:
    """Laplacian pyramid (Burt & Adelson 1983) with the 5-tap binomial filter, as ProGAN's SWD.

    G_0 = images, G_{l+1} = blur(G_l)[::2, ::2], L_l = G_l - up(G_{l+1}) where up inserts zeros
    and blurs with 4 x the filter; the last level is G_{num_levels-1}. So
    G_0 = L_0 + up(L_1 + up(... + up(G_{n-1}))) exactly.

    Args:
        images: (B, C, H, W) float; H and W divisible by 2^(num_levels - 1), and every level but
            the last at least 3 px a side (reflection padding).
        num_levels: >= 1.

    Returns:
        list of ``num_levels`` tensors, [l] of shape (B, C, H / 2^l, W / 2^l).

    Raises:
        ValueError: on a bad size or ``num_levels``.
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    m = 2 ** (num_levels - 1)
    h, w = images.shape[-2:]
    if h % m or w % m:
        raise ValueError(f"H and W must be divisible by 2^(num_levels - 1) = {m}, got {h}x{w}")
    kernel = _binomial(images.shape[1], images.device, images.dtype)
    levels = []
    g = images
    for _ in range(num_levels - 1):
        low = _blur(g, kernel)[..., ::2, ::2]  # (B, C, h/2, w/2)
        up = torch.zeros_like(g)
        up[..., ::2, ::2] = low
        levels.append(g - _blur(up, 4.0 * kernel))
        g = low
    levels.append(g)
    return levels


def sample_patches(level: Tensor, rows: Tensor, cols: Tensor, patch_size: int) -> Tensor:
    """Gather square patches at given top-left corners.

    Args:
        level: (B, C, h, w).
        rows, cols: (B, K) int64 top-left corners, in [0, h - p] and [0, w - p].
        patch_size: p.

    Returns:
        (B * K, C, p, p): patch k of image b at row b * K + k.
    """
    b, k = rows.shape
    ar = torch.arange(patch_size, device=level.device)
    r = (rows.to(level.device)[:, :, None] + ar)[:, :, :, None]  # (B, K, p, 1)
    c = (cols.to(level.device)[:, :, None] + ar)[:, :, None, :]  # (B, K, 1, p)
    bidx = torch.arange(b, device=level.device)[:, None, None, None]  # (B, 1, 1, 1)
    patches = level[bidx, :, r, c]  # (B, K, p, p, C): advanced indices first, then the sliced C
    return patches.permute(0, 1, 4, 2, 3).reshape(b * k, level.shape[1], patch_size, patch_size)


def _normalise(desc: Tensor) -> Tensor:
    """Per-channel standardisation over descriptors and pixels: (N, C, p, p) -> (N, C * p * p)."""
    mean = desc.mean(dim=(0, 2, 3), keepdim=True)
    std = desc.std(dim=(0, 2, 3), keepdim=True, correction=0).clamp_min(1e-8)
    return ((desc - mean) / std).reshape(desc.shape[0], -1)


def sliced_wasserstein(a: Tensor, b: Tensor, directions: Tensor) -> Tensor:
    """Mean over directions of the 1-D Wasserstein-1 distance between the projected sets.

    Args:
        a, b: (N, D) descriptors, the same N.
        directions: (D, P) unit columns.

    Returns:
        scalar: mean_{n, j} |sort(a @ d_j)_n - sort(b @ d_j)_n|.
    """
    if a.shape != b.shape:
        raise ValueError(f"both descriptor sets must be (N, D) of one size, got {tuple(a.shape)} and {tuple(b.shape)}")
    # (P, N), contiguous along N: sorting the last dimension is several times faster on CPU
    pa = torch.sort((a @ directions).t().contiguous(), dim=1).values
    pb = torch.sort((b @ directions).t().contiguous(), dim=1).values
    return (pa - pb).abs().mean()


class SlicedWasserstein(Metric):
    """Sliced Wasserstein distance of ProGAN (Karras et al., ICLR 2018) between two image sets.

    Args:
        num_levels: Laplacian pyramid levels (the last is the low-pass image).
        patch_size: p, side of the neighbourhoods (7 in ProGAN).
        patches_per_image: neighbourhoods per image and level (128 in ProGAN).
        num_projections: random directions (ProGAN: 4 repeats x 128).
        seed: seeds the patch positions and the directions.

    Usage: ``update(preds, target)`` with (B, C, H, W) float images (same shape; [0, 1] expected,
    though the per-channel normalisation makes the value independent of an affine rescaling of a
    set), H and W divisible by 2^(num_levels - 1) and the coarsest level at least ``patch_size``
    (and 3) px a side; ``compute()`` -> float (lower is better, 0 for identical sets).

    Raises:
        ValueError: (update) on mismatched or too small images; (compute) before any update.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        num_levels: int = 3,
        patch_size: int = 7,
        patches_per_image: int = 128,
        num_projections: int = 128,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if min(num_levels, patch_size, patches_per_image, num_projections) < 1:
            raise ValueError("num_levels, patch_size, patches_per_image and num_projections must be positive")
        self.num_levels, self.patch_size = num_levels, patch_size
        self.patches_per_image, self.num_projections, self.seed = patches_per_image, num_projections, seed
        self._num_updates = 0
        for level in range(num_levels):
            self.add_state(f"preds_{level}", default=[], dist_reduce_fx="cat")
            self.add_state(f"target_{level}", default=[], dist_reduce_fx="cat")

    def _check(self, preds: Tensor, target: Tensor) -> None:
        if preds.dim() != 4 or preds.shape != target.shape:
            raise ValueError(
                f"preds and target must be (B, C, H, W) of one shape, got {tuple(preds.shape)} and {tuple(target.shape)}"
            )
        if not (preds.is_floating_point() and target.is_floating_point()):
            raise ValueError("preds and target must be float images in [0, 1]")
        h, w = preds.shape[-2:]
        m = 2 ** (self.num_levels - 1)
        smallest = max(self.patch_size, 3)
        if h % m or w % m or min(h, w) // m < smallest:
            raise ValueError(
                f"images {h}x{w}: H and W must be divisible by {m} and at least {m * smallest} px for "
                f"{self.num_levels} levels of {self.patch_size}x{self.patch_size} patches"
            )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of predicted and target images (B, C, H, W), the same patch positions for both."""
        self._check(preds, target)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 1 + self._num_updates)
        self._num_updates += 1
        b, k, p = preds.shape[0], self.patches_per_image, self.patch_size
        with torch.autocast(device_type=preds.device.type, enabled=False):  # float32 under bf16-mixed too
            pyr_p = laplacian_pyramid(preds.detach().float(), self.num_levels)
            pyr_t = laplacian_pyramid(target.detach().float(), self.num_levels)
        for level, (lp, lt) in enumerate(zip(pyr_p, pyr_t)):
            h, w = lp.shape[-2:]
            rows = torch.randint(0, h - p + 1, (b, k), generator=gen)
            cols = torch.randint(0, w - p + 1, (b, k), generator=gen)
            getattr(self, f"preds_{level}").append(sample_patches(lp, rows, cols, p))  # (B*K, C, p, p)
            getattr(self, f"target_{level}").append(sample_patches(lt, rows, cols, p))

    def compute(self) -> float:
        """The SWD averaged over pyramid levels, a Python float (unscaled; ProGAN reports x 1e3)."""
        first = self.preds_0
        if (isinstance(first, list) and not first) or (isinstance(first, Tensor) and first.numel() == 0):
            raise ValueError("SlicedWasserstein.compute() called before any update(preds, target)")
        gen = torch.Generator().manual_seed(self.seed)
        total = 0.0
        for level in range(self.num_levels):
            a = _normalise(dim_zero_cat(getattr(self, f"preds_{level}")))  # (N, C*p*p)
            b = _normalise(dim_zero_cat(getattr(self, f"target_{level}")))
            dirs = torch.randn(a.shape[1], self.num_projections, generator=gen)
            dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(a.device)  # (D, P) unit columns
            total += float(sliced_wasserstein(a, b, dirs))
        return total / self.num_levels

    def reset(self) -> None:
        super().reset()
        self._num_updates = 0
