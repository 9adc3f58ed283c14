"""How the GAR stage renders and is scored: its frame path, evaluated rows, per-frame costs and renders.

:class:`GARRendering` is the part of :class:`lightning_modules.gar.GARModule` (which mixes it in and
holds the trained parts: the frozen ``student`` and its cached canonical outputs, ``generator``,
``generator_ema``, ``encoder``, ``discriminator``, ``z_mean``) that turns codes into frames. Rows
(:mod:`lightning_modules.metrics`):

- ``student/tracked``: the student's rasterized colours;
- ``gar/tracked`` (the headline): the EMA generator with z = the running mean of the training z, the
  tracked expression and camera; nothing looks at the frame;
- outside a fit (``lightning validate``/``test``), labelled rows that look at the frame they are scored
  on: ``gar/refined`` (expression, head pose and z refined by ``refine_steps`` steps against it, G
  frozen) and ``gar_inverted/refined`` (GAR's inversion: E's z and expression, then ``invert_steps``
  steps through the frozen EMA G); and the feature ablation ``gar_zero_features`` /
  ``gar_shuffled_features`` (the ``gar`` row with f_s zeroed or in a shuffled point order).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules import point_rows
from lightning_modules.metrics import (
    composite_on_white,
    invert_codes,
    multiply_adds,
    refined_render,
    time_per_frame,
)
from lightning_modules.stage import Row
from models.frame import check_expression
from models.gan_losses import discriminator_accuracy
from models.rasterizer import rasterize_points
from models.renderer import GARFrame, GARGenerator, GeneratorInputs
from models.student import StudentCanonical

__all__ = ["EVAL_ROWS", "FEATURES", "GARRendering"]

#: What G is given as the point features f_s: the student's, zeros, or the student's in a shuffled point order.
FEATURES = ("real", "zero", "shuffled")
#: The evaluated renders' rows: render name -> (model, protocol)
EVAL_ROWS = {"student": ("student", "tracked"), "gar": ("gar", "tracked"), "gar_refined": ("gar", "refined"),
             "gar_inverted": ("gar_inverted", "refined"), "gar_zero_features": ("gar_zero_features", "tracked"),
             "gar_shuffled_features": ("gar_shuffled_features", "tracked")}


class GARRendering:
    """The GAR's frame path and evaluation (module docstring); mixed into a :class:`~lightning_modules.stage.Stage`."""

    # -- the frame path -------------------------------------------------------------------------------
    def student_canonical(self) -> StudentCanonical:
        """The frozen student's canonical outputs (computed once, at construction)."""
        return StudentCanonical(
            points=self.student.points, albedo=self.student_albedo, normals=self.student_normals,
            blendshapes=self.student_blendshapes, offset=self.student_offset, feature=self.student_feature,
        )

    def point_features(self, features: str = "real") -> torch.Tensor:
        """The per-point features f_s (N, C_s) G is given: the student's (``real``), zeros (``zero``) or the
        student's in a fixed shuffled point order (``shuffled``: same statistics, no correspondence).

        Raises:
            ValueError: an unknown ``features``.
        """
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        if features == "zero":
            return torch.zeros_like(self.student_feature)
        return self.student_feature[self.feature_shuffle] if features == "shuffled" else self.student_feature

    def frame(self, generator: GARGenerator | None = None, image_size: int | None = None,
              exportable: bool = False) -> GARFrame:
        """The one frame path (:class:`models.renderer.GARFrame`) on the student's cached outputs with
        ``generator`` (default: the EMA copy, what every evaluated row and the export render with);
        ``exportable``: with the export-friendly rasterizer (:func:`lightning_modules.export.frame_graph`)."""
        return GARFrame.from_canonical(self.student_canonical(), self.student.radius, self.student.shading,
                                       self.generator_ema if generator is None else generator,
                                       image_size or self.hparams.image_size, self.hparams.points_per_pixel, exportable)

    def raster_inputs(self, batch, expression: torch.Tensor, features: str = "real") -> GeneratorInputs:
        """The generator's inputs for a batch posed by ``expression`` (B, E) (:meth:`GARFrame.raster_inputs`),
        with the point features ``features`` (:meth:`point_features`)."""
        check_expression(expression, self.student.expression_dim, "student")
        frame = self.frame(image_size=int(batch.image.shape[-1]))
        return frame.raster_inputs(expression, batch.world_mat, batch.K, self.point_features(features))

    def generate(self, generator: GARGenerator, inputs: GeneratorInputs, z: torch.Tensor) -> torch.Tensor:
        """``generator`` (G or its EMA copy) on :meth:`raster_inputs`' output: (B, 3, H, W) in (0, 1)."""
        return generator(inputs.inputs, z, inputs.base)

    # -- the rows -------------------------------------------------------------------------------------
    @torch.no_grad()
    def render_student(self, batch) -> torch.Tensor:
        """The student's rasterized colours (B, 3, H, W) on white, with the tracked expression."""
        rasterize = functools.partial(rasterize_points, image_size=batch.image.shape[-2:],
                                      points_per_pixel=self.hparams.points_per_pixel, background=1.0)
        return point_rows.render(self.student, rasterize, batch, self.student_canonical())[1].image

    @torch.no_grad()
    def render_meanz(self, batch, features: str = "real") -> torch.Tensor:
        """The ``gar`` row: the EMA generator's render (B, 3, H, W) of ``batch.expression`` posed by
        ``batch.world_mat`` through ``batch.K``, with z = the mean training z (also the reenactment
        render); ``features``: the point features (:meth:`point_features`; the feature ablation)."""
        inputs = self.raster_inputs(batch, batch.expression, features)
        return self.generate(self.generator_ema, inputs, self.z_mean.expand(len(batch), -1))

    def _render_codes(self, z, expression, batch, world_mat=None) -> torch.Tensor:
        """The EMA generator's render (B, 3, H, W) of ``batch``'s frames posed by ``expression`` (and
        ``world_mat``, default the batch's) with ``z``."""
        posed = batch if world_mat is None else dataclasses.replace(batch, world_mat=world_mat)
        return self.generate(self.generator_ema, self.raster_inputs(posed, expression), z)

    def invert(self, batch, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GAR's inversion of frames: E's (z, expression) (with ``invert_from_tracking``: E's z and the
        tracked expression) refined by ``steps`` (default ``invert_steps``) Adam steps through the frozen
        EMA generator (:func:`~lightning_modules.metrics.invert_codes`). Returns z (B, z_dim) and
        expression (B, E), detached."""
        hp = self.hparams
        steps = hp.invert_steps if steps is None else int(steps)
        with torch.no_grad():
            target = composite_on_white(batch.image, batch.mask)
            z, expression = self.encoder(target, batch.mask)
            if hp.invert_from_tracking:
                expression = batch.expression.to(expression.dtype)
        if steps <= 0:
            return z, expression
        return invert_codes(self._render_codes, z, expression, target, steps, hp.invert_lr,
                            self.loss_weights["ssim"], inputs=(batch,))

    @torch.no_grad()
    def render_inverted(self, batch) -> torch.Tensor:
        """The ``gar_inverted`` row: z and expression by :meth:`invert`, (B, 3, H, W)."""
        z, expression = self.invert(batch)
        return self._render_codes(z, expression, batch)

    @torch.no_grad()
    def render_refined(self, batch) -> torch.Tensor:
        """The ``gar/refined`` row: expression, head pose and z refined against the frame from the
        tracked codes and the mean z (:func:`~lightning_modules.metrics.refine_codes`), (B, 3, H, W)."""
        def render(expression, world_mat, z, batch):
            return self._render_codes(z, expression, batch, world_mat)

        return refined_render(render, batch, self.hparams.refine_steps, self.hparams.refine_lr,
                              extra=self.z_mean.expand(len(batch), -1))

    @torch.no_grad()
    def render_all(self, batch, refined: bool = False) -> dict[str, torch.Tensor]:
        """Evaluation renders (B, 3, H, W): ``student`` and ``gar`` (tracked: nothing looks at the frame);
        with ``refined``, also ``gar_refined`` and ``gar_inverted``, which look at it."""
        renders = {"student": self.render_student(batch), "gar": self.render_meanz(batch)}
        if refined:
            renders["gar_refined"] = self.render_refined(batch)
            renders["gar_inverted"] = self.render_inverted(batch)
        return renders

    def eval_renders(self, batch) -> dict[str, Row]:
        renders = self.render_all(batch, refined=self.outside_fit)
        self._eval_cache["renders"] = (batch.frame_index.clone(), renders)  # visualize reuses them
        if self.outside_fit:  # the feature ablation
            renders = {**renders, **{f"gar_{m}_features": self.render_meanz(batch, m) for m in ("zero", "shuffled")}}
        return {name: (*EVAL_ROWS[name], image) for name, image in renders.items()}

    def log_d_accuracy(self, split: str, real_logits, fake_logits, batch_size: int) -> None:
        """Log D's real/fake accuracy and logit gap (:func:`~models.gan_losses.discriminator_accuracy`)
        as epoch means: ``gar/<split>/d_accuracy``, ``..._real``, ``..._fake`` and ``gar/<split>/d_logit_gap``."""
        acc = discriminator_accuracy(real_logits, fake_logits)
        values = {"d_accuracy": acc.accuracy, "d_accuracy_real": acc.real, "d_accuracy_fake": acc.fake,
                  "d_logit_gap": acc.logit_gap}
        self.log_dict({f"gar/{split}/{k}": v for k, v in values.items()}, on_step=False, on_epoch=True,
                      batch_size=batch_size, sync_dist=True)

    def after_eval_step(self, batch, renders: dict[str, Row]) -> None:
        """D's accuracy on the frames and the ``gar`` renders; E's expression error against tracking."""
        split = "test" if self.trainer.testing else "val"
        target = composite_on_white(batch.image, batch.mask)
        self.log_d_accuracy(split, self.discriminator(target), self.discriminator(renders["gar"][2]), len(batch))
        _, expression = self.encoder(target, batch.mask)  # E's own code against tracking
        self.log(f"gar/{split}/encoder_expression_mse", F.mse_loss(expression.float(), batch.expression.float()),
                 on_epoch=True, batch_size=len(batch), sync_dist=True)

    def frame_costs(self, batch) -> dict[str, float]:
        """Per-frame cost of each row, on one frame.

        ``gar/tracked``: the student's deformation by the expression, rasterization at every scale and
        the EMA generator (student canonical outputs cached); FLOPs (fvcore, one multiply-add = one
        flop) count the deformation, the student's shading (a residual generator's base image) and
        the generator, the rasterizer left out as for the other models (DESIGN.md, "Counting
        rules"). ``gar/refined`` and ``gar_inverted/refined``: the whole refinement (E for the inverted
        row, every forward and backward pass through G), FLOPs by
        :func:`~lightning_modules.metrics.multiply_adds`. Milliseconds: the mean of 3 calls after a
        warm-up (1 for the refined rows).
        """
        from lightning_modules.flops import count_flops

        costs = {"ms_per_frame/gar/tracked": time_per_frame(lambda: self.render_meanz(batch))}
        inputs = self.raster_inputs(batch, batch.expression)
        canonical, z = self.student_canonical(), self.z_mean.expand(1, -1)
        flops = count_flops(self.student.deform, (canonical, batch.expression)).total
        flops += count_flops(self.generator_ema, (inputs.inputs, z, inputs.base)).total
        if self.generator_ema.residual:  # the residual generator's base image needs the student's colours
            flops += count_flops(self.student.shade, (canonical, batch.world_mat)).total
        costs["flops_per_frame/gar/tracked"] = flops
        if self.outside_fit:
            for row, fn in (("gar/refined", self.render_refined), ("gar_inverted/refined", self.render_inverted)):
                costs[f"ms_per_frame/{row}"] = time_per_frame(lambda fn=fn: fn(batch), repeats=1)
                costs[f"flops_per_frame/{row}"] = multiply_adds(lambda fn=fn: fn(batch))
        return costs

    @torch.no_grad()
    def visualize(self, batch) -> dict[str, torch.Tensor]:
        """Grid columns: ground truth | student | gar (tracked), and in validate/test runs the labelled
        refined rows (the evaluation step's renders of this batch when it just made them)."""
        cached = self._eval_cache.get("renders")
        if cached is not None and torch.equal(cached[0].to(batch.frame_index.device), batch.frame_index):
            renders = cached[1]
        else:
            renders = self.render_all(batch)
        return {"ground_truth": composite_on_white(batch.image, batch.mask), **renders}

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Reenactment (``lightning predict`` with ``--data.init_args.driving_video``; datamodules/driving.py).

        Returns:
            ``{"reenact": (B, 3, H, W), "driver": (B, 3, H, W)}`` in [0, 1]: the avatar with the
            batch's (driving) expressions and poses and z = the mean training z, and the batch's
            own frames; :class:`~lightning_modules.callbacks.RenderLogger` writes the first as
            ``renders/reenact.mp4`` and both side by side as ``renders/reenact_side_by_side.mp4``.
        """
        return {"reenact": self.render_meanz(batch).clamp(0, 1), "driver": batch.image}

    def counts(self) -> dict[str, Any]:
        return {
            "params/student": sum(p.numel() for p in self.student.canonical_network_parameters()),
            "params/gar": sum(p.numel() for p in self.generator.parameters()),
            "params/gar_inverted": sum(p.numel() for p in (*self.generator.parameters(), *self.encoder.parameters())),
            "num_points": self.student.num_points,
        }
