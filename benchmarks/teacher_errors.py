"""Where a teacher run's held-out error comes from: silhouette or interior, frame by frame.

Run from the checkout root after ``make demo`` (or any teacher fit)::

    python -m benchmarks.teacher_errors [--run RUN] [--split test|train|val]

RUN defaults to ``runs/teacher/latest``, else the demo's ``runs/demo/teacher/latest``. The run's
``last.ckpt`` renders every frame of the split as the test step does (cached canonical outputs,
render on white) and is scored against the frame under its head mask on white, the metric's
protocol. Reported, for the teacher and for the two baselines of the report
(:class:`lightning_modules.metrics.Baselines`: ``baseline_mean``, the mean training frame on white
with the mean training mask; ``baseline_nearest``, the training frame nearest in expression and
pose, with its own mask):

- PSNR as the metrics compute it (mean over frames of the per-frame PSNR);
- ``psnr_gt_mask``: the same with the render composited on white under the ground-truth mask,
  i.e. what the teacher would score with a perfect silhouette;
- the mean squared error split into three regions that add up to the whole: ``outside`` (more
  than one pixel outside the mask), ``band`` (within one pixel of the mask's edge, 3x3 dilation
  minus 3x3 erosion) and ``interior``, each a sum over its pixels divided by all pixels;
- per frame: PSNR, PSNR with the ground-truth mask, and the pixels the render covers outside the
  mask (``spill``, alpha > 0.5) and misses inside it (``miss``, alpha < 0.5).

The last line prints the results as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_RUNS = (Path("runs") / "teacher" / "latest", Path("runs") / "demo" / "teacher" / "latest")


def error_decomposition(render: torch.Tensor, alpha: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-frame and regional errors of renders against frames under their masks (module docstring).

    Args:
        render: (B, 3, H, W) renders on white, [0, 1].
        alpha: (B, 1, H, W) the renders' accumulated alpha.
        image: (B, 3, H, W) frames; mask: (B, 1, H, W) head masks in {0, 1}.

    Returns:
        dict with ``psnr``, ``psnr_gt_mask``, ``mse``, ``mse_outside``, ``mse_band``,
        ``mse_interior`` (floats; the three regions add up to ``mse``) and per-frame lists
        ``frame_psnr``, ``frame_psnr_gt_mask``, ``spill_px``, ``miss_px``.
    """
    from lightning_modules.metrics import composite_on_white

    target = composite_on_white(image, mask)
    render = render.clamp(0, 1)
    err = (render - target).square().mean(1, keepdim=True)  # (B, 1, H, W)
    dilated = F.max_pool2d(mask, 3, 1, 1)
    eroded = 1.0 - F.max_pool2d(1.0 - mask, 3, 1, 1)
    regions = {"outside": 1.0 - dilated, "band": dilated - eroded, "interior": eroded}
    pixels = err[0].numel()
    frame_mse = err.flatten(1).mean(1)
    frame_psnr = -10.0 * torch.log10(frame_mse)
    frame_psnr_gt = -10.0 * torch.log10((composite_on_white(render, mask) - target).square().flatten(1).mean(1))
    out = {
        "psnr": float(frame_psnr.mean()),
        "psnr_gt_mask": float(frame_psnr_gt.mean()),
        "mse": float(frame_mse.mean()),
        **{f"mse_{k}": float((err * r).flatten(1).sum(1).mean() / pixels) for k, r in regions.items()},
        "frame_psnr": [round(float(v), 2) for v in frame_psnr],
        "frame_psnr_gt_mask": [round(float(v), 2) for v in frame_psnr_gt],
        "spill_px": [int(v) for v in ((alpha > 0.5) & (mask < 0.5)).flatten(1).sum(1)],
        "miss_px": [int(v) for v in ((alpha < 0.5) & (mask > 0.5)).flatten(1).sum(1)],
    }
    return out


def load_teacher_run(run: Path):
    """The teacher module (eval, CPU) and its datamodule (prepared, set up) of a run's last.ckpt."""
    from lightning_modules.teacher import TeacherModule

    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    if "_class_path" not in hparams:
        raise SystemExit(f"error: {ckpt} records no datamodule; pass a run made by `lightning fit`")
    module_name, _, class_name = hparams["_class_path"].rpartition(".")
    datamodule = getattr(importlib.import_module(module_name), class_name)(
        **{k: v for k, v in hparams.items() if not k.startswith("_")}
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = TeacherModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    return module, datamodule


@torch.no_grad()
def evaluate(module, datamodule, split: str) -> dict:
    """:func:`error_decomposition` of the teacher and of both baselines over a split's frames."""
    from lightning_modules.metrics import Baselines, nearest_training_frames

    loader = getattr(datamodule, f"{split}_dataloader")()
    dataset = loader.dataset  # every frame of the split, in order (the training loader shuffles)
    batch = loader.collate_fn([dataset[i] for i in range(len(dataset))])
    canonical = module.teacher.canonical(method="explicit")
    _, raster = module.render(batch, canonical=canonical)
    train = datamodule.training_frames()
    baselines = Baselines(train["image"], train["mask"], train["world_mat"], train["expression"])(
        batch.expression, batch.world_mat)
    nearest, _ = nearest_training_frames(train["expression"], train["world_mat"], batch.expression, batch.world_mat)
    alphas = {"baseline_mean": train["mask"].mean(0).expand_as(batch.mask), "baseline_nearest": train["mask"][nearest]}
    return {
        "frames": len(batch),
        "teacher": error_decomposition(raster.image[:, :3], raster.alpha, batch.image, batch.mask),
        **{name: error_decomposition(baselines[name], alphas[name], batch.image, batch.mask) for name in alphas},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help=f"teacher run folder (default {DEFAULT_RUNS[0]}, else {DEFAULT_RUNS[1]})")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run = Path(args.run) if args.run else next(
        (r for r in DEFAULT_RUNS if (r / "checkpoints" / "last.ckpt").is_file()), DEFAULT_RUNS[0]
    )
    if not (run / "checkpoints" / "last.ckpt").is_file():
        raise SystemExit(f"error: no teacher run at {run} (needs checkpoints/last.ckpt): run `make demo` or "
                         "`lightning fit --config experiments/teacher.yaml` first, or pass --run")
    module, datamodule = load_teacher_run(run)
    result = {"run": str(run), "split": args.split, **evaluate(module, datamodule, args.split)}
    t = result["teacher"]
    print(f"\nteacher run {run}, {args.split} split ({result['frames']} frames)")
    print(f"  {'':16s} {'PSNR':>7s} {'GT-mask PSNR':>13s} {'MSE outside':>12s} {'band':>9s} {'interior':>9s}")
    for name in ("teacher", "baseline_mean", "baseline_nearest"):
        r = result[name]
        print(f"  {name:16s} {r['psnr']:7.2f} {r['psnr_gt_mask']:13.2f} {r['mse_outside']:12.5f} "
              f"{r['mse_band']:9.5f} {r['mse_interior']:9.5f}")
    print(f"  teacher per frame PSNR : {t['frame_psnr']}")
    print(f"  ... with the GT mask   : {t['frame_psnr_gt_mask']}")
    print(f"  spill px (outside mask): {t['spill_px']}")
    print(f"  miss px (inside mask)  : {t['miss_px']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
