"""Run folders: one convention for every stage (DESIGN.md, "Run folders").

Every ``fit``/``test``/``validate``/``predict`` run gets its own folder ``<runs_root>/<stage>/<run_name>/``
(or exactly ``--run_dir DIR``)::

    <run>/config.yaml            resolved config, run-location keys stored as null (replay -> new run)
    <run>/checkpoints/last.ckpt  (+ best.ckpt when the stage monitors a metric)
    <run>/metrics.json           flat keys <model>/<protocol>/<split>/<region>/<metric>, params/<model>, ...,
                                 upstream/<stage>/{path,sha256} (the upstream checkpoint a run was trained on)
    <run>/renders/               grids and videos
    <run>/csv/metrics.csv        CSVLogger (always); <run>/wandb/ when a WandbLogger is configured

This module holds the pure folder logic (:func:`resolve_run_dir`, :func:`point_latest`) and the
:class:`RunFolder` callback that writes config.yaml and metrics.json and leaves ``last.ckpt``
however a fit ends.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = [
    "RUN_DIR_ENV",
    "RunFolder",
    "RunFolderError",
    "UpstreamMissingError",
    "upstream_checkpoint",
    "get_run_folder",
    "is_metric_key",
    "point_latest",
    "record_metrics",
    "resolve_run_dir",
    "write_metrics_json",
]

#: Environment variable through which rank 0 hands the resolved run folder to the other ranks.
RUN_DIR_ENV = "AVATAR_RUN_DIR"

#: <model>/<protocol>/<split>/<region>/<metric> (lightning_modules.metrics.metric_key)
_MODEL_SPLIT_METRIC = re.compile(r"^[a-z][a-z0-9_]*/(tracked|refined)/(val|test)/(full|face)/[a-z][a-z0-9_]*$")
#: params/flops/flops_run per model; per-frame costs per model and protocol
_COUNT_KEY = re.compile(
    r"^((params|flops|flops_run)/[a-z][a-z0-9_]*|(flops_per_frame|ms_per_frame)/[a-z][a-z0-9_]*/(tracked|refined))$"
)
#: the upstream checkpoint a downstream run was trained on (lightning_modules.handoff.pin_upstream)
_UPSTREAM_KEY = re.compile(r"^upstream/[a-z][a-z0-9_]*/(path|sha256)$")
_SCALAR_KEYS = {"num_points", "params_ratio", "flops_ratio"}


class RunFolderError(ValueError):
    """A run-folder request that cannot be honoured (existing folder, missing last.ckpt, ...)."""


class UpstreamMissingError(FileNotFoundError):
    """The checkpoint of the stage this one builds on is missing (the CLI prints it as one line)."""


def upstream_checkpoint(path: str | os.PathLike | None, upstream: str, key: str, runs_root: str = "runs") -> Path:
    """The upstream stage's checkpoint: ``path``, or ``<runs_root>/<upstream>/latest/checkpoints/last.ckpt``.

    Args:
        path: the user's override (``model.init_args.<key>``), or None for the default.
        upstream: the upstream stage (``teacher``, ``distill``).
        key: the init arg that overrides it, named in the error.

    Raises:
        UpstreamMissingError: when the file does not exist; the message names the command that makes it.
    """
    ckpt = Path(path) if path is not None else Path(runs_root) / upstream / "latest" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UpstreamMissingError(
            f"no {upstream} checkpoint at {ckpt}: run `lightning fit --config experiments/{upstream}.yaml` first, "
            f"or point model.init_args.{key} at one"
        )
    return ckpt


def is_metric_key(key: str) -> bool:
    """Whether ``key`` belongs in metrics.json (DESIGN.md, "metrics.json (one schema)")."""
    return bool(_MODEL_SPLIT_METRIC.match(key) or _COUNT_KEY.match(key) or _UPSTREAM_KEY.match(key)
                or key in _SCALAR_KEYS)


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def resolve_run_dir(
    stage: str,
    subcommand: str,
    runs_root: str | os.PathLike = "runs",
    run_name: str | None = None,
    run_dir: str | os.PathLike | None = None,
    ckpt_path: str | None = None,
) -> tuple[Path, str | None]:
    """Choose and create the run folder of one CLI run.

    Args:
        stage: the stage's short name (``teacher``, ``distill``, ``gar``, ...).
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        runs_root: folder holding ``<stage>/<run_name>`` folders.
        run_name: folder name under ``<runs_root>/<stage>``; default a timestamp (``-2``, ``-3``, ...
            appended when that name is taken, so two runs started in the same second never collide).
        run_dir: exact folder for the run (overrides ``runs_root``/``run_name``).
        ckpt_path: the subcommand's ``ckpt_path``. ``"last"`` with ``fit`` resumes the run in
            ``run_dir`` (or ``run_name``) from its ``checkpoints/last.ckpt``.

    Returns:
        ``(run_dir, ckpt_path)`` with ``ckpt_path`` resolved to a file path when it was ``"last"``.

    Raises:
        RunFolderError: resuming without a run folder, resuming a folder without ``last.ckpt``,
            ``last`` outside ``fit``, or an existing, non-empty run folder without resuming.
    """
    explicit = run_dir is not None or run_name is not None
    if run_dir is not None:
        folder = Path(run_dir)
    elif run_name is not None:
        folder = Path(runs_root) / stage / run_name
    else:
        folder = None

    if ckpt_path == "last":
        if subcommand != "fit":
            raise RunFolderError(
                f"--ckpt_path last only resumes a fit; for `{subcommand}` pass the checkpoint file "
                f"(e.g. {Path(runs_root) / stage / 'latest' / 'checkpoints' / 'last.ckpt'})"
            )
        if folder is None:
            raise RunFolderError("--ckpt_path last needs the run to resume: add --run_dir <that run folder>")
        last = folder / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise RunFolderError(
                f"cannot resume: {last} does not exist (resume = --run_dir <run> --ckpt_path last; "
                "start a new run without --ckpt_path)"
            )
        return folder, str(last)

    if folder is not None:
        if folder.exists() and any(folder.iterdir()):
            raise RunFolderError(
                f"run folder {folder} already exists; choose another --run_dir/--run_name, "
                "or resume it with --ckpt_path last"
            )
        folder.mkdir(parents=True, exist_ok=True)
        return folder, ckpt_path

    assert not explicit
    base = Path(runs_root) / stage
    base.mkdir(parents=True, exist_ok=True)
    stamp = _timestamp()
    for attempt in range(1, 10_000):
        candidate = base / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()  # atomic: a concurrent run takes the next name
        except FileExistsError:
            continue
        return candidate, ckpt_path
    raise RunFolderError(f"could not create a new run folder under {base}")


def point_latest(run_dir: Path, runs_root: str | os.PathLike, stage: str) -> Path | None:
    """Point ``<runs_root>/<stage>/latest`` at ``run_dir`` when the run lives there.

    Runs placed elsewhere with ``--run_dir`` are left alone (returns None). The link is relative
    and replaced atomically.
    """
    stage_dir = (Path(runs_root) / stage).resolve()
    run_dir = Path(run_dir).resolve()
    if run_dir.parent != stage_dir:
        return None
    link = stage_dir / "latest"
    tmp = stage_dir / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)
    return link


def _dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as flat ``{"model.init_args.lr": 0.001, ...}`` (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_dotted(value, name))
        else:
            flat[name] = value
    return flat


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().item() if value.numel() == 1 else value.detach().cpu().tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf: a metric that cannot be computed is null
    return value


def write_metrics_json(path: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` (flat keys) to ``path`` atomically, keys sorted, non-finite as null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({k: _jsonable(v) for k, v in sorted(metrics.items())}, indent=2) + "\n")
    os.replace(tmp, path)


class RunFolder(pl.Callback):
    """Writes config.yaml and metrics.json into the run folder and leaves ``last.ckpt`` on every fit end.

    At setup every rank adopts rank 0's run folder, and rank 0 hands the resolved config to a
    WandbLogger as the W&B run's config, keys dotted as on the command line (``model.init_args.lr``).

    Metrics come from three places: keys logged with ``self.log`` that match the schema
    (:func:`is_metric_key`), the module's optional ``run_metrics() -> dict`` (counts such as
    ``params/teacher``, ``num_points``, or ``None`` for a metric that cannot be computed here), and
    other callbacks through :func:`record_metrics` (the FLOP counter).

    Args:
        run_dir: the run folder (already created by :func:`resolve_run_dir`).
        config_text: the resolved config as YAML, run-location keys already null; written once
            to ``config.yaml`` on rank 0 (None: none written).
    """

    def __init__(self, run_dir: str | os.PathLike, config_text: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.config_text = config_text
        self.metrics: dict[str, Any] = {}

    # -- paths -------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def renders_dir(self) -> Path:
        return self.run_dir / "renders"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.json"

    # -- metrics -----------------------------------------------------------------------------
    def record(self, metrics: dict[str, Any]) -> None:
        """Merge ``metrics`` (flat schema keys) into what metrics.json will hold."""
        for key, value in metrics.items():
            if not is_metric_key(key):
                raise ValueError(f"{key!r} is not a metrics.json key (<model>/<protocol>/<split>/<region>/<metric>, params/<model>, ...)")
            self.metrics[key] = _jsonable(value)

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in trainer.callback_metrics.items():
            if is_metric_key(key):
                self.metrics[key] = _jsonable(value)
        run_metrics = getattr(pl_module, "run_metrics", None)
        if callable(run_metrics):
            self.record(run_metrics())

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect(trainer, pl_module)
        if trainer.is_global_zero:
            write_metrics_json(self.metrics_path, self.metrics)

    # -- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # ranks that torchrun or SLURM started beside rank 0 parsed the CLI on their own: all take its folder
        self.run_dir = Path(trainer.strategy.broadcast(str(self.run_dir), src=0))
        if trainer.is_global_zero:
            self.renders_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if self.config_text is not None and not (self.run_dir / "config.yaml").exists():
                (self.run_dir / "config.yaml").write_text(self.config_text)
            if self.config_text is not None:
                config = _dotted(yaml.safe_load(self.config_text))  # {"model.init_args.lr": 0.001, ...}
                for logger in trainer.loggers:
                    if isinstance(logger, WandbLogger):  # the W&B run's config: our keys, as sweeps name them
                        logger.log_hyperparams(config)
            if self.metrics_path.is_file():  # a resumed run keeps its earlier rows
                self.metrics = {**json.loads(self.metrics_path.read_text()), **self.metrics}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # max_steps in mid-epoch, max_epochs, early stopping: always leave last.ckpt + metrics.json
        trainer.save_checkpoint(self.checkpoint_dir / "last.ckpt")
        self._write(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Ctrl-C or a crash: no collective calls here (other ranks may be gone); rank 0 dumps.
        if not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        try:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_dir / "last.ckpt.tmp"
            torch.save(checkpoint, tmp)
            os.replace(tmp, self.checkpoint_dir / "last.ckpt")
            rank_zero_info(f"interrupted: saved {self.checkpoint_dir / 'last.ckpt'}")
        except Exception as err:  # never hide the original exception behind ours
            rank_zero_warn(f"could not save last.ckpt after {type(exception).__name__}: {err}")
        try:
            self._collect(trainer, pl_module)
        except Exception as err:
            rank_zero_warn(f"could not collect metrics after {type(exception).__name__}: {err}")
        write_metrics_json(self.metrics_path, self.metrics)


def get_run_folder(trainer: pl.Trainer) -> RunFolder:
    """The trainer's :class:`RunFolder` callback.

    Raises:
        RuntimeError: when the trainer has none (it was not started by our ``lightning`` CLI).
    """
    for callback in trainer.callbacks:
        if isinstance(callback, RunFolder):
            return callback
    raise RuntimeError("no RunFolder callback on this trainer: start the run with the `lightning` CLI")


def record_metrics(trainer: pl.Trainer, metrics: dict[str, Any]) -> None:
    """Add ``metrics`` (flat schema keys) to the run's metrics.json (see :func:`get_run_folder`)."""
    get_run_folder(trainer).record(metrics)
