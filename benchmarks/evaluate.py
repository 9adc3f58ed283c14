"""``make eval``: the demo pipeline on two subjects, one table per subject and their mean.

Run from the checkout root::

    python -m benchmarks.evaluate [--video VIDEO ...] [--out runs/eval] [--overrides cpu_demo|tiny]
    python -m benchmarks.evaluate --write-readme [README.md]   # fill README's results block from OUT/eval.json

Without ``--video``: the default carphone clip and, when the project's shared data folder is
beside the checkout, ``../shared/data/videos/akiyo_cif.mp4`` (the product itself needs only
carphone). Each subject runs :func:`lightning_modules.demo.run_demo` into ``OUT/<subject>/``
(its own ``report.md``, ``comparison.mp4``, run folders; a clip longer than carphone gets the demo
schedule scaled to the same number of optimizer steps, :func:`lightning_modules.demo.schedule_args`).
Then ``OUT/eval.md`` and ``OUT/eval.json`` hold, for every row of the report (tracked rows first,
refined rows labelled), PSNR / SSIM on val and test in the regions ``full`` and ``face`` and the
test SWD, per subject with its split sizes and time, and the mean over the subjects (a mean only
where every subject has the value). Every number is copied from the subjects' ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
AKIYO = REPO_ROOT / ".." / "shared" / "data" / "videos" / "akiyo_cif.mp4"

#: Columns of the tables: (split, region, metric).
COLUMNS = (
    ("val", "full", "psnr"), ("val", "face", "psnr"),
    ("test", "full", "psnr"), ("test", "full", "ssim"), ("test", "face", "psnr"), ("test", "face", "ssim"),
    ("test", "full", "swd"), ("test", "full", "flicker"),
)
MISSING = "—"

__all__ = [
    "COLUMNS", "default_videos", "format_evaluation", "mean_over_subjects", "readme_block", "run_evaluation",
    "subject_name", "write_readme",
]


def default_videos() -> list[str | None]:
    """The default clip (None) and akiyo where the shared data folder holds it."""
    return [None, *([str(AKIYO)] if AKIYO.is_file() else [])]


def subject_name(video: str | None) -> str:
    """``carphone`` for the default clip, else the video's file stem."""
    return "carphone" if video is None else Path(video).stem


