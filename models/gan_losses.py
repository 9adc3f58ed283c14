"""Losses of the GAR stage (pure functions of tensors) and a discriminator-collapse monitor.

* adversarial losses for G and D, non-saturating logistic (Goodfellow et al., NeurIPS 2014, as
  in StyleGAN2, Karras et al. CVPR 2020) or hinge (Lim & Ye 2017; Miyato et al. ICLR 2018),
  always computed in float32 with autocast disabled, whatever the logits' dtype (DESIGN.md,
  "Scale": GAN losses in fp32);
* R1 gradient penalty (Mescheder et al., ICML 2018), lazy as in StyleGAN2;
* GAR's normal-consistency loss (Piao et al., CVPR 2021), with our learnable
  :class:`models.encoder.NormalEstimator` in place of GAR's pretrained estimator;
* z-swap loss: G(inputs_a, z_b) must keep a's geometry and let E recover z_b (our L1/MSE form of
  GAR's contrastive separation of z from the normals);
* feature matching on D's intermediate activations (pix2pixHD, Wang et al., CVPR 2018, Eq. 4);
* :func:`discriminator_accuracy`: D's real/fake accuracy and logit gap, the evidence that D learns;
* :class:`CollapseMonitor`: flags a discriminator whose loss stays near 0 (pure Python);
* :class:`DivergenceGuard`: flags a training loss that jumps far above its recent median (pure Python).

Logits may be one tensor or a list of tensors (one per discriminator scale, as
:class:`models.discriminator.MultiScalePatchDiscriminator` returns); a loss over a list is the
mean over scales of the per-scale loss, each a mean over its batch and patches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CollapseMonitor",
    "DAccuracy",
    "DivergenceGuard",
    "ZSwapLoss",
    "d_loss",
    "discriminator_accuracy",
    "feature_matching_loss",
    "g_loss",
    "normal_consistency_loss",
    "r1_penalty",
    "r1_regularizer",
    "z_swap_loss",
    "z_swap_permutation",
]

KINDS = ("logistic", "hinge")
Logits = Tensor | Sequence[Tensor]


def _as_list(logits: Logits, name: str) -> list[Tensor]:
    out = [logits] if isinstance(logits, Tensor) else list(logits)
    if not out or not all(isinstance(t, Tensor) for t in out):
        raise ValueError(f"{name} must be a tensor or a non-empty list of tensors (one per discriminator scale)")
    return out


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} ('logistic' is the non-saturating loss), got {kind!r}")


def _fp32(t: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``t``'s device (float32 maths inside)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def d_loss(real_logits: Logits, fake_logits: Logits, kind: str = "logistic") -> Tensor:
    """Discriminator loss.

    logistic: mean softplus(-D(x)) + mean softplus(D(G(z)))  (= -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))));
    hinge:    mean relu(1 - D(x)) + mean relu(1 + D(G(z))).

    Args:
        real_logits, fake_logits: D's logits on real and generated images: tensors of any shape
            (e.g. (B, 1, h, w) patch maps) or lists of them, one per scale (same length), any
            float dtype.
        kind: "logistic" (non-saturating) or "hinge".

    Returns:
        scalar float32 (upcast inside, autocast disabled); the mean over scales.

    Raises:
        ValueError: on an unknown kind or lists of different lengths.
    """
    _check_kind(kind)
    real, fake = _as_list(real_logits, "real_logits"), _as_list(fake_logits, "fake_logits")
    if len(real) != len(fake):
        raise ValueError(f"real_logits has {len(real)} scales but fake_logits has {len(fake)}")
    with _fp32(real[0]):
        total = real[0].new_zeros((), dtype=torch.float32)
        for r, f in zip(real, fake):
            r, f = r.float(), f.float()
            if kind == "logistic":
                total = total + F.softplus(-r).mean() + F.softplus(f).mean()
            else:
                total = total + F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean()
        return total / len(real)


def g_loss(fake_logits: Logits, kind: str = "logistic") -> Tensor:
    """Generator loss: logistic (non-saturating) mean softplus(-D(G(z))); hinge -mean D(G(z)).

    Args:
        fake_logits: D's logits on generated images, a tensor or a list per scale, any float dtype.
        kind: "logistic" or "hinge".

    Returns:
        scalar float32 (upcast inside, autocast disabled); the mean over scales.

    Raises:
        ValueError: on an unknown kind.
    """
    _check_kind(kind)
    fake = _as_list(fake_logits, "fake_logits")
    with _fp32(fake[0]):
        total = fake[0].new_zeros((), dtype=torch.float32)
        for f in fake:
            f = f.float()
            total = total + (F.softplus(-f).mean() if kind == "logistic" else -f.mean())
        return total / len(fake)


def feature_matching_loss(real_features: Sequence[Sequence[Tensor]], fake_features: Sequence[Sequence[Tensor]]) -> Tensor:
    """pix2pixHD's feature-matching loss (Wang et al., CVPR 2018, Eq. 4).

    sum over D scales k and layers i of (1 / N_i) ||D_k^(i)(x) - D_k^(i)(G(s))||_1, with N_i the
    element count of layer i (a mean absolute difference), divided by the number of scales (the
    mean over scales, as the adversarial losses here). The real activations are targets (detached):
    the gradient reaches G only, through the fake ones. Layers are the LeakyReLU outputs before the
    logit convolution (:meth:`models.discriminator.MultiScalePatchDiscriminator.forward` with
    ``return_features=True``). pix2pixHD weights it 10 against its LSGAN term.

    Args:
        real_features, fake_features: per scale, the list of D's activations (B, C_i, h_i, w_i) on the
            real frames and on G's output, in the same order and shapes; any float dtype.

    Returns:
        scalar float32 (autocast disabled); 0 for identical activations.

    Raises:
        ValueError: when the scales, layers or shapes of the two differ, or a scale has no layer.
    """
    if len(real_features) != len(fake_features) or not real_features:
        raise ValueError(f"real and fake features need the same non-zero number of scales, got "
                         f"{len(real_features)} and {len(fake_features)}")
    first = real_features[0][0] if real_features[0] else None
    if first is None:
        raise ValueError("every discriminator scale must give at least one feature map")
    with _fp32(first):
        total = first.new_zeros((), dtype=torch.float32)
        for k, (real, fake) in enumerate(zip(real_features, fake_features)):
            if len(real) != len(fake) or not real:
                raise ValueError(f"scale {k}: {len(real)} real and {len(fake)} fake feature maps")
            for i, (r, f) in enumerate(zip(real, fake)):
                if r.shape != f.shape:
                    raise ValueError(f"scale {k}, layer {i}: real {tuple(r.shape)} and fake {tuple(f.shape)} differ")
                total = total + (f.float() - r.detach().float()).abs().mean()
        return total / len(real_features)


class DAccuracy(NamedTuple):
    """D's decisions on a batch (float32 scalars, patch-averaged over every scale).

    Attributes:
        real: fraction of real patches with logit > 0 (judged real).
        fake: fraction of fake patches with logit < 0 (judged fake).
        accuracy: (real + fake) / 2; 0.5 is chance, 1 a D that separates every patch.
        logit_gap: mean real logit - mean fake logit; about 0 while D is at chance.
    """

    real: Tensor
    fake: Tensor
    accuracy: Tensor
    logit_gap: Tensor


@torch.no_grad()
def discriminator_accuracy(real_logits: Logits, fake_logits: Logits) -> DAccuracy:
    """How well D tells real frames from G's renders (the evidence the GAR issue asks for).

    A patch counts as judged real when its logit is > 0 (sigmoid > 1/2, both losses' decision
    boundary). Each scale's fractions and mean logits are averaged over its patches and batch, then
    over the scales (as :func:`d_loss`).

    Args:
        real_logits, fake_logits: D's logits on real frames and on G's output, tensors or lists per
            scale (same length), any float dtype.

    Returns:
        :class:`DAccuracy`.

    Raises:
        ValueError: lists of different lengths.
    """
    real, fake = _as_list(real_logits, "real_logits"), _as_list(fake_logits, "fake_logits")
    if len(real) != len(fake):
        raise ValueError(f"real_logits has {len(real)} scales but fake_logits has {len(fake)}")
    n = len(real)
    acc_real = sum((r.float() > 0).float().mean() for r in real) / n
    acc_fake = sum((f.float() < 0).float().mean() for f in fake) / n
    gap = sum(r.float().mean() - f.float().mean() for r, f in zip(real, fake)) / n
    return DAccuracy(acc_real, acc_fake, (acc_real + acc_fake) / 2, gap)


def r1_penalty(real_logits: Logits, real_images: Tensor) -> Tensor:
    """R1 gradient penalty E_x ||∇_x D(x)||^2 on real images (Mescheder et al., ICML 2018, Eq. 9).

    D(x) of one image is its mean logit over patches, averaged over scales (the quantity the
    adversarial losses average), so a one-logit discriminator gives StyleGAN2's R1 exactly. The
    gradient is built with ``create_graph=True``: the result back-propagates into D.

    Lazy regularisation (StyleGAN2, Karras et al. CVPR 2020, Sec. 3.1): the stage evaluates this
    every k D steps only and adds ``(gamma / 2) * k * r1_penalty(...)`` to the D loss of that step;
    this function returns the bare penalty (no gamma, no k).

    Args:
        real_logits: D(real_images): a tensor (B, ...) or a list of them per scale.
        real_images: (B, C, H, W) the images D saw, with ``requires_grad=True`` set before D's
            forward (only these are differentiated, not a condition input).

    Returns:
        scalar float32: mean over the batch of sum over pixels and channels of the squared gradient.

    Raises:
        ValueError: when ``real_images`` does not require grad or a logit's batch size differs.
    """
    if not real_images.requires_grad:
        raise ValueError("real_images must have requires_grad=True before D's forward for the R1 penalty")
    logits = _as_list(real_logits, "real_logits")
    b = real_images.shape[0]
    for t in logits:
        if t.shape[0] != b:
            raise ValueError(f"logits of batch {t.shape[0]} for {b} images")
    with _fp32(real_images):
        per_image = sum(t.float().reshape(b, -1).mean(dim=1) for t in logits) / len(logits)  # (B,)
        (grad,) = torch.autograd.grad(per_image.sum(), real_images, create_graph=True)
        return grad.float().square().reshape(b, -1).sum(dim=1).mean()


def r1_regularizer(discriminator: Callable[[Tensor], Logits], real_images: Tensor) -> Tensor:
    """:func:`r1_penalty` of ``discriminator`` at ``real_images``, its forward and the gradient in float32.

    Under mixed precision D's forward would run in float16/bfloat16, and the R1 gradient (taken with
    ``torch.autograd.grad``, outside the loss scaler) would be float16 too: the small input gradients
    of a D near chance underflow to zero. Here autocast is off for the whole penalty; D's weights are
    float32 under Lightning's mixed precision, so this is the float32 penalty exactly.

    Args:
        discriminator: maps (B, C, H, W) images to logits (a tensor or a list per scale).
        real_images: (B, C, H, W) real images (detached; a float32 copy requiring grad is made here).

    Returns:
        scalar float32, as :func:`r1_penalty`.
    """
    with _fp32(real_images):
        real = real_images.detach().float().requires_grad_(True)
        return r1_penalty(discriminator(real), real)


def normal_consistency_loss(pred_normals: Tensor, target_normals: Tensor, mask: Tensor | None = None) -> Tensor:
    """GAR's normal consistency: masked mean of 1 - cos(pred, target) per pixel (Piao et al., CVPR 2021).

    ``pred_normals`` are the normals a :class:`models.encoder.NormalEstimator` estimates from an
    image (G's output, or a real frame when training the estimator); ``target_normals`` the
    rasterized camera-space normal map G was given. Neither needs unit length (cosine; a zero
    vector counts as cos = 0). When this loss trains G, the stage keeps the estimator fixed for
    that term (its optimiser steps only on real frames), or the estimator could learn to read the
    normals off G's artefacts instead of the shading.

    Args:
        pred_normals, target_normals: (B, 3, H, W) float.
        mask: (B, 1, H, W) weights in [0, 1] (the rasterized alpha or the head mask); None: all pixels.

    Returns:
        scalar float32 in [0, 2]: 0 for parallel normals, 1 orthogonal, 2 opposite; 0 for an empty mask.

    Raises:
        ValueError: on mismatched shapes.
    """
    if pred_normals.dim() != 4 or pred_normals.shape[1] != 3 or pred_normals.shape != target_normals.shape:
        raise ValueError(
            f"normals must both be (B, 3, H, W), got {tuple(pred_normals.shape)} and {tuple(target_normals.shape)}"
        )
    b, _, h, w = pred_normals.shape
    if mask is not None and mask.shape != (b, 1, h, w):
        raise ValueError(f"mask must be (B, 1, H, W) = {(b, 1, h, w)}, got {tuple(mask.shape)}")
    with _fp32(pred_normals):
        cos = F.cosine_similarity(pred_normals.float(), target_normals.float(), dim=1, eps=1e-8)  # (B, H, W)
        err = 1.0 - cos
        if mask is None:
            return err.mean()
        weight = mask.float()[:, 0]  # (B, H, W)
        return (err * weight).sum() / weight.sum().clamp_min(1e-8)


class ZSwapLoss(NamedTuple):
    """The z-swap loss and its parts (scalars, float32): total = normal_weight * normal + z_weight * z."""

    total: Tensor
    normal: Tensor
    z: Tensor


def z_swap_permutation(batch_size: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """A random derangement of the batch (perm[i] != i): frame i takes the z of frame perm[i].

    A uniformly random cycle through all B frames (random order, each frame's successor).

    Args:
        batch_size: B >= 2.
        generator: optional torch.Generator for reproducible draws (CPU).
        device: device of the result.

    Returns:
        (B,) int64 permutation without fixed points.

    Raises:
        ValueError: when B < 2 (no swap exists).
    """
    if batch_size < 2:
        raise ValueError(f"z-swap needs a batch of at least 2 frames, got {batch_size}")
    order = torch.randperm(batch_size, generator=generator)
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)  # perm[order[i]] = order[i + 1]
    return perm.to(device) if device is not None else perm


def z_swap_loss(
    swapped_normals: Tensor,
    normals_a: Tensor,
    mask_a: Tensor | None,
    z_recovered: Tensor,
    z_b: Tensor,
    normal_weight: float = 1.0,
    z_weight: float = 1.0,
    normalize_z: bool = True,
    eps: float = 1e-8,
) -> ZSwapLoss:
    """z-swap loss: G(inputs_a, z_b) keeps a's geometry and carries b's z.

    Our L1/MSE form of GAR's constraint that z must not carry the geometry (Piao et al., CVPR 2021,
    where a contrastive loss separates z from the normals). With x_ab = G(inputs_a, z_b):

    * normal = normal_consistency_loss(NormalEstimator(x_ab), normals_a, mask_a): swapping z must
      not move the geometry;
    * z = ||E_z(x_ab) - z_b||^2 averaged over elements, divided (``normalize_z``) by the mean of
      z_b^2 (detached): a relative error, so E cannot satisfy it by shrinking every z. z_b is a
      target (detached): the gradient reaches G and E through x_ab and E_z(x_ab) only.

    Args:
        swapped_normals: (B, 3, H, W) normals estimated from x_ab.
        normals_a: (B, 3, H, W) the rasterized normal maps G was given.
        mask_a: (B, 1, H, W) their alpha/mask, or None.
        z_recovered: (B, z_dim) E_z(x_ab).
        z_b: (B, z_dim) the codes fed to G (e.g. ``z[z_swap_permutation(B)]``).
        normal_weight, z_weight: weights of the two parts in ``total``.
        normalize_z: divide the z error by mean(z_b^2).
        eps: added to that denominator.

    Returns:
        :class:`ZSwapLoss` (total, normal, z), scalar float32 tensors.

    Raises:
        ValueError: on mismatched shapes.
    """
    if z_recovered.dim() != 2 or z_recovered.shape != z_b.shape:
        raise ValueError(f"z_recovered and z_b must both be (B, z_dim), got {tuple(z_recovered.shape)} and {tuple(z_b.shape)}")
    normal = normal_consistency_loss(swapped_normals, normals_a, mask_a)
    with _fp32(z_b):
        target = z_b.detach().float()
        z_err = (z_recovered.float() - target).square().mean()
        if normalize_z:
            z_err = z_err / (target.square().mean() + eps)
        total = normal_weight * normal + z_weight * z_err
    return ZSwapLoss(total, normal, z_err)


class CollapseMonitor:
    """Flags discriminator collapse: the D loss below ``threshold`` for ``patience`` consecutive steps.

    A D loss near 0 (logistic or hinge) means D separates real from fake perfectly and G gets no
    useful gradient. The stage logs the flag as ``gar/d_collapse`` (a health signal, DESIGN.md).
    Pure Python: no tensors kept, no lightning.

    Args:
        threshold: D-loss level counted as collapsed (1e-2).
        patience: consecutive steps below ``threshold`` before :meth:`update` returns True.

    Raises:
        ValueError: when threshold <= 0 or patience < 1.
    """

    def __init__(self, threshold: float = 1e-2, patience: int = 100) -> None:
        if not threshold > 0 or patience < 1:
            raise ValueError(f"need threshold > 0 and patience >= 1, got {threshold} and {patience}")
        self.threshold, self.patience = float(threshold), int(patience)
        self.steps_below = 0

    @property
    def collapsed(self) -> bool:
        """True while the D loss has stayed below the threshold for ``patience`` steps or more."""
        return self.steps_below >= self.patience

    def update(self, d_loss: float) -> bool:
        """Record one step's D loss (a float or a 0-dim tensor); return :attr:`collapsed`.

        A loss at or above the threshold resets the count; so does a non-finite loss (a NaN is a
        different failure, not a collapse).
        """
        value = float(d_loss)
        if math.isfinite(value) and value < self.threshold:
            self.steps_below += 1
        else:
            self.steps_below = 0
        return self.collapsed

    def reset(self) -> None:
        self.steps_below = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"threshold": self.threshold, "patience": self.patience, "steps_below": self.steps_below}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.threshold, self.patience = float(state["threshold"]), int(state["patience"])
        self.steps_below = int(state["steps_below"])


class DivergenceGuard:
    """Flags a diverging GAN fit: a loss far above its recent median, or a val score that falls.

    The failure it is built for (issue "a GAR that really helps"): the GAR's training L1 jumped ten-fold
    within an epoch while the fit ended normally. :meth:`update` compares each step's loss with the
    median of the previous ``window`` finite losses and counts a *spike* when it exceeds ``factor``
    times that median; ``patience`` consecutive spikes (or one non-finite loss) mark the fit as
    diverged. :meth:`update_val` marks it when a val score (higher is better, e.g. PSNR in dB) falls
    more than ``margin`` under the best score seen so far. The flag stays set. Pure Python: no
    tensors kept, no lightning.

    Args:
        factor: spike threshold as a multiple of the recent median (> 1).
        window: finite losses the median is taken over; no spike is counted before the window is full.
        patience: consecutive spikes that count as divergence (>= 1).
        margin: the fall of the val score under its best that counts as divergence (>= 0).

    Raises:
        ValueError: factor <= 1, window < 1, patience < 1 or margin < 0.
    """

    def __init__(self, factor: float = 4.0, window: int = 20, patience: int = 3, margin: float = 1.0) -> None:
        if not factor > 1 or window < 1 or patience < 1 or not margin >= 0:
            raise ValueError(f"need factor > 1, window >= 1, patience >= 1 and margin >= 0, got {factor}, {window}, "
                             f"{patience}, {margin}")
        self.factor, self.window, self.patience, self.margin = float(factor), int(window), int(patience), float(margin)
        self.history: list[float] = []
        self.spikes = 0
        self.best_val: float | None = None  # the best val score so far
        self.diverged_at: int | None = None  # the step the flag was first raised at

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def median(self) -> float | None:
        """The median of the last ``window`` finite losses (None until the window is full)."""
        if len(self.history) < self.window:
            return None
        values = sorted(self.history[-self.window:])
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])

    def _flag(self, step: int) -> bool:
        """Raise the flag at ``step``; True when it was not raised before."""
        if self.diverged_at is not None:
            return False
        self.diverged_at = int(step)
        return True

    def update(self, loss: float, step: int) -> bool:
        """Record one step's loss (a float or 0-dim tensor) at ``step``; return True on the step
        the fit is first flagged as diverged (False before and after)."""
        value = float(loss)
        if not math.isfinite(value):
            self.spikes = self.patience  # a NaN or inf is divergence at once
        else:
            median = self.median()
            spike = median is not None and value > self.factor * max(median, 1e-12)
            self.spikes = self.spikes + 1 if spike else 0
            if not spike:  # a spike does not enter the reference it is judged against
                self.history = (self.history + [value])[-self.window:]
        return self.spikes >= self.patience and self._flag(step)

    def update_val(self, score: float, step: int) -> bool:
        """Record a val score (higher is better) at ``step``; return True when it falls more than
        ``margin`` under the best score before it and the fit is first flagged so (False otherwise).
        A non-finite score is ignored."""
        value = float(score)
        if not math.isfinite(value):
            return False
        best = self.best_val
        self.best_val = value if best is None else max(best, value)
        return best is not None and value < best - self.margin and self._flag(step)

    def state_dict(self) -> dict:
        """The guard's settings, loss history, spike count, best val score and ``diverged_at``
        (checkpointed by the GAR stage)."""
        return {"factor": self.factor, "window": self.window, "patience": self.patience, "margin": self.margin,
                "history": list(self.history), "spikes": self.spikes, "best_val": self.best_val,
                "diverged_at": self.diverged_at}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (a resumed fit keeps its history, best and flag)."""
        self.factor, self.window, self.patience = float(state["factor"]), int(state["window"]), int(state["patience"])
        self.margin = float(state.get("margin", self.margin))
        self.history, self.spikes = [float(v) for v in state["history"]], int(state["spikes"])
        self.best_val = None if state.get("best_val") is None else float(state["best_val"])
        self.diverged_at = None if state["diverged_at"] is None else int(state["diverged_at"])
