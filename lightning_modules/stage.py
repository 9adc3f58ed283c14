"""The stage base: what every stage (teacher, distillation, GAR) shares, declared once.

A stage is a LightningModule that trains one model of the pipeline. :class:`Stage` holds the
protocol the CLI, the callbacks and the report rely on, and the evaluation loop; a stage supplies
only what differs:

=========================  =====================================================================
a stage supplies           used by
=========================  =====================================================================
``stage``                  the run folder ``runs/<stage>/`` (:mod:`lightning_modules.cli`)
``monitor``/``monitor_mode``  the metric that selects ``best.ckpt`` (None: no best.ckpt)
``upstream``               ``(stage, init_arg)`` of the checkpoint it builds on, pinned by
                           :meth:`bind_upstream` (:func:`~lightning_modules.handoff.pin_upstream`)
``metrics``                a :class:`~lightning_modules.metrics.HeldOutMetrics` of its rows
:meth:`eval_renders`       its renders of a val/test batch, one per row
:meth:`frame_costs`        per-frame milliseconds and multiply-adds on one test frame
:meth:`counts`             ``params/<model>``, ``num_points``, ... for ``metrics.json``
:meth:`visualize`          the columns of the render grid (:class:`~lightning_modules.callbacks.RenderLogger`)
:meth:`flop_targets`       the models the :class:`~lightning_modules.flops.FlopCounter` counts
=========================  =====================================================================

The base runs validation and test (:meth:`eval_renders` into ``metrics``, the baselines, one
frame timed in test), logs ``<model>/<protocol>/<split>/<region>/<metric>`` at each epoch's end and
fills ``metrics.json`` (:meth:`run_metrics`, with the pinned upstream). Helpers every stage's
training step uses live here too: :func:`check_finite_losses`, :func:`with_code_corrections`,
:func:`merge_weights`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.handoff import UpstreamChangedError, pin_upstream, read_checkpoint
from lightning_modules.metrics import HeldOutMetrics

__all__ = ["Row", "Stage", "check_expression_dim", "check_finite_losses", "check_refine", "merge_weights", "with_code_corrections"]

#: One evaluated render: (model, protocol, image (B, 3, H, W) in [0, 1]).
Row = tuple[str, str, torch.Tensor]


def check_finite_losses(terms: Mapping[str, torch.Tensor], step: int) -> None:
    """Stop training on a NaN/inf loss term with a message naming the step and the term.

    Raises:
        FloatingPointError: when a term is not finite.
    """
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise FloatingPointError(
                f"step {step}: loss term '{name}' is {value.item()}; lower the learning rate or its weight "
                f"(model.init_args.loss_weights.{name})"
            )


def check_refine(steps: int, lr: float) -> None:
    """Raises ValueError unless a stage's ``refine_steps`` >= 0 and ``refine_lr`` > 0."""
    if steps < 0 or not lr > 0:
        raise ValueError(f"refine_steps must be >= 0 and refine_lr > 0, got {steps} and {lr}")


def check_expression_dim(expression_dim: int, model, path, upstream: str) -> None:
    """Raises ValueError unless the dataset's ``expression_dim`` equals the ``upstream`` model's (read from ``path``)."""
    if model.expression_dim != expression_dim:
        raise ValueError(f"the dataset's expression_dim {expression_dim} differs from the {upstream}'s "
                         f"{model.expression_dim} ({path}): train on the {upstream}'s dataset")


