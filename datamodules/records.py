"""Prepared avatar datasets on disk: reading them, cropping their frames, holding them in memory.

Two dataset flavours are read (:func:`read_dataset`):

- ours (``"camera_convention": "opencv"`` in ``flame_params.json``, written by
  :mod:`datamodules.prepare`): world_mat 3x4 world->camera, OpenCV; intrinsics normalised by
  width and height;
- an IMavatar / PointAvatar subject folder (no ``camera_convention``): converted on load by
  :func:`imavatar_camera_to_opencv`, which reproduces PointAvatar's PyTorch3D pipeline exactly
  (a world point lands on the pixel PointAvatar renders it at). FLAME's global rotation
  (``pose[:3]``) is folded into world_mat as a rotation about ``global_pose_pivot`` (the
  origin by default: FLAME's root joint is not in the JSON, so this is an approximation for
  heads that turn); the expression code is ``expression`` (50) followed by ``pose[3:]`` (neck,
  jaw, eyes: 12), E = 62. Masks are grey levels / 255, thresholded at 0.5.

Reenactment: :func:`driving_expression_codes` codes another prepared video's frames with an
avatar's expression basis, as offsets from that video's own mean shape.

Crop / resize convention: the integer box [x0, x0 + side) x [y0, y0 + side) of the full frame
(zero padding outside the frame) is resized by antialiased bilinear interpolation with
``align_corners=False``, which maps continuous pixel coordinates (pixel centres at +0.5) by
u' = (u - x0) * S / side; the batch's ``K`` is the full-frame K under that map
(:func:`crop_intrinsics`).

The datamodule (:mod:`datamodules.avatar`) and the driving videos (:mod:`datamodules.driving`) both
build on this module; it imports neither.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.prepare import JSON_NAME

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
]


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass
class AvatarRecord:
    """A dataset folder, read (images not loaded).

    Attributes:
        root: the folder.
        convention: "opencv" (ours) or "imavatar" (converted on load).
        frame_numbers: (F,) int64, sorted ascending.
        image_paths: F image files.
        mask_paths: F mask files.
        width: frame width W (pixels).
        height: frame height H (pixels).
        world_mats: (F, 3, 4) float64 world->camera, OpenCV.
        K: (3, 3) float64 pixel intrinsics of the full frame (pixel centres at +0.5).
        expressions: (F, E) float64.
        landmarks: (F, 478, 3) float64 (u, v, d) or None.
        basis: the expression basis dict (``ExpressionBasis.to_json``) or None.
        pca_fit_frames: frame numbers the expression PCA was fitted on (empty for IMavatar).
        head_box: [x0, y0, x1, y1) union of head boxes in pixels, or None (computed from masks).
        meta: the JSON's ``meta`` (plus what the IMavatar conversion records).
    """

    root: Path
    convention: str
    frame_numbers: np.ndarray
    image_paths: list[Path]
    mask_paths: list[Path]
    width: int
    height: int
    world_mats: np.ndarray
    K: np.ndarray
    expressions: np.ndarray
    landmarks: np.ndarray | None = None
    basis: dict | None = None
    pca_fit_frames: list[int] = field(default_factory=list)
    head_box: list[int] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def expression_dim(self) -> int:
        """E."""
        return int(self.expressions.shape[1])


def axis_angle_to_matrix(rotvec: np.ndarray) -> np.ndarray:
    """Rodrigues' formula: (3,) axis * angle (radians) -> (3, 3) float64 rotation."""
    v = np.asarray(rotvec, dtype=np.float64)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle) * kx + (1.0 - math.cos(angle)) * (kx @ kx)


