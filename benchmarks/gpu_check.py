"""GPU check: a few training steps of every stage in each mixed precision, with step times and peak memory.

For a GPU machine with Python 3.12, torch 2.11 and no torch-scatter / torch-cluster / mediapipe and
no network: ``models.ops`` falls back to its pure-torch backend by itself, W&B is off (no logger),
and the dataset must be prepared beforehand (here, with mediapipe) and carried in ``data/``::

    python -m datamodules.prepare VIDEO data/carphone      # here; or any fit with the default config
    python -m benchmarks.gpu_check                         # there: 16-mixed and bf16-mixed, 5 steps per stage
    python -m benchmarks.gpu_check --accelerator cpu --precision bf16-mixed --steps 1 --tiny   # dry run on CPU

For each precision it runs the chain teacher -> distill -> GAR through the real ``lightning`` CLI
(in this process, each stage on the previous one's checkpoint, run folders in a temporary folder or
``--out``), ``--steps`` training batches per stage (the GAR's 3 optimizer steps per batch included),
no validation. Per stage it prints the first batch's time (warm-up, allocation, autotuning), the
median time of the others (milliseconds, device synchronised) and the peak memory
``torch.cuda.max_memory_allocated`` over the stage's training (MiB; "-" on CPU), as a table and
as one JSON line. A stage that fails is reported as such and its dependents are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"
STAGES = ("teacher", "distill", "gar")
UPSTREAM_FLAG = {"distill": "--model.init_args.teacher_ckpt", "gar": "--model.init_args.student_ckpt"}
OPTIMIZER_STEPS_PER_BATCH = {"teacher": 1, "distill": 1, "gar": 3}  # GAR: N, G and D optimizers


class StepTimer(pl.Callback):
    """Wall-clock seconds of every training batch (device synchronised) and the peak device memory.

    Attributes:
        times: seconds per training batch, in order.
        peak_bytes: ``torch.cuda.max_memory_allocated`` over the training (reset at its start), or
            None off CUDA.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.peak_bytes: int | None = None
        self._start = 0.0

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        self.times = []
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(pl_module.device)


def stage_args(
    stage: str, precision: str, accelerator: str, steps: int, run_dir: Path, upstream: Path | None, tiny: bool,
    data_root: str | None,
) -> list[str]:
    """The ``lightning fit`` arguments of one timed stage (no validation, no logger, one device)."""
    args = ["fit", "--config", str(EXPERIMENTS / f"{stage}.yaml")]
    if tiny:
        args += ["--config", str(EXPERIMENTS / "overrides" / "tiny_mesh.yaml")]
    elif data_root is not None:
        args.append(f"--data.init_args.data_root={data_root}")
    args += [
        f"--trainer.accelerator={accelerator}", "--trainer.devices=1", f"--trainer.precision={precision}",
        f"--trainer.max_steps={steps * OPTIMIZER_STEPS_PER_BATCH[stage]}", "--trainer.max_epochs=-1",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=benchmarks.gpu_check.StepTimer", "--run_dir", str(run_dir),
    ]
    if upstream is not None:
        args += [UPSTREAM_FLAG[stage], str(upstream)]
    return args


def run_stage(args: list[str]) -> StepTimer:
    """Run the CLI in this process; the run's :class:`StepTimer`."""
    from benchmarks import gpu_check  # the class the CLI imported (this file may run as __main__)
    from lightning_modules.cli import run_cli

    cli = run_cli(args)
    (timer,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, gpu_check.StepTimer)]
    return timer


def summarize(stage: str, precision: str, timer: StepTimer | None, error: str | None = None) -> dict[str, Any]:
    """One table row: first batch seconds, median of the others in ms, peak MiB (None when not measured)."""
    row: dict[str, Any] = {"stage": stage, "precision": precision, "batches": 0, "first_s": None,
                           "median_ms": None, "peak_mib": None, "error": error}
    if timer is not None and timer.times:
        row["batches"] = len(timer.times)
        row["first_s"] = timer.times[0]
        if len(timer.times) > 1:
            row["median_ms"] = 1e3 * statistics.median(timer.times[1:])
        if timer.peak_bytes is not None:
            row["peak_mib"] = timer.peak_bytes / 2**20
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`summarize` rows."""

    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"{'stage':<8} {'precision':<11} {'batches':>7} {'first (s)':>10} {'median (ms)':>12} {'peak GPU (MiB)':>15}"]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['stage']:<8} {r['precision']:<11} FAILED: {r['error']}")
            continue
        lines.append(
            f"{r['stage']:<8} {r['precision']:<11} {r['batches']:>7} {cell(r['first_s'], '.2f'):>10} "
            f"{cell(r['median_ms'], '.1f'):>12} {cell(r['peak_mib'], '.0f'):>15}"
        )
    return "\n".join(lines)


def check_dataset(data_root: str, dataset_name: str) -> None:
    """Exit with one line when the prepared dataset is missing (it cannot be prepared without mediapipe)."""
    from datamodules.avatar import JSON_NAME

    if not (Path(data_root) / dataset_name / JSON_NAME).is_file():
        sys.exit(
            f"gpu_check: no prepared dataset at {Path(data_root) / dataset_name}: prepare it where mediapipe is "
            f"installed (python -m datamodules.prepare VIDEO {Path(data_root) / dataset_name}) and carry it, "
            "or pass --tiny"
        )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="gpu", help="Lightning accelerator (gpu; cpu for a dry run)")
    parser.add_argument("--precision", action="append", choices=["16-mixed", "bf16-mixed", "32-true"],
                        help="repeatable; default 16-mixed and bf16-mixed")
    parser.add_argument("--steps", type=int, default=5, help="training batches per stage (>= 1)")
    parser.add_argument("--tiny", action="store_true", help="the generated tiny head (no dataset needed)")
    parser.add_argument("--data-root", default="data", help="folder holding the prepared dataset")
    parser.add_argument("--dataset-name", default="carphone", help="dataset folder under --data-root")
    parser.add_argument("--out", default=None, help="folder for the run folders (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --accelerator cpu for a dry run")
    if not args.tiny:
        check_dataset(args.data_root, args.dataset_name)
    os.environ.setdefault("WANDB_MODE", "disabled")  # no network there; the runs have no logger anyway
    precisions = args.precision or ["16-mixed", "bf16-mixed"]

    from models import ops

    print(f"torch {torch.__version__}, ops backend {ops.get_backend()}, accelerator {args.accelerator}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        for precision in precisions:
            upstream: Path | None = None
            for stage in STAGES:
                if stage != "teacher" and upstream is None:
                    rows.append(summarize(stage, precision, None, "skipped: the upstream stage failed"))
                    continue
                run_dir = out / f"{precision}-{stage}"
                try:
                    timer = run_stage(stage_args(stage, precision, args.accelerator, args.steps, run_dir, upstream,
                                                 args.tiny, None if args.tiny else args.data_root))
                    rows.append(summarize(stage, precision, timer))
                    upstream = run_dir / "checkpoints" / "last.ckpt"
                except (Exception, SystemExit) as err:  # report and go on with the other precisions
                    rows.append(summarize(stage, precision, None, f"{type(err).__name__}: {err}".splitlines()[0]))
                    upstream = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    print(format_table(rows))
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
