"""Tests of models/student.py (RandLA-Net + GCN student; DESIGN.md "Models" -> Student)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.camera import rotate_normals
from models.student import CanonicalForward, Student, StudentCanonical, build_student_graph
from models.teacher import PointAvatarTeacher, fibonacci_sphere

E = 16


def count(params) -> int:
    return sum(p.numel() for p in params)


def conv(i: int, o: int, bn: bool = True) -> int:
    """Linear with bias, plus BatchNorm gamma and beta."""
    return i * o + o + (2 * o if bn else 0)


def lin(i: int, o: int, wn: bool = False) -> int:
    return i * o + o + (o if wn else 0)


def cloud(n: int, seed: int = 0) -> torch.Tensor:
    """A head-sized cloud: a Fibonacci sphere of radius 0.5 with a little noise (no distance ties)."""
    gen = torch.Generator().manual_seed(seed)
    return fibonacci_sphere(n, 0.5) + 0.01 * torch.randn(n, 3, generator=gen)


def rot_z(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def world_mats(batch: int) -> torch.Tensor:
    return torch.stack(
        [torch.cat([rot_z(0.5 * b), torch.tensor([[0.1 * b], [0.0], [3.0]])], dim=1) for b in range(batch)]
    )  # (B, 3, 4)


def randomise_heads(model: Student, std: float = 0.05, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (model.blendshape_head, model.offset_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
            head.bias.copy_(torch.randn(head.bias.shape, generator=gen) * std)


def make_student(n: int = 400, seed: int = 0, **kwargs) -> Student:
    torch.manual_seed(seed)
    model = Student(expression_dim=E, **kwargs)
    model.set_canonical(cloud(n))
    return model


# ------------------------------------------------------------------------------ budget


def hand_count_default() -> dict[str, int]:
    """The default student's parameters from its layer sizes (E = 16)."""

    def att(c_in, c_out):
        return c_in * c_in + conv(c_in, c_out)

    def block(d_in, d):
        h = d // 2
        return (
            conv(d_in, h)
            + conv(10, h)
            + att(2 * h, h)
            + conv(h, h)
            + att(2 * h, d)
            + conv(d, 2 * d)
            + conv(d_in, 2 * d)
        )

    return {
        "randla": conv(3, 8)
        + block(8, 8)
        + block(16, 16)
        + conv(32, 32)
        + conv(16 + 32, 16)
        + conv(16 + 16, 16),
        "gcn": conv(2 * 3, 16) + conv(2 * 16, 16) + conv(32, 32),
        "fusion": conv(16 + 64, 32) + conv(32, 32),
        "heads": lin(32, 3) + lin(32, 3) + lin(32, 3 * E) + lin(32, 3),
        "shading": lin(3, 16, True) + lin(16, 16, True) + lin(16, 3, True),
    }


def test_default_parameter_count_by_hand():
    parts = hand_count_default()
    assert parts == {"randla": 5_808, "gcn": 1_824, "fusion": 3_776, "heads": 1_881, "shading": 422}
    assert sum(parts.values()) == 13_711

    torch.manual_seed(0)
    model = Student()
    assert count(model.randla.parameters()) == parts["randla"]
    assert count(model.gcn.parameters()) == parts["gcn"]
    assert count(model.fusion.parameters()) == parts["fusion"]
    assert count(model.shading.parameters()) == parts["shading"]
    assert count(model.canonical_network_parameters()) == 13_711
    assert count(model.parameters()) == 13_711  # no adapters or other parameters inside the student


