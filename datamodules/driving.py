"""Reenactment input: a driving video's expressions and head motion, retargeted to a subject.

``lightning predict --config experiments/gar.yaml --ckpt_path <gar run>/checkpoints/last.ckpt
--data.init_args.driving_video VIDEO`` serves, through
:meth:`datamodules.avatar.AvatarDataModule.predict_dataloader`, one
:class:`~datamodules.batch.AvatarBatch` item per frame of VIDEO (:func:`datamodules.avatar.driving_dataset`):

- tracking: VIDEO is prepared once by :func:`datamodules.prepare.prepare` into
  ``<data_root>/<stem>_driving/`` (:func:`prepare_driver`; every frame is fitted, no split, a
  throw-away PCA of dimension 1: the driver's own basis is never used);
- ``expression``: the driver's pose-normalised landmarks as offsets from the driver's own mean
  shape, projected onto the *subject's* expression basis
  (:func:`datamodules.avatar.driving_expression_codes`, DESIGN.md "Data"), so the driver's
  identity does not leak into the avatar;
- ``world_mat``: the driver's head motion relative to its mean pose, applied to the subject's
  mean training pose (:func:`retarget_head_motion`), so the avatar stays where its GAR was
  trained to see it and moves as the driver moves;
- ``K``: the subject's crop intrinsics (the avatar is rendered in the subject's framing);
- ``image`` / ``mask``: the driver's frame, cropped around its own head (the side-by-side column
  of the output; never an input of the renderer);
- ``frame_index``: the driver's frame number.

A frame where the tracker found no face repeats its nearest tracked frame (ties: the earlier), so
the output has exactly one frame per frame of the driving video;
:attr:`DrivingSequence.tracked` says which frames were tracked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.prepare import DEFAULT_FOV, JSON_NAME
from datamodules.records import driving_expression_codes, read_dataset

__all__ = [
    "DRIVING_SUFFIX",
    "DrivingSequence",
    "driving_dataset_name",
    "prepare_driver",
    "mean_pose",
    "retarget_head_motion",
    "nearest_tracked",
    "driving_sequence",
]

#: Suffix of a driving video's dataset folder under ``data_root`` (``<video stem>_driving``).
DRIVING_SUFFIX = "_driving"


def driving_dataset_name(video: str | Path) -> str:
    """The dataset folder name of a driving video: ``<stem>_driving``."""
    return f"{Path(video).stem}{DRIVING_SUFFIX}"


def prepare_driver(video: str | Path, out: str | Path, *, fov: float = DEFAULT_FOV, progress: bool = True) -> Path:
    """Track a driving video into a dataset folder, once (an existing, complete folder is reused).

    Every frame is tracked by :func:`datamodules.prepare.prepare` (atomic, mediapipe) with no
    held-out split (``test_fraction=0``), so the driver's cameras and canonical face are fitted
    on all its frames; ``min_frames=2`` so clips of a few frames work.

    Args:
        video: the driving video file.
        out: the dataset folder (``<data_root>/<stem>_driving``).
        fov: horizontal field of view (degrees) assumed for the driver's camera.
        progress: show prepare's progress bar.

    Returns:
        ``out`` as a Path.

    Raises:
        FileNotFoundError: if the video does not exist.
        FileExistsError: if ``out`` holds something else (no flame_params.json, or one prepared
            from a video of another name).
        ValueError: from prepare (not a video, fewer than 2 frames with a face, ...).
        ModuleNotFoundError: if mediapipe is missing (only when the folder must be made).
    """
    video, out = Path(video), Path(out)
    if not video.is_file():
        raise FileNotFoundError(f"driving video {video} does not exist")
    if (out / JSON_NAME).is_file():
        prepared_from = read_dataset(out).meta.get("video")
        if prepared_from not in (None, video.name):
            raise FileExistsError(f"{out} was prepared from {prepared_from}, not {video.name}; remove it")
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists but holds no {JSON_NAME}; remove it")
    if out.exists():
        out.rmdir()  # empty: prepare creates the folder atomically
    from datamodules.prepare import prepare

    return prepare(video, out, fov=fov, expression_dim=1, test_fraction=0.0, val_fraction=0.0, min_frames=2,
                   progress=progress)


def mean_pose(world_mats: np.ndarray) -> np.ndarray:
    """The mean of rigid poses: the chordal L2 mean rotation (the rotation nearest, in Frobenius
    norm, to the sum of the rotations) and the mean translation.

    Args:
        world_mats: (F, 3, 4) float world->camera [R | t], F >= 1.

    Returns:
        (3, 4) float64 [R_mean | t_mean], R_mean a proper rotation.

    Raises:
        ValueError: on a wrong shape or no poses.
    """
    wm = np.asarray(world_mats, dtype=np.float64)
    if wm.ndim != 3 or wm.shape[1:] != (3, 4) or len(wm) == 0:
        raise ValueError(f"world_mats must be (F >= 1, 3, 4), got {wm.shape}")
    u, _, vt = np.linalg.svd(wm[:, :, :3].sum(0))
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return np.concatenate([rot, wm[:, :, 3].mean(0)[:, None]], axis=1)


def retarget_head_motion(driver_world_mats: np.ndarray, driver_reference: np.ndarray,
                         subject_reference: np.ndarray) -> np.ndarray:
    """Apply a driver's head motion, relative to its reference pose, to a subject's reference pose.

    With the driver's pose [R_f | t_f], its reference [R_d | t_d] and the subject's [R_s | t_s]
    (world = each video's canonical head space, whose origin is inside the head: DESIGN.md
    "Data"): R = R_s R_d^T R_f (the driver's rotation relative to its reference, in head
    coordinates, so a nod stays a nod about the ear axis), and t = t_s + (t_f - t_d) * (1, 1,
    z_s / z_d): sideways motion in canonical units, i.e. relative to the face size (the same in
    both canonical spaces), and depth motion scaled so the image scale changes by the driver's
    ratio. When both references are equal the driver's poses come back unchanged.

    Args:
        driver_world_mats: (F, 3, 4) float driver world->camera poses.
        driver_reference: (3, 4) the driver's reference pose (e.g. :func:`mean_pose`).
        subject_reference: (3, 4) the subject's reference pose (its mean training pose).

    Returns:
        (F, 3, 4) float64 rigid world->camera poses for the subject.

    Raises:
        ValueError: on wrong shapes or a reference whose depth t_z is not positive.
    """
    wm = np.asarray(driver_world_mats, dtype=np.float64)
    ref_d = np.asarray(driver_reference, dtype=np.float64)
    ref_s = np.asarray(subject_reference, dtype=np.float64)
    if wm.ndim != 3 or wm.shape[1:] != (3, 4):
        raise ValueError(f"driver_world_mats must be (F, 3, 4), got {wm.shape}")
    if ref_d.shape != (3, 4) or ref_s.shape != (3, 4):
        raise ValueError(f"references must be (3, 4), got {ref_d.shape} and {ref_s.shape}")
    if ref_d[2, 3] <= 0 or ref_s[2, 3] <= 0:
        raise ValueError("the reference poses must put the head in front of the camera (t_z > 0)")
    rot = ref_s[:, :3] @ ref_d[:, :3].T @ wm[:, :, :3]  # (F, 3, 3)
    scale = np.array([1.0, 1.0, ref_s[2, 3] / ref_d[2, 3]])
    trans = ref_s[:, 3] + (wm[:, :, 3] - ref_d[:, 3]) * scale  # (F, 3)
    return np.concatenate([rot, trans[:, :, None]], axis=2)


def nearest_tracked(tracked_numbers: np.ndarray, num_frames: int) -> np.ndarray:
    """For every frame 0..num_frames-1, the index of the nearest tracked frame (ties: the earlier).

    Args:
        tracked_numbers: (F,) int, sorted ascending, F >= 1: the frame numbers that were tracked.
        num_frames: frames in the video.

    Returns:
        (num_frames,) int64 indices into ``tracked_numbers``.

    Raises:
        ValueError: if nothing was tracked or the numbers are not sorted.
    """
    numbers = np.asarray(tracked_numbers, dtype=np.int64)
    if numbers.ndim != 1 or len(numbers) == 0:
        raise ValueError("no tracked frame")
    if (np.diff(numbers) <= 0).any():
        raise ValueError("tracked frame numbers must be sorted and unique")
    frames = np.arange(num_frames)
    hi = np.clip(np.searchsorted(numbers, frames), 0, len(numbers) - 1)  # first tracked >= frame
    lo = np.clip(hi - 1, 0, len(numbers) - 1)
    return np.where(np.abs(numbers[hi] - frames) < np.abs(frames - numbers[lo]), hi, lo).astype(np.int64)


@dataclass
class DrivingSequence:
    """One entry per frame of the driving video.

    Attributes:
        expressions: (T, E) float64 codes in the subject's basis.
        world_mats: (T, 3, 4) float64 retargeted world->camera poses for the subject.
        frame_numbers: (T,) int64 the driving video's frame numbers 0..T-1.
        source: (T,) int64 index of the tracked driver frame each entry uses (itself when tracked).
        tracked: (T,) bool whether the tracker found a face in that frame.
        fps: the driving video's frame rate (0.0 when untagged).
    """

    expressions: np.ndarray
    world_mats: np.ndarray
    frame_numbers: np.ndarray
    source: np.ndarray
    tracked: np.ndarray
    fps: float

    def __len__(self) -> int:
        return len(self.frame_numbers)


def driving_sequence(subject_root: str | Path, driver_root: str | Path,
                     subject_world_mats: np.ndarray) -> DrivingSequence:
    """Codes and poses that make the subject follow a prepared driving video (module docstring).

    Args:
        subject_root: the subject's prepared dataset folder (holds its expression basis).
        driver_root: the driver's prepared dataset folder (:func:`prepare_driver`).
        subject_world_mats: (F_s, 3, 4) the subject's training poses (their :func:`mean_pose` is
            the reference the driver's motion is applied to).

    Returns:
        :class:`DrivingSequence` with one entry per frame of the driving video.

    Raises:
        ValueError: if the subject has no expression basis or the driver no landmarks.
    """
    codes, numbers = driving_expression_codes(subject_root, driver_root)  # (F, E), (F,)
    driver = read_dataset(driver_root)
    poses = retarget_head_motion(driver.world_mats, mean_pose(driver.world_mats), mean_pose(subject_world_mats))
    total = int(driver.meta.get("source_frames", int(numbers[-1]) + 1))
    source = nearest_tracked(numbers, total)
    frames = np.arange(total, dtype=np.int64)
    return DrivingSequence(expressions=codes[source], world_mats=poses[source], frame_numbers=frames,
                           source=source, tracked=np.isin(frames, numbers), fps=float(driver.meta.get("fps") or 0.0))
