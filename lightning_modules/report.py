"""The demo report: the runs' numbers as tables (``report.md`` / ``report.json``) and a loss plot.

Every number comes from a run's ``metrics.json`` (DESIGN.md, "metrics.json (one schema)";
:mod:`lightning_modules.metrics` for the keys) or, for the training time, from the wall-clock time
the pipeline measured around each fit; a value no run holds is ``null`` in JSON and "—" in
Markdown, never a substitute. Rows are (model, protocol) pairs, :data:`ROWS`; the ``tracked`` rows
are the headline, the ``refined`` rows (which look at the frame they score) are labelled and
tabled apart. Per row::

    field            metrics.json key                       meaning
    params           params/<model>                         parameters of what the row runs (GAR: G; inverted: G + E)
    flops            flops/<model>                          one canonical forward at N = 10,000 (fvcore, 1 MAC = 1 flop)
    flops_per_frame  flops_per_frame/<model>/<protocol>     one frame on the row's path (rasterizer excluded)
    ms_per_frame     ms_per_frame/<model>/<protocol>        one frame on the row's path, milliseconds
    training_time_s  (measured around the fit)              seconds of the stage's ``lightning fit``
    <split>/<region>/<metric>  <model>/<protocol>/<split>/<region>/<metric>   l1, psnr, ssim, swd, flicker

plus ``params_ratio`` and ``flops_ratio`` (student / teacher), ``num_points`` and the split sizes.
Each value is taken from the first run of :data:`RUN_ORDER` whose metrics.json holds it, and
``sources`` in the JSON names that run. The device-size GAR's runs (labels ``gar_device_*``) are GAR
runs: their ``gar...`` keys are read as ``gar_device...`` (:data:`RENAMED_RUNS`). The report opens
with a warning line for a GAR under its student on val or flagged by its fit's divergence guard
(:func:`gar_warnings`), and tables the feature ablation (:data:`ABLATION_ROWS`) apart.
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
    "COST_FIELDS",
    "METRICS",
    "ROWS",
    "RUN_ORDER",
    "build_report",
    "format_markdown",
    "gar_warnings",
    "plot_losses",
    "read_divergence",
    "read_loss_curves",
    "read_metrics",
    "renamed_metrics",
    "row_id",
    "verdicts",
    "write_report",
]

#: Rows of the report, in order: (model, protocol). Tracked rows first (the headline).
ROWS: tuple[tuple[str, str], ...] = (
    ("baseline_mean", "tracked"),
    ("baseline_nearest", "tracked"),
    ("teacher", "tracked"),
    ("student", "tracked"),
    ("gar", "tracked"),
    ("gar_device", "tracked"),
    ("gar_zero_features", "tracked"),
    ("gar_shuffled_features", "tracked"),
    ("teacher", "refined"),
    ("student", "refined"),
    ("gar", "refined"),
    ("gar_inverted", "refined"),
)

#: The feature ablation: the large GAR with f_s zeroed / shuffled (tabled apart, never a headline).
ABLATION_ROWS = (("gar_zero_features", "tracked"), ("gar_shuffled_features", "tracked"))
#: The two generator sizes.
GAR_MODELS = ("gar", "gar_device")

#: Cost columns: field -> (metrics.json key template, Markdown header).
COST_FIELDS: dict[str, tuple[str | None, str]] = {
    "params": ("params/{model}", "params"),
    "flops": ("flops/{model}", "FLOPs / forward (N = 10k)"),
    "flops_per_frame": ("flops_per_frame/{model}/{protocol}", "FLOPs / frame"),
    "ms_per_frame": ("ms_per_frame/{model}/{protocol}", "ms / frame"),
    "training_time_s": (None, "training time"),
}

#: Quality metrics read for every split and region.
METRICS = ("l1", "psnr", "ssim", "swd", "flicker")
SPLITS = ("val", "test")
REGIONS = ("full", "face")

#: Where a value is looked up, first match wins: a model's own evaluation runs (test, then the
#: ``lightning validate`` of the selected checkpoint) before the later stages' and the fits'.
RUN_ORDER = ("teacher_test", "distill_test", "gar_test", "gar_device_test", "teacher_val", "distill_val", "gar_val",
             "gar_device_val", "distill_fit", "gar_fit", "gar_device_fit", "teacher_fit")
#: Runs whose models are renamed when read: label prefix -> (old model prefix, new one); their other
#: keys (the student, the baselines, the ratios) are left to the runs that own them.
RENAMED_RUNS = {"gar_device_": ("gar", "gar_device")}

#: Which fit's measured wall time is each model's training time (baselines train nothing).
TRAINING_FIT = {"teacher": "teacher_fit", "student": "distill_fit", "gar": "gar_fit", "gar_inverted": "gar_fit",
                "gar_device": "gar_device_fit"}

RATIOS = ("params_ratio", "flops_ratio")
MISSING = "—"


def row_id(model: str, protocol: str) -> str:
    """``<model>/<protocol>``, the key of a row in ``report["rows"]``."""
    return f"{model}/{protocol}"


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's ``metrics.json`` as a dict.

    Raises:
        FileNotFoundError: when the run has no metrics.json (not a finished run folder).
    """
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a finished run folder")
    return json.loads(path.read_text())


