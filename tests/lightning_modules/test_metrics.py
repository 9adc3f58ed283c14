"""Held-out metrics: PointAvatar protocol (GT on white under the mask), known values."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.metrics import HeldOutMetrics, composite_on_white


def test_composite_on_white():
    image = torch.full((1, 3, 2, 2), 0.25)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    out = composite_on_white(image, mask)
    assert out[0, :, 0, 0].tolist() == [0.25] * 3
    assert out[0, :, 0, 1].tolist() == [1.0] * 3


def test_psnr_l1_ssim_on_a_known_offset():
    metrics = HeldOutMetrics(("teacher", "baseline_mean"))
    image = torch.full((2, 3, 16, 16), 0.5)
    mask = torch.ones(2, 1, 16, 16)
    metrics.update("teacher", image + 0.1, image, mask)  # MSE 0.01 -> PSNR 20 dB
    metrics.update("teacher", image, image, mask)  # identical frames: l1 0
    out = metrics.compute("test")
    assert set(out) == {"teacher/test/l1", "teacher/test/psnr", "teacher/test/ssim"}  # baseline never updated
    assert out["teacher/test/l1"] == pytest.approx(0.05, abs=1e-6)


def test_psnr_is_per_image_then_averaged():
    metrics = HeldOutMetrics(("teacher",))
    image = torch.full((2, 3, 16, 16), 0.5)
    pred = image.clone()
    pred[0] += 0.1  # MSE 1e-2 -> 20 dB
    pred[1] += 0.01  # MSE 1e-4 -> 40 dB
    metrics.update("teacher", pred, image, torch.ones(2, 1, 16, 16))
    out = metrics.compute("val")
    assert out["teacher/val/psnr"] == pytest.approx(30.0, abs=1e-3)
    assert out["teacher/val/l1"] == pytest.approx(0.055, abs=1e-6)
    assert out["teacher/val/ssim"] <= 1.0
    metrics.reset()
    assert metrics.compute("val") == {}


def test_ground_truth_background_is_white():
    metrics = HeldOutMetrics(("teacher",))
    image = torch.zeros(1, 3, 16, 16)  # black frame, mask empty -> target all white
    metrics.update("teacher", torch.ones(1, 3, 16, 16), image, torch.zeros(1, 1, 16, 16))
    out = metrics.compute("test")
    assert out["teacher/test/l1"] == 0.0
    assert math.isinf(out["teacher/test/psnr"])
