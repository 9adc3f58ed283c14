"""Serve a tracked avatar dataset as :class:`~datamodules.batch.AvatarBatch` batches (DESIGN.md, "Data").

:class:`AvatarDataModule` prepares the dataset when missing (``prepare_data``), reads it
(:func:`~datamodules.records.read_dataset`: ours or an IMavatar / PointAvatar subject folder), splits
frames into disjoint train / val / test sets by their order (test: the last ``test_fraction`` of the
clip; val: the block before it, or frames spread over the training range; see
:func:`datamodules.prepare.split_indices`), refuses a split whose val/test frames were seen by the
expression PCA, crops one square box around the head over the whole video (the union of the
head-mask boxes, enlarged by ``crop_margin``; :mod:`datamodules.records` states the crop/resize
convention), resizes it to ``image_size`` and keeps all frames in memory as uint8 tensors,
converted to float per item.

Reenactment: with ``driving_video``, ``predict_dataloader`` serves that video's frames retargeted
to the subject (:func:`driving_dataset`, on :mod:`datamodules.driving`'s codes and poses).

The reading, cropping and in-memory dataset live in :mod:`datamodules.records` (re-exported here).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules.batch import collate_avatar
from datamodules.driving import driving_dataset_name, driving_sequence, prepare_driver
from datamodules.prepare import DEFAULT_EXPRESSION_DIM, DEFAULT_FOV, JSON_NAME, split_indices
from datamodules.records import (
    AvatarFrameDataset,
    AvatarRecord,
    _load_mask,
    _load_rgb,
    _read_json,
    axis_angle_to_matrix,
    crop_and_resize,
    crop_intrinsics,
    driving_expression_codes,
    imavatar_camera_to_opencv,
    read_dataset,
    square_crop_box,
)
from datamodules.resumable import ResumableDataLoader

__all__ = [
    "AvatarRecord",
    "read_dataset",
    "driving_expression_codes",
    "imavatar_camera_to_opencv",
    "axis_angle_to_matrix",
    "square_crop_box",
    "crop_and_resize",
    "crop_intrinsics",
    "AvatarFrameDataset",
    "AvatarDataModule",
    "driving_dataset",
]


_LOAD_CHUNK = 64  # frames decoded and resized together in setup()

class AvatarDataModule(pl.LightningDataModule):
    """Tracked frames of one talking-head video as :class:`~datamodules.batch.AvatarBatch` batches.

    Args:
        data_root: folder holding prepared datasets (git-ignored ``data/``).
        video: the video to prepare when the dataset is missing (None: the default carphone clip).
        dataset_name: dataset folder under ``data_root`` (default: the video's stem, "carphone"
            for the default clip, with ``_first<N>`` appended when ``max_frames`` is set). It may
            also be an IMavatar/PointAvatar subject folder.
        image_size: side S of the square crop served (pixels).
        batch_size: frames per batch.
        num_workers: DataLoader workers.
        test_fraction: the last fraction of frames, held out as test (read only by ``lightning test``
            and the report).
        val_fraction: the fraction held out as val (checkpoint selection, sweeps, design choices);
            0 = no validation frames (warned: ``best.ckpt`` then has nothing to select on).
            Never a test or training frame.
        val_mode: ``"block"`` (the frames just before test) or ``"interleaved"`` (spread over the
            training range), :func:`datamodules.prepare.split_indices`.
        val_every: keep every ``val_every``-th val frame (a cheaper validation).
        expression_dim: E used when preparing (None: 16). An existing dataset's own E wins (with
            a warning when an explicitly given value differs).
        fov: horizontal field of view (degrees) used when preparing.
        max_frames: prepare only the first N frames of the video.
        crop_margin: the square crop's side is the head box's larger side * (1 + crop_margin).
        shuffle: shuffle the training frames.
        driving_video: a video whose expressions and head motion drive this subject in
            ``predict`` (reenactment, :mod:`datamodules.driving`); tracked once into
            ``data_root/<stem>_driving``.

    Raises:
        ValueError: on out-of-range arguments.
    """

    def __init__(self, data_root: str = "data", video: str | None = None, dataset_name: str | None = None,
                 image_size: int = 128, batch_size: int = 8, num_workers: int = 0, test_fraction: float = 0.2,
                 val_fraction: float = 0.1, val_mode: str = "block", val_every: int = 1, expression_dim: int | None = None,
                 fov: float = DEFAULT_FOV, max_frames: int | None = None, crop_margin: float = 0.1,
                 shuffle: bool = True, driving_video: str | None = None) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_every < 1:
            raise ValueError(f"val_every must be >= 1, got {val_every}")
        if crop_margin < 0:
            raise ValueError(f"crop_margin must be >= 0, got {crop_margin}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
        split_indices(100, test_fraction, val_fraction, val_mode)  # validates the split
        if val_fraction == 0:
            warnings.warn("val_fraction=0: no validation frames, so best.ckpt and early stopping have nothing to "
                          "select on (the test frames are never used for that)", stacklevel=2)
        # expression_dim is logged through the model (linked, resolved); None here would clash with it
        self.save_hyperparameters(ignore=["expression_dim"])
        self.data_root = Path(data_root)
        self.video = video
        if dataset_name is None:
            stem = "carphone" if video is None else Path(video).stem
            dataset_name = stem if max_frames is None else f"{stem}_first{max_frames}"
        self.dataset_dir = self.data_root / dataset_name
        self._image_size = int(image_size)
        if expression_dim is not None and expression_dim < 1:
            raise ValueError(f"expression_dim must be >= 1 or None, got {expression_dim}")
        self._explicit_expression_dim = expression_dim is not None
        self._configured_expression_dim = int(expression_dim) if expression_dim is not None else DEFAULT_EXPRESSION_DIM
        self.batch_size, self.num_workers, self.shuffle = batch_size, num_workers, shuffle
        self.test_fraction, self.val_fraction, self.val_every = test_fraction, val_fraction, val_every
        self.val_mode = val_mode
        self.fov, self.max_frames, self.crop_margin = fov, max_frames, crop_margin
        self.record: AvatarRecord | None = None
        self.train_set = self.val_set = self.test_set = None
        self.driving_video = driving_video
        self.predict_set, self.driving = None, None  # built by predict_dataloader()
        self.train_frame_indices: list[int] = []
        self.val_frame_indices: list[int] = []
        self.test_frame_indices: list[int] = []

    # -- facts linked into the model (apply_on="instantiate") -----------------------------------
    @property
    def image_size(self) -> int:
        """S, the side of the served square images."""
        return self._image_size

    @property
    def expression_dim(self) -> int:
        """E: the existing dataset's (read from its JSON), else the configured one."""
        if self.record is not None:
            return self.record.expression_dim
        path = self.dataset_dir / JSON_NAME
        if not path.is_file():
            return self._configured_expression_dim
        data = _read_json(path)
        first = data["frames"][0]
        dim = len(first.get("expression", []))
        if data.get("camera_convention") is None:
            dim += max(0, len(first.get("pose", [])) - 3)
        if self._explicit_expression_dim and dim != self._configured_expression_dim:
            warnings.warn(f"{self.dataset_dir} has expression dimension {dim}; the configured "
                          f"{self._configured_expression_dim} applies only when preparing", stacklevel=2)
        return dim

    # -- Lightning hooks ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Prepare the dataset folder when it is missing (Lightning runs this on one process)."""
        if self.driving_video is not None:
            prepare_driver(self.driving_video, self.driving_dir, fov=self.fov)
        if (self.dataset_dir / JSON_NAME).is_file():
            return
        if self.dataset_dir.exists() and any(self.dataset_dir.iterdir()):
            raise FileExistsError(f"{self.dataset_dir} exists but holds no {JSON_NAME}; remove it or pick another "
                                  "dataset_name")
        from datamodules.prepare import prepare

        if self.dataset_dir.exists():
            self.dataset_dir.rmdir()  # an empty folder: prepare creates it atomically
        prepare(self.video, self.dataset_dir, fov=self.fov, expression_dim=self._configured_expression_dim,
                test_fraction=self.test_fraction, val_fraction=self.val_fraction, val_mode=self.val_mode,
                max_frames=self.max_frames)

    def setup(self, stage: str | None = None) -> None:
        """Read the dataset, split it, crop and resize every frame into memory (once).

        Raises:
            FileNotFoundError: if the dataset folder is missing (prepare_data not run).
            ValueError: if a val/test frame was among the expression PCA's fit frames, or a frame's
                size differs from the dataset's.
        """
        if self.record is not None:
            return
        record = read_dataset(self.dataset_dir)
        n = len(record.frame_numbers)
        train_idx, val_idx, test_idx = split_indices(n, self.test_fraction, self.val_fraction, self.val_mode)
        val_idx = val_idx[::self.val_every]
        held_out = set(record.frame_numbers[np.concatenate([val_idx, test_idx])].tolist())
        leaked = sorted(held_out & set(record.pca_fit_frames))
        if leaked:
            prepared = (record.meta.get("split") or {})
            raise ValueError(
                f"the split (test_fraction={self.test_fraction}, val_fraction={self.val_fraction}, "
                f"val_mode={self.val_mode}) puts frames {leaked[:5]}{'...' if len(leaked) > 5 else ''} in val/test, but "
                f"{self.dataset_dir}'s expression PCA was fitted on them (it was prepared with "
                f"val_fraction={prepared.get('val_fraction', '?')}, val_mode={prepared.get('val_mode', 'block')}); "
                "pass those, or remove the folder to prepare it again")
        box = square_crop_box(record.head_box if record.head_box is not None else self._mask_union(record),
                              record.width, record.height, self.crop_margin)
        size = self._image_size
        images = torch.empty(n, 3, size, size, dtype=torch.uint8)
        masks = torch.empty(n, 1, size, size, dtype=torch.uint8)
        for start in range(0, n, _LOAD_CHUNK):  # decode a chunk, then crop/resize it as one batch
            stop = min(n, start + _LOAD_CHUNK)
            chunk = np.empty((stop - start, record.height, record.width, 4), dtype=np.uint8)
            for j, i in enumerate(range(start, stop)):
                rgb, mask = _load_rgb(record.image_paths[i]), _load_mask(record.mask_paths[i])
                if rgb.shape[:2] != (record.height, record.width) or mask.shape != (record.height, record.width):
                    raise ValueError(f"{record.image_paths[i]} or its mask is not {record.width}x{record.height} "
                                     "like the dataset")
                chunk[j, :, :, :3] = rgb
                chunk[j, :, :, 3] = mask
            out = crop_and_resize(torch.from_numpy(chunk).permute(0, 3, 1, 2).float(), box, size)  # (c, 4, S, S)
            images[start:stop] = out[:, :3].round().clamp(0, 255).to(torch.uint8)
            masks[start:stop] = (out[:, 3:] >= 0.5).to(torch.uint8)
        self.record = record
        self.crop_box = box
        self.K_full = record.K
        self.K = torch.from_numpy(crop_intrinsics(record.K, box, size)).float()
        world_mats = torch.from_numpy(record.world_mats).float()
        expressions = torch.from_numpy(record.expressions).float()
        numbers = torch.from_numpy(record.frame_numbers)

        def subset(idx: np.ndarray) -> AvatarFrameDataset:
            t = torch.from_numpy(idx)
            return AvatarFrameDataset(images[t], masks[t], world_mats[t], self.K, expressions[t], numbers[t])

        self._images, self._masks = images, masks
        self.train_set, self.val_set, self.test_set = subset(train_idx), subset(val_idx), subset(test_idx)
        self.train_frame_indices = record.frame_numbers[train_idx].tolist()
        self.val_frame_indices = record.frame_numbers[val_idx].tolist()
        self.test_frame_indices = record.frame_numbers[test_idx].tolist()

    @staticmethod
    def _mask_union(record: AvatarRecord) -> list[int] | None:
        box = None
        for mp in record.mask_paths:
            mask = _load_mask(mp)
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if len(rows) == 0:
                continue
            b = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
            box = b if box is None else [min(box[0], b[0]), min(box[1], b[1]), max(box[2], b[2]), max(box[3], b[3])]
        return box

    def _loader(self, dataset: AvatarFrameDataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        # training: a seeded order per epoch whose position is checkpointed (exact resume)
        loader = ResumableDataLoader if train else DataLoader
        return loader(dataset, batch_size=self.batch_size, shuffle=train and self.shuffle,
                      num_workers=self.num_workers, collate_fn=collate_avatar,
                      persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    @property
    def driving_dir(self) -> Path | None:
        """The driving video's dataset folder (None without ``driving_video``)."""
        if self.driving_video is None:
            return None
        return self.data_root / driving_dataset_name(self.driving_video)

    def predict_dataloader(self) -> DataLoader:
        """Reenactment: one item per frame of ``driving_video`` (:func:`driving_dataset`).

        Raises:
            ValueError: without ``driving_video``.
        """
        if self.driving_video is None:
            raise ValueError("predict renders a driving video: pass --data.init_args.driving_video PATH")
        if self.predict_set is None:
            self.predict_set, self.driving = driving_dataset(self, self.driving_dir)
        return self._loader(self.predict_set, train=False)

    @property
    def predict_fps(self) -> float | None:
        """Frame rate of the driving video (None when unknown or not built yet)."""
        return (self.driving.fps or None) if self.driving is not None else None

    def training_frames(self) -> dict[str, torch.Tensor]:
        """The training frames, for the baselines (:class:`lightning_modules.metrics.Baselines`) and the
        teacher's per-frame code corrections.

        Returns:
            {"image": (F, 3, S, S) float32 in [0, 1], "mask": (F, 1, S, S) float32 in {0, 1},
            "world_mat": (F, 3, 4) float32, "expression": (F, E) float32, "frame_index": (F,) int64
            frame numbers of the source video}.

        Raises:
            RuntimeError: before ``setup()``.
        """
        if self.train_set is None:
            raise RuntimeError("call setup() before training_frames()")
        t = self.train_set
        return {"image": t.images.float() / 255.0, "mask": t.masks.float(), **self.training_codes()}

    def training_codes(self) -> dict[str, torch.Tensor]:
        """The training frames' codes without their images (the teacher's expression statistics and
        code table): {"expression": (F, E) float32, "world_mat": (F, 3, 4) float32, "frame_index": (F,)
        int64}.

        Raises:
            RuntimeError: before ``setup()``.
        """
        if self.train_set is None:
            raise RuntimeError("call setup() before training_codes()")
        t = self.train_set
        return {"expression": t.expressions, "world_mat": t.world_mats, "frame_index": t.frame_numbers}

    def split_sizes(self) -> dict[str, int]:
        """Frames per split, {"train", "val", "test"} (after ``setup()``)."""
        return {"train": len(self.train_frame_indices), "val": len(self.val_frame_indices),
                "test": len(self.test_frame_indices)}


def driving_dataset(subject, driver_root: str | Path):
    """The predict dataset of a subject's datamodule: one item per frame of the driving video.

    Args:
        subject: a set-up :class:`~datamodules.avatar.AvatarDataModule` of the subject (its
            dataset folder, training poses and crop intrinsics ``K`` are used).
        driver_root: the driver's prepared dataset folder (:func:`prepare_driver`).

    Returns:
        (:class:`~datamodules.avatar.AvatarFrameDataset`, :class:`DrivingSequence`): items with
        the driver's cropped frame and mask (S x S, the subject's image size), the retargeted
        ``world_mat``, the subject's ``K``, the driving ``expression`` and the driver's frame
        number.

    Raises:
        RuntimeError: if ``subject`` is not set up.
        ValueError: as :func:`driving_sequence`.
    """
    if subject.train_set is None:
        raise RuntimeError("set up the subject's datamodule before building its driving dataset")
    driver_root = Path(driver_root)
    seq = driving_sequence(subject.dataset_dir, driver_root, subject.train_set.world_mats.double().numpy())
    # the driver's frames, cropped around its own head at the subject's size (all frames "train")
    with warnings.catch_warnings():  # no val frames on purpose: nothing is selected on a driver
        warnings.filterwarnings("ignore", message="val_fraction=0")
        frames = AvatarDataModule(data_root=str(driver_root.parent), dataset_name=driver_root.name,
                                  image_size=subject.image_size, test_fraction=0.0, val_fraction=0.0,
                                  crop_margin=subject.crop_margin)
    frames.setup()
    src = torch.from_numpy(seq.source)
    dataset = AvatarFrameDataset(
        frames.train_set.images[src], frames.train_set.masks[src],
        torch.from_numpy(seq.world_mats).float(), subject.K,
        torch.from_numpy(seq.expressions).float(), torch.from_numpy(seq.frame_numbers),
    )
    return dataset, seq
