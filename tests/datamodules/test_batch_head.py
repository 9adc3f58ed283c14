"""AvatarBatch.head: the first frames of a batch, every field."""

from __future__ import annotations

import torch

from datamodules.batch import AvatarBatch, collate_avatar


def test_head_keeps_the_first_frames_of_every_field():
    items = [
        {
            "image": torch.full((3, 2, 2), float(i)), "mask": torch.ones(1, 2, 2), "world_mat": torch.eye(3, 4) * i,
            "K": torch.eye(3), "expression": torch.tensor([float(i), -float(i)]), "frame_index": torch.tensor(10 + i),
        }
        for i in range(3)
    ]
    one = collate_avatar(items).head(1)
    assert isinstance(one, AvatarBatch) and len(one) == 1
    assert one.frame_index.tolist() == [10] and one.expression.tolist() == [[0.0, -0.0]]
    two = collate_avatar(items).head(2)
    assert two.frame_index.tolist() == [10, 11] and two.image[:, 0, 0, 0].tolist() == [0.0, 1.0]
