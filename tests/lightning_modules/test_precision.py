"""bf16-mixed on CPU: every stage trains with finite losses, and what must stay float32 does.

bf16 is emulated on these CPUs (slow), so each stage takes 1 training batch on the tiny head. Spies
on the real runs check that autocast was on (bf16 activations reach the rasterizer and the
discriminator), while the rasterizer's scatter reduction (``index_add`` compositing) and the GAN
losses return float32.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import EXPERIMENTS, TINY_MESH, run_stage

BF16 = "--trainer.precision=bf16-mixed"


@pytest.fixture
def spies(monkeypatch) -> dict[str, list]:
    """Wrap the rasterizer entry points and the GAR's GAN losses; record dtypes per call."""
    import lightning_modules.gar_rendering as gar_rendering
    import lightning_modules.gar_training as gar_training
    import models.gan_losses as gan_losses
    import models.rasterizer as rasterizer
    import models.renderer as renderer

    calls: dict[str, list] = {"raster": [], "composite": [], "gan": []}

    real_raster = rasterizer.rasterize_points

    def raster_spy(points, features, *args, **kwargs):
        out = real_raster(points, features, *args, **kwargs)
        calls["raster"].append(
            {"autocast": torch.is_autocast_enabled("cpu"), "features": features.dtype,
             "image": out.image.dtype, "alpha": out.alpha.dtype}
        )
        return out

    real_composite = rasterizer._composite

    def composite_spy(alpha, vals, *args, **kwargs):
        out = real_composite(alpha, vals, *args, **kwargs)
        calls["composite"].append({"vals": vals.dtype, "acc": out[0].dtype})
        return out

    monkeypatch.setattr(rasterizer, "rasterize_points", raster_spy)
    monkeypatch.setattr(gar_rendering, "rasterize_points", raster_spy)  # the student row
    monkeypatch.setattr(renderer, "rasterize_points", raster_spy)  # the GAR's frame path (GARFrame)
    monkeypatch.setattr(rasterizer, "_composite", composite_spy)

    def gan_spy(name, fn):
        def wrapper(*args, **kwargs):
            first = args[0][0] if isinstance(args[0], list | tuple) else args[0]
            out = fn(*args, **kwargs)
            calls["gan"].append({"loss": name, "input": first.dtype, "output": out.dtype})
            return out

        return wrapper

    for name in ("g_loss", "d_loss", "normal_consistency_loss"):
        monkeypatch.setattr(gar_training, name, gan_spy(name, getattr(gar_training, name)))
    # R1 runs inside gan_losses.r1_regularizer (D's forward and the penalty in float32)
    monkeypatch.setattr(gan_losses, "r1_penalty", gan_spy("r1_penalty", gan_losses.r1_penalty))
    return calls


