"""The distillation stage on a real one-step teacher: frozen teacher, student checkpoint, the report."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_modules.distill import DistillModule
from lightning_modules.handoff import load_student
from tests.conftest import EXPERIMENTS, TINY_MESH, run_stage


def test_missing_teacher_is_one_line_naming_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_stage("fit", "--config", str(EXPERIMENTS / "distill.yaml"), "--config", str(TINY_MESH))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lightning fit --config experiments/teacher.yaml" in err and "runs/teacher/latest" in err
    assert not (tmp_path / "runs").exists()  # checked before any run folder is made


def test_teacher_is_frozen_and_bitwise_unchanged(teacher_run, distill_run):
    teacher_ckpt = torch.load(teacher_run / "checkpoints" / "last.ckpt", weights_only=False)
    module = DistillModule.load_from_checkpoint(
        distill_run / "checkpoints" / "last.ckpt", teacher_ckpt=str(teacher_run / "checkpoints" / "last.ckpt")
    )
    module.train()
    assert not module.teacher.training  # train() never takes the teacher out of eval mode
    assert all(not p.requires_grad for p in module.teacher.parameters())
    for name, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_ckpt["state_dict"][f"teacher.{name}"]), name
    distill_ckpt = torch.load(distill_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith("teacher.") for k in distill_ckpt["state_dict"])  # never saved


def test_student_checkpoint_is_self_contained(teacher_run, distill_run):
    ckpt = torch.load(distill_run / "checkpoints" / "last.ckpt", weights_only=False)
    entry = ckpt["student"]
    teacher_ckpt = torch.load(teacher_run / "checkpoints" / "last.ckpt", weights_only=False)
    n = teacher_ckpt["num_points"]
    assert entry["expression_dim"] == 4 and entry["state_dict"]["points"].shape == (n, 3)
    assert entry["state_dict"]["graph_neighbors_0"].shape == (n, 16)  # the kNN indices, k = 16
    student = load_student(distill_run / "checkpoints" / "last.ckpt").eval()
    active = teacher_ckpt["state_dict"]["teacher.active"]
    assert torch.equal(student.points, teacher_ckpt["state_dict"]["teacher.points"][active])
    out = student(torch.zeros(1, 4), torch.eye(3, 4)[None] + torch.tensor([0, 0, 0, 2.0]).expand(3, 4) * 0)
    assert out["colors"].shape == (1, n, 3) and torch.isfinite(out["colors"]).all()


def test_report_has_both_models_and_the_ratios(distill_run):
    metrics = json.loads((distill_run / "metrics.json").read_text())
    for model in ("student", "teacher", "baseline_mean"):
        assert isinstance(metrics[f"{model}/tracked/val/full/psnr"], float)
    assert metrics["params_ratio"] == metrics["params/student"] / metrics["params/teacher"]
    assert metrics["flops_ratio"] == metrics["flops/student"] / metrics["flops/teacher"]
    assert metrics["params_ratio"] <= 0.05 and metrics["flops_ratio"] <= 0.10  # the targets, from the counter
    assert metrics["flops_run/teacher"] < metrics["flops/teacher"]  # the run's cloud is smaller than 10,000
    assert metrics["num_points"] > 0 and metrics["flops_per_frame/student/tracked"] > 0


def test_loss_terms_switch_off_from_the_command_line(teacher_run, tmp_path):
    cli = run_stage(
        "fit", "--config", str(EXPERIMENTS / "distill.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.teacher_ckpt", str(teacher_run / "checkpoints" / "last.ckpt"),
        "--model.init_args.loss_weights.graph=0", "--model.init_args.loss_weights.feat=0",
        "--model.init_args.warmup_steps=5",
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]",
        "--run_dir", str(tmp_path / "nograph"),
    )
    logged = set(cli.trainer.callback_metrics)
    assert "distill/train/gt" in logged and "distill/train/out" in logged
    assert not any(k.startswith("distill/train/graph") or k == "distill/train/feat" for k in logged)
    assert cli.model.loss_weights == {"gt": 1.0, "out": 1.0, "feat": 0.0, "graph": 0.0}
    # L_out with experiments/distill.yaml's weight on its blendshape/offset term (terms logged unweighted)
    m = cli.trainer.callback_metrics
    assert cli.model.hparams.deformation_weight == 100.0
    assert m["distill/train/out_deformation"] > 0  # else the weighted and plain sums would agree
    expected = sum(m[f"distill/train/out_{k}"] for k in ("albedo", "normal", "render")) + 100.0 * m["distill/train/out_deformation"]
    torch.testing.assert_close(m["distill/train/out"], expected)


def test_a_negative_deformation_weight_is_refused(teacher_run):
    with pytest.raises(ValueError, match="deformation_weight must be >= 0"):
        _warmup_module(teacher_run, steps=0, deformation_weight=-1.0)


def test_saved_student_statistics_are_its_clouds(distill_run):
    """The checkpoint's running BatchNorm statistics are those of the cloud under the saved
    weights (recalibrated after the step), so eval mode renders what training rendered."""
    from models.student import Student

    entry = torch.load(distill_run / "checkpoints" / "last.ckpt", weights_only=False)["student"]
    student = Student(**entry["init_args"])
    student.load_state_dict(entry["state_dict"])  # as saved, no recalibration on load
    with torch.no_grad():
        evaluated = student.eval().canonical()
        trained = student.train().canonical()
    for name in ("albedo", "normals", "feature"):
        torch.testing.assert_close(getattr(evaluated, name), getattr(trained, name), rtol=1e-4, atol=1e-5)


def _warmup_module(teacher_run, steps: int, **kwargs) -> DistillModule:
    import lightning.pytorch as pl

    torch.manual_seed(0)
    module = DistillModule(
        expression_dim=4, image_size=32, teacher_ckpt=str(teacher_run / "checkpoints" / "last.ckpt"),
        warmup_steps=steps, **kwargs,
    )
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False)
    return module


def _fixed_normals() -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(512, 3, generator=torch.Generator().manual_seed(3)), dim=-1)


def test_warmup_fits_the_teachers_per_point_outputs_once(teacher_run):
    module = _warmup_module(teacher_run, steps=60)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    module.student.train()
    with torch.no_grad():
        before = module.warmup_losses(_fixed_normals())
    assert set(before) == {"albedo", "normal", "deformation", "shading", "feat", "total"}
    torch.testing.assert_close(  # the total is the weighted sum (deformation x 100)
        before["total"],
        sum(v for k, v in before.items() if k not in ("total", "deformation")) + 100.0 * before["deformation"],
    )
    module.on_fit_start()
    assert bool(module.warmup_done)
    with torch.no_grad():  # recalibrated: eval mode renders what the warm-up trained (eval first:
        evaluated = module.student.eval().canonical()  # a train-mode pass moves the running statistics)
        trained = module.student.train().canonical()
    torch.testing.assert_close(evaluated.albedo, trained.albedo, rtol=1e-4, atol=1e-5)
    module.student.train()
    with torch.no_grad():
        after = module.warmup_losses(_fixed_normals())
    for name in ("albedo", "normal", "shading", "feat", "total"):
        assert after[name] < 0.7 * before[name], (name, before[name], after[name])
    for name, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name  # the teacher is untouched
    assert all(p.grad is None for p in module.student.parameters())

    weights = {k: v.clone() for k, v in module.student.state_dict().items()}
    module.on_fit_start()  # a resumed fit (warmup_done restored from the checkpoint) does not repeat it
    assert all(torch.equal(v, weights[k]) for k, v in module.student.state_dict().items())


def test_warmup_follows_the_loss_switches_and_can_be_off(teacher_run):
    no_out = _warmup_module(teacher_run, steps=3, loss_weights={"out": 0.0})
    assert set(no_out.warmup_losses(_fixed_normals())) == {"feat", "total"}
    off = _warmup_module(teacher_run, steps=0)
    weights = {k: v.clone() for k, v in off.student.state_dict().items()}
    off.on_fit_start()
    assert not bool(off.warmup_done)
    assert all(torch.equal(v, weights[k]) for k, v in off.student.state_dict().items())
    with pytest.raises(ValueError, match="warmup_steps"):
        _warmup_module(teacher_run, steps=-1)


def test_the_run_records_its_warmup(distill_run):
    checkpoint = torch.load(distill_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert bool(checkpoint["state_dict"]["warmup_done"])  # so `--ckpt_path last` skips it
    assert checkpoint["hyper_parameters"]["deformation_weight"] == 100.0  # experiments/distill.yaml's, kept for a reload


def test_a_checkpoint_from_before_the_warmup_is_never_warmed_up_again(distill_run, tmp_path):
    ckpt = torch.load(distill_run / "checkpoints" / "last.ckpt", weights_only=False)
    del ckpt["state_dict"]["warmup_done"]  # as written before the warm-up existed
    torch.save(ckpt, tmp_path / "old.ckpt")
    module = DistillModule.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert bool(module.warmup_done)


def test_distill_fidelity_by_hand_and_on_a_run(distill_run, capsys):
    """benchmarks/distill_fidelity.py: hand values on two points, then the run's report."""
    from types import SimpleNamespace

    from benchmarks.distill_fidelity import frame_psnr, main, per_point_fidelity

    teacher = SimpleNamespace(albedo=torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]]),
                              normals=torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
                              blendshapes=torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 4.0, 0.0]]]))
    student = SimpleNamespace(albedo=torch.tensor([[0.5, 0.5, 0.2], [0.0, 0.3, 0.0]]),
                              normals=torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
                              blendshapes=torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 4.0, 5.0]]]))
    got = per_point_fidelity(student, teacher)
    assert got["albedo_l1"] == pytest.approx(0.6 / 6)
    assert got["normal_cos"] == pytest.approx(0.5)  # cos 1 and cos 0
    assert got["blendshape_rel"] == pytest.approx(5.0 / 5.0)  # ||(0, 0, 5)|| / ||(3, 4)||
    image = torch.zeros(2, 3, 4, 4)
    assert frame_psnr(image + 0.1, image) == pytest.approx([20.0, 20.0])

    result = main(["--run", str(distill_run), "--split", "val"])
    assert result["frames"] > 0 and 0.0 <= result["albedo_l1"] <= 1.0 and -1.0 <= result["normal_cos"] <= 1.0
    assert result["render_psnr"] > 0 and result["student_psnr"] > 0 and result["teacher_psnr"] > 0
    metrics = json.loads((distill_run / "metrics.json").read_text())
    # the teacher's val PSNR is the stage's own (same renders, same frames, same per-frame mean)
    assert result["teacher_psnr"] == pytest.approx(metrics["teacher/tracked/val/full/psnr"], abs=1e-3)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["split"] == "val"


