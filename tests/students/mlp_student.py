"""A toy student: a per-point MLP on xyz (no neighbourhood at all), the smallest PointStudent.

It exists to show (and test) that a new student is one file plus one config
(``tests/students/mlp_student.yaml``): the distillation, GAR and export stages take it by its
class path. Not a model to use: it sees no neighbours, so f_s is a function of xyz alone.
"""

from __future__ import annotations

import torch
from torch import nn

from models.student import PointStudent, StudentCanonical
from models.teacher import ShadingNetwork


class _Canonical(nn.Module):
    """The canonical network as a module of ``points`` alone (what the FLOP counter sees)."""

    def __init__(self, student: MLPStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, points: torch.Tensor):
        c = self.student.canonical(points)
        return c.albedo, c.normals, c.blendshapes, c.offset, c.feature


class MLPStudent(PointStudent):
    """f_s = MLP(xyz); heads as :class:`models.student.Student`'s.

    Args:
        expression_dim: E (from the teacher).
        width: hidden width of the MLP.
        latent_dim: C_s, the width of f_s.
    """

    def __init__(self, expression_dim: int = 16, width: int = 16, latent_dim: int = 8) -> None:
        super().__init__()
        self.expression_dim, self.latent_dim = expression_dim, latent_dim
        self.encoder = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, latent_dim), nn.ReLU())
        self.albedo_head = nn.Linear(latent_dim, 3)
        self.normal_head = nn.Linear(latent_dim, 3)
        self.blendshape_head = nn.Linear(latent_dim, 3 * expression_dim)
        self.offset_head = nn.Linear(latent_dim, 3)
        for head in (self.blendshape_head, self.offset_head):  # an untrained student does not deform
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.shading = ShadingNetwork(width=8, depth=1)

    def canonical(self, points: torch.Tensor | None = None) -> StudentCanonical:
        points = self.points if points is None else points
        feature = self.encoder(points)  # (N, C_s)
        return StudentCanonical(
            points=points,
            albedo=torch.sigmoid(self.albedo_head(feature)),
            normals=nn.functional.normalize(self.normal_head(feature), dim=-1, eps=1e-12),
            blendshapes=self.blendshape_head(feature).reshape(-1, self.expression_dim, 3),
            offset=self.offset_head(feature),
            feature=feature,
        )

    def flop_forward(self, points: torch.Tensor) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        return _Canonical(self), (points,)