def test_parameter_and_flop_ratios_against_the_default_teacher():
    """params_ratio <= 0.05 (goal 0.03) and flops_ratio <= 0.10 (goal 0.05), from real counts; the
    student's count is taken on a 10,000-point cloud (runs with k = 16 and two decimations)."""
    torch.manual_seed(0)
    teacher = PointAvatarTeacher(expression_dim=E, max_points=1_000)  # the buffer size does not count
    teacher_params = count(teacher.canonical_network_parameters())
    assert teacher_params == 591_731
    student = Student(expression_dim=E).eval()
    params_ratio = count(student.canonical_network_parameters()) / teacher_params
    assert params_ratio <= 0.03  # 13,711 / 591,731 = 0.0232

    # multiply-adds per point of the canonical forward (flop counter: 2 flops per multiply-add);
    # the teacher's includes its SDF-gradient normals, computed by the explicit backward pass
    with FlopCounterMode(display=False) as teacher_counter, torch.no_grad():
        teacher.canonical(cloud(64), method="explicit")
    teacher_per_point = teacher_counter.get_total_flops() / 2 / 64
    assert 1.0e6 < teacher_per_point < 1.2e6  # ~0.58 M forward + ~0.52 M gradient branch

    # the student runs at the report's fixed N = 10,000 (graph building is preprocessing: not counted)
    student.set_canonical(cloud(10_000))
    assert student.graph.sizes == [10_000, 2_500, 625] and student.graph.k == 16
    with FlopCounterMode(display=False) as student_counter, torch.no_grad():
        can = student.canonical()
    student_per_point = student_counter.get_total_flops() / 2 / 10_000
    assert student_per_point < 20_000  # well under 0.1 M multiply-adds per point
    assert student_per_point / teacher_per_point <= 0.05

    assert can.feature.shape == (10_000, 32) and can.blendshapes.shape == (10_000, E, 3)
    assert torch.isfinite(can.feature).all()
    assert torch.allclose(can.normals.norm(dim=-1), torch.ones(10_000), atol=1e-5)


# ------------------------------------------------------------------------------ sizes of cloud


@pytest.mark.parametrize(
    ("n", "k", "sizes"),
    [(400, 16, [400, 100, 25]), (20, 16, [20, 20, 20]), (10, 10, [10, 10, 10])],
)
def test_small_clouds_clamp_k_and_levels(n, k, sizes):
    """The young teacher's 400 points and tinier clouds run the same layers."""
    model = make_student(n).eval()
    assert model.graph.sizes == sizes and model.graph.k == k
    with torch.no_grad():
        out = model(torch.randn(2, E), world_mats(2))
    assert out["points"].shape == (2, n, 3) and out["feature"].shape == (n, 32)
    assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))


