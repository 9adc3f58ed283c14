"""The teacher stage end to end on the tiny head, and its pieces with known values."""

from __future__ import annotations

import json
import math

import imageio.v3 as iio
import pytest
import torch

from lightning_modules import teacher as teacher_stage
from lightning_modules.stage import check_finite_losses
from lightning_modules.teacher import TeacherModule
from models.camera import pixel_radius
from tests.conftest import EXPERIMENTS, TINY_MESH, run_stage


def test_one_step_teacher_run_leaves_checkpoint_metrics_and_grid(teacher_run):
    ckpt = torch.load(teacher_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 1
    assert ckpt["hyper_parameters"]["expression_dim"] == 4  # linked from the tiny-mesh datamodule
    metrics = json.loads((teacher_run / "metrics.json").read_text())
    fresh = TeacherModule(expression_dim=4, image_size=32)
    assert metrics["params/teacher"] == sum(p.numel() for p in fresh.teacher.canonical_network_parameters())
    assert metrics["num_points"] == ckpt["num_points"] <= 400
    for model in ("teacher", "baseline_mean", "baseline_nearest"):
        for region in ("full", "face"):
            for metric in ("l1", "psnr", "ssim"):
                assert isinstance(metrics[f"{model}/tracked/val/{region}/{metric}"], float)
    assert metrics["teacher/tracked/val/full/lpips"] is None  # no AlexNet weights on disk: null, never a stand-in
    assert not any("/refined/" in key for key in metrics)  # inside a fit, val only selects: no refined row
    (grid,) = sorted((teacher_run / "renders").glob("val_*.png"))
    image = iio.imread(grid)
    assert image.shape == (2 * 32, 4 * 32, 3)  # rows: val frames; columns: GT | render | normals | alpha


def test_checkpoint_loads_into_a_fresh_module_with_the_same_renders(teacher_run):
    from datamodules.mesh_views import MeshViewsDataModule

    loaded = TeacherModule.load_from_checkpoint(teacher_run / "checkpoints" / "last.ckpt").eval()
    again = TeacherModule.load_from_checkpoint(teacher_run / "checkpoints" / "last.ckpt").eval()
    dm = MeshViewsDataModule(num_views=8, image_size=32, expression_dim=4, samples=5000)
    batch = next(iter(dm.test_dataloader()))
    a, b = loaded.visualize(batch), again.visualize(batch)
    assert torch.equal(a["render"], b["render"])
    assert loaded.teacher.num_active == torch.load(teacher_run / "checkpoints" / "last.ckpt", weights_only=False)["num_points"]


def test_test_subcommand_writes_video_and_test_metrics(teacher_run, tmp_path):
    out = tmp_path / "test_run"
    cli = run_stage(
        "test", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
        "--ckpt_path", str(teacher_run / "checkpoints" / "last.ckpt"), "--run_dir", str(out),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    # the refined protocol moved each frame's codes, never the model: every weight bitwise as loaded
    saved = torch.load(teacher_run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key, value in cli.model.state_dict().items():
        if key in saved:
            assert torch.equal(value.cpu(), saved[key]), key
    assert all(p.grad is None for p in cli.model.parameters())
    assert {"teacher/tracked/test/full/psnr", "baseline_mean/tracked/test/full/psnr",
            "baseline_nearest/tracked/test/face/psnr", "teacher/refined/test/full/psnr",
            "teacher/tracked/test/full/lpips", "ms_per_frame/teacher/tracked"} <= set(metrics)
    # the refined row fits each frame's codes to that frame: never worse than a few steps from tracking allow
    assert metrics["flops_per_frame/teacher/refined"] > 0 and metrics["ms_per_frame/teacher/refined"] > 0
    video = iio.imread(out / "renders" / "test.mp4")
    assert video.shape[1:] == (32, 4 * 32, 3)
    assert video.shape[0] == 2  # the tiny head's test views (i % 4 == 3 of 8)


def test_nan_loss_stops_with_step_and_term(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_stage, "mask_loss", lambda alpha, mask: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match=r"step 0: loss term 'mask' is nan"):
        run_stage(
            "fit", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
            "--run_dir", str(tmp_path / "nan"),
        )
    assert (tmp_path / "nan" / "checkpoints" / "last.ckpt").is_file()  # the crash still leaves last.ckpt


def test_check_finite_losses_names_the_term():
    check_finite_losses({"rgb": torch.tensor(0.5)}, step=3)
    with pytest.raises(FloatingPointError, match="step 7: loss term 'eikonal' is inf"):
        check_finite_losses({"rgb": torch.tensor(0.5), "eikonal": torch.tensor(float("inf"))}, step=7)


def test_pixel_radius_is_focal_times_radius_over_depth():
    points = torch.tensor([[[0.0, 0.0, 2.0], [0.3, -0.1, 4.0]]])
    world_mat = torch.eye(4)[:3].unsqueeze(0)
    K = torch.tensor([[[100.0, 0, 16], [0, 100.0, 16], [0, 0, 1]]])
    r = pixel_radius(points, world_mat, K, torch.tensor(0.02))
    assert torch.allclose(r, torch.tensor([[100 * 0.02 / 2.0, 100 * 0.02 / 4.0]]))


def test_visibility_is_each_points_composited_weight():
    """One training step's visibility of a lone point equals the sum of its alphas over the pixels."""
    from datamodules.batch import AvatarBatch

    module = TeacherModule(expression_dim=2, image_size=16, teacher={
        "class_path": "models.teacher.PointAvatarTeacher",
        "init_args": dict(init_points=1, min_points=1, max_points=4, geometry_width=48, geometry_depth=5,
                          deformer_width=8, deformer_depth=2, shading_width=8)})
    with torch.no_grad():
        module.teacher.points[0] = torch.tensor([0.0, 0.0, 0.0])
        module.teacher.radius.fill_(0.05)  # at depth 2 with fx 100: r = 2.5 px
    batch = AvatarBatch(
        image=torch.rand(1, 3, 16, 16), mask=torch.ones(1, 1, 16, 16),
        world_mat=torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2]]]),
        K=torch.tensor([[[100.0, 0, 8], [0, 100.0, 8], [0, 0, 1]]]),
        expression=torch.zeros(1, 2), frame_index=torch.zeros(1, dtype=torch.long),
    )
    import lightning.pytorch as pl

    # a trainer only for its strategy (one device: the all-reduce of the visibility returns it as is)
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False)
    module.log = module.log_dict = lambda *a, **k: None  # not inside a fit
    module.training_step(batch, 0)
    # the point projects to (8, 8), a pixel corner; pixel centres at (u + 0.5, v + 0.5)
    centres = torch.stack(torch.meshgrid(torch.arange(16) + 0.5, torch.arange(16) + 0.5, indexing="xy"), -1)
    d2 = ((centres - 8.0) ** 2).sum(-1)
    expected = (1 - d2 / 2.5**2).clamp_min(0).sum()
    assert module.visibility[0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert module.visibility[1:].abs().sum() == 0


def test_point_schedule_runs_on_full_epochs_only(tmp_path):
    # tiny head: 4 training views, batch 2 -> 2 batches per epoch
    common = ("fit", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
              "--model.init_args.grow_every_epochs=1", "--model.init_args.prune_every_epochs=1000",
              "--trainer.limit_val_batches=0")
    cut = run_stage(*common, "--trainer.max_steps=1", "--run_dir", str(tmp_path / "cut"))
    assert cut.model.teacher.num_active == 400  # the epoch was cut short: no growth
    grown = run_stage(*common, "--trainer.max_steps=2", "--run_dir", str(tmp_path / "grown"))
    assert grown.model.teacher.num_active == 800
    assert grown.model.teacher.points.shape == cut.model.teacher.points.shape  # fixed-capacity buffer
    assert json.loads((tmp_path / "grown" / "metrics.json").read_text())["num_points"] == 800


def test_pruning_everything_stops_at_the_floor_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="min_points"):
        cli = run_stage(
            "fit", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
            "--model.init_args.teacher.prune_threshold=1e9", "--model.init_args.teacher.min_points=150",
            "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--run_dir", str(tmp_path / "pruned"),
        )
    assert cli.model.teacher.num_active == 150