def imavatar_camera_to_opencv(world_mat: np.ndarray, intrinsics, width: int, height: int
                              ) -> tuple[np.ndarray, np.ndarray]:
    """An IMavatar/PointAvatar camera as an OpenCV (world_mat, K) that renders every point at the
    same pixel as PointAvatar's pipeline.

    PointAvatar (datasets/real_dataset.py + its PyTorch3D ``PerspectiveCameras(R, T, K)``):
    NDC intrinsics (2 fx, 2 fy, principal point -(2 c - 1)); if fx < 0, the first column of K and
    the first row of world_mat are negated; then the rotation's third column and the z
    translation are negated; PyTorch3D maps X_view = X R + T (row vectors), x_ndc = K00 X/Z + K02,
    and the pixel centre of column i of an S-wide image is at x_ndc = 1 - (2 i + 1) / S (NDC +x
    left, +y up). Hence u = S cx - S fx' X/Z (pixel centres at +0.5), i.e. OpenCV camera
    x = -X_view, and y = -Y_view (flipped once more where fy < 0, as K must keep fy > 0).

    Intrinsics normalised by the width and the height respectively (PointAvatar's data is
    square, where both readings agree).

    Args:
        world_mat: (4, 4) or (3, 4) IMavatar world->camera matrix.
        intrinsics: [fx, fy, cx, cy] normalised by the image size.
        width: image width in pixels.
        height: image height in pixels.

    Returns:
        world_mat: (3, 4) float64 OpenCV world->camera (may be a reflection, det -1, when the
            source camera is; projections are exact either way).
        K: (3, 3) float64 pixel intrinsics, fx, fy > 0.

    Raises:
        ValueError: on a malformed matrix or intrinsics, or a zero focal length.
    """
    m = np.asarray(world_mat, dtype=np.float64)
    if m.shape == (3, 4):
        m = np.concatenate([m, [[0.0, 0.0, 0.0, 1.0]]])
    if m.shape != (4, 4):
        raise ValueError(f"world_mat must be 3x4 or 4x4, got {m.shape}")
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    if fx == 0 or fy == 0:
        raise ValueError(f"intrinsics must have non-zero focal lengths, got {list(intrinsics)}")
    m = m.copy()
    # PointAvatar's conversion to PyTorch3D
    if fx < 0:
        fx = -fx
        m[0, :] *= -1
    m[:3, 2] *= -1
    m[2, 3] *= -1
    rot_p3d, t_p3d = m[:3, :3], m[:3, 3]
    view = np.concatenate([rot_p3d.T, t_p3d[:, None]], axis=1)  # (3, 4) column form of X R + T
    flip = np.diag([-1.0, -1.0 if fy > 0 else 1.0, 1.0])  # PyTorch3D view (x left, y up) -> OpenCV
    K = np.array([[fx * width, 0.0, cx * width], [0.0, abs(fy) * height, cy * height], [0.0, 0.0, 1.0]])
    return flip @ view, K


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size  # (W, H)


def _frame_number(file_path: str) -> int:
    try:
        return int(Path(file_path).name)
    except ValueError as err:
        raise ValueError(f"file_path {file_path!r}: its last part must be an integer frame number") from err


