"""Where the GAR's error is, against its student's: interior, silhouette band or outside the head.

Run from the checkout root after ``make demo`` (or any GAR fit)::

    python -m benchmarks.gar_errors [--run RUN] [--ckpt best|last] [--split val|test|train] [--max-frames N]

RUN defaults to ``runs/gar/latest``, else the demo's ``runs/demo/gar/latest``; the checkpoint is the
one the demo tests (``best.ckpt``, chosen on val, else ``last.ckpt``; ``--ckpt`` picks one). Every frame of the split is rendered as
the evaluation step does, from its tracked codes (nothing looks at the frame): ``student`` (the
student's rasterized colours), ``gar`` (the EMA generator with the mean training z) and
``gar_zero_features`` (the same with the point features zeroed). Each is scored by
:func:`benchmarks.teacher_errors.error_decomposition`: PSNR (``full``), PSNR under the ground-truth
mask (``face``) and the mean squared error split into ``interior``, ``band`` (within one pixel of the
mask's edge) and ``outside`` (the three add up to the whole). A GAR that gains only in the interior
while the band dominates the error cannot gain much ``full`` PSNR: the silhouette is the student's.

Val is the split to argue design on; test is for the report. The last line prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.teacher_errors import _chunks, _split_frames, error_decomposition

DEFAULT_RUNS = (Path("runs") / "gar" / "latest", Path("runs") / "demo" / "gar" / "latest")
ROWS = ("student", "gar", "gar_zero_features")


@torch.no_grad()
def evaluate(module, datamodule, split: str, max_frames: int | None = None, chunk: int = 8) -> dict:
    """:func:`~benchmarks.teacher_errors.error_decomposition` of each of :data:`ROWS` over a split's
    frames (the first ``max_frames`` when given).

    Args:
        module: a :class:`~lightning_modules.gar.GARModule` in eval mode.
        datamodule: its datamodule, set up.
        split: ``train``, ``val`` or ``test``.

    Returns:
        ``{"frames": n, row: decomposition}``.
    """
    batch = _split_frames(datamodule, split)
    if max_frames is not None:
        batch = next(_chunks(batch, max_frames))
    renders: dict[str, list[torch.Tensor]] = {row: [] for row in ROWS}
    alphas = []
    for part in _chunks(batch, chunk):
        inputs = module.raster_inputs(part, part.expression)
        alphas.append(inputs.alpha)
        renders["student"].append(module.render_student(part))
        renders["gar"].append(module.render_meanz(part))
        renders["gar_zero_features"].append(module.render_meanz(part, "zero"))
    alpha = torch.cat(alphas)
    result: dict = {"frames": len(batch)}
    for row, images in renders.items():
        result[row] = error_decomposition(torch.cat(images), alpha, batch.image, batch.mask)
    return result


def format_table(result: dict) -> str:
    """One Markdown table: a row per model, PSNR full/face and the MSE by region (x 1e3)."""
    lines = ["| model | PSNR full | PSNR face | MSE x1e3 | interior | band | outside |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in ROWS:
        d = result[row]
        lines.append(f"| {row} | {d['psnr']:.2f} | {d['psnr_gt_mask']:.2f} | {1e3 * d['mse']:.3f} | "
                      f"{1e3 * d['mse_interior']:.3f} | {1e3 * d['mse_band']:.3f} | {1e3 * d['mse_outside']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gar_errors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="a GAR run folder (default: runs/gar/latest, else runs/demo/gar/latest)")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--max-frames", type=int, default=None, help="score the split's first N frames only")
    parser.add_argument("--ckpt", choices=("best", "last"), default=None,
                        help="the checkpoint (default: best.ckpt where the fit wrote one, else last.ckpt)")
    args = parser.parse_args(argv)
    from lightning_modules.export import ExportError, load_datamodule, load_gar_module

    run = Path(args.run) if args.run else next((r for r in DEFAULT_RUNS if r.exists()), DEFAULT_RUNS[0])
    from lightning_modules.demo import selected_checkpoint

    try:
        name = f"{args.ckpt}.ckpt" if args.ckpt else selected_checkpoint(run).name
        module, datamodule = load_gar_module(run, name), load_datamodule(run)
    except (ExportError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    result = evaluate(module, datamodule, args.split, args.max_frames)
    print(f"{run} ({args.split}, {result['frames']} frames, tracked codes, {name})")
    print(format_table(result))
    printable = {k: ({m: v for m, v in d.items() if not m.startswith("frame_") and m not in ("spill_px", "miss_px")}
                     if isinstance(d, dict) else d) for k, d in result.items()}
    print(json.dumps({"run": str(run), "checkpoint": name, "split": args.split, **printable}))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
