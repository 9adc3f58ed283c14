"""Sliced Wasserstein distance (ProGAN): pyramid against a scipy reference, the 1-D distance against
scipy.stats, and the metric's behaviour on real image tiles (the Fran texture from ../shared/data,
or its generated stand-in): 0 for identical sets, growing with blur and with noise, symmetric,
deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage, stats

from lightning_modules.swd import SlicedWasserstein, laplacian_pyramid, sample_patches, sliced_wasserstein


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    k2 = (k[:, None] * k[None, :]).expand(x.shape[1], 1, 2 * r + 1, 2 * r + 1)
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), k2, groups=x.shape[1])


@pytest.fixture(scope="module")
def tiles(fran_path) -> torch.Tensor:
    """Non-overlapping 32x32 RGB tiles of the Fran texture (64 tiles of the real 256x256 scan,
    4 of the 64x64 stand-in)."""
    from PIL import Image

    rgb = np.asarray(Image.open(fran_path.with_suffix(".png")).convert("RGB"), dtype=np.float32) / 255.0
    img = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W)
    t = img.unfold(1, 32, 32).unfold(2, 32, 32)  # (3, H/32, W/32, 32, 32)
    return t.permute(1, 2, 0, 3, 4).reshape(-1, 3, 32, 32).contiguous()


def swd(a: torch.Tensor, b: torch.Tensor, **kwargs) -> float:
    kwargs.setdefault("patches_per_image", 32)  # ProGAN's 128 costs 4x the CPU time (sorting)
    metric = SlicedWasserstein(**kwargs)
    metric.update(a, b)
    return metric.compute()


# --------------------------------------------------------------------------- building blocks


def _progan_pyramid(img: np.ndarray, levels: int) -> list[np.ndarray]:
    """ProGAN's pyramid with scipy (mode 'mirror' = reflection without repeating the edge)."""
    k1 = np.array([1, 4, 6, 4, 1], dtype=np.float64) / 16.0
    k = np.outer(k1, k1)[None]  # (1, 5, 5), per channel
    out, g = [], img.astype(np.float64)
    for _ in range(levels - 1):
        low = ndimage.convolve(g, k, mode="mirror")[:, ::2, ::2]
        up = np.zeros_like(g)
        up[:, ::2, ::2] = low
        out.append(g - ndimage.convolve(up, 4 * k, mode="mirror"))
        g = low
    return out + [g]


def test_laplacian_pyramid_matches_scipy_reference_and_keeps_constants():
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    pyr = laplacian_pyramid(x, 3)
    assert [tuple(p.shape) for p in pyr] == [(2, 3, 16, 24), (2, 3, 8, 12), (2, 3, 4, 6)]
    for b in range(2):
        for ours, ref in zip(pyr, _progan_pyramid(x[b].numpy(), 3)):
            np.testing.assert_allclose(ours[b].numpy(), ref, atol=1e-6)
    flat = laplacian_pyramid(torch.full((1, 3, 16, 16), 0.3), 3)
    assert flat[0].abs().max() < 1e-6 and flat[1].abs().max() < 1e-6
    torch.testing.assert_close(flat[2], torch.full((1, 3, 4, 4), 0.3))
    with pytest.raises(ValueError, match="divisible by 2\\^\\(num_levels - 1\\) = 4"):
        laplacian_pyramid(torch.rand(1, 3, 18, 16), 3)


def test_sample_patches_against_loops():
    g = torch.Generator().manual_seed(0)
    level = torch.rand(2, 3, 10, 12, generator=g)
    rows, cols = torch.randint(0, 10 - 3 + 1, (2, 4), generator=g), torch.randint(0, 12 - 3 + 1, (2, 4), generator=g)
    out = sample_patches(level, rows, cols, 3)
    assert out.shape == (8, 3, 3, 3)
    for b in range(2):
        for k in range(4):
            r, c = int(rows[b, k]), int(cols[b, k])
            assert torch.equal(out[b * 4 + k], level[b, :, r : r + 3, c : c + 3])


def test_sliced_wasserstein_equals_scipy_1d_distances():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 6, generator=g, dtype=torch.float64), 2 + torch.randn(50, 6, generator=g, dtype=torch.float64)
    dirs = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=0)
    ref = np.mean([stats.wasserstein_distance((a @ dirs[:, j]).numpy(), (b @ dirs[:, j]).numpy()) for j in range(5)])
    assert sliced_wasserstein(a, b, dirs).item() == pytest.approx(ref, rel=1e-12)
    assert sliced_wasserstein(a, a[torch.randperm(50)], dirs).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- the metric


def test_swd_is_zero_for_identical_sets_and_symmetric(tiles):
    assert swd(tiles, tiles.clone()) == 0.0
    noisy = (tiles + 0.05 * torch.randn(tiles.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert swd(noisy, tiles) == pytest.approx(swd(tiles, noisy), rel=1e-6)


def test_swd_grows_with_blur_and_with_noise(tiles):
    blurred = [swd(gaussian_blur(tiles, s), tiles) for s in (0.5, 1.0, 2.0)]
    assert 0 < blurred[0] < blurred[1] < blurred[2], blurred
    g = torch.Generator().manual_seed(0)
    noisy = [swd((tiles + n * torch.randn(tiles.shape, generator=g)).clamp(0, 1), tiles) for n in (0.02, 0.1)]
    assert 0 < noisy[0] < noisy[1], noisy


def test_swd_is_deterministic_given_the_seed_and_resets(tiles):
    other = gaussian_blur(tiles, 1.0)
    metric = SlicedWasserstein(seed=3, patches_per_image=32)
    metric.update(other[:2], tiles[:2])
    metric.update(other[2:], tiles[2:])  # two batches
    first = metric.compute()
    metric.reset()
    metric.update(other[:2], tiles[:2])
    metric.update(other[2:], tiles[2:])
    assert metric.compute() == first
    again = SlicedWasserstein(seed=3, patches_per_image=32)
    again.update(other[:2], tiles[:2])
    again.update(other[2:], tiles[2:])
    assert again.compute() == first
    reseeded = swd(other, tiles, seed=4)
    assert reseeded != first and reseeded == pytest.approx(first, rel=0.5)  # same distance, other samples


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_swd_rejects_bad_inputs():
    metric = SlicedWasserstein()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()
    with pytest.raises(ValueError, match="one shape"):
        metric.update(torch.rand(2, 3, 32, 32), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 28 px"):
        metric.update(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        metric.update(torch.rand(1, 3, 30, 30), torch.rand(1, 3, 30, 30))