def _read_json(path: Path) -> dict:
    """The parsed JSON, cached by (path, modification time, size): the expression_dim property
    and setup() both need it, and a prepared file with landmarks is a few MB."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if _JSON_CACHE.get("key") != key:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from err
        _JSON_CACHE.clear()
        _JSON_CACHE.update(key=key, data=data)
    return _JSON_CACHE["data"]


_JSON_CACHE: dict = {}


def read_dataset(root: str | Path, json_name: str = JSON_NAME,
                 global_pose_pivot: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> AvatarRecord:
    """Read a dataset folder (ours or IMavatar/PointAvatar), cameras converted to OpenCV.

    Args:
        root: folder holding ``image/``, ``mask/`` and ``json_name``.
        json_name: the JSON file name.
        global_pose_pivot: IMavatar only: the point (world units) FLAME's global rotation is
            applied about when folded into world_mat.

    Returns:
        :class:`AvatarRecord`, frames sorted by frame number.

    Raises:
        FileNotFoundError: if the folder, its JSON or a listed image/mask is missing.
        ValueError: on a malformed JSON (no frames, an unknown camera convention, mixed
            expression sizes, bad matrices).
    """
    root = Path(root)
    path = root / json_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; prepare the dataset first (python -m datamodules.prepare)")
    data = _read_json(path)
    frames = data.get("frames") or []
    if not frames:
        raise ValueError(f"{path} lists no frames")
    convention = data.get("camera_convention")
    if convention not in (None, "opencv"):
        raise ValueError(f"{path}: unknown camera_convention {convention!r} (expected 'opencv' or none for IMavatar)")
    frames = sorted(frames, key=lambda fr: _frame_number(fr["file_path"]))
    numbers = np.array([_frame_number(fr["file_path"]) for fr in frames], dtype=np.int64)
    if len(np.unique(numbers)) != len(numbers):
        raise ValueError(f"{path}: frame numbers are not unique")
    image_paths = [root / f"{fr['file_path']}.png" for fr in frames]
    # the mask path replaces the folder "image" by "mask" in the relative file path (PointAvatar's rule)
    mask_paths = [root / f"{Path(*['mask' if p == 'image' else p for p in Path(fr['file_path']).parts])}.png"
                  for fr in frames]
    for p in (image_paths[0], mask_paths[0]):
        if not p.is_file():
            raise FileNotFoundError(f"{p} (listed in {path}) does not exist")
    meta = dict(data.get("meta") or {})
    if "image_size" in meta:
        height, width = (int(v) for v in meta["image_size"])
    else:
        width, height = _image_size(image_paths[0])
    intrinsics = data.get("intrinsics")
    if intrinsics is None or len(intrinsics) != 4:
        raise ValueError(f"{path}: 'intrinsics' must be [fx, fy, cx, cy] (normalised)")
    expressions = [np.asarray(fr.get("expression", []), dtype=np.float64).ravel() for fr in frames]
    if convention == "opencv":
        fx, fy, cx, cy = (float(v) for v in intrinsics)
        K = np.array([[fx * width, 0.0, cx * width], [0.0, fy * height, cy * height], [0.0, 0.0, 1.0]])
        world_mats = np.stack([np.asarray(fr["world_mat"], dtype=np.float64) for fr in frames])
        if world_mats.shape[1:] not in ((3, 4), (4, 4)):
            raise ValueError(f"{path}: world_mat must be 3x4 or 4x4, got {world_mats.shape[1:]}")
        world_mats = world_mats[:, :3, :4]
        basis = data.get("expression_basis")
        fit_frames = [int(f) for f in meta.get("pca_fit_frames", (basis or {}).get("fit_frames", []))]
        head_box = (meta.get("crop") or {}).get("head_box")
        landmarks = None
        if all("landmarks" in fr for fr in frames):
            landmarks = np.asarray([fr["landmarks"] for fr in frames], dtype=np.float64)
    else:
        convention = "imavatar"
        pivot = np.asarray(global_pose_pivot, dtype=np.float64)
        world_mats, K = [], None
        for fr in frames:
            wm, K = imavatar_camera_to_opencv(fr["world_mat"], intrinsics, width, height)
            pose = np.asarray(fr.get("pose", np.zeros(15)), dtype=np.float64).ravel()
            rot_g = axis_angle_to_matrix(pose[:3]) if len(pose) >= 3 else np.eye(3)
            glob = np.concatenate([rot_g, (pivot - rot_g @ pivot)[:, None]], axis=1)  # (3, 4) about the pivot
            world_mats.append(np.concatenate([wm[:, :3] @ glob[:, :3], (wm[:, :3] @ glob[:, 3] + wm[:, 3])[:, None]], 1))
        world_mats = np.stack(world_mats)
        expressions = [np.concatenate([expr, np.asarray(fr.get("pose", []), dtype=np.float64).ravel()[3:]])
                       for fr, expr in zip(frames, expressions)]
        basis, fit_frames, head_box, landmarks = None, [], None, None
        meta.update({"imavatar": {"expression": "expression (50) + pose[3:] (neck, jaw, eyes)",
                                  "global_pose": "pose[:3] folded into world_mat about global_pose_pivot",
                                  "global_pose_pivot": pivot.tolist()}})
    sizes = {len(e) for e in expressions}
    if len(sizes) != 1:
        raise ValueError(f"{path}: frames have expression codes of different lengths {sorted(sizes)}")
    return AvatarRecord(root=root, convention=convention, frame_numbers=numbers, image_paths=image_paths,
                        mask_paths=mask_paths, width=width, height=height, world_mats=world_mats, K=K,
                        expressions=np.stack(expressions), landmarks=landmarks, basis=basis,
                        pca_fit_frames=fit_frames, head_box=head_box, meta=meta)


def driving_expression_codes(avatar_root: str | Path, driving_root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Expression codes that make an avatar follow another prepared video (reenactment).

    The driving video's landmarks get their own canonical face and cameras
    (:func:`datamodules.tracking.fit_head_poses` over all its frames) and are coded with the
    avatar's basis as offsets from the driving video's own mean shape
    (:func:`datamodules.tracking.expression_codes_for_video`), so the driver's identity does not
    leak into the avatar. Needs no mediapipe (the landmark index sets are in the datasets' meta).

    Args:
        avatar_root: the avatar's prepared dataset folder (ours: it holds the expression basis).
        driving_root: the driving video's prepared dataset folder (with landmarks).

    Returns:
        codes: (F, E) float64 for the driving frames, in frame order.
        frame_numbers: (F,) int64 the driving frames' numbers.

    Raises:
        ValueError: if the avatar has no expression basis or the driver has no landmarks.
    """
    from datamodules import tracking

    avatar = read_dataset(avatar_root)
    driver = read_dataset(driving_root)
    if avatar.basis is None:
        raise ValueError(f"{avatar_root} has no expression_basis (prepare it with datamodules.prepare)")
    if driver.landmarks is None or "landmark_sets" not in driver.meta:
        raise ValueError(f"{driving_root} has no landmarks (prepare it with datamodules.prepare)")
    basis = tracking.ExpressionBasis.from_json(avatar.basis)
    poses = tracking.fit_head_poses(driver.landmarks, driver.K, sets=driver.meta["landmark_sets"])
    return tracking.expression_codes_for_video(basis, poses.normalised), driver.frame_numbers


