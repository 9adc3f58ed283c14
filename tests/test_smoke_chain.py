"""The smoke chain of DESIGN.md: teacher -> distill -> GAR, each stacked with the tiny-mesh override,
in a temporary runs folder, each stage finding its upstream through runs/<stage>/latest."""

from __future__ import annotations

import json

import pytest

from tests.conftest import EXPERIMENTS, TINY_MESH, run_stage


@pytest.fixture
def chain_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fit(stage: str, *extra: str):
    return run_stage("fit", "--config", str(EXPERIMENTS / f"{stage}.yaml"), "--config", str(TINY_MESH), *extra)


def test_smoke_chain(chain_dir):
    teacher = fit("teacher")
    assert (chain_dir / "runs" / "teacher" / "latest").resolve() == teacher.run_dir.resolve()
    metrics = json.loads((teacher.run_dir / "metrics.json").read_text())
    assert metrics["num_points"] > 0 and metrics["teacher/tracked/val/full/psnr"] > 0
    assert "teacher/refined/val/full/psnr" not in metrics  # never inside a fit: val selects
    tested = run_stage(
        "test", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
        "--ckpt_path", str(chain_dir / "runs" / "teacher" / "latest" / "checkpoints" / "last.ckpt"),
    )
    tested_metrics = json.loads((tested.run_dir / "metrics.json").read_text())
    for key in ("teacher/tracked/test/full/psnr", "teacher/tracked/test/face/psnr", "teacher/refined/test/full/psnr",
                "baseline_nearest/tracked/test/full/psnr", "baseline_mean/tracked/test/face/ssim",
                "ms_per_frame/teacher/tracked", "ms_per_frame/teacher/refined", "flops_per_frame/teacher/refined"):
        assert tested_metrics[key] > 0, key

    distill = fit("distill")  # finds runs/teacher/latest by itself
    metrics = json.loads((distill.run_dir / "metrics.json").read_text())
    assert metrics["params_ratio"] <= 0.05 and metrics["flops_ratio"] <= 0.10
    assert "student/tracked/val/full/psnr" in metrics and "teacher/tracked/val/full/psnr" in metrics

    gar = fit("gar")  # finds runs/distill/latest by itself
    metrics = json.loads((gar.run_dir / "metrics.json").read_text())
    for model in ("student", "gar"):
        assert f"{model}/tracked/val/full/swd" in metrics and f"{model}/tracked/val/face/swd" in metrics
    assert not any("/refined/" in key for key in metrics)
    for stage in ("teacher", "distill", "gar"):
        assert (chain_dir / "runs" / stage / "latest" / "checkpoints" / "last.ckpt").is_file()
    # nothing but runs/ in the (stand-in) checkout
    assert sorted(p.name for p in chain_dir.iterdir()) == ["runs"]
