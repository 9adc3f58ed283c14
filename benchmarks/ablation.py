"""``make ablation``: the paper's ablation of the student, on one teacher, in one table.

Run from the checkout root::

    python -m benchmarks.ablation [--teacher CKPT] [--out runs/ablation] [--overrides cpu_demo|tiny]
                                  [--variants full,randla_only,...] [--video VIDEO]
    python -m benchmarks.ablation --write-readme [README.md]   # fill README's ablation block from OUT/ablation.json

Each variant (:data:`VARIANTS`) is a distillation of the same teacher (default: the teacher
``make demo`` selected, from ``runs/demo/report.json``; else ``runs/teacher/latest``) with the
demo's schedule (``--overrides``), then ``lightning validate`` and ``lightning test`` of its
checkpoint selected on val (``best.ckpt``). The table has, per student: parameters and
multiply-adds of the canonical forward at N = 10,000 (``flops/student``), the one-off milliseconds
of the canonical forward on the subject's cloud (its kNN graph built inside the timing), the
per-frame milliseconds (deform, shade, rasterize; canonical outputs cached), and val and test
PSNR / SSIM / SWD (``tracked``; ``full`` and ``face``). The first row is the reference a device
could ship instead of any student: the teacher's per-point output table (0 FLOPs; its size is the
table's floats; its quality is the teacher's render), from the same runs.

Every number is read from the runs' ``metrics.json`` but the one-off time, measured here on the
selected checkpoint. ``OUT/ablation.{md,json}`` hold the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

#: variant -> (what it changes, distillation flags). ``{student}`` is replaced by the config's student
#: with the variant's branches.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("RandLA ⊕ GCN, all losses (the paper's)", []),
    "randla_only": ("RandLA-Net branch only", ["branches=randla"]),
    "gcn_only": ("GCN (EdgeConv) branch only", ["branches=gcn"]),
    "no_graph": ("without L_graph (assisted supervision)", ["--model.init_args.loss_weights.graph=0"]),
    "no_feature_kd": ("without L_feat (feature KD)", ["--model.init_args.loss_weights.feat=0"]),
    "gt_only": ("no teacher signal: ground-truth images only",
                ["--model.init_args.loss_weights.out=0", "--model.init_args.loss_weights.feat=0",
                 "--model.init_args.loss_weights.graph=0", "--model.init_args.warmup_steps=0"]),
}
#: The metric columns: (split, region, metric).
COLUMNS = tuple((split, region, metric) for split in ("val", "test") for region in ("full", "face")
                for metric in ("psnr", "ssim", "swd"))
MISSING = "—"
README_BEGIN, README_END = "<!-- ablation:begin -->", "<!-- ablation:end -->"

__all__ = ["VARIANTS", "ablation_table", "default_teacher", "format_ablation", "run_ablation", "teacher_table_size",
           "variant_args", "write_readme"]


def default_teacher(root: str | Path = ".") -> Path:
    """The teacher ``make demo`` selected (``runs/demo/report.json``), else ``runs/teacher/latest``'s last.ckpt.

    Raises:
        FileNotFoundError: neither exists (one line: run ``make demo`` or pass ``--teacher``).
    """
    root = Path(root)
    report = root / "runs" / "demo" / "report.json"
    if report.is_file():
        selected = (json.loads(report.read_text()).get("selected_checkpoints") or {}).get("teacher")
        if selected and (root / selected).is_file():
            return root / selected
    latest = root / "runs" / "teacher" / "latest" / "checkpoints" / "last.ckpt"
    if latest.is_file():
        return latest
    raise FileNotFoundError("no teacher to ablate on: run `make demo` first, or pass --teacher CKPT")


def _student_spec() -> dict[str, Any]:
    """experiments/distill.yaml's student entry (class path and init args)."""
    config = yaml.safe_load((REPO_ROOT / "experiments" / "distill.yaml").read_text())
    return config["model"]["init_args"]["student"]


