"""Camera conventions shared by every stage.

One convention inside the code: OpenCV. Camera space has x right, y down, z forward (points in
front of the camera have z > 0). ``world_mat`` maps world (canonical avatar space) to camera
space; ``K`` holds pixel intrinsics with pixel centres at +0.5, so the pixel with integer index
(u, v) spans [u, u + 1) x [v, v + 1) and its centre is at (u + 0.5, v + 0.5).
"""

from __future__ import annotations

import torch

__all__ = [
    "to_homogeneous_mat",
    "world_to_camera",
    "camera_to_world",
    "project",
    "rotate_normals",
    "pixel_radius",
    "axis_angle_to_matrix",
    "correct_pose",
]


def to_homogeneous_mat(world_mat: torch.Tensor) -> torch.Tensor:
    """Promote (…, 3, 4) or (…, 4, 4) world->camera matrices to (…, 4, 4).

    Raises:
        ValueError: if the last two dimensions are neither 3x4 nor 4x4.
    """
    if world_mat.shape[-2:] == (4, 4):
        return world_mat
    if world_mat.shape[-2:] != (3, 4):
        raise ValueError(f"world_mat must be (..., 3, 4) or (..., 4, 4), got {tuple(world_mat.shape)}")
    bottom = torch.zeros(*world_mat.shape[:-2], 1, 4, dtype=world_mat.dtype, device=world_mat.device)
    bottom[..., 0, 3] = 1
    return torch.cat([world_mat, bottom], dim=-2)


def world_to_camera(points: torch.Tensor, world_mat: torch.Tensor) -> torch.Tensor:
    """Map world points into camera space.

    Args:
        points: (N, 3) or (B, N, 3) float, world (canonical) space.
        world_mat: (B, 3, 4) or (B, 4, 4) world->camera, OpenCV convention (3x3 may carry a scale).

    Returns:
        (B, N, 3) camera-space points, same dtype as ``points``.
    """
    rot = world_mat[..., :3, :3]  # (B, 3, 3)
    trans = world_mat[..., :3, 3]  # (B, 3)
    if points.dim() == 2:
        points = points.unsqueeze(0)  # (1, N, 3), broadcast over cameras
    return torch.einsum("bij,bnj->bni", rot, points.expand(rot.shape[0], -1, -1)) + trans[:, None, :]


def camera_to_world(points: torch.Tensor, world_mat: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`world_to_camera`: (B, N, 3) camera points -> (B, N, 3) world points."""
    inv = torch.linalg.inv(to_homogeneous_mat(world_mat))
    return world_to_camera(points, inv)


def project(points_cam: torch.Tensor, K: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pinhole projection of camera-space points to continuous pixel coordinates.

    u = fx * x / z + cx, v = fy * y / z + cy, in pixels, pixel centres at +0.5 (a point on the
    optical axis lands at (cx, cy)).

    Args:
        points_cam: (B, N, 3) camera-space points (z > 0 in front of the camera).
        K: (B, 3, 3) pixel intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]].
        eps: lower bound on |z| to avoid division by zero; points with z <= 0 are the caller's
            to discard (they are behind the camera).

    Returns:
        (B, N, 2) pixel coordinates (u, v), same dtype as ``points_cam``.
    """
    z = points_cam[..., 2:3]
    z = torch.where(z.abs() < eps, torch.full_like(z, eps), z)
    xy = points_cam[..., :2] / z  # (B, N, 2) normalised image coordinates
    f = torch.stack([K[:, 0, 0], K[:, 1, 1]], dim=-1)[:, None, :]  # (B, 1, 2)
    c = torch.stack([K[:, 0, 2], K[:, 1, 2]], dim=-1)[:, None, :]  # (B, 1, 2)
    return xy * f + c


def rotate_normals(normals: torch.Tensor, world_mat: torch.Tensor) -> torch.Tensor:
    """Rotate canonical normals into camera space (the shading normal of teacher and student).

    The rotation is the world_mat's 3x3 block with its scale divided out, and the result is
    re-normalised; the blendshapes' effect on normals is ignored (DESIGN.md, "Models").

    Args:
        normals: (N, 3) or (B, N, 3) unit normals in canonical space.
        world_mat: (B, 3, 4) or (B, 4, 4).

    Returns:
        (B, N, 3) unit normals in camera space.
    """
    rot = world_mat[..., :3, :3]
    if normals.dim() == 2:
        normals = normals.unsqueeze(0).expand(rot.shape[0], -1, -1)
    out = torch.einsum("bij,bnj->bni", rot, normals)
    return torch.nn.functional.normalize(out, dim=-1)


def pixel_radius(points: torch.Tensor, world_mat: torch.Tensor, K: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Splat radius in pixels of world-space disks of radius ``radius`` at each point's depth.

    r_px = s * radius * fx / z (pinhole; fx from K, z the camera-space depth, clamped at 1e-3), with
    s = |det A|^(1/3) the scale of world_mat's linear part A = sR (1 for a rigid pose; a similarity
    [sR | t] maps a disk of radius r to one of radius s r in camera space).

    Args:
        points: (B, N, 3) world points; world_mat: (B, 3, 4) (or (B, 4, 4)); K: (B, 3, 3);
            radius: () world units.

    Returns:
        (B, N) radii in pixels.
    """
    z = world_to_camera(points, world_mat)[..., 2].clamp_min(1e-3)  # (B, N)
    rows = world_mat[:, :3, :3]
    det = (rows[:, 0] * torch.cross(rows[:, 1], rows[:, 2], dim=-1)).sum(-1)  # (B,): exportable, no linalg
    scale = det.abs().pow(1.0 / 3.0).to(z.dtype)
    return radius * (scale * K[:, 0, 0])[:, None] / z


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation matrices exp([w]_x) of axis-angle vectors (Rodrigues), differentiable at w = 0.

    Args:
        rotvec: (B, 3) axis-angle vectors w (radians; the axis is w / |w|).

    Returns:
        (B, 3, 3) rotation matrices, same dtype as ``rotvec``.

    Raises:
        ValueError: if ``rotvec`` is not (B, 3).
    """
    if rotvec.dim() != 2 or rotvec.shape[-1] != 3:
        raise ValueError(f"rotvec must be (B, 3) axis-angle vectors, got {tuple(rotvec.shape)}")
    zero = torch.zeros_like(rotvec[:, 0])
    skew = torch.stack([
        torch.stack([zero, -rotvec[:, 2], rotvec[:, 1]], -1),
        torch.stack([rotvec[:, 2], zero, -rotvec[:, 0]], -1),
        torch.stack([-rotvec[:, 1], rotvec[:, 0], zero], -1),
    ], 1)  # (B, 3, 3)
    return torch.linalg.matrix_exp(skew)


def correct_pose(world_mat: torch.Tensor, rotvec: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """A head-pose correction applied in canonical (head) space: [R exp([w]_x) | t + dt].

    The head turns by ``rotvec`` about the canonical origin (the centre of the head), then moves
    by ``translation`` in camera space; zero corrections return ``world_mat`` unchanged. (The
    per-frame pose refinement of PointAvatar's training, ``optimize_camera``.)

    Args:
        world_mat: (B, 3, 4) or (B, 4, 4) world->camera; rotvec: (B, 3) radians; translation:
            (B, 3) canonical units.

    Returns:
        (B, 3, 4) corrected world->camera matrices.
    """
    rot = axis_angle_to_matrix(rotvec.to(world_mat.dtype))  # (B, 3, 3)
    return torch.cat([world_mat[:, :3, :3] @ rot, world_mat[:, :3, 3:] + translation[:, :, None]], dim=2)
