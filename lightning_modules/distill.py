"""Stage 2 (the main job): distil the teacher into the RandLA-Net ⊕ GCN student.

``lightning fit --config experiments/distill.yaml`` loads the frozen teacher from
``runs/teacher/latest/checkpoints/last.ckpt`` (or ``model.init_args.teacher_ckpt``) and trains
:class:`models.student.Student` on the teacher's canonical points with (DESIGN.md, "Distillation
losses")

    L = λ_gt L_gt + λ_out L_out + λ_feat L_feat + λ_graph L_graph

- L_gt: RGB L1 (GT on white), mask L1 and 1 - SSIM of the student's render against the frames;
- L_out: albedo L1, normal 1 - cos, ``deformation_weight`` x blendshape/offset MSE and render L1,
  student vs teacher (the paper's plain sum has weight 1; experiments/distill.yaml uses 100);
- L_feat: ||A(f_s) - f_t||^2 with a 1x1 adapter A (not counted in the student's parameters);
- L_graph: edge-difference and local-relation matching on the student's level-0 kNN graph over the
  whole canonical cloud (k = 16, built once), at M random anchors per step.

A weight of 0 switches a term off (``--model.init_args.loss_weights.graph=0``).

Warm-up (``warmup_steps``, our choice; 0 switches it off): before the first training step the
student fits the teacher's per-point outputs alone, with no rendering. Its own Adam minimises
albedo L1 + normal 1 - cos + ``warmup_deformation_weight`` x blendshape/offset MSE + L_feat, plus
the L1 between the two shading networks on random unit normals (the L_out terms only while
λ_out > 0, L_feat only while λ_feat > 0). L_gt and the other render terms
then start from a student that already is the teacher's cloud. On the earlier 64x64 CPU demo, with
500 steps (about 20 s), the student's renders of the training frames came within 32.2 dB PSNR of
the teacher's, against 25.8 dB without the warm-up (``python -m benchmarks.distill_fidelity``), and
its held-out PSNR rose from 20.9 to 21.3-21.4 (the teacher's: 21.8).
Both deformation weights (``warmup_deformation_weight`` for the warm-up, ``deformation_weight``
inside L_out while rendering; separate settings, both 100 in experiments/distill.yaml) are there
because blendshapes are small numbers: at weight 1 their MSE is 1e-4 of the loss. Without the
second one the rendering losses let the blendshapes drift from the teacher's after the warm-up
(relative error 0.21 against 0.08 on the 128x128 CPU demo).

The teacher stays
in eval mode with ``requires_grad=False``; its canonical outputs are computed once. The student's
checkpoint carries everything the GAR stage and export need (``checkpoint["student"]``: class,
init args and state dict with the canonical points, their kNN graph and E), never the teacher.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.flops import FlopTarget, count_flops, sphere_points, teacher_flop_target
from lightning_modules.handoff import build_student, class_path_of, load_teacher
from lightning_modules.metrics import (
    HeldOutMetrics,
    composite_on_white,
    multiply_adds,
    refined_render,
    time_per_frame,
)
from lightning_modules.stage import Row, Stage, check_finite_losses, merge_weights, with_code_corrections
from models.adapters import FeatureAdapter
from models.camera import pixel_radius
from models.codes import FrameCodeCorrections
from models.losses import (
    albedo_distillation_loss,
    deformation_distillation_loss,
    distillation_loss,
    feature_distillation_loss,
    graph_distillation_loss,
    mask_loss,
    masked_l1,
    normal_distillation_loss,
    output_distillation_loss,
    ssim_loss,
)
from models.rasterizer import PointRasterizer
from models.student import PointStudent, StudentCanonical
from models.teacher import CanonicalOutput, PointAvatarTeacher

__all__ = ["DistillModule", "student_flop_target"]

DEFAULT_LOSS_WEIGHTS = {"gt": 1.0, "out": 1.0, "feat": 1.0, "graph": 1.0}
DEFAULT_GT_WEIGHTS = {"rgb": 1.0, "mask": 1.0, "ssim": 0.2}


class _StudentFrame(torch.nn.Module):
    """One frame of the student from cached canonical outputs: deformation and shading (for counting)."""

    def __init__(self, student: PointStudent, canonical: StudentCanonical) -> None:
        super().__init__()
        self.shading = student.shading
        object.__setattr__(self, "_student", student)
        self.canonical = canonical

    def forward(self, expression: torch.Tensor, world_mat: torch.Tensor):
        return self._student.deform(self.canonical, expression), self._student.shade(self.canonical, world_mat)


def student_flop_target(student: PointStudent) -> FlopTarget:
    """The student's :class:`FlopTarget` (canonical forward and one frame, counted like the teacher's).

    The canonical count runs the student on ``n`` points of a sphere with their own graph (kNN and
    sampling are per-subject preprocessing, not counted); per frame: deformation and shading of
    the held canonical outputs (the rasterizer is left out, as for the teacher).
    """
    like = student.points

    def canonical(n: int):
        return count_flops(*student.flop_forward(sphere_points(n, like)))

    def per_frame(n: int):
        modes = [(m, m.training) for m in student.modules()]
        try:  # eval: counting must not update batch-norm statistics (a resumed fit counts again)
            with torch.no_grad():
                cached = student.eval().canonical()
        finally:
            for module, training in modes:
                module.train(training)
        expression = like.new_zeros(1, student.expression_dim)
        world_mat = torch.eye(3, 4, dtype=like.dtype, device=like.device)[None].clone()
        world_mat[0, 2, 3] = 4.0
        return count_flops(_StudentFrame(student, cached), (expression, world_mat))

    return FlopTarget(
        canonical=canonical,
        num_points=student.num_points,
        params=sum(p.numel() for p in student.canonical_network_parameters()),
        per_frame=per_frame,
    )


class DistillModule(Stage):
    """Knowledge distillation of the teacher avatar into the student.

    Args:
        expression_dim, image_size: from the datamodule (linked by the CLI); ``expression_dim``
            must equal the teacher's.
        teacher_ckpt: the teacher checkpoint (default ``runs/teacher/latest/checkpoints/last.ckpt``);
            the run records the file it resolved here (:meth:`~lightning_modules.stage.Stage.bind_upstream`).
        teacher_ckpt_sha256: the SHA-256 of that file, recorded by the run (None: a new run); a
            reload checks the file against it.
        student: the student, ``{class_path, init_args}`` of any :class:`models.student.PointStudent`
            (default :class:`models.student.Student`; a dict without ``class_path`` is the init args of
            that default, as configs before class paths wrote it); ``expression_dim`` comes from the
            teacher (:func:`~lightning_modules.handoff.build_student`).
        loss_weights: λ of {gt, out, feat, graph}; 0 switches a term off.
        gt_weights: weights inside L_gt: {rgb, mask, ssim}.
        graph_anchors: M anchor points of L_graph per step (clamped to N).
        graph_tau: temperature of the local-relation softmax.
        points_per_pixel: rasterizer setting (the teacher's default, 10).
        lr, lr_milestones, lr_gamma: Adam on the student and the adapter, MultiStepLR over epochs.
        optimizer, lr_scheduler: another optimiser / epoch schedule, Lightning's ``OptimizerCallable`` /
            ``LRSchedulerCallable`` (None: Adam, MultiStepLR; :meth:`~lightning_modules.stage.Stage.optimizer_and_schedule`).
        seed: seeds the anchor sampling (one generator per step: resumable) and the warm-up's normals.
        warmup_steps, warmup_lr, warmup_deformation_weight: the per-point warm-up (module
            docstring) at the start of a fit; 0 steps switches it off. A resumed fit does not
            repeat it (the ``warmup_done`` buffer is in the checkpoint); a fit interrupted inside it
            saved the weights it started from, and its resumed fit runs the whole warm-up.
        deformation_weight: weight of the blendshape/offset MSE inside L_out during training
            (1: the paper's unweighted L_out; see :func:`models.losses.output_distillation_loss`).
        refine_steps, refine_lr: the student's ``refined`` row (:func:`~lightning_modules.metrics.refine_codes`)
            in ``lightning validate``/``test`` runs; 0 steps: none.

    Raises:
        UpstreamMissingError: no teacher checkpoint (one line naming the command that makes it).
        UpstreamChangedError: the recorded teacher checkpoint's bytes changed.
        ValueError: unknown loss names, a dataset whose E differs from the teacher's, or a
            negative warm-up setting or ``deformation_weight``.
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
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_callable, self.lr_scheduler_callable = optimizer, lr_scheduler
        if warmup_steps < 0 or not warmup_lr > 0 or warmup_deformation_weight < 0:
            raise ValueError(
                f"warmup_steps must be >= 0, warmup_lr > 0 and warmup_deformation_weight >= 0, got "
                f"{warmup_steps}, {warmup_lr}, {warmup_deformation_weight}"
            )
        if refine_steps < 0 or not refine_lr > 0:
            raise ValueError(f"refine_steps must be >= 0 and refine_lr > 0, got {refine_steps} and {refine_lr}")
        if not deformation_weight >= 0:
            raise ValueError(f"deformation_weight must be >= 0, got {deformation_weight}")
        self.loss_weights = merge_weights("loss_weights", loss_weights, DEFAULT_LOSS_WEIGHTS)
        self.gt_weights = merge_weights("gt_weights", gt_weights, DEFAULT_GT_WEIGHTS)

        path = self.bind_upstream()  # the teacher this run trains on, pinned by path and hash
        # the teacher's corrected codes of the training frames (None: fitted without code refinement);
        # saved with the student, so the GAR trains on them too
        self.teacher: PointAvatarTeacher
        self.codes: FrameCodeCorrections | None
        self.teacher, self.codes = load_teacher(path)
        if self.teacher.expression_dim != expression_dim:
            raise ValueError(
                f"the dataset's expression_dim {expression_dim} differs from the teacher's "
                f"{self.teacher.expression_dim} ({path}): distil on the teacher's dataset"
            )
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
        self._pre_warmup: dict[str, dict[str, torch.Tensor]] | None = None  # set while the warm-up runs

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
    def _raster(self, out: dict, batch, radius: torch.Tensor, extra: torch.Tensor | None = None):
        features = out["colors"] if extra is None else torch.cat([out["colors"], extra], -1)
        r_px = pixel_radius(out["points"], batch.world_mat, batch.K, radius)
        return self.rasterizer(out["points"], features, batch.world_mat, batch.K, radius=r_px)

    def render_student(self, batch, canonical: StudentCanonical | None = None):
        out = self.student(batch.expression, batch.world_mat, canonical=canonical)
        return out, self._raster(out, batch, self.student.radius)

    @torch.no_grad()
    def render_teacher(self, batch):
        out = self.teacher(batch.expression, batch.world_mat, canonical=self.teacher_canonical())
        return out, self._raster(out, batch, self.teacher.radius)

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
            target = composite_on_white(batch.image, batch.mask)
            gt = {"rgb": masked_l1(s_rgb, target), "mask": mask_loss(s_raster.alpha, batch.mask)}
            if wg["ssim"] > 0:
                gt["ssim"] = ssim_loss(s_rgb, target)
            terms["gt"] = sum(wg[k] * v for k, v in gt.items())
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
    def _render_codes(self, expression, world_mat, extra, batch, canonical: StudentCanonical) -> torch.Tensor:
        """The student's render (B, 3, H, W) of ``batch``'s frames posed by ``expression`` and ``world_mat``
        (:func:`~lightning_modules.metrics.refine_codes`' ``render``; ``extra`` unused)."""
        out = self.student(expression, world_mat, canonical=canonical)
        r_px = pixel_radius(out["points"], world_mat, batch.K, self.student.radius)
        return self.rasterizer(out["points"], out["colors"], world_mat, batch.K, radius=r_px).image[:, :3]

    def _refine(self) -> bool:
        """The refined row runs in ``lightning validate``/``test`` only: never inside a fit (selection)."""
        return self.hparams.refine_steps > 0 and self.outside_fit

    def _refined_render(self, batch, canonical) -> torch.Tensor:
        """The ``refined`` protocol's render of ``batch`` (codes refined against its frames, student frozen)."""
        hp = self.hparams
        return refined_render(self._render_codes, batch, hp.refine_steps, hp.refine_lr, inputs=(canonical,))

    def _student_canonical(self) -> StudentCanonical:
        """The student's canonical outputs, once per evaluation epoch."""
        return self.cached("student", self.student.canonical)

    def eval_renders(self, batch) -> dict[str, Row]:
        canonical = self._student_canonical()
        _, s_raster = self.render_student(batch, canonical)
        _, t_raster = self.render_teacher(batch)
        renders = {"student": ("student", "tracked", s_raster.image[:, :3]),
                   "teacher": ("teacher", "tracked", t_raster.image[:, :3])}
        if self._refine():
            renders["student_refined"] = ("student", "refined", self._refined_render(batch, canonical))
        return renders

    def frame_costs(self, batch) -> dict[str, float]:
        """``ms_per_frame/{teacher,student}/tracked``: deform, shade, rasterize one frame (canonical
        cached); with the refined row, ``ms_per_frame/student/refined`` and
        ``flops_per_frame/student/refined`` (the refinement's passes, :func:`~lightning_modules.metrics.multiply_adds`)."""
        cached = self._student_canonical()
        costs = {"ms_per_frame/teacher/tracked": time_per_frame(lambda: self.render_teacher(batch)),
                 "ms_per_frame/student/tracked": time_per_frame(lambda: self.render_student(batch, cached))}
        if self._refine():
            costs["ms_per_frame/student/refined"] = time_per_frame(lambda: self._refined_render(batch, cached), repeats=1)
            costs["flops_per_frame/student/refined"] = multiply_adds(lambda: self._refined_render(batch, cached))
        return costs

    @torch.no_grad()
    def visualize(self, batch) -> dict[str, torch.Tensor]:
        """Grid columns: ground truth | teacher | student | student normals, (B, 3, H, W)."""
        s_out = self.student(batch.expression, batch.world_mat, canonical=self._student_canonical())
        s_raster = self._raster(s_out, batch, self.student.radius, extra=s_out["normals_cam"] * 0.5 + 0.5)
        _, t_raster = self.render_teacher(batch)
        return {
            "ground_truth": composite_on_white(batch.image, batch.mask),
            "teacher": t_raster.image[:, :3],
            "student": s_raster.image[:, :3],
            "student_normals": s_raster.image[:, 3:6],
        }

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
    def warmup_losses(self, normals: torch.Tensor) -> dict[str, torch.Tensor]:
        """The warm-up's per-point terms (module docstring) of the student as it is now.

        Args:
            normals: (M, 3) unit camera-space normals where the two shading networks are compared.

        Returns:
            {"albedo", "normal", "deformation", "shading"} (when L_out is on), "feat" (when L_feat
            is on) and "total": float32 scalars, the total weighted with
            ``warmup_deformation_weight`` on the deformation term. With both terms off, the
            total is 0 and the warm-up is skipped.
        """
        canonical = self.student.canonical()
        terms: dict[str, torch.Tensor] = {}
        if self.loss_weights["out"] > 0:
            terms["albedo"] = albedo_distillation_loss(canonical.albedo, self.teacher_albedo)
            terms["normal"] = normal_distillation_loss(canonical.normals, self.teacher_normals)
            terms["deformation"] = deformation_distillation_loss(
                canonical.blendshapes, self.teacher_blendshapes, canonical.offset, self.teacher_offset
            )
            with torch.no_grad():
                target = self.teacher.shading(normals)
            terms["shading"] = (self.student.shading(normals) - target).abs().mean()
        if self.loss_weights["feat"] > 0:
            terms["feat"] = feature_distillation_loss(self.adapter(canonical.feature), self.teacher_feature)
        weights = {"deformation": self.hparams.warmup_deformation_weight}
        terms["total"] = sum(weights.get(k, 1.0) * v for k, v in terms.items())
        return terms

    def on_fit_start(self) -> None:
        steps = self.hparams.warmup_steps
        if steps == 0 or bool(self.warmup_done) or not (self.loss_weights["out"] > 0 or self.loss_weights["feat"] > 0):
            return
        if self.trainer.ckpt_path is not None and getattr(self.trainer.strategy, "restore_checkpoint_after_setup", False):
            return  # a strategy that restores the weights after this hook: warmup_done is not known yet
        from tqdm.auto import tqdm

        # until it ends, a checkpoint (Ctrl-C: RunFolder.on_exception) holds the weights it started from,
        # and warmup_done False: the resumed fit runs the whole warm-up again, exactly as this one would
        self._pre_warmup = {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
                            for name, module in (("student", self.student), ("adapter", self.adapter))}
        params = [p for p in (*self.student.parameters(), *self.adapter.parameters()) if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.hparams.warmup_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        generator = torch.Generator(device="cpu").manual_seed(self.hparams.seed * 1_000_003 + 7)
        self.student.train()
        start = time.perf_counter()
        bar = tqdm(range(steps), desc="distillation warm-up (per-point, no rendering)", leave=False,
                   disable=self.global_rank != 0 or self.trainer.progress_bar_callback is None)
        with torch.enable_grad():
            for step in bar:
                normals = torch.nn.functional.normalize(torch.randn(4096, 3, generator=generator), dim=-1)
                terms = self.warmup_losses(normals.to(self.device))
                check_finite_losses({f"warmup_{k}": v for k, v in terms.items()}, step)
                # autograd.grad, not backward: no DDP gradient hook fires outside its forward
                grads = torch.autograd.grad(terms["total"], params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = None if g is None else g.detach()
                optimizer.step()
                schedule.step()
                bar.set_postfix(loss=f"{terms['total'].item():.4f}", refresh=False)
        for p in params:
            p.grad = None
        if self.trainer.world_size > 1:  # every rank warmed up alike; rank 0's weights settle any round-off
            state = self.trainer.strategy.broadcast(  # on the CPU: pickled CUDA tensors would land on GPU 0
                {name: {k: v.cpu() for k, v in module.state_dict().items()}
                 for name, module in (("student", self.student), ("adapter", self.adapter))}, src=0
            )
            self.student.load_state_dict(state["student"])
            self.adapter.load_state_dict(state["adapter"])
        self.student.recalibrate_batchnorm()
        self.warmup_done.fill_(True)
        self._pre_warmup = None
        rank_zero_info(
            f"distillation warm-up: {steps} steps in {time.perf_counter() - start:.1f} s; "
            + ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items() if k != "total")
        )

    # The running BatchNorm statistics are made exact for the current weights
    # (Student.recalibrate_batchnorm) where eval mode starts and where a checkpoint is written, so
    # evaluation, checkpoints and the later stages see what training saw. Not after every step:
    # the pass costs about a tenth of a CPU demo step, and training itself never reads them.
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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # refuses a checkpoint trained on another teacher
        # checkpoints from before the warm-up existed hold a trained student: never warm it up again
        checkpoint["state_dict"].setdefault("warmup_done", torch.ones((), dtype=torch.bool))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        if self._pre_warmup is not None:  # interrupted inside the warm-up: the weights it started from
            student_state = self._pre_warmup["student"]
            checkpoint["state_dict"].update({f"adapter.{k}": v for k, v in self._pre_warmup["adapter"].items()})
        else:
            self.student.recalibrate_batchnorm()  # the state dict was collected before this hook: refresh it
            student_state = self.student.state_dict()
        checkpoint["state_dict"].update({f"student.{k}": v for k, v in student_state.items()})
        checkpoint["student"] = {
            "class_path": class_path_of(self.student),
            "init_args": dict(self.student.spec["init_args"]),
            "state_dict": student_state,
            "expression_dim": self.student.expression_dim,
        }
        checkpoint["num_points"] = self.student.num_points