def test_runs_on_the_canonical_face_vertices(canonical_obj_path):
    """Real data where ../shared/data is present: MediaPipe's canonical face (468 vertices, cm)."""
    rows = [
        line.split()[1:4] for line in canonical_obj_path.read_text().splitlines() if line.startswith("v ")
    ]
    points = torch.tensor([[float(v) for v in row] for row in rows])
    n = points.shape[0]
    torch.manual_seed(0)
    model = Student(expression_dim=E)
    model.set_canonical(points)
    second = n // 16 if n // 16 >= 16 else n // 4  # the clamping rule, by hand
    assert model.graph.sizes == [n, n // 4, second]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, E), world_mats(3))
    assert out["colors"].shape == (3, n, 3)
    assert torch.isfinite(out["feature"]).all() and torch.isfinite(out["colors"]).all()
    # the default splat radius: mean distance to the nearest other vertex
    d = torch.cdist(points.double(), points.double()) + torch.eye(n, dtype=torch.float64) * 1e9
    assert model.radius.item() == pytest.approx(d.min(dim=1).values.mean().item(), rel=1e-5)


# ------------------------------------------------------------------------------ per-frame API


def test_forward_matches_the_teachers_formulas():
    model = make_student(200).eval()
    randomise_heads(model)
    expression = torch.randn(3, E)
    world_mat = world_mats(3)
    with torch.no_grad():
        can = model.canonical()
        out = model(expression, world_mat, canonical=can)

    # deformation x' = x + o + sum_e psi_e B_e, by explicit loops over the expression codes
    expected = can.points + can.offset
    for b in range(3):
        disp = sum(expression[b, e] * can.blendshapes[:, e, :] for e in range(E))
        assert torch.allclose(out["points"][b], expected + disp, atol=1e-6)
    # camera-space normal: R n with R a rotation about z (by hand), then shading and colour
    for b in range(3):
        c, s = math.cos(0.5 * b), math.sin(0.5 * b)
        n = can.normals
        rotated = torch.stack([c * n[:, 0] - s * n[:, 1], s * n[:, 0] + c * n[:, 1], n[:, 2]], dim=-1)
        assert torch.allclose(out["normals_cam"][b], rotated, atol=1e-6)
    assert torch.allclose(out["normals_cam"], rotate_normals(can.normals, world_mat))
    with torch.no_grad():
        shading = model.shading(out["normals_cam"])
    assert torch.allclose(out["shading"], shading)
    assert torch.allclose(out["colors"], (2 * shading * can.albedo).clamp(0, 1))
    assert torch.allclose(model.shade(can, world_mat), out["colors"])
    assert torch.allclose(model.deform(can, expression), out["points"])
    # heads: unit normals, albedo in (0, 1), f_s is the fusion output
    assert torch.allclose(can.normals.norm(dim=-1), torch.ones(200), atol=1e-6)
    assert ((can.albedo > 0) & (can.albedo < 1)).all()
    assert can.feature.shape == (200, model.latent_dim)
    assert out["indices"] is None and torch.equal(out["canonical_points"], model.points)


def test_untrained_student_does_not_deform():
    """Blendshape and offset heads start at zero, like the teacher's."""
    model = make_student(100).eval()
    with torch.no_grad():
        out = model(torch.randn(2, E), world_mats(2))
    assert torch.equal(out["points"], model.points.expand(2, -1, -1))


def test_same_keys_as_the_teacher_where_meaningful():
    torch.manual_seed(0)
    teacher = PointAvatarTeacher(
        expression_dim=E, max_points=800, geometry_width=64, geometry_depth=4, skip_layers=(2,)
    )
    student = make_student(100).eval()
    with torch.no_grad():
        teacher_out = teacher(torch.randn(1, E), world_mats(1))
        student_out = student(torch.randn(1, E), world_mats(1))
    assert set(student_out) == set(teacher_out) - {"sdf", "sdf_grad"}
    for key in ("points", "colors", "shading", "normals_cam", "normals", "albedo", "blendshapes", "offset"):
        assert student_out[key].shape[-1] == teacher_out[key].shape[-1]  # same layouts, N differs
        assert student_out[key].dim() == teacher_out[key].dim(), key
    canonical = student.canonical()
    assert isinstance(canonical, StudentCanonical) and canonical.indices is None


# ------------------------------------------------------------------------------ contract


def test_deterministic_in_eval():
    model = make_student(200).eval()
    expression, world_mat = torch.randn(2, E), world_mats(2)
    with torch.no_grad():
        first = model(expression, world_mat)
        second = model(expression, world_mat)
        rebuilt = model.canonical(model.points.clone())  # graph rebuilt with the same seed
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), key
    assert torch.equal(rebuilt.feature, first["feature"])
    assert not torch.equal(model.build_graph(model.points, seed=1).sub_indices[0], model.graph.sub_indices[0])


def test_gradients_reach_every_parameter():
    model = make_student(300).train()
    randomise_heads(model)
    out = model(torch.randn(2, E), world_mats(2))
    loss = sum(out[key].square().mean() for key in ("colors", "points", "feature", "normals"))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_alone_renders_the_avatar():
    model = make_student(150)
    model.train()
    model(torch.randn(1, E), world_mats(1))  # BatchNorm statistics move
    randomise_heads(model)
    model.set_canonical(cloud(150, seed=3), radius=0.02)
    model.eval()
    expression, world_mat = torch.randn(2, E), world_mats(2)
    with torch.no_grad():
        reference = model(expression, world_mat)

    state = model.state_dict()
    for sized in (None, 400):  # fresh students: empty, or pre-sized for another N
        torch.manual_seed(7)
        fresh = Student(expression_dim=E, num_points=sized)
        fresh.load_state_dict(state)
        fresh.eval()
        with torch.no_grad():
            out = fresh(expression, world_mat)
        for key, value in reference.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, out[key]), key
        assert fresh.num_points == 150 and fresh.radius.item() == pytest.approx(0.02)


def test_pre_sized_buffers_follow_the_level_plan():
    model = Student(expression_dim=E, num_points=400)
    assert model.points.shape == (400, 3)
    assert [
        model.graph_neighbors_0.shape,
        model.graph_sub_indices_0.shape,
        model.graph_sub_indices_1.shape,
    ] == [
        (400, 16),
        (100,),
        (25,),
    ]
    with pytest.raises(ValueError, match="set_canonical"):
        model.canonical()  # buffers sized but never set


