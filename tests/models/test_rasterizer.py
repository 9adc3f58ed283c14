"""Tests of the point rasterizer (models/rasterizer.py) against hand-computed values, the dense
brute-force reference and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from models.rasterizer import PointRasterizer, RasterOutput, rasterize_dense_reference, rasterize_points

F64 = torch.float64


def _intrinsics(batch: int = 1, f: float = 8.0, cx: float = 4.5, cy: float = 4.5, dtype=F64) -> torch.Tensor:
    K = torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]], dtype=dtype)
    return K.expand(batch, 3, 3).clone()  # (B, 3, 3)


def _identity_cams(batch: int = 1, dtype=F64) -> torch.Tensor:
    return torch.eye(4, dtype=dtype)[:3].expand(batch, 3, 4).clone()  # (B, 3, 4)


def _turned_cams(batch: int, dtype=F64) -> torch.Tensor:
    """(B, 3, 4) world->camera matrices with a rotation about y (and a bit about x) and a shift."""
    mats = []
    for b in range(batch):
        a, c = 0.3 + 0.2 * b, -0.15 * b
        ry = torch.tensor(
            [[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=dtype
        )
        rx = torch.tensor(
            [[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]], dtype=dtype
        )
        t = torch.tensor([[0.1 * b], [-0.05], [0.3]], dtype=dtype)
        mats.append(torch.cat([rx @ ry, t], dim=1))
    return torch.stack(mats)


def _camera_to_world(points_cam: torch.Tensor, world_mat: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) camera points -> world points for rigid (B, 3, 4) world->camera matrices."""
    rot, trans = world_mat[:, :, :3], world_mat[:, :, 3]
    return torch.einsum("bji,bnj->bni", rot, points_cam - trans[:, None, :])  # R^T (x - t)


def _assert_outputs_close(a: RasterOutput, b: RasterOutput, atol: float, rtol: float = 0.0) -> None:
    for name in ("image", "alpha", "depth"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=rtol, msg=name)


# --------------------------------------------------------------------------------------------
# hand-computed values
# --------------------------------------------------------------------------------------------


def test_point_on_optical_axis_lands_at_principal_point():
    # A turned and shifted camera; the point is 2 units in front of it on its optical axis.
    world_mat = _turned_cams(1)
    point = _camera_to_world(torch.tensor([[[0.0, 0.0, 2.0]]], dtype=F64), world_mat)[0]  # (1, 3)
    colour = torch.tensor([[0.2, 0.4, 0.6]], dtype=F64)
    bg = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
    H, W = 8, 10

    # principal point on the centre of pixel (row 3, column 5); radius 1 covers only that pixel
    # (its 4-neighbours are at distance exactly 1, alpha 0), with alpha 1 - 0 = 1.
    out = rasterize_points(
        point, colour, world_mat, _intrinsics(1, 9.0, 5.5, 3.5), (H, W), 1.0, background=bg
    )
    expected_image = bg.view(1, 3, 1, 1).expand(1, 3, H, W).clone()
    expected_image[0, :, 3, 5] = colour[0]
    expected_alpha = torch.zeros(1, 1, H, W, dtype=F64)
    expected_alpha[0, 0, 3, 5] = 1.0
    torch.testing.assert_close(out.image, expected_image, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.alpha, expected_alpha, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.depth, 2.0 * expected_alpha, atol=1e-12, rtol=0)

    # principal point on the corner shared by pixels (2..3, 4..5): each centre is at d^2 = 0.5,
    # alpha = 1 - 0.5 / 1 = 0.5, colour 0.5 c + 0.5 bg, depth 0.5 * 2 = 1.
    out = rasterize_points(
        point, colour, world_mat, _intrinsics(1, 9.0, 5.0, 3.0), (H, W), 1.0, background=bg
    )
    expected_image = bg.view(1, 3, 1, 1).expand(1, 3, H, W).clone()
    expected_image[0, :, 2:4, 4:6] = (0.5 * colour[0] + 0.5 * bg).view(3, 1, 1)
    expected_alpha = torch.zeros(1, 1, H, W, dtype=F64)
    expected_alpha[0, 0, 2:4, 4:6] = 0.5
    torch.testing.assert_close(out.image, expected_image, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.alpha, expected_alpha, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.depth, 2.0 * expected_alpha, atol=1e-12, rtol=0)