def _train_losses(run_dir: Path) -> dict[str, list[float]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if "/train/" in key and value not in ("", None):
                losses.setdefault(key, []).append(float(value))
    return losses


def _check_run(cli, run_dir: Path, loss_key: str, val_key: str) -> None:
    assert cli.trainer.precision == "bf16-mixed"
    losses = _train_losses(run_dir)
    assert loss_key in losses, sorted(losses)
    bad = {k: v for k, v in losses.items() if not all(math.isfinite(x) for x in v)}
    assert not bad, f"non-finite training losses under bf16-mixed: {bad}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics[val_key]) and metrics[val_key] > 0


def _check_raster(calls: dict[str, list], bf16_features: bool = True) -> None:
    # autocast was on in the steps and (teacher, student) bf16 activations reached the rasterizer ...
    assert any(c["autocast"] for c in calls["raster"])
    if bf16_features:
        assert any(c["features"] == torch.bfloat16 for c in calls["raster"])
    # ... which composites (index_add: a scatter reduction) and returns in float32 all the same
    assert calls["composite"] and all(c["vals"] == c["acc"] == torch.float32 for c in calls["composite"])
    assert all(c["image"] == c["alpha"] == torch.float32 for c in calls["raster"])


def test_losses_return_float32_under_bf16_autocast():
    """The image and GAN losses every stage uses, on bf16 activations inside autocast."""
    from models.gan_losses import d_loss, g_loss, normal_consistency_loss
    from models.losses import mask_loss, masked_l1, ssim_loss

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 3, 16, 16, generator=gen).bfloat16() for _ in range(2))
    mask = (torch.rand(2, 1, 16, 16, generator=gen) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = {
            "ssim": ssim_loss(a, b), "l1": masked_l1(a, b, mask), "mask": mask_loss(a[:, :1], mask),
            "g": g_loss([a, b]), "d": d_loss([a], [b]), "normal": normal_consistency_loss(a, b, mask),
        }
    assert {k: v.dtype for k, v in losses.items()} == dict.fromkeys(losses, torch.float32)
    # SSIM in float32 equals its float32 reference on the same (bf16-representable) inputs
    assert losses["ssim"].item() == pytest.approx(ssim_loss(a.float(), b.float()).item(), abs=1e-6)


def test_teacher_bf16_mixed(tmp_path, spies):
    run_dir = tmp_path / "teacher"
    cli = run_stage(
        "fit", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH), BF16,
        "--trainer.max_steps=1", "--run_dir", str(run_dir),
    )
    _check_run(cli, run_dir, "teacher/train/loss", "teacher/tracked/val/full/psnr")
    _check_raster(spies)


def test_distill_bf16_mixed(tmp_path, spies, teacher_run):
    run_dir = tmp_path / "distill"
    cli = run_stage(
        "fit", "--config", str(EXPERIMENTS / "distill.yaml"), "--config", str(TINY_MESH), BF16,
        "--model.init_args.teacher_ckpt", str(teacher_run / "checkpoints" / "last.ckpt"),
        "--model.init_args.warmup_steps=5",
        "--trainer.max_steps=1", "--run_dir", str(run_dir),
    )
    _check_run(cli, run_dir, "distill/train/loss", "student/tracked/val/full/psnr")
    _check_raster(spies)


def test_gar_bf16_mixed_gan_losses_stay_float32(tmp_path, spies, distill_run):
    run_dir = tmp_path / "gar"
    cli = run_stage(
        "fit", "--config", str(EXPERIMENTS / "gar.yaml"), "--config", str(TINY_MESH), BF16,
        "--model.init_args.student_ckpt", str(distill_run / "checkpoints" / "last.ckpt"),
        "--model.init_args.r1_every=1",  # the R1 penalty runs in this one batch
        "--trainer.max_steps=3", "--run_dir", str(run_dir),
    )
    _check_run(cli, run_dir, "gar/train/loss", "gar/tracked/val/full/psnr")
    _check_raster(spies, bf16_features=False)  # the frozen student's features are cached float32 buffers
    gan = spies["gan"]
    assert {c["loss"] for c in gan} == {"g_loss", "d_loss", "r1_penalty", "normal_consistency_loss"}
    # the discriminator ran in bf16 under autocast, its losses came back float32
    assert any(c["loss"] in ("g_loss", "d_loss") and c["input"] == torch.bfloat16 for c in gan)
    assert all(c["output"] == torch.float32 for c in gan), gan
    assert math.isfinite(json.loads((run_dir / "metrics.json").read_text())["gar/tracked/val/full/swd"])


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.py in its CPU dry mode: every stage of the chain runs and is timed."""
    from benchmarks import gpu_check

    rows = gpu_check.main(
        ["--accelerator", "cpu", "--precision", "bf16-mixed", "--steps", "1", "--tiny", "--out", str(tmp_path)]
    )
    assert [(r["stage"], r["precision"], r["error"]) for r in rows] == [
        ("teacher", "bf16-mixed", None), ("distill", "bf16-mixed", None), ("gar", "bf16-mixed", None)
    ]
    assert all(r["batches"] == 1 and r["first_s"] > 0 and r["peak_mib"] is None for r in rows)
    assert (tmp_path / "bf16-mixed-gar" / "checkpoints" / "last.ckpt").is_file()
