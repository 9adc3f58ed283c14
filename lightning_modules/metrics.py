"""Held-out evaluation: protocols, regions, baselines and metrics (DESIGN.md, "Metrics"; issue
"Honest evaluation").

Every figure is keyed ``<model>/<protocol>/<split>/<region>/<metric>`` (:func:`metric_key`):

- model: ``baseline_mean``, ``baseline_nearest``, ``teacher``, ``student``, ``gar``,
  ``gar_inverted``, ...;
- protocol (:data:`PROTOCOLS`): ``tracked``, the headline: the frame is rendered from its tracked
  expression code and camera, nothing looks at the scored image; ``refined``, PointAvatar's
  evaluation protocol (its code/scripts/test.py), labelled: the frame's codes (expression and head
  pose, and a GAR's z) are refined by a stated number of gradient steps against that very frame,
  the model frozen (:func:`refine_codes`); the GAR's inversion (``gar_inverted``: the inverse
  encoder, then steps) is such a row. A refined row is never a headline, a caption or a
  selection metric;
- split: ``val`` (selects checkpoints, sweeps and design choices) or ``test`` (the report only);
- region (:data:`REGIONS`): ``full``, the model's render on white with its own silhouette against
  the ground truth on white under its head mask (the headline); ``face``, both composited under
  the ground-truth mask, so only appearance inside the head counts;
- metric: ``l1``, ``psnr`` (per image, then averaged, as PointAvatar's utils/metrics.py), ``ssim``
  (11x11 Gaussian, sigma 1.5) from torchmetrics (synchronised across DDP ranks), ``swd``
  (:mod:`lightning_modules.swd`, GAR stage), ``flicker`` (:class:`Flicker`, GAR stage, region
  ``full``) and ``lpips``, which needs AlexNet weights that cannot be downloaded here and is
  therefore JSON null.

Baselines predict their own silhouette (:class:`Baselines`): ``baseline_mean`` is the mean of the
training frames on white (the mean foreground colour composited with the mean training mask);
``baseline_nearest`` is the training frame nearest in expression and head pose
(:func:`nearest_training_frames`), its image and mask as they are. A model that does not beat
``baseline_nearest`` has learned nothing beyond retrieving a training frame.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lightning_modules.flops import multiply_adds  # re-exported: the refined rows' FLOP counter
from models.camera import axis_angle_to_matrix
from models.losses import composite_on_white, masked_l1, ssim_loss  # composite_on_white: re-exported

__all__ = [
    "BASELINES",
    "PROTOCOLS",
    "REGIONS",
    "Baselines",
    "Flicker",
    "HeldOutMetrics",
    "RefinedCodes",
    "composite_on_white",
    "invert_codes",
    "metric_key",
    "nearest_training_frames",
    "refine_codes",
    "refined_render",
    "small_rotation",
    "time_per_frame",
    "multiply_adds",
]

#: Evaluation protocols, headline first.
PROTOCOLS = ("tracked", "refined")
#: Regions a frame is scored on, headline first.
REGIONS = ("full", "face")
#: The baselines every stage scores beside its models (tracked protocol).
BASELINES = ("baseline_mean", "baseline_nearest")


def metric_key(model: str, protocol: str, split: str, region: str, metric: str) -> str:
    """The metrics.json key ``<model>/<protocol>/<split>/<region>/<metric>``.

    Raises:
        ValueError: an unknown protocol or region.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {list(PROTOCOLS)}")
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; known: {list(REGIONS)}")
    return f"{model}/{protocol}/{split}/{region}/{metric}"