def test_teacher_error_decomposition_by_hand():
    """benchmarks/teacher_errors.py: one black pixel spilled far outside the mask and one interior
    pixel off by 0.5 on an 8x8 frame; every region and PSNR by hand."""
    from benchmarks.teacher_errors import error_decomposition

    image = torch.full((1, 3, 8, 8), 0.2)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0  # interior (3x3 erosion) = rows/cols 3..4
    render = torch.where(mask > 0, image, torch.ones_like(image))  # the target itself
    alpha = mask.clone()
    render[..., 0, 7] = 0.0  # spill: black where the target is white
    alpha[..., 0, 7] = 1.0
    render[..., 3, 3] = 0.7  # interior error 0.5 in every channel
    out = error_decomposition(render, alpha, image, mask)
    assert out["mse_outside"] == pytest.approx(1.0 / 64)
    assert out["mse_interior"] == pytest.approx(0.25 / 64)
    assert out["mse_band"] == 0.0
    assert out["mse"] == pytest.approx(1.25 / 64)
    assert out["psnr"] == pytest.approx(-10 * math.log10(1.25 / 64), abs=1e-4)
    assert out["psnr_gt_mask"] == pytest.approx(-10 * math.log10(0.25 / 64), abs=1e-4)
    assert out["spill_px"] == [1] and out["miss_px"] == [0]


