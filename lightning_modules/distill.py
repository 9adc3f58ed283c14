"""Stage 2 (the main job): distil the teacher into the student (``lightning fit --config experiments/distill.yaml``).

The frozen teacher (``model.init_args.teacher_ckpt``, default ``runs/teacher/latest``; pinned by
path and hash) gives its canonical outputs once; the student (any :class:`models.student.PointStudent`,
default RandLA-Net ⊕ GCN) learns on the teacher's canonical points with (DESIGN.md, "Distillation losses")

    L = λ_gt L_gt + λ_out L_out + λ_feat L_feat + λ_graph L_graph

- L_gt: RGB L1 (GT on white), mask L1 and 1 - SSIM of the student's render against the frames;
- L_out: albedo L1, normal 1 - cos, ``deformation_weight`` x blendshape/offset MSE and render L1,
  student vs teacher (the paper's plain sum has weight 1; experiments/distill.yaml uses 100);
- L_feat: ||A(f_s) - f_t||^2 with a 1x1 adapter A (not counted in the student's parameters);
- L_graph: edge-difference and local-relation matching on the student's kNN graph over the whole
  canonical cloud (built once), at M random anchors per step.

A weight of 0 switches a term off (``--model.init_args.loss_weights.graph=0``). Before the first
step, an optional per-point warm-up fits the teacher's outputs without rendering
(:mod:`lightning_modules.warmup`). The checkpoint's ``student`` entry (class path, init args, state
dict with the canonical points and their graph) is all the GAR stage and export need; it never
holds the teacher.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_modules import point_rows
from lightning_modules.flops import FlopTarget, student_flop_target, teacher_flop_target
from lightning_modules.handoff import build_student, load_teacher, network_entry
from lightning_modules.metrics import HeldOutMetrics, composite_on_white
from lightning_modules.stage import (
    Row,
    Stage,
    check_expression_dim,
    check_finite_losses,
    check_refine,
    merge_weights,
    with_code_corrections,
)
from lightning_modules.warmup import PerPointWarmup
from models.adapters import FeatureAdapter
from models.codes import FrameCodeCorrections
from models.losses import (
    distillation_loss,
    feature_distillation_loss,
    graph_distillation_loss,
    ground_truth_loss,
    output_distillation_loss,
)
from models.rasterizer import PointRasterizer
from models.student import PointStudent, StudentCanonical
from models.teacher import CanonicalOutput, PointAvatarTeacher

__all__ = ["DistillModule"]

DEFAULT_LOSS_WEIGHTS = {"gt": 1.0, "out": 1.0, "feat": 1.0, "graph": 1.0}
DEFAULT_GT_WEIGHTS = {"rgb": 1.0, "mask": 1.0, "ssim": 0.2}


class DistillModule(PerPointWarmup, Stage):
    """Knowledge distillation of the teacher avatar into the student.

    Args:
        expression_dim, image_size: from the datamodule (linked by the CLI); E must equal the teacher's.
        teacher_ckpt, teacher_ckpt_sha256: the teacher checkpoint (default ``runs/teacher/latest``) and its
            SHA-256, recorded by the run (:meth:`~lightning_modules.stage.Stage.bind_upstream`); a reload
            checks the file against them.
        student: ``{class_path, init_args}`` of any :class:`models.student.PointStudent` (default
            :class:`models.student.Student`, whose init args a dict without ``class_path`` holds);
            ``expression_dim`` comes from the teacher (:func:`~lightning_modules.handoff.build_student`).
        loss_weights: λ of {gt, out, feat, graph}; 0 switches a term off.
        gt_weights: weights inside L_gt: {rgb, mask, ssim}.
        graph_anchors, graph_tau: L_graph's M anchor points per step (clamped to N) and softmax temperature.
        points_per_pixel: rasterizer setting (the teacher's default, 10).
        lr, lr_milestones, lr_gamma: Adam on the student and the adapter, MultiStepLR over epochs.
        optimizer, lr_scheduler: Lightning's ``OptimizerCallable`` / ``LRSchedulerCallable`` (None: Adam,
            MultiStepLR; :meth:`~lightning_modules.stage.Stage.optimizer_and_schedule`).
        seed: seeds the anchor sampling (one generator per step: resumable) and the warm-up's normals.
        warmup_steps, warmup_lr, warmup_deformation_weight: the per-point warm-up
            (:mod:`lightning_modules.warmup`); 0 steps: none. A resumed fit does not repeat it.
        deformation_weight: weight of the blendshape/offset MSE inside L_out during training
            (1: the paper's unweighted L_out; see :func:`models.losses.output_distillation_loss`).
        refine_steps, refine_lr: the student's ``refined`` row (:meth:`~lightning_modules.stage.Stage.refine_setting`).

    Raises:
        UpstreamMissingError: no teacher checkpoint (one line naming the command that makes it).
        UpstreamChangedError: the recorded teacher checkpoint's bytes changed.
        ValueError: unknown loss names, a dataset whose E differs from the teacher's, or a negative setting.
    """

    stage = "distill"
    upstream = ("teacher", "teacher_ckpt")
    monitor = "student/tracked/val/full/psnr"
    monitor_mode = "max"

    def __init__(
        self,
        expression_dim: int = 16,
        image_size: int = 128,
        teacher_ckpt: str | None = None,
        teacher_ckpt_sha256: str | None = None,
        student: dict[str, Any] | None = None,
        loss_weights: dict[str, float] | None = None,
        gt_weights: dict[str, float] | None = None,
        graph_anchors: int = 4096,
        graph_tau: float = 0.1,
        points_per_pixel: int = 10,
        lr: float = 1e-3,
        lr_milestones: tuple[int, ...] = (40, 60),
        lr_gamma: float = 0.5,
        seed: int = 0,
        warmup_steps: int = 0,
        warmup_lr: float = 3e-3,
        warmup_deformation_weight: float = 100.0,
        deformation_weight: float = 1.0,
        refine_steps: int = 20,
        refine_lr: float = 5e-3,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters()
        check_refine(refine_steps, refine_lr)
        if warmup_steps < 0 or not warmup_lr > 0 or warmup_deformation_weight < 0:
            raise ValueError(f"warmup_steps must be >= 0, warmup_lr > 0 and warmup_deformation_weight >= 0, got "
                             f"{warmup_steps}, {warmup_lr}, {warmup_deformation_weight}")
        if not deformation_weight >= 0:
            raise ValueError(f"deformation_weight must be >= 0, got {deformation_weight}")
        self.loss_weights = merge_weights("loss_weights", loss_weights, DEFAULT_LOSS_WEIGHTS)
        self.gt_weights = merge_weights("gt_weights", gt_weights, DEFAULT_GT_WEIGHTS)

        path = self.bind_upstream()  # the teacher this run trains on, pinned by path and hash
        # with the teacher's corrected codes of its training frames (None: none), saved for the GAR too
        self.teacher: PointAvatarTeacher
        self.codes: FrameCodeCorrections | None
        self.teacher, self.codes = load_teacher(path)
        check_expression_dim(expression_dim, self.teacher, path, "teacher")
        # the teacher's canonical outputs, once per subject (not saved: recomputed from the teacher)
        with torch.no_grad():
            canonical = self.teacher.canonical(method="explicit")
        for name in ("points", "albedo", "normals", "feature", "blendshapes", "offset"):
            self.register_buffer(f"teacher_{name}", getattr(canonical, name).detach().clone(), persistent=False)

        self.student: PointStudent = build_student(student, self.teacher.expression_dim)
        self.student.set_canonical(self.teacher_points, radius=self.teacher.radius)
        self.adapter = FeatureAdapter(self.student.latent_dim, self.teacher_feature.shape[1])
        # only L_feat and L_graph reach the adapter: with both off it is frozen, or DDP would wait for
        # gradients of parameters no loss touches ("did not receive grad" in the first step)
        self.adapter.requires_grad_(self.loss_weights["feat"] > 0 or self.loss_weights["graph"] > 0)
        self.register_buffer("warmup_done", torch.zeros((), dtype=torch.bool))  # persistent: resume skips it
        self.rasterizer = PointRasterizer(image_size, points_per_pixel=points_per_pixel, background=1.0)
        self.metrics = HeldOutMetrics({"baseline_mean": ("tracked",), "baseline_nearest": ("tracked",),
                                       "teacher": ("tracked",), "student": ("tracked", "refined")},
                                      swd_models=("student", "teacher"))
        self.strict_loading = False  # checkpoints omit the frozen teacher

    # -- the frozen teacher ------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # never leaves eval mode
        return self

    def teacher_canonical(self) -> CanonicalOutput:
        """The cached canonical outputs of the teacher (detached)."""
        return CanonicalOutput(
            points=self.teacher_points, indices=None, sdf=None, albedo=self.teacher_albedo,
            feature=self.teacher_feature, sdf_grad=None, normals=self.teacher_normals,
            blendshapes=self.teacher_blendshapes, offset=self.teacher_offset,
        )

    # -- rendering ----------------------------------------------------------------------------------
    def render_student(self, batch, canonical: StudentCanonical | None = None):
        """The student's frame and its rasterization (:func:`~lightning_modules.point_rows.render`)."""
        return point_rows.render(self.student, self.rasterizer, batch, canonical)

    @torch.no_grad()
    def render_teacher(self, batch):
        """The frozen teacher's frame (cached canonical outputs) and its rasterization."""
        return point_rows.render(self.teacher, self.rasterizer, batch, self.teacher_canonical())

    # -- training ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        batch = with_code_corrections(batch, self.codes)  # the teacher's fitted codes of its training frames
        canonical = self.student.canonical()
        s_out, s_raster = self.render_student(batch, canonical)
        s_rgb = s_raster.image[:, :3]
        w, wg = self.loss_weights, self.gt_weights
        terms: dict[str, torch.Tensor] = {}
        logs: dict[str, torch.Tensor] = {}
        if w["gt"] > 0:
            gt = ground_truth_loss(s_rgb, s_raster.alpha, batch.image, batch.mask, wg)
            terms["gt"] = gt.pop("total")
            logs.update({f"gt_{k}": v for k, v in gt.items()})
        if w["out"] > 0:
            _, t_raster = self.render_teacher(batch)
            out = output_distillation_loss(
                canonical.albedo, self.teacher_albedo, canonical.normals, self.teacher_normals,
                canonical.blendshapes, self.teacher_blendshapes, canonical.offset, self.teacher_offset,
                s_rgb, t_raster.image[:, :3], deformation_weight=self.hparams.deformation_weight,
            )
            terms["out"] = out.pop("total")
            logs.update({f"out_{k}": v for k, v in out.items()})
        if w["feat"] > 0 or w["graph"] > 0:
            adapted = self.adapter(canonical.feature)  # (N, 256)
            if w["feat"] > 0:
                terms["feat"] = feature_distillation_loss(adapted, self.teacher_feature)
            if w["graph"] > 0:
                generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
                graph = graph_distillation_loss(
                    adapted, self.teacher_feature, self.student.neighbors(),
                    num_anchors=self.hparams.graph_anchors, generator=generator, tau=self.hparams.graph_tau,
                )
                terms["graph"] = graph.pop("total")
                logs.update({f"graph_{k}": v for k, v in graph.items()})
        check_finite_losses(terms, self.global_step)
        loss = distillation_loss(terms, w)
        logs.update(terms)
        self.log_dict({f"distill/train/{k}": v for k, v in logs.items()}, batch_size=len(batch))
        self.log("distill/train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    # -- evaluation --------------------------------------------------------------------------------
    def _student_canonical(self) -> StudentCanonical:
        """The student's canonical outputs, once per evaluation epoch."""
        return self.cached("student", self.student.canonical)

    def eval_renders(self, batch) -> dict[str, Row]:
        return {**point_rows.rows("student", self.student, self.rasterizer, batch, self._student_canonical(),
                                  self.refine_setting()),
                **point_rows.rows("teacher", self.teacher, self.rasterizer, batch, self.teacher_canonical())}

    def frame_costs(self, batch) -> dict[str, float]:
        """:func:`~lightning_modules.point_rows.frame_costs` of the teacher's and the student's rows."""
        return {**point_rows.frame_costs("teacher", self.teacher, self.rasterizer, batch, self.teacher_canonical()),
                **point_rows.frame_costs("student", self.student, self.rasterizer, batch, self._student_canonical(),
                                         self.refine_setting())}

    def visualize(self, batch) -> dict[str, torch.Tensor]:
        """Grid columns: ground truth | teacher | student | student normals, (B, 3, H, W)."""
        student = point_rows.grid(self.student, self.rasterizer, batch, self._student_canonical())
        return {"ground_truth": composite_on_white(batch.image, batch.mask),
                "teacher": self.render_teacher(batch)[1].image[:, :3],
                "student": student["render"], "student_normals": student["normals"]}

    def counts(self) -> dict[str, float | int]:
        metrics: dict[str, float | int] = {
            "num_points": self.student.num_points,
            "params/student": sum(p.numel() for p in self.student.canonical_network_parameters()),
            "params/teacher": sum(p.numel() for p in self.teacher.canonical_network_parameters()),
        }
        metrics["params_ratio"] = metrics["params/student"] / metrics["params/teacher"]
        return metrics

    def flop_targets(self) -> dict[str, FlopTarget]:
        """Teacher and student for the :class:`~lightning_modules.flops.FlopCounter` (unwrapped modules)."""
        return {"teacher": teacher_flop_target(self.teacher), "student": student_flop_target(self.student)}

    # -- optimisation and checkpoints ------------------------------------------------------------------
    # BatchNorm statistics made exact for the current weights (recalibrate_batchnorm) where eval mode starts
    # and a checkpoint is written (not every step: a tenth of a CPU demo step, and training never reads them)
    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self.student.recalibrate_batchnorm()

    def on_test_model_eval(self) -> None:
        super().on_test_model_eval()
        self.student.recalibrate_batchnorm()

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in (*self.student.parameters(), *self.adapter.parameters()) if p.requires_grad]
        return self.optimizer_and_schedule([{"params": params, "lr": hp.lr}])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        student_state = self.student_state_to_save(checkpoint)
        checkpoint["state_dict"].update({f"student.{k}": v for k, v in student_state.items()})
        checkpoint["student"] = network_entry(self.student, state_dict=student_state,
                                              expression_dim=self.student.expression_dim)
        checkpoint["num_points"] = self.student.num_points
