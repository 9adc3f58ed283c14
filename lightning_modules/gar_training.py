"""How the GAR stage learns: the three phases of each training step, the EMA, the running mean z and the
health signals (mixed into :class:`lightning_modules.gar.GARModule`, whose docstring states the losses).

:class:`GARTraining` uses the parts the module holds (``student``, ``generator``, ``generator_ema``,
``discriminator``, ``encoder``, ``normal_estimator``, ``z_mean``, ``collapse``, ``guard``,
``loss_weights``, ``codes``) and its frame path (:class:`~lightning_modules.gar_rendering.GARRendering`).
Manual optimisation: each phase runs inside Lightning's ``toggled_optimizer``, so its backward reaches
one optimizer's parameters; ``global_step`` counts optimizer steps (3 per batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.metrics import composite_on_white
from lightning_modules.stage import check_finite_losses, with_code_corrections
from models.gan_losses import (
    d_loss,
    feature_matching_loss,
    g_loss,
    normal_consistency_loss,
    r1_regularizer,
    z_swap_loss,
    z_swap_permutation,
)
from models.losses import masked_l1, ssim_loss
from models.renderer import GeneratorInputs, ema_update

__all__ = ["GARTraining"]


class GARTraining:
    """The GAR's training step, optimisers and health checks (module docstring); a mixin of a Stage."""

    def _batch_number(self) -> int:
        """Training batches so far (restored on resume). ``global_step`` counts optimizer steps: 3 per batch."""
        return self.trainer.fit_loop.total_batch_idx

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

    def reconstruct(
        self, batch, target: torch.Tensor, tracked: GeneratorInputs | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, GeneratorInputs]:
        """Phase G's reconstruction G(raster(student(expression)), z) of the frames x (``target``: on white
        under their masks, what E sees), with E(x) = (E_z, E_expr): the tracked expression
        (``geometry="tracked"``; ``tracked``: its raster inputs, when made) or E_expr, and z by
        :meth:`training_z`. A residual G's base image is detached: E learns geometry from the feature
        maps and the tracking, not through logit(base), whose steep slope near white and black derailed E.

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

    def _update(self, optimizer, loss: torch.Tensor) -> None:
        """One phase's step (inside ``toggled_optimizer``): Lightning's backward (precision, DDP)."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()

    def training_step(self, batch, batch_idx):
        batch = with_code_corrections(batch, self.codes)  # the teacher's fitted codes of its training frames
        opt_g, opt_d, opt_n = self.optimizers()
        w, kind = self.loss_weights, self.hparams.gan_loss
        target = composite_on_white(batch.image, batch.mask)
        with self.toggled_optimizer(opt_n):  # phase N: real frames -> rasterized normals (tracked expression)
            with torch.no_grad():
                tracked = self.raster_inputs(batch, batch.expression)
            loss_n = normal_consistency_loss(self.normal_estimator(target), tracked.normal_map, tracked.alpha)
            self._update(opt_n, loss_n)

        with self.toggled_optimizer(opt_g):  # phase G (+E)
            fake, z, expression, inputs = self.reconstruct(batch, target, tracked)
            normal_map, alpha = inputs.normal_map.detach(), inputs.alpha.detach()
            terms = {"l1": masked_l1(fake, target), "ssim": ssim_loss(fake, target),
                     "expression": F.mse_loss(expression.float(), batch.expression.float()),
                     "z_reg": z.float().pow(2).mean()}
            if self.current_epoch >= self.hparams.adv_warmup_epochs and (w["adv"] > 0 or w["feature_matching"] > 0):
                fake_logits, fake_features = self.discriminator(fake, return_features=True)
                terms["adv"] = g_loss(fake_logits, kind)
                if w["feature_matching"] > 0:
                    with torch.no_grad():
                        _, real_features = self.discriminator(target, return_features=True)
                    terms["feature_matching"] = feature_matching_loss(real_features, fake_features)
            if w["normal"] > 0:
                terms["normal"] = normal_consistency_loss(self.normal_estimator(fake), normal_map, alpha)
            if w["z_swap"] > 0 and len(batch) > 1:
                generator = torch.Generator(device="cpu").manual_seed(self.hparams.seed * 1_000_003 + self._batch_number())
                perm = z_swap_permutation(len(batch), generator).to(z.device)
                swapped = self.generate(self.generator, inputs, z[perm])
                z_back, _ = self.encoder(swapped, batch.mask)
                terms["z_swap"] = z_swap_loss(self.normal_estimator(swapped), normal_map, alpha, z_back, z[perm]).total
            check_finite_losses(terms, self.global_step)
            loss_g = sum(w[k] * v for k, v in terms.items())
            self._update(opt_g, loss_g)
        self._after_generator_step(terms, z)

        with self.toggled_optimizer(opt_d):  # phase D (+ lazy R1)
            real_logits, fake_logits = self.discriminator(target), self.discriminator(fake.detach())
            loss_d = d_loss(real_logits, fake_logits, kind)
            logs = {**terms, "normal_estimator": loss_n, "loss_g": loss_g, "loss_d": loss_d.detach()}
            self.log_d_accuracy("train", real_logits, fake_logits, len(batch))
            if self.hparams.r1_every > 0 and self._batch_number() % self.hparams.r1_every == 0:
                r1 = r1_regularizer(self.discriminator, target)  # float32 under mixed precision
                loss_d = loss_d + self.hparams.r1_gamma / 2 * self.hparams.r1_every * r1
                logs["r1"] = r1.detach()
            check_finite_losses({"d": loss_d}, self.global_step)
            self._update(opt_d, loss_d)

        if self.collapse.update(float(logs["loss_d"])) and not self._collapse_warned:
            rank_zero_warn(f"step {self.global_step}: the discriminator loss stayed below {self.collapse.threshold} "
                           f"for {self.collapse.patience} steps (D collapse); lower lr_d or raise r1_gamma")
            self._collapse_warned = True
        self.log("gar/d_collapse", float(self.collapse.collapsed), batch_size=len(batch))
        self.log("gar/diverged", float(self.guard.diverged), batch_size=len(batch))
        self.log_dict({f"gar/train/{k}": v for k, v in logs.items()}, batch_size=len(batch))
        self.log("gar/train/loss", loss_g.detach(), prog_bar=True, batch_size=len(batch))

    def _after_generator_step(self, terms: dict[str, torch.Tensor], z: torch.Tensor) -> None:
        """The divergence guard on the reconstruction terms (those the adversarial schedule leaves alone),
        the EMA of G (with the usual warm-up) and the running mean z (over every rank's frames)."""
        w = self.loss_weights
        reconstruction = sum(w[k] * terms[k].detach() for k in ("l1", "ssim", "expression"))
        reconstruction = float(self.trainer.strategy.reduce(reconstruction, reduce_op="mean"))  # same on every rank
        if self.guard.update(reconstruction, self.global_step):
            self._warn_diverged(f"the reconstruction loss {reconstruction:.4g} stayed above "
                                f"{self.guard.factor:g}x its recent median for {self.guard.patience} steps")
        batches = self._batch_number()
        ema_update(self.generator_ema, self.generator, min(self.hparams.ema_decay, (1 + batches) / (10 + batches)))
        with torch.no_grad():
            z_batch = self.trainer.strategy.reduce(z.detach().float().mean(0), reduce_op="mean")
            self.z_mean.lerp_(z_batch.to(self.z_mean), 0.05)

    def _warn_diverged(self, reason: str) -> None:
        """The one warning of a fit the guard has just flagged (its update returned True)."""
        rank_zero_warn(f"step {self.global_step}: the GAR fit diverged ({reason}); the run's best.ckpt (best val "
                       "PSNR) is the checkpoint to test, not last.ckpt; lower lr_g / lr_d or the adversarial weights")

    def after_eval_epoch(self, split: str, values: dict[str, float]) -> None:
        """Inside a fit: the divergence guard's val criterion, and ``gar/<split>/diverged``."""
        if self.outside_fit:
            return
        gar, best = values.get("gar/tracked/val/full/psnr"), self.guard.best_val
        if gar is not None and self.guard.update_val(gar, self.global_step):
            self._warn_diverged(f"val PSNR {gar:.2f} dB fell more than {self.guard.margin:g} dB under this "
                                f"fit's best {best:.2f}")
        self.log(f"gar/{split}/diverged", float(self.guard.diverged))

    def configure_optimizers(self):
        hp = self.hparams
        params_g = [*self.generator.parameters(), *self.encoder.parameters()]
        opt_g = torch.optim.Adam(params_g, lr=hp.lr_g, betas=tuple(float(b) for b in hp.betas_g))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_d, betas=tuple(float(b) for b in hp.betas_d))
        return [opt_g, opt_d, torch.optim.Adam(self.normal_estimator.parameters(), lr=hp.lr_g)]
