"""How close a distilled student is to its teacher: per point, and as rendered.

Run from the checkout root after ``make demo`` (or any distillation fit)::

    python -m benchmarks.distill_fidelity [--run RUN] [--split train|val|test]

RUN defaults to ``runs/distill/latest``, else the demo's ``runs/demo/distill/latest``. The run's
``last.ckpt`` holds the student and points at its teacher. The student's BatchNorm statistics are
recalibrated first, as ``load_student`` does. Reported:

- per point, over the canonical cloud:
  - ``albedo_l1``: mean |albedo_s - albedo_t|;
  - ``normal_cos``: mean cosine of the two normals;
  - ``blendshape_rel``: ||B_s - B_t|| / ||B_t|| over all points, expressions and axes;
- per frame of the split, both rasterized as the stage renders them (tracked codes and cameras, on
  white):
  - ``render_psnr``: PSNR of the student's render against the teacher's;
  - ``student_psnr`` and ``teacher_psnr``: each against the frame under its mask.
  PSNRs are the mean over frames of the per-frame PSNR, as the metrics compute it.

A high ``render_psnr`` with a low ``student_psnr`` means the student copies the teacher's errors;
the reverse means the distillation lost something. The last line prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_RUNS = (Path("runs") / "distill" / "latest", Path("runs") / "demo" / "distill" / "latest")


def frame_psnr(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """PSNR (dB, data range 1) of every frame of (B, 3, H, W) images in [0, 1]; inf for equal frames."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    psnr = peak_signal_noise_ratio(pred.clamp(0, 1), target.clamp(0, 1), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))  # (B,)
    return [float(v) for v in psnr]


@torch.no_grad()
def per_point_fidelity(student_canonical, teacher) -> dict[str, float]:
    """Per-point agreement of the student's canonical outputs with the teacher's (module docstring).

    Args:
        student_canonical: :class:`models.student.StudentCanonical` (albedo (N, 3), normals (N, 3),
            blendshapes (N, E, 3)).
        teacher: an object with ``albedo``, ``normals`` and ``blendshapes`` of the same shapes.

    Returns:
        {"albedo_l1", "normal_cos", "blendshape_rel"} floats.
    """
    s, t = student_canonical, teacher
    return {
        "albedo_l1": float((s.albedo - t.albedo).abs().mean()),
        "normal_cos": float(F.cosine_similarity(s.normals, t.normals, dim=-1).mean()),
        "blendshape_rel": float((s.blendshapes - t.blendshapes).norm() / t.blendshapes.norm().clamp_min(1e-12)),
    }


@torch.no_grad()
def evaluate(module, datamodule, split: str) -> dict:
    """Per-point and rendered fidelity of a :class:`lightning_modules.distill.DistillModule` on a split."""
    from lightning_modules.metrics import composite_on_white

    loader = getattr(datamodule, f"{split}_dataloader")()
    dataset = loader.dataset  # every frame of the split, in order (the training loader shuffles)
    batch = loader.collate_fn([dataset[i] for i in range(len(dataset))])
    canonical = module.student.canonical()
    _, s_raster = module.render_student(batch, canonical)
    _, t_raster = module.render_teacher(batch)
    student, teacher = s_raster.image[:, :3], t_raster.image[:, :3]
    target = composite_on_white(batch.image, batch.mask)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {
        "frames": len(batch),
        **per_point_fidelity(canonical, module.teacher_canonical()),
        "render_psnr": mean(frame_psnr(student, teacher)),
        "student_psnr": mean(frame_psnr(student, target)),
        "teacher_psnr": mean(frame_psnr(teacher, target)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None,
                        help=f"distillation run folder (default {DEFAULT_RUNS[0]}, else {DEFAULT_RUNS[1]})")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run = Path(args.run) if args.run else next(
        (r for r in DEFAULT_RUNS if (r / "checkpoints" / "last.ckpt").is_file()), DEFAULT_RUNS[0]
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"error: no distillation run at {run} (needs checkpoints/last.ckpt): run `make demo` or "
                         "`lightning fit --config experiments/distill.yaml` first, or pass --run")
    from lightning_modules.distill import DistillModule
    from lightning_modules.handoff import datamodule_from_config

    module = DistillModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    module.student.recalibrate_batchnorm()
    datamodule = datamodule_from_config(run / "config.yaml")
    datamodule.prepare_data()
    datamodule.setup("fit")
    result = {"run": str(run), "split": args.split, **evaluate(module, datamodule, args.split)}
    print(f"\ndistillation run {run}, {args.split} split ({result['frames']} frames)")
    print(f"  per point : albedo L1 {result['albedo_l1']:.4f}, normal cosine {result['normal_cos']:.4f}, "
          f"blendshape relative error {result['blendshape_rel']:.3f}")
    print(f"  rendered  : student vs teacher PSNR {result['render_psnr']:.2f} dB; against the frames: "
          f"student {result['student_psnr']:.2f}, teacher {result['teacher_psnr']:.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
