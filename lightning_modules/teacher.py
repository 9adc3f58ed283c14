"""Stage 1: the PointAvatar-style teacher, trained from tracked frames (``lightning fit --config experiments/teacher.yaml``).

A thin LightningModule around :class:`models.teacher.PointAvatarTeacher` and
:class:`models.rasterizer.PointRasterizer`: steps, losses, metrics, the point schedule
(PointAvatar's growth and pruning) and optimisers. Losses (PointAvatar, Sec. 3.4, without the
VGG term whose weights cannot be downloaded here):

    L = w_rgb L1(render, GT on white) + w_mask L1(alpha, mask) + w_ssim (1 - SSIM)
        + w_eikonal (|grad SDF| - 1)^2 + w_sdf_consistency SDF(x)^2 + w_blendshape sum_e w_e |B_e|^2
        + w_code_prior prior(corrections)

PointAvatar's training ingredients beyond the losses, each switchable from the config:

* ``code_refinement`` (PointAvatar's ``optimize_expression``/``optimize_camera``): learnable
  per-frame corrections of the training frames' expression codes and head poses
  (:class:`models.codes.FrameCodeCorrections`, their own learning rate ``codes_lr``, a prior tying
  them to tracking), saved in the checkpoint; the distillation and GAR stages train on the corrected
  codes of those frames (:func:`with_code_corrections`). Val and test frames keep their tracked codes.
* ``use_var_expression``: the blendshape prior weighted by 1 / var_e of the training codes.
* ``use_mean_expression``: the canonical expression psi_c = the mean training expression.
* ``normalize_expression``: the deformer learns its blendshapes per training standard deviation of
  each code component (:meth:`~models.teacher.PointAvatarTeacher.set_expression_scale`); the
  blendshape prior then applies to that displacement per standard deviation. Without it the
  blendshape of a component learns in proportion to its variance: our PCA codes span a 200x range
  of variances, and in the CPU budget every component but the first few stayed at a millimetre.
  Off by default: it lowered val PSNR (docs/teacher.md).

Point schedule (PointAvatar): every ``prune_every_epochs`` epochs, points whose accumulated
composited weight over that period stays below the threshold are deactivated (visibility summed
over DDP ranks at every step, never below the floor), while the splat radius is >= ``prune_min_radius``;
every ``grow_every_epochs`` epochs each active point is duplicated (noise from a generator seeded
by the epoch, identical on every rank) and the radius shrinks by 0.75.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_modules.handoff import class_path_of, teacher_state_defaults
from lightning_modules.metrics import (
    HeldOutMetrics,
    composite_on_white,
    multiply_adds,
    refined_render,
    time_per_frame,
)
from lightning_modules.stage import Row, Stage, check_finite_losses, merge_weights, with_code_corrections
from models.camera import pixel_radius
from models.codes import FrameCodeCorrections
from models.losses import (
    blendshape_regularization,
    eikonal_loss,
    mask_loss,
    masked_l1,
    sdf_consistency_loss,
    ssim_loss,
)
from models.rasterizer import PointRasterizer, RasterOutput
from models.teacher import CanonicalOutput, PointAvatarTeacher

__all__ = ["TeacherModule"]

#: The teacher's loss terms and their default weights: PointAvatar's, but for the blendshape prior
#: (no FLAME target here), the code prior (PointAvatar leaves it to its learning rate) and the SDF
#: consistency (PointAvatar: 1.0; off here: no val gain measured at the demo scale, docs/teacher.md).
DEFAULT_LOSS_WEIGHTS = {"rgb": 1.0, "mask": 1.0, "ssim": 0.2, "eikonal": 0.1, "sdf_consistency": 0.0,
                        "blendshape": 1e-3, "code_prior": 1e-2}


class TeacherModule(Stage):
    """Trains the teacher avatar; validation/test write ``teacher/*`` and the baselines' metrics
    (:mod:`lightning_modules.metrics`: ``tracked`` rows always, the ``refined`` row in ``lightning
    validate``/``test`` runs).

    Args:
        expression_dim, image_size: from the datamodule (linked by the CLI).
        max_points, init_points, min_points, prune_threshold, radius_factor: the point buffer
            (see :class:`~models.teacher.PointAvatarTeacher`).
        geometry_width, geometry_depth, deformer_width, deformer_depth, shading_width: MLP sizes
            (PointAvatar's by default).
        points_per_pixel: depth-nearest points composited per pixel (PointAvatar: 10).
        grow_every_epochs, prune_every_epochs: point schedule (PointAvatar: 5 and 1).
        prune_min_radius: no pruning once the splat radius is below this (PointAvatar: 0.006).
        loss_weights: {rgb, mask, ssim, eikonal, sdf_consistency, blendshape, code_prior}; 0
            switches a term off (defaults: ``DEFAULT_LOSS_WEIGHTS``).
        lr, points_lr: Adam learning rates of the MLPs and of the point coordinates.
        code_refinement, codes_lr: learn per-frame corrections of the training frames' codes, with
            this Adam learning rate (module docstring).
        use_var_expression, use_mean_expression: PointAvatar's switches (module docstring).
        normalize_expression: blendshapes per standard deviation of each code (module docstring).
        num_frequencies: positional-encoding frequencies of the geometry/albedo MLP (PointAvatar: 6).
        lr_milestones, lr_gamma: MultiStepLR over epochs (PointAvatar: [40, 60] x 0.5).
        optimizer, lr_scheduler: another optimiser / epoch schedule, Lightning's ``OptimizerCallable`` /
            ``LRSchedulerCallable`` (None: Adam, MultiStepLR; :meth:`~lightning_modules.stage.Stage.optimizer_and_schedule`).
        refine_steps, refine_lr: the ``refined`` protocol (:func:`~lightning_modules.metrics.refine_codes`),
            run by ``lightning validate``/``test`` (not inside a fit); 0 steps: no refined row.
    """

    stage = "teacher"
    monitor = "teacher/tracked/val/full/psnr"
    monitor_mode = "max"

    def __init__(
        self,
        expression_dim: int = 16,
        image_size: int = 128,
        max_points: int = 102_400,
        init_points: int = 400,
        min_points: int = 100,
        prune_threshold: float = 0.5,
        radius_factor: float = 0.3,
        geometry_width: int = 256,
        geometry_depth: int = 9,
        deformer_width: int = 128,
        deformer_depth: int = 4,
        shading_width: int = 64,
        points_per_pixel: int = 10,
        grow_every_epochs: int = 5,
        prune_every_epochs: int = 1,
        prune_min_radius: float = 0.006,
        loss_weights: dict[str, float] | None = None,
        lr: float = 1e-4,
        points_lr: float = 1e-4,
        lr_milestones: tuple[int, ...] = (40, 60),
        lr_gamma: float = 0.5,
        refine_steps: int = 20,
        refine_lr: float = 5e-3,
        code_refinement: bool = False,
        codes_lr: float = 1e-3,
        use_var_expression: bool = True,
        use_mean_expression: bool = True,
        normalize_expression: bool = False,
        num_frequencies: int = 6,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_callable, self.lr_scheduler_callable = optimizer, lr_scheduler
        if not codes_lr > 0:
            raise ValueError(f"codes_lr must be > 0, got {codes_lr}")
        self.loss_weights = merge_weights("loss weight(s)", loss_weights, DEFAULT_LOSS_WEIGHTS)
        # saved in the checkpoint's `teacher` entry: what the later stages build it from (handoff.load_teacher)
        self.teacher_init_args = dict(
            expression_dim=expression_dim, max_points=max_points, init_points=init_points, min_points=min_points,
            prune_threshold=prune_threshold, radius_factor=radius_factor, geometry_width=geometry_width,
            geometry_depth=geometry_depth, deformer_width=deformer_width, deformer_depth=deformer_depth,
            shading_width=shading_width, num_frequencies=num_frequencies,
        )
        self.teacher = PointAvatarTeacher(**self.teacher_init_args)
        # per-frame code corrections of the training frames: built in setup("fit") from the datamodule
        # (or from a checkpoint's shapes), None without code refinement
        self.codes: FrameCodeCorrections | None = None
        # var_e of the training codes (the blendshape prior's weights), set in setup("fit")
        self.register_buffer("expression_var", torch.ones(expression_dim))
        self.rasterizer = PointRasterizer(image_size, points_per_pixel=points_per_pixel, background=1.0)
        if refine_steps < 0 or not refine_lr > 0:
            raise ValueError(f"refine_steps must be >= 0 and refine_lr > 0, got {refine_steps} and {refine_lr}")
        self.metrics = HeldOutMetrics({"teacher": ("tracked", "refined"), "baseline_mean": ("tracked",),
                                       "baseline_nearest": ("tracked",)})
        self.register_buffer("visibility", torch.zeros(max_points), persistent=False)
        # the visibility of every rank's frames (all-reduced at each step, training_step): DDP need not
        # broadcast it from rank 0 at every forward
        self._ddp_params_and_buffers_to_ignore = ["visibility"]
        self._visibility_batches = 0  # training batches accumulated into `visibility` this epoch

    # -- rendering -------------------------------------------------------------------------------
    def render(
        self, batch, canonical: CanonicalOutput | None = None, extra: torch.Tensor | None = None
    ) -> tuple[dict, RasterOutput]:
        """Teacher forward + rasterization of RGB (and optional extra (B, N, C) channels) for a batch."""
        out = self.teacher(batch.expression, batch.world_mat, canonical=canonical)
        features = out["colors"] if extra is None else torch.cat([out["colors"], extra], -1)
        radius = pixel_radius(out["points"], batch.world_mat, batch.K, out["radius"])
        raster = self.rasterizer(out["points"], features, batch.world_mat, batch.K, radius=radius)
        return out, raster

    # -- training ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """At the start of a fit: the training codes' variance (blendshape prior), the canonical
        expression and the per-frame code table, from the datamodule's training frames (a resumed fit
        then restores all three from its checkpoint)."""
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "training_codes"):  # a datamodule without tracked training frames
            return
        frames = datamodule.training_codes()  # codes only: no copy of the images
        expression = frames["expression"].double()
        if len(expression) > 1:
            var = expression.var(0)
            self.expression_var.copy_(var.clamp_min(1e-8).to(self.expression_var))
            if self.hparams.normalize_expression:  # components that never vary (static meshes) keep scale 1
                self.teacher.set_expression_scale(torch.where(var > 1e-8, var.rsqrt(), torch.ones_like(var)).float())
        if self.hparams.use_mean_expression:
            self.teacher.set_canonical_expression(expression.mean(0).float())
        if self.hparams.code_refinement and self.codes is None:
            self.codes = FrameCodeCorrections(frames["frame_index"], self.teacher.expression_dim,
                                              self.expression_var).to(self.device)

    def training_step(self, batch, batch_idx):
        if self.codes is not None:  # the training frames' corrected codes (PointAvatar's optimize_*)
            batch = with_code_corrections(batch, self.codes)
        # a ones channel whose gradient w.r.t. the composited image is each point's total weight
        ones = torch.ones(len(batch), self.teacher.num_active, 1, device=self.device, requires_grad=True)
        out, raster = self.render(batch, extra=ones)
        rgb, weight_image = raster.image[:, :3], raster.image[:, 3:]
        target = composite_on_white(batch.image, batch.mask)
        w = self.loss_weights
        var = self.expression_var if self.hparams.use_var_expression else None
        terms = {
            "rgb": masked_l1(rgb, target),
            "mask": mask_loss(raster.alpha, batch.mask),
            "ssim": ssim_loss(rgb, target) if w["ssim"] > 0 else rgb.new_zeros(()),
            "eikonal": eikonal_loss(out["sdf_grad"]),
            "sdf_consistency": sdf_consistency_loss(out["sdf"]),
            # on the deformer's own output B'_e = B_e / s_e (per standard deviation when normalised)
            "blendshape": blendshape_regularization(
                out["blendshapes"] / self.teacher.expression_scale[None, :, None], out["offset"], var),
            "code_prior": self.codes.prior() if self.codes is not None else rgb.new_zeros(()),
        }
        check_finite_losses(terms, self.global_step)
        loss = sum(w[name] * value for name, value in terms.items())
        (point_weight,) = torch.autograd.grad(weight_image.sum(), ones, retain_graph=True)
        visibility = torch.zeros_like(self.visibility).index_add_(0, out["indices"], point_weight.detach().sum((0, 2)))
        # summed over the ranks at every step: every rank (and so every checkpoint, whichever rank
        # wrote it) holds the visibility of all frames seen so far, and a resumed fit prunes on exactly it
        self.visibility += self.trainer.strategy.reduce(visibility, reduce_op="sum")
        self._visibility_batches += 1
        self.log_dict({f"teacher/train/{k}": v for k, v in terms.items()}, batch_size=len(batch))
        self.log("teacher/train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("num_points", float(self.teacher.num_active), prog_bar=True, batch_size=len(batch))
        return loss

    def on_train_epoch_end(self) -> None:
        if self.codes is not None:  # mean correction size over the training frames
            self.log_dict({f"teacher/codes/{k}": v for k, v in self.codes.magnitudes().items()})
        epoch = self.current_epoch + 1
        # an epoch cut short (max_steps) has not seen every frame: no schedule step on it
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

    # -- evaluation ------------------------------------------------------------------------------
    def _render_codes(self, expression, world_mat, extra, batch, canonical: CanonicalOutput) -> torch.Tensor:
        """The teacher's render (B, 3, H, W) of ``batch``'s frames posed by ``expression`` and ``world_mat``
        (:func:`~lightning_modules.metrics.refine_codes`' ``render``; ``extra`` unused)."""
        out = self.teacher(expression, world_mat, canonical=canonical)
        radius = pixel_radius(out["points"], world_mat, batch.K, out["radius"])
        return self.rasterizer(out["points"], out["colors"], world_mat, batch.K, radius=radius).image[:, :3]

    def _refined_render(self, batch, canonical) -> torch.Tensor:
        """The ``refined`` protocol's render of ``batch`` (codes refined against its frames, teacher frozen)."""
        hp = self.hparams
        return refined_render(self._render_codes, batch, hp.refine_steps, hp.refine_lr, inputs=(canonical,))

    def _refine(self) -> bool:
        """The refined row runs in ``lightning validate``/``test`` only: never inside a fit (selection)."""
        return self.hparams.refine_steps > 0 and self.outside_fit

    def _canonical(self) -> CanonicalOutput:
        """The canonical outputs, once per evaluation epoch."""
        return self.cached("canonical", lambda: self.teacher.canonical(method="explicit"))

    def eval_renders(self, batch) -> dict[str, Row]:
        canonical = self._canonical()
        _, raster = self.render(batch, canonical=canonical)
        renders = {"teacher": ("teacher", "tracked", raster.image[:, :3])}
        if self._refine():
            renders["teacher_refined"] = ("teacher", "refined", self._refined_render(batch, canonical))
        return renders

    def frame_costs(self, batch) -> dict[str, float]:
        """``ms_per_frame/teacher/{tracked,refined}`` (and ``flops_per_frame/teacher/refined``: the
        refinement's forward and backward passes, :func:`~lightning_modules.metrics.multiply_adds`): one
        frame's per-frame path, canonical outputs cached."""
        canonical = self._canonical()
        costs = {"ms_per_frame/teacher/tracked": time_per_frame(lambda: self.render(batch, canonical))}
        if self._refine():
            def refined():
                return self._refined_render(batch, canonical)

            costs["ms_per_frame/teacher/refined"] = time_per_frame(refined, repeats=1)
            costs["flops_per_frame/teacher/refined"] = multiply_adds(refined)
        return costs

    @torch.no_grad()
    def visualize(self, batch) -> dict[str, torch.Tensor]:
        """Columns for the render grid: ground truth | render | normals | rendered alpha, (B, 3, H, W)."""
        out = self.teacher(batch.expression, batch.world_mat, canonical=self._canonical())
        normals_rgb = out["normals_cam"] * 0.5 + 0.5
        features = torch.cat([out["colors"], normals_rgb], -1)
        radius = pixel_radius(out["points"], batch.world_mat, batch.K, out["radius"])
        raster = self.rasterizer(out["points"], features, batch.world_mat, batch.K, radius=radius)
        return {
            "ground_truth": composite_on_white(batch.image, batch.mask),
            "render": raster.image[:, :3],
            "normals": raster.image[:, 3:6],
            "alpha": raster.alpha.expand(-1, 3, -1, -1),
        }

    def counts(self) -> dict[str, int]:
        return {
            "params/teacher": sum(p.numel() for p in self.teacher.canonical_network_parameters()),
            "num_points": self.teacher.num_active,
        }

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups = [
            {"params": self.teacher.canonical_network_parameters(), "lr": hp.lr},
            {"params": [self.teacher.points], "lr": hp.points_lr},
        ]
        if self.codes is not None:
            groups.append({"params": list(self.codes.parameters()), "lr": hp.codes_lr})
        return self.optimizer_and_schedule(groups)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["num_points"] = self.teacher.num_active
        checkpoint["model_class"] = class_path_of(self.teacher)
        checkpoint["teacher"] = {"class_path": class_path_of(self.teacher), "init_args": dict(self.teacher_init_args)}
        # the epoch's visibility so far (the sum over ranks), so a fit resumed mid-epoch prunes on all
        # of it (exact resume, also under DDP: every rank loads the same sum)
        checkpoint["visibility"] = {"sum": self.visibility.detach().cpu().clone(), "batches": self._visibility_batches}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        # a checkpoint from before code refinement / the canonical expression: their neutral values
        state.setdefault("expression_var", torch.ones_like(self.expression_var))
        teacher_state_defaults(state, self.teacher, prefix="teacher.")
        if self.codes is None:  # the code table's size comes from the checkpoint (no datamodule needed)
            self.codes = FrameCodeCorrections.from_state_dict(state, "codes.")
        saved = checkpoint.get("visibility")
        if saved is not None:
            self.visibility.copy_(saved["sum"].to(self.visibility))
            self._visibility_batches = int(saved["batches"])

    def extra_repr(self) -> str:
        return f"points={self.teacher.num_active}/{self.hparams.max_points}, radius={float(self.teacher.radius):.4g}"

