"""The demo pipeline end to end at tiny scale (the tiny-mesh override instead of cpu_demo), and its report.

The end-to-end tests are marked slow: the in-process tiny demo (6 runs + render) took 69-79 s on
2 shared, oversubscribed cores; the report, argument and error tests are fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

SCALE = 1
TINY_SIZE = 32  # image_size of experiments/overrides/tiny_mesh.yaml


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One in-process tiny demo in a fresh working folder: (folder, report, progress lines)."""
    from lightning_modules.demo import run_demo

    cwd = tmp_path_factory.mktemp("demo_checkout")
    saved = os.getcwd()
    os.chdir(cwd)
    lines: list[str] = []
    try:
        report = run_demo("runs/demo", overrides="tiny", in_process=True, scale=SCALE, log=lines.append)
    finally:
        os.chdir(saved)
    return cwd, report, lines


def _metrics(cwd, report, label):
    """A run's metrics.json as the report reads it (the device-size GAR's ``gar`` keys as ``gar_device``)."""
    from lightning_modules.report import renamed_metrics

    return renamed_metrics(label, json.loads((cwd / report["runs"][label] / "metrics.json").read_text()))


@pytest.mark.slow
def test_demo_report_matches_the_runs(demo):
    cwd, report, lines = demo
    out = cwd / "runs" / "demo"
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report["runs"]) == {f"{s}_{k}" for s in ("teacher", "distill", "gar", "gar_device")
                                   for k in ("fit", "val", "test")}
    # the checkpoints the evaluations read were selected on val
    assert all(path.endswith("best.ckpt") for path in report["selected_checkpoints"].values())
    assert report["splits"] == {"train": 4, "val": 2, "test": 2}

    # every value equals the metrics.json entry of the run it names as its source
    cost_keys = {"params": "params/{m}", "flops": "flops/{m}", "flops_per_frame": "flops_per_frame/{m}/{p}",
                 "ms_per_frame": "ms_per_frame/{m}/{p}"}
    checked = 0
    for rid, row in report["rows"].items():
        model, protocol = row["model"], row["protocol"]
        sources = report["sources"].get(rid, {})
        for field, key in cost_keys.items():
            if row[field] is None:
                assert field not in sources
                continue
            assert row[field] == _metrics(cwd, report, sources[field])[key.format(m=model, p=protocol)], (rid, field)
            checked += 1
        for split in ("val", "test"):
            for region in ("full", "face"):
                for metric, value in row[split][region].items():
                    if value is None:
                        continue
                    source = sources[f"{split}/{region}/{metric}"]
                    assert source.endswith(f"_{split}"), (rid, split, source)  # val from validate, test from test
                    assert value == _metrics(cwd, report, source)[f"{model}/{protocol}/{split}/{region}/{metric}"]
                    checked += 1
    assert checked >= 180  # costs and quality figures of 12 rows, both splits and regions

    # and the values the issue names, from the runs that make them
    distill_fit, distill_test = _metrics(cwd, report, "distill_fit"), _metrics(cwd, report, "distill_test")
    gar_test, teacher_test = _metrics(cwd, report, "gar_test"), _metrics(cwd, report, "teacher_test")
    rows = report["rows"]
    for model in ("teacher", "student"):
        assert rows[f"{model}/tracked"]["flops"] == distill_fit[f"flops/{model}"] > 0
        assert rows[f"{model}/tracked"]["flops_per_frame"] == distill_fit[f"flops_per_frame/{model}/tracked"] > 0
        assert rows[f"{model}/tracked"]["params"] == distill_fit[f"params/{model}"] > 0
    assert rows["teacher/tracked"]["ms_per_frame"] == teacher_test["ms_per_frame/teacher/tracked"] > 0
    assert rows["student/tracked"]["ms_per_frame"] == distill_test["ms_per_frame/student/tracked"] > 0
    assert report["ratios"] == {"params_ratio": distill_fit["params_ratio"], "flops_ratio": distill_fit["flops_ratio"]}
    assert 0 < report["ratios"]["params_ratio"] < 1
    for metric in ("l1", "psnr", "ssim"):
        for region in ("full", "face"):
            def test(r, region=region, metric=metric):
                return rows[r]["test"][region][metric]

            assert test("teacher/tracked") == teacher_test[f"teacher/tracked/test/{region}/{metric}"]
            assert test("teacher/refined") == teacher_test[f"teacher/refined/test/{region}/{metric}"]
            for baseline in ("baseline_mean", "baseline_nearest"):
                assert test(f"{baseline}/tracked") == teacher_test[f"{baseline}/tracked/test/{region}/{metric}"]
            assert test("student/tracked") == distill_test[f"student/tracked/test/{region}/{metric}"]
            assert test("student/refined") == distill_test[f"student/refined/test/{region}/{metric}"]
    for rid in ("gar/tracked", "gar/refined", "gar_inverted/refined"):
        model, protocol = rid.split("/")
        assert rows[rid]["test"]["full"]["swd"] == gar_test[f"{model}/{protocol}/test/full/swd"] >= 0
        assert rows[rid]["test"]["full"]["psnr"] == gar_test[f"{model}/{protocol}/test/full/psnr"]
        assert rows[rid]["ms_per_frame"] == gar_test[f"ms_per_frame/{model}/{protocol}"] > 0
    assert rows["gar_inverted/refined"]["params"] > rows["gar/tracked"]["params"] > 0  # G + E against G
    # the device-size G: its own fit on the same student, fewer parameters and multiply-adds per frame
    device_test = json.loads((cwd / report["runs"]["gar_device_test"] / "metrics.json").read_text())
    device = rows["gar_device/tracked"]
    assert device["test"]["full"]["psnr"] == device_test["gar/tracked/test/full/psnr"]
    assert 0 < device["params"] == device_test["params/gar"] < rows["gar/tracked"]["params"]
    assert 0 < device["flops_per_frame"] < rows["gar/tracked"]["flops_per_frame"]
    assert device["training_time_s"] == report["timings_s"]["gar_device_fit"] > 0
    for model in ("student", "gar", "gar_device"):  # the tiny head's views are no sequence: no flicker figure
        assert rows[f"{model}/tracked"]["test"]["full"]["flicker"] is None, model
    for model in ("gar_zero_features", "gar_shuffled_features"):
        assert rows[f"{model}/tracked"]["test"]["full"]["psnr"] == gar_test[f"{model}/tracked/test/full/psnr"]

    # training time: measured around each fit; nothing for the baselines, nothing invented
    times = report["timings_s"]
    assert rows["teacher/tracked"]["training_time_s"] == times["teacher_fit"] > 0
    assert rows["student/tracked"]["training_time_s"] == times["distill_fit"] > 0
    assert rows["gar/tracked"]["training_time_s"] == times["gar_fit"] > 0
    assert rows["baseline_mean/tracked"]["training_time_s"] is None
    # no run counts the GAR's canonical FLOPs: null, "—" in Markdown; the distillation scores the teacher's SWD
    assert rows["gar/tracked"]["flops"] is None
    teacher_swd = rows["teacher/tracked"]["test"]["full"]["swd"]
    assert teacher_swd == _metrics(cwd, report, report["sources"]["teacher/tracked"]["test/full/swd"])[
        "teacher/tracked/test/full/swd"] >= 0

    md = (out / "report.md").read_text()
    headline = md.split("## Test frames, tracked codes")[1].split("\n## ")[0]
    table = [line for line in headline.splitlines() if line.startswith("| ")]
    tracked = [rid.split("/")[0] for rid in rows if rid.endswith("/tracked") and "_features" not in rid]
    assert [line.split("|")[1].strip() for line in table[1:]] == tracked  # the headline: tracked rows only
    teacher_row = table[3].split("|")
    assert teacher_row[2].strip() == f"{rows['teacher/tracked']['params']:,}"
    assert teacher_row[8].strip() == f"{rows['teacher/tracked']['test']['full']['psnr']:.2f}"
    assert "gar_inverted" not in headline and "gar_inverted" in md.split("## Refined protocol")[1]
    assert "gar_zero_features" in md.split("## Does G use the point features?")[1]
    assert f"params_ratio = {report['ratios']['params_ratio']:.4f}" in md
    assert "## Deployment" in md
    # progress was shown, stage by stage
    assert sum(line.startswith("\n==> demo [") for line in lines) == 15  # 12 fits and evaluations, render, budget, report
    # nothing written but runs/ (the tiny head is generated: no data/)
    assert sorted(p.name for p in cwd.iterdir()) == ["runs"]


