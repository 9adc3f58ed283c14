"""Stage 1: the PointAvatar-style teacher, trained from tracked frames (``lightning fit --config experiments/teacher.yaml``).

A thin LightningModule around :class:`models.teacher.PointAvatarTeacher` and
:class:`models.rasterizer.PointRasterizer`: steps, losses, metrics, the point schedule
(PointAvatar's growth and pruning) and optimisers. Losses (PointAvatar, Sec. 3.4, without the
VGG term whose weights cannot be downloaded here):

    L = w_rgb L1(render, GT on white) + w_mask L1(alpha, mask) + w_ssim (1 - SSIM)
        + w_eikonal (|grad SDF| - 1)^2 + w_sdf_consistency SDF(x)^2 + w_blendshape sum_e w_e |B_e|^2
        + w_code_prior prior(corrections)

PointAvatar's training switches, each from the config (docs/teacher.md has what each did here):
``code_refinement`` (learnable corrections of the training frames' expression codes and head poses,
:class:`models.codes.FrameCodeCorrections`, with their own learning rate ``codes_lr`` and a prior
tying them to tracking; saved in the checkpoint, and the later stages train on the corrected codes
of those frames, :func:`~lightning_modules.stage.with_code_corrections`), ``use_var_expression``
(the blendshape prior weighted by 1 / var_e of the training codes), ``use_mean_expression`` (the
canonical expression psi_c = the mean training expression) and ``normalize_expression`` (not
PointAvatar's: blendshapes learnt per training standard deviation of each code component).

Point schedule: PointAvatar's growth and pruning (:class:`~lightning_modules.point_schedule.PointSchedule`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_modules import point_rows
from lightning_modules.handoff import build_model, network_entry, teacher_state_defaults
from lightning_modules.metrics import HeldOutMetrics, composite_on_white
from lightning_modules.point_schedule import PointSchedule
from lightning_modules.stage import (
    Row,
    Stage,
    check_finite_losses,
    check_refine,
    merge_weights,
    with_code_corrections,
)
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


class TeacherModule(PointSchedule, Stage):
    """Trains the teacher avatar; validation/test write ``teacher/*`` and the baselines' metrics
    (:mod:`lightning_modules.metrics`: ``tracked`` rows always, the ``refined`` row in ``lightning
    validate``/``test`` runs).

    Args:
        expression_dim, image_size: from the datamodule (linked by the CLI).
        teacher: the network, ``{class_path, init_args}`` of a :class:`~models.teacher.PointAvatarTeacher`
            (None: its defaults, PointAvatar's MLP sizes and point buffer); ``expression_dim`` comes
            from the dataset. Checkpoints of the earlier layout, with its init args
            (``max_points``, ``geometry_width``, ...) among the stage's, are read into it.
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
        lr_milestones, lr_gamma: MultiStepLR over epochs (PointAvatar: [40, 60] x 0.5).
        optimizer, lr_scheduler: Lightning's ``OptimizerCallable`` / ``LRSchedulerCallable`` (None: Adam,
            MultiStepLR; :meth:`~lightning_modules.stage.Stage.optimizer_and_schedule`).
        refine_steps, refine_lr: the ``refined`` row (:meth:`~lightning_modules.stage.Stage.refine_setting`).
    """

    stage = "teacher"
    monitor = "teacher/tracked/val/full/psnr"
    monitor_mode = "max"
    NETWORKS = {"teacher": "models.teacher.PointAvatarTeacher"}
    LEGACY_ARGS = {name: ("teacher", name) for name in (
        "max_points", "init_points", "min_points", "prune_threshold", "radius_factor", "geometry_width",
        "geometry_depth", "deformer_width", "deformer_depth", "shading_width", "num_frequencies")}

    def __init__(
        self,
        expression_dim: int = 16,
        image_size: int = 128,
        teacher: dict[str, Any] | None = None,
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
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters()
        if not codes_lr > 0:
            raise ValueError(f"codes_lr must be > 0, got {codes_lr}")
        self.loss_weights = merge_weights("loss weight(s)", loss_weights, DEFAULT_LOSS_WEIGHTS)
        # its class path and init args go into the checkpoint's `teacher` entry (handoff.load_teacher)
        self.teacher: PointAvatarTeacher = build_model(teacher, self.NETWORKS["teacher"],
                                                       {"expression_dim": expression_dim}, PointAvatarTeacher, "teacher")
        # per-frame code corrections of the training frames: built in setup("fit") from the datamodule
        # (or from a checkpoint's shapes), None without code refinement
        self.codes: FrameCodeCorrections | None = None
        # var_e of the training codes (the blendshape prior's weights), set in setup("fit")
        self.register_buffer("expression_var", torch.ones(expression_dim))
        self.rasterizer = PointRasterizer(image_size, points_per_pixel=points_per_pixel, background=1.0)
        check_refine(refine_steps, refine_lr)
        self.metrics = HeldOutMetrics({"teacher": ("tracked", "refined"), "baseline_mean": ("tracked",),
                                       "baseline_nearest": ("tracked",)})
        self.init_point_schedule(self.teacher.max_points)

    # -- rendering -------------------------------------------------------------------------------
    def render(
        self, batch, canonical: CanonicalOutput | None = None, extra: torch.Tensor | None = None
    ) -> tuple[dict, RasterOutput]:
        """Teacher forward + rasterization of RGB (and optional extra (B, N, C) channels) for a batch."""
        return point_rows.render(self.teacher, self.rasterizer, batch, canonical, extra)

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
        self.accumulate_visibility(out["indices"], point_weight.detach().sum((0, 2)))
        self.log_dict({f"teacher/train/{k}": v for k, v in terms.items()}, batch_size=len(batch))
        self.log("teacher/train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("num_points", float(self.teacher.num_active), prog_bar=True, batch_size=len(batch))
        return loss

    def on_train_epoch_end(self) -> None:
        if self.codes is not None:  # mean correction size over the training frames
            self.log_dict({f"teacher/codes/{k}": v for k, v in self.codes.magnitudes().items()})
        self.step_point_schedule()

    # -- evaluation ------------------------------------------------------------------------------
    def _canonical(self) -> CanonicalOutput:
        """The canonical outputs, once per evaluation epoch."""
        return self.cached("canonical", lambda: self.teacher.canonical(method="explicit"))

    def eval_renders(self, batch) -> dict[str, Row]:
        return point_rows.rows("teacher", self.teacher, self.rasterizer, batch, self._canonical(), self.refine_setting())

    def frame_costs(self, batch) -> dict[str, float]:
        """:func:`~lightning_modules.point_rows.frame_costs` of the teacher's rows."""
        return point_rows.frame_costs("teacher", self.teacher, self.rasterizer, batch, self._canonical(), self.refine_setting())

    def visualize(self, batch) -> dict[str, torch.Tensor]:
        """Columns for the render grid: ground truth | render | normals | rendered alpha, (B, 3, H, W)."""
        return {"ground_truth": composite_on_white(batch.image, batch.mask),
                **point_rows.grid(self.teacher, self.rasterizer, batch, self._canonical())}

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
        checkpoint["model_class"] = self.teacher.spec["class_path"]
        checkpoint["teacher"] = network_entry(self.teacher)
        self.save_point_schedule(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        # a checkpoint from before code refinement / the canonical expression: their neutral values
        state.setdefault("expression_var", torch.ones_like(self.expression_var))
        teacher_state_defaults(state, self.teacher, prefix="teacher.")
        if self.codes is None:  # the code table's size comes from the checkpoint (no datamodule needed)
            self.codes = FrameCodeCorrections.from_state_dict(state, "codes.")
        self.load_point_schedule(checkpoint)

    def extra_repr(self) -> str:
        return f"points={self.teacher.num_active}/{self.teacher.max_points}, radius={float(self.teacher.radius):.4g}"

