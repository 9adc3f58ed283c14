"""The one batch type every stage consumes (DESIGN.md, "Data")."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["AvatarBatch", "collate_avatar"]


@dataclass
class AvatarBatch:
    """A batch of tracked frames of one subject.

    Attributes:
        image: (B, 3, H, W) float32 in [0, 1], RGB.
        mask: (B, 1, H, W) float32 in {0, 1}, the head mask (torso excluded).
        world_mat: (B, 3, 4) float32, world (canonical avatar space) -> camera, OpenCV convention.
        K: (B, 3, 3) float32 pixel intrinsics of the cropped, resized image (pixel centres at +0.5).
        expression: (B, E) float32 expression code (zeros for static meshes).
        frame_index: (B,) int64 frame number in the source video.
    """

    image: torch.Tensor
    mask: torch.Tensor
    world_mat: torch.Tensor
    K: torch.Tensor
    expression: torch.Tensor
    frame_index: torch.Tensor

    def to(self, *args, **kwargs) -> AvatarBatch:
        """Move every tensor (Lightning calls this through ``transfer_batch_to_device``)."""
        return AvatarBatch(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})

    def head(self, n: int) -> AvatarBatch:
        """The first ``n`` frames as a batch (views, no copy), e.g. ``head(1)`` to time one frame."""
        return AvatarBatch(**{f.name: getattr(self, f.name)[:n] for f in fields(self)})

    def __len__(self) -> int:
        return self.image.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return self.image.shape[-2], self.image.shape[-1]


def collate_avatar(items: list[dict[str, torch.Tensor]]) -> AvatarBatch:
    """Stack per-frame dicts (keys = the fields of :class:`AvatarBatch`, no batch dim) into a batch."""
    return AvatarBatch(**{f.name: torch.stack([it[f.name] for it in items]) for f in fields(AvatarBatch)})