def test_teacher_errors_on_a_run(teacher_run, capsys):
    from benchmarks.teacher_errors import main

    result = main(["--run", str(teacher_run), "--no-mouth"])
    assert result["checkpoint"] == "best.ckpt"  # chosen on val, what the demo hands downstream
    assert set(result["splits"]) == {"train", "val", "test"}
    train, val = result["splits"]["train"], result["splits"]["val"]
    # the train split: tracked and fitted codes, and no nearest-frame baseline (it would be the frame itself)
    assert {"teacher", "teacher_fitted", "baseline_mean"} <= set(train) and "baseline_nearest" not in train
    for model in ("teacher", "baseline_mean", "baseline_nearest"):
        r = val[model]
        assert r["mse"] == pytest.approx(r["mse_outside"] + r["mse_band"] + r["mse_interior"], rel=1e-5)
        assert len(r["frame_psnr"]) == val["frames"] > 0
    # the baselines predict their own silhouette: they pay for it outside the mask, unless perfect
    assert val["baseline_mean"]["mse_outside"] > 0.0
    # with the ground-truth mask imposed, only the colours inside are left to differ
    assert val["baseline_nearest"]["psnr_gt_mask"] >= val["baseline_nearest"]["psnr"]
    assert "mouth" not in result
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["splits"]["val"]["frames"] == val["frames"]


def test_mouth_correlation_scores_the_re_tracked_series(monkeypatch):
    """The teacher's mouth figure: Pearson r of the renders' and the frames' re-tracked openings (a
    frame without a face in either is left out), against the 0.6 target."""
    import benchmarks.reenact as reenact
    from benchmarks.teacher_errors import mouth_correlation
    from datamodules.batch import AvatarBatch

    series = iter([[0.1, 0.2, 0.3, None, 0.5], [0.12, 0.18, 0.33, 0.4, None]])  # frames, then renders
    monkeypatch.setattr(reenact, "track_openings", lambda frames, upscale: next(series))
    n = 5
    batch = AvatarBatch(image=torch.rand(n, 3, 8, 8), mask=torch.ones(n, 1, 8, 8), world_mat=torch.zeros(n, 3, 4),
                        K=torch.zeros(n, 3, 3), expression=torch.zeros(n, 2), frame_index=torch.arange(n))
    out = mouth_correlation(torch.rand(n, 3, 8, 8), batch)
    a, b = [0.1, 0.2, 0.3], [0.12, 0.18, 0.33]
    assert out["pairs"] == 3
    assert out["pearson_r"] == pytest.approx(float(torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1]))
    assert out["target_r"] == 0.6 and out["passes"] is True


def test_fit_saves_the_code_corrections_of_the_training_frames(teacher_run):
    """Code refinement (``code_refinement: true``, as the fixture's fit): the checkpoint holds one correction per training view of the
    tiny head (its datamodule's training frames), the codes' variance and the canonical expression, and the fit
    logs the mean correction size."""
    from datamodules.mesh_views import MeshViewsDataModule

    ckpt = torch.load(teacher_run / "checkpoints" / "last.ckpt", weights_only=False)
    state = ckpt["state_dict"]
    dm = MeshViewsDataModule(num_views=8, image_size=32, expression_dim=4, samples=5000)
    assert state["codes.frame_numbers"].tolist() == dm.training_frames()["frame_index"].tolist() == [0, 2, 4, 6]
    assert state["codes.expression"].shape == (4, 4) and state["codes.rotation"].shape == (4, 3)
    assert state["expression_var"].shape == (4,) and state["teacher.canonical_expression"].shape == (4,)
    header = (teacher_run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"teacher/codes/expression", "teacher/codes/rotation_deg", "teacher/codes/translation",
            "teacher/train/sdf_consistency", "teacher/train/code_prior"} <= set(header)
    loaded = TeacherModule.load_from_checkpoint(teacher_run / "checkpoints" / "last.ckpt")
    assert loaded.codes is not None and loaded.codes.num_frames == 4
    assert torch.equal(loaded.codes.rotation, state["codes.rotation"])


