"""The ``lightning`` command: LightningCLI with run folders (DESIGN.md, "Stages and commands").

Usage::

    lightning fit --config experiments/teacher.yaml [--config experiments/overrides/tiny_mesh.yaml] [--key value ...]
    lightning test --config experiments/teacher.yaml --ckpt_path runs/teacher/latest/checkpoints/last.ckpt
    lightning fit --config experiments/teacher.yaml --run_dir runs/teacher/<run> --ckpt_path last   # resume
    python -m lightning_modules.cli ...   # the same

Model and data are chosen by ``class_path`` (subclass mode). Later ``--config`` files and flags
override earlier ones. The run-location keys (``run_dir``, ``run_name``, ``runs_root``) are ours;
every run gets a fresh folder (see :mod:`lightning_modules.run_folder`). A fit writes
``checkpoints/last.ckpt`` every ``--checkpoint_every_n_batches`` training batches (default 100), and its
checkpoints carry the random states and the data position, so a resumed fit continues exactly
(:mod:`lightning_modules.resume`).

Several processes (DDP): rank 0 resolves and creates the run folder; the processes Lightning's
launcher starts from it read it from the environment, ranks that torchrun or SLURM start adopt it
at setup (:class:`~lightning_modules.run_folder.RunFolder`). A module declaring
``ddp_find_unused_parameters = True`` (the GAR's phases) gets DDP's unused-parameter search. The
W&B run a call starts ends with it; a resumed fit continues the run's W&B run.

A stage module declares ``stage`` (its folder under ``runs/``) and may declare ``monitor`` /
``monitor_mode`` (the metric that selects ``best.ckpt``) and ``upstream = (stage, init_arg)``
(the stage whose checkpoint it loads, checked before a run folder is made, and pinned: the saved
config records the file resolved, ``latest`` followed, and its SHA-256 as ``<init_arg>_sha256``;
:mod:`lightning_modules.handoff`). The protocol is declared once in :class:`~lightning_modules.stage.Stage`. Every datamodule exposes
``expression_dim`` and ``image_size``, linked into the model's init args at instantiation.
"""

from __future__ import annotations

import copy
import netrc
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.handoff import (
    NetworkEntryError,
    UpstreamChangedError,
    class_from_path,
    pin_upstream,
    read_checkpoint,
)
from lightning_modules.resume import PeriodicCheckpoint, RandomState
from lightning_modules.run_folder import (
    RUN_DIR_ENV,
    RunFolder,
    RunFolderError,
    UpstreamMissingError,
    point_latest,
    resolve_run_dir,
)

__all__ = ["AvatarCLI", "main", "run_cli", "stage_of", "upgrade_config_args"]

_RUN_KEYS = ("run_dir", "run_name")


def _recorded_upstream(cfg, stage: str, key: str) -> tuple[str | None, str | None]:
    """The upstream path and hash a fit to be resumed recorded in its ``last.ckpt`` ((None, None) if none)."""
    run_dir = cfg.run_dir or (Path(cfg.runs_root) / stage / cfg.run_name if cfg.run_name else None)
    last = Path(run_dir) / "checkpoints" / "last.ckpt" if run_dir is not None else None
    if last is None or not last.is_file():
        return None, None  # resolve_run_dir reports the missing checkpoint
    saved = read_checkpoint(last).get("hyper_parameters") or {}
    return saved.get(key), saved.get(f"{key}_sha256")


def stage_of(class_path: str) -> str:
    """The run-folder stage name of a LightningModule given by its ``class_path``.

    The class attribute ``stage`` when set, else the class name in lower case.
    """
    cls = class_from_path(class_path)
    return getattr(cls, "stage", None) or cls.__name__.lower()


#: Set with RUN_DIR_ENV by rank 0: its process id, so only the processes Lightning's launcher starts
#: from it (its children) take the folder from the environment, never a stale variable.
_RUN_DIR_OWNER_ENV = "AVATAR_RUN_DIR_OWNER"


