"""Stage 3: the generative adversarial renderer and its inverse (``lightning fit --config experiments/gar.yaml``).

The frozen student (``model.init_args.student_ckpt``, default ``runs/distill/latest``; its sizes come
from that checkpoint) supplies static per-point latent codes f_s; each frame deforms the points with
an expression code and rasterizes [f_s, camera-space normal] at the generator's scales. The
generator G turns those maps and a global code z into RGB (a residual G corrects the student's
rasterized colours); the inverse encoder E maps a frame to (z, expression). G, the discriminator D
and E are given by ``{class_path, init_args}``. Manual optimisation, three phases per step (DESIGN.md,
"GAR"; Piao et al., CVPR 2021):

- G (+E): L1 + w_ssim (1 - SSIM) of G(raster(student(expr)), z) against the frame x (on white under
  the head mask), with expr the tracked code (``geometry="tracked"``) or E_expr(x) (GAR's loop) and
  z = E_z(x), or per frame with probability ``z_mean_prob`` the running mean z the leak-free row
  renders with; expression supervision |E_expr(x) - tracked|^2; the adversarial loss and pix2pixHD
  feature matching (after ``adv_warmup_epochs``); normal consistency (a normal estimator N, trained on
  real frames only, applied to G's output must give back the rasterized normal map); z-swap
  (G(inputs_a, z_b) keeps a's normals and E recovers z_b); a small z regulariser;
- D: non-saturating logistic (or hinge) loss, lazy R1 every ``r1_every`` steps (scaled by it);
- N: 1 - cos between N(real frame) and the rasterized normal map of the tracked expression.

Health, logged every epoch: D's real/fake accuracy and logit gap on train, val and test, E's
expression error against tracking, ``gar/d_collapse`` and the divergence guard's ``gar/diverged``
(each warned once). An EMA copy of G renders for evaluation. The module holds the parts; how they
learn is :mod:`lightning_modules.gar_training`, how they render and are scored
:mod:`lightning_modules.gar_rendering`. docs/gar.md has what each switch did.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lightning_modules.gar_rendering import GARRendering
from lightning_modules.gar_training import GARTraining
from lightning_modules.handoff import (
    build_model,
    load_code_corrections,
    load_student,
    read_checkpoint,
    spec_parts,
)
from lightning_modules.metrics import HeldOutMetrics
from lightning_modules.stage import Stage, check_expression_dim, check_refine, merge_weights
from models.discriminator import MultiScalePatchDiscriminator
from models.encoder import InverseEncoder, NormalEstimator
from models.gan_losses import CollapseMonitor, DivergenceGuard
from models.renderer import GARGenerator, GeneratorInputs

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
#: The geometry G's reconstruction is posed by in training: the tracked expression or E's.
GEOMETRY = ("tracked", "encoder")


class GARModule(GARTraining, GARRendering, Stage):
    """Trains G, D, E (and the normal estimator) on the frozen student's point features.

    Args:
        expression_dim, image_size: from the datamodule (linked); E must equal the student's.
        student_ckpt: distillation checkpoint (default ``runs/distill/latest/checkpoints/last.ckpt``);
            the run records the file it resolved here (:meth:`~lightning_modules.stage.Stage.bind_upstream`).
        student_ckpt_sha256: the SHA-256 of that file, recorded by the run (None: a new run); a
            reload checks the file against it.
        z_dim: the global code's size (G's, E's and the running mean z's).
        generator, discriminator, encoder: ``{class_path, init_args}`` (None: the defaults,
            :class:`~models.renderer.GARGenerator`, :class:`~models.discriminator.MultiScalePatchDiscriminator`,
            :class:`~models.encoder.InverseEncoder`); the stage sets G's ``feature_channels`` (the
            student's) and ``z_dim``, and E's ``z_dim`` and ``expression_dim``. Checkpoints of the
            earlier layout (``base_channels``, ``num_scales``, ``residual``, ``disc_channels``,
            ... among the stage's args) are read into them (:attr:`LEGACY_ARGS`).
        gan_loss: "logistic" (non-saturating) or "hinge".
        loss_weights: {l1, ssim, adv, feature_matching, expression, normal, z_swap, z_reg}; 0 switches a
            term off (``feature_matching``: :func:`~models.gan_losses.feature_matching_loss`).
        geometry: what poses G's reconstruction in training: "tracked" (the frame's tracked, or the
            teacher's corrected, expression: what the ``gar`` row renders with) or "encoder" (E's).
        z_mean_prob: the probability, per training frame, that G is given the running mean z instead of
            E's z of that frame (E sees the frame G must reproduce).
        adv_warmup_epochs: epochs of reconstruction only before the adversarial and feature-matching
            terms reach G (D trains throughout).
        r1_gamma, r1_every: lazy R1 (gamma / 2 * every * R1 every ``r1_every`` D steps).
        lr_g, lr_d, betas_g, betas_d: Adam of G+E (and the normal estimator, at lr_g) and of D:
            StyleGAN2's (0, 0.99) for G, pix2pixHD's (0.5, 0.999) at lr 2e-4 for D (docs/gar.md).
        ema_decay: of the evaluation copy of G (with warm-up: min(decay, (1 + n) / (10 + n)) at batch n).
        collapse_threshold, collapse_patience: the D-collapse health signal.
        divergence_factor, divergence_window, divergence_patience, divergence_margin_db: the divergence
            guard (:class:`~models.gan_losses.DivergenceGuard`): the weighted l1, ssim and expression
            terms (mean over DDP ranks) ``patience`` steps above ``factor`` x the median of the previous
            ``window``, a non-finite loss, or a val ``gar`` PSNR ``margin_db`` under the fit's best.
            It warns once and logs ``gar/diverged``; ``best.ckpt`` stays the best on val.
        points_per_pixel: rasterizer setting.
        seed: seeds the z-swap permutations, the z_mean draws and the shuffled-feature order.
        invert_steps, invert_lr, invert_from_tracking: the ``gar_inverted/refined`` row
            (:meth:`~lightning_modules.gar_rendering.GARRendering.invert`).
        refine_steps, refine_lr: the ``gar/refined`` row (:func:`~lightning_modules.metrics.refine_codes`).

    Raises:
        UpstreamMissingError: no student checkpoint (one line naming the command that makes it).
        UpstreamChangedError: the recorded student checkpoint's bytes changed.
        ValueError: unknown loss names, a dataset whose E differs from the student's, or bad settings.
    """

    stage = "gar"
    upstream = ("distill", "student_ckpt")
    monitor = "gar/tracked/val/full/psnr"
    monitor_mode = "max"
    #: each phase's backward reaches one optimizer's parameters: the CLI turns on DDP's search for
    #: unused parameters (as strategy="ddp_find_unused_parameters_true" does)
    ddp_find_unused_parameters = True
    NETWORKS = {"generator": "models.renderer.GARGenerator",
                "discriminator": "models.discriminator.MultiScalePatchDiscriminator",
                "encoder": "models.encoder.InverseEncoder"}
    LEGACY_ARGS = {**{k: ("generator", k) for k in ("num_scales", "base_channels", "mapping_layers", "residual",
                                                     "residual_space", "activation_gain")},
                   "disc_channels": ("discriminator", "base_channels"), "disc_scales": ("discriminator", "num_scales"),
                   "encoder_channels": ("encoder", "base_channels")}
    #: generator init args that change its output but not its weights: a checkpoint must be reloaded with its own
    OUTPUT_ARGS = {"activation_gain": 1.0, "residual_space": "logit", "residual": False, "input_pyramid": "rasterized"}

    def __init__(
        self,
        expression_dim: int = 16,
        image_size: int = 128,
        student_ckpt: str | None = None,
        student_ckpt_sha256: str | None = None,
        z_dim: int = 16,
        generator: dict[str, Any] | None = None,
        discriminator: dict[str, Any] | None = None,
        encoder: dict[str, Any] | None = None,
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
        check_refine(refine_steps, refine_lr)
        if invert_steps < 0 or geometry not in GEOMETRY or not 0.0 <= z_mean_prob <= 1.0 or adv_warmup_epochs < 0:
            raise ValueError(f"need invert_steps >= 0, geometry in {GEOMETRY}, z_mean_prob in [0, 1] and "
                             f"adv_warmup_epochs >= 0, got {invert_steps}, {geometry!r}, {z_mean_prob}, "
                             f"{adv_warmup_epochs}")

        path = self.bind_upstream()  # the student this run trains on, pinned by path and hash
        checkpoint = read_checkpoint(path)  # read once: the student and the teacher's code table
        self.student = load_student(checkpoint).requires_grad_(False).eval()
        self.codes = load_code_corrections(checkpoint)  # the teacher's corrected codes of the training frames
        check_expression_dim(expression_dim, self.student, path, "student")
        with torch.no_grad():
            canonical = self.student.canonical()
        for name in ("albedo", "normals", "feature", "blendshapes", "offset"):
            self.register_buffer(f"student_{name}", getattr(canonical, name).detach().clone(), persistent=False)

        self.generator: GARGenerator = build_model(
            generator, self.NETWORKS["generator"], {"feature_channels": self.student.latent_dim, "z_dim": z_dim},
            role="generator")
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        self.discriminator: MultiScalePatchDiscriminator = build_model(
            discriminator, self.NETWORKS["discriminator"], {}, role="discriminator")
        self.encoder: InverseEncoder = build_model(
            encoder, self.NETWORKS["encoder"], {"z_dim": z_dim, "expression_dim": expression_dim}, role="encoder")
        self.normal_estimator = NormalEstimator()
        self.register_buffer("z_mean", torch.zeros(z_dim))  # running mean of the training z (the gar row's)
        self.collapse = CollapseMonitor(collapse_threshold, collapse_patience)
        self.guard = DivergenceGuard(divergence_factor, divergence_window, divergence_patience, divergence_margin_db)
        self.metrics = HeldOutMetrics(ROWS, swd_models=("student", "gar", "gar_inverted"),
                                      flicker_models=("student", "gar"))
        # a fixed point order for the shuffled-feature ablation (f_s of other points, same statistics)
        order = torch.randperm(self.student.num_points, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("feature_shuffle", order, persistent=False)
        self._collapse_warned = False

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.eval()  # frozen, and the EMA copy only evaluates
        self.generator_ema.eval()
        return self

    # -- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["collapse_monitor"] = self.collapse.state_dict()
        checkpoint["collapse_warned"] = self._collapse_warned  # a resumed run does not warn twice
        checkpoint["divergence_guard"] = self.guard.state_dict()  # a resumed run keeps its flag: no second warning
        checkpoint["num_points"] = self.student.num_points

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuses a checkpoint trained on another student (:class:`~lightning_modules.stage.Stage`) or with
        another generator output setting (:attr:`OUTPUT_ARGS`, not in the weights); restores the health state."""
        super().on_load_checkpoint(checkpoint)
        saved = self.upgrade_hparams(checkpoint.get("hyper_parameters") or {})
        saved_args = spec_parts(saved.get("generator"), self.NETWORKS["generator"], "generator")[1]
        for key, first in self.OUTPUT_ARGS.items():
            was, now = saved_args.get(key, first), self.generator.spec["init_args"].get(key, first)
            if was != now:
                raise ValueError(f"this GAR checkpoint's generator was trained with {key}={was!r}, not {now!r}: "
                                 f"pass --model.init_args.generator.{key}={was}")
        if "collapse_monitor" in checkpoint:
            self.collapse.load_state_dict(checkpoint["collapse_monitor"])
        self._collapse_warned = bool(checkpoint.get("collapse_warned", False))
        if "divergence_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["divergence_guard"])
