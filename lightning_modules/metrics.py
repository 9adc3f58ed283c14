"""Held-out image metrics with the PointAvatar protocol (DESIGN.md, "Metrics").

Ground truth is composited on white with the head mask; renders are compared as they come out of
the renderer (white background). L1, PSNR (per image, then averaged, as PointAvatar's
utils/metrics.py) and SSIM (11x11 Gaussian, sigma 1.5) come from torchmetrics and synchronise
across DDP ranks. LPIPS needs pretrained AlexNet weights that cannot be downloaded here: it is
reported as null (JSON) unless ``lpips_weights`` points at them on disk.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

__all__ = ["HeldOutMetrics", "baseline_mean_prediction", "composite_on_white"]


def composite_on_white(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """image * mask + (1 - mask): (B, 3, H, W) in [0, 1] with a (B, 1, H, W) mask -> (B, 3, H, W)."""
    return image * mask + (1.0 - mask)


def baseline_mean_prediction(trainer, batch) -> torch.Tensor | None:
    """``baseline_mean``: the datamodule's mean training image under each frame's mask, on white.

    Returns:
        (B, 3, H, W), or None when the datamodule has no ``mean_train_image()``.
    """
    mean_fn = getattr(getattr(trainer, "datamodule", None), "mean_train_image", None)
    if not callable(mean_fn):
        return None
    return composite_on_white(mean_fn().to(batch.image).expand_as(batch.image), batch.mask)


def _collection() -> MetricCollection:
    return MetricCollection(
        {
            "l1": MeanAbsoluteError(),
            "psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=11, sigma=1.5),
        }
    )


class HeldOutMetrics(nn.Module):
    """L1 / PSNR / SSIM per model name, computed as ``<model>/<split>/<metric>`` keys.

    Args:
        models: the model names that will be updated (e.g. ``("baseline_mean", "teacher")``).
    """

    def __init__(self, models: tuple[str, ...]) -> None:
        super().__init__()
        self.models = tuple(models)
        self.collections = nn.ModuleDict({m: _collection() for m in self.models})

    @torch.no_grad()
    def update(self, model: str, pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch: ``pred`` (B, 3, H, W) render on white; ``image``/``mask`` the batch's frames."""
        with torch.autocast(device_type=pred.device.type, enabled=False):  # float32 under mixed precision too
            target = composite_on_white(image.float(), mask.float())
            self.collections[model].update(pred.float().clamp(0, 1), target)

    def compute(self, split: str) -> dict[str, float]:
        """The metrics of every model updated since the last reset, as flat metrics.json keys."""
        out = {}
        for model, collection in self.collections.items():
            if not collection["l1"].update_called:
                continue
            for name, value in collection.compute().items():
                out[f"{model}/{split}/{name}"] = float(value)
        return out

    def reset(self) -> None:
        for collection in self.collections.values():
            collection.reset()
