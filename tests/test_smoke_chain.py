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
    assert metrics["num_points"] > 0 and metrics["teacher/val/psnr"] > 0
    tested = run_stage(
        "test", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
        "--ckpt_path", str(chain_dir / "runs" / "teacher" / "latest" / "checkpoints" / "last.ckpt"),
    )
    assert "teacher/test/psnr" in json.loads((tested.run_dir / "metrics.json").read_text())

    distill = fit("distill")  # finds runs/teacher/latest by itself
    metrics = json.loads((distill.run_dir / "metrics.json").read_text())
    assert metrics["params_ratio"] <= 0.05 and metrics["flops_ratio"] <= 0.10
    assert "student/val/psnr" in metrics and "teacher/val/psnr" in metrics

    gar = fit("gar")  # finds runs/distill/latest by itself
    metrics = json.loads((gar.run_dir / "metrics.json").read_text())
    for model in ("student", "gar", "gar_meanz"):
        assert f"{model}/val/swd" in metrics
    for stage in ("teacher", "distill", "gar"):
        assert (chain_dir / "runs" / stage / "latest" / "checkpoints" / "last.ckpt").is_file()
    # nothing but runs/ in the (stand-in) checkout
    assert sorted(p.name for p in chain_dir.iterdir()) == ["runs"]