def _global_rank() -> int:
    """This process's rank as the launcher's environment tells it before Lightning starts; only
    whether it is 0 matters (rank 0 makes the run folder). torchrun sets RANK, SLURM's srun
    SLURM_PROCID; Lightning's own launcher LOCAL_RANK (and NODE_RANK on several nodes)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return int(os.environ.get("NODE_RANK") or 0) * 1_000_000 + int(os.environ.get("LOCAL_RANK") or 0)


def _started_by_rank_zero() -> bool:
    """Whether Lightning's subprocess launcher started this process from rank 0 (its parent), which
    left the resolved run folder in RUN_DIR_ENV (it gives its children LOCAL_RANK 1, 2, ...)."""
    return (
        int(os.environ.get("LOCAL_RANK") or 0) > 0
        and bool(os.environ.get(RUN_DIR_ENV))
        and os.environ.get(_RUN_DIR_OWNER_ENV) == str(os.getppid())
    )


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def _previous_wandb_id(run_dir: Path) -> str | None:
    """The id of the W&B run in ``run_dir/wandb`` (``latest-run`` -> ``[offline-]run-<time>-<id>``), or None."""
    latest = run_dir / "wandb" / "latest-run"
    if not latest.exists():
        return None
    name = latest.resolve().name
    return name.rsplit("-", 1)[1] if name.count("-") >= 2 else None


def _as_list(value: Any) -> list:
    if value is None or value is True or value is False:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


class AvatarCLI(LightningCLI):
    """LightningCLI with one run folder per run, CSV logging always, and dataset facts linked to the model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", None)  # RunFolder writes config.yaml (run keys null)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "yaml"})
        super().__init__(*args, **kwargs)

    # -- parser ------------------------------------------------------------------------------
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--runs_root", type=str, default="runs", help="folder holding <stage>/<run_name>/")
        parser.add_argument("--run_name", type=str | None, default=None, help="run folder name (default: timestamp)")
        parser.add_argument("--run_dir", type=str | None, default=None, help="exact run folder (resume: + --ckpt_path last)")
        parser.add_argument(
            "--checkpoint_every_n_batches", type=int, default=100,
            help="write checkpoints/last.ckpt every N training batches (0: only at validation and at the end)",
        )
        parser.link_arguments("data.expression_dim", "model.init_args.expression_dim", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")

    # -- run folder ----------------------------------------------------------------------------
    def instantiate_classes(self) -> None:
        """Lightning's, with the project's own errors from a model's construction (a bad network entry, an
        upstream checkpoint gone or changed) as one line, not under jsonargparse's union-type report."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, (NetworkEntryError, UpstreamChangedError,
                                                                UpstreamMissingError)):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            self.parser.error(str(cause))

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub]
        self.stage = stage_of(cfg.model.class_path)
        self.runs_root = cfg.runs_root
        if cfg.checkpoint_every_n_batches < 0:
            self.parser.error(f"--checkpoint_every_n_batches must be >= 0, got {cfg.checkpoint_every_n_batches}")

        # a stage that builds on another checks its checkpoint before any folder is made
        # and pins it: config.yaml records the file it resolved and its hash (never `latest`)
        upstream = getattr(class_from_path(cfg.model.class_path), "upstream", None)
        if upstream is not None:
            upstream_stage, key = upstream
            given = cfg.model.init_args.get(key), cfg.model.init_args.get(f"{key}_sha256")
            if given == (None, None) and cfg.get("ckpt_path") == "last":  # resume: the upstream it was trained on
                given = _recorded_upstream(cfg, self.stage, key)
            try:
                path, digest = pin_upstream(*given, upstream_stage, key, cfg.runs_root)
            except (UpstreamMissingError, UpstreamChangedError) as err:
                self.parser.error(str(err))
            cfg.model.init_args[key], cfg.model.init_args[f"{key}_sha256"] = str(path), digest

        clean = copy.deepcopy(cfg)
        for key in _RUN_KEYS:
            clean[key] = None
        if cfg.get("ckpt_path") == "last":
            clean["ckpt_path"] = None
        config_text = self._parser(sub).dump(clean, skip_unset=False)

        ckpt = cfg.get("ckpt_path")
        rank = _global_rank()
        if _started_by_rank_zero():
            # a rank Lightning's launcher started from rank 0, which resolved and created the folder
            run_dir = Path(os.environ[RUN_DIR_ENV])
            ckpt_path = str(run_dir / "checkpoints" / "last.ckpt") if ckpt == "last" else ckpt
        elif rank != 0:
            # a rank torchrun/SLURM started beside rank 0: it creates nothing; the folder named here is
            # replaced by rank 0's when the ranks meet (RunFolder.setup broadcasts it)
            if cfg.run_dir is not None:
                run_dir = Path(cfg.run_dir)
            else:
                run_dir = Path(cfg.runs_root) / self.stage / (cfg.run_name or f".rank{rank}-awaiting-rank0")
            ckpt_path = str(run_dir / "checkpoints" / "last.ckpt") if ckpt == "last" else ckpt
        else:
            try:
                run_dir, ckpt_path = resolve_run_dir(self.stage, sub, cfg.runs_root, cfg.run_name, cfg.run_dir, ckpt)
            except RunFolderError as err:
                self.parser.error(str(err))
            os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
            os.environ[_RUN_DIR_OWNER_ENV] = str(os.getpid())
        self.run_dir = run_dir
        rank_zero_info(f"run folder: {run_dir}")
        if "ckpt_path" in cfg:
            cfg.ckpt_path = ckpt_path

        trainer = cfg.trainer
        trainer.default_root_dir = str(run_dir)
        for logger in _as_list(trainer.get("logger")):
            class_path = getattr(logger, "class_path", "") or ""
            if class_path.endswith("WandbLogger"):
                logger.init_args.save_dir = str(run_dir)
                logger.init_args.name = logger.init_args.get("name") or f"{self.stage}/{run_dir.name}"
                if ckpt == "last" and not logger.init_args.get("id") and not os.environ.get("WANDB_RUN_ID"):
                    logger.init_args.id = _previous_wandb_id(run_dir)  # the resumed fit continues its W&B run
                    logger.init_args.resume = logger.init_args.get("resume") or "allow"
                if not os.environ.get("WANDB_MODE") and not _wandb_logged_in():
                    os.environ["WANDB_MODE"] = "offline"  # no account or network needed; sweeps run online
                    rank_zero_info("W&B: not logged in and WANDB_MODE unset -> offline run in the run folder")
            elif class_path.endswith("CSVLogger"):
                logger.init_args.save_dir = str(run_dir)
                logger.init_args.name = ""
                logger.init_args.version = "csv"
        self._config_text = config_text if rank == 0 and not _started_by_rank_zero() else None

    def _parse_ckpt_path(self) -> None:
        """As Lightning's (``--ckpt_path``: the checkpoint's hyper-parameters become the model's config),
        with a checkpoint of the earlier layout first moved into the current one
        (:meth:`~lightning_modules.stage.Stage.upgrade_hparams`)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        hparams = dict(read_checkpoint(ckpt_path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = hparams.pop("_class_path", None)
        # a checkpoint saved outside the CLI names no class: the config's model reads it
        upgrade = getattr(class_from_path(class_path or self.config[subcommand].model.class_path), "upgrade_hparams",
                          None)
        hparams = upgrade(hparams) if upgrade else hparams
        if class_path is not None:
            hparams = {"class_path": class_path, "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"the hyper-parameters of {ckpt_path} do not parse as this model's config\n")
            raise

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        extra_callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}

        loggers = _as_list(config.get("logger"))
        if config.get("logger") is not False and not any(isinstance(lg, CSVLogger) for lg in loggers):
            loggers.append(CSVLogger(save_dir=str(self.run_dir), name="", version="csv"))
        config["logger"] = loggers or False

        callbacks = _as_list(config.get("callbacks"))
        callbacks.append(RunFolder(self.run_dir, self._config_text))
        if not any(isinstance(cb, RandomState) for cb in callbacks):
            callbacks.append(RandomState())  # exact resume: RNG states in every checkpoint
        checkpointing = config.get("enable_checkpointing", True) is not False
        every = self.config[self.subcommand].checkpoint_every_n_batches
        if checkpointing and every > 0:  # a run killed without warning resumes from at most `every` batches back
            callbacks.append(PeriodicCheckpoint(self.run_dir / "checkpoints", every))
        if checkpointing and not any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
            monitor = getattr(self.model, "monitor", None)
            callbacks.append(
                ModelCheckpoint(
                    dirpath=str(self.run_dir / "checkpoints"),
                    filename="best",
                    monitor=monitor,
                    mode=getattr(self.model, "monitor_mode", "max"),
                    save_top_k=1 if monitor else 0,
                    save_last=True,
                    auto_insert_metric_name=False,
                )
            )
        config["callbacks"] = callbacks
        return self._instantiate_trainer(config, extra_callbacks)

    def after_instantiate_classes(self) -> None:
        strategy = self.trainer.strategy
        if getattr(self.model, "ddp_find_unused_parameters", False) and isinstance(strategy, DDPStrategy):
            # manual optimisation in phases (GAR: N, G, D): each backward reaches one optimizer's
            # parameters only, so DDP must look for the unused ones, as strategy
            # "ddp_find_unused_parameters_true" does; plain "ddp" (or "auto") gets it here (no public setter)
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)

    def after_fit(self) -> None:
        if self.trainer.is_global_zero and self.trainer.state.status == "finished" and not self.trainer.interrupted:
            link = point_latest(self.run_dir, self.runs_root, self.stage)
            if link is not None:
                rank_zero_info(f"{link} -> {self.run_dir.name}")


def upgrade_config_args(args: list[str]) -> list[str]:
    """``args`` with each ``--config`` file of the earlier layout (a stage's network sizes flat among its
    init args, as runs made before network entries saved their ``config.yaml``) replaced by a copy in the
    current layout (:meth:`~lightning_modules.stage.Stage.upgrade_hparams`), said in one line on stderr.
    A file that names no model class takes the class of an earlier ``--config``. Other arguments and
    current-layout files are returned as they are; the user's files are never written."""
    out, class_path = list(args), None
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else arg[9:] if arg.startswith("--config=") else None
        if path is None or not Path(path).is_file():
            continue
        try:  # a file the parser cannot read, or an unknown class: the parser's own error says so
            config = yaml.safe_load(Path(path).read_text()) or {}
            model = config.get("model") if isinstance(config, dict) else None
            class_path = model.get("class_path", class_path) if isinstance(model, dict) else class_path
            upgrade = getattr(class_from_path(class_path), "upgrade_hparams", None) if class_path else None
        except (yaml.YAMLError, ImportError, OSError):
            continue
        if not isinstance(model, dict):
            continue
        init_args = model.get("init_args") or {}
        upgraded = upgrade(init_args) if upgrade is not None else init_args
        if upgraded == init_args:
            continue
        copy_path = Path(tempfile.mkdtemp(prefix="avatar-config-")) / Path(path).name
        copy_path.write_text(yaml.safe_dump({**config, "model": {**model, "init_args": upgraded}}, sort_keys=False))
        moved = sorted(set(init_args) - set(upgraded))
        sys.stderr.write(f"{path}: a config of the earlier layout; read with {', '.join(moved)} moved into the "
                         f"network entries (save the run's new config.yaml to keep the current layout)\n")
        out[i + 1 if arg == "--config" else i] = str(copy_path) if arg == "--config" else f"--config={copy_path}"
    return out


def run_cli(args: list[str] | None = None) -> AvatarCLI:
    """Parse ``args`` (None: ``sys.argv[1:]``), run the subcommand, return the CLI (model, trainer, run_dir).
    Config files of the earlier layout are read in the current one (:func:`upgrade_config_args`)."""
    if args is None and len(sys.argv) == 1:
        sys.argv.append("--help")
    upgraded = upgrade_config_args(sys.argv[1:] if args is None else list(args))
    # LightningCLI reads sys.argv itself when given no args (and warns when given both)
    args = None if args is None and upgraded == sys.argv[1:] else upgraded
    before = _active_wandb_run()
    try:
        cli = AvatarCLI(args=args)
    except BaseException:
        _finish_wandb_run(before, exit_code=1)
        raise
    _finish_wandb_run(before, exit_code=0)
    return cli


def _active_wandb_run() -> Any:
    wandb = sys.modules.get("wandb")
    return None if wandb is None else wandb.run


def _finish_wandb_run(before: Any, exit_code: int) -> None:
    """End the W&B run this CLI call started (Lightning leaves it open, and a later WandbLogger in the
    same process, e.g. the next stage of an in-process chain, would log into it)."""
    run = _active_wandb_run()
    if run is not None and run is not before:
        run.finish(exit_code=exit_code)


def main() -> None:
    """Entry point of the ``lightning`` console script."""
    run_cli()


if __name__ == "__main__":
    main()