def _two_points(near_first: bool):
    # f = 8, principal point (4.5, 4.5): A (z = 1) lands at (5.5, 4.5), B (z = 2) at (5.5, 5.5).
    a = [0.125, 0.0, 1.0]
    b = [0.25, 0.25, 2.0]
    red, green = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    if near_first:
        return torch.tensor([a, b], dtype=F64), torch.tensor([red, green], dtype=F64)
    return torch.tensor([b, a], dtype=F64), torch.tensor([green, red], dtype=F64)


@pytest.mark.parametrize("near_first", [True, False])
def test_two_overlapping_points_composite_nearer_first(near_first):
    points, colours = _two_points(near_first)
    blue = [0.0, 0.0, 1.0]
    out = rasterize_points(points, colours, _identity_cams(), _intrinsics(), 10, 2.0, background=blue)
    # pixel (row 4, col 4), centre (4.5, 4.5): d_A^2 = 1 -> alpha_A = 1 - 1/4 = 0.75;
    # d_B^2 = 2 -> alpha_B = 0.5.  C = 0.75 red + 0.25 * 0.5 green + 0.25 * 0.5 blue.
    torch.testing.assert_close(out.image[0, :, 4, 4], torch.tensor([0.75, 0.125, 0.125], dtype=F64))
    torch.testing.assert_close(out.alpha[0, 0, 4, 4], torch.tensor(1 - 0.25 * 0.5, dtype=F64))
    torch.testing.assert_close(out.depth[0, 0, 4, 4], torch.tensor(0.75 * 1 + 0.25 * 0.5 * 2, dtype=F64))
    # pixel (5, 5), centre (5.5, 5.5): alpha_A = 0.75, alpha_B = 1 (B sits on it): no background.
    torch.testing.assert_close(out.image[0, :, 5, 5], torch.tensor([0.75, 0.25, 0.0], dtype=F64))
    torch.testing.assert_close(out.alpha[0, 0, 5, 5], torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(out.depth[0, 0, 5, 5], torch.tensor(0.75 + 0.25 * 2, dtype=F64))
    # pixel (6, 3), centre (3.5, 6.5): d_A^2 = 4 + 4 (outside), d_B^2 = 4 + 1 (outside): background.
    torch.testing.assert_close(out.image[0, :, 6, 3], torch.tensor(blue, dtype=F64))
    assert out.alpha[0, 0, 6, 3] == 0 and out.depth[0, 0, 6, 3] == 0

    # points_per_pixel = 1 keeps only the nearer point A: C = 0.75 red + 0.25 blue.
    out1 = rasterize_points(points, colours, _identity_cams(), _intrinsics(), 10, 2.0, 1, background=blue)
    for row, col in ((4, 4), (5, 5)):
        torch.testing.assert_close(out1.image[0, :, row, col], torch.tensor([0.75, 0.0, 0.25], dtype=F64))
        torch.testing.assert_close(out1.alpha[0, 0, row, col], torch.tensor(0.75, dtype=F64))
        torch.testing.assert_close(out1.depth[0, 0, row, col], torch.tensor(0.75, dtype=F64))


def test_no_points_or_all_behind_camera_give_background():
    bg = [0.25, 0.5, 1.0]
    K, cams = _intrinsics(2), _identity_cams(2)
    expected = torch.tensor(bg, dtype=F64).view(1, 3, 1, 1).expand(2, 3, 7, 9)

    empty = rasterize_points(
        torch.zeros(0, 3, dtype=F64), torch.zeros(0, 3, dtype=F64), cams, K, (7, 9), 1.5, background=bg
    )
    # behind the camera, on the camera plane, in front of it but within the near plane
    points = torch.tensor([[0.0, 0.0, -1.0], [0.01, 0.0, 0.0], [0.0, 0.0, 5e-4], [0.0, 0.0, 1e-3]], dtype=F64)
    points.requires_grad_()
    features = torch.rand(4, 3, dtype=F64, requires_grad=True)
    radius = torch.full((4,), 2.0, dtype=F64, requires_grad=True)
    behind = rasterize_points(points, features, cams, K, (7, 9), radius, background=bg, near=1e-3)
    for out in (empty, behind):
        torch.testing.assert_close(out.image, expected, atol=0, rtol=0)
        assert torch.equal(out.alpha, torch.zeros(2, 1, 7, 9, dtype=F64))
        assert torch.equal(out.depth, torch.zeros(2, 1, 7, 9, dtype=F64))
    (behind.image.sum() + behind.alpha.sum() + behind.depth.sum()).backward()
    for t in (points, features, radius):
        assert torch.equal(t.grad, torch.zeros_like(t)), "dropped points must get a zero (not NaN) gradient"


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


def _smooth_scene(batch: int = 2):
    """Points a few hundredths of a pixel from pixel centres with radii 1.65-1.75 px, so every
    pixel centre is at least 0.15 px inside or outside every disk, and depths 0.3 apart, so the
    depth order is fixed: the rasterizer is smooth around these inputs."""
    gen = torch.Generator().manual_seed(3)
    f, c = 8.0, 4.0
    centres = torch.tensor([[2, 2], [3, 2], [3, 3], [4, 4], [5, 3], [2, 4]], dtype=F64) + 0.5  # (N, 2) px
    n = centres.shape[0]
    pts_cam = []
    for b in range(batch):
        uv = centres + (torch.rand(n, 2, generator=gen, dtype=F64) - 0.5) * 0.1 + b  # shift per camera
        z = 1.0 + 0.3 * torch.randperm(n, generator=gen).to(F64)  # distinct depths, shuffled order
        xy = (uv - c) / f * z[:, None]
        pts_cam.append(torch.cat([xy, z[:, None]], dim=1))
    world_mat = _turned_cams(batch)
    points = _camera_to_world(torch.stack(pts_cam), world_mat)  # (B, N, 3)
    radius = 1.65 + 0.1 * torch.rand(batch, n, generator=gen, dtype=F64)  # (B, N)
    features = torch.rand(n, 2, generator=gen, dtype=F64)  # (N, C)
    return points, features, world_mat, _intrinsics(batch, f, c, c), radius


def test_gradcheck_channels_positions_radius():
    points, features, world_mat, K, radius = _smooth_scene()
    background = torch.tensor([0.3, 0.9], dtype=F64)

    def render(p, feat, r):
        out = rasterize_points(p, feat, world_mat, K, 8, r, points_per_pixel=3, background=background)
        return out.image, out.alpha, out.depth

    inputs = (points.requires_grad_(), features.requires_grad_(), radius.requires_grad_())
    assert render(*inputs)[1].max() > 0.9  # pixels hold several layers
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_per_camera_features_and_valid_mask():
    points, features, world_mat, K, radius = _smooth_scene()
    feats = torch.stack([features, features.flip(0)]).requires_grad_()  # (B, N, C)
    valid = torch.tensor([True, True, False, True, True, False])

    def render(p, feat):
        out = rasterize_points(
            p, feat, world_mat, K, (8, 9), radius, points_per_pixel=10, background=0.0, valid=valid
        )
        return out.image, out.alpha, out.depth

    inputs = (points.requires_grad_(), feats)
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradients_match_dense_reference():
    gen = torch.Generator().manual_seed(5)
    B, N = 2, 40
    points = (torch.rand(B, N, 3, generator=gen, dtype=F64) - 0.5) * torch.tensor([0.8, 0.8, 0.5], dtype=F64)
    features = torch.rand(B, N, 4, generator=gen, dtype=F64)
    radius = 0.8 + 2.0 * torch.rand(N, generator=gen, dtype=F64)
    world_mat, K = _turned_cams(B), _intrinsics(B, 10.0, 6.0, 5.0)
    world_mat[:, 2, 3] += 1.2
    weights = [
        torch.rand(B, 4, 11, 12, generator=gen, dtype=F64),
        torch.rand(B, 1, 11, 12, generator=gen, dtype=F64),
    ]
    grads = []
    for fn in (rasterize_points, rasterize_dense_reference):
        inputs = [t.clone().requires_grad_() for t in (points, features, radius, world_mat, K)]
        p, f, r, wm, k = inputs
        out = fn(p, f, wm, k, (11, 12), r, 4, background=[0.1, 0.2, 0.3, 0.4])
        loss = (
            (out.image * weights[0]).sum()
            + (out.alpha * weights[1]).sum()
            + (out.depth * weights[1] ** 2).sum()
        )
        loss.backward()
        grads.append([t.grad for t in inputs])
    for ours, ref, name in zip(*grads, ("points", "features", "radius", "world_mat", "K")):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8, msg=name)


