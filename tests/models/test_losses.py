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
    sdf_consistency_loss,
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


def test_blendshape_regularization_weighted_by_expression_variance():
    """use_var_expression: w_e = (1/var_e) / mean(1/var), so var = (1, 4) weighs the first blendshape
    1.6 and the second 0.4; equal variances give the unweighted prior."""
    blend = torch.zeros(1, 2, 3)
    blend[0, 0] = torch.tensor([1.0, 0.0, 0.0])  # |B_0|^2 = 1
    blend[0, 1] = torch.tensor([0.0, 2.0, 0.0])  # |B_1|^2 = 4
    # mean over (N=1, E=2) of w_e |B_e|^2 = (1.6 * 1 + 0.4 * 4) / 2
    assert blendshape_regularization(blend, expression_var=torch.tensor([1.0, 4.0])).item() == pytest.approx(1.6)
    assert blendshape_regularization(blend, expression_var=torch.tensor([3.0, 3.0])).item() == pytest.approx(2.5)
    assert blendshape_regularization(blend).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="expression_var"):
        blendshape_regularization(blend, expression_var=torch.tensor([1.0, 0.0]))


def test_sdf_consistency_golden_value_and_gradient():
    """PointAvatar's SDF consistency mean(sdf^2) on fixed values, and its gradient 2 sdf / N."""
    sdf = torch.tensor([[0.1], [-0.2], [0.0], [0.3]], requires_grad=True)
    loss = sdf_consistency_loss(sdf)
    assert loss.item() == pytest.approx((0.01 + 0.04 + 0.0 + 0.09) / 4)
    loss.backward()
    torch.testing.assert_close(sdf.grad, 2.0 * sdf.detach() / 4)


def test_sdf_consistency_is_zero_on_the_zero_level_set_of_a_sphere():
    """Points on the sphere |x| = 0.5 under the SDF |x| - 0.5 score 0; a radius off by 0.1 scores 0.01."""
    from models.teacher import fibonacci_sphere

    points = fibonacci_sphere(64, 0.5, dtype=torch.float64)
    assert sdf_consistency_loss(points.norm(dim=-1, keepdim=True) - 0.5).item() == pytest.approx(0.0, abs=1e-12)
    assert sdf_consistency_loss(points.norm(dim=-1, keepdim=True) - 0.4).item() == pytest.approx(0.01)