def variant_args(variant: str) -> list[str]:
    """The distillation flags of ``variant`` (a branch choice becomes the whole student entry).

    Raises:
        ValueError: an unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")
    args = []
    for flag in VARIANTS[variant][1]:
        if flag.startswith("branches="):
            spec = _student_spec()
            spec["init_args"] = {**spec.get("init_args", {}), "branches": flag.split("=", 1)[1].split(",")}
            args.append(f"--model.init_args.student={json.dumps(spec)}")
        else:
            args.append(flag)
    return args


def _metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def one_off_ms(student_ckpt: Path) -> float:
    """Milliseconds of the canonical forward on the subject's cloud, its kNN graph built inside (2 threads)."""
    import torch

    from lightning_modules.handoff import load_student
    from lightning_modules.metrics import time_per_frame

    student = load_student(student_ckpt).eval()
    with torch.no_grad():
        return time_per_frame(canonical_forward(student))


def canonical_forward(student) -> Callable[[], Any]:
    """The student's canonical forward on its own cloud, its kNN graph built inside (what one-off ms times)."""
    def once():
        module, inputs = student.flop_forward(student.points)
        return module(*inputs)

    return once


def retime(result: dict[str, Any], repeats: int = 5, threads: int = 2,
           log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Measure every row's one-off and per-frame milliseconds again, side by side in one process.

    The fits time themselves one after the other, each beside whatever else ran then; here every
    student's canonical forward (its kNN graph built inside) and its per-frame path
    (:class:`models.renderer.PointFrame` on the first test frame, canonical outputs cached; the
    teacher table's too) are timed in turns, ``repeats`` rounds, medians kept. Updates ``result``'s
    ``one_off_ms`` and ``ms_per_frame`` and records how (``timing``).
    """
    import statistics

    import torch

    from lightning_modules.demo import selected_checkpoint
    from lightning_modules.handoff import datamodule_from_config, load_student, load_teacher
    from lightning_modules.metrics import time_per_frame
    from models.renderer import PointFrame

    torch.set_num_threads(threads)
    runs = result["runs"]
    first = next(iter(runs.values()))
    datamodule = datamodule_from_config(Path(first["fit"]) / "config.yaml")
    datamodule.prepare_data()
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader())).head(1)
    size = int(batch.image.shape[-1])

    def frame_of(model, canonical) -> PointFrame:
        return PointFrame.from_canonical(canonical, model.radius, model.shading, size).eval()

    timers: dict[str, dict[str, Callable[[], Any]]] = {}
    teacher, _ = load_teacher(result["teacher"])
    with torch.no_grad():
        teacher_frame = frame_of(teacher, teacher.canonical(method="explicit"))
    timers["teacher_table"] = {"ms_per_frame": lambda: teacher_frame(batch.expression, batch.world_mat, batch.K)}
    for variant, dirs in runs.items():
        student = load_student(selected_checkpoint(Path(dirs["fit"]))).eval()
        with torch.no_grad():
            student_frame = frame_of(student, student.canonical())

        timers[variant] = {"one_off_ms": canonical_forward(student),
                           "ms_per_frame": lambda f=student_frame: f(batch.expression, batch.world_mat, batch.K)}
    samples: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        for round_ in range(repeats):
            for name, fns in timers.items():
                for key, fn in fns.items():
                    samples.setdefault((name, key), []).append(time_per_frame(fn))
            log(f"[ablation] retime: round {round_ + 1}/{repeats}")
    for (name, key), values in samples.items():
        result["rows"][name][key] = statistics.median(values)
    result["timing"] = (f"one-off and per-frame ms timed side by side by `python -m benchmarks.ablation --retime` "
                        f"({threads} threads, median of {repeats} rounds, the first test frame at {size}x{size})")
    return result


def _row(fit: Mapping[str, Any], val: Mapping[str, Any], test: Mapping[str, Any], model: str) -> dict[str, Any]:
    row = {"params": fit.get(f"params/{model}"), "flops": fit.get(f"flops/{model}"),
           "ms_per_frame": test.get(f"ms_per_frame/{model}/tracked")}
    for split, region, metric in COLUMNS:
        source = val if split == "val" else test
        row[f"{split}/{region}/{metric}"] = source.get(f"{model}/tracked/{split}/{region}/{metric}")
    return row


def teacher_table_size(teacher_ckpt: str | Path) -> int:
    """Numbers a device holds to render the teacher without its canonical network: per point albedo,
    normal and offset (3 each) and E x 3 blendshapes, plus the shading MLP it still runs per frame."""
    from lightning_modules.handoff import load_teacher

    teacher, _ = load_teacher(teacher_ckpt)
    return teacher.num_active * (9 + 3 * teacher.expression_dim) + sum(p.numel() for p in teacher.shading.parameters())


def ablation_table(runs: Mapping[str, Mapping[str, Path]], one_off: Mapping[str, float],
                   table_size: int | None = None) -> dict[str, Any]:
    """The table from the variants' run folders (``{variant: {"fit", "val", "test"}: dir}``), their
    one-off ms and the teacher table's size (:func:`teacher_table_size`).

    Returns:
        ``{"rows": {name: {...}}, "runs": ...}`` with ``teacher_table`` first (its metrics: the
        teacher's render in the first variant's runs).
    """
    rows: dict[str, dict[str, Any]] = {}
    first = next(iter(runs.values()))
    fit, val, test = (_metrics(first[k]) for k in ("fit", "val", "test"))
    teacher = _row(fit, val, test, "teacher")
    teacher.update(params=table_size, flops=0, one_off_ms=0.0)
    rows["teacher_table"] = {"what": "the teacher's per-point outputs, cached (0 FLOPs; params: the table "
                                     "and the shading MLP)", **teacher}
    for variant, dirs in runs.items():
        fit, val, test = (_metrics(dirs[k]) for k in ("fit", "val", "test"))
        rows[variant] = {"what": VARIANTS[variant][0], **_row(fit, val, test, "student"),
                         "one_off_ms": one_off.get(variant)}
    return {"rows": rows, "runs": {v: {k: str(p) for k, p in d.items()} for v, d in runs.items()}}


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return MISSING
    if key == "params":
        return f"{int(value):,}"
    if key == "flops":
        return f"{value / 1e6:.1f} M" if value else "0"
    if key.endswith("ms") or key == "ms_per_frame":
        return f"{value:.1f}"
    return f"{value:.4f}" if key.endswith("swd") or key.endswith("ssim") else f"{value:.2f}"


def format_ablation(result: Mapping[str, Any]) -> str:
    """Markdown: one row per student (and the teacher table), the columns of the module docstring."""
    keys = ["params", "flops", "one_off_ms", "ms_per_frame", *(f"{s}/{r}/{m}" for s, r, m in COLUMNS)]
    heads = ["params", "MACs (N=10k)", "one-off ms", "ms/frame",
             *(f"{s} {r} {m.upper()}" for s, r, m in COLUMNS)]
    lines = [f"# Student ablation ({result.get('description', '')})", "",
             "| student | what | " + " | ".join(heads) + " |",
             "|---|---|" + "---:|" * len(heads)]
    for name, row in result["rows"].items():
        lines.append(f"| `{name}` | {row['what']} | " + " | ".join(_fmt(k, row.get(k)) for k in keys) + " |")
    lines += ["", f"Command: `{result.get('command', 'python -m benchmarks.ablation')}`. Rows `tracked` "
              "(nothing looks at the scored frame); checkpoints selected on val; test read for this table only."
              + (f" Milliseconds: {result['timing']}." if result.get("timing") else "")]
    return "\n".join(lines) + "\n"


def write_readme(readme: str | Path, result: Mapping[str, Any]) -> Path:
    """Replace README's ablation block (``<!-- ablation:begin -->`` ... ``<!-- ablation:end -->``).

    Raises:
        ValueError: the file has no such block.
    """
    path = Path(readme)
    text = path.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} block to fill")
    body = format_ablation(result).split("\n", 2)[2].strip()
    block = (f"{README_BEGIN}\n<!-- generated by `python -m benchmarks.ablation --write-readme` from "
             f"{result.get('out', 'runs/ablation')}/ablation.json; do not edit by hand -->\n\n"
             f"{result.get('description', '')}\n\n{body}\n\n{README_END}")
    path.write_text(text[:start] + block + text[end + len(README_END):])
    return path


def run_ablation(
    teacher: str | Path,
    variants: Sequence[str] = tuple(VARIANTS),
    out: str | Path = "runs/ablation",
    overrides: str = "cpu_demo",
    video: str | None = None,
    run: Callable[[list[str]], Any] | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Distil, validate and test every variant on ``teacher``; write ``OUT/ablation.{md,json}``.

    Args:
        teacher: the teacher checkpoint all students learn from.
        variants: names from :data:`VARIANTS`.
        out: runs land in ``OUT/distill/<variant>[-val|-test]``.
        overrides: the demo's override set (``cpu_demo`` or ``tiny``).
        video: the subject's video (None: the default clip).
        run: runs one ``lightning`` command (default: in a subprocess, as the demo does).

    Raises:
        ValueError: an unknown variant. DemoError: a stage that failed.
    """
    from lightning_modules.demo import _run_subprocess, selected_checkpoint, stage_args

    for variant in variants:
        variant_args(variant)  # unknown names fail before anything runs
    run = run or _run_subprocess
    out = Path(out)
    start_all = time.perf_counter()
    runs: dict[str, dict[str, Path]] = {}
    one_off: dict[str, float] = {}
    for variant in variants:
        start = time.perf_counter()
        fit = stage_args("fit", "distill", overrides, out, variant, upstream_ckpt=teacher, video=video)
        log(f"[ablation] {variant}: lightning {' '.join(fit)} {' '.join(variant_args(variant))}")
        run([*fit, *variant_args(variant)])
        fit_dir = out / "distill" / variant
        selected = selected_checkpoint(fit_dir)
        dirs = {"fit": fit_dir}
        for subcommand, suffix in (("validate", "val"), ("test", "test")):
            run([*stage_args(subcommand, "distill", overrides, out, f"{variant}-{suffix}", upstream_ckpt=teacher,
                             ckpt_path=selected, video=video), *variant_args(variant)])
            dirs[suffix] = out / "distill" / f"{variant}-{suffix}"
        runs[variant] = dirs
        one_off[variant] = one_off_ms(selected)
        log(f"[ablation] {variant}: {time.perf_counter() - start:.0f} s")
    result = ablation_table(runs, one_off, teacher_table_size(teacher))
    result.update(
        out=str(out), teacher=str(teacher), overrides=overrides,
        command="python -m benchmarks.ablation " + " ".join(sys.argv[1:]),
        description=f"teacher `{teacher}`, {Path(video).name if video else 'carphone'}, overrides `{overrides}`, "
                    f"{time.perf_counter() - start_all:.0f} s",
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ablation.md").write_text(format_ablation(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: the demo's selected teacher)")
    parser.add_argument("--out", default="runs/ablation", help="the folder of the runs and the table")
    parser.add_argument("--overrides", default="cpu_demo", choices=("cpu_demo", "tiny"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--video", default=None, help="the subject's video (default: the demo's clip)")
    parser.add_argument("--write-readme", nargs="?", const="README.md", default=None, metavar="README",
                        help="run nothing: fill README's ablation block from OUT/ablation.json")
    parser.add_argument("--retime", action="store_true",
                        help="fit nothing: time every row of OUT/ablation.json again, side by side, and rewrite it")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.retime:
        source = out / "ablation.json"
        if not source.is_file():
            parser.error(f"{source} does not exist: run `python -m benchmarks.ablation --out {out}` first")
        result = retime(json.loads(source.read_text()))
        source.write_text(json.dumps(result, indent=2) + "\n")
        (out / "ablation.md").write_text(format_ablation(result))
        print(format_ablation(result))
        return 0
    if args.write_readme:
        source = out / "ablation.json"
        if not source.is_file():
            parser.error(f"{source} does not exist: run `python -m benchmarks.ablation --out {out}` first")
        print(write_readme(args.write_readme, json.loads(source.read_text())))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    try:
        teacher = Path(args.teacher) if args.teacher else default_teacher()
    except FileNotFoundError as err:
        parser.error(str(err))
    if not teacher.is_file():
        parser.error(f"no teacher checkpoint at {teacher}")
    result = run_ablation(teacher, variants, out, args.overrides, args.video)
    print(format_ablation(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