# -- baselines ---------------------------------------------------------------------------------------
def nearest_training_frames(
    train_expression: torch.Tensor,
    train_world_mat: torch.Tensor,
    expression: torch.Tensor,
    world_mat: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training frame nearest to each query frame in expression and head pose.

    Distance (each term divided by the training frames' spread of that quantity, so that none
    dominates by its units)::

        d^2 = |e - e'|^2 / var_e + |R - R'|_F^2 / var_R + |t - t'|^2 / var_t

    with e the expression code, world_mat = [R | t] (world->camera: the head pose folded into the
    camera), and var_x = the mean over training frames of |x - mean(x)|^2 (1 where that is 0, e.g.
    a single training frame or a static camera).

    Args:
        train_expression: (F, E) float training expression codes.
        train_world_mat: (F, 3, 4) float training cameras.
        expression: (B, E) query codes.
        world_mat: (B, 3, 4) query cameras.

    Returns:
        (index (B,) int64 into the F training frames, distance d (B,) float32).

    Raises:
        ValueError: no training frame, or mismatched shapes.
    """
    if train_expression.ndim != 2 or train_expression.shape[0] == 0:
        raise ValueError(f"train_expression must be (F >= 1, E), got {tuple(train_expression.shape)}")
    if expression.shape[-1] != train_expression.shape[-1]:
        raise ValueError(f"expression has E = {expression.shape[-1]}, the training frames {train_expression.shape[-1]}")
    if train_world_mat.shape[1:] != (3, 4) or world_mat.shape[1:] != (3, 4):
        raise ValueError("world_mat must be (N, 3, 4)")
    total = expression.new_zeros(expression.shape[0], train_expression.shape[0], dtype=torch.float32)
    for train, query in (
        (train_expression, expression),
        (train_world_mat[:, :, :3].flatten(1), world_mat[:, :, :3].flatten(1)),
        (train_world_mat[:, :, 3], world_mat[:, :, 3]),
    ):
        train, query = train.float(), query.float().to(train.device)
        spread = (train - train.mean(0)).pow(2).sum(1).mean()
        spread = spread if spread > 0 else spread.new_ones(())
        total = total.to(train.device) + torch.cdist(query, train).pow(2) / spread  # (B, F)
    distance, index = total.min(1)
    return index, distance.sqrt()


class Baselines(nn.Module):
    """``baseline_mean`` and ``baseline_nearest`` from a subject's training frames (module docstring).

    Args:
        image: (F, 3, H, W) float in [0, 1], the training frames.
        mask: (F, 1, H, W) float in {0, 1}, their head masks.
        world_mat: (F, 3, 4) float, their cameras.
        expression: (F, E) float, their tracked codes.

    ``baseline_mean`` = c m + (1 - m) with m the mean training mask and c the mean foreground colour
    (sum of image * mask over frames / sum of masks), i.e. the mean of the training frames on white:
    the best constant prediction under the L2 loss, silhouette included.

    Raises:
        ValueError: no training frame or inconsistent shapes.
    """

    def __init__(self, image: torch.Tensor, mask: torch.Tensor, world_mat: torch.Tensor,
                 expression: torch.Tensor) -> None:
        super().__init__()
        if image.ndim != 4 or image.shape[0] == 0 or mask.shape != (image.shape[0], 1, *image.shape[2:]):
            raise ValueError(f"image (F, 3, H, W) and mask (F, 1, H, W) with F >= 1, got {tuple(image.shape)} "
                             f"and {tuple(mask.shape)}")
        on_white = composite_on_white(image.float(), mask.float())
        self.register_buffer("mean_prediction", on_white.mean(0), persistent=False)  # (3, H, W)
        self.register_buffer("frames_on_white", on_white, persistent=False)  # (F, 3, H, W)
        self.register_buffer("world_mat", world_mat.float(), persistent=False)
        self.register_buffer("expression", expression.float(), persistent=False)

    @torch.no_grad()
    def forward(self, expression: torch.Tensor, world_mat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions for B query frames from their tracked codes.

        Returns:
            {"baseline_mean": (B, 3, H, W), "baseline_nearest": (B, 3, H, W)} on white.
        """
        index, _ = nearest_training_frames(self.expression, self.world_mat, expression, world_mat)
        mean = self.mean_prediction.expand(expression.shape[0], -1, -1, -1)
        return {"baseline_mean": mean, "baseline_nearest": self.frames_on_white[index]}

    @classmethod
    def from_trainer(cls, trainer) -> Baselines | None:
        """From ``trainer.datamodule.training_frames()`` (None when the datamodule has none)."""
        frames_fn = getattr(getattr(trainer, "datamodule", None), "training_frames", None)
        if not callable(frames_fn):
            return None
        frames = frames_fn()
        return cls(frames["image"], frames["mask"], frames["world_mat"], frames["expression"])


# -- the refined protocol --------------------------------------------------------------------------
#: Rotation matrices exp([w]_x) of axis-angle vectors (B, 3) -> (B, 3, 3), differentiable at 0: the
#: refined protocol's pose step (:func:`models.camera.axis_angle_to_matrix`, under its earlier name).
small_rotation = axis_angle_to_matrix


class RefinedCodes:
    """The result of :func:`refine_codes`: codes (B, E), cameras (B, 3, 4), extra code or None, the loss per step."""

    def __init__(self, expression: torch.Tensor, world_mat: torch.Tensor, extra: torch.Tensor | None,
                 losses: list[float]) -> None:
        self.expression, self.world_mat, self.extra, self.losses = expression, world_mat, extra, losses


def _clone_tree(value):
    """Clones of the tensors in a tensor / dataclass / NamedTuple / tuple / dict (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _clone_tree(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_clone_tree(v) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(_clone_tree(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    return value


def refine_codes(
    render: Callable[..., torch.Tensor],
    expression: torch.Tensor,
    world_mat: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    lr: float,
    extra: torch.Tensor | None = None,
    inputs: tuple = (),
) -> RefinedCodes:
    """The ``refined`` protocol: a frame's codes fitted to that frame, the model frozen.

    PointAvatar's evaluation (its code/scripts/test.py; REFERENCES.md) refines each test frame's
    expression, pose and camera by Adam steps against the test image before scoring it. Here:
    ``steps`` Adam steps (learning rate ``lr``) on the L1 between ``render``'s output and
    ``target`` (the frame on white under its mask: silhouette included) over an expression offset,
    a head-pose correction world_mat' = [exp([w]_x) R | exp([w]_x) t + dt] (rotation w, radians;
    translation dt, world units, both in camera space) and, when given, an extra code (the GAR's
    z). Gradients are taken with ``torch.autograd.grad`` w.r.t. these codes only, so no
    parameter's value or ``.grad`` changes; runs in float32 outside inference mode.

    Args:
        render: (expression (B, E), world_mat (B, 3, 4), extra or None, *inputs) -> (B, 3, H, W)
            render on white.
        expression: (B, E) tracked codes (the start).
        world_mat: (B, 3, 4) tracked cameras (the start).
        target: (B, 3, H, W) the frames on white under their masks.
        steps: Adam steps (0 returns the start).
        lr: Adam learning rate, shared by all codes.
        extra: (B, D) optional extra code, refined too (start).
        inputs: further arguments of ``render`` (the batch, cached canonical outputs...), passed as
            clones made outside inference mode, so tensors Lightning's evaluation made in
            inference mode can take part in the backward passes.

    Returns:
        :class:`RefinedCodes` (detached), ``losses`` the L1 before each step and after the last.

    Raises:
        ValueError: negative ``steps`` or non-positive ``lr``.
    """
    if steps < 0 or not lr > 0:
        raise ValueError(f"refinement needs steps >= 0 and lr > 0, got {steps} and {lr}")
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(target.device.type, enabled=False):
        target = target.detach().clone().float()
        inputs = _clone_tree(tuple(inputs))
        start_e, start_w = expression.detach().clone().float(), world_mat.detach().clone().float()
        d_expr = torch.zeros_like(start_e, requires_grad=True)
        d_rot = start_w.new_zeros(start_w.shape[0], 3, requires_grad=True)
        d_trans = start_w.new_zeros(start_w.shape[0], 3, requires_grad=True)
        codes = [d_expr, d_rot, d_trans]
        code_extra = None
        if extra is not None:
            code_extra = extra.detach().clone().float().requires_grad_(True)
            codes.append(code_extra)

        def posed() -> tuple[torch.Tensor, torch.Tensor]:
            rot = small_rotation(d_rot)  # (B, 3, 3)
            wm = torch.cat([rot @ start_w[:, :, :3], (rot @ start_w[:, :, 3:]) + d_trans[:, :, None]], 2)
            return start_e + d_expr, wm

        losses: list[float] = []
        optimizer = torch.optim.Adam(codes, lr=lr) if steps > 0 else None
        for _ in range(steps):
            e, wm = posed()
            loss = (render(e, wm, code_extra, *inputs) - target).abs().mean()
            losses.append(float(loss.detach()))
            grads = torch.autograd.grad(loss, codes, allow_unused=True)
            for code, grad in zip(codes, grads):
                code.grad = torch.zeros_like(code) if grad is None else grad
            optimizer.step()
        with torch.no_grad():
            e, wm = posed()
            losses.append(float((render(e, wm, code_extra, *inputs) - target).abs().mean()))
    return RefinedCodes(e.detach(), wm.detach(), None if code_extra is None else code_extra.detach(), losses)


def refined_render(
    render: Callable[..., torch.Tensor], batch, steps: int, lr: float, inputs: tuple = (),
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``refined`` protocol's render of a batch: :func:`refine_codes` from the batch's tracked
    codes against its frames on white, then ``render`` of the refined codes (no gradient).

    Args:
        render: (expression, world_mat, extra, batch, *inputs) -> (B, 3, H, W) render on white.
        batch: the :class:`~datamodules.batch.AvatarBatch` scored.
        steps, lr, extra: as :func:`refine_codes`.
        inputs: further arguments of ``render`` after the batch.

    Returns:
        (B, 3, H, W) the render of the refined codes.
    """
    target = composite_on_white(batch.image, batch.mask)
    codes = refine_codes(render, batch.expression, batch.world_mat, target, steps, lr, extra=extra,
                         inputs=(batch, *inputs))
    with torch.no_grad():
        return render(codes.expression, codes.world_mat, codes.extra, batch, *inputs)


