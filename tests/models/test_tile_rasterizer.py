"""The tile rasterizer (models/tile_rasterizer.py): the fragment rasterizer's rule with fixed-shape work.

It must equal :func:`models.rasterizer.rasterize_points` whenever its capacity is the one
:func:`required_tile_capacity` computes, lose only deep layers below it, carry the same gradients,
and export to ONNX with the number of points dynamic."""

from __future__ import annotations

import warnings

import pytest
import torch

from models.rasterizer import rasterize_points
from models.tile_rasterizer import default_tile_size, rasterize_points_tiled, required_tile_capacity

F64 = torch.float64


def _scene(batch: int, num_points: int, seed: int, dtype=F64, channels: int = 5):
    """B turned cameras looking at a blob of N points 3 units ahead (K for a 37 x 45 image)."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(batch, num_points, 3, generator=gen, dtype=dtype) * 0.4
    points[..., 2] += 3.0
    features = torch.randn(batch, num_points, channels, generator=gen, dtype=dtype)
    world_mat = torch.eye(4, dtype=dtype)[:3].repeat(batch, 1, 1)
    for b in range(batch):  # a small turn and shift per camera
        a = torch.tensor(0.15 * b, dtype=dtype)
        world_mat[b, :3, :3] = torch.tensor([[a.cos(), 0, a.sin()], [0, 1, 0], [-a.sin(), 0, a.cos()]], dtype=dtype)
        world_mat[b, 0, 3] = 0.1 * b
    K = torch.tensor([[40.0, 0, 22.5], [0, 40.0, 18.5], [0, 0, 1]], dtype=dtype).repeat(batch, 1, 1)
    radius = torch.rand(batch, num_points, generator=gen, dtype=dtype) * 3 + 0.5  # pixels
    return points, features, world_mat, K, radius


def _assert_close(a, b, atol):
    for name in ("image", "alpha", "depth"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("tile_size", [1, 3, 4, 8])
@pytest.mark.parametrize("radius_kind", ["per point", "float", "valid mask"])
def test_equals_the_fragment_rasterizer_at_the_required_capacity(tile_size, radius_kind):
    """Two turned cameras, a 37 x 45 image (no multiple of the tile), per-point or float radii or a
    mask: at the required capacity every output equals rasterize_points (float64)."""
    points, features, world_mat, K, radius = _scene(2, 300, seed=tile_size)
    valid = None
    if radius_kind == "float":
        radius = 2.3
    elif radius_kind == "valid mask":
        valid = torch.rand(2, 300, generator=torch.Generator().manual_seed(1)) > 0.2
    background = [0.1, 0.2, 0.3, 0.4, 0.5]
    ref = rasterize_points(points, features, world_mat, K, (37, 45), radius, 10, background, valid=valid)
    need, most = required_tile_capacity(points, world_mat, K, (37, 45), radius, 10, valid=valid, tile_size=tile_size)
    assert 10 <= need <= most  # ten layers where the blob is dense; never more than a tile holds
    out = rasterize_points_tiled(points, features, world_mat, K, (37, 45), radius, 10, background, valid=valid,
                                 tile_size=tile_size, tile_capacity=need)
    _assert_close(out, ref, atol=1e-12)
    assert 0.2 < ref.alpha.gt(0).double().mean() < 0.9  # the blob covers part of the image


def test_below_the_required_capacity_only_deep_layers_go():
    """One candidate fewer than required: some pixel loses its deepest layers, so its alpha can only
    drop (the kept layers are the nearest ones of the same list), and nothing else changes."""
    points, features, world_mat, K, radius = _scene(1, 300, seed=5)
    need, _ = required_tile_capacity(points, world_mat, K, (37, 45), radius, 10, tile_size=4)
    full = rasterize_points_tiled(points, features, world_mat, K, (37, 45), radius, 10, 0.0, tile_size=4,
                                  tile_capacity=need)
    cut = rasterize_points_tiled(points, features, world_mat, K, (37, 45), radius, 10, 0.0, tile_size=4,
                                 tile_capacity=need - 1)
    changed = (cut.image - full.image).abs().amax(1) > 0  # (1, H, W)
    assert changed.any()
    assert (cut.alpha <= full.alpha + 1e-12).all()
    assert (cut.alpha[changed[:, None]] < full.alpha[changed[:, None]]).all()


def test_required_capacity_by_hand():
    """A 4 x 4 image, one 4 x 4 tile, K = 2. Three coincident points at the centre of pixel (1, 1)
    (radius 1: that pixel only) at depths 3, 4, 5, and nearer than all of them (depth 2) a disk
    whose edge reaches the tile's pixel-centre rectangle (0.8 < r = 0.9 from it) but no pixel centre
    (0.94 > 0.9 from the nearest): it takes list place 0, so the covering two are at places 1 and 2
    and the required capacity is 3, of 4 listed points."""
    K = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1]]], dtype=F64)  # pixel = camera x / z, y / z
    world_mat = torch.eye(4, dtype=F64)[:3][None]
    uvz = torch.tensor([[1.5, 1.5, 3.0], [1.5, 1.5, 4.0], [1.5, 1.5, 5.0], [-0.3, 2.0, 2.0]], dtype=F64)
    points = torch.cat([uvz[:, :2] * uvz[:, 2:], uvz[:, 2:]], 1)  # (4, 3) camera = world
    radius = torch.tensor([1.0, 1.0, 1.0, 0.9], dtype=F64)
    assert required_tile_capacity(points, world_mat, K, 4, radius, 2, tile_size=4) == (3, 4)
    colours = torch.tensor([[1.0], [2.0], [3.0], [9.0]], dtype=F64)
    out = rasterize_points_tiled(points, colours, world_mat, K, 4, radius, 2, 0.0, tile_size=4, tile_capacity=3)
    # pixel (1, 1): alpha 1 at the centre for the nearest covering point: its colour, depth 3
    assert out.image[0, 0, 1, 1] == 1.0 and out.depth[0, 0, 1, 1] == 3.0 and out.alpha.sum() == 1.0
    cut = rasterize_points_tiled(points, colours, world_mat, K, 4, radius, 2, 0.0, tile_size=4, tile_capacity=2)
    assert cut.image[0, 0, 1, 1] == 1.0  # the second covering point (place 2) is cut, the first stays


def test_gradients_match_the_fragment_rasterizer_and_finite_differences():
    points, features, world_mat, K, radius = _scene(2, 12, seed=3)
    points = (points * 0.75).requires_grad_()
    features = features[0, :, :3].clone().requires_grad_()  # shared (N, C) channels
    radius = (radius * 0.6 + 1.0).requires_grad_()

    def tiled(p, f, r):
        out = rasterize_points_tiled(p, f, world_mat, K, (9, 11), r, 4, 0.3, tile_size=4, tile_capacity=12)
        return out.image, out.alpha, out.depth

    assert torch.autograd.gradcheck(tiled, (points, features, radius), eps=1e-7, atol=1e-5)
    loss = sum(t.square().sum() for t in tiled(points, features, radius))
    ref = rasterize_points(points, features, world_mat, K, (9, 11), radius, 4, 0.3)
    ref_loss = sum(t.square().sum() for t in (ref.image, ref.alpha, ref.depth))
    for got, want in zip(torch.autograd.grad(loss, (points, features, radius)),
                         torch.autograd.grad(ref_loss, (points, features, radius))):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_float32_real_face_matches(fran_path):
    """Fran's scanned face (../shared/data; a stand-in where absent), float32, the default tile size."""
    from datamodules.meshes import load_mesh, normalize_to_unit_head

    mesh = normalize_to_unit_head(load_mesh(fran_path))
    points = torch.from_numpy(mesh.vertices).float()  # (2205, 3)
    features = torch.cat([torch.from_numpy(mesh.colors), torch.from_numpy(mesh.normals)], 1).float()
    world_mat = torch.eye(4)[:3][None].clone()
    world_mat[0, 2, 3] = 2.0
    K = torch.tensor([[[150.0, 0, 64.0], [0, 150.0, 64.0], [0, 0, 1]]])
    args = (points, features, world_mat, K, 128, 1.5, 10, 1.0)
    need, _ = required_tile_capacity(points, world_mat, K, 128, 1.5, 10)
    out, ref = rasterize_points_tiled(*args, tile_capacity=need), rasterize_points(*args)
    assert default_tile_size(128, 128) == 8 and 0.2 < ref.alpha.gt(0).float().mean() < 0.9
    _assert_close(out, ref, atol=1e-5)