# --------------------------------------------------------------------------------------------
# brute-force reference, shapes and options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("points_per_pixel", [1, 3, 10])
def test_equals_dense_reference(points_per_pixel):
    gen = torch.Generator().manual_seed(points_per_pixel)
    B, N, H, W = 2, 150, 13, 17
    points = (torch.rand(B, N, 3, generator=gen, dtype=F64) - 0.5) * torch.tensor([1.2, 1.2, 0.8], dtype=F64)
    features = torch.rand(B, N, 5, generator=gen, dtype=F64)
    radius = 0.3 + 4.0 * torch.rand(B, N, generator=gen, dtype=F64)  # up to a 9-pixel footprint
    valid = torch.rand(B, N, generator=gen) < 0.8
    world_mat, K = _turned_cams(B), _intrinsics(B, 12.0, 8.0, 6.0)
    world_mat[:, 2, 3] += 1.0
    args = (points, features, world_mat, K, (H, W), radius, points_per_pixel, 0.5, 1e-3, valid)
    ours, ref = rasterize_points(*args), rasterize_dense_reference(*args)
    assert ref.alpha.gt(0).float().mean() > 0.5  # a busy image, many pixels hold several points
    _assert_outputs_close(ours, ref, atol=1e-12)


def test_odd_non_square_image_matches_reference():
    gen = torch.Generator().manual_seed(11)
    N, H, W = 60, 255, 253
    points = torch.rand(N, 3, generator=gen) - 0.5
    features = torch.rand(N, 3, generator=gen)
    world_mat, K = _turned_cams(1, torch.float32), _intrinsics(1, 300.0, 126.0, 128.0, torch.float32)
    world_mat[:, 2, 3] += 1.5
    ours = rasterize_points(points, features, world_mat, K, (H, W), 9.5)
    ref = rasterize_dense_reference(points, features, world_mat, K, (H, W), 9.5)
    assert ours.image.shape == (1, 3, H, W) and ours.alpha.shape == ours.depth.shape == (1, 1, H, W)
    _assert_outputs_close(ours, ref, atol=1e-5)

    # rows are v (height 255), columns u (width 253): a point at (u, v) = (250.5, 252.5), the
    # centre of pixel (row 252, column 250), is only inside a 255 x 253 image, not a 253 x 255 one
    f = 128.0  # every number below is exact in binary
    point = torch.tensor([[(250.5 - 126.0) / f * 2.0, (252.5 - 128.0) / f * 2.0, 2.0]])
    K = _intrinsics(1, f, 126.0, 128.0, torch.float32)
    one = rasterize_points(point, torch.ones(1, 1), _identity_cams(1, torch.float32), K, (H, W), 1.0)
    assert one.alpha[0, 0, 252, 250] == 1.0 and one.alpha.sum() == 1.0


