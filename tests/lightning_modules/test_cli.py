"""The `lightning` CLI and run folders (DESIGN.md, "Run folders"), end to end on a small real stage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.cli import run_cli

TOY = {
    "model": {"class_path": "tests.lightning_modules.toy.PointColourModule"},
    "data": {"class_path": "tests.lightning_modules.toy.PointColourData", "init_args": {"num_points": 256}},
    "trainer": {
        "max_steps": 3,
        "accelerator": "cpu",
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "val_check_interval": 2,
        "log_every_n_steps": 1,
    },
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning"])  # the CLI is driven through main(args)
    """An empty folder standing in for the checkout, with the toy stage's config in a side folder."""
    cwd = tmp_path / "checkout"
    cwd.mkdir()
    conf = tmp_path / "conf" / "toy.yaml"
    conf.parent.mkdir()
    conf.write_text(yaml.safe_dump(TOY))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return cwd, conf


def run(*args: str):
    return run_cli(list(args))


def runs_of(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "runs" / "toy").iterdir() if not p.is_symlink())


def test_fit_writes_a_complete_run_folder_and_nothing_else(workdir):
    cwd, conf = workdir
    cli = run("fit", "--config", str(conf))
    (folder,) = runs_of(cwd)
    assert cli.run_dir.resolve() == folder.resolve()
    assert (folder / "config.yaml").is_file()
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert (folder / "checkpoints" / "best.ckpt").is_file()
    assert (folder / "renders").is_dir()
    assert (folder / "csv" / "metrics.csv").is_file()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["params/toy"] == sum(p.numel() for p in cli.model.parameters())
    assert 0 < metrics["toy/tracked/val/full/l1"] < 1
    assert (cwd / "runs" / "toy" / "latest").resolve() == folder.resolve()
    # inside the checkout nothing but runs/ is written (no lightning_logs/, wandb/, ...)
    assert sorted(p.name for p in cwd.iterdir()) == ["runs"]


def test_two_runs_from_the_same_folder_never_collide(workdir):
    cwd, conf = workdir
    a = run("fit", "--config", str(conf))
    b = run("fit", "--config", str(conf))
    assert a.run_dir != b.run_dir
    assert len(runs_of(cwd)) == 2
    for folder in runs_of(cwd):
        assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert (cwd / "runs" / "toy" / "latest").resolve() == b.run_dir.resolve()


def test_max_steps_mid_epoch_still_leaves_last_ckpt_and_metrics(workdir):
    cwd, conf = workdir
    # 256 points / batch 64 = 4 batches per epoch; stop after 1 step, before any validation
    run("fit", "--config", str(conf), "--trainer.max_steps=1", "--trainer.val_check_interval=4")
    (folder,) = runs_of(cwd)
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 1
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics == {"params/toy": 995}


def test_keyboard_interrupt_leaves_last_ckpt(workdir, monkeypatch):
    cwd, conf = workdir

    from tests.lightning_modules import toy

    original_step = toy.PointColourModule.training_step

    def step_then_ctrl_c(self, batch, batch_idx):
        if self.global_step == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(toy.PointColourModule, "training_step", step_then_ctrl_c)
    with pytest.raises(SystemExit):
        run("fit", "--config", str(conf), "--trainer.max_steps=10")
    (folder,) = runs_of(cwd)
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert json.loads((folder / "metrics.json").read_text())["params/toy"] == 995
    assert not (cwd / "runs" / "toy" / "latest").exists()  # an interrupted fit is not "latest"