# ----------------------------------------------------------------------------------------------
# Crop and resize
# ----------------------------------------------------------------------------------------------


def square_crop_box(head_box, width: int, height: int, margin: float = 0.1) -> tuple[int, int, int]:
    """One square crop box around a head box.

    Args:
        head_box: [x0, y0, x1, y1) pixels (None: the whole frame).
        width: frame width.
        height: frame height.
        margin: the side is max(box width, box height) * (1 + margin), rounded up.

    Returns:
        (x0, y0, side) integers: centred on the head box, then slid inside the frame along each
        axis where the side fits; otherwise it extends past the frame (zero padding).
    """
    if head_box is None:
        head_box = [0, 0, width, height]
    x0, y0, x1, y1 = (float(v) for v in head_box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"head box {head_box} is empty")
    side = int(math.ceil(max(x1 - x0, y1 - y0) * (1.0 + margin)))
    left = int(math.floor((x0 + x1) / 2.0 - side / 2.0 + 0.5))
    top = int(math.floor((y0 + y1) / 2.0 - side / 2.0 + 0.5))
    # slide the box inside the frame where it fits (it still holds the head box, which is inside)
    if side <= width:
        left = min(max(left, 0), width - side)
    if side <= height:
        top = min(max(top, 0), height - side)
    return left, top, side


def crop_and_resize(image: torch.Tensor, box: tuple[int, int, int], size: int) -> torch.Tensor:
    """Crop a square box (zero padding outside the frame) and resize it to size x size.

    Args:
        image: (C, H, W) or (B, C, H, W) float tensor.
        box: (x0, y0, side) from :func:`square_crop_box`.
        size: output side S.

    Returns:
        (C, S, S) or (B, C, S, S) float tensor (antialiased bilinear, align_corners=False).
    """
    x0, y0, side = box
    batched = image.dim() == 4
    if not batched:
        image = image[None]  # (1, C, H, W)
    height, width = image.shape[-2:]
    # the part of the box inside the frame, copied into a zero canvas (no padding of the whole frame)
    crop = image.new_zeros(image.shape[0], image.shape[1], side, side)  # (B, C, side, side)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(width, x0 + side), min(height, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        crop[:, :, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[:, :, sy0:sy1, sx0:sx1]
    if side != size:
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return crop if batched else crop[0]


def crop_intrinsics(K: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """Pixel intrinsics after :func:`crop_and_resize`: u' = (u - x0) * S / side.

    Args:
        K: (3, 3) full-frame pixel intrinsics.
        box: (x0, y0, side).
        size: S.

    Returns:
        (3, 3) float64.
    """
    x0, y0, side = box
    scale = size / side
    out = np.asarray(K, dtype=np.float64).copy()
    out[0, 0] *= scale
    out[1, 1] *= scale
    out[0, 2] = (out[0, 2] - x0) * scale
    out[1, 2] = (out[1, 2] - y0) * scale
    return out


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _load_mask(path: Path) -> np.ndarray:
    """(H, W) bool: grey level / 255 >= 0.5 (PointAvatar reads masks as grey levels / 255)."""
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"mask {path} does not exist")
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) >= 128


# ----------------------------------------------------------------------------------------------
# Frames in memory
# ----------------------------------------------------------------------------------------------


class AvatarFrameDataset(Dataset):
    """Frames held in memory; one item = one frame as a dict of :class:`AvatarBatch` fields.

    Args:
        images: (F, 3, S, S) uint8.
        masks: (F, 1, S, S) uint8 in {0, 1}.
        world_mats: (F, 3, 4) float32.
        K: (3, 3) float32, shared by all frames.
        expressions: (F, E) float32.
        frame_numbers: (F,) int64.
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, world_mats: torch.Tensor, K: torch.Tensor,
                 expressions: torch.Tensor, frame_numbers: torch.Tensor) -> None:
        self.images, self.masks, self.world_mats = images, masks, world_mats
        self.K, self.expressions, self.frame_numbers = K, expressions, frame_numbers

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.images[i].float() / 255.0,
            "mask": self.masks[i].float(),
            "world_mat": self.world_mats[i],
            "K": self.K,
            "expression": self.expressions[i],
            "frame_index": self.frame_numbers[i],
        }