@pytest.mark.slow
def test_demo_comparison_video_and_loss_plot(demo):
    import imageio.v3 as iio

    from datamodules.mesh_views import MeshViewsDataModule
    from lightning_modules.demo import LABEL_HEIGHT

    cwd, report, _ = demo
    out = cwd / "runs" / "demo"
    test_frames = len(MeshViewsDataModule(num_views=8, image_size=TINY_SIZE).split_indices("test"))
    video = out / report["comparison"]["path"]
    assert video.is_file()
    if video.suffix == ".mp4":
        frames = iio.imread(video, index=None, plugin="FFMPEG")
    else:  # the GIF fallback (no ffmpeg): palette frames, RGB(A)
        frames = iio.imread(video, index=None)[..., :3]
    assert report["comparison"]["frames"] == test_frames == frames.shape[0] == 2
    panel = TINY_SIZE * SCALE
    assert frames.shape[1:] == (LABEL_HEIGHT + panel, 4 * panel, 3)
    # the ground-truth panel is the test frame composited on white: mostly white, not all
    gt = frames[0, LABEL_HEIGHT:, :panel].astype(np.float64) / 255
    assert 0.3 < (gt > 0.9).all(-1).mean() < 0.99

    plot = iio.imread(out / report["loss_plot"])
    assert plot.ndim == 3 and plot.shape[0] > 100 and plot.shape[1] > 300


