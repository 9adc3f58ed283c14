"""Callbacks shared by the stages: render grids and videos (DESIGN.md, "Callbacks"); the
:class:`~lightning_modules.flops.FlopCounter` is re-exported here.

A stage module that wants pictures implements ``visualize(batch) -> dict[str, Tensor]``: ordered
columns, each (B, 3, H, W) in [0, 1] (e.g. ground truth | render | normals | mask). The
:class:`RenderLogger` writes, into the run's ``renders/``:

- each validation epoch, a PNG grid of the first validation batch (one row per frame);
- at test end, a video of every test frame (columns side by side): MP4 through imageio-ffmpeg,
  frame sizes padded to even numbers (H.264 needs them); a GIF when no ffmpeg is found;
- at predict end, when ``predict_step`` returns a dict of columns (B, 3, H, W) in [0, 1] (the GAR's
  reenactment), the first column alone as ``<its key>.mp4`` and all side by side as
  ``<its key>_side_by_side.mp4``, at the datamodule's ``predict_fps`` when it has one.
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.flops import FlopCounter  # DESIGN.md lists it here; it lives beside its handles
from lightning_modules.run_folder import get_run_folder

__all__ = ["FlopCounter", "RenderLogger", "ffmpeg_available", "pad_to_even", "to_uint8_grid", "write_video"]


def ffmpeg_available() -> bool:
    """Whether imageio-ffmpeg finds an ffmpeg executable (its bundled one or IMAGEIO_FFMPEG_EXE)."""
    try:
        import imageio_ffmpeg

        return os.path.isfile(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception:
        return False


def pad_to_even(frame: np.ndarray) -> np.ndarray:
    """Pad an (H, W, 3) frame by replicating its last row/column so H and W are even."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def to_uint8_grid(columns: list[torch.Tensor], max_rows: int | None = None) -> np.ndarray:
    """Tile columns of (B, 3, H, W) images in [0, 1] into one (rows*H, cols*W, 3) uint8 image.

    Raises:
        ValueError: when the columns' shapes differ or a column is not (B, 3, H, W).
    """
    shapes = {tuple(c.shape) for c in columns}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[1] != 3:
        raise ValueError(f"visualize() columns must all be (B, 3, H, W), got {sorted(shapes)}")
    stack = torch.stack([c.detach().float().clamp(0, 1).cpu() for c in columns], 1)  # (B, cols, 3, H, W)
    if max_rows is not None:
        stack = stack[:max_rows]
    b, cols, _, h, w = stack.shape
    grid = stack.permute(0, 3, 1, 4, 2).reshape(b * h, cols * w, 3)  # (B*H, cols*W, 3)
    return (grid.numpy() * 255 + 0.5).astype(np.uint8)


def write_video(frames: list[np.ndarray], path: str | os.PathLike, fps: int = 10) -> Path:
    """Write (H, W, 3) uint8 frames as an MP4 (sizes padded to even), or a GIF without ffmpeg.

    Returns:
        the path written: ``path`` itself, or the same name with ``.gif`` when ffmpeg is missing.

    Raises:
        ValueError: no frames, or frames of different sizes.
    """
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"all frames of {path} must have one size, got {sorted({f.shape for f in frames})}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ffmpeg_available():
        video = np.stack([pad_to_even(f) for f in frames])
        _write_mp4(path, video, fps)
        return path
    gif = path.with_suffix(".gif")
    iio.imwrite(gif, np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)
    return gif


def _write_mp4(path: Path, video: np.ndarray, fps: int) -> None:
    import imageio.v2 as iio2

    with iio2.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
        for frame in video:
            writer.append_data(frame)


class RenderLogger(pl.Callback):
    """PNG grids each validation epoch and a test video, from the module's ``visualize(batch)``.

    Args:
        max_rows: frames per grid.
        fps: frames per second of the test video.
    """

    def __init__(self, max_rows: int = 4, fps: int = 10) -> None:
        self.max_rows = max_rows
        self.fps = fps
        self._test_frames: list[np.ndarray] = []
        self._predict_columns: dict[str, list[np.ndarray]] = {}

    def _columns(self, pl_module: pl.LightningModule, batch) -> list[torch.Tensor] | None:
        visualize = getattr(pl_module, "visualize", None)
        if not callable(visualize):
            return None
        # the precision of the steps (bf16-mixed: autocast), since visualize may reuse their tensors
        with torch.no_grad(), pl_module.trainer.precision_plugin.forward_context():
            return list(visualize(batch).values())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        columns = self._columns(pl_module, batch)
        if columns is None:
            return
        grid = to_uint8_grid(columns, self.max_rows)
        path = get_run_folder(trainer).renders_dir / f"val_epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, grid)
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if callable(log_image):
                try:
                    log_image(key="val/renders", images=[grid], step=trainer.global_step)
                except Exception as err:  # a logger problem never stops training
                    rank_zero_warn(f"could not log the render grid to {type(logger).__name__}: {err}")

    def on_test_start(self, trainer, pl_module) -> None:
        self._test_frames = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        columns = self._columns(pl_module, batch)
        if columns is None:
            return
        grid = to_uint8_grid(columns)  # (B*H, cols*W, 3)
        h = columns[0].shape[-2]
        self._test_frames.extend(grid[i * h : (i + 1) * h] for i in range(columns[0].shape[0]))

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self._test_frames:
            write_video(self._test_frames, get_run_folder(trainer).renders_dir / "test.mp4", fps=self.fps)
        self._test_frames = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self._predict_columns = {}
        if trainer.world_size > 1:
            rank_zero_warn("predict on several processes: the predict video holds rank 0's frames only")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or not outputs:
            return
        for key, images in outputs.items():
            grid = to_uint8_grid([images])  # (B*H, W, 3)
            h = images.shape[-2]
            self._predict_columns.setdefault(key, []).extend(grid[i * h : (i + 1) * h] for i in range(images.shape[0]))

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self._predict_columns:
            fps = getattr(getattr(trainer, "datamodule", None), "predict_fps", None) or self.fps
            renders = get_run_folder(trainer).renders_dir
            (name, first), *others = self._predict_columns.items()
            write_video(first, renders / f"{name}.mp4", fps=fps)
            if others:
                side = [np.concatenate(row, axis=1) for row in zip(first, *(col for _, col in others))]
                write_video(side, renders / f"{name}_side_by_side.mp4", fps=fps)
        self._predict_columns = {}