def test_per_point_radius_equals_global_radius():
    points, features, world_mat, K, _ = _smooth_scene()
    glob = rasterize_points(points, features, world_mat, K, 8, 1.7)
    for radius in (
        torch.tensor(1.7, dtype=F64),
        torch.full((6,), 1.7, dtype=F64),
        torch.full((2, 6), 1.7, dtype=F64),
    ):
        _assert_outputs_close(rasterize_points(points, features, world_mat, K, 8, radius), glob, atol=1e-12)


def test_batch_of_two_cameras_equals_two_single_renders():
    points, features, world_mat, K, radius = _smooth_scene()
    shared_points = points[0]  # (N, 3) seen by both cameras
    per_cam_feats = torch.stack([features, features.flip(0)])
    for pts, feats, rad in (
        (points, features, radius),
        (shared_points, per_cam_feats, radius[0]),
        (points, per_cam_feats, 1.6),
    ):
        both = rasterize_points(pts, feats, world_mat, K, (8, 11), rad, 4)
        for b in range(2):
            single = rasterize_points(
                pts[b] if pts.dim() == 3 else pts,
                feats[b] if feats.dim() == 3 else feats,
                world_mat[b : b + 1],
                K[b : b + 1],
                (8, 11),
                rad[b] if isinstance(rad, torch.Tensor) and rad.dim() == 2 else rad,
                4,
            )
            for name in ("image", "alpha", "depth"):
                torch.testing.assert_close(
                    getattr(both, name)[b : b + 1], getattr(single, name), atol=1e-12, rtol=0
                )


