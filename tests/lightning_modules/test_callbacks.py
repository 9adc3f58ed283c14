"""Render grids and videos: even-size padding, MP4 vs GIF, grid layout, RenderLogger in a real fit."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from lightning_modules import callbacks
from lightning_modules.callbacks import pad_to_even, to_uint8_grid, write_video


def smooth_frames(n: int, h: int, w: int) -> list[np.ndarray]:
    """Frames of large flat colour blocks (compress with little error, quantise exactly to GIF)."""
    frames = []
    for i in range(n):
        f = np.zeros((h, w, 3), np.uint8)
        f[: h // 2] = (255, 0, 0)
        f[h // 2 :] = (0, 0, 255)
        f[:, : (i + 1) * w // (n + 1)] = (255, 255, 255)
        frames.append(f)
    return frames


def test_pad_to_even_replicates_the_last_row_and_column():
    frame = np.arange(253 * 255 * 3, dtype=np.int64).reshape(253, 255, 3).astype(np.uint8)
    out = pad_to_even(frame)
    assert out.shape == (254, 256, 3)
    np.testing.assert_array_equal(out[:253, :255], frame)
    np.testing.assert_array_equal(out[253, :255], frame[252])
    np.testing.assert_array_equal(out[:253, 255], frame[:, 254])
    assert pad_to_even(np.zeros((4, 6, 3), np.uint8)).shape == (4, 6, 3)


def test_mp4_of_odd_sized_frames(tmp_path):
    frames = smooth_frames(6, 253, 255)
    path = write_video(frames, tmp_path / "test.mp4", fps=5)
    assert path == tmp_path / "test.mp4"
    video = iio.imread(path)
    assert video.shape == (6, 254, 256, 3)
    err = np.abs(video[:, :253, :255].astype(float) - np.stack(frames).astype(float)).mean()
    assert err < 6.0  # H.264 is lossy; flat blocks come back within a few grey levels


def test_gif_when_no_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(callbacks, "ffmpeg_available", lambda: False)
    frames = smooth_frames(4, 253, 255)
    path = write_video(frames, tmp_path / "test.mp4")
    assert path == tmp_path / "test.gif" and not (tmp_path / "test.mp4").exists()
    gif = iio.imread(path, index=None)
    assert gif.shape[:3] == (4, 253, 255)
    np.testing.assert_array_equal(gif[..., :3], np.stack(frames))


def test_write_video_rejects_empty_and_mixed_sizes(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="one size"):
        write_video([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)], tmp_path / "x.mp4")


def test_grid_layout_rows_are_frames_columns_are_outputs():
    a = torch.zeros(2, 3, 4, 5)
    b = torch.ones(2, 3, 4, 5)
    a[1] = 0.5
    grid = to_uint8_grid([a, b])
    assert grid.shape == (8, 10, 3)
    assert grid[0, 0, 0] == 0 and grid[0, 5, 0] == 255  # frame 0: a | b
    assert grid[4, 0, 0] == 128 and grid[4, 9, 0] == 255  # frame 1: a (0.5) | b
    assert to_uint8_grid([a, b], max_rows=1).shape == (4, 10, 3)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_uint8_grid([a, torch.zeros(2, 1, 4, 5)])
