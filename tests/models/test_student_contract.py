"""The student contract (models.student.PointStudent), run over every student class.

The idea of diffusers' model tester mixins: one set of checks that any new student must pass to
work in the distillation and GAR stages, export and the benchmarks. A new student class is added to
STUDENTS (module path, init args) and gets every check below.
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.handoff import class_from_path
from models.student import PointStudent, StudentCanonical

E = 4
#: every student class and small init args for it
STUDENTS = {
    "models.student.Student": {"k": 4, "decimation": 2},
    "models.student.Student[randla]": {"k": 4, "decimation": 2, "branches": ["randla"]},
    "models.student.Student[gcn]": {"k": 4, "decimation": 2, "branches": ["gcn"]},
    "tests.students.mlp_student.MLPStudent": {"width": 8, "latent_dim": 6},
}


def _class(name: str) -> type:
    return class_from_path(name.split("[")[0])  # "[...]": another configuration of the same class


def _student(class_path: str) -> PointStudent:
    torch.manual_seed(0)
    return _class(class_path)(expression_dim=E, **STUDENTS[class_path])


def _cloud(n: int = 40) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(1)), dim=-1) * 0.5


def _camera(batch: int = 2) -> torch.Tensor:
    world_mat = torch.eye(3, 4).expand(batch, 3, 4).clone()
    world_mat[:, 2, 3] = 2.0
    return world_mat


@pytest.fixture(params=sorted(STUDENTS))
def class_path(request) -> str:
    return request.param


def test_every_student_class_is_a_point_student(class_path):
    assert issubclass(_class(class_path), PointStudent)


def test_canonical_outputs_have_the_declared_shapes_and_ranges(class_path):
    student = _student(class_path)
    points = _cloud()
    student.set_canonical(points, radius=0.01)
    assert student.num_points == 40 and float(student.radius) == pytest.approx(0.01)
    c = student.canonical()
    assert isinstance(c, StudentCanonical) and torch.equal(c.points, points)
    n, cs = 40, student.latent_dim
    shapes = {"albedo": (n, 3), "normals": (n, 3), "blendshapes": (n, E, 3), "offset": (n, 3), "feature": (n, cs)}
    assert {k: tuple(getattr(c, k).shape) for k in shapes} == shapes
    assert bool(((c.albedo > 0) & (c.albedo < 1)).all())
    torch.testing.assert_close(c.normals.norm(dim=-1), torch.ones(n))


def test_the_per_frame_api_is_the_teachers(class_path):
    student = _student(class_path)
    student.set_canonical(_cloud())
    out = student(torch.randn(2, E), _camera())
    assert out["points"].shape == (2, 40, 3) and out["colors"].shape == (2, 40, 3)
    assert bool(((out["colors"] >= 0) & (out["colors"] <= 1)).all())
    assert out["feature"].shape == (40, student.latent_dim)
    with pytest.raises(ValueError, match="expression"):
        student(torch.randn(2, E + 1), _camera())


def test_the_default_radius_is_the_mean_nearest_neighbour_distance(class_path):
    student = _student(class_path)
    points = torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [0.4, 0, 0]])
    student.set_canonical(points)
    # nearest others: 0.1, 0.1, 0.3 -> mean 0.5 / 3
    assert float(student.radius) == pytest.approx(0.5 / 3, rel=1e-5)


def test_neighbors_are_the_knn_graph_of_the_cloud_each_point_first(class_path):
    student = _student(class_path)
    points = _cloud()
    student.set_canonical(points)
    nbrs = student.neighbors()
    assert nbrs.dtype == torch.int64 and nbrs.shape[0] == 40 and nbrs.shape[1] >= 2
    assert torch.equal(nbrs[:, 0], torch.arange(40))
    distances = torch.cdist(points, points)
    k = nbrs.shape[1]
    expected = distances.topk(k, largest=False).values
    torch.testing.assert_close(distances.gather(1, nbrs), expected)


def test_state_dict_alone_restores_the_avatar_at_any_size(class_path):
    student = _student(class_path).eval()
    student.set_canonical(_cloud(), radius=0.02)
    with torch.no_grad():
        reference = student.canonical()
    fresh = _class(class_path)(expression_dim=E, **STUDENTS[class_path]).eval()
    fresh.load_state_dict(student.state_dict())
    with torch.no_grad():
        restored = fresh.canonical()
    assert fresh.num_points == 40 and float(fresh.radius) == pytest.approx(0.02)
    for name in ("albedo", "normals", "blendshapes", "offset", "feature"):
        torch.testing.assert_close(getattr(restored, name), getattr(reference, name))


def test_flop_forward_is_the_canonical_network(class_path):
    student = _student(class_path).eval()
    student.set_canonical(_cloud())
    points = _cloud(24)
    module, inputs = student.flop_forward(points)
    with torch.no_grad():
        albedo, normals, blendshapes, offset, feature = module(*inputs)
        c = student.canonical(points)
    torch.testing.assert_close(feature, c.feature)
    torch.testing.assert_close(albedo, c.albedo)


def test_every_canonical_network_parameter_learns_from_the_outputs(class_path):
    student = _student(class_path).train()
    student.set_canonical(_cloud())
    c = student.canonical()
    loss = sum(t.square().mean() for t in (c.albedo, c.normals, c.feature))
    loss = loss + c.blendshapes.sum() + c.offset.sum() + student.shading(c.normals).sum()
    loss.backward()
    params = student.canonical_network_parameters()
    assert params and {id(p) for p in params} <= {id(p) for p in student.parameters()}
    assert all(p.grad is not None for p in params), [n for n, p in student.named_parameters() if p.grad is None]
    student.recalibrate_batchnorm()  # every student has it (a no-op without batch norm)
