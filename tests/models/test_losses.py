"""Golden values for the image losses on fixed inputs."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from models.losses import (
    blendshape_regularization,
    eikonal_loss,
    gaussian_ssim,
    mask_loss,
    masked_l1,
    ssim_loss,
)


def test_masked_l1_counts_only_masked_pixels():
    pred = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    assert masked_l1(pred, target).item() == pytest.approx(0.5)
    assert masked_l1(pred, target, mask).item() == pytest.approx((0.2 + 0.8) / 2)
    assert masked_l1(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_mask_loss_is_mean_absolute_alpha_error():
    alpha = torch.tensor([0.0, 0.5, 1.0, 1.0]).view(1, 1, 2, 2)
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    assert mask_loss(alpha, mask).item() == pytest.approx((0 + 0.5 + 0 + 1) / 4)


def test_gaussian_ssim_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 40, generator=g)
    b = (a + 0.2 * torch.randn(2, 3, 32, 40, generator=g)).clamp(0, 1)
    ours = gaussian_ssim(a, b)
    ref = structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=11, sigma=1.5)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert gaussian_ssim(a, a).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)


def test_gaussian_ssim_rejects_images_smaller_than_window():
    with pytest.raises(ValueError, match="11x11"):
        gaussian_ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_eikonal_is_zero_for_a_distance_field_and_one_for_twice_it():
    x = torch.randn(100, 3)
    unit = x / x.norm(dim=-1, keepdim=True)  # gradient of |x|
    assert eikonal_loss(unit).item() == pytest.approx(0.0, abs=1e-10)
    assert eikonal_loss(2 * unit).item() == pytest.approx(1.0, abs=1e-6)


def test_blendshape_regularization_value():
    blend = torch.zeros(2, 3, 3)
    blend[0, 0] = torch.tensor([3.0, 4.0, 0.0])  # |.|^2 = 25 on one of 2 points, summed over E
    offset = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # mean over (N, E) of the squared norm: 25 / (2 * 3)
    assert blendshape_regularization(blend).item() == pytest.approx(25 / 6)
    assert blendshape_regularization(blend, offset).item() == pytest.approx(25 / 6 + 1 / 2)