def test_a_checkpoint_from_before_code_refinement_still_loads(teacher_run, tmp_path):
    """Older teacher checkpoints lack the code table, expression_var, the canonical expression and the
    expression scale: they load with no corrections and the neutral values (their behaviour)."""
    ckpt = torch.load(teacher_run / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items()
                          if not k.startswith("codes.")
                          and k not in ("expression_var", "teacher.canonical_expression", "teacher.expression_scale")}
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    module = TeacherModule.load_from_checkpoint(old)
    assert module.codes is None
    assert torch.equal(module.expression_var, torch.ones(4))
    assert torch.count_nonzero(module.teacher.canonical_expression) == 0
    assert torch.equal(module.teacher.expression_scale, torch.ones(4))


def test_with_code_corrections_changes_only_the_frames_it_holds():
    from datamodules.batch import AvatarBatch
    from lightning_modules.stage import with_code_corrections
    from models.codes import FrameCodeCorrections

    codes = FrameCodeCorrections(torch.tensor([4, 8]), expression_dim=2)
    with torch.no_grad():
        codes.expression[1] = torch.tensor([1.0, -1.0])  # frame 8
        codes.translation[1] = torch.tensor([0.0, 0.0, 0.5])
    world_mat = torch.eye(4)[:3].expand(3, 3, 4).clone()
    batch = AvatarBatch(image=torch.zeros(3, 3, 2, 2), mask=torch.zeros(3, 1, 2, 2), world_mat=world_mat,
                        K=torch.eye(3).expand(3, 3, 3), expression=torch.zeros(3, 2),
                        frame_index=torch.tensor([8, 5, 4]))  # frame 5: held out
    out = with_code_corrections(batch, codes)
    assert out.expression.tolist() == [[1.0, -1.0], [0.0, 0.0], [0.0, 0.0]]
    assert out.world_mat[:, 2, 3].tolist() == [0.5, 0.0, 0.0]
    assert torch.equal(batch.expression, torch.zeros(3, 2))  # the input batch is left as it was
    assert with_code_corrections(batch, None) is batch


def test_a_teacher_checkpoint_of_the_earlier_layout_loads_with_its_own_sizes(teacher_run, tmp_path):
    """A checkpoint whose network sizes sit flat among the stage's args (before the ``teacher`` entry
    had a class path) builds those sizes, through ``load_from_checkpoint`` and ``lightning test --ckpt_path``."""
    small = dict(max_points=64, init_points=32, min_points=8, geometry_width=16, geometry_depth=5,
                 deformer_width=8, deformer_depth=2, shading_width=8, num_frequencies=2)
    ckpt = torch.load(teacher_run / "checkpoints" / "last.ckpt", weights_only=False)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k != "teacher"}
    reference = TeacherModule(expression_dim=4, image_size=32, teacher={"class_path": "models.teacher.PointAvatarTeacher",
                                                                        "init_args": small})
    state = {**{k: v for k, v in ckpt["state_dict"].items() if not k.startswith("teacher.")},
             **{f"teacher.{k}": v for k, v in reference.teacher.state_dict().items()}}
    old = {k: v for k, v in ckpt.items() if k != "teacher"}
    old.update(hyper_parameters={**hparams, **small}, state_dict=state)
    old.pop("visibility", None)  # its size is the run's capacity
    torch.save(old, tmp_path / "old.ckpt")
    loaded = TeacherModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.teacher.max_points == 64 and loaded.teacher.spec["init_args"]["geometry_width"] == 16
    assert torch.equal(loaded.teacher.points, reference.teacher.points)
    cli = run_stage("test", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
                    "--ckpt_path", str(tmp_path / "old.ckpt"), "--run_dir", str(tmp_path / "old-test"))
    assert cli.model.teacher.max_points == 64
    assert json.loads((tmp_path / "old-test" / "metrics.json").read_text())["params/teacher"] == sum(
        p.numel() for p in reference.teacher.canonical_network_parameters())
