"""Per-frame code corrections (models/codes.py) and the head-pose correction (models/camera.py)."""

from __future__ import annotations

import math

import pytest
import torch

from models.camera import axis_angle_to_matrix, correct_pose, world_to_camera
from models.codes import FrameCodeCorrections


def test_axis_angle_quarter_turn_about_z():
    rot = axis_angle_to_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]], dtype=torch.float64))[0]
    expected = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(rot, expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="axis-angle"):
        axis_angle_to_matrix(torch.zeros(3))


def test_correct_pose_turns_the_head_about_its_centre():
    """A quarter turn about y in head space, then a camera-space shift: the canonical point (1, 0, 0)
    goes to (0, 0, -1) in head space, then through [R | t] plus dt, by hand."""
    world_mat = torch.tensor([[[1.0, 0.0, 0.0, 0.1], [0.0, -1.0, 0.0, 0.2], [0.0, 0.0, -1.0, 5.0]]],
                             dtype=torch.float64)
    rotvec = torch.tensor([[0.0, math.pi / 2, 0.0]], dtype=torch.float64)
    shift = torch.tensor([[0.0, 0.0, 0.5]], dtype=torch.float64)
    corrected = correct_pose(world_mat, rotvec, shift)
    point = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    cam = world_to_camera(point, corrected)[0, 0]
    # head space (0, 0, -1) -> R: (0, 0, 1) -> + t + dt: (0.1, 0.2, 6.5)
    torch.testing.assert_close(cam, torch.tensor([0.1, 0.2, 6.5], dtype=torch.float64), atol=1e-12, rtol=0)
    # the head centre never moves with the rotation
    centre = world_to_camera(torch.zeros(1, 3, dtype=torch.float64), corrected)[0, 0]
    torch.testing.assert_close(centre, torch.tensor([0.1, 0.2, 5.5], dtype=torch.float64))
    # zero corrections: the tracked pose itself, 4x4 input gives 3x4
    square = torch.cat([world_mat, torch.tensor([[[0.0, 0.0, 0.0, 1.0]]], dtype=torch.float64)], 1)
    torch.testing.assert_close(correct_pose(square, torch.zeros_like(rotvec), torch.zeros_like(shift)), world_mat)


def test_correct_pose_gradient_matches_finite_differences():
    world_mat = torch.tensor([[[0.9, 0.1, 0.0, 0.1], [-0.1, 0.9, 0.2, 0.2], [0.0, -0.2, 1.0, 4.0]]],
                             dtype=torch.float64)
    for start in (torch.zeros(1, 3), torch.tensor([[0.2, -0.1, 0.3]])):
        rotvec = start.to(torch.float64).requires_grad_(True)
        shift = torch.tensor([[0.01, 0.02, -0.03]], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda w, t: correct_pose(world_mat, w, t), (rotvec, shift))


def test_rows_are_looked_up_by_frame_number_and_unknown_frames_raise():
    table = FrameCodeCorrections(torch.tensor([7, 3, 12]), expression_dim=2)
    assert table.rows(torch.tensor([3, 12, 7])).tolist() == [0, 2, 1]  # rows follow sorted frame numbers
    assert table.has(torch.tensor([3, 4, 12, 99])).tolist() == [True, False, True, False]
    with pytest.raises(KeyError, match=r"frame\(s\) \[4\] have no code correction"):
        table.rows(torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="distinct"):
        FrameCodeCorrections(torch.tensor([1, 1]), expression_dim=2)
    with pytest.raises(ValueError, match="positive variances"):
        FrameCodeCorrections(torch.tensor([1, 2]), expression_dim=2, expression_var=torch.tensor([1.0, 0.0]))


def test_corrections_apply_to_their_frames_and_train_only_their_rows():
    table = FrameCodeCorrections(torch.tensor([10, 20]), expression_dim=2)
    with torch.no_grad():
        table.expression[1] = torch.tensor([0.5, -0.25])
        table.translation[1] = torch.tensor([0.0, 0.0, 1.0])
    expression = torch.tensor([[1.0, 1.0]])
    world_mat = torch.eye(4)[:3].unsqueeze(0)
    corrected, pose = table(torch.tensor([20]), expression, world_mat)
    torch.testing.assert_close(corrected, torch.tensor([[1.5, 0.75]]))
    torch.testing.assert_close(pose[0, :, 3], torch.tensor([0.0, 0.0, 1.0]))
    (corrected.sum() + pose.sum()).backward()
    assert table.expression.grad[0].abs().sum() == 0 and table.expression.grad[1].abs().sum() > 0
    assert table.rotation.grad[0].abs().sum() == 0


def test_prior_and_magnitudes_by_hand():
    """prior = mean_f sum_e d_psi_e^2 / var_e + 100 mean_f |w|^2 + 100 mean_f |dt|^2 (two frames)."""
    table = FrameCodeCorrections(torch.tensor([0, 1]), expression_dim=2, expression_var=torch.tensor([1.0, 3.0]))
    with torch.no_grad():
        table.expression[0] = torch.tensor([2.0, 3.0])  # 4 / 1 + 9 / 3 = 7 (Mahalanobis^2)
        table.rotation[1] = torch.tensor([0.0, 0.1, 0.0])  # |.|^2 = 0.01
        table.translation[0] = torch.tensor([0.0, 0.0, 0.02])  # |.|^2 = 4e-4
    expected = 7.0 / 2 + 100.0 * 0.01 / 2 + 100.0 * 4e-4 / 2
    assert table.prior().item() == pytest.approx(expected)
    sizes = table.magnitudes()
    assert sizes["expression"] == pytest.approx(math.sqrt(7.0) / 2)
    assert sizes["rotation_deg"] == pytest.approx(math.degrees(0.1) / 2)
    assert sizes["translation"] == pytest.approx(0.01)


def test_state_dict_round_trip_rebuilds_the_table():
    table = FrameCodeCorrections(torch.tensor([5, 9, 2]), expression_dim=3, expression_var=torch.tensor([1.0, 2.0, 3.0]))
    with torch.no_grad():
        table.expression.normal_()
        table.rotation.normal_()
    state = {f"codes.{k}": v for k, v in table.state_dict().items()}
    again = FrameCodeCorrections.from_state_dict(state, "codes.")
    assert again.frame_numbers.tolist() == [2, 5, 9]
    for key, value in table.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert FrameCodeCorrections.from_state_dict({"other.weight": torch.zeros(1)}, "codes.") is None
