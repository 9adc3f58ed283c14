"""Per-frame corrections of the tracked codes, learnt with the avatar (PointAvatar's
``optimize_expression`` and ``optimize_camera``).

Landmark tracking gives every training frame an expression code ``psi`` (B, E) and a head pose
``world_mat`` (B, 3, 4) with the tracker's jitter and the PCA's truncation. PointAvatar trains
its avatar with learnable per-frame corrections of both ("optimize camera and flame poses, this
is important for alignment and numerical results", its public config). Here, for training frame
``f``:

    psi'_f = psi_f + d_psi_f
    world_mat'_f = [R_f exp([w_f]_x) | t_f + dt_f]      (:func:`models.camera.correct_pose`)

with ``d_psi`` (F, E), ``w`` (F, 3) radians and ``dt`` (F, 3) canonical units, all starting at
zero, and a quadratic prior tying them to tracking:

    prior = mean_f sum_e d_psi_f,e^2 / var_e + lambda_rot mean_f |w_f|^2 + lambda_trans mean_f |dt_f|^2

(the expression term is the squared Mahalanobis length of the correction under the training
variance var_e of each code component, so a correction is measured against that component's own
spread: the PCA's tail components vary a hundred times less than its first). Only the frames the table was built for have corrections; held-out
frames keep their tracked codes (or are refined with the model frozen: the ``refined`` protocol of
the evaluation).

Rows are looked up by the frame number of the source video (``AvatarBatch.frame_index``).
"""

from __future__ import annotations

import torch
from torch import nn

from models.camera import correct_pose

__all__ = ["FrameCodeCorrections"]


class FrameCodeCorrections(nn.Module):
    """Learnable expression and head-pose corrections of a fixed set of frames (module docstring).

    Args:
        frame_numbers: (F,) int, the frame numbers (source video) the table holds, distinct.
        expression_dim: E.
        expression_var: optional (E,) training variance of the tracked codes, > 0, for the prior
            (default ones).

    Raises:
        ValueError: on an empty or repeated ``frame_numbers`` or a wrong ``expression_var`` shape.
    """

    def __init__(self, frame_numbers: torch.Tensor, expression_dim: int,
                 expression_var: torch.Tensor | None = None) -> None:
        super().__init__()
        frames = torch.as_tensor(frame_numbers, dtype=torch.int64).flatten()
        if frames.numel() == 0:
            raise ValueError("FrameCodeCorrections needs at least one frame number")
        if torch.unique(frames).numel() != frames.numel():
            raise ValueError("frame_numbers must be distinct (one correction per frame)")
        if expression_var is None:
            expression_var = torch.ones(expression_dim)
        expression_var = torch.as_tensor(expression_var, dtype=torch.float32)
        if expression_var.shape != (expression_dim,) or not bool((expression_var > 0).all()):
            raise ValueError(f"expression_var must be ({expression_dim},) positive variances, got "
                             f"{tuple(expression_var.shape)}")
        order = torch.argsort(frames)
        self.register_buffer("frame_numbers", frames[order])  # (F,) ascending, for searchsorted
        self.register_buffer("expression_var", expression_var.clone())  # (E,) the prior's var_e
        num = frames.numel()
        self.expression = nn.Parameter(torch.zeros(num, expression_dim))  # d_psi (F, E)
        self.rotation = nn.Parameter(torch.zeros(num, 3))  # w (F, 3) radians
        self.translation = nn.Parameter(torch.zeros(num, 3))  # dt (F, 3) canonical units

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "") -> FrameCodeCorrections | None:
        """The table stored under ``prefix`` in a state dict (sizes from its tensors), or None when the
        state dict holds none (an avatar fitted without code refinement)."""
        key = f"{prefix}frame_numbers"
        if key not in state_dict:
            return None
        table = cls(state_dict[key], int(state_dict[f"{prefix}expression"].shape[1]),
                    state_dict.get(f"{prefix}expression_var"))
        table.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        return table

    @property
    def num_frames(self) -> int:
        """F, the number of frames with a correction."""
        return int(self.frame_numbers.numel())

    def _lookup(self, frame_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(frame numbers (B,) int64 on the table's device, candidate rows (B,), found (B,) bool)."""
        frame_index = frame_index.to(self.frame_numbers.device, torch.int64)
        rows = torch.searchsorted(self.frame_numbers, frame_index).clamp_max(self.num_frames - 1)
        return frame_index, rows, self.frame_numbers[rows] == frame_index

    def rows(self, frame_index: torch.Tensor) -> torch.Tensor:
        """Rows (B,) int64 of the frames ``frame_index`` (B,).

        Raises:
            KeyError: if a frame has no correction (a held-out frame, or another video's).
        """
        frame_index, rows, found = self._lookup(frame_index)
        if not bool(found.all()):
            raise KeyError(
                f"frame(s) {frame_index[~found].tolist()[:5]} have no code correction: only the "
                f"{self.num_frames} training frames the avatar was fitted on have one"
            )
        return rows

    def has(self, frame_index: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which of the frames ``frame_index`` (B,) have a correction."""
        return self._lookup(frame_index)[2]

    def forward(self, frame_index: torch.Tensor, expression: torch.Tensor,
                world_mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The corrected codes of training frames.

        Args:
            frame_index: (B,) int64 frame numbers; expression: (B, E) tracked codes; world_mat:
                (B, 3, 4) or (B, 4, 4) tracked world->camera.

        Returns:
            expression (B, E) and world_mat (B, 3, 4), corrected (differentiable w.r.t. the table).

        Raises:
            KeyError: if a frame has no correction.
        """
        rows = self.rows(frame_index)
        corrected = expression + self.expression[rows].to(expression.dtype)
        pose = correct_pose(world_mat, self.rotation[rows], self.translation[rows].to(world_mat.dtype))
        return corrected, pose

    def prior(self, rotation_weight: float = 100.0, translation_weight: float = 100.0) -> torch.Tensor:
        """The quadratic prior of the whole table (module docstring), a float32 scalar.

        Args:
            rotation_weight: lambda_rot (per rad^2; 100: 0.1 rad costs as much as one standard
                deviation of expression).
            translation_weight: lambda_trans (per canonical unit^2; 1 unit = 25 cm).
        """
        expression = (self.expression.float().pow(2) / self.expression_var).sum(-1).mean()
        rotation = self.rotation.float().pow(2).sum(-1).mean()
        translation = self.translation.float().pow(2).sum(-1).mean()
        return expression + rotation_weight * rotation + translation_weight * translation

    @torch.no_grad()
    def magnitudes(self) -> dict[str, float]:
        """Mean correction size over the table: ``expression`` (Mahalanobis length, in standard deviations),
        ``rotation_deg`` (degrees), ``translation`` (canonical units)."""
        return {
            "expression": float((self.expression.pow(2) / self.expression_var).sum(-1).sqrt().mean()),
            "rotation_deg": float(torch.rad2deg(self.rotation.norm(dim=-1)).mean()),
            "translation": float(self.translation.norm(dim=-1).mean()),
        }