def merge_weights(name: str, given: Mapping[str, float] | None, defaults: Mapping[str, float]) -> dict[str, float]:
    """``defaults`` updated by the user's ``given`` weights (0 switches a term off).

    Raises:
        ValueError: a name ``defaults`` does not know (the message lists the known ones).
    """
    unknown = set(given or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {name} {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **(given or {})}


def with_code_corrections(batch, codes):
    """``batch`` with its frames' expression codes and head poses corrected by ``codes`` (the teacher's
    per-frame code refinement), for the frames the table holds; other frames (val, test, another
    video) keep their tracked codes. ``codes`` None returns ``batch`` itself.

    Args:
        batch: an :class:`~datamodules.batch.AvatarBatch`.
        codes: the teacher's :class:`~models.codes.FrameCodeCorrections`, or None.

    Returns:
        an :class:`~datamodules.batch.AvatarBatch` (a new one when anything changed).
    """
    if codes is None:
        return batch
    known = codes.has(batch.frame_index)
    if not bool(known.any()):
        return batch
    expression, world_mat = batch.expression, batch.world_mat[:, :3, :4]
    new_expression, new_world_mat = codes(batch.frame_index[known], expression[known], world_mat[known])
    expression = expression.clone()
    world_mat = world_mat.clone()
    expression[known] = new_expression.to(expression.dtype)
    world_mat[known] = new_world_mat.to(world_mat.dtype)
    return dataclasses.replace(batch, expression=expression, world_mat=world_mat)


class Stage(pl.LightningModule):
    """Base class of the stages (module docstring): the CLI protocol and the evaluation loop.

    Subclasses call ``super().__init__()`` first, set ``self.metrics`` and implement
    :meth:`eval_renders` and :meth:`counts`; the rest has defaults.
    """

    #: the run folder's stage name, ``runs/<stage>/``
    stage: ClassVar[str] = ""
    #: the metric that selects ``best.ckpt`` and its direction; None: no best.ckpt
    monitor: ClassVar[str | None] = None
    monitor_mode: ClassVar[str] = "max"
    #: ``(upstream stage, init arg of its checkpoint)``, or None for a first stage
    upstream: ClassVar[tuple[str, str] | None] = None
    #: manual optimisation in phases whose backward reaches one optimizer's parameters (DDP must
    #: search for unused parameters; the CLI turns it on)
    ddp_find_unused_parameters: ClassVar[bool] = False

    #: networks given by ``{class_path, init_args}``: init arg -> the default class path
    NETWORKS: ClassVar[Mapping[str, str]] = {}
    #: flat init args of configs and checkpoints from before :attr:`NETWORKS`: old name -> (network, its arg)
    LEGACY_ARGS: ClassVar[Mapping[str, tuple[str, str]]] = {}

    metrics: HeldOutMetrics
    #: the ``optimizer`` / ``lr_scheduler`` init args of a stage that takes them (:meth:`optimizer_and_schedule`);
    #: the hyper-parameters hold their config, these the callables LightningCLI made from it
    optimizer_callable: Callable | None = None
    lr_scheduler_callable: Callable | None = None

    def __init__(self, optimizer: Callable | None = None, lr_scheduler: Callable | None = None) -> None:
        """``optimizer`` / ``lr_scheduler``: a stage's ``OptimizerCallable`` / ``LRSchedulerCallable``
        init args, if it takes them (:meth:`optimizer_and_schedule`)."""
        super().__init__()
        self.optimizer_callable, self.lr_scheduler_callable = optimizer, lr_scheduler
        self._frame_cost: dict[str, float] = {}  # ms_per_frame/<row>, flops_per_frame/<row> (test)
        self._eval_cache: dict[str, Any] = {}  # per evaluation epoch (canonical outputs, ...)

    # -- configs and checkpoints of the earlier layout ---------------------------------------------------
    @classmethod
    def upgrade_hparams(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """``hparams`` in the current layout: each flat :attr:`LEGACY_ARGS` key moved into its network's
        ``{class_path, init_args}`` entry (the default class of :attr:`NETWORKS` when it has none).
        Current hyper-parameters come back unchanged."""
        hparams = dict(hparams)
        for old, (network, arg) in cls.LEGACY_ARGS.items():
            if old in hparams:
                spec = dict(hparams.get(network) or {"class_path": cls.NETWORKS[network]})
                spec["init_args"] = {**(spec.get("init_args") or {}), arg: hparams.pop(old)}
                hparams[network] = spec
        return hparams

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's ``load_from_checkpoint``, for checkpoints of the earlier layout too: their flat
        network sizes are read into the networks' entries (:meth:`upgrade_hparams`; Lightning alone
        would drop them and build the default sizes). ``kwargs`` still override the checkpoint's."""
        saved = read_checkpoint(checkpoint_path, "cpu").get("hyper_parameters") or {}
        networks = {k: v for k, v in cls.upgrade_hparams(saved).items() if k in cls.NETWORKS}
        # flat keyword overrides of the earlier layout (base_channels=12) go into those entries too
        given = cls.upgrade_hparams({**networks, **kwargs})
        kwargs = {**{k: v for k, v in given.items() if k in cls.NETWORKS and v != saved.get(k)},
                  **{k: v for k, v in given.items() if k not in cls.NETWORKS}}
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, **kwargs)

    # -- upstream ------------------------------------------------------------------------------------
    def bind_upstream(self) -> Path:
        """Resolve this stage's upstream checkpoint and pin it in the hyper-parameters.

        Reads ``hparams[<key>]`` and ``hparams[<key>_sha256]`` (``upstream = (stage, key)``), checks the
        file against the recorded hash (:func:`~lightning_modules.handoff.pin_upstream`) and records
        the resolved file and its hash, so checkpoints, config.yaml and metrics.json name exactly it.

        Raises:
            UpstreamMissingError, UpstreamChangedError: see :func:`~lightning_modules.handoff.pin_upstream`.
        """
        if self.upstream is None:
            raise TypeError(f"{type(self).__name__} declares no upstream")
        stage, key = self.upstream
        if self.hparams.get(key) is None:  # not through the CLI (which pins it), or a checkpoint from before pinning
            rank_zero_warn(f"{type(self).__name__}: no {stage} checkpoint recorded ({key}); binding "
                           f"runs/{stage}/latest, and recording the file it points at")
        path, digest = pin_upstream(self.hparams.get(key), self.hparams.get(f"{key}_sha256"), stage, key)
        self.hparams[key], self.hparams[f"{key}_sha256"] = str(path), digest
        return path

    def upstream_record(self) -> dict[str, str]:
        """``upstream/<stage>/path`` and ``upstream/<stage>/sha256`` for metrics.json ({} for a first stage)."""
        if self.upstream is None:
            return {}
        stage, key = self.upstream
        return {f"upstream/{stage}/path": self.hparams[key], f"upstream/{stage}/sha256": self.hparams[f"{key}_sha256"]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A fit resumed (or weights loaded) on another upstream than the checkpoint's is refused.

        Raises:
            UpstreamChangedError: the checkpoint records another upstream hash than the one bound now.
        """
        if self.upstream is None:
            return
        stage, key = self.upstream
        recorded = (checkpoint.get("hyper_parameters") or {}).get(f"{key}_sha256")
        bound = self.hparams.get(f"{key}_sha256")
        if recorded is not None and bound is not None and recorded != bound:
            path = checkpoint["hyper_parameters"].get(key)
            raise UpstreamChangedError(
                f"this checkpoint was trained on the {stage} checkpoint {path} (sha256 {recorded[:12]}), not on "
                f"{self.hparams[key]} ({bound[:12]}): pass --model.init_args.{key}={path}"
            )

    # -- optimisation ------------------------------------------------------------------------------------
    def optimizer_and_schedule(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        """The stage's optimiser over parameter ``groups`` (each with its own ``lr``) and its epoch schedule.

        Configurable the Lightning way (dependency injection, ``OptimizerCallable`` /
        ``LRSchedulerCallable``): ``model.init_args.optimizer`` (default ``torch.optim.Adam``) and
        ``model.init_args.lr_scheduler`` (default ``MultiStepLR(lr_milestones, lr_gamma)``, stepped
        per epoch), e.g. ``--model.init_args.optimizer=torch.optim.AdamW
        --model.init_args.optimizer.init_args.weight_decay=0.01``. The groups' learning rates come
        from the stage's own ``lr`` arguments.
        """
        hp = self.hparams
        optimizer = (self.optimizer_callable or torch.optim.Adam)(groups)
        schedule = self.lr_scheduler_callable
        if schedule is None:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(hp.lr_milestones), hp.lr_gamma)
        else:
            scheduler = schedule(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -- what a stage supplies -----------------------------------------------------------------------------
    def eval_renders(self, batch) -> dict[str, Row]:
        """The stage's renders of a val/test ``batch``: ``{row name: (model, protocol, image)}``."""
        raise NotImplementedError

    def after_eval_step(self, batch, renders: dict[str, Row]) -> None:
        """Anything more a stage logs on an evaluated batch (default: nothing)."""

    def after_eval_epoch(self, split: str, values: dict[str, float]) -> None:
        """Anything a stage does with an evaluation epoch's metrics (default: nothing)."""

    def frame_costs(self, batch) -> dict[str, float]:
        """Per-frame cost of the stage's rows on ``batch`` (one frame): ``ms_per_frame/<model>/<protocol>``,
        ``flops_per_frame/<model>/<protocol>`` (default: none)."""
        return {}

    def counts(self) -> dict[str, Any]:
        """``params/<model>``, ``num_points`` and other counts for metrics.json."""
        raise NotImplementedError

    def visualize(self, batch) -> dict[str, torch.Tensor]:
        """Columns of the render grid, ``{name: (B, 3, H, W)}`` (default: none)."""
        return {}

    def flop_targets(self) -> dict[str, Any]:
        """``{model: FlopTarget}`` for the FLOP counter (default: none)."""
        return {}

    # -- evaluation ------------------------------------------------------------------------------------
    @property
    def outside_fit(self) -> bool:
        """True in ``lightning validate``/``test``: rows that look at the scored frame run there only,
        never inside a fit (where val selects the checkpoint)."""
        return self.trainer.state.fn != "fit"

    def refine_setting(self) -> tuple[int, float] | None:
        """``(refine_steps, refine_lr)`` of the stage's ``refined`` rows, which look at the scored frame:
        None inside a fit (val selects the checkpoint there) or with 0 steps."""
        steps = int(self.hparams.get("refine_steps", 0))
        return (steps, float(self.hparams.refine_lr)) if steps > 0 and self.outside_fit else None

    def cached(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per evaluation epoch (e.g. the canonical outputs, shared by every batch)."""
        if name not in self._eval_cache:
            self._eval_cache[name] = make()
        return self._eval_cache[name]

    def _evaluate(self, batch) -> None:
        renders = self.eval_renders(batch)
        for model, protocol, image in renders.values():
            self.metrics.update(model, protocol, image, batch.image, batch.mask, batch.frame_index)
        self.metrics.update_baselines(self.trainer, batch)
        self.after_eval_step(batch, renders)

    def _end_evaluation(self, split: str) -> None:
        if not self.trainer.sanity_checking:
            values = self.metrics.compute(split)
            self.log_dict(values)
            self.after_eval_epoch(split, values)
        self.metrics.reset()
        self._eval_cache.clear()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch)
        if batch_idx == 0 and self.trainer.is_global_zero:
            with torch.no_grad():
                self._frame_cost.update(self.frame_costs(batch.head(1)))

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    def run_metrics(self) -> dict[str, Any]:
        """metrics.json's counts: :meth:`counts`, the test's frame costs, null for what cannot be
        computed here (LPIPS) and the pinned upstream."""
        return {**self.counts(), **self._frame_cost, **self.metrics.null_metrics(), **self.upstream_record()}