@pytest.mark.slow
def test_demo_report_carries_the_per_frame_budget_of_its_own_runs(demo):
    """The budget (benchmarks.bench_budget on the demo's two GAR fits) is in report.json and report.md."""
    cwd, report, _ = demo
    budget = report["budget"]
    assert f"--run-dir {report['runs']['gar_fit']}" in budget["command"]
    assert f"--device-run-dir {report['runs']['gar_device_fit']}" in budget["command"]
    rows = budget["rows"]
    assert [r["model"] for r in rows] == ["teacher", "student", "student+gar", "student+gar_device"] * 2  # two clouds
    assert all(r["rasterizer"] == "tiles" and r["ort_ms"] > 0 and r["torch_ms"] > 0 and r["size"] == TINY_SIZE
               for r in rows)
    assert rows[0]["cloud"].startswith("demo avatar") and rows[-1]["cloud"].startswith("300 points")
    assert rows[3]["tile_capacity"] and len(rows[3]["tile_capacity"]) == 1  # the device G rasterizes once
    md = (cwd / "runs" / "demo" / "report.md").read_text()
    assert "## Per-frame budget" in md and budget["table"].strip() in md


def test_report_of_partial_runs_shows_missing_values(tmp_path):
    from lightning_modules.report import build_report, format_markdown

    run = tmp_path / "distill_test"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({
        "student/tracked/test/full/psnr": 21.5, "student/tracked/test/full/ssim": None,
        "params/student": 1234, "params_ratio": 0.02,
    }))
    report = build_report({"distill_test": run}, training_time_s={"distill_fit": 12.0})
    student = report["rows"]["student/tracked"]
    assert student["test"]["full"]["psnr"] == 21.5
    assert student["test"]["full"]["ssim"] is None  # null stays null
    assert student["training_time_s"] == 12.0
    assert report["rows"]["teacher/tracked"]["params"] is None
    assert report["ratios"] == {"params_ratio": 0.02, "flops_ratio": None}
    md = format_markdown(report)
    assert "| student | 1,234 | — | — | — | 12.0 s | — | 21.50 | — | — | — |" in md
    assert "flops_ratio = —" in md
    with pytest.raises(ValueError, match="unknown run label"):
        build_report({"student_fit": run})
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        build_report({"gar_test": tmp_path / "nowhere"})


def test_report_says_which_model_does_not_beat_the_baselines(tmp_path):
    from lightning_modules.report import build_report, format_markdown, verdicts

    run = tmp_path / "distill_test"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({
        "baseline_mean/tracked/test/full/psnr": 20.0, "baseline_nearest/tracked/test/full/psnr": 22.0,
        "teacher/tracked/test/full/psnr": 23.0, "student/tracked/test/full/psnr": 21.0,
    }))
    report = build_report({"distill_test": run})
    assert verdicts(report) == [
        "teacher (23.00 dB) beats both baselines.",
        "student (21.00 dB) does NOT beat baseline_nearest (22.00); it beats baseline_mean.",
    ]
    assert "student (21.00 dB) does NOT beat baseline_nearest" in format_markdown(report)


