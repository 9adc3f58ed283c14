"""Frames of a coloured mesh on a ring of cameras: the smoke-test dataset of every stage.

:class:`MeshViewsDataModule` turns a small coloured mesh (the generated tiny head, or a file such
as the Fran scan) into the same :class:`~datamodules.batch.AvatarBatch` as the tracked video:
dense surface samples rendered by our rasterizer (white background) from cameras on a circle
around the head, with exact ``world_mat``/``K`` and zero expression codes. Held-out views
alternate with training views around the ring (view i: test when i % 4 == 3, val when
i % 4 == 1, train otherwise), so the held-out cameras lie between training cameras.

Stacked on any stage's config through ``experiments/overrides/tiny_mesh.yaml``.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.batch import collate_avatar
from datamodules.meshes import Mesh, load_mesh, normalize_to_unit_head, sample_surface
from datamodules.resumable import ResumableDataLoader
from datamodules.tiny import make_tiny_head
from models.rasterizer import rasterize_points

__all__ = ["MeshViewsDataModule", "look_at_world_mat", "ring_cameras"]


def look_at_world_mat(eye: torch.Tensor, target: torch.Tensor | None = None, down=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """World->camera (3, 4) of a camera at ``eye`` looking at ``target`` (OpenCV: x right, y down, z forward).

    Args:
        eye: (3,) camera centre in world units.
        target: (3,) point looked at (default origin).
        down: world direction that appears downwards in the image (default +y: the tiny head's
            chin side, see :func:`datamodules.tiny.make_tiny_head`).

    Raises:
        ValueError: when ``down`` is parallel to the viewing direction.
    """
    target = torch.zeros(3, dtype=eye.dtype) if target is None else target
    forward = torch.nn.functional.normalize(target - eye, dim=0)
    down_t = torch.as_tensor(down, dtype=eye.dtype)
    right = torch.linalg.cross(down_t, forward)
    if right.norm() < 1e-6:
        raise ValueError("look_at_world_mat: `down` is parallel to the viewing direction; pick another")
    right = right / right.norm()
    down_cam = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down_cam, forward])  # (3, 3) rows = camera axes in world coordinates
    return torch.cat([rot, (-rot @ eye)[:, None]], dim=1)  # (3, 4)


def ring_cameras(
    num_views: int, distance: float, elevation_deg: float, fov_deg: float, image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras evenly spaced on a horizontal circle around the origin, all looking at it.

    View 0 sits at (0, -h, -distance') in front of the face (the tiny head looks towards -z),
    the others follow around the vertical (y) axis; ``elevation_deg`` lifts them (towards -y).

    Returns:
        world_mat (V, 3, 4) and K (V, 3, 3) float32, pixel intrinsics for a square image with the
        principal point at the centre and focal length from the horizontal field of view.
    """
    elevation = math.radians(elevation_deg)
    mats = []
    for i in range(num_views):
        azimuth = 2 * math.pi * i / num_views
        eye = torch.tensor(
            [
                distance * math.cos(elevation) * math.sin(azimuth),
                -distance * math.sin(elevation),
                -distance * math.cos(elevation) * math.cos(azimuth),
            ],
            dtype=torch.float64,
        )
        mats.append(look_at_world_mat(eye))
    focal = image_size / (2 * math.tan(math.radians(fov_deg) / 2))
    K = torch.tensor([[focal, 0, image_size / 2], [0, focal, image_size / 2], [0, 0, 1]], dtype=torch.float64)
    return torch.stack(mats).float(), K.expand(num_views, 3, 3).float().clone()


class _Frames(Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor], indices: list[int]) -> None:
        self.tensors, self.indices = tensors, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.indices[i]
        return {name: t[j] for name, t in self.tensors.items()}


