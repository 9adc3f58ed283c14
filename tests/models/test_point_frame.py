"""models.renderer.PointFrame: a point avatar's per-frame path as one module (eager, exportable, ONNX)."""

from __future__ import annotations

import warnings

import pytest
import torch

from datamodules.mesh_views import ring_cameras
from models.camera import pixel_radius
from models.rasterizer import rasterize_points
from models.renderer import PointFrame
from models.student import Student
from models.teacher import fibonacci_sphere

E = 4


@pytest.fixture(scope="module")
def student_and_frames():
    torch.manual_seed(0)
    student = Student(expression_dim=E, k=8, decimation=4, randla_channels=(8, 8), gcn_channels=(8, 8),
                      gcn_global_channels=8, fusion_channels=(8,), latent_dim=8).eval()
    student.set_canonical(fibonacci_sphere(300, 0.5), radius=0.06)
    with torch.no_grad():
        canonical = student.canonical()
    world_mat, K = ring_cameras(2, 2.2, 10.0, 30.0, 32)
    expression = 0.3 * torch.randn(2, E)
    return student, canonical, expression, world_mat, K


def _frame(student, canonical, exportable=False) -> PointFrame:
    return PointFrame(canonical.points, canonical.offset, canonical.blendshapes, canonical.normals, canonical.albedo,
                      student.radius, student.shading, 32, exportable=exportable).eval()


def test_point_frame_is_the_students_render(student_and_frames):
    """Deform, shade and rasterize on white: exactly what the distillation stage renders per frame."""
    student, canonical, expression, world_mat, K = student_and_frames
    with torch.no_grad():
        out = student(expression, world_mat, canonical=canonical)
        r_px = pixel_radius(out["points"], world_mat, K, out["radius"])
        expected = rasterize_points(out["points"], out["colors"], world_mat, K, 32, r_px, 10, background=1.0).image
        got = _frame(student, canonical)(expression, world_mat, K)
        exportable = _frame(student, canonical, exportable=True)(expression, world_mat, K)
    assert got.shape == (2, 3, 32, 32)
    assert torch.equal(got, expected)
    assert torch.equal(exportable, expected)  # the exportable rasterizer is bit-equal in eager mode
    assert (got < 1).any() and (got == 1).any()  # the head and the white background are both in view


def test_point_frame_in_onnx_runtime(student_and_frames, tmp_path):
    import onnxruntime as ort  # a dependency of the package (pyproject.toml)

    student, canonical, expression, world_mat, K = student_and_frames
    frame = _frame(student, canonical, exportable=True)
    path = tmp_path / "frame.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(frame, (expression[:1], world_mat[:1], K[:1]), str(path), dynamo=False, opset_version=18,
                          input_names=["expression", "world_mat", "K"], output_names=["rgb"])
        expected = frame(expression[1:], world_mat[1:], K[1:])
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {"expression": expression[1:].numpy(), "world_mat": world_mat[1:].numpy(),
                                "K": K[1:].numpy()})  # another frame than the traced one
    assert got.shape == (1, 3, 32, 32)
    assert float((torch.from_numpy(got) - expected).abs().max()) < 1e-4


def test_point_frame_rejects_mismatched_shapes(student_and_frames):
    student, canonical, *_ = student_and_frames
    with pytest.raises(ValueError, match=r"albedo must be \(300, 3\)"):
        PointFrame(canonical.points, canonical.offset, canonical.blendshapes, canonical.normals, canonical.albedo[:10],
                   student.radius, student.shading, 32)


def test_point_frame_with_tiles_is_the_same_render(student_and_frames, tmp_path):
    """The tile rasterizer at the required capacity gives the students render, in PyTorch and in ONNX Runtime."""
    import onnxruntime as ort

    student, canonical, expression, world_mat, K = student_and_frames
    ref_frame = _frame(student, canonical)
    need = ref_frame.required_capacity(expression, world_mat, K)
    tiled = PointFrame.from_canonical(canonical, student.radius, student.shading, 32, tile_capacity=need).eval()
    with torch.no_grad():
        ref, got = ref_frame(expression, world_mat, K), tiled(expression, world_mat, K)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    path = tmp_path / "tiles.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiled, (expression[:1], world_mat[:1], K[:1]), str(path), dynamo=False, opset_version=18,
                          input_names=["expression", "world_mat", "K"])
    session = ort.InferenceSession(str(path))
    for i in range(2):
        out = session.run(None, {"expression": expression[i : i + 1].numpy(), "world_mat": world_mat[i : i + 1].numpy(),
                                 "K": K[i : i + 1].numpy()})[0]
        assert abs(out - ref[i : i + 1].numpy()).max() < 1e-5