def test_exports_to_onnx_with_a_dynamic_number_of_points(tmp_path):
    import onnxruntime as ort  # a dependency of the package (pyproject.toml)

    class Render(torch.nn.Module):
        def forward(self, points, features, world_mat, K, radius):
            out = rasterize_points_tiled(points, features, world_mat, K, (20, 24), radius, 6, 1.0, tile_size=4,
                                         tile_capacity=96)
            return out.image, out.alpha

    path = tmp_path / "tiles.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        scene = _scene(1, 150, seed=7, dtype=torch.float32, channels=3)
        scene[3][0, :2] *= 0.5  # K for a 20 x 24 image
        torch.onnx.export(Render(), scene, str(path), dynamo=False, opset_version=18,
                          input_names=["points", "features", "world_mat", "K", "radius"],
                          dynamic_axes={"points": {1: "N"}, "features": {1: "N"}, "radius": {1: "N"}})
    session = ort.InferenceSession(str(path))
    other = _scene(1, 220, seed=8, dtype=torch.float32, channels=3)  # another cloud, another size
    other[3][0, :2] *= 0.5
    got = session.run(None, dict(zip(["points", "features", "world_mat", "K", "radius"], (t.numpy() for t in other))))
    with torch.no_grad():
        want = Render()(*other)
        ref = rasterize_points(*other[:4], (20, 24), other[4], 6, 1.0)
    torch.testing.assert_close(torch.from_numpy(got[0]), want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(got[1]), want[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(want[0], ref.image, atol=1e-5, rtol=0)  # and 96 is enough to be exact


def test_no_points_in_view_give_the_background():
    points, features, world_mat, K, radius = _scene(1, 20, seed=2)
    points[..., 2] = -1.0  # all behind the camera
    out = rasterize_points_tiled(points, features, world_mat, K, (8, 8), radius, 10, 0.5, tile_capacity=8)
    assert (out.image == 0.5).all() and (out.alpha == 0).all() and (out.depth == 0).all()
    empty = rasterize_points_tiled(points[:, :0], features[:, :0], world_mat, K, (8, 8), radius[:, :0], 10, 0.5)
    assert (empty.image == 0.5).all() and (empty.alpha == 0).all()
    assert required_tile_capacity(points, world_mat, K, (8, 8), radius) == (1, 0)
    assert required_tile_capacity(points[:, :0], world_mat, K, (8, 8), radius[:, :0]) == (1, 0)  # an empty cloud


@pytest.mark.parametrize("kwargs, message", [(dict(tile_size=0), "tile_size"), (dict(tile_capacity=0), "tile_capacity"),
                                             (dict(tile_capacity=2.5), "tile_capacity")])
def test_bad_tile_settings_raise_clear_errors(kwargs, message):
    points, features, world_mat, K, radius = _scene(1, 5, seed=0)
    with pytest.raises(ValueError, match=message):
        rasterize_points_tiled(points, features, world_mat, K, 8, radius, **kwargs)


def test_a_float_radius_squares_as_the_fragment_rasterizer_does():
    """float32, a Python float radius r whose square rounds differently as fl(r^2) and fl(fl(r)^2): a disk
    edge falls in between at one pixel centre. Coverage must use fl(fl(r)^2), as rasterize_points does,
    or a slot flips (with one point per pixel, the whole pixel)."""
    r = 0.5045022511255628
    a, b = torch.tensor(r, dtype=torch.float32).square(), torch.tensor(r * r, dtype=torch.float32)
    assert a != b  # the two roundings differ for this radius
    lo, hi = min(a, b), max(a, b)
    centre = torch.tensor(8.5)
    for t in torch.linspace(0.1, 1.4, 20000):  # a centre at distance in [lo, hi) from pixel (8, 8)'s centre
        u, v = centre + r * torch.cos(t), centre + r * torch.sin(t)
        if lo <= (u - centre).square() + (v - centre).square() < hi:
            break
    K, world_mat = torch.eye(3)[None], torch.eye(4)[:3][None]
    points = torch.tensor([[u, v, 1.0], [17.0, 17.0, 2.0]])  # the edge case, and a far point centred on (8, 8)
    colours = torch.tensor([[0.0], [1.0]])
    ref = rasterize_points(points, colours, world_mat, K, 16, r, 1, 0.0)
    out = rasterize_points_tiled(points, colours, world_mat, K, 16, r, 1, 0.0, tile_size=4, tile_capacity=8)
    _assert_close(out, ref, atol=0)


def test_points_that_cannot_show_never_reach_the_sums():
    """NaN positions or features on valid=False points (and points behind the camera) leave every pixel
    finite at any capacity, also where an empty candidate slot lands on such a point, and get no gradient."""
    points, features, world_mat, K, radius = _scene(1, 100, seed=4)
    points, features = points.clone(), features.clone()
    valid = torch.ones(1, 100, dtype=torch.bool)
    valid[0, :5] = False
    points[0, :3] = float("nan")
    features[0, :5] = float("nan")
    points[0, 5:8, 2] = -1.0  # behind the camera
    ref = rasterize_points(points, features, world_mat, K, (37, 45), radius, 10, 0.0, valid=valid)
    for capacity in (80, 3000):
        out = rasterize_points_tiled(points, features, world_mat, K, (37, 45), radius, 10, 0.0, valid=valid,
                                     tile_size=8, tile_capacity=capacity)
        _assert_close(out, ref, atol=1e-12)
    points.requires_grad_()
    out = rasterize_points_tiled(points, features.nan_to_num(), world_mat, K, (37, 45), radius, 10, 0.0, valid=valid,
                                 tile_size=8, tile_capacity=3000)
    (grad,) = torch.autograd.grad(out.image.sum(), points)
    ref = rasterize_points(points, features.nan_to_num(), world_mat, K, (37, 45), radius, 10, 0.0, valid=valid)
    (want,) = torch.autograd.grad(ref.image.sum(), points)
    # the NaN points' own projection has a NaN derivative (0 * NaN), in both rasterizers; every other
    # point's gradient is finite, zero for those that cannot show, and the fragment rasterizer's
    assert (grad[0, 3:8] == 0).all() and grad[0, 8:].abs().sum() > 0
    torch.testing.assert_close(grad[0, 3:], want[0, 3:], atol=1e-10, rtol=0)


@pytest.mark.parametrize("size, tile", [((19, 25), 4), ((2, 50), 8), ((37, 45), 8)])
def test_required_capacity_is_the_minimum_where_tiles_overhang_the_image(size, tile):
    """Edge tiles overhang the image: their padding pixels must not count, so one less than the required
    capacity always changes something."""
    points, features, world_mat, K, radius = _scene(2, 200, seed=9)
    K[:, 0, 2], K[:, 1, 2] = size[1] / 2, size[0] / 2  # the blob in the middle of the image
    ref = rasterize_points(points, features, world_mat, K, size, radius, 10)
    need, _ = required_tile_capacity(points, world_mat, K, size, radius, 10, tile_size=tile)
    exact = rasterize_points_tiled(points, features, world_mat, K, size, radius, 10, tile_size=tile, tile_capacity=need)
    cut = rasterize_points_tiled(points, features, world_mat, K, size, radius, 10, tile_size=tile,
                                 tile_capacity=need - 1)
    _assert_close(exact, ref, atol=1e-12)
    assert (cut.image - ref.image).abs().max() > 1e-9