def test_stage_args_pass_the_upstream_checkpoint():
    from lightning_modules.demo import stage_args

    args = stage_args("fit", "distill", "cpu_demo", "runs/demo", "ID", upstream_ckpt="t/last.ckpt", video="v.mp4")
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert [os.path.basename(c) for c in configs] == ["distill.yaml", "cpu_demo_distill.yaml"]
    assert "--model.init_args.teacher_ckpt=t/last.ckpt" in args and "--data.init_args.video=v.mp4" in args
    assert args[-4:] == ["--runs_root", "runs/demo", "--run_name", "ID"]
    with pytest.raises(ValueError, match="upstream checkpoint"):
        stage_args("fit", "gar", "tiny", "runs", "ID")
    with pytest.raises(ValueError, match="unknown overrides"):
        stage_args("fit", "teacher", "huge", "runs", "ID")


def test_demo_command_line_errors(tmp_path, capsys):
    from lightning_modules.demo import main

    assert main(["--video", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("demo: error: video") and "missing.mp4" in err and "\n" not in err
    assert main(["--video", str(tmp_path / "missing.mp4"), "--overrides", "tiny"]) == 1
    assert "cpu_demo" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_subprocesses_tiny(tmp_path):
    """What `make demo` runs (one process per stage), at tiny scale."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_modules.demo", "--overrides", "tiny", "--out", "runs/demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "demo" / "report.json").read_text())
    assert report["rows"]["student/tracked"]["test"]["full"]["psnr"] > 0 and report["ratios"]["flops_ratio"] > 0
    assert (tmp_path / "runs" / "demo" / report["comparison"]["path"]).is_file()
    assert (tmp_path / "runs" / "demo" / "losses.png").is_file()
    assert "demo [15/15] report" in proc.stdout


def test_durations_round_to_whole_seconds_without_60():
    from lightning_modules.demo import _duration

    assert _duration(599.6) == "10 min 00 s" and _duration(61.0) == "1 min 01 s" and _duration(59.4) == "59.4 s"


def test_a_longer_clip_gets_the_demo_schedule_scaled_to_the_same_steps():
    from lightning_modules.demo import REFERENCE_TRAIN_FRAMES, schedule_args

    assert schedule_args("teacher", "cpu_demo", REFERENCE_TRAIN_FRAMES) == []  # carphone: as written
    assert schedule_args("teacher", "tiny", 1000) == []
    # akiyo: 210 training frames, 0.4 of the epochs (36 -> 14, validation every 6 -> 2, growth every 3 -> 1)
    assert schedule_args("teacher", "cpu_demo", 210) == [
        "--trainer.max_epochs=14", "--trainer.check_val_every_n_epoch=2",
        "--model.init_args.grow_every_epochs=1", "--model.init_args.lr_milestones=[10, 12]",
    ]
    assert schedule_args("gar", "cpu_demo", 210) == ["--trainer.max_epochs=4", "--trainer.check_val_every_n_epoch=2"]


def _write_metrics(folder, values):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(values))
    return folder


def test_report_opens_with_a_failed_gar_and_reads_the_device_gar_as_its_own_row(tmp_path):
    """A GAR under its student on val, or a fit whose guard fired, is the report's first line; the
    device-size GAR's run (``gar/...`` keys) fills the ``gar_device`` row; the feature ablation
    says whether the real features win by 1 dB."""
    from lightning_modules.report import build_report, feature_ablation_lines, format_markdown, gar_warnings

    gar = _write_metrics(tmp_path / "gar_val", {
        "student/tracked/val/full/psnr": 21.0, "gar/tracked/val/full/psnr": 22.0,
        "gar/tracked/test/full/psnr": 22.5, "gar_zero_features/tracked/test/full/psnr": 21.0,
        "gar_shuffled_features/tracked/test/full/psnr": 22.0})
    device = _write_metrics(tmp_path / "gar_device_val", {
        "student/tracked/val/full/psnr": 99.0,  # the student's row belongs to the other runs: ignored
        "gar/tracked/val/full/psnr": 19.5, "params/gar": 100, "ms_per_frame/gar/tracked": 3.0})
    report = build_report({"gar_val": gar, "gar_device_val": device},
                          extra={"diverged": {"gar": {"diverged": False, "step": None},
                                              "gar_device": {"diverged": True, "step": 42}}})
    rows = report["rows"]
    assert rows["student/tracked"]["val"]["full"]["psnr"] == 21.0
    assert rows["gar_device/tracked"]["val"]["full"]["psnr"] == 19.5
    assert rows["gar_device/tracked"]["params"] == 100 and rows["gar_device/tracked"]["ms_per_frame"] == 3.0
    warnings = gar_warnings(report)
    assert len(warnings) == 2 and "`gar_device` fit diverged or failed" in warnings[0] and "1.50 dB under" in warnings[0]
    assert "guard fired in the `gar_device` fit (step 42)" in warnings[1]
    md = format_markdown(report)
    assert md.splitlines()[2] == warnings[0]  # the line after the title
    assert feature_ablation_lines(report) == [
        "f_s zeroed: 21.00 dB; the real features win by +1.50 dB (meets the 1 dB the design needs).",
        "f_s shuffled: 22.00 dB; the real features win by +0.50 dB (does NOT meet the 1 dB the design needs).",
    ]
    sound = build_report({"gar_val": gar})
    assert gar_warnings(sound) == [] and format_markdown(sound).splitlines()[2].startswith("## Test frames")


def test_read_divergence_finds_the_first_flagged_step(tmp_path):
    from lightning_modules.report import read_divergence

    assert read_divergence(tmp_path) == {"diverged": False, "step": None}  # no CSV log
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,gar/diverged,gar/val/diverged,step\n0,0.0,,2\n0,,0.0,3\n1,1.0,,5\n1,1.0,,8\n")
    assert read_divergence(tmp_path) == {"diverged": True, "step": 5}


def test_reuse_errors_are_one_line(tmp_path):
    from lightning_modules.demo import DemoError, _previous_demo

    assert _previous_demo(tmp_path, (), None, "tiny") is None
    with pytest.raises(ValueError, match="unknown fit"):
        _previous_demo(tmp_path, ("student",), None, "tiny")
    with pytest.raises(ValueError, match="reusing distill needs its upstream teacher"):
        _previous_demo(tmp_path, ("distill",), None, "tiny")
    with pytest.raises(DemoError, match="nothing to reuse"):
        _previous_demo(tmp_path, ("teacher",), None, "tiny")
    (tmp_path / "report.json").write_text(json.dumps({"video": None, "overrides": "tiny", "runs": {"teacher_fit": "x"}}))
    with pytest.raises(DemoError, match="of video None with overrides 'tiny', not of 'v.mp4'"):
        _previous_demo(tmp_path, ("teacher",), "v.mp4", "tiny")
    with pytest.raises(DemoError, match="no teacher_val, teacher_test run to reuse"):
        _previous_demo(tmp_path, ("teacher",), None, "tiny")


@pytest.mark.slow
def test_demo_reuses_the_teacher_and_student_and_refits_the_gars(demo):
    """--reuse teacher,distill: the second demo reads the first one's teacher and student runs (and their
    training times), runs only the two GAR fits and their evaluations, and reports them all."""
    from lightning_modules.demo import run_demo

    cwd, first, _ = demo
    saved = os.getcwd()
    os.chdir(cwd)
    lines: list[str] = []
    try:
        second = run_demo("runs/demo", overrides="tiny", in_process=True, scale=SCALE, log=lines.append,
                          reuse=("teacher", "distill"))
    finally:
        os.chdir(saved)
    for label in ("teacher_fit", "teacher_test", "distill_fit", "distill_val"):
        assert second["runs"][label] == first["runs"][label]
    for label in ("gar_fit", "gar_test", "gar_device_fit"):
        assert second["runs"][label] != first["runs"][label]
    assert second["timings_s"]["teacher_fit"] == first["timings_s"]["teacher_fit"]
    assert second["rows"]["student/tracked"]["test"] == first["rows"]["student/tracked"]["test"]
    assert sum("reused" in line for line in lines) == 6  # 2 fits + their 4 evaluations