@pytest.mark.parametrize("radius_kind", ["per_point", "float"])
def test_exportable_switch_is_bit_equal_on_two_cameras(radius_kind):
    """``exportable=True`` switches parts of the one core (histogram pre-selection, count slots,
    unrolled compositing): in eager mode on CPU the outputs stay bit-equal, with many layers per
    pixel (pre-selection drops fragments), exact depth ties and two cameras."""
    gen = torch.Generator().manual_seed(7)
    world_mat, K = _turned_cams(2, torch.float32), _intrinsics(2, 14.0, 6.0, 5.0, torch.float32)
    world_mat[:, 2, 3] += 1.0
    points = (torch.rand(2, 1500, 3, generator=gen) - 0.5) * 0.6  # (B, N, 3)
    points[:, :100] = points[:, 100:200]  # duplicates: equal depths, same pixels
    features = torch.rand(2, 1500, 3, generator=gen)
    radius = torch.rand(2, 1500, generator=gen) * 2 + 0.4 if radius_kind == "per_point" else 1.3
    outs = [
        rasterize_points(points, features, world_mat, K, (10, 13), radius, 4, 0.2, exportable=exportable)
        for exportable in (False, True)
    ]
    assert outs[0].alpha.max() > 0.99 and outs[0].alpha.min() < 0.01
    for name in ("image", "alpha", "depth"):
        assert torch.equal(getattr(outs[0], name), getattr(outs[1], name)), name


def test_valid_mask_skips_points_and_zeroes_their_gradient():
    gen = torch.Generator().manual_seed(2)
    N = 50
    points = (torch.rand(N, 3, generator=gen, dtype=F64) - 0.5) * 0.6
    features = torch.rand(N, 3, generator=gen, dtype=F64)
    world_mat, K = _identity_cams(1), _intrinsics(1, 12.0, 6.0, 6.0)
    world_mat[:, 2, 3] = 1.0
    valid = torch.rand(N, generator=gen) < 0.5
    p, f = points.clone().requires_grad_(), features.clone().requires_grad_()
    masked = rasterize_points(p, f, world_mat, K, 12, 2.5, valid=valid)
    subset = rasterize_points(points[valid], features[valid], world_mat, K, 12, 2.5)
    _assert_outputs_close(masked, subset, atol=1e-12)
    (masked.image.sum() + masked.depth.sum()).backward()
    assert torch.equal(p.grad[~valid], torch.zeros_like(p.grad[~valid]))
    assert torch.equal(f.grad[~valid], torch.zeros_like(f.grad[~valid]))
    assert f.grad[valid].abs().sum() > 0


def test_autocast_bfloat16_stays_finite_and_float32():
    points, features, world_mat, K, radius = (t.float() for t in _smooth_scene(1))
    plain = rasterize_points(points, features, world_mat, K, 8, radius)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = rasterize_points(points, features, world_mat, K, 8, radius)
    # geometry stays in float32 under autocast: the same render as without it
    _assert_outputs_close(auto, plain, atol=1e-6)
    low = rasterize_points(points.bfloat16(), features.bfloat16(), world_mat, K, 8, radius)  # bf16 inputs
    for out in (auto, low):
        assert out.image.dtype == torch.float32
        assert all(torch.isfinite(getattr(out, n)).all() for n in ("image", "alpha", "depth"))
    assert (low.alpha - plain.alpha).abs().max() < 0.1  # bf16-rounded positions, same picture


def test_module_matches_functional_form_and_has_no_parameters():
    points, features, world_mat, K, radius = _smooth_scene()
    raster = PointRasterizer((8, 9), radius=1.7, points_per_pixel=5, background=(0.0, 1.0))
    assert list(raster.parameters()) == [] and list(raster.buffers()) == []
    out = raster(points, features, world_mat, K)
    _assert_outputs_close(
        out, rasterize_points(points, features, world_mat, K, (8, 9), 1.7, 5, (0.0, 1.0)), atol=0
    )
    over = raster(points, features, world_mat, K, radius=radius, background=0.5)
    _assert_outputs_close(
        over, rasterize_points(points, features, world_mat, K, (8, 9), radius, 5, 0.5), atol=0
    )
    assert "points_per_pixel=5" in repr(raster)


def test_zero_radius_hides_a_point():
    points, colours = _two_points(near_first=True)
    radius = torch.tensor([0.0, 2.0], dtype=F64)  # A hidden: only B (alpha 0.5 at pixel (4, 4))
    out = rasterize_points(points, colours, _identity_cams(), _intrinsics(), 10, radius, background=0.0)
    torch.testing.assert_close(out.image[0, :, 4, 4], torch.tensor([0.0, 0.5, 0.0], dtype=F64))
    torch.testing.assert_close(out.depth[0, 0, 4, 4], torch.tensor(1.0, dtype=F64))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # sizes become constants, checked below
