"""Handoff by checkpoint: a downstream run binds the upstream it was trained on, never a re-pointed `latest`."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
import yaml

from lightning_modules.distill import DistillModule
from lightning_modules.handoff import (
    UpstreamChangedError,
    class_from_path,
    file_sha256,
    load_teacher,
    pin_upstream,
)
from lightning_modules.run_folder import UpstreamMissingError, point_latest
from lightning_modules.teacher import TeacherModule
from tests.conftest import EXPERIMENTS, TINY_MESH, run_stage


def _copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("wandb", "csv", "renders"))
    return dst


def test_pin_upstream_follows_latest_and_hashes_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "teacher" / "20260101-000000" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"teacher bytes")
    point_latest(run.parent, "runs", "teacher")
    path, digest = pin_upstream(None, None, "teacher", "teacher_ckpt")
    assert str(path) == "runs/teacher/20260101-000000/checkpoints/last.ckpt"  # the run, not `latest`
    assert digest == hashlib.sha256(b"teacher bytes").hexdigest() == file_sha256(path)
    assert pin_upstream(str(path), digest, "teacher", "teacher_ckpt") == (path, digest)  # the record checks out

    (run / "last.ckpt").write_bytes(b"other bytes!!")  # same size, new content
    with pytest.raises(UpstreamChangedError, match=r"changed since this run was trained on it.*teacher_ckpt_sha256=null"):
        pin_upstream(str(path), digest, "teacher", "teacher_ckpt")
    (run / "last.ckpt").unlink()
    with pytest.raises(UpstreamMissingError, match=r"this run was trained on, .*last.ckpt .*is gone"):
        pin_upstream(str(path), digest, "teacher", "teacher_ckpt")


def test_class_from_path_names_a_missing_class():
    assert class_from_path("models.student.Student").__name__ == "Student"
    with pytest.raises(ImportError, match="cannot import class_path 'models.student.NoSuchStudent'"):
        class_from_path("models.student.NoSuchStudent")


def test_teacher_checkpoint_names_its_class_and_loads_without_the_stage(teacher_run):
    ckpt = teacher_run / "checkpoints" / "last.ckpt"
    entry = torch.load(ckpt, weights_only=False)["teacher"]
    assert entry["class_path"] == "models.teacher.PointAvatarTeacher" and entry["init_args"]["expression_dim"] == 4
    teacher, codes = load_teacher(ckpt)
    reference = TeacherModule.load_from_checkpoint(ckpt, map_location="cpu")
    for name, value in reference.teacher.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name
    assert codes is not None and torch.equal(codes.expression, reference.codes.expression)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_teacher_checkpoint_from_before_the_entry_still_loads(teacher_run, tmp_path):
    old = torch.load(teacher_run / "checkpoints" / "last.ckpt", weights_only=False)
    old.pop("teacher")
    old["state_dict"].pop("teacher.expression_scale")  # and from before the expression scale
    torch.save(old, tmp_path / "old.ckpt")
    teacher, _ = load_teacher(tmp_path / "old.ckpt")
    assert teacher.expression_dim == 4 and torch.equal(teacher.expression_scale, torch.ones(4))


def test_reloaded_distillation_binds_its_own_teacher_not_latest(teacher_run, tmp_path, monkeypatch):
    """Fit a distillation on `latest`, re-point `latest` at another teacher, reload the first: it binds
    its own teacher; with that file changed or gone, the reload is one line."""
    monkeypatch.chdir(tmp_path)
    first = _copy_run(teacher_run, tmp_path / "runs" / "teacher" / "first")
    point_latest(first, "runs", "teacher")
    run_stage(
        "fit", "--config", str(EXPERIMENTS / "distill.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.warmup_steps=0", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.callbacks=[]", "--run_name", "on_first",
    )
    distill = tmp_path / "runs" / "distill" / "on_first"
    recorded = "runs/teacher/first/checkpoints/last.ckpt"
    digest = file_sha256(first / "checkpoints" / "last.ckpt")
    config = yaml.safe_load((distill / "config.yaml").read_text())["model"]["init_args"]
    assert (config["teacher_ckpt"], config["teacher_ckpt_sha256"]) == (recorded, digest)
    metrics = json.loads((distill / "metrics.json").read_text())
    assert (metrics["upstream/teacher/path"], metrics["upstream/teacher/sha256"]) == (recorded, digest)

    # a second teacher (other weights) becomes `latest`
    second = _copy_run(teacher_run, tmp_path / "runs" / "teacher" / "second")
    state = torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)
    state["state_dict"]["teacher.shading.layers.0.bias"] += 1.0
    torch.save(state, second / "checkpoints" / "last.ckpt")
    point_latest(second, "runs", "teacher")

    module = DistillModule.load_from_checkpoint(distill / "checkpoints" / "last.ckpt", map_location="cpu")
    first_teacher, _ = load_teacher(first / "checkpoints" / "last.ckpt")
    for name, value in first_teacher.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[name], value), name
    assert module.hparams.teacher_ckpt == recorded

    # the recorded teacher changed, then gone: one line each, naming what to do
    shutil.copy(second / "checkpoints" / "last.ckpt", first / "checkpoints" / "last.ckpt")
    with pytest.raises(UpstreamChangedError) as changed:
        DistillModule.load_from_checkpoint(distill / "checkpoints" / "last.ckpt", map_location="cpu")
    assert "\n" not in str(changed.value) and recorded in str(changed.value)
    (first / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(UpstreamMissingError) as gone:
        DistillModule.load_from_checkpoint(distill / "checkpoints" / "last.ckpt", map_location="cpu")
    assert "\n" not in str(gone.value) and "is gone" in str(gone.value)


@pytest.mark.slow
def test_a_fit_resumed_after_latest_moved_keeps_its_teacher(teacher_run, tmp_path, monkeypatch):
    """`--ckpt_path last` with a config that leaves teacher_ckpt unset resumes on the recorded teacher."""
    monkeypatch.chdir(tmp_path)
    first = _copy_run(teacher_run, tmp_path / "runs" / "teacher" / "first")
    point_latest(first, "runs", "teacher")
    common = ("--config", str(EXPERIMENTS / "distill.yaml"), "--config", str(TINY_MESH),
              "--model.init_args.warmup_steps=0", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]",
              "--run_name", "resumed")
    run_stage("fit", *common, "--trainer.max_steps=1")
    second = _copy_run(teacher_run, tmp_path / "runs" / "teacher" / "second")
    point_latest(second, "runs", "teacher")
    cli = run_stage("fit", *common, "--trainer.max_steps=2", "--ckpt_path", "last")
    assert cli.model.hparams.teacher_ckpt == "runs/teacher/first/checkpoints/last.ckpt"
    assert cli.trainer.global_step == 2


def test_a_distillation_checkpoint_from_before_pinning_and_class_paths_still_loads(distill_run, teacher_run, tmp_path):
    """The layout before this change: no recorded hash, the student entry and config without a class
    path. It loads (binding the teacher its config names, and recording it now)."""
    from lightning_modules.handoff import load_student
    from models.student import Student

    old = torch.load(distill_run / "checkpoints" / "last.ckpt", weights_only=False)
    hparams = old["hyper_parameters"]
    hparams.pop("teacher_ckpt_sha256")
    spec = hparams["student"]
    hparams["student"] = dict(spec["init_args"]) if spec and "class_path" in spec else spec
    old["student"].pop("class_path")
    torch.save(old, tmp_path / "old.ckpt")
    assert isinstance(load_student(tmp_path / "old.ckpt"), Student)
    module = DistillModule.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert isinstance(module.student, Student)
    assert module.hparams.teacher_ckpt_sha256 == file_sha256(teacher_run / "checkpoints" / "last.ckpt")


def test_a_command_line_student_argument_overrides_the_configs():
    from lightning_modules.handoff import build_student

    spec = {"class_path": "models.student.Student", "init_args": {"k": 8, "latent_dim": 32}, "latent_dim": 16}
    student = build_student(spec, expression_dim=4)
    assert student.latent_dim == 16 and student.k == 8 and student.expression_dim == 4
    assert student.spec["init_args"] == {"k": 8, "latent_dim": 16, "expression_dim": 4}
    old = build_student({"k": 8}, expression_dim=4)  # a config from before class paths: Student's init args
    assert type(old).__name__ == "Student" and old.k == 8
    with pytest.raises(TypeError, match="not a models.student.PointStudent subclass"):
        build_student({"class_path": "torch.nn.Linear"}, expression_dim=4)


def test_a_network_entry_without_class_path_is_refused_and_injected_sizes_must_agree():
    """A later config replaces an entry as a whole: {base_channels: 12} alone would silently drop the
    earlier config's init args (residual, ...), so only the student's old bare form is read."""
    from lightning_modules.handoff import build_model, spec_parts

    with pytest.raises(ValueError, match="the generator entry has no class_path"):
        build_model({"base_channels": 12}, "models.renderer.GARGenerator", {}, role="generator")
    with pytest.raises(ValueError, match="the student entry has no class_path"):
        spec_parts({"init_args": {"k": 8}}, "models.student.Student", "student", bare_args=True)
    with pytest.raises(ValueError, match=r"generator.init_args.z_dim=8 disagrees with the stage's 16"):
        build_model({"class_path": "models.renderer.GARGenerator", "init_args": {"z_dim": 8}},
                    "models.renderer.GARGenerator", {"z_dim": 16}, role="generator")
    # the flag form (a key beside class_path) wins over init_args, in spec_parts and so in build_model
    spec = {"class_path": "models.renderer.GARGenerator", "init_args": {"activation_gain": 1.0}, "activation_gain": 2.0}
    assert spec_parts(spec, "x")[1] == {"activation_gain": 2.0}
    assert build_model(spec, "x", {"feature_channels": 4, "z_dim": 4}).encoder[0].gain == 2.0