def renamed_metrics(label: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """A run's metrics with its models renamed (:data:`RENAMED_RUNS`): only the keys of models whose
    name starts with the old prefix are kept, e.g. ``gar/tracked/test/full/psnr`` ->
    ``gar_device/tracked/test/full/psnr`` and ``ms_per_frame/gar/tracked`` -> ``ms_per_frame/gar_device/tracked``."""
    match = [names for prefix, names in RENAMED_RUNS.items() if label.startswith(prefix)]
    if not match:
        return dict(values)
    old, new = match[0]
    out = {}
    for key, value in values.items():
        parts = key.split("/")
        i = 1 if parts[0] in ("params", "flops", "flops_run", "flops_per_frame", "ms_per_frame") else 0
        if len(parts) > i and parts[i].startswith(old):
            parts[i] = new + parts[i][len(old):]
            out["/".join(parts)] = value
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def build_report(
    runs: Mapping[str, str | os.PathLike],
    training_time_s: Mapping[str, float | None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect the report from run folders.

    Args:
        runs: run label (from :data:`RUN_ORDER`: ``teacher_fit``, ``distill_test``, ``gar_val``, ...)
            -> run folder; labels may be missing (their values are then null).
        training_time_s: fit label (``teacher_fit``, ``distill_fit``, ``gar_fit``) -> seconds measured
            around that fit; a missing label is null.
        extra: further top-level entries copied into the report (demo id, split sizes, timings...).

    Returns:
        ``{"rows": {"<model>/<protocol>": {"model", "protocol", <cost field>: value | None,
        "val"|"test": {"full"|"face": {metric: value | None}}}}, "ratios": {...}, "num_points": ...,
        "sources": {row: {field: run label}}, "runs": {label: path}, **extra}``.

    Raises:
        ValueError: an unknown run label.
        FileNotFoundError: a listed run folder without metrics.json.
    """
    unknown = set(runs) - set(RUN_ORDER)
    if unknown:
        raise ValueError(f"unknown run label(s) {sorted(unknown)}; known: {list(RUN_ORDER)}")
    metrics = {label: renamed_metrics(label, read_metrics(runs[label])) for label in RUN_ORDER if label in runs}
    times = dict(training_time_s or {})

    def lookup(key: str) -> tuple[Any, str | None]:
        for label, values in metrics.items():
            if _finite(values.get(key)):
                return values[key], label
        return None, None

    rows: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for model, protocol in ROWS:
        rid = row_id(model, protocol)
        row: dict[str, Any] = {"model": model, "protocol": protocol}
        for field, (template, _) in COST_FIELDS.items():
            if template is None:  # training time: measured around the stage's fit
                label = TRAINING_FIT.get(model)
                value = times.get(label) if label else None
                value = float(value) if _finite(value) else None
            else:
                value, label = lookup(template.format(model=model, protocol=protocol))
            row[field] = value
            if value is not None and label is not None:
                sources.setdefault(rid, {})[field] = label
        for split in SPLITS:
            row[split] = {}
            for region in REGIONS:
                row[split][region] = {}
                for metric in METRICS:
                    value, label = lookup(f"{model}/{protocol}/{split}/{region}/{metric}")
                    row[split][region][metric] = value
                    if label is not None:
                        sources.setdefault(rid, {})[f"{split}/{region}/{metric}"] = label
        rows[rid] = row
    ratios = {}
    for key in RATIOS:
        ratios[key], label = lookup(key)
        if label is not None:
            sources.setdefault("ratios", {})[key] = label
    num_points, _ = lookup("num_points")
    return {
        "rows": rows,
        "ratios": ratios,
        "num_points": num_points,
        "sources": sources,
        "runs": {label: str(path) for label, path in runs.items()},
        **dict(extra or {}),
    }


def _psnr(report: Mapping[str, Any], model: str, split: str, region: str = "full") -> float | None:
    row = report["rows"].get(row_id(model, "tracked"))
    return None if row is None else row[split][region]["psnr"]


def verdicts(report: Mapping[str, Any], split: str = "test", region: str = "full") -> list[str]:
    """One sentence per trained model (tracked): does its PSNR beat both baselines on ``split``/``region``?

    A model that does not beat ``baseline_nearest`` has learned nothing beyond retrieving the
    training frame nearest in expression and pose.
    """
    def psnr(model: str) -> float | None:
        return _psnr(report, model, split, region)

    nearest, mean = psnr("baseline_nearest"), psnr("baseline_mean")
    lines = []
    for model in ("teacher", "student", *GAR_MODELS):
        value = psnr(model)
        if value is None or nearest is None or mean is None:
            continue
        beaten = [name for name, b in (("baseline_nearest", nearest), ("baseline_mean", mean)) if value > b]
        missed = [f"{name} ({b:.2f})" for name, b in (("baseline_nearest", nearest), ("baseline_mean", mean))
                  if value <= b]
        if not missed:
            lines.append(f"{model} ({value:.2f} dB) beats both baselines.")
        else:
            lines.append(f"{model} ({value:.2f} dB) does NOT beat {' or '.join(missed)}"
                         + (f"; it beats {beaten[0]}." if beaten else "."))
    return lines


def gar_warnings(report: Mapping[str, Any]) -> list[str]:
    """The report's opening warnings, one line per failed GAR fit (empty when both are sound).

    A GAR (either size) whose val PSNR (tracked, full) is under its student's is named as diverged or
    failed: its test figures are those of a failed fit. A fit whose divergence guard fired
    (``report["diverged"][fit]["diverged"]``, :func:`read_divergence`) is named too, with the step.
    """
    lines = []
    student = _psnr(report, "student", "val")
    for model in GAR_MODELS:
        value = _psnr(report, model, "val")
        if value is not None and student is not None and value < student:
            lines.append(f"**The `{model}` fit diverged or failed: on val it is {student - value:.2f} dB under the "
                         f"student ({value:.2f} against {student:.2f} dB, tracked, full); read its test figures as "
                         "those of a failed fit.**")
        flag = (report.get("diverged") or {}).get(model) or {}
        if flag.get("diverged"):
            lines.append(f"**The divergence guard fired in the `{model}` fit (step {flag.get('step')}); the checkpoint "
                         "tested is the best on val, not the last.**")
    return lines


def feature_ablation_lines(report: Mapping[str, Any], split: str = "test", region: str = "full") -> list[str]:
    """How much the large GAR's PSNR owes to the student's point features: real f_s against f_s
    zeroed and shuffled (the design needs the real features to win by >= 1 dB).

    Returns:
        one sentence per ablation row the report holds on ``split``/``region`` (none without them).
    """
    real = _psnr(report, "gar", split, region)
    lines = []
    for model, what in (("gar_zero_features", "zeroed"), ("gar_shuffled_features", "shuffled")):
        value = _psnr(report, model, split, region)
        if real is None or value is None:
            continue
        gain = real - value
        lines.append(f"f_s {what}: {value:.2f} dB; the real features win by {gain:+.2f} dB "
                     f"({'meets' if gain >= 1.0 else 'does NOT meet'} the 1 dB the design needs).")
    return lines


def read_divergence(fit_dir: str | os.PathLike) -> dict[str, Any]:
    """Whether a GAR fit's divergence guard fired, from its ``csv/metrics.csv`` (``gar/diverged``,
    ``gar/val/diverged``).

    Returns:
        ``{"diverged": bool, "step": the first logged step with the flag set, or None}``;
        ``{"diverged": False, "step": None}`` for a run without a CSV log or the columns.
    """
    path = Path(fit_dir) / "csv" / "metrics.csv"
    if path.is_file():
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if any(float(row.get(k) or 0) > 0 for k in ("gar/diverged", "gar/val/diverged")):
                    return {"diverged": True, "step": int(float(row.get("step") or 0))}
    return {"diverged": False, "step": None}


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
    "ms_per_frame": lambda v: f"{v:.2f}" if v < 1000 else _duration(v / 1000),
    "training_time_s": _duration,
    "l1": lambda v: f"{v:.4f}",
    "psnr": lambda v: f"{v:.2f}",
    "ssim": lambda v: f"{v:.4f}",
    "swd": lambda v: f"{v:.4g}",
    "flicker": lambda v: f"{v:+.4f}",
}


def _cell(field: str, value: Any) -> str:
    return MISSING if value is None else _FORMATS[field](value)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _quality_cells(row: Mapping[str, Any], split: str, region: str, metrics: tuple[str, ...]) -> list[str]:
    return [_cell(m, row[split][region][m]) for m in metrics]


def format_markdown(report: Mapping[str, Any], title: str = "avatar-compress demo") -> str:
    """The report as Markdown (module docstring): the headline table (tracked, test, full), every
    row on val and test in both regions, the refined rows apart, verdicts against the baselines,
    the ratios, the split sizes, the deployment table when present, the run folders.

    Args:
        report: as returned by :func:`build_report` (plus optional ``description``, ``splits``,
            ``deploy`` entries).
        title: the first heading.
    """
    rows = report["rows"]
    ablation = [rows[row_id(*r)] for r in ABLATION_ROWS if row_id(*r) in rows]
    tracked = [r for r in rows.values() if r["protocol"] == "tracked" and not any(r is a for a in ablation)]
    refined = [r for r in rows.values() if r["protocol"] == "refined"]
    lines = [f"# {title}", ""]
    warnings = gar_warnings(report)
    if warnings:
        lines += [*warnings, ""]
    if report.get("description"):
        lines += [str(report["description"]), ""]
    lines += ["## Test frames, tracked codes (nothing looks at the scored frame)", ""]
    cost_headers = [header for _, header in COST_FIELDS.values()]
    lines += _table(
        ["model", *cost_headers, "L1 ↓", "PSNR ↑", "SSIM ↑", "SWD ↓", "flicker ↓"],
        [[r["model"], *(_cell(f, r[f]) for f in COST_FIELDS), *_quality_cells(r, "test", "full", METRICS)]
         for r in tracked],
    )
    lines += ["", "Region `full`: each model's render on white with its own silhouette against the ground truth on "
              "white under its head mask. The baselines predict their own silhouette too. `gar_device`: the "
              "device-size generator, trained on the same student. Flicker: the mean absolute change between "
              "consecutive test frames of the render minus that of the video, inside the head masks (0: the video's "
              "own motion; > 0: the render flickers).", ""]
    lines += [f"- {line}" for line in verdicts(report)]
    if ablation:
        lines += ["", "## Does G use the point features? (test, tracked, full)", ""]
        lines += _table(["model", "PSNR ↑", "SSIM ↑", "SWD ↓"],
                        [[r["model"], *_quality_cells(r, "test", "full", ("psnr", "ssim", "swd"))]
                         for r in [rows[row_id("gar", "tracked")], *ablation]])
        lines += ["", "The large GAR with the student's point features f_s zeroed, or each point given another "
                  "point's code (its normal map, mask and base image unchanged).", ""]
        lines += [f"- {line}" for line in feature_ablation_lines(report)]
    lines += ["", "## Every row: val and test, regions full and face", ""]
    headers, body = ["model", "protocol"], []
    for split in SPLITS:
        for region in REGIONS:
            headers += [f"{split} {region} PSNR", f"{split} {region} SSIM"]
    headers.append("test full SWD")
    for r in rows.values():
        cells = [r["model"], r["protocol"]]
        for split in SPLITS:
            for region in REGIONS:
                cells += _quality_cells(r, split, region, ("psnr", "ssim"))
        cells.append(_cell("swd", r["test"]["full"]["swd"]))
        body.append(cells)
    lines += _table(headers, body)
    lines += ["", "Region `face`: render and ground truth both composited under the ground-truth mask (appearance "
              "alone). Val selects checkpoints and design choices; test is read for this report only.", ""]
    lines += ["## Refined protocol (looks at each scored frame: never a headline)", ""]
    lines += _table(
        ["model", "params", "FLOPs / frame", "ms / frame", "test L1", "test PSNR", "test SSIM", "test SWD"],
        [[r["model"], _cell("params", r["params"]), _cell("flops_per_frame", r["flops_per_frame"]),
          _cell("ms_per_frame", r["ms_per_frame"]), *_quality_cells(r, "test", "full", METRICS)] for r in refined],
    )
    lines += ["", "Each frame's expression and head pose (and the GAR's z) are refined by gradient steps against "
              "that frame with the model frozen (PointAvatar's evaluation protocol); `gar_inverted` starts from the "
              "inverse encoder's output. Their per-frame cost is that of the whole refinement.", ""]
    ratio_text = []
    for key, value in report["ratios"].items():
        if value is None:
            ratio_text.append(f"{key} = {MISSING}")
        else:
            ratio_text.append(f"{key} = {value:.4f}" + (f" (1/{1 / value:.1f})" if value > 0 else ""))
    lines.append("Student / teacher: " + ", ".join(ratio_text) + ". The ratios compare the canonical networks "
                 "(parameters; one canonical forward): what a device runs once per avatar, not per frame.")
    if report.get("num_points") is not None:
        lines.append(f"Canonical points: {int(report['num_points']):,}.")
    if report.get("splits"):
        sizes = report["splits"]
        lines.append("Frames: " + ", ".join(f"{k} {sizes[k]}" for k in ("train", "val", "test") if k in sizes)
                     + " (disjoint; test = the last frames of the clip).")
    lines += [
        "",
        "FLOPs: one multiply-add = one flop; per forward = one canonical forward at N = 10,000 points (fvcore); per "
        "frame = the row's per-frame path without the rasterizer. LPIPS: null (no AlexNet weights on disk). "
        f"Training time: wall clock of the stage's `lightning fit`. {MISSING}: no run measured it.",
    ]
    if report.get("deploy"):
        lines += ["", "## Deployment (`python -m benchmarks.deploy`)", "", str(report["deploy"]).rstrip()]
    if report.get("budget"):
        lines += ["", "## Per-frame budget", "", f"`{report['budget']['command']}` (2 threads; ONNX Runtime with the "
                  "tile rasterizer planned as the export plans it; see README, \"Per-frame budget\"):", "",
                  str(report["budget"]["table"]).rstrip()]
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