def test_traces_with_jit_and_generalises_to_other_clouds():
    def render(points, features, world_mat, K):
        out = rasterize_points(points, features, world_mat, K, (12, 10), 2.0, 4, 0.5)
        return out.image, out.alpha, out.depth

    gen = torch.Generator().manual_seed(4)
    world_mat, K = _turned_cams(1, torch.float32), _intrinsics(1, 12.0, 5.0, 6.0, torch.float32)
    world_mat[:, 2, 3] += 1.0
    scene = lambda n: (torch.rand(n, 3, generator=gen) - 0.5, torch.rand(n, 3, generator=gen))  # noqa: E731
    traced = torch.jit.trace(render, (*scene(30), world_mat, K), check_trace=False)
    points, features = scene(45)  # another cloud size
    for got, want in zip(traced(points, features, world_mat, K), render(points, features, world_mat, K)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_real_mesh_points_match_reference(fran_path):
    """Fran's scanned face (../shared/data; a stand-in where absent) as coloured points."""
    from datamodules.meshes import load_mesh, normalize_to_unit_head

    mesh = normalize_to_unit_head(load_mesh(fran_path))
    points = torch.from_numpy(mesh.vertices).double()  # (2205, 3), |x| <= 0.5
    features = torch.cat(
        [torch.from_numpy(mesh.colors), torch.from_numpy(mesh.normals)], 1
    ).double()  # (N, 6)
    world_mat = _turned_cams(2)
    world_mat[:, 2, 3] += 2.0
    K = _intrinsics(2, 60.0, 24.0, 20.0)
    args = (points, features, world_mat, K, (40, 48), 1.2, 10, 0.0)
    ours, ref = rasterize_points(*args), rasterize_dense_reference(*args)
    assert 0.2 < ours.alpha.gt(0).float().mean() < 0.9  # the face covers part of the image
    _assert_outputs_close(ours, ref, atol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(world_mat=torch.zeros(1, 2, 4)), "world_mat"),
        (dict(K=torch.zeros(2, 3, 3)), "K must be"),
        (dict(points=torch.zeros(4, 2)), "points must be"),
        (dict(features=torch.zeros(3, 3)), "features must be"),
        (dict(image_size=(8, 0)), "image_size"),
        (dict(radius=-1.0), "radius"),
        (dict(radius=torch.full((5,), 1.0)), "radius"),
        (dict(radius=torch.tensor([1.0, -1.0, 1.0, 1.0])), "radius"),
        (dict(background=[1.0, 0.0]), "background"),
        (dict(points_per_pixel=0), "points_per_pixel"),
        (dict(near=0.0), "near"),
        (dict(valid=torch.ones(4)), "valid must be a bool"),
        (dict(valid=torch.ones(5, dtype=torch.bool)), "valid must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    args = dict(
        points=torch.zeros(4, 3),
        features=torch.zeros(4, 3),
        world_mat=torch.eye(4)[:3][None],
        K=torch.eye(3)[None],
        image_size=8,
        radius=1.0,
        points_per_pixel=10,
        background=1.0,
        near=1e-3,
        valid=None,
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        rasterize_points(**args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=(8, 8, 3)), "image_size"),
        (dict(image_size=8, radius=0.0), "radius"),
        (dict(image_size=8, points_per_pixel=2.5), "points_per_pixel"),
        (dict(image_size=8, near=-1.0), "near"),
    ],
)
def test_module_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PointRasterizer(**kwargs)


def test_pixel_radius_by_hand_and_with_a_scale_inside_world_mat():
    from models.camera import pixel_radius

    points = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # depths 2 and 3 under t = (0, 0, 2)
    world_mat = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 2.0]]])
    K = torch.tensor([[[100.0, 0, 32], [0, 100.0, 32], [0, 0, 1]]])
    radius = torch.tensor(0.01)
    torch.testing.assert_close(pixel_radius(points, world_mat, K, radius), torch.tensor([[0.5, 1 / 3]]))
    # world_mat = [2R | t]: the disk is twice as large in camera space (and the points twice as deep)
    angle = torch.tensor(0.3)
    rot = torch.tensor([[angle.cos(), -angle.sin(), 0], [angle.sin(), angle.cos(), 0], [0, 0, 1.0]])
    scaled = torch.cat([2 * rot, torch.tensor([[0.0], [0.0], [2.0]])], 1)[None]
    torch.testing.assert_close(pixel_radius(points, scaled, K, radius), torch.tensor([[1.0, 0.5]]))
