"""Stage 3: the generative adversarial renderer and its inverse (``lightning fit --config experiments/gar.yaml``).

The frozen student (from ``runs/distill/latest/checkpoints/last.ckpt`` or
``model.init_args.student_ckpt``; its sizes come from that checkpoint) supplies static per-point
latent codes f_s; each frame deforms the points with an expression code and rasterizes
[f_s, camera-space normal] at ``num_scales`` resolutions (K scaled per scale). The generator G turns
those maps and a global code z into RGB (with ``residual``, as a correction of the student's
rasterized colours, rasterized alongside at full size); the inverse encoder E maps a frame to
(z, expression).
Manual optimisation, three phases per step (DESIGN.md "GAR"; Piao et al., CVPR 2021):

- G (+E): L1 + w_ssim (1 - SSIM) of G(raster(student(expr)), z) against the frame x (on white
  under the head mask), with expr the tracked code (``geometry="tracked"``) or E_expr(x) (GAR's
  loop, ``geometry="encoder"``) and z = E_z(x), or per frame with probability ``z_mean_prob`` the
  running mean z the leak-free row renders with; expression supervision |E_expr(x) - tracked|^2,
  the adversarial loss on G's output and pix2pixHD feature matching on D's activations (both after
  ``adv_warmup_epochs``), normal consistency (a learnable normal estimator N, trained on real frames only,
  applied to G's output must give back the rasterized normal map), z-swap (G(inputs_a, z_b) keeps
  a's normals and E recovers z_b) and a small z regulariser;
- D: non-saturating logistic (or hinge) loss, lazy R1 every ``r1_every`` steps (scaled by it);
- N: 1 - cos between N(real frame) and the rasterized normal map of the tracked expression.

Evidence logged every epoch (W&B and CSV): D's real/fake accuracy and logit gap on train, val and
test (``gar/<split>/d_accuracy``, ``..._real``, ``..._fake``, ``gar/<split>/d_logit_gap``), E's
expression error against tracking (``gar/<split>/encoder_expression_mse``), and the divergence
guard's flag ``gar/diverged`` (a reconstruction-loss spike, or a val PSNR far under the student's:
warned once; the demo tests the best checkpoint on val). An EMA copy of G renders for evaluation. Held-out frames are scored (:mod:`lightning_modules.metrics`)
for ``student/tracked`` (the student's rasterized colours), ``gar/tracked`` (the headline: z = the
running mean of the training z, the tracked expression and camera; nothing looks at the frame)
and, in ``lightning validate``/``test`` runs, two labelled ``refined`` rows that look at the frame
they are scored on, and the feature ablation (``gar_zero_features`` and ``gar_shuffled_features``:
the ``gar`` row with f_s zeroed or in a shuffled point order): ``gar/refined`` (expression, head pose and z refined by ``refine_steps``
gradient steps against the frame from the tracked codes and the mean z, G frozen) and
``gar_inverted/refined`` (GAR's inversion: E's z and expression, refined by ``invert_steps`` steps
through the frozen EMA G). ``gar/d_collapse`` (logged) turns 1 with a warning when the D
loss stays below ``collapse_threshold`` for ``collapse_patience`` steps.

Reenactment: ``lightning predict ... --data.init_args.driving_video VIDEO`` renders ``gar``
with a driving video's expressions and head motion (:meth:`GARModule.predict_step`,
:mod:`datamodules.driving`) into ``renders/reenact.mp4``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.handoff import load_code_corrections, load_student, read_checkpoint
from lightning_modules.metrics import (
    HeldOutMetrics,
    composite_on_white,
    multiply_adds,
    refined_render,
    time_per_frame,
)
from lightning_modules.stage import Row, Stage, check_finite_losses, merge_weights, with_code_corrections
from models.camera import pixel_radius
from models.discriminator import MultiScalePatchDiscriminator
from models.encoder import InverseEncoder, NormalEstimator
from models.frame import check_expression
from models.gan_losses import (
    CollapseMonitor,
    DivergenceGuard,
    d_loss,
    discriminator_accuracy,
    feature_matching_loss,
    g_loss,
    normal_consistency_loss,
    r1_regularizer,
    z_swap_loss,
    z_swap_permutation,
)
from models.losses import masked_l1, ssim_loss
from models.rasterizer import rasterize_points
from models.renderer import GARFrame, GARGenerator, GeneratorInputs, ema_update

__all__ = ["GARModule", "GeneratorInputs"]


DEFAULT_LOSS_WEIGHTS = {
    "l1": 1.0, "ssim": 0.2, "adv": 0.05, "feature_matching": 0.0, "expression": 1.0, "normal": 0.1,
    "z_swap": 0.1, "z_reg": 1e-3,
}
#: Rows this stage scores: model -> protocols (``refined`` rows and the feature ablation only outside a fit).
ROWS = {
    "baseline_mean": ("tracked",), "baseline_nearest": ("tracked",), "student": ("tracked",),
    "gar": ("tracked", "refined"), "gar_inverted": ("refined",),
    "gar_zero_features": ("tracked",), "gar_shuffled_features": ("tracked",),
}
#: What G is given as the point features f_s: the student's, zeros, or the student's in a shuffled point order.
FEATURES = ("real", "zero", "shuffled")
#: The geometry G's reconstruction is posed by in training: the tracked expression or E's.
GEOMETRY = ("tracked", "encoder")


class GARModule(Stage):
    """Trains G, D, E (and the normal estimator) on the frozen student's point features.

    Args:
        expression_dim, image_size: from the datamodule (linked); E must equal the student's.
        student_ckpt: distillation checkpoint (default ``runs/distill/latest/checkpoints/last.ckpt``);
            the run records the file it resolved here (:meth:`~lightning_modules.stage.Stage.bind_upstream`).
        student_ckpt_sha256: the SHA-256 of that file, recorded by the run (None: a new run); a
            reload checks the file against it.
        z_dim, num_scales, base_channels, mapping_layers: the generator (:class:`~models.renderer.GARGenerator`).
        disc_channels, disc_scales: the discriminator; encoder_channels: the inverse encoder.
        gan_loss: "logistic" (non-saturating) or "hinge".
        loss_weights: {l1, ssim, adv, feature_matching, expression, normal, z_swap, z_reg}; 0 switches a
            term off. ``feature_matching``: pix2pixHD's L1 between D's activations on the frame and on
            G's output (:func:`~models.gan_losses.feature_matching_loss`).
        geometry: what poses G's reconstruction in training: "tracked" (the frame's tracked, or the
            teacher's corrected, expression: what the ``gar`` row renders with) or "encoder" (E's
            expression, GAR's inverse-rendering loop; E's geometry errors then reach G).
        z_mean_prob: the probability, per training frame, that G is given the running mean z instead
            of E's z of that frame. E sees the frame G must reproduce, so a G trained on E's z alone
            can lean on z and do worse with the mean z that the leak-free ``gar`` row renders with.
        adv_warmup_epochs: epochs of reconstruction only before the adversarial and feature-matching
            terms reach G (D trains throughout).
        r1_gamma, r1_every: lazy R1 (gamma / 2 * every * R1 every ``r1_every`` D steps).
        lr_g, lr_d: Adam learning rates of G+E and of D; the normal estimator uses lr_g.
        betas_g, betas_d: their Adam betas. G: StyleGAN2's (0, 0.99); D: pix2pixHD's (0.5, 0.999) at
            lr 2e-4. Our convolutions have no equalised learning rate, and at StyleGAN2's lr 2e-3 with
            beta1 = 0 the PatchGAN stays at chance (D loss 2 log 2) on real frames against G's renders.
        ema_decay: of the evaluation copy of G (with warm-up: min(decay, (1 + n) / (10 + n)) at batch n).
        collapse_threshold, collapse_patience: the D-collapse health signal.
        divergence_factor, divergence_window, divergence_patience: the divergence guard
            (:class:`~models.gan_losses.DivergenceGuard` on the reconstruction terms l1, ssim and
            expression, weighted, averaged over DDP ranks): ``patience`` consecutive steps
            above ``factor`` x the median of the previous ``window`` steps, or a non-finite loss.
        divergence_margin_db: the guard also fires when a fit's val ``gar`` PSNR (full) falls this many
            dB under the best val PSNR of the same fit (a G that gets worse, not one still climbing
            from grey). A fired guard warns once and logs ``gar/diverged`` = 1; the checkpoint the
            demo tests stays the best on val (``best.ckpt``); the report names a GAR under its
            student on val in its first line either way.
        points_per_pixel: rasterizer setting.
        residual: G refines the student's rasterized render (its colours rasterized with the
            features, ``GARGenerator(residual=True)``) instead of drawing the frame from the
            features alone; ``experiments/gar.yaml`` turns it on (G starts from the student's
            render rather than from grey).
        residual_space: ``"logit"`` or ``"rgb"``: where a residual G adds its correction
            (:class:`~models.renderer.GARGenerator`).
        activation_gain: G's LeakyReLU gain (:class:`~models.renderer.GARGenerator`): 1.0, the first
            version's (its checkpoints load unchanged); StyleGAN2's sqrt(2) lets G learn more and,
            at the CPU demo's scale, overfit more (docs/gar.md).
        seed: seeds the z-swap permutations (one generator per step).
        invert_steps, invert_lr: GAR's inversion, the ``gar_inverted/refined`` row (:meth:`invert`):
            E's (z, expression) refined by this many Adam steps through the frozen EMA generator;
            0 (the default) scores E's output as it is; ``experiments/gar.yaml`` asks for 20.
        invert_from_tracking: the inversion (``gar_inverted/refined``) starts the expression from the
            frame's tracked code, z from E's (``experiments/gar.yaml``); False (the default, as
            generators trained before it were scored) starts from E's own expression. E's own
            expression error against tracking is logged on val and test
            (``gar/<split>/encoder_expression_mse``).
        refine_steps, refine_lr: the ``gar/refined`` row (:func:`~lightning_modules.metrics.refine_codes`
            from the tracked codes and the mean z); 0 steps: none.

    Raises:
        UpstreamMissingError: no student checkpoint (one line naming the command that makes it).
        UpstreamChangedError: the recorded student checkpoint's bytes changed.
        ValueError: unknown loss names, or a dataset whose E differs from the student's.
    """

    stage = "gar"
    upstream = ("distill", "student_ckpt")
    monitor = "gar/tracked/val/full/psnr"
    monitor_mode = "max"
    #: each phase's backward reaches one optimizer's parameters: the CLI turns on DDP's search for
    #: unused parameters (as strategy="ddp_find_unused_parameters_true" does)
    ddp_find_unused_parameters = True

    def __init__(
        self,
        expression_dim: int = 16,
        image_size: int = 128,
        student_ckpt: str | None = None,
        student_ckpt_sha256: str | None = None,
        z_dim: int = 16,
        num_scales: int = 3,
        base_channels: int = 32,
        mapping_layers: int = 2,
        disc_channels: int = 32,
        disc_scales: int = 2,
        encoder_channels: int = 32,
        gan_loss: str = "logistic",
        loss_weights: dict[str, float] | None = None,
        r1_gamma: float = 1.0,
        r1_every: int = 4,
        lr_g: float = 2e-3,
        lr_d: float = 2e-4,
        betas_g: tuple[float, float] = (0.0, 0.99),
        betas_d: tuple[float, float] = (0.5, 0.999),
        ema_decay: float = 0.99,
        collapse_threshold: float = 1e-2,
        collapse_patience: int = 100,
        points_per_pixel: int = 10,
        seed: int = 0,
        residual: bool = False,
        residual_space: str = "logit",
        activation_gain: float = 1.0,
        invert_steps: int = 0,
        invert_lr: float = 0.05,
        refine_steps: int = 20,
        refine_lr: float = 5e-3,
        geometry: str = "encoder",
        z_mean_prob: float = 0.0,
        adv_warmup_epochs: int = 0,
        divergence_factor: float = 4.0,
        divergence_window: int = 20,
        divergence_patience: int = 3,
        divergence_margin_db: float = 1.0,
        invert_from_tracking: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.loss_weights = merge_weights("loss_weights", loss_weights, DEFAULT_LOSS_WEIGHTS)
        if refine_steps < 0 or not refine_lr > 0 or invert_steps < 0:
            raise ValueError(f"refine_steps and invert_steps must be >= 0 and refine_lr > 0, got {refine_steps}, "
                             f"{invert_steps} and {refine_lr}")
        if geometry not in GEOMETRY:
            raise ValueError(f"geometry must be one of {GEOMETRY}, got {geometry!r}")
        if not 0.0 <= z_mean_prob <= 1.0 or adv_warmup_epochs < 0:
            raise ValueError(f"z_mean_prob must be in [0, 1] and adv_warmup_epochs >= 0, got {z_mean_prob} and "
                             f"{adv_warmup_epochs}")

        path = self.bind_upstream()  # the student this run trains on, pinned by path and hash
        checkpoint = read_checkpoint(path)  # read once: the student and the teacher's code table
        self.student = load_student(checkpoint).requires_grad_(False).eval()
        # the teacher's corrected codes of the training frames, through the student's checkpoint
        self.codes = load_code_corrections(checkpoint)
        if self.student.expression_dim != expression_dim:
            raise ValueError(
                f"the dataset's expression_dim {expression_dim} differs from the student's "
                f"{self.student.expression_dim} ({path}): train the GAR on the student's dataset"
            )
        with torch.no_grad():
            canonical = self.student.canonical()
        for name in ("albedo", "normals", "feature", "blendshapes", "offset"):
            self.register_buffer(f"student_{name}", getattr(canonical, name).detach().clone(), persistent=False)

        feature_channels = self.student.latent_dim
        self.generator = GARGenerator(
            feature_channels, z_dim, num_scales, base_channels, mapping_layers, residual=residual,
            residual_space=residual_space, activation_gain=activation_gain,
        )
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        self.discriminator = MultiScalePatchDiscriminator(3, base_channels=disc_channels, num_scales=disc_scales)
        self.encoder = InverseEncoder(z_dim=z_dim, expression_dim=expression_dim, base_channels=encoder_channels)
        self.normal_estimator = NormalEstimator()
        self.register_buffer("z_mean", torch.zeros(z_dim))  # running mean of the training z (gar_meanz)
        self.collapse = CollapseMonitor(collapse_threshold, collapse_patience)
        self.guard = DivergenceGuard(divergence_factor, divergence_window, divergence_patience, divergence_margin_db)
        self.metrics = HeldOutMetrics(ROWS, swd_models=("student", "gar", "gar_inverted"),
                                      flicker_models=("student", "gar"))
        # a fixed point order for the shuffled-feature ablation (f_s of other points, same statistics)
        order = torch.randperm(self.student.num_points, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("feature_shuffle", order, persistent=False)
        self._collapse_warned = False

    # -- the frozen student --------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.student.eval()
        self.generator_ema.eval()
        return self

    def _student_canonical(self):
        from models.student import StudentCanonical

        return StudentCanonical(
            points=self.student.points, albedo=self.student_albedo, normals=self.student_normals,
            blendshapes=self.student_blendshapes, offset=self.student_offset, feature=self.student_feature,
        )

    def point_features(self, features: str = "real") -> torch.Tensor:
        """The per-point features f_s (N, C_s) G is given: the student's (``real``), zeros (``zero``) or
        the student's in a fixed shuffled point order (``shuffled``: each point gets another point's
        code; same statistics, no correspondence), the last two for the feature ablation.

        Raises:
            ValueError: an unknown ``features``.
        """
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        if features == "zero":
            return torch.zeros_like(self.student_feature)
        if features == "shuffled":
            return self.student_feature[self.feature_shuffle]
        return self.student_feature

    def frame(self, generator: GARGenerator | None = None, image_size: int | None = None,
              exportable: bool = False) -> GARFrame:
        """The one frame path (:class:`models.renderer.GARFrame`) on the student's cached outputs with
        ``generator`` (default: the EMA copy, what every evaluated row and the export render with);
        ``exportable``: with the export-friendly rasterizer (:func:`lightning_modules.export.frame_graph`)."""
        c = self._student_canonical()
        return GARFrame(c.points, c.offset, c.blendshapes, c.normals, c.feature, c.albedo, self.student.radius,
                        self.student.shading, self.generator_ema if generator is None else generator,
                        image_size or self.hparams.image_size, self.hparams.points_per_pixel, exportable)

    def raster_inputs(self, batch, expression: torch.Tensor, features: str = "real") -> GeneratorInputs:
        """The generator's inputs for a batch posed by ``expression`` (B, E) (:meth:`GARFrame.raster_inputs`),
        with the point features ``features`` (:meth:`point_features`)."""
        check_expression(expression, self.student.expression_dim, "student")
        frame = self.frame(image_size=int(batch.image.shape[-1]))
        return frame.raster_inputs(expression, batch.world_mat, batch.K, self.point_features(features))

    def reconstruct(
        self, batch, target: torch.Tensor, tracked: GeneratorInputs | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, GeneratorInputs]:
        """Phase G's reconstruction G(raster(student(expression)), z) of the batch's frames x
        (``target``: the frames on white under their masks, what E sees), with E(x) = (E_z, E_expr).

        The expression is the tracked one (``geometry="tracked"``; ``tracked`` may pass its raster
        inputs when already made) or E_expr (``geometry="encoder"``, GAR's loop); z is E_z, or per
        frame with probability ``z_mean_prob`` the running mean z (:meth:`training_z`). A residual
        generator's base image is detached: E learns geometry from the feature maps and the
        tracking, not through logit(base), whose slope 1 / (b (1 - b)) near white and black turned
        into steps that derailed E in a demo run.

        Returns:
            (fake (B, 3, H, W), E_z (B, z_dim), E_expr (B, E), the generator's inputs).
        """
        z, expression = self.encoder(target, batch.mask)
        if self.hparams.geometry == "tracked":
            inputs = tracked if tracked is not None else self.raster_inputs(batch, batch.expression)
        else:
            inputs = self.raster_inputs(batch, expression)
        if inputs.base is not None:
            inputs = inputs._replace(base=inputs.base.detach())
        return self.generate(self.generator, inputs, self.training_z(z)), z, expression, inputs

    def training_z(self, z: torch.Tensor) -> torch.Tensor:
        """E's z (B, z_dim) with each row replaced, with probability ``z_mean_prob``, by the running
        mean z (detached), drawn from a generator seeded by (seed, batch number): reproducible."""
        p = float(self.hparams.z_mean_prob)
        if p <= 0.0:
            return z
        batches = self._batch_number() if self._trainer is not None else 0
        generator = torch.Generator(device="cpu").manual_seed(self.hparams.seed * 1_000_003 + 7919 + batches)
        use_mean = (torch.rand(z.shape[0], generator=generator) < p).to(z.device)[:, None]  # (B, 1)
        return torch.where(use_mean, self.z_mean.detach().to(z.dtype).expand_as(z), z)

    def generate(self, generator: GARGenerator, inputs: GeneratorInputs, z: torch.Tensor) -> torch.Tensor:
        """``generator`` (G or its EMA copy) on :meth:`raster_inputs`' output: (B, 3, H, W) in (0, 1)."""
        return generator(inputs.inputs, z, inputs.base)

    @torch.no_grad()
    def render_student(self, batch) -> torch.Tensor:
        """The student's rasterized colours (B, 3, H, W) on white, with the tracked expression."""
        out = self.student(batch.expression, batch.world_mat, canonical=self._student_canonical())
        r_px = pixel_radius(out["points"], batch.world_mat, batch.K, self.student.radius)
        raster = rasterize_points(
            out["points"], out["colors"], batch.world_mat, batch.K, batch.image.shape[-2:], r_px,
            self.hparams.points_per_pixel, background=1.0,
        )
        return raster.image

    # -- training ---------------------------------------------------------------------------------------
    def _batch_number(self) -> int:
        """Training batches so far (restored on resume). ``global_step`` counts optimizer steps: 3 per batch."""
        return self.trainer.fit_loop.total_batch_idx

    def training_step(self, batch, batch_idx):
        batch = with_code_corrections(batch, self.codes)  # the teacher's fitted codes of its training frames
        opt_g, opt_d, opt_n = self.optimizers()
        w = self.loss_weights
        kind = self.hparams.gan_loss
        target = composite_on_white(batch.image, batch.mask)
        logs: dict[str, torch.Tensor] = {}

        # phase N: the normal estimator learns real frames -> rasterized normals (tracked expression)
        self.toggle_optimizer(opt_n)
        with torch.no_grad():
            tracked = self.raster_inputs(batch, batch.expression)
        loss_n = normal_consistency_loss(self.normal_estimator(target), tracked.normal_map, tracked.alpha)
        opt_n.zero_grad(set_to_none=True)
        self.manual_backward(loss_n)
        opt_n.step()
        self.untoggle_optimizer(opt_n)
        logs["normal_estimator"] = loss_n

        # phase G (+E)
        self.toggle_optimizer(opt_g)
        fake, z, expression, inputs = self.reconstruct(batch, target, tracked)
        normal_map, alpha = inputs.normal_map, inputs.alpha
        terms = {
            "l1": masked_l1(fake, target),
            "ssim": ssim_loss(fake, target),
            "expression": F.mse_loss(expression.float(), batch.expression.float()),
            "z_reg": z.float().pow(2).mean(),
        }
        if self.current_epoch >= self.hparams.adv_warmup_epochs and (w["adv"] > 0 or w["feature_matching"] > 0):
            fake_logits, fake_features = self.discriminator(fake, return_features=True)
            terms["adv"] = g_loss(fake_logits, kind)
            if w["feature_matching"] > 0:
                with torch.no_grad():
                    _, real_features = self.discriminator(target, return_features=True)
                terms["feature_matching"] = feature_matching_loss(real_features, fake_features)
        if w["normal"] > 0:
            terms["normal"] = normal_consistency_loss(self.normal_estimator(fake), normal_map.detach(), alpha.detach())
        if w["z_swap"] > 0 and len(batch) > 1:
            generator = torch.Generator(device="cpu").manual_seed(self.hparams.seed * 1_000_003 + self._batch_number())
            perm = z_swap_permutation(len(batch), generator).to(z.device)
            swapped = self.generate(self.generator, inputs, z[perm])
            z_back, _ = self.encoder(swapped, batch.mask)
            terms["z_swap"] = z_swap_loss(
                self.normal_estimator(swapped), normal_map.detach(), alpha.detach(), z_back, z[perm]
            ).total
        check_finite_losses(terms, self.global_step)
        loss_g = sum(w[k] * v for k, v in terms.items())
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        # the guard watches the terms the adversarial schedule leaves alone (the warm-up's end is no spike)
        reconstruction = sum(w[k] * terms[k].detach() for k in ("l1", "ssim", "expression"))
        reconstruction = float(self.trainer.strategy.reduce(reconstruction, reduce_op="mean"))  # one value on every rank
        if self.guard.update(reconstruction, self.global_step):
            self._warn_diverged(f"the reconstruction loss {reconstruction:.4g} stayed above "
                                f"{self.guard.factor:g}x its recent median for {self.guard.patience} steps")
        # EMA with the usual warm-up: early on the average follows G instead of staying at its init
        batches = self._batch_number()
        ema_update(self.generator_ema, self.generator, min(self.hparams.ema_decay, (1 + batches) / (10 + batches)))
        with torch.no_grad():  # the mean over every rank's frames, so all ranks hold one z_mean
            z_batch = self.trainer.strategy.reduce(z.detach().float().mean(0), reduce_op="mean")
            self.z_mean.lerp_(z_batch.to(self.z_mean), 0.05)
        logs.update(terms)
        logs["loss_g"] = loss_g

        # phase D (+ lazy R1)
        self.toggle_optimizer(opt_d)
        real_logits, fake_logits = self.discriminator(target), self.discriminator(fake.detach())
        loss_d = d_loss(real_logits, fake_logits, kind)
        logs["loss_d"] = loss_d.detach()
        self._log_d_accuracy("train", real_logits, fake_logits, len(batch))
        if self.hparams.r1_every > 0 and self._batch_number() % self.hparams.r1_every == 0:
            r1 = r1_regularizer(self.discriminator, target)  # float32 under mixed precision
            loss_d = loss_d + self.hparams.r1_gamma / 2 * self.hparams.r1_every * r1
            logs["r1"] = r1.detach()
        check_finite_losses({"d": loss_d}, self.global_step)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        collapsed = self.collapse.update(float(logs["loss_d"]))
        if collapsed and not self._collapse_warned:
            rank_zero_warn(
                f"step {self.global_step}: the discriminator loss stayed below {self.collapse.threshold} for "
                f"{self.collapse.patience} steps (D collapse); lower lr_d or raise r1_gamma"
            )
            self._collapse_warned = True
        self.log("gar/d_collapse", float(collapsed), batch_size=len(batch))
        self.log("gar/diverged", float(self.guard.diverged), batch_size=len(batch))
        self.log_dict({f"gar/train/{k}": v for k, v in logs.items()}, batch_size=len(batch))
        self.log("gar/train/loss", loss_g.detach(), prog_bar=True, batch_size=len(batch))

    def _log_d_accuracy(self, split: str, real_logits, fake_logits, batch_size: int) -> None:
        """Log D's real/fake accuracy and logit gap (:func:`~models.gan_losses.discriminator_accuracy`)
        as epoch means: ``gar/<split>/d_accuracy``, ``..._real``, ``..._fake`` and ``gar/<split>/d_logit_gap``."""
        acc = discriminator_accuracy(real_logits, fake_logits)
        values = {"d_accuracy": acc.accuracy, "d_accuracy_real": acc.real, "d_accuracy_fake": acc.fake,
                  "d_logit_gap": acc.logit_gap}
        self.log_dict({f"gar/{split}/{k}": v for k, v in values.items()}, on_step=False, on_epoch=True,
                      batch_size=batch_size, sync_dist=True)

    def _warn_diverged(self, reason: str) -> None:
        """The one warning of a fit the guard has just flagged (its update returned True)."""
        rank_zero_warn(
            f"step {self.global_step}: the GAR fit diverged ({reason}); the run's best.ckpt (best val PSNR) is "
            "the checkpoint to test, not last.ckpt; lower lr_g / lr_d or the adversarial weights"
        )

    # -- evaluation -------------------------------------------------------------------------------------
    def invert(self, batch, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GAR's inversion of frames: E's (z, expression) as the start, then gradient refinement
        through the frozen renderer (Piao et al., CVPR 2021; REFERENCES.md, "Renderers").

        ``steps`` Adam steps (lr ``invert_lr``) on L1 + w_ssim (1 - SSIM) of the EMA generator's
        render against the frame on white. Only z and the codes move; no parameter or optimiser
        state is touched. Runs inside Lightning's inference mode too (its own grad-enabled island
        on cloned inputs).

        Args:
            batch: frames to invert (image, mask, world_mat, K are used).
            steps: refinement steps (default ``invert_steps``; 0 returns E's output).

        Returns:
            z (B, z_dim) and expression (B, E), detached.
        """
        steps = self.hparams.invert_steps if steps is None else int(steps)
        # E's z and E's expression (with invert_from_tracking: the tracked one) as the start
        with torch.no_grad():
            target = composite_on_white(batch.image, batch.mask)
            z, expression = self.encoder(target, batch.mask)
            if self.hparams.invert_from_tracking:
                expression = batch.expression.to(expression.dtype)  # the frame's tracked code
        if steps <= 0:
            return z, expression
        # float32 (no GradScaler here for 16-mixed), out of inference mode, on cloned inputs
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(target.device.type, enabled=False):
            frames = dataclasses.replace(batch, **{f: getattr(batch, f).clone() for f in ("image", "mask", "world_mat", "K")})
            target = target.clone().float()
            z = z.float().clone().requires_grad_(True)  # clone: not an inference tensor; float: bf16-mixed
            code = expression.float().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([z, code], lr=self.hparams.invert_lr)
            for _ in range(steps):
                fake = self.generate(self.generator_ema, self.raster_inputs(frames, code), z)
                loss = masked_l1(fake, target) + self.loss_weights["ssim"] * ssim_loss(fake, target)
                # only the two codes: not a training loss (no manual_backward, no DDP or precision plugin)
                z.grad, code.grad = torch.autograd.grad(loss, (z, code))
                optimizer.step()
        return z.detach(), code.detach()

    @torch.no_grad()
    def render_all(self, batch, refined: bool = False) -> dict[str, torch.Tensor]:
        """Evaluation renders (B, 3, H, W): ``student`` and ``gar`` (tracked: nothing looks at the
        frame); with ``refined``, also ``gar_refined`` and ``gar_inverted``, which look at it."""
        renders = {"student": self.render_student(batch), "gar": self.render_meanz(batch)}
        if refined:
            renders["gar_refined"] = self.render_refined(batch)
            renders["gar_inverted"] = self.render_inverted(batch)
        return renders

    @torch.no_grad()
    def render_meanz(self, batch) -> torch.Tensor:
        """The ``gar`` row: the EMA generator's render (B, 3, H, W) of ``batch.expression`` posed by
        ``batch.world_mat`` through ``batch.K``, with z = the mean training z (also the reenactment render)."""
        inputs = self.raster_inputs(batch, batch.expression)
        return self.generate(self.generator_ema, inputs, self.z_mean.expand(len(batch), -1))

    @torch.no_grad()
    def render_inverted(self, batch) -> torch.Tensor:
        """The ``gar_inverted`` row: z and expression by :meth:`invert` (E, then ``invert_steps``), (B, 3, H, W)."""
        z, expression = self.invert(batch)
        return self.generate(self.generator_ema, self.raster_inputs(batch, expression), z)

    def _render_codes(self, expression, world_mat, z, batch) -> torch.Tensor:
        """The EMA generator's render (B, 3, H, W) of ``batch``'s frames posed by ``expression`` and
        ``world_mat`` with ``z`` (:func:`~lightning_modules.metrics.refine_codes`' ``render``)."""
        posed = dataclasses.replace(batch, world_mat=world_mat)
        return self.generate(self.generator_ema, self.raster_inputs(posed, expression), z)

    @torch.no_grad()
    def render_refined(self, batch) -> torch.Tensor:
        """The ``gar/refined`` row: expression, head pose and z refined against the frame from the
        tracked codes and the mean z (:func:`~lightning_modules.metrics.refine_codes`), (B, 3, H, W)."""
        hp = self.hparams
        return refined_render(self._render_codes, batch, hp.refine_steps, hp.refine_lr,
                              extra=self.z_mean.expand(len(batch), -1))

    def _refine(self) -> bool:
        """The refined rows run in ``lightning validate``/``test`` only: never inside a fit (selection)."""
        return self.outside_fit

    @torch.no_grad()
    def render_feature_ablation(self, batch) -> dict[str, torch.Tensor]:
        """The ``gar`` row's render (B, 3, H, W) with f_s zeroed (``gar_zero_features``) and with f_s in a
        shuffled point order (``gar_shuffled_features``): what G draws without the student's point
        features (the normal map, alpha and a residual G's base image unchanged)."""
        z = self.z_mean.expand(len(batch), -1)
        return {f"gar_{mode}_features": self.generate(self.generator_ema,
                                                      self.raster_inputs(batch, batch.expression, mode), z)
                for mode in ("zero", "shuffled")}

    #: the evaluated renders' rows: name -> (model, protocol)
    EVAL_ROWS = {"student": ("student", "tracked"), "gar": ("gar", "tracked"), "gar_refined": ("gar", "refined"),
                 "gar_inverted": ("gar_inverted", "refined"), "gar_zero_features": ("gar_zero_features", "tracked"),
                 "gar_shuffled_features": ("gar_shuffled_features", "tracked")}

    def eval_renders(self, batch) -> dict[str, Row]:
        renders = self.render_all(batch, refined=self._refine())
        self._eval_cache["renders"] = (batch.frame_index.clone(), renders)  # RenderLogger's visualize reuses them
        if self._refine():
            renders = {**renders, **self.render_feature_ablation(batch)}
        return {name: (*self.EVAL_ROWS[name], image) for name, image in renders.items()}

    def after_eval_step(self, batch, renders: dict[str, Row]) -> None:
        """D's accuracy on the frames and the ``gar`` renders; E's expression error against tracking."""
        split = "test" if self.trainer.testing else "val"
        target = composite_on_white(batch.image, batch.mask)
        self._log_d_accuracy(split, self.discriminator(target), self.discriminator(renders["gar"][2]), len(batch))
        _, expression = self.encoder(target, batch.mask)  # E's own code against tracking
        self.log(f"gar/{split}/encoder_expression_mse", F.mse_loss(expression.float(), batch.expression.float()),
                 on_epoch=True, batch_size=len(batch), sync_dist=True)

    def after_eval_epoch(self, split: str, values: dict[str, float]) -> None:
        """Inside a fit: the divergence guard's val criterion, and ``gar/<split>/diverged``."""
        if self.outside_fit:
            return
        gar = values.get("gar/tracked/val/full/psnr")
        if gar is not None:
            best = self.guard.best_val
            if self.guard.update_val(gar, self.global_step):
                self._warn_diverged(f"val PSNR {gar:.2f} dB fell more than {self.guard.margin:g} dB under this "
                                    f"fit's best {best:.2f}")
        self.log(f"gar/{split}/diverged", float(self.guard.diverged))

    def frame_costs(self, batch) -> dict[str, float]:
        """Per-frame cost of each row, on one frame.

        ``gar/tracked``: the student's deformation by the expression, rasterization at every scale
        and the EMA generator (student canonical outputs cached); FLOPs (fvcore, one multiply-add =
        one flop) count the deformation, the student's shading (a residual generator's base image)
        and the generator, the rasterizer left out as for the other models (DESIGN.md, "Counting
        rules"). ``gar/refined`` and ``gar_inverted/refined``: the whole refinement (E for the
        inverted row, every forward and backward pass through G), FLOPs by
        :func:`~lightning_modules.metrics.multiply_adds`. Milliseconds: the mean of 3 calls after a
        warm-up (1 for the refined rows).
        """
        from lightning_modules.flops import count_flops

        costs = {"ms_per_frame/gar/tracked": time_per_frame(lambda: self.render_meanz(batch))}
        inputs = self.raster_inputs(batch, batch.expression)
        z = self.z_mean.expand(1, -1)
        deform = count_flops(self.student.deform, (self._student_canonical(), batch.expression)).total
        generate = count_flops(self.generator_ema, (inputs.inputs, z, inputs.base)).total
        shade = 0  # the residual generator's base image needs the student's colours
        if self.hparams.residual:
            shade = count_flops(self.student.shade, (self._student_canonical(), batch.world_mat)).total
        costs["flops_per_frame/gar/tracked"] = deform + shade + generate
        if self._refine():
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

    # -- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        params_g = [*self.generator.parameters(), *self.encoder.parameters()]
        opt_g = torch.optim.Adam(params_g, lr=hp.lr_g, betas=tuple(float(b) for b in hp.betas_g))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_d, betas=tuple(float(b) for b in hp.betas_d))
        opt_n = torch.optim.Adam(self.normal_estimator.parameters(), lr=hp.lr_g)
        return [opt_g, opt_d, opt_n]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["collapse_monitor"] = self.collapse.state_dict()
        checkpoint["collapse_warned"] = self._collapse_warned  # a resumed run does not warn twice
        checkpoint["divergence_guard"] = self.guard.state_dict()  # a resumed run keeps its flag: no second warning
        checkpoint["num_points"] = self.student.num_points

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # refuses a checkpoint trained on another student
        saved = checkpoint.get("hyper_parameters") or {}
        for key, first in (("activation_gain", 1.0), ("residual_space", "logit")):  # not in the weights
            was, now = saved.get(key, first), self.hparams[key]
            if was != now:
                raise ValueError(f"this GAR checkpoint's generator was trained with {key}={was!r}, not {now!r}: "
                                 f"pass --model.init_args.{key}={was}")
        if "collapse_monitor" in checkpoint:
            self.collapse.load_state_dict(checkpoint["collapse_monitor"])
        self._collapse_warned = bool(checkpoint.get("collapse_warned", False))
        if "divergence_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["divergence_guard"])
