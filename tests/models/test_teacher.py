"""Tests of models/teacher.py (PointAvatar-style teacher; DESIGN.md "Models" -> Teacher)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import models.teacher as teacher_module
from models.teacher import (
    GeometryNetwork,
    PointAvatarTeacher,
    fibonacci_sphere,
    positional_encoding,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
E = 5  # expression dimension of the small test models


def small_teacher(seed: int = 0, full_mlps: bool = False, **kwargs) -> PointAvatarTeacher:
    """A teacher with a small point buffer; narrower MLPs (same structure) unless ``full_mlps``."""
    torch.manual_seed(seed)
    args = dict(expression_dim=E, max_points=1600, init_points=400, min_points=100)
    if not full_mlps:  # keeps the file fast on 2 shared cores; structure (skip, heads) unchanged
        args.update(geometry_width=64, geometry_depth=4, skip_layers=(2,), deformer_width=32)
    args.update(kwargs)
    return PointAvatarTeacher(**args)


def randomise_deformer_heads(model: PointAvatarTeacher, std: float = 0.05, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (model.deformer.blendshape_head, model.deformer.offset_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
            head.bias.copy_(torch.randn(head.bias.shape, generator=gen) * std)


def rot_z(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def world_mats(batch: int) -> torch.Tensor:
    mats = []
    for b in range(batch):
        rt = torch.cat([rot_z(0.4 * b), torch.tensor([[0.1 * b], [0.0], [3.0]])], dim=1)  # (3, 4)
        mats.append(rt)
    return torch.stack(mats)  # (B, 3, 4)


# ----------------------------------------------------------------------------- sizes


def test_default_parameter_count_by_hand():
    """Pinned from the layer sizes (w + b + weight-norm gain per output unit)."""

    def lin(i, o, wn):
        return i * o + o + (o if wn else 0)

    enc = 3 + 3 * 2 * 6  # 39
    geometry = (
        lin(enc, 256, True)
        + 2 * lin(256, 256, True)
        + lin(256, 256 - enc, True)  # layer 3 leaves room for the skip input at layer 4
        + 5 * lin(256, 256, True)  # layers 4..8
        + lin(256, 1 + 3, True)  # sdf + albedo
    )
    deformer = lin(3, 128, True) + 3 * lin(128, 128, True) + lin(128, 16 * 3, False) + lin(128, 3, False)
    shading = lin(3, 64, True) + lin(64, 64, True) + lin(64, 3, True)
    assert (geometry, deformer, shading) == (529_850, 57_139, 4_742)

    torch.manual_seed(0)
    model = PointAvatarTeacher()
    assert sum(p.numel() for p in model.geometry.parameters()) == geometry
    assert sum(p.numel() for p in model.deformer.parameters()) == deformer
    assert sum(p.numel() for p in model.shading.parameters()) == shading
    params = model.canonical_network_parameters()
    assert sum(p.numel() for p in params) == geometry + deformer + shading == 591_731
    # the point coordinates are the only other parameter, and they are not counted
    counted = {id(p) for p in params}
    others = [name for name, p in model.named_parameters() if id(p) not in counted]
    assert others == ["points"]
    assert model.points.shape == (102_400, 3)
    assert model.num_points == 400
    # the module docstring states the same figures
    for figure in ("529,850", "57,139", "4,742", "591,731"):
        assert figure in teacher_module.__doc__


def test_positional_encoding_values():
    x = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    out = positional_encoding(x, 2)
    expected = [0.1, -0.2, 0.3]
    for freq in (1.0, 2.0):
        expected += [math.sin(freq * v) for v in (0.1, -0.2, 0.3)]
        expected += [math.cos(freq * v) for v in (0.1, -0.2, 0.3)]
    assert out.shape == (1, 15)
    torch.testing.assert_close(out[0], torch.tensor(expected, dtype=torch.float64))
    assert positional_encoding(torch.zeros(7, 3), 6).shape == (7, 39)


def test_initial_points_radius_and_mask():
    model = small_teacher()
    assert model.num_active == 400
    assert model.active[:400].all() and not model.active[400:].any()
    pts = model.active_points()
    torch.testing.assert_close(pts.norm(dim=-1), torch.full((400,), 0.5), atol=1e-6, rtol=0)
    # nearly uniform: nearest-neighbour spacing close to sqrt(area per point) = sqrt(pi / 400)
    d = torch.cdist(pts.detach(), pts.detach()) + torch.eye(400) * 10
    nn_dist = d.min(dim=1).values
    spacing = math.sqrt(4 * math.pi * 0.25 / 400)
    assert nn_dist.min() > 0.5 * spacing and nn_dist.max() < 1.5 * spacing
    # PointAvatar: radius = 0.3 * 0.75 ** log2(400 / 100) = 0.3 * 0.5625
    assert model.radius.item() == pytest.approx(0.16875, rel=1e-6)
    with pytest.raises(ValueError, match="n >= 1"):
        fibonacci_sphere(0, 1.0)


# ----------------------------------------------------------------------------- geometry


def test_initial_sdf_is_a_sphere_and_normals_radial():
    model = small_teacher(full_mlps=True)
    gen = torch.Generator().manual_seed(7)
    dirs = torch.nn.functional.normalize(torch.randn(600, 3, generator=gen), dim=-1)
    radii = torch.rand(600, 1, generator=gen) * 0.8 + 0.2  # |x| in [0.2, 1]
    geo = model.geometry_at(dirs * radii)
    # geometric initialisation is a sphere up to the ripple of a finite random network
    assert (geo.sdf - (radii - 0.5)).abs().mean() < 0.12
    assert (geo.normals * dirs).sum(-1).mean() > 0.9
    assert (geo.sdf_grad.norm(dim=-1) - 1).abs().mean() < 0.35  # eikonal term starts small
    # inside negative, outside positive, zero level at radius 0.5 on average
    sphere = fibonacci_sphere(300, 1.0)
    with torch.no_grad():
        assert (model.geometry_at(0.1 * sphere, compute_normals=False).sdf < 0).all()
        assert (model.geometry_at(1.0 * sphere, compute_normals=False).sdf > 0).all()
        assert model.geometry_at(0.5 * sphere, compute_normals=False).sdf.mean().abs() < 0.03
    # albedo starts grey
    torch.testing.assert_close(geo.albedo, torch.full_like(geo.albedo, 0.5), atol=0.01, rtol=0)
    assert geo.feature.shape == (600, 256)


def test_sdf_gradient_matches_finite_differences_float64():
    model = small_teacher(full_mlps=True).double()
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(20, 3, generator=gen, dtype=torch.float64) - 0.5) * 1.6
    geo = model.geometry_at(x)
    h = 1e-6
    fd = torch.zeros(20, 3, dtype=torch.float64)
    with torch.no_grad():
        for k in range(3):
            step = torch.zeros(3, dtype=torch.float64)
            step[k] = h
            plus = model.geometry_at(x + step, compute_normals=False).sdf[:, 0]
            minus = model.geometry_at(x - step, compute_normals=False).sdf[:, 0]
            fd[:, k] = (plus - minus) / (2 * h)
    torch.testing.assert_close(geo.sdf_grad.detach(), fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(geo.normals.detach(), fd / fd.norm(dim=-1, keepdim=True), atol=1e-7, rtol=1e-6)


def test_explicit_gradient_equals_autograd_also_for_weight_gradients():
    model = small_teacher(full_mlps=True).double()
    x = fibonacci_sphere(32, 0.45, dtype=torch.float64) + 0.03
    auto = model.geometry_at(x, method="autograd")
    expl = model.geometry_at(x, method="explicit")
    torch.testing.assert_close(expl.sdf_grad, auto.sdf_grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(expl.feature, auto.feature)
    # the eikonal loss trains the same weights either way
    params = list(model.geometry.parameters())
    loss_a = (auto.sdf_grad.norm(dim=-1) - 1).square().mean()
    loss_e = (expl.sdf_grad.norm(dim=-1) - 1).square().mean()
    grads_a = torch.autograd.grad(loss_a, params, allow_unused=True)
    grads_e = torch.autograd.grad(loss_e, params, allow_unused=True)
    assert sum(g is None for g in grads_a) == 1  # only the last bias cannot change grad_x sdf
    for ga, ge in zip(grads_a, grads_e):
        if ga is None:
            assert ge is None or torch.count_nonzero(ge) == 0
        else:
            torch.testing.assert_close(ge, ga, atol=1e-11, rtol=1e-8)


def test_normals_without_grad_and_under_inference_mode():
    model = small_teacher()
    ref = model.canonical()
    with torch.no_grad():
        ng = model.canonical()
    with torch.inference_mode():
        inf = model.canonical()
    for out in (ng, inf):
        assert not out.normals.requires_grad and not out.sdf.requires_grad
        torch.testing.assert_close(out.normals, ref.normals.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.sdf, ref.sdf.detach())
    assert ref.sdf_grad.requires_grad  # create_graph in grad mode: the eikonal loss trains the MLP


# ----------------------------------------------------------------------------- deformation, shading


def test_deformation_is_identity_at_init():
    model = small_teacher()
    can = model.canonical()
    assert can.blendshapes.shape == (400, E, 3) and can.offset.shape == (400, 3)
    assert torch.count_nonzero(can.blendshapes) == 0 and torch.count_nonzero(can.offset) == 0
    expr = torch.randn(3, E)
    deformed = model.deform(can, expr)
    assert torch.equal(deformed, can.points.unsqueeze(0).expand(3, -1, -1))


def test_deformation_formula_and_linearity_in_expression():
    model = small_teacher()
    randomise_deformer_heads(model)
    can = model.canonical()
    e1, e2 = torch.randn(1, E), torch.randn(1, E)
    d1, d2, d12 = (model.deform(can, e)[0] for e in (e1, e2, 2.0 * e1 - 0.5 * e2))
    x = can.points
    # x' = x + o + sum_e psi_e B_e, written out term by term
    expected = x + can.offset
    for k in range(E):
        expected = expected + e1[0, k] * can.blendshapes[:, k, :]
    torch.testing.assert_close(d1, expected, atol=1e-6, rtol=1e-6)
    # affine in the expression: the displacement beyond x + o is linear
    base = x + can.offset
    torch.testing.assert_close(d12 - base, 2.0 * (d1 - base) - 0.5 * (d2 - base), atol=1e-6, rtol=1e-5)
    assert (d1 - x).abs().max() > 1e-3  # the heads are really non-zero now
    # the blendshapes depend on the point (not one global displacement)
    assert (can.blendshapes - can.blendshapes[:1]).abs().max() > 1e-4


def test_canonical_expression_deforms_relative_to_it():
    """use_mean_expression: with psi_c set, x' = x + o + sum_e (psi_e - psi_c,e) B_e, folded into the
    canonical offset; psi = psi_c gives x + o, and the state dict carries psi_c."""
    model = small_teacher()
    randomise_deformer_heads(model)
    plain = model.canonical()
    psi_c = torch.linspace(-1.0, 1.0, E)
    model.set_canonical_expression(psi_c)
    folded = model.canonical()
    torch.testing.assert_close(folded.blendshapes, plain.blendshapes)
    expr = torch.randn(2, E)
    torch.testing.assert_close(model.deform(folded, expr), model.deform(plain, expr - psi_c), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.deform(folded, psi_c[None])[0], plain.points + plain.offset, atol=1e-6, rtol=1e-6)
    assert torch.equal(model.state_dict()["canonical_expression"], psi_c)
    with pytest.raises(ValueError, match=r"canonical expression must be \(5,\)"):
        model.set_canonical_expression(torch.zeros(E + 1))


def test_expression_scale_makes_blendshapes_per_unit_of_the_scaled_code():
    """normalize_expression: the deformer predicts B'_e per unit of s_e psi_e; canonical() returns
    B_e = s_e B'_e, so the deformation of raw codes is x + o + sum_e s_e psi_e B'_e."""
    model = small_teacher()
    randomise_deformer_heads(model)
    plain = model.canonical()
    scale = torch.tensor([1.0, 2.0, 4.0, 0.5, 10.0])
    model.set_expression_scale(scale)
    scaled = model.canonical()
    torch.testing.assert_close(scaled.blendshapes, plain.blendshapes * scale[None, :, None])
    torch.testing.assert_close(scaled.offset, plain.offset)
    expr = torch.randn(2, E)
    torch.testing.assert_close(model.deform(scaled, expr), model.deform(plain, expr * scale), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        model.set_expression_scale(torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))


def test_shading_uses_camera_space_normals_and_clamps():
    model = small_teacher()
    can = model.canonical()
    rot = rot_z(math.pi / 2)  # x -> y, y -> -x
    world_mat = torch.cat([2.0 * rot, torch.tensor([[0.3], [0.0], [4.0]])], dim=1)[None]  # (1, 3, 4), scale 2
    n = can.normals.detach()
    n_cam = torch.stack([-n[:, 1], n[:, 0], n[:, 2]], dim=-1)  # R n by hand
    out = model(torch.zeros(1, E), world_mat)
    torch.testing.assert_close(out["normals_cam"][0], n_cam, atol=1e-6, rtol=0)
    with torch.no_grad():
        shading = model.shading(n_cam)
    torch.testing.assert_close(out["shading"][0], shading, atol=1e-6, rtol=1e-6)
    expected = torch.clamp(2 * shading * out["albedo"].detach(), 0, 1)
    torch.testing.assert_close(out["colors"][0].detach(), expected, atol=1e-6, rtol=1e-6)
    assert model.shade(can, world_mat).shape == (1, 400, 3)
    # a turned camera changes the shading (light stays with the camera)
    out0 = model(torch.zeros(1, E), world_mats(1))
    assert (out0["shading"] - out["shading"]).abs().max() > 1e-4
    # saturate albedo and shading: 2 * s * a > 1 -> clamped to exactly 1
    with torch.no_grad():
        model.geometry.layers[-1].bias[1:] = 1.0  # albedo = sigmoid(10) ~ 1
        model.shading.layers[-1].bias[:] = 5.0  # shading ~ sigmoid(5) ~ 0.993
    assert torch.equal(model(torch.zeros(1, E), world_mat)["colors"], torch.ones(1, 400, 3))


def test_forward_shapes_and_cached_canonical():
    model = small_teacher()
    expr, wm = torch.randn(2, E), world_mats(2)
    out = model(expr, wm)
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {
        "points": (2, 400, 3),
        "colors": (2, 400, 3),
        "shading": (2, 400, 3),
        "normals_cam": (2, 400, 3),
        "normals": (400, 3),
        "sdf": (400, 1),
        "sdf_grad": (400, 3),
        "albedo": (400, 3),
        "feature": (400, 64),
        "blendshapes": (400, E, 3),
        "offset": (400, 3),
        "canonical_points": (400, 3),
        "indices": (400,),
        "radius": (),
    }
    assert torch.equal(out["indices"], torch.arange(400))
    cached = model.canonical()
    again = model(expr, wm, canonical=cached)
    for key in ("points", "colors", "normals"):
        torch.testing.assert_close(again[key], out[key])


# ----------------------------------------------------------------------------- growth and pruning


def test_grow_doubles_with_bounded_noise_and_keeps_shapes():
    model = small_teacher()
    param = model.points
    before = model.points.detach().clone()
    r0 = model.radius.item()
    src = model.active_indices()
    new_rows = model.grow(generator=torch.Generator().manual_seed(0))
    assert model.num_active == 800 and new_rows.numel() == 400
    assert model.points is param and model.points.shape == (1600, 3) and model.active.shape == (1600,)
    assert torch.equal(model.points[src], before[src])  # originals untouched
    noise = model.points[new_rows].detach() - before[src]
    assert noise.abs().max() <= r0 / 2 + 1e-7  # U[-r/2, r/2] per coordinate (PointAvatar)
    assert noise.abs().max() > r0 / 4  # and really spread
    assert model.radius.item() == pytest.approx(0.75 * r0)
    assert model.grow().numel() == 800 and model.num_active == 1600
    # full: 2 * 1600 > 1600, nothing changes
    r2 = model.radius.item()
    assert model.grow().numel() == 0 and model.num_active == 1600 and model.radius.item() == r2


def test_grow_is_reproducible_with_a_generator():
    a, b = small_teacher(seed=0), small_teacher(seed=5)
    b.load_state_dict(a.state_dict())
    a.grow(generator=torch.Generator().manual_seed(11))
    b.grow(generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.points, b.points) and torch.equal(a.active, b.active)


def test_prune_by_counts_and_by_mask():
    model = small_teacher()
    vis = torch.zeros(1600)
    vis[:400] = torch.arange(400) % 4 * 0.25  # 0, .25, .5, .75 repeating -> half below 0.5
    removed = model.prune(vis)
    assert removed.numel() == 200 and model.num_active == 200
    expected_kept = torch.arange(400)[(torch.arange(400) % 4) >= 2]
    assert torch.equal(model.active_indices(), expected_kept)
    # boolean visibility; rows beyond the active set are ignored
    mask = torch.ones(1600, dtype=torch.bool)
    mask[expected_kept[:50]] = False
    assert torch.equal(model.prune(mask), expected_kept[:50])
    assert model.num_active == 150
    # growth refills freed rows (lowest first) and keeps the shapes
    grown = model.grow(generator=torch.Generator().manual_seed(0))
    assert grown.numel() == 150 and model.num_active == 300 and model.points.shape == (1600, 3)
    assert grown.max() < 400  # freed rows reused before untouched ones


def test_prune_respects_the_floor_and_warns():
    model = small_teacher(min_points=100)
    with pytest.warns(UserWarning, match="min_points=100"):
        model.prune(torch.zeros(1600))  # nothing visible at all
    assert model.num_active == 100
    assert torch.equal(model.active_indices(), torch.arange(100))  # ties: lower rows first

    model = small_teacher(min_points=100)
    vis = torch.zeros(1600)
    vis[:400] = torch.linspace(0.0, 0.4, 400).flip(0)[
        torch.randperm(400, generator=torch.Generator().manual_seed(2))
    ]
    most_visible = torch.sort(torch.topk(vis[:400], 100).indices).values
    with pytest.warns(UserWarning, match="most visible"):
        model.prune(vis)
    assert torch.equal(model.active_indices(), most_visible)

    with pytest.raises(ValueError, match=r"shape \(1600,\)"):
        model.prune(torch.zeros(400))


def test_state_dict_round_trip_after_grow_and_prune(tmp_path):
    model = small_teacher(seed=0)
    randomise_deformer_heads(model)
    model.grow(generator=torch.Generator().manual_seed(1))
    vis = torch.zeros(1600)
    vis[::3] = 1.0
    model.prune(vis)
    model.grow(generator=torch.Generator().manual_seed(2))
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)

    fresh = small_teacher(seed=123)  # same init args, other random weights
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.num_active == model.num_active and fresh.radius.item() == model.radius.item()
    model.eval()
    fresh.eval()
    expr, wm = torch.randn(2, E), world_mats(2)
    with torch.no_grad():
        a, b = model(expr, wm), fresh(expr, wm)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_gradients_reach_every_parameter():
    model = small_teacher(max_points=800)
    randomise_deformer_heads(model)  # zero heads would block the deformer's hidden layers
    model.train()
    out = model(torch.randn(2, E), world_mats(2))
    loss = (
        out["colors"].mean()
        + out["sdf"].square().mean()
        + (out["sdf_grad"].norm(dim=-1) - 1).square().mean()
        + out["points"].square().mean()
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "points":
            assert p.grad.abs().sum() > 0, name
    active = model.active
    assert (model.points.grad[active].abs().sum(-1) > 0).all()
    assert torch.count_nonzero(model.points.grad[~active]) == 0  # inactive rows get zero gradient


def test_reset_optimizer_rows():
    model = small_teacher(max_points=800)
    randomise_deformer_heads(model)
    opt = torch.optim.Adam([model.points], lr=1e-3)
    model(torch.randn(1, E), world_mats(1))["points"].square().sum().backward()
    opt.step()
    state = opt.state[model.points]
    keep = state["exp_avg"][:400].clone()
    rows = model.grow(generator=torch.Generator().manual_seed(0))
    state["exp_avg"][rows] = 1.0  # pretend old momentum lived there
    model.reset_optimizer_rows(opt, rows)
    assert torch.count_nonzero(state["exp_avg"][rows]) == 0
    assert torch.count_nonzero(state["exp_avg_sq"][rows]) == 0
    assert torch.equal(state["exp_avg"][:400], keep)
    assert state["step"].item() == 1


# ----------------------------------------------------------------------------- errors, imports


def test_bad_inputs_raise_clear_errors():
    model = small_teacher()
    with pytest.raises(ValueError, match=r"expression must be \(B, 5\)"):
        model(torch.zeros(1, 16), world_mats(1))
    with pytest.raises(ValueError, match="world_mat must be"):
        model(torch.zeros(1, E), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(torch.zeros(2, E), world_mats(1))
    with pytest.raises(ValueError, match=r"points must be \(N, 3\)"):
        model.geometry_at(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="method"):
        model.geometry_at(torch.zeros(4, 3), method="numeric")
    with pytest.raises(ValueError, match="compute_normals=True"):
        model.shade(model.canonical(compute_normals=False), world_mats(1))
    with pytest.raises(ValueError, match="min_points <= init_points"):
        PointAvatarTeacher(max_points=1000, init_points=400, min_points=500)
    with pytest.raises(ValueError, match="skip_layers"):
        GeometryNetwork(depth=3, skip_layers=(5,))


def test_module_imports_only_torch_and_siblings():
    source = (REPO_ROOT / "models" / "teacher.py").read_text()
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "math", "warnings", "dataclasses", "torch", "models"}, roots
