"""W&B: an offline run in the run folder whose config holds our hyperparameters and whose media
hold the render grids; a resumed fit continues the same W&B run.

conftest sets WANDB_MODE=disabled for the session; these tests set it themselves (monkeypatch puts
it back). An offline run keeps its records in ``<run>/wandb/offline-run-*/run-<id>.wandb`` (no
``files/config.yaml`` is written offline); :func:`read_offline_run` reads that log with wandb's
own record reader.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import EXPERIMENTS, TINY_MESH, run_stage

LR = 0.00042  # a value no config holds, to find in the W&B config


def _records(log: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    store = DataStore()
    store.open_for_scan(str(log))
    records = []
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


def _item_key(item) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def read_offline_run(folder: Path, timeout: float = 60.0) -> dict:
    """``{"id", "config", "history_keys"}`` of an offline W&B run folder (``offline-run-<time>-<id>``).

    wandb's service writes the log after ``finish()`` returns: wait (up to ``timeout`` seconds)
    for the run's exit record.
    """
    (log,) = folder.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    records = _records(log)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{log} has no exit record after {timeout} s"
        time.sleep(0.5)
        records = _records(log)
    run_id, config, history_keys = None, {}, set()
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({_item_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            history_keys |= {i.key or i.nested_key[0] for i in record.history.item}  # images: (key, field)
    return {"id": run_id, "config": config, "history_keys": history_keys}


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture
def fresh_wandb():
    """wandb reads its environment once per process (``wandb.setup``): start from a fresh setup, so
    the WANDB_MODE set here counts even after earlier tests ran with the session's "disabled", and
    leave a fresh one behind."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def wandb_offline(monkeypatch, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def _fit(run_dir: Path, *extra: str):
    return run_stage(
        "fit", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
        f"--model.init_args.lr={LR}", "--run_dir", str(run_dir), *extra,
    )


def test_not_logged_in_runs_offline_in_the_run_folder(tmp_path, monkeypatch, fresh_wandb):
    import lightning_modules.cli as cli_module

    monkeypatch.delenv("WANDB_MODE")  # restored to the session's "disabled" afterwards
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(cli_module, "_wandb_logged_in", lambda: False)
    run_dir = tmp_path / "run"
    _fit(run_dir, "--trainer.max_steps=1")
    assert os.environ["WANDB_MODE"] == "offline"
    (wandb_run,) = _offline_runs(run_dir)
    assert read_offline_run(wandb_run)["config"]["model.init_args.lr"] == LR


def test_wandb_run_holds_config_and_render_grids(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    _fit(run_dir)  # 2 steps, a validation after each
    (wandb_run,) = _offline_runs(run_dir)
    run = read_offline_run(wandb_run)
    config = run["config"]
    # the resolved config, keyed as on the command line (and as sweeps name their parameters)
    assert config["model.init_args.lr"] == LR
    assert config["model.class_path"] == "lightning_modules.teacher.TeacherModule"
    assert config["model.init_args.loss_weights.ssim"] == 0.2
    assert config["data.class_path"] == "datamodules.mesh_views.MeshViewsDataModule"
    assert config["trainer.max_steps"] == 2
    assert config["run_dir"] is None  # as in config.yaml: replaying it makes a new run
    # metrics and the RenderLogger's grids (one per validation) reached the run
    assert "teacher/train/loss" in run["history_keys"] and "val/renders" in run["history_keys"]
    grids = sorted((wandb_run / "files" / "media" / "images").rglob("renders_*.png"))
    assert len(grids) == len(sorted((run_dir / "renders").glob("val_*.png"))) == 2


def test_resumed_fit_continues_its_wandb_run(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    _fit(run_dir, "--trainer.max_steps=1")
    resumed = _fit(run_dir, "--ckpt_path", "last", "--trainer.max_steps=2")
    assert resumed.run_dir == run_dir
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    first, second = (read_offline_run(p) for p in _offline_runs(run_dir))
    assert first["id"] == second["id"]  # one W&B run, continued
    assert second["config"]["model.init_args.lr"] == LR and second["config"]["trainer.max_steps"] == 2
    assert "teacher/train/loss" in second["history_keys"]
