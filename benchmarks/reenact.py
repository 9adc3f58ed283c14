"""Reenactment fidelity: does the avatar's mouth follow the driver's?

Run from the checkout root, after ``make demo`` (or any GAR fit on a prepared video)::

    python -m benchmarks.reenact [--run RUN] [--video ../shared/data/videos/akiyo_cif.mp4]
                                 [--upscale 256] [-- extra lightning predict flags]

RUN defaults to ``runs/gar/latest``, else the demo's ``runs/demo/gar/latest``.

1. ``lightning predict --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt
   --data.init_args.driving_video VIDEO`` (a new predict run folder under ``runs/gar/``): the
   subject of the run follows VIDEO (datamodules/driving.py) into ``renders/reenact.mp4``, one
   frame per frame of VIDEO.
2. Every output frame is upscaled (bicubic, to ``--upscale`` pixels on its longer side, so the
   face mesh detector sees a face of a usual size) and re-tracked by our tracker
   (:class:`datamodules.tracking.FaceTracker`, MediaPipe face mesh in video mode).
3. Mouth opening = distance of the inner-lip midpoints (landmarks 13 and 14) over the face height
   (forehead 10 to chin 152), in image coordinates, for the driver (its tracked landmarks,
   ``<data_root>/<stem>_driving``) and for the output.
4. Reported: the Pearson correlation r between the two series over the frames where both the
   driver was tracked and a face was found in the output (target r >= 0.5), and the share of
   output frames where a face was found. As a ceiling of the measurement itself, the same is
   done on the driver's own frames at the output's size (the left column of
   ``renders/reenact_side_by_side.mp4``, cropped around the driver's head): ``reference_r``.

With ``--chain`` it also scores the rule-based renders along the way, driven by the same codes and
cameras at the same size: the teacher's and the student's rasterized colours (their distillation
checkpoint is the GAR run's ``student_ckpt``), so a low r can be traced to the stage that loses
the mouth (``chain_teacher_r``, ``chain_student_r``).

The last line prints the results as JSON; they are also written to
``<predict run>/reenact_benchmark.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

DEFAULT_VIDEO = Path("..") / "shared" / "data" / "videos" / "akiyo_cif.mp4"
DEFAULT_RUNS = (Path("runs") / "gar" / "latest", Path("runs") / "demo" / "gar" / "latest")
TARGET_R = 0.5
#: MediaPipe face-mesh landmarks: inner lip, upper and lower midpoints; forehead and chin on the midline.
UPPER_INNER_LIP, LOWER_INNER_LIP = 13, 14


def mouth_opening(landmarks: np.ndarray) -> float:
    """Inner-lip distance over face height of one frame.

    Args:
        landmarks: (478, 3) or (468, 3) (u, v, d) pixel landmarks (only u, v are used).

    Returns:
        |uv[13] - uv[14]| / |uv[10] - uv[152]|, dimensionless (about 0 closed, ~0.1-0.2 open).
    """
    from datamodules.tracking import CHIN, FOREHEAD

    uv = np.asarray(landmarks, dtype=np.float64)[:, :2]
    return float(np.linalg.norm(uv[UPPER_INNER_LIP] - uv[LOWER_INNER_LIP]) / np.linalg.norm(uv[FOREHEAD] - uv[CHIN]))


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two equal-length series; None with fewer than 3 pairs or a constant series."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def track_openings(frames: np.ndarray, upscale: int) -> list[float | None]:
    """Mouth opening of every frame (None where no face is found).

    Args:
        frames: (T, H, W, 3) uint8 RGB.
        upscale: longer side (pixels) the frames are resized to before tracking (bicubic).
    """
    from PIL import Image

    from datamodules.tracking import FaceTracker

    out: list[float | None] = []
    with FaceTracker() as tracker:
        for frame in frames:
            h, w = frame.shape[:2]
            scale = upscale / max(h, w)
            if scale != 1.0:
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                frame = np.asarray(Image.fromarray(frame).resize(size, Image.BICUBIC))
            track = tracker(np.ascontiguousarray(frame))
            out.append(None if track is None else mouth_opening(track.landmarks))
    return out


def score(driver: list[float | None], output: list[float | None]) -> dict:
    """r and coverage of two per-frame mouth-opening series (None = not tracked).

    Raises:
        ValueError: if the series differ in length.
    """
    if len(driver) != len(output):
        raise ValueError(f"{len(driver)} driver frames but {len(output)} output frames")
    pairs = [(d, o) for d, o in zip(driver, output) if d is not None and o is not None]
    r = pearson(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])) if pairs else None
    found = sum(o is not None for o in output)
    return {
        "frames": len(output),
        "output_face_found_share": found / len(output) if output else 0.0,
        "driver_tracked_share": sum(d is not None for d in driver) / len(driver) if driver else 0.0,
        "pairs": len(pairs),
        "pearson_r": r,
        "target_r": TARGET_R,
        "passes": r is not None and r >= TARGET_R,
        "driver_opening_mean": float(np.mean([p[0] for p in pairs])) if pairs else None,
        "output_opening_mean": float(np.mean([p[1] for p in pairs])) if pairs else None,
    }


def chain_renders(distill_ckpt: str | Path, batches) -> dict[str, np.ndarray]:
    """The teacher's and the student's rasterized renders of driving batches (no GAR).

    Args:
        distill_ckpt: the distillation checkpoint (teacher and student).
        batches: iterable of :class:`datamodules.batch.AvatarBatch` (the predict loader's).

    Returns:
        {"teacher": (T, H, W, 3) uint8, "student": (T, H, W, 3) uint8} on white, at the batches' size.
    """
    import torch

    from lightning_modules.distill import DistillModule

    module = DistillModule.load_from_checkpoint(str(distill_ckpt), map_location="cpu").eval()
    module.student.recalibrate_batchnorm()  # as load_student does for the GAR stage
    frames: dict[str, list] = {"teacher": [], "student": []}
    with torch.no_grad():
        canonical = module.student.canonical()
        for batch in batches:
            module.rasterizer.image_size = tuple(batch.image.shape[-2:])
            frames["teacher"].append(module.render_teacher(batch)[1].image[:, :3])
            frames["student"].append(module.render_student(batch, canonical)[1].image[:, :3])
    return {name: (torch.cat(images).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            for name, images in frames.items()}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help=f"the GAR run folder (default {DEFAULT_RUNS[0]}, "
                        f"else {DEFAULT_RUNS[1]})")
    parser.add_argument("--video", default=str(DEFAULT_VIDEO), help="the driving video")
    parser.add_argument("--upscale", type=int, default=256, help="longer side of the frames re-tracked (pixels)")
    parser.add_argument("--chain", action="store_true",
                        help="also score the teacher's and the student's rasterized renders of the same codes")
    args = parser.parse_args(argv)
    if args.run is None:
        run = next((r for r in DEFAULT_RUNS if (r / "checkpoints" / "last.ckpt").is_file()), DEFAULT_RUNS[0])
    else:
        run = Path(args.run)
    video = Path(args.video)
    config, ckpt = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    if not config.is_file() or not ckpt.is_file():
        raise SystemExit(f"error: no GAR run at {run} (needs config.yaml and checkpoints/last.ckpt): run `make demo` "
                         "or `lightning fit --config experiments/gar.yaml` first, or pass --run")
    if not video.is_file():
        raise SystemExit(f"error: driving video {video} does not exist; pass --video")
    if args.upscale < 32:
        raise SystemExit(f"error: --upscale must be >= 32 pixels, got {args.upscale}")

    import imageio.v3 as iio

    from datamodules.avatar import read_dataset
    from lightning_modules.cli import run_cli

    cli = run_cli(["predict", "--config", str(config), "--ckpt_path", str(ckpt),
                   "--data.init_args.driving_video", str(video), *extra])
    dm = cli.datamodule
    seq = dm.driving
    driver = read_dataset(dm.driving_dir)
    lm_of = {int(n): lm for n, lm in zip(driver.frame_numbers, driver.landmarks)}
    driver_open = [mouth_opening(lm_of[int(n)]) if tracked else None
                   for n, tracked in zip(seq.frame_numbers, seq.tracked)]
    reenact = cli.run_dir / "renders" / "reenact.mp4"
    frames = iio.imread(reenact)  # (T, H, W, 3) uint8
    output_open = track_openings(frames, args.upscale)
    side = iio.imread(cli.run_dir / "renders" / "reenact_side_by_side.mp4")  # (T, H, 2W, 3): output | driver
    reference = score(driver_open, track_openings(side[:, :, frames.shape[2] :], args.upscale))
    result = {"run": str(run), "predict_run": str(cli.run_dir), "video": str(video), "reenact": str(reenact),
              "upscale": args.upscale, **score(driver_open, output_open),
              "reference_r": reference["pearson_r"], "reference_face_found_share": reference["output_face_found_share"]}
    if args.chain:
        from lightning_modules.run_folder import upstream_checkpoint

        distill_ckpt = upstream_checkpoint(cli.model.hparams.student_ckpt, "distill", "student_ckpt")
        for name, rendered in chain_renders(distill_ckpt, dm.predict_dataloader()).items():
            result[f"chain_{name}_r"] = score(driver_open, track_openings(rendered, args.upscale))["pearson_r"]
    (cli.run_dir / "reenact_benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result["pearson_r"]
    print(f"\nreenactment of {run} by {video.name}: {result['frames']} frames -> {reenact}")
    print(f"  face found in output frames : {100 * result['output_face_found_share']:.1f} %")
    print(f"  driver frames tracked       : {100 * result['driver_tracked_share']:.1f} %")
    print(f"  mouth opening Pearson r     : {'n/a' if r is None else f'{r:.3f}'} over {result['pairs']} frames "
          f"(target >= {TARGET_R}: {'met' if result['passes'] else 'NOT met'})")
    ref = result["reference_r"]
    print(f"  reference (driver's own crops at the output size): r = {'n/a' if ref is None else f'{ref:.3f}'}, "
          f"face found in {100 * result['reference_face_found_share']:.1f} %")
    for name in ("teacher", "student"):
        if f"chain_{name}_r" in result:
            value = result[f"chain_{name}_r"]
            print(f"  {name}'s rasterized render, same codes: r = {'n/a' if value is None else f'{value:.3f}'}")
    print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
