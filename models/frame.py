"""The per-frame path shared by teacher and student (DESIGN.md, "Models").

Both models compute their canonical outputs once per subject; per frame only these run:

* deformation x' = x + o(x) + sum_e psi_e B_e(x) (PointAvatar's expression blendshapes, without
  pose correctives or skinning: our head model has no skeleton);
* shading of the camera-space normal R n (R = the rotation of ``world_mat``; light stays with
  the camera), colour c = clamp(2 * S(R n) * albedo, 0, 1) (PointAvatar, Sec. 3.3).
"""

from __future__ import annotations

import torch
from torch import nn

from models.camera import rotate_normals

__all__ = ["PerFrame", "check_expression", "check_world_mat", "deform_points", "shade_points"]


def check_expression(expression: torch.Tensor, expression_dim: int, owner: str) -> None:
    """Raises ValueError unless ``expression`` is (B, expression_dim); ``owner`` names the model."""
    if expression.dim() != 2 or expression.shape[1] != expression_dim:
        raise ValueError(
            f"expression must be (B, {expression_dim}) (expression_dim of this {owner}), got {tuple(expression.shape)}"
        )


def check_world_mat(world_mat: torch.Tensor) -> None:
    """Raises ValueError unless ``world_mat`` is (B, 3, 4) or (B, 4, 4)."""
    if world_mat.dim() != 3 or world_mat.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"world_mat must be (B, 3, 4) or (B, 4, 4), got {tuple(world_mat.shape)}")


def deform_points(
    points: torch.Tensor, offset: torch.Tensor, blendshapes: torch.Tensor, expression: torch.Tensor
) -> torch.Tensor:
    """x' = x + o + sum_e psi_e B_e.

    Args:
        points: (N, 3) canonical points; offset: (N, 3); blendshapes: (N, E, 3); expression: (B, E).

    Returns:
        (B, N, 3) deformed points in canonical (world) space.
    """
    base = points + offset  # (N, 3)
    return base.unsqueeze(0) + torch.einsum("be,nec->bnc", expression, blendshapes)  # (B, N, 3)


def shade_points(
    shading: nn.Module, normals: torch.Tensor, albedo: torch.Tensor, world_mat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colours from the shading MLP of the camera-space normals.

    Args:
        shading: MLP (..., 3) -> (..., 3); normals: (N, 3) canonical unit normals; albedo: (N, 3);
        world_mat: (B, 3, 4) or (B, 4, 4).

    Returns:
        colours (B, N, 3) in [0, 1], shading (B, N, 3), camera-space normals (B, N, 3).
    """
    normals_cam = rotate_normals(normals, world_mat)  # (B, N, 3)
    shade = shading(normals_cam)  # (B, N, 3)
    colors = torch.clamp(2.0 * shade * albedo.unsqueeze(0), 0.0, 1.0)
    return colors, shade, normals_cam


class PerFrame:
    """The per-frame part of a point avatar, shared by the teacher and every student (a mixin of their
    ``nn.Module``): deformation by an expression code and shading for a camera, from canonical outputs
    that hold ``points``, ``offset``, ``blendshapes``, ``normals`` and ``albedo``.

    The class using it sets ``expression_dim`` and a ``shading`` module, and names itself in errors by
    ``avatar_name``.
    """

    expression_dim: int
    shading: nn.Module
    avatar_name: str = "avatar"

    def _check_expression(self, expression: torch.Tensor) -> None:
        check_expression(expression, self.expression_dim, self.avatar_name)

    def deform(self, canonical, expression: torch.Tensor) -> torch.Tensor:
        """Deformed points x' = x + o(x) + sum_e psi_e B_e(x).

        Args:
            canonical: the canonical outputs (N points).
            expression: (B, E) expression codes.

        Returns:
            (B, N, 3) deformed points in canonical (world) space.

        Raises:
            ValueError: if ``expression`` is not (B, E).
        """
        self._check_expression(expression)
        return deform_points(canonical.points, canonical.offset, canonical.blendshapes, expression)

    def _shade(self, canonical, world_mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_world_mat(world_mat)
        if canonical.normals is None:
            raise ValueError("shading needs normals: compute the canonical outputs with compute_normals=True")
        return shade_points(self.shading, canonical.normals, canonical.albedo, world_mat)

    def shade(self, canonical, world_mat: torch.Tensor) -> torch.Tensor:
        """Colours c = clamp(2 * S(R n) * albedo, 0, 1) for each frame's camera.

        Args:
            canonical: the canonical outputs, with normals.
            world_mat: (B, 3, 4) or (B, 4, 4) world->camera (its rotation turns the normals).

        Returns:
            (B, N, 3) colours in [0, 1].

        Raises:
            ValueError: on a bad ``world_mat`` shape or missing normals.
        """
        return self._shade(canonical, world_mat)[0]
