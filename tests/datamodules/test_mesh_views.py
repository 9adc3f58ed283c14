"""Rendered views of a coloured mesh: exact cameras, splits, the batch type."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.batch import AvatarBatch
from datamodules.mesh_views import MeshViewsDataModule, look_at_world_mat, ring_cameras
from models.camera import project, world_to_camera


def test_look_at_maps_origin_onto_the_optical_axis_and_keeps_orientation():
    mat = look_at_world_mat(torch.tensor([0.0, 0.0, -2.0]))
    cam = world_to_camera(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), mat[None])[0]
    assert torch.allclose(cam[0], torch.tensor([0.0, 0.0, 2.0]))
    assert torch.allclose(cam[1], torch.tensor([1.0, 0.0, 2.0]))  # world +x is image right
    assert torch.allclose(cam[2], torch.tensor([0.0, 1.0, 2.0]))  # world +y is image down
    rot = mat[:, :3]
    assert torch.allclose(rot @ rot.T, torch.eye(3), atol=1e-6)
    with pytest.raises(ValueError, match="parallel"):
        look_at_world_mat(torch.tensor([0.0, 3.0, 0.0]))


def test_ring_cameras_look_at_the_origin_from_the_stated_distance():
    world_mat, K = ring_cameras(8, distance=2.0, elevation_deg=10.0, fov_deg=30.0, image_size=32)
    cam = world_to_camera(torch.zeros(1, 3), world_mat)  # (8, 1, 3)
    assert torch.allclose(cam[:, 0, :2], torch.zeros(8, 2), atol=1e-5)
    assert torch.allclose(cam[:, 0, 2], torch.full((8,), 2.0), atol=1e-5)
    uv = project(cam, K)
    assert torch.allclose(uv, torch.full((8, 1, 2), 16.0), atol=1e-4)  # principal point = image centre
    assert K[0, 0, 0].item() == pytest.approx(16 / math.tan(math.radians(15)))


def test_batches_splits_and_the_face_in_view_zero():
    dm = MeshViewsDataModule(num_views=8, image_size=32, expression_dim=3, samples=4000, batch_size=2)
    dm.setup("fit")
    assert dm.expression_dim == 3 and dm.image_size == 32
    splits = {s: dm.split_indices(s) for s in ("train", "val", "test")}
    assert splits == {"train": [0, 2, 4, 6], "val": [1, 5], "test": [3, 7]}
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, AvatarBatch)
    assert batch.image.shape == (2, 3, 32, 32) and batch.mask.shape == (2, 1, 32, 32)
    assert batch.world_mat.shape == (2, 3, 4) and batch.K.shape == (2, 3, 3)
    assert torch.equal(batch.expression, torch.zeros(2, 3)) and batch.frame_index.dtype == torch.int64
    frames = dm.render_views()
    assert set(frames["mask"].unique().tolist()) == {0.0, 1.0}
    # white background outside the mask, the head inside: a unit-head at distance 2.2 fills a third of the frame
    outside = frames["image"][(frames["mask"] == 0).expand_as(frames["image"])]
    assert (outside > 0.99).float().mean() > 0.95  # only the silhouette's half-covered pixels are not white
    assert 0.2 < frames["mask"].mean() < 0.7
    # view 0 faces the tiny head's red lips (below the image centre): red dominates a pixel there
    mouth = frames["image"][0, :, 19:23, 14:18].mean((1, 2))
    assert mouth[0] > mouth[1] + 0.1 and mouth[0] > mouth[2] + 0.1
    train = dm.training_frames()
    assert train["image"].shape == (4, 3, 32, 32) and torch.equal(train["image"][1], frames["image"][2])
    assert dm.split_sizes() == {"train": 4, "val": 2, "test": 2}


def test_loads_a_real_scan(fran_path):
    dm = MeshViewsDataModule(mesh=str(fran_path), num_views=4, image_size=24, samples=3000)
    frames = dm.render_views()
    assert frames["image"].shape == (4, 3, 24, 24) and frames["mask"].sum() > 0


def test_bad_mesh_arguments():
    with pytest.raises(ValueError, match="num_views"):
        MeshViewsDataModule(num_views=3)
    with pytest.raises(FileNotFoundError, match="tiny"):
        MeshViewsDataModule(mesh="no/such/mesh.ply").setup()