def test_existing_run_folder_is_an_error_and_is_left_untouched(workdir, capsys):
    cwd, conf = workdir
    first = run("fit", "--config", str(conf), "--run_name", "mine")
    before = {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*")}
    with pytest.raises(SystemExit):
        run("fit", "--config", str(conf), "--run_name", "mine")
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("fit", "--config", str(conf), "--run_dir", str(first.run_dir))
    assert {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*")} == before


def test_resume_needs_run_dir_and_last_ckpt(workdir, capsys, tmp_path):
    cwd, conf = workdir
    with pytest.raises(SystemExit):
        run("fit", "--config", str(conf), "--ckpt_path", "last")
    assert "--run_dir" in capsys.readouterr().err
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    with pytest.raises(SystemExit):
        run("fit", "--config", str(conf), "--run_dir", str(empty), "--ckpt_path", "last")
    assert "last.ckpt does not exist" in capsys.readouterr().err
    assert not any(empty.iterdir())


def test_resume_continues_the_same_run(workdir, tmp_path):
    cwd, conf = workdir
    run_dir = tmp_path / "placed"
    run("fit", "--config", str(conf), "--run_dir", str(run_dir), "--trainer.max_steps=2")
    assert not (cwd / "runs" / "toy" / "latest").exists()  # placed elsewhere: latest untouched
    resumed = run("fit", "--config", str(conf), "--run_dir", str(run_dir), "--ckpt_path", "last", "--trainer.max_steps=5")
    assert resumed.trainer.global_step == 5
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 2  # first config kept


def test_saved_config_replays_into_a_new_folder(workdir):
    cwd, conf = workdir
    first = run("fit", "--config", str(conf), "--run_name", "orig", "--model.init_args.hidden=16")
    saved = first.run_dir / "config.yaml"
    stored = yaml.safe_load(saved.read_text())
    assert stored["run_dir"] is None and stored["run_name"] is None
    assert stored["model"]["init_args"]["hidden"] == 16
    second = run("fit", "--config", str(saved))
    assert second.run_dir != first.run_dir and second.run_dir.parent == first.run_dir.parent
    a, b = first.config["fit"].clone(), second.config["fit"].clone()
    for ns in (a, b):
        for key in ("run_dir", "run_name", "ckpt_path", "config"):  # run location + which file was read
            ns[key] = None
        ns["trainer"]["default_root_dir"] = None
    assert a == b


def test_later_flags_override_config_files(workdir, tmp_path):
    cwd, conf = workdir
    override = tmp_path / "conf" / "override.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"max_steps": 2}, "model": {"init_args": {"hidden": 8}}}))
    cli = run("fit", "--config", str(conf), "--config", str(override), "--model.init_args.hidden=12")
    assert cli.trainer.max_steps == 2
    assert cli.model.hparams.hidden == 12


def test_test_subcommand_gets_its_own_folder_and_metrics(workdir):
    cwd, conf = workdir
    fitted = run("fit", "--config", str(conf))
    ckpt = cwd / "runs" / "toy" / "latest" / "checkpoints" / "last.ckpt"
    tested = run("test", "--config", str(conf), "--ckpt_path", str(ckpt))
    assert tested.run_dir != fitted.run_dir
    metrics = json.loads((tested.run_dir / "metrics.json").read_text())
    assert 0 < metrics["toy/tracked/test/full/l1"] < 1


def test_console_script_lists_subcommands():
    exe = shutil.which("lightning") or pytest.fail("the `lightning` console script is not installed: run `make install`")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out
    module = subprocess.run(
        [sys.executable, "-m", "lightning_modules.cli", "fit", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--run_dir", "--run_name", "--runs_root", "--ckpt_path", "--trainer.max_steps"):
        assert flag in module.stdout


def test_a_test_run_reports_only_its_own_rows(workdir):
    cwd, conf = workdir
    run("fit", "--config", str(conf))
    ckpt = cwd / "runs" / "toy" / "latest" / "checkpoints" / "last.ckpt"
    tested = run("test", "--config", str(conf), "--ckpt_path", str(ckpt))
    metrics = json.loads((tested.run_dir / "metrics.json").read_text())
    assert set(metrics) == {"params/toy", "toy/tracked/test/full/l1"}  # no val rows carried over from the fit


def test_a_config_of_the_earlier_layout_is_read_into_the_network_entries(tmp_path, capsys):
    """A run's config.yaml saved before network entries (GAR sizes flat among the stage's args) still
    parses: the CLI reads a copy in the current layout, says so in one line, and leaves the file alone."""
    import yaml

    from lightning_modules.cli import upgrade_config_args

    old = tmp_path / "config.yaml"
    text = yaml.safe_dump({"model": {"class_path": "lightning_modules.gar.GARModule",
                                     "init_args": {"z_dim": 16, "base_channels": 12, "num_scales": 3, "residual": True,
                                                   "disc_channels": 16, "lr_g": 0.002}}})
    old.write_text(text)
    override = tmp_path / "override.yaml"  # names no class: takes the earlier file's
    override.write_text(yaml.safe_dump({"model": {"init_args": {"encoder_channels": 8}}}))
    args = upgrade_config_args(["fit", "--config", str(old), f"--config={override}", "--trainer.max_steps=1"])
    assert old.read_text() == text and args[0] == "fit" and args[-1] == "--trainer.max_steps=1"
    model = yaml.safe_load(open(args[2]))["model"]["init_args"]
    assert model["generator"] == {"class_path": "models.renderer.GARGenerator",
                                  "init_args": {"base_channels": 12, "num_scales": 3, "residual": True}}
    assert model["discriminator"]["init_args"] == {"base_channels": 16} and model["lr_g"] == 0.002
    assert "base_channels" not in model and args[3].startswith("--config=") and args[3] != f"--config={override}"
    encoder = yaml.safe_load(open(args[3][len("--config="):]))["model"]["init_args"]["encoder"]
    assert encoder == {"class_path": "models.encoder.InverseEncoder", "init_args": {"base_channels": 8}}
    assert "a config of the earlier layout" in capsys.readouterr().err
    current = ["fit", "--config", "experiments/gar.yaml"]
    assert upgrade_config_args(current) == current  # the current layout: untouched


def test_a_bad_network_entry_is_one_line(tmp_path, capsys):
    """A network entry the stage cannot build (an injected size that disagrees, a class that does not
    take an init arg) ends the CLI with the project's one-line message, not jsonargparse's report."""
    from tests.conftest import EXPERIMENTS, TINY_MESH

    common = ["fit", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
              "--runs_root", str(tmp_path)]
    for flag, message in (("--model.init_args.teacher.expression_dim=7",
                           "error: teacher.init_args.expression_dim=7 disagrees with the stage's 4"),
                          ("--model.init_args.teacher.width=7",
                           "error: teacher (models.teacher.PointAvatarTeacher): ")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli([*common, flag])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(message) and not any("Traceback" in line for line in err)
