"""Feature adapters of the distillation stage (DESIGN.md, "Distillation losses").

The student's latent code f_s (C_s channels) and the teacher's penultimate geometry feature f_t
(C_t = 256 channels) live in different spaces. A per-point linear map A: R^{C_s} -> R^{C_t}
(a 1x1 convolution over the points, as in PointDistiller, Zhang et al. CVPR 2023, and FitNets'
regressors) aligns them before the feature and graph losses of :mod:`models.losses`.

Adapters are training-time scaffolding: they are not part of the student's canonical network and
are excluded from its parameter and FLOP counts (DESIGN.md, "Counting rules"); they are reported
separately.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureAdapter"]


class FeatureAdapter(nn.Module):
    """1x1 adapter A(f) = W f + b applied to every point: (..., C_s) -> (..., C_t).

    A 1x1 convolution over a point cloud is a linear layer shared by all points, so this is an
    ``nn.Linear(C_s, C_t)`` on the last dimension (any leading shape: (N, C_s), (B, N, C_s),
    (M, k, C_s)). Default PyTorch initialisation; ``C_s * C_t + C_t`` parameters.

    Args:
        student_channels: C_s, channels of the student's latent code f_s.
        teacher_channels: C_t, channels of the teacher's feature f_t (256 for the default teacher).
        bias: learn the offset b (default True).

    Raises:
        ValueError: when a channel count is not a positive integer.
    """

    def __init__(self, student_channels: int, teacher_channels: int, bias: bool = True) -> None:
        super().__init__()
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FeatureAdapter: {name} must be a positive int, got {value!r}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.proj = nn.Linear(student_channels, teacher_channels, bias=bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Map student features into the teacher's feature space.

        Args:
            feature: (..., C_s) float student features f_s.

        Returns:
            (..., C_t) adapted features A f_s, same dtype as the layer's output.

        Raises:
            ValueError: when the last dimension is not C_s.
        """
        if feature.dim() < 1 or feature.shape[-1] != self.student_channels:
            raise ValueError(
                f"FeatureAdapter expects (..., {self.student_channels}) student features, got {tuple(feature.shape)}"
            )
        return self.proj(feature)

    def extra_repr(self) -> str:
        return f"{self.student_channels} -> {self.teacher_channels} (1x1, per point)"