def test_a_checkpoint_without_validation_still_holds_its_clouds_statistics(teacher_run, tmp_path):
    """No evaluation loop ran before the save: the checkpoint hook itself recalibrates."""
    from models.student import Student

    run_stage(
        "fit", "--config", str(EXPERIMENTS / "distill.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.teacher_ckpt", str(teacher_run / "checkpoints" / "last.ckpt"),
        "--model.init_args.warmup_steps=0", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.callbacks=[]", "--run_dir", str(tmp_path / "noval"),
    )
    ckpt = torch.load(tmp_path / "noval" / "checkpoints" / "last.ckpt", weights_only=False)
    for state in (ckpt["student"]["state_dict"],
                  {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}):
        student = Student(**ckpt["student"]["init_args"])
        student.load_state_dict(state)
        with torch.no_grad():
            evaluated = student.eval().canonical()
            trained = student.train().canonical()
        torch.testing.assert_close(evaluated.normals, trained.normals, rtol=1e-4, atol=1e-5)


class _Captured(Exception):
    """Stops a training step once the batch it renders is seen."""


def test_distillation_and_gar_train_on_the_teachers_fitted_codes(teacher_run, distill_run):
    """The teacher's per-frame code corrections reach the distillation (through the teacher checkpoint)
    and the GAR (through the student checkpoint): a training batch is rendered from the corrected
    codes, never re-tracked."""
    from datamodules.mesh_views import MeshViewsDataModule
    from lightning_modules.gar import GARModule
    from lightning_modules.handoff import load_code_corrections

    teacher_ckpt = teacher_run / "checkpoints" / "last.ckpt"
    saved = torch.load(teacher_ckpt, weights_only=False)["state_dict"]
    module = DistillModule(expression_dim=4, image_size=32, teacher_ckpt=str(teacher_ckpt))
    assert torch.equal(module.codes.rotation, saved["codes.rotation"])
    assert not any(p.requires_grad for p in module.codes.parameters())
    with torch.no_grad():
        module.codes.translation.fill_(0.25)
    seen = []

    def capture(batch, canonical):
        seen.append(batch)
        raise _Captured

    module.render_student = capture
    batch = next(iter(MeshViewsDataModule(num_views=8, image_size=32, expression_dim=4,
                                          samples=5000).train_dataloader()))
    with pytest.raises(_Captured):
        module.training_step(batch, 0)
    torch.testing.assert_close(seen[0].world_mat[:, :, 3], batch.world_mat[:, :, 3] + 0.25)

    student_ckpt = distill_run / "checkpoints" / "last.ckpt"
    codes = load_code_corrections(str(student_ckpt))
    assert torch.equal(codes.frame_numbers, saved["codes.frame_numbers"])
    assert torch.equal(codes.expression, saved["codes.expression"])
    gar = GARModule(expression_dim=4, image_size=32, student_ckpt=str(student_ckpt))
    assert torch.equal(gar.codes.translation, saved["codes.translation"])


def test_a_warmup_interrupted_by_ctrl_c_is_run_whole_on_resume(teacher_run):
    """Ctrl-C inside the warm-up: the checkpoint holds the weights it started from and warmup_done
    False, and the resumed fit runs every warm-up step again from those weights (the old resume
    skipped the rest of the warm-up)."""
    interrupted = _warmup_module(teacher_run, steps=6)
    start = {k: v.clone() for k, v in interrupted.student.state_dict().items()}
    losses = interrupted.warmup_losses
    calls = {"n": 0}

    def ctrl_c_on_the_fourth(normals):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return losses(normals)

    interrupted.warmup_losses = ctrl_c_on_the_fourth
    with pytest.raises(KeyboardInterrupt):
        interrupted.on_fit_start()
    assert any(not torch.equal(v, start[k]) for k, v in interrupted.student.state_dict().items())  # 3 steps done
    checkpoint = {"state_dict": interrupted.state_dict()}
    interrupted.on_save_checkpoint(checkpoint)  # what RunFolder.on_exception writes
    assert not bool(checkpoint["state_dict"]["warmup_done"])
    for name, value in start.items():
        assert torch.equal(checkpoint["student"]["state_dict"][name], value), name
        assert torch.equal(checkpoint["state_dict"][f"student.{name}"], value), name

    resumed = _warmup_module(teacher_run, steps=6)
    resumed.load_state_dict(checkpoint["state_dict"], strict=False)
    resumed.trainer.ckpt_path = "last.ckpt"  # as a resumed fit's trainer says
    seen = []
    resumed_losses = resumed.warmup_losses

    def record(normals):
        seen.append({k: v.clone() for k, v in resumed.student.state_dict().items()})
        return resumed_losses(normals)

    resumed.warmup_losses = record
    resumed.on_fit_start()
    assert len(seen) == 6 and bool(resumed.warmup_done)  # the whole warm-up, from where it started
    assert all(torch.equal(seen[0][k], v) for k, v in start.items())
    after = {k: v.clone() for k, v in resumed.student.state_dict().items()}
    saved = {"state_dict": resumed.state_dict()}
    resumed.on_save_checkpoint(saved)  # after the warm-up: the trained weights
    assert any(not torch.equal(saved["student"]["state_dict"][k], start[k]) for k in after)


def test_the_adapter_is_frozen_when_no_loss_reaches_it(teacher_run):
    off = _warmup_module(teacher_run, steps=0, loss_weights={"feat": 0.0, "graph": 0.0})
    assert not any(p.requires_grad for p in off.adapter.parameters())
    adapter = {id(p) for p in off.adapter.parameters()}
    params = [p for group in off.configure_optimizers()["optimizer"].param_groups for p in group["params"]]
    assert params and not adapter & {id(p) for p in params}
    on = _warmup_module(teacher_run, steps=0, loss_weights={"feat": 0.0})  # L_graph still uses it
    assert all(p.requires_grad for p in on.adapter.parameters())


def test_optimizer_and_schedule_are_configurable_the_lightning_way(teacher_run, tmp_path):
    cli = run_stage(
        "fit", "--config", str(EXPERIMENTS / "distill.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.teacher_ckpt", str(teacher_run / "checkpoints" / "last.ckpt"),
        "--model.init_args.optimizer=torch.optim.AdamW", "--model.init_args.optimizer.init_args.weight_decay=0.05",
        "--model.init_args.lr_scheduler=torch.optim.lr_scheduler.StepLR",
        "--model.init_args.lr_scheduler.init_args.step_size=3",
        "--model.init_args.warmup_steps=0", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.callbacks=[]", "--run_dir", str(tmp_path / "adamw"),
    )
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    assert optimizer.param_groups[0]["lr"] == cli.model.hparams.lr  # the stage's own learning rate
    (config,) = cli.trainer.lr_scheduler_configs
    assert type(config.scheduler) is torch.optim.lr_scheduler.StepLR and config.scheduler.step_size == 3
    reloaded = DistillModule.load_from_checkpoint(tmp_path / "adamw" / "checkpoints" / "last.ckpt")
    assert type(reloaded.configure_optimizers()["optimizer"]) is torch.optim.AdamW  # the choice travels
    # the default: Adam and MultiStepLR on lr_milestones
    module = _warmup_module(teacher_run, steps=0)
    default = module.configure_optimizers()
    assert type(default["optimizer"]) is torch.optim.Adam
    assert sorted(default["lr_scheduler"]["scheduler"].milestones) == list(module.hparams.lr_milestones)