def test_jit_trace_of_the_canonical_forward():
    model = make_student(200).eval()
    inputs = model.canonical_inputs()
    traced = torch.jit.trace(CanonicalForward(model), inputs, check_trace=False)  # outputs compared below
    with torch.no_grad(), torch.jit.optimized_execution(False):
        eager = model.forward_canonical(*inputs)
        for a, b in zip(traced(*inputs), eager):
            assert torch.allclose(a, b, atol=1e-6)
        # the trace is not specialised to N: another cloud and its graph run through it
        points = cloud(70, seed=5)
        graph = build_student_graph(points)
        for a, b in zip(traced(points, *graph.tensors()), model.forward_canonical(points, *graph.tensors())):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


def test_dynamic_graph_option_runs():
    model = make_student(100, dynamic_graph=True).eval()
    with torch.no_grad():
        can = model.canonical()
    assert can.feature.shape == (100, 32) and torch.isfinite(can.feature).all()


def test_bad_inputs_raise():
    model = Student(expression_dim=E)
    with pytest.raises(ValueError, match="set_canonical"):
        model(torch.randn(1, E), world_mats(1))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        model.set_canonical(torch.zeros(10, 2))
    with pytest.raises(ValueError, match="NaN"):
        model.set_canonical(torch.full((10, 3), float("nan")))
    points = cloud(60)
    with pytest.raises(ValueError, match="levels"):
        model.set_canonical(points, graph=build_student_graph(points, num_levels=3))
    with pytest.raises(ValueError, match="built for"):
        model.set_canonical(points, graph=build_student_graph(cloud(61)))
    model.set_canonical(points)
    with pytest.raises(ValueError, match=r"expression must be \(B, 16\)"):
        model(torch.randn(1, E + 1), world_mats(1))
    with pytest.raises(ValueError, match="world_mat"):
        model(torch.randn(1, E), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(torch.randn(2, E), world_mats(1))


def test_recalibrated_batchnorm_makes_eval_equal_train():
    model = make_student(300)
    randomise_heads(model)
    model.fusion[0].norm.momentum = 0.3  # a custom momentum survives the recalibration
    with torch.no_grad():  # weights whose statistics the running averages have never seen
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.train()
    with torch.no_grad():
        trained = model.canonical()
    model.eval()
    with torch.no_grad():
        stale = model.canonical()
    assert (stale.normals - trained.normals).abs().max() > 1e-2  # the running statistics lag the weights

    model.recalibrate_batchnorm()
    assert not model.training and model.fusion[0].norm.momentum == 0.3
    with torch.no_grad():
        exact = model.canonical()
    for name in ("albedo", "normals", "blendshapes", "offset", "feature"):
        torch.testing.assert_close(getattr(exact, name), getattr(trained, name), rtol=1e-4, atol=1e-5)
    bn = model.fusion[0].norm
    hidden = model.fusion[0].linear(torch.cat([model.randla(model.points, model.points, model.graph),
                                               model.gcn(model.points, model.graph.neighbors[0])], -1)).detach()
    torch.testing.assert_close(bn.running_mean, hidden.mean(0), rtol=1e-4, atol=1e-5)  # the cloud's own mean
    torch.testing.assert_close(bn.running_var, hidden.var(0, unbiased=False), rtol=1e-4, atol=1e-5)  # biased


def test_recalibration_without_batchnorm_is_a_no_op():
    model = make_student(100, norm="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.recalibrate_batchnorm()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_one_branch_students_drop_the_other_branch_and_its_parameters():
    from models.student import Student

    full = Student(expression_dim=4)
    randla = Student(expression_dim=4, branches=("randla",))
    gcn = Student(expression_dim=4, branches=("gcn",))
    assert randla.gcn is None and gcn.randla is None

    def count(module):
        return sum(p.numel() for p in module.parameters())

    # the fusion's first layer (1x1 to 32) reads 80 = 16 (RandLA decoder) + 64 (GCN: EdgeConvs 16 + 16,
    # global 32) channels in the full student; without a branch it loses that branch and 32 x its channels
    assert (full.randla.out_channels, full.gcn.out_channels) == (16, 64)
    assert count(full) - count(randla) == count(full.gcn) + 32 * 64
    assert count(full) - count(gcn) == count(full.randla) + 32 * 16
    with pytest.raises(ValueError, match="branches must be one or both"):
        Student(expression_dim=4, branches=("pointnet",))
