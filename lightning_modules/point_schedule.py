"""PointAvatar's point schedule for the teacher stage: visibility-based pruning and periodic growth.

Every ``prune_every_epochs`` epochs, points whose accumulated composited weight over that period
stays below the teacher's threshold are deactivated (never below its floor), while the splat radius
is >= ``prune_min_radius``; every ``grow_every_epochs`` epochs each active point is duplicated (noise
from a generator seeded by the epoch, identical on every rank) and the radius shrinks by 0.75
(:meth:`models.teacher.PointAvatarTeacher.prune` / ``grow``). The optimizer's state rows of changed
points are reset. An epoch cut short (``max_steps``) has not seen every frame: no schedule step on it.

The visibility is summed over the DDP ranks at every step, so every rank (and every checkpoint,
whichever rank wrote it) holds the visibility of all frames seen so far, and a fit resumed mid-epoch
prunes on exactly it.
"""

from __future__ import annotations

import torch

__all__ = ["PointSchedule"]


class PointSchedule:
    """The point schedule's part of the teacher stage (a mixin): the stage holds ``teacher`` and the
    hyper-parameters ``grow_every_epochs``, ``prune_every_epochs`` and ``prune_min_radius``."""

    def init_point_schedule(self, max_points: int) -> None:
        """Register the visibility accumulator (max_points,), kept out of DDP's buffer broadcast."""
        self.register_buffer("visibility", torch.zeros(max_points), persistent=False)
        # all-reduced at each step (accumulate_visibility): DDP need not broadcast it from rank 0 at every forward
        self._ddp_params_and_buffers_to_ignore = ["visibility"]
        self._visibility_batches = 0  # training batches accumulated into `visibility` this epoch

    def accumulate_visibility(self, indices: torch.Tensor, weight: torch.Tensor) -> None:
        """Add one batch's composited weight (M,) of the points ``indices`` (M,), summed over the ranks."""
        visibility = torch.zeros_like(self.visibility).index_add_(0, indices, weight)
        self.visibility += self.trainer.strategy.reduce(visibility, reduce_op="sum")
        self._visibility_batches += 1

    def step_point_schedule(self) -> None:
        """At an epoch's end: prune and grow as the schedule says (module docstring)."""
        epoch = self.current_epoch + 1
        if self._visibility_batches < self.trainer.num_training_batches:
            return
        self._visibility_batches = 0
        optimizer = self.optimizers().optimizer
        if float(self.teacher.radius) < self.hparams.prune_min_radius:
            self.visibility.zero_()  # PointAvatar stops pruning once the points are this small
        elif epoch % self.hparams.prune_every_epochs == 0:  # `visibility` is already the sum over ranks
            self.teacher.reset_optimizer_rows(optimizer, self.teacher.prune(self.visibility.clone()))
            self.visibility.zero_()
        if epoch % self.hparams.grow_every_epochs == 0:
            generator = torch.Generator(device="cpu").manual_seed(1_000_003 * epoch)  # same noise on every rank
            self.teacher.reset_optimizer_rows(optimizer, self.teacher.grow(generator))

    def save_point_schedule(self, checkpoint: dict) -> None:
        """The epoch's visibility so far (the sum over ranks) into ``checkpoint``: exact resume mid-epoch."""
        checkpoint["visibility"] = {"sum": self.visibility.detach().cpu().clone(), "batches": self._visibility_batches}

    def load_point_schedule(self, checkpoint: dict) -> None:
        """Restore what :meth:`save_point_schedule` wrote (every rank loads the same sum)."""
        saved = checkpoint.get("visibility")
        if saved is not None:
            self.visibility.copy_(saved["sum"].to(self.visibility))
            self._visibility_batches = int(saved["batches"])