class MeshViewsDataModule(pl.LightningDataModule):
    """Rendered views of a coloured mesh, served as :class:`~datamodules.batch.AvatarBatch`.

    Args:
        mesh: ``"tiny"`` for the generated head (:func:`datamodules.tiny.make_tiny_head`), or the
            path of a coloured mesh file (.obj/.ply/.glb/.vtk, see :func:`datamodules.meshes.load_mesh`).
        num_views: cameras on the ring (>= 4: every fourth is a test view, every fourth a val view).
        image_size: square frame size in pixels.
        expression_dim: E of the (all-zero) expression codes, for the model's blendshapes.
        samples: dense surface samples rendered per view (the "ground-truth" point cloud).
        fov_deg, distance, elevation_deg: ring camera field of view (degrees), distance and
            elevation; the mesh is normalised to a half-extent of 0.5 around the origin.
        point_radius: splat radius of the samples, in pixels.
        batch_size, num_workers: data loading.
        seed: surface-sampling seed.

    Raises:
        ValueError: fewer than 4 views, or a mesh without colours or faces.
        FileNotFoundError: a mesh path that does not exist.
    """

    def __init__(
        self,
        mesh: str = "tiny",
        num_views: int = 16,
        image_size: int = 32,
        expression_dim: int = 4,
        samples: int = 20_000,
        fov_deg: float = 30.0,
        distance: float = 2.2,
        elevation_deg: float = 10.0,
        point_radius: float = 1.0,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_views < 4:
            raise ValueError(f"num_views must be >= 4 (train, val and test views), got {num_views}")
        self.save_hyperparameters()
        self.mesh = mesh
        self.num_views = num_views
        self.image_size = image_size
        self.expression_dim = expression_dim
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._frames: dict[str, torch.Tensor] | None = None

    # -- data ----------------------------------------------------------------------------------
    def _load(self) -> Mesh:
        if self.mesh == "tiny":
            mesh = make_tiny_head(subdivisions=3, seed=self.hparams.seed)
        else:
            path = Path(self.mesh)
            if not path.is_file():
                raise FileNotFoundError(f"mesh file {path} not found (data.init_args.mesh: 'tiny' or a mesh path)")
            mesh = load_mesh(path)
        if mesh.colors is None or mesh.faces is None:
            raise ValueError(f"{self.mesh}: MeshViewsDataModule needs a coloured triangle mesh (faces and colours)")
        return normalize_to_unit_head(mesh)

    def render_views(self) -> dict[str, torch.Tensor]:
        """Render every ring view: the fields of :class:`AvatarBatch` stacked over views (cached)."""
        if self._frames is not None:
            return self._frames
        hp = self.hparams
        points, _, colors = sample_surface(self._load(), hp.samples, seed=hp.seed)
        world_mat, K = ring_cameras(self.num_views, hp.distance, hp.elevation_deg, hp.fov_deg, self.image_size)
        points_t = torch.from_numpy(np.ascontiguousarray(points))
        colors_t = torch.from_numpy(np.ascontiguousarray(colors))
        with torch.no_grad():
            out = rasterize_points(points_t, colors_t, world_mat, K, self.image_size, hp.point_radius, background=1.0)
        mask = (out.alpha > 0.5).float()
        self._frames = {
            "image": out.image.clamp(0, 1),
            "mask": mask,
            "world_mat": world_mat,
            "K": K,
            "expression": torch.zeros(self.num_views, self.expression_dim),
            "frame_index": torch.arange(self.num_views, dtype=torch.int64),
        }
        return self._frames

    def split_indices(self, split: str) -> list[int]:
        """View indices of ``split`` in {"train", "val", "test"}."""
        remainder = {"val": [1], "test": [3], "train": [0, 2]}[split]
        return [i for i in range(self.num_views) if i % 4 in remainder]

    def training_frames(self) -> dict[str, torch.Tensor]:
        """The training views (image, mask, world_mat, expression, frame_index), for the baselines and
        the teacher's code corrections (:meth:`datamodules.avatar.AvatarDataModule.training_frames` has
        the shapes)."""
        return self._training_views("image", "mask", "world_mat", "expression", "frame_index")

    def training_codes(self) -> dict[str, torch.Tensor]:
        """The training views' codes without their images (expression, world_mat, frame_index;
        :meth:`datamodules.avatar.AvatarDataModule.training_codes` has the shapes)."""
        return self._training_views("expression", "world_mat", "frame_index")

    def _training_views(self, *keys: str) -> dict[str, torch.Tensor]:
        frames, idx = self.render_views(), self.split_indices("train")
        return {k: frames[k][idx] for k in keys}

    def split_sizes(self) -> dict[str, int]:
        """Views per split, {"train", "val", "test"}."""
        return {split: len(self.split_indices(split)) for split in ("train", "val", "test")}

    def setup(self, stage: str | None = None) -> None:
        self.render_views()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            _Frames(self.render_views(), self.split_indices(split)),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_avatar,
        )

    def train_dataloader(self) -> DataLoader:
        # a seeded order per epoch whose position is checkpointed: a resumed fit continues it exactly
        return ResumableDataLoader(
            _Frames(self.render_views(), self.split_indices("train")),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate_avatar,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
