"""Where a teacher's error is: train, val and test, silhouette or interior, and the mouth.

Run from the checkout root after ``make demo`` (or any teacher fit)::

    python -m benchmarks.teacher_errors [--run RUN] [--ckpt best|last] [--split all|train|val|test]
                                        [--no-mouth]

RUN defaults to ``runs/teacher/latest``, else the demo's ``runs/demo/teacher/latest``; the
checkpoint is the one the demo hands downstream (``best.ckpt``, chosen on val, else
``last.ckpt``). Every frame of each split is rendered as the test step does (cached canonical
outputs, render on white) and scored against the frame on white under its head mask. Reported,
for the teacher and for the two baselines of the report
(:class:`lightning_modules.metrics.Baselines`: ``baseline_mean``, the mean training frame on white
with the mean training mask; ``baseline_nearest``, the training frame nearest in expression and
pose, with its own mask; on the train split only the mean, the nearest being the frame itself):

- ``psnr``: region ``full`` of the report (the render with its own silhouette), the mean over
  frames of the per-frame PSNR, as :class:`~lightning_modules.metrics.HeldOutMetrics` computes it;
- ``psnr_gt_mask``: region ``face`` (the render composited on white under the ground-truth mask:
  what the teacher would score with a perfect silhouette);
- the mean squared error split into three regions that add up to the whole: ``outside`` (more
  than one pixel outside the mask), ``band`` (within one pixel of the mask's edge, 3x3 dilation
  minus 3x3 erosion) and ``interior``, each a sum over its pixels divided by all pixels;
- per frame: PSNR, PSNR with the ground-truth mask, and the pixels the render covers outside the
  mask (``spill``, alpha > 0.5) and misses inside it (``miss``, alpha < 0.5).

On the train split a teacher fitted with code refinement is scored twice: ``teacher`` from the
tracked codes and ``teacher_fitted`` from its fitted (corrected) codes of those frames, the codes the
downstream stages train on. On val and test, ``teacher_refined`` is the ``refined`` protocol (each
frame's codes fitted to that frame with the teacher frozen, the module's ``refine_steps`` and
``refine_lr``; it looks at the frame it is scored on; ``--no-refined`` skips it).

Mouth (test split, ``--no-mouth`` skips it): the renders and the ground-truth frames (on white, at
the same size) are upscaled and re-tracked as ``benchmarks/reenact.py`` does, and the Pearson r of
the two mouth-opening series is reported (target >= 0.6), with the share of renders where a face was
found.

The last line prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_RUNS = (Path("runs") / "teacher" / "latest", Path("runs") / "demo" / "teacher" / "latest")
SPLITS = ("train", "val", "test")
TARGET_MOUTH_R = 0.6


def error_decomposition(render: torch.Tensor, alpha: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-frame and regional errors of renders against frames under their masks (module docstring).

    Args:
        render: (B, 3, H, W) renders on white, [0, 1].
        alpha: (B, 1, H, W) the renders' accumulated alpha, or None (then ``spill_px``/``miss_px``
            are None).
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
        "spill_px": None if alpha is None else [int(v) for v in ((alpha > 0.5) & (mask < 0.5)).flatten(1).sum(1)],
        "miss_px": None if alpha is None else [int(v) for v in ((alpha < 0.5) & (mask > 0.5)).flatten(1).sum(1)],
    }
    return out


def selected_checkpoint(run: Path, which: str | None = None) -> Path:
    """The run's checkpoint: ``which`` = "best" or "last", or (None) best.ckpt when the fit wrote one,
    else last.ckpt (what the demo hands downstream).

    Raises:
        SystemExit: when that checkpoint is missing (one line naming what to do).
    """
    from lightning_modules.demo import selected_checkpoint as demo_selection

    folder = run / "checkpoints"
    try:
        if which is None:
            return demo_selection(run)
        if (folder / f"{which}.ckpt").is_file():
            return folder / f"{which}.ckpt"
    except FileNotFoundError:
        pass
    names = [f"{which}.ckpt"] if which else ["best.ckpt", "last.ckpt"]
    raise SystemExit(f"error: no {' or '.join(names)} in {folder}: run `make demo` or "
                     "`lightning fit --config experiments/teacher.yaml` first, or pass --run")


def load_teacher_run(run: Path, which: str | None = None):
    """The teacher module (eval, CPU) of a run's checkpoint (:func:`selected_checkpoint`) and its
    datamodule (prepared, set up), and the checkpoint's path."""
    from lightning_modules.handoff import class_from_path
    from lightning_modules.teacher import TeacherModule

    ckpt = selected_checkpoint(run, which)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    if "_class_path" not in hparams:
        raise SystemExit(f"error: {ckpt} records no datamodule; pass a run made by `lightning fit`")
    datamodule = class_from_path(hparams["_class_path"])(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = TeacherModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    return module, datamodule, ckpt


def _split_frames(datamodule, split: str):
    loader = getattr(datamodule, f"{split}_dataloader")()
    dataset = loader.dataset  # every frame of the split, in order (the training loader shuffles)
    return loader.collate_fn([dataset[i] for i in range(len(dataset))])


def _chunks(batch, size: int):
    """Consecutive sub-batches of at most ``size`` frames (views)."""
    for start in range(0, len(batch), size):
        yield type(batch)(**{k: v[start:start + size] for k, v in vars(batch).items()})


@torch.no_grad()
def _render(module, batch, canonical, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    images, alphas = [], []
    for part in _chunks(batch, chunk):
        _, raster = module.render(part, canonical=canonical)
        images.append(raster.image[:, :3])
        alphas.append(raster.alpha)
    return torch.cat(images), torch.cat(alphas)


def _render_refined(module, batch, canonical, chunk: int) -> tuple[torch.Tensor, None]:
    from lightning_modules import point_rows

    steps, lr = module.hparams.refine_steps, module.hparams.refine_lr
    images = [point_rows.refined(module.teacher, module.rasterizer, part, canonical, steps, lr).detach()
              for part in _chunks(batch, chunk)]
    return torch.cat(images), None  # no alpha: no spill/miss counts for this row


@torch.no_grad()
def evaluate(module, datamodule, split: str, refined: bool = True, canonical=None, train=None) -> dict:
    """:func:`error_decomposition` of the teacher and of the baselines over a split's frames (and, on
    the train split of a teacher with code refinement, of its fitted codes: ``teacher_fitted``; on val
    and test with ``refined``, of the refined protocol: ``teacher_refined``).

    ``canonical`` (the teacher's canonical outputs) and ``train`` (``datamodule.training_frames()``)
    are computed here unless given, so a caller scoring several splits computes them once.
    """
    from lightning_modules.metrics import Baselines, nearest_training_frames
    from lightning_modules.stage import with_code_corrections

    batch = _split_frames(datamodule, split)
    if canonical is None:
        canonical = module.teacher.canonical(method="explicit")
    render, alpha = _render(module, batch, canonical)
    result = {"frames": len(batch), "teacher": error_decomposition(render, alpha, batch.image, batch.mask)}
    if split == "train" and module.codes is not None:
        fitted = with_code_corrections(batch, module.codes)
        render_f, alpha_f = _render(module, fitted, canonical)
        result["teacher_fitted"] = error_decomposition(render_f, alpha_f, batch.image, batch.mask)
    if split != "train" and refined and module.hparams.refine_steps > 0:
        render_r, alpha_r = _render_refined(module, batch, canonical, getattr(datamodule, "batch_size", 8))
        result["teacher_refined"] = error_decomposition(render_r, alpha_r, batch.image, batch.mask)
    if train is None:
        train = datamodule.training_frames()
    baselines = Baselines(train["image"], train["mask"], train["world_mat"], train["expression"])(
        batch.expression, batch.world_mat)
    alphas = {"baseline_mean": train["mask"].mean(0).expand_as(batch.mask)}
    if split != "train":  # on a training frame the nearest training frame is the frame itself
        nearest, _ = nearest_training_frames(train["expression"], train["world_mat"], batch.expression, batch.world_mat)
        alphas["baseline_nearest"] = train["mask"][nearest]
    for name, a in alphas.items():
        result[name] = error_decomposition(baselines[name], a, batch.image, batch.mask)
    result["_renders"] = render  # for the mouth; dropped before printing
    result["_targets"] = batch
    return result


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def mouth_correlation(render: torch.Tensor, batch, upscale: int = 256) -> dict:
    """Pearson r of the mouth opening re-tracked in the renders (B, 3, H, W) and in the frames of
    ``batch`` (on white under their masks), as ``benchmarks/reenact.py`` measures it."""
    from benchmarks.reenact import score, track_openings
    from lightning_modules.metrics import composite_on_white

    truth = track_openings(_uint8(composite_on_white(batch.image, batch.mask)), upscale)
    rendered = track_openings(_uint8(render), upscale)
    out = score(truth, rendered)
    out["target_r"] = TARGET_MOUTH_R
    out["passes"] = out["pearson_r"] is not None and out["pearson_r"] >= TARGET_MOUTH_R
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help=f"teacher run folder (default {DEFAULT_RUNS[0]}, else {DEFAULT_RUNS[1]})")
    parser.add_argument("--ckpt", default=None, choices=("best", "last"),
                        help="checkpoint (default: best.ckpt when the fit wrote one, else last.ckpt)")
    parser.add_argument("--split", default="all", choices=("all", *SPLITS))
    parser.add_argument("--no-mouth", action="store_true", help="skip the mouth-opening correlation (test split)")
    parser.add_argument("--no-refined", action="store_true", help="skip the refined protocol (val, test)")
    parser.add_argument("--upscale", type=int, default=256, help="frames are upscaled to this size before re-tracking")
    parser.add_argument("--per-frame", action="store_true", help="print the per-frame lists too")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run = Path(args.run) if args.run else next(
        (r for r in DEFAULT_RUNS if (r / "checkpoints").is_dir()), DEFAULT_RUNS[0]
    )
    if not (run / "checkpoints").is_dir():
        raise SystemExit(f"error: no teacher run at {run} (needs checkpoints/): run `make demo` or "
                         "`lightning fit --config experiments/teacher.yaml` first, or pass --run")
    module, datamodule, ckpt = load_teacher_run(run, args.ckpt)
    splits = SPLITS if args.split == "all" else (args.split,)
    sizes = datamodule.split_sizes()
    result: dict = {"run": str(run), "checkpoint": ckpt.name, "splits": {}}
    print(f"\nteacher run {run} ({ckpt.name}); full = own silhouette, face = under the ground-truth mask")
    print(f"  {'split':5s} {'row':16s} {'frames':>6s} {'full PSNR':>9s} {'face PSNR':>9s} "
          f"{'MSE outside':>11s} {'band':>8s} {'interior':>8s}")
    with torch.no_grad():  # once for every split
        canonical = module.teacher.canonical(method="explicit")
    train = datamodule.training_frames()
    for split in splits:
        if sizes.get(split, 0) == 0:
            continue
        r = evaluate(module, datamodule, split, refined=not args.no_refined, canonical=canonical, train=train)
        renders, batch = r.pop("_renders"), r.pop("_targets")
        result["splits"][split] = r
        for name in ("teacher", "teacher_fitted", "teacher_refined", "baseline_mean", "baseline_nearest"):
            if name in r:
                e = r[name]
                print(f"  {split:5s} {name:16s} {r['frames']:6d} {e['psnr']:9.2f} {e['psnr_gt_mask']:9.2f} "
                      f"{e['mse_outside']:11.5f} {e['mse_band']:8.5f} {e['mse_interior']:8.5f}")
        if args.per_frame:
            t = r["teacher"]
            print(f"  {split} teacher per frame PSNR : {t['frame_psnr']}")
            print(f"  ... with the GT mask     : {t['frame_psnr_gt_mask']}")
            print(f"  spill px (outside mask)  : {t['spill_px']}")
            print(f"  miss px (inside mask)    : {t['miss_px']}")
        if split == "test" and not args.no_mouth:
            mouth = mouth_correlation(renders, batch, args.upscale)
            result["mouth"] = mouth
            r_text = "n/a" if mouth["pearson_r"] is None else f"{mouth['pearson_r']:.3f}"
            print(f"  mouth opening r (test renders vs frames, re-tracked): {r_text} over {mouth['pairs']} "
                  f"frames (face found in {mouth['output_face_found_share']:.0%} of renders; target >= "
                  f"{TARGET_MOUTH_R})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