def _value(report: Mapping[str, Any], row: str, column: tuple[str, str, str]) -> float | None:
    split, region, metric = column
    entry = report["rows"].get(row)
    value = None if entry is None else entry[split][region].get(metric)  # reports before a metric lack it
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def mean_over_subjects(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean over subjects of every (row, column) of :data:`COLUMNS`.

    Args:
        reports: subject -> its ``report.json`` (:func:`lightning_modules.report.build_report`).

    Returns:
        row -> ``"<split>/<region>/<metric>"`` -> the mean, or None where a subject lacks the value.
    """
    rows = list(next(iter(reports.values()))["rows"]) if reports else []
    out: dict[str, dict[str, float | None]] = {}
    for row in rows:
        out[row] = {}
        for column in COLUMNS:
            values = [_value(r, row, column) for r in reports.values()]
            out[row]["/".join(column)] = None if any(v is None for v in values) else sum(values) / len(values)
    return out


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return MISSING
    if metric == "flicker":
        return f"{value:+.4f}"
    return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}" if metric == "ssim" else f"{value:.4g}"


def _table(values: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    header = ["row", *(f"{s} {r} {m.upper()}" for s, r, m in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|"]
    for row, cells in values.items():
        label = row if row.endswith("/tracked") else f"{row} (looks at the frame)"
        lines.append("| " + " | ".join([label, *(_fmt(c[2], cells["/".join(c)]) for c in COLUMNS)]) + " |")
    return lines


def format_evaluation(result: Mapping[str, Any]) -> str:
    """``eval.md``: the mean table, then one table per subject with its split sizes and time."""
    reports = result["subjects"]
    lines = ["# avatar-compress evaluation", "",
             f"Subjects: {', '.join(reports)}. Rows `<model>/tracked` render each frame from its tracked codes "
             "(nothing looks at the scored frame: the headline); rows marked \"looks at the frame\" are the refined "
             "protocol (codes fitted to the scored frame, the model frozen). Region `full`: own silhouette on white; "
             "`face`: under the ground-truth mask. Val selects; test is read for this report only.", ""]
    lines += [f"## Mean over {len(reports)} subject(s)", ""] + _table(result["mean"]) + [""]
    for subject, report in reports.items():
        values = {row: {"/".join(c): _value(report, row, c) for c in COLUMNS} for row in report["rows"]}
        splits = report.get("splits") or {}
        lines += [f"## {subject}", "",
                  f"Frames: train {splits.get('train', '?')}, val {splits.get('val', '?')}, test {splits.get('test', '?')}; "
                  f"demo time {result['times_s'][subject]:.0f} s; report: `{result['reports'][subject]}`.", ""]
        from lightning_modules.report import feature_ablation_lines, gar_warnings, verdicts

        warnings = gar_warnings(report)
        lines += [*warnings, ""] if warnings else []
        lines += _table(values) + [""]
        lines += [f"- {line}" for line in verdicts(report)]
        lines += [f"- GAR point features (test, full): {line}" for line in feature_ablation_lines(report)]
        diagnosis = (result.get("diagnosis") or {}).get(subject)
        if diagnosis:
            lines.append(f"- {diagnosis_line(diagnosis)}")
        lines.append("")
    return "\n".join(lines)


def teacher_diagnosis(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """The teacher's fit on its training frames and its test mouth (:mod:`benchmarks.teacher_errors`)
    for the checkpoint a demo selected, or None when the report names none."""
    ckpt = (report.get("selected_checkpoints") or {}).get("teacher")
    if not ckpt:
        return None
    from benchmarks.teacher_errors import main as teacher_errors

    path = Path(ckpt)
    args = ["--run", str(path.parent.parent), "--ckpt", path.stem, "--no-refined"]
    result = teacher_errors(args)
    train = result["splits"].get("train", {})
    mouth = result.get("mouth") or {}
    return {
        "command": "python -m benchmarks.teacher_errors " + " ".join(args),
        "train_full_psnr": train.get("teacher", {}).get("psnr"),
        "train_face_psnr": train.get("teacher", {}).get("psnr_gt_mask"),
        "train_fitted_face_psnr": train.get("teacher_fitted", {}).get("psnr_gt_mask"),
        "mouth_r": mouth.get("pearson_r"),
        "mouth_pairs": mouth.get("pairs"),
        "mouth_target_r": mouth.get("target_r"),
    }


def diagnosis_line(diagnosis: Mapping[str, Any]) -> str:
    """One line of eval.md from :func:`teacher_diagnosis`."""
    def db(value):
        return "n/a" if value is None else f"{value:.2f} dB"

    fitted = diagnosis.get("train_fitted_face_psnr")
    r = diagnosis.get("mouth_r")
    return (f"teacher on its training frames: face {db(diagnosis.get('train_face_psnr'))}, full "
            f"{db(diagnosis.get('train_full_psnr'))}" + (f" (fitted codes: face {db(fitted)})" if fitted is not None else "")
            + f"; test mouth-opening r {'n/a' if r is None else f'{r:.2f}'} over {diagnosis.get('mouth_pairs') or 0} "
            f"frames (target >= {diagnosis.get('mouth_target_r') or 0.6}); `{diagnosis['command']}`.")


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def readme_block(result: Mapping[str, Any]) -> str:
    """The README's results block (between :data:`README_BEGIN` and :data:`README_END`): the tables
    of :func:`format_evaluation` without its title, headed by the command that made them."""
    body = format_evaluation(result).split("\n", 2)[2].strip()
    body = "\n".join(f"#{line}" if line.startswith("## ") else line for line in body.splitlines())  # under ## Results
    return (f"{README_BEGIN}\n<!-- generated by `python -m benchmarks.evaluate --write-readme`"
            f" from {result.get('out', 'runs/eval')}/eval.json; do not edit by hand -->\n\n{body}\n\n{README_END}")


def write_readme(readme: str | Path, result: Mapping[str, Any]) -> Path:
    """Replace the results block of ``readme`` by :func:`readme_block` (the rest untouched).

    Raises:
        ValueError: the file has no ``<!-- results:begin -->`` ... ``<!-- results:end -->`` block.
    """
    path = Path(readme)
    text = path.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} block to fill")
    path.write_text(text[:start] + readme_block(result) + text[end + len(README_END):])
    return path


def run_evaluation(
    videos: Sequence[str | None],
    out: str | Path = "runs/eval",
    overrides: str = "cpu_demo",
    run: Callable[..., dict] | None = None,
    log: Callable[[str], Any] | None = None,
    diagnose: Callable[[Mapping[str, Any]], dict | None] | None = None,
    reuse: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the demo on each video and write ``OUT/eval.md`` and ``OUT/eval.json``.

    Args:
        videos: the clips (None: the default carphone clip); their subject names must differ.
        out: the folder of the subjects' demo folders and of the tables.
        overrides: the demo's override set.
        run: the demo function (default :func:`lightning_modules.demo.run_demo`; tests pass a stand-in).
        log: progress lines (default: print).
        diagnose: report -> the teacher's diagnosis (default :func:`teacher_diagnosis`).
        reuse: fits each subject's demo takes from its previous demo in ``OUT/<subject>``
            (:func:`lightning_modules.demo.run_demo`); with the teacher reused, its diagnosis is
            taken from the previous ``OUT/eval.json`` where it holds one.

    Returns:
        ``{"subjects": {subject: report}, "mean": ..., "times_s": {subject: s}, "reports": {subject: path},
        "diagnosis": {subject: dict or None}}``.

    Raises:
        ValueError: no video, or two videos with the same subject name.
    """
    from lightning_modules.demo import run_demo

    run = run or run_demo
    log = log or (lambda line: print(line, flush=True))
    names = [subject_name(v) for v in videos]
    if not names:
        raise ValueError("evaluate needs at least one video")
    if len(set(names)) != len(names):
        raise ValueError(f"two videos share a subject name: {names}")
    out = Path(out)
    diagnose = diagnose or teacher_diagnosis
    reports, times, paths, diagnoses = {}, {}, {}, {}
    previous = {}
    if "teacher" in reuse and (out / "eval.json").is_file():
        previous = json.loads((out / "eval.json").read_text()).get("diagnosis") or {}
    for name, video in zip(names, videos):
        log(f"\n#### evaluate: subject {name} ({video or 'the default carphone clip'})")
        start = time.perf_counter()
        reports[name] = run(out / name, video=video, overrides=overrides, **({"reuse": reuse} if reuse else {}))
        times[name] = time.perf_counter() - start
        paths[name] = str(out / name / "report.md")
        diagnoses[name] = previous.get(name) or diagnose(reports[name])
    result = {"subjects": reports, "mean": mean_over_subjects(reports), "times_s": times, "reports": paths,
              "diagnosis": diagnoses, "out": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    (out / "eval.md").write_text(format_evaluation(result))
    log(format_evaluation(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", action="append", default=None,
                        help="a clip to evaluate (repeatable; default: carphone, and akiyo when ../shared holds it)")
    parser.add_argument("--out", default="runs/eval", help="folder of the subjects' demos and of eval.md/eval.json")
    parser.add_argument("--overrides", default="cpu_demo", choices=("cpu_demo", "tiny"))
    parser.add_argument("--reuse", default="", metavar="FITS",
                        help="comma-separated fits each subject takes from its previous demo in OUT, e.g. "
                             "teacher,distill (retrain and re-evaluate the GARs only)")
    parser.add_argument("--write-readme", nargs="?", const="README.md", default=None, metavar="README",
                        help="run nothing: fill README's results block from OUT/eval.json (maintainers)")
    args = parser.parse_args(argv)
    if args.write_readme is not None:
        source = Path(args.out) / "eval.json"
        if not source.is_file():
            print(f"evaluate: error: {source} does not exist: run `make eval` first", file=sys.stderr)
            return 2
        try:
            print(write_readme(args.write_readme, json.loads(source.read_text())))
        except ValueError as err:
            print(f"evaluate: error: {err}", file=sys.stderr)
            return 2
        return 0
    videos = args.video if args.video else default_videos()
    for video in videos:
        if video is not None and not Path(video).is_file():
            print(f"evaluate: error: video {video} does not exist", file=sys.stderr)
            return 2
    try:
        run_evaluation(videos, args.out, args.overrides, reuse=[s for s in args.reuse.split(",") if s])
    except ValueError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
