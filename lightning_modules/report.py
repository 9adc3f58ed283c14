"""The demo report: one table of the runs' numbers (``report.md`` / ``report.json``) and a loss plot.

Every number comes from a run's ``metrics.json`` (DESIGN.md, "metrics.json (one schema)") or, for
the training time, from the wall-clock time the pipeline measured around each fit; a value no run
holds is ``null`` in JSON and "—" in Markdown, never a substitute. Rows are the models
:data:`MODELS`, columns :data:`FIELDS`::

    field            metrics.json key           meaning
    params           params/<model>             trainable parameters of the canonical network (GAR: G)
    flops            flops/<model>              one canonical forward at N = 10,000 (fvcore, 1 MAC = 1 flop)
    flops_per_frame  flops_per_frame/<model>    deformation + shading of one frame
    ms_per_frame     ms_per_frame/<model>       deform + shade + rasterize one frame, milliseconds
    training_time_s  (measured around the fit)  seconds of the stage's ``lightning fit``
    l1, psnr, ssim, swd  <model>/test/<metric>  held-out frames, head mask, on white

plus ``params_ratio`` and ``flops_ratio`` (student / teacher) and ``num_points``. Each value is taken
from the first run of :data:`RUN_ORDER` whose metrics.json holds it, and ``sources`` in the JSON
names that run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FIELDS",
    "MODELS",
    "RUN_ORDER",
    "build_report",
    "format_markdown",
    "plot_losses",
    "read_loss_curves",
    "read_metrics",
    "write_report",
]

#: Rows of the report, in order.
MODELS = ("baseline_mean", "teacher", "student", "gar", "gar_meanz")

#: Columns of the report: field -> (metrics.json key template, Markdown header).
FIELDS: dict[str, tuple[str | None, str]] = {
    "params": ("params/{model}", "params"),
    "flops": ("flops/{model}", "FLOPs / forward (N = 10k)"),
    "flops_per_frame": ("flops_per_frame/{model}", "FLOPs / frame"),
    "ms_per_frame": ("ms_per_frame/{model}", "ms / frame"),
    "training_time_s": (None, "training time"),
    "l1": ("{model}/test/l1", "L1 ↓"),
    "psnr": ("{model}/test/psnr", "PSNR ↑"),
    "ssim": ("{model}/test/ssim", "SSIM ↑"),
    "swd": ("{model}/test/swd", "SWD ↓"),
}

#: Where a value is looked up, first match wins: a model's own test run before the later stages'.
RUN_ORDER = ("teacher_test", "distill_test", "gar_test", "distill_fit", "gar_fit", "teacher_fit")

#: Which fit's measured wall time is each model's training time (baseline_mean trains nothing).
TRAINING_FIT = {"teacher": "teacher_fit", "student": "distill_fit", "gar": "gar_fit", "gar_meanz": "gar_fit"}

RATIOS = ("params_ratio", "flops_ratio")
MISSING = "—"


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's ``metrics.json`` as a dict.

    Raises:
        FileNotFoundError: when the run has no metrics.json (not a finished run folder).
    """
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a finished run folder")
    return json.loads(path.read_text())


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def build_report(
    runs: Mapping[str, str | os.PathLike],
    training_time_s: Mapping[str, float | None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect the report from run folders.

    Args:
        runs: run label (from :data:`RUN_ORDER`: ``teacher_fit``, ``distill_test``, ...) -> run
            folder; labels may be missing (their values are then null).
        training_time_s: fit label (``teacher_fit``, ``distill_fit``, ``gar_fit``) -> seconds measured
            around that fit; a missing label is null.
        extra: further top-level entries copied into the report (demo id, overrides, timings...).

    Returns:
        ``{"models": {model: {field: value | None}}, "ratios": {...}, "num_points": ...,
        "sources": {model: {field: run label}}, "runs": {label: path}, **extra}``.

    Raises:
        ValueError: an unknown run label.
        FileNotFoundError: a listed run folder without metrics.json.
    """
    unknown = set(runs) - set(RUN_ORDER)
    if unknown:
        raise ValueError(f"unknown run label(s) {sorted(unknown)}; known: {list(RUN_ORDER)}")
    metrics = {label: read_metrics(runs[label]) for label in RUN_ORDER if label in runs}
    times = dict(training_time_s or {})

    def lookup(key: str) -> tuple[Any, str | None]:
        for label, values in metrics.items():
            if _finite(values.get(key)):
                return values[key], label
        return None, None

    models: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for model in MODELS:
        row: dict[str, Any] = {}
        for field, (template, _) in FIELDS.items():
            if template is None:  # training time: measured around the stage's fit
                label = TRAINING_FIT.get(model)
                value = times.get(label) if label else None
                value = float(value) if _finite(value) else None
            else:
                value, label = lookup(template.format(model=model))
            row[field] = value
            if value is not None and label is not None:
                sources.setdefault(model, {})[field] = label
        models[model] = row
    ratios = {}
    for key in RATIOS:
        ratios[key], label = lookup(key)
        if label is not None:
            sources.setdefault("ratios", {})[key] = label
    num_points, _ = lookup("num_points")
    return {
        "models": models,
        "ratios": ratios,
        "num_points": num_points,
        "sources": sources,
        "runs": {label: str(path) for label, path in runs.items()},
        **dict(extra or {}),
    }


# -- Markdown ---------------------------------------------------------------------------------------
def _si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {suffix}"
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


_FORMATS = {
    "params": lambda v: f"{int(v):,}",
    "flops": _si,
    "flops_per_frame": _si,
    "ms_per_frame": lambda v: f"{v:.2f}",
    "training_time_s": _duration,
    "l1": lambda v: f"{v:.4f}",
    "psnr": lambda v: f"{v:.2f}",
    "ssim": lambda v: f"{v:.4f}",
    "swd": lambda v: f"{v:.4g}",
}


def _cell(field: str, value: Any) -> str:
    return MISSING if value is None else _FORMATS[field](value)


def format_markdown(report: Mapping[str, Any], title: str = "avatar-compress demo") -> str:
    """The report as Markdown: one table (a row per model), the ratios, the run folders.

    Args:
        report: as returned by :func:`build_report`.
        title: the first heading.
    """
    lines = [f"# {title}", ""]
    if report.get("description"):
        lines += [str(report["description"]), ""]
    headers = ["model", *(header for _, header in FIELDS.values())]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(FIELDS)) + "|")
    for model, row in report["models"].items():
        lines.append("| " + " | ".join([model, *(_cell(f, row.get(f)) for f in FIELDS)]) + " |")
    lines.append("")
    ratio_text = []
    for key, value in report["ratios"].items():
        if value is None:
            ratio_text.append(f"{key} = {MISSING}")
        else:
            ratio_text.append(f"{key} = {value:.4f}" + (f" (1/{1 / value:.1f})" if value > 0 else ""))
    lines.append("Student / teacher: " + ", ".join(ratio_text) + ".")
    if report.get("num_points") is not None:
        lines.append(f"Canonical points: {int(report['num_points']):,}.")
    lines += [
        "",
        "Held-out test frames, head mask, on white. FLOPs: fvcore, one multiply-add = one flop; per forward "
        "= one canonical forward at N = 10,000 points; per frame = deformation + shading. Training time: "
        f"wall clock of the stage's `lightning fit`. {MISSING}: no run measured it.",
    ]
    if report.get("runs"):
        lines += ["", "Runs:", ""]
        lines += [f"- {label}: `{path}`" for label, path in report["runs"].items()]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` into ``out_dir`` (atomically); returns their paths."""
    out = Path(out_dir)
    md, js = out / "report.md", out / "report.json"
    _atomic_write(js, json.dumps(report, indent=2, allow_nan=False) + "\n")
    _atomic_write(md, format_markdown(report))
    return md, js


# -- loss plot -------------------------------------------------------------------------------------
_LOSS_COLUMN = re.compile(r"^[a-z][a-z0-9_]*/train/loss(_d)?$")


def read_loss_curves(run_dir: str | os.PathLike) -> dict[str, tuple[list[float], list[float]]]:
    """The training losses of a fit from its ``csv/metrics.csv``.

    Columns ``<stage>/train/loss`` (and the GAR's ``<stage>/train/loss_d``) against ``step``.

    Returns:
        column -> (steps, values), rows without a value skipped; empty when the run has no CSV log.
    """
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    curves: dict[str, tuple[list[float], list[float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for column, text in row.items():
                if column is None or not _LOSS_COLUMN.match(column) or not text:
                    continue
                steps, values = curves.setdefault(column, ([], []))
                steps.append(float(row.get("step") or len(steps)))
                values.append(float(text))
    return curves


def plot_losses(fit_runs: Mapping[str, str | os.PathLike], path: str | os.PathLike) -> Path:
    """Plot each fit's training losses (one panel per stage) into a PNG (matplotlib's Agg canvas).

    Args:
        fit_runs: stage name -> fit run folder, in panel order.
        path: the PNG to write.

    Returns:
        ``path``.

    Raises:
        ValueError: no runs given.
    """
    if not fit_runs:
        raise ValueError("plot_losses needs at least one fit run")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(fit_runs), 3.5))  # no pyplot: the caller's backend is left alone
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(fit_runs), squeeze=False)
    for ax, (stage, run_dir) in zip(axes[0], fit_runs.items()):
        curves = read_loss_curves(run_dir)
        for column, (steps, values) in sorted(curves.items()):
            ax.plot(steps, values, marker="." if len(values) < 20 else None, label=column.split("/", 1)[1])
        every = [v for _, vs in curves.values() for v in vs]
        if every and min(every) > 0 and max(every) > 10 * min(every):  # log scale only over decades
            ax.set_yscale("log")
        if not curves:
            ax.text(0.5, 0.5, "no training loss logged", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize="small")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
