"""Loss functions (pure functions of tensors; no training loop, no files).

Image losses of the teacher (PointAvatar, Zheng et al. CVPR 2023, Sec. 3.4): RGB L1, mask,
SSIM, eikonal and a blendshape regulariser. Distillation and adversarial losses join this module
with their stages (DESIGN.md, "Distillation losses", "GAR").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "blendshape_regularization",
    "eikonal_loss",
    "gaussian_ssim",
    "masked_l1",
    "mask_loss",
    "ssim_loss",
]


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error, over the pixels where ``mask`` is 1 when a mask is given.

    Args:
        pred, target: (B, C, H, W) images, same range (usually [0, 1]).
        mask: optional (B, 1, H, W) weights in [0, 1].

    Returns:
        scalar float32; 0 when the mask is empty.
    """
    diff = (pred.float() - target.float()).abs()
    if mask is None:
        return diff.mean()
    weight = mask.float().expand_as(diff)
    return (diff * weight).sum() / weight.sum().clamp_min(1.0)


def mask_loss(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 between the rendered accumulated alpha (B, 1, H, W) and the head mask (B, 1, H, W); scalar."""
    return (alpha.float() - mask.float()).abs().mean()


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # (C, 1, k, k)


def gaussian_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    window: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean structural similarity with a Gaussian window (Wang et al. 2004, Eq. 13).

    The images are reflection-padded by half the window so the SSIM map has the image's size, and
    local variances are clamped at 0, as torchmetrics' ``structural_similarity_index_measure``
    does with its defaults (11x11, sigma 1.5); the two agree to float precision (tested).

    Args:
        pred, target: (B, C, H, W), H and W >= ``window``.

    Returns:
        scalar float32 SSIM in [-1, 1] (1 for identical images).

    Raises:
        ValueError: when the images are smaller than the window.
    """
    if pred.shape[-1] < window or pred.shape[-2] < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {tuple(pred.shape[-2:])}")
    pred, target = pred.float(), target.float()
    c = pred.shape[1]
    w = _gaussian_window(window, sigma, c, pred.device, pred.dtype)
    pad = (window // 2,) * 4
    pred, target = F.pad(pred, pad, mode="reflect"), F.pad(target, pad, mode="reflect")
    mu_x = F.conv2d(pred, w, groups=c)
    mu_y = F.conv2d(target, w, groups=c)
    sxx = (F.conv2d(pred * pred, w, groups=c) - mu_x**2).clamp_min(0)
    syy = (F.conv2d(target * target, w, groups=c) - mu_y**2).clamp_min(0)
    sxy = F.conv2d(pred * target, w, groups=c) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim_map.mean()


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - :func:`gaussian_ssim` (scalar, 0 for identical images)."""
    return 1.0 - gaussian_ssim(pred, target)


def eikonal_loss(sdf_gradient: torch.Tensor) -> torch.Tensor:
    """Eikonal term mean((|∇SDF| - 1)^2) (Gropp et al. 2020, IGR Eq. 2); (N, 3) -> scalar."""
    return ((sdf_gradient.float().norm(dim=-1) - 1.0) ** 2).mean()


def blendshape_regularization(blendshapes: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared magnitude of the per-point blendshapes (N, E, 3) and offsets (N, 3).

    PointAvatar regularises its blendshapes towards those of the nearest FLAME vertex; our head
    model has no template, so the prior is zero (small deformations unless the images ask for them).
    """
    loss = blendshapes.float().pow(2).sum(-1).mean()
    if offset is not None:
        loss = loss + offset.float().pow(2).sum(-1).mean()
    return loss