def invert_codes(
    render: Callable[..., torch.Tensor], z: torch.Tensor, expression: torch.Tensor,
    target: torch.Tensor, steps: int, lr: float, ssim_weight: float, inputs: tuple = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAR's inversion refinement (Piao et al., CVPR 2021; REFERENCES.md, "Renderers"): ``steps`` Adam
    steps (learning rate ``lr``) on L1 + ``ssim_weight`` (1 - SSIM) of ``render(z, expression)``
    against ``target``, over the two codes only (no parameter or optimiser state changes).

    Runs in float32, outside inference mode (on clones), so Lightning's evaluation can call it.

    Args:
        render: (z (B, Z), expression (B, E), *inputs) -> (B, 3, H, W) render on white.
        z, expression: the start (E's output).
        target: (B, 3, H, W) the frames on white under their masks.
        inputs: further arguments of ``render`` (the batch), passed as clones made outside inference mode.

    Returns:
        z (B, Z) and expression (B, E), detached, float32.
    """
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(target.device.type, enabled=False):
        target, inputs = target.detach().clone().float(), _clone_tree(tuple(inputs))
        z = z.detach().float().clone().requires_grad_(True)
        code = expression.detach().float().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z, code], lr=lr)
        for _ in range(steps):
            fake = render(z, code, *inputs)
            loss = masked_l1(fake, target) + ssim_weight * ssim_loss(fake, target)
            z.grad, code.grad = torch.autograd.grad(loss, (z, code))
            optimizer.step()
    return z.detach(), code.detach()


def time_per_frame(fn: Callable[[], object], repeats: int = 3) -> float:
    """Milliseconds per call of ``fn`` (one frame): the mean of ``repeats`` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


# -- metrics -----------------------------------------------------------------------------------------
def _collection() -> MetricCollection:
    return MetricCollection(
        {
            "l1": MeanAbsoluteError(),
            "psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=11, sigma=1.5),
        }
    )


class Flicker(Metric):
    """Temporal flicker of a rendered sequence against the ground truth's own motion.

    For each pair of consecutive frames (t-1, t) of the evaluation stream, with m the union of the
    two ground-truth head masks:

        flicker_t = mean_m |R_t - R_{t-1}| - mean_m |G_t - G_{t-1}|

    (R: renders on white, G: frames on white under their masks, means over the masked pixels and
    the 3 channels); the metric is the mean over pairs, in [0, 1] units of the image. 0: the render
    changes as much as the video does; > 0: it changes more (flicker); < 0: less (a render that
    lags or freezes). A pair is two frames of the stream whose frame numbers are consecutive
    (t = t-1 + 1: the val and test splits are contiguous blocks of the clip, evaluated in order);
    any other step (a thinned val split, ``val_every`` > 1; the next sequence) pairs nothing, so the
    metric never compares frames far apart. Under DDP each rank sees every W-th frame and pairs
    nothing: run it on one device (the demo does).

    Shapes:
        update(pred, target, mask, frame_index): pred and target (B, 3, H, W) float on white,
        mask (B, 1, H, W) in [0, 1], frame_index (B,) int64. compute() -> 0-dim float (NaN when no
        pair was seen).

    Raises:
        ValueError: (update) shapes that are not (B, 3, H, W) / (B, 1, H, W).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self._previous: tuple[torch.Tensor, ...] | None = None  # (pred, target, mask, frame) of the last frame

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, frame_index: torch.Tensor) -> None:
        if pred.shape != target.shape or pred.dim() != 4 or mask.shape != (pred.shape[0], 1, *pred.shape[2:]):
            raise ValueError(f"pred and target must be (B, 3, H, W) and mask (B, 1, H, W), got {tuple(pred.shape)}, "
                             f"{tuple(target.shape)}, {tuple(mask.shape)}")
        frames = list(zip(pred.float(), target.float(), mask.float(), frame_index.reshape(-1).tolist()))
        for p, g, m, f in frames:
            prev = self._previous
            if prev is not None and f == prev[3] + 1:
                union = torch.maximum(m, prev[2])  # (1, H, W)
                weight = 3 * union.sum()
                if weight > 0:
                    moved = ((p - prev[0]).abs() * union).sum() / weight
                    truth = ((g - prev[1]).abs() * union).sum() / weight
                    self.total += (moved - truth).double()
                    self.pairs += 1
            self._previous = (p.detach(), g.detach(), m.detach(), f)

    def compute(self) -> torch.Tensor:
        if int(self.pairs) == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.pairs).float()

    def reset(self) -> None:
        super().reset()
        self._previous = None


class HeldOutMetrics(nn.Module):
    """L1 / PSNR / SSIM (and SWD for chosen models) per (model, protocol, region).

    Args:
        rows: model -> the protocols it is scored under, e.g. ``{"teacher": ("tracked", "refined"),
            "baseline_mean": ("tracked",)}``.
        swd_models: models that also get SWD (:class:`~lightning_modules.swd.SlicedWasserstein`).
        flicker_models: models whose ``tracked`` ``full`` row also gets :class:`Flicker` (pass the
            batch's ``frame_index`` to :meth:`update`).

    Raises:
        ValueError: an unknown protocol.
    """

    def __init__(self, rows: Mapping[str, Sequence[str]], swd_models: Sequence[str] = (),
                 flicker_models: Sequence[str] = ()) -> None:
        super().__init__()
        from lightning_modules.swd import SlicedWasserstein

        for protocols in rows.values():
            unknown = set(protocols) - set(PROTOCOLS)
            if unknown:
                raise ValueError(f"unknown protocol(s) {sorted(unknown)}; known: {list(PROTOCOLS)}")
        self.rows = {model: tuple(protocols) for model, protocols in rows.items()}
        names = [(m, p, r) for m, protocols in self.rows.items() for p in protocols for r in REGIONS]
        self.collections = nn.ModuleDict({self._name(*n): _collection() for n in names})
        self.swd = nn.ModuleDict({
            self._name(*n): SlicedWasserstein(patches_per_image=64) for n in names if n[0] in swd_models
        })
        self.flicker = nn.ModuleDict({
            self._name(m, "tracked", "full"): Flicker() for m in flicker_models if self.has(m, "tracked")
        })
        self._evaluated: set[tuple[str, str, str]] = set()  # (model, protocol, split) with metrics computed
        self._baselines: tuple[object, Baselines | None] | None = None  # (datamodule, its baselines); not a submodule

    @staticmethod
    def _name(model: str, protocol: str, region: str) -> str:
        return f"{model}__{protocol}__{region}"  # ModuleDict keys may not hold "." or "/"

    def has(self, model: str, protocol: str = "tracked") -> bool:
        """Whether ``model`` is scored under ``protocol``."""
        return protocol in self.rows.get(model, ())

    @torch.no_grad()
    def update(self, model: str, protocol: str, pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
               frame_index: torch.Tensor | None = None) -> None:
        """Add a batch: ``pred`` (B, 3, H, W) render on white; ``image``/``mask`` the batch's frames;
        ``frame_index`` (B,) feeds the row's :class:`Flicker` where it has one.

        Raises:
            KeyError: a (model, protocol) not declared in ``rows``.
        """
        if not self.has(model, protocol):
            raise KeyError(f"{model}/{protocol} is not an evaluated row; rows: {self.rows}")
        with torch.autocast(device_type=pred.device.type, enabled=False):  # float32 under mixed precision too
            mask = mask.float()
            target = composite_on_white(image.float(), mask)
            pred = pred.float().clamp(0, 1)
            for region, p in (("full", pred), ("face", composite_on_white(pred, mask))):
                name = self._name(model, protocol, region)
                self.collections[name].update(p, target)
                if name in self.swd:
                    self.swd[name].update(p, target)
                if name in self.flicker and frame_index is not None:
                    self.flicker[name].update(p, target, mask, frame_index)

    @torch.no_grad()
    def update_baselines(self, trainer, batch) -> None:
        """Score the declared baselines (:data:`BASELINES`) on a batch, built once per datamodule from
        its ``training_frames()`` (nothing when the datamodule has none)."""
        wanted = [m for m in BASELINES if self.has(m)]
        if not wanted:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if self._baselines is None or self._baselines[0] is not datamodule:
            self._baselines = (datamodule, Baselines.from_trainer(trainer))
        baselines = self._baselines[1]
        if baselines is None:
            return
        preds = baselines.to(batch.image.device)(batch.expression, batch.world_mat)
        for model in wanted:
            self.update(model, "tracked", preds[model], batch.image, batch.mask)

    def compute(self, split: str) -> dict[str, float]:
        """The metrics of every row updated since the last reset, as metrics.json keys (:func:`metric_key`)."""
        out = {}
        for name, collection in self.collections.items():
            if not collection["l1"].update_called:
                continue
            model, protocol, region = name.split("__")
            for metric, value in collection.compute().items():
                out[metric_key(model, protocol, split, region, metric)] = float(value)
            if name in self.swd and self.swd[name].update_called:
                out[metric_key(model, protocol, split, region, "swd")] = float(self.swd[name].compute())
            if name in self.flicker and self.flicker[name].update_called:
                flicker = float(self.flicker[name].compute())  # synchronised: every rank computes it
                if flicker == flicker:  # NaN: no consecutive pair seen
                    out[metric_key(model, protocol, split, region, "flicker")] = flicker
            self._evaluated.add((model, protocol, split))
        return out

    def null_metrics(self) -> dict[str, None]:
        """``lpips`` = null for every row computed so far (no AlexNet weights on disk)."""
        return {metric_key(m, p, s, r, "lpips"): None for m, p, s in sorted(self._evaluated) for r in REGIONS}

    def reset(self) -> None:
        for metric in (*self.collections.values(), *self.swd.values(), *self.flicker.values()):
            metric.reset()
