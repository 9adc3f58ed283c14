"""The evaluated rows of a point avatar (the teacher, a student), shared by the teacher and distillation stages.

A point avatar is a network with the per-frame interface of :class:`models.frame.PerFrame`:
``avatar(expression, world_mat, canonical=...)`` returns the frame's ``points`` (B, N, 3),
``colors`` (B, N, 3), ``normals_cam`` (B, N, 3) and its splat ``radius`` (world units). Its rows are
the ``tracked`` render (the frame's tracked codes; nothing looks at the frame) and, outside a fit,
the ``refined`` one (codes refined against the frame, :func:`~lightning_modules.metrics.refine_codes`).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.metrics import multiply_adds, refined_render, time_per_frame
from lightning_modules.stage import Row
from models.camera import pixel_radius
from models.rasterizer import RasterOutput

__all__ = ["frame_costs", "grid", "refined", "render", "rows", "splat"]


def splat(rasterizer, out: dict[str, torch.Tensor], world_mat: torch.Tensor, K: torch.Tensor,
          extra: torch.Tensor | None = None) -> RasterOutput:
    """Rasterize one frame's output: its colours (and ``extra`` (B, N, C) channels after them) at its
    points, each a disk of its world radius projected to pixels (:func:`~models.camera.pixel_radius`)."""
    features = out["colors"] if extra is None else torch.cat([out["colors"], extra], -1)
    radius = pixel_radius(out["points"], world_mat, K, out["radius"])
    return rasterizer(out["points"], features, world_mat, K, radius=radius)


def render(avatar, rasterizer, batch, canonical=None, extra=None) -> tuple[dict[str, torch.Tensor], RasterOutput]:
    """The avatar's frame for ``batch``'s tracked codes and cameras and its rasterization (:func:`splat`)."""
    out = avatar(batch.expression, batch.world_mat, canonical=canonical)
    return out, splat(rasterizer, out, batch.world_mat, batch.K, extra)


def refined(avatar, rasterizer, batch, canonical, steps: int, lr: float) -> torch.Tensor:
    """The ``refined`` protocol's render (B, 3, H, W): codes refined against ``batch``'s frames, the avatar frozen."""

    def render_codes(expression, world_mat, extra, batch, canonical):
        out = avatar(expression, world_mat, canonical=canonical)
        return splat(rasterizer, out, world_mat, batch.K).image[:, :3]

    return refined_render(render_codes, batch, steps, lr, inputs=(canonical,))


def rows(name: str, avatar, rasterizer, batch, canonical, refine: tuple[int, float] | None = None) -> dict[str, Row]:
    """``{name: (name, "tracked", render)}``, and with ``refine`` = (steps, lr) ``{name}_refined``."""
    out = {name: (name, "tracked", render(avatar, rasterizer, batch, canonical)[1].image[:, :3])}
    if refine is not None:
        out[f"{name}_refined"] = (name, "refined", refined(avatar, rasterizer, batch, canonical, *refine))
    return out


def frame_costs(name: str, avatar, rasterizer, batch, canonical, refine: tuple[int, float] | None = None
                ) -> dict[str, float]:
    """``ms_per_frame/<name>/tracked`` (deform, shade, rasterize one frame, canonical outputs cached) and,
    with ``refine``, ``ms_per_frame/<name>/refined`` and ``flops_per_frame/<name>/refined`` (the
    refinement's forward and backward passes, :func:`~lightning_modules.metrics.multiply_adds`)."""
    costs: dict[str, Any] = {f"ms_per_frame/{name}/tracked":
                             time_per_frame(lambda: render(avatar, rasterizer, batch, canonical))}
    if refine is not None:
        def run():
            return refined(avatar, rasterizer, batch, canonical, *refine)

        costs[f"ms_per_frame/{name}/refined"] = time_per_frame(run, repeats=1)
        costs[f"flops_per_frame/{name}/refined"] = multiply_adds(run)
    return costs


@torch.no_grad()
def grid(avatar, rasterizer, batch, canonical) -> dict[str, torch.Tensor]:
    """Render-grid columns (B, 3, H, W): the render, its camera-space normals as colours, its alpha."""
    out = avatar(batch.expression, batch.world_mat, canonical=canonical)
    raster = splat(rasterizer, out, batch.world_mat, batch.K, extra=out["normals_cam"] * 0.5 + 0.5)
    return {"render": raster.image[:, :3], "normals": raster.image[:, 3:6], "alpha": raster.alpha.expand(-1, 3, -1, -1)}
