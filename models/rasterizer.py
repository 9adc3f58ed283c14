"""Differentiable alpha-compositing point rasterizer (the rule-based renderer).

The rule is PointAvatar's (Zheng et al., CVPR 2023), which renders with PyTorch3D's point
rasterizer and alpha compositor (Ravi et al., 2020): every point is a disk of radius ``r`` pixels
on the image plane, it covers a pixel with opacity

    alpha = 1 - d^2 / r^2        (d: pixel distance from the projected point to the pixel centre)

and per pixel the ``points_per_pixel`` points nearest in camera depth are composited front to back

    C = sum_i alpha_i T_i c_i + T_K * background,   T_i = prod_{j<i} (1 - alpha_j).

Everything here is pure torch (no torch_scatter, no compiled extension): it runs on any device
and torch build and on both backends of ``models/ops.py`` by construction. Inference traces with
``torch.jit.trace`` (tested; image size and a float radius become constants) and exports with
``torch.export`` with a dynamic number of points (checked by hand: too slow for a unit test).

Algorithm (fragments, not a dense point x pixel table):

1. project with ``models/camera.py`` (OpenCV, pixel centres at +0.5), drop points behind the near
   plane, inactive (``valid``) or whose disk misses the image, and order the rest by depth (one
   argsort of N keys per camera);
2. each remaining point proposes the pixels of its bounding square (``ceil(2 r_max)`` pixels a
   side) and keeps those with ``d < r``: these (point, pixel) pairs are the *fragments*;
3. one stable sort of the fragments' pixel ids (points already in depth order) groups them per
   pixel, nearest first; of each run of equal pixel ids the first ``points_per_pixel`` are kept,
   their rank in the run is their slot;
4. alphas go into a padded (points_per_pixel, pixels) buffer whose cumulative product over the
   slots gives the transmittance (no logarithm, so alpha = 1 at a disk centre is exact);
5. ``index_add`` accumulates ``alpha_i T_i`` times the channels and depth per pixel.

Only the alpha of the kept fragments (step 5's inputs) is recorded by autograd; the selection
(steps 1-3) is integer work without gradient, and steps 4-5 are one ``autograd.Function`` with a
hand-written backward (:class:`_Composite`; first-order gradients only).

One core (:func:`_rasterize`) serves training and ONNX export: ``rasterize_points(...,
exportable=True)`` (alias :func:`rasterize_points_exportable`) switches only the parts ONNX
cannot take (a host read of the largest radius, ``unique_consecutive``, ``cumprod``, a stable
sort, the custom autograd function) for equivalents: a tensor window side, a depth-bin histogram
that pre-selects the fragments plus count/cumsum slots in step 3, an unrolled float64 product
and a padded front-to-back sum in steps 4-5, and TopK sorts under ``torch.onnx.export``. In
eager mode on CPU the two are bit-equal (details in :func:`rasterize_points`).

Layouts (padded vs packed): inputs are padded per camera, (B, N, ...) or shared (N, ...); the
fragments are packed (F, ...) over all cameras, sorted by pixel then depth; the compositing
buffer is padded (points_per_pixel, B * H * W); outputs are (B, C, H, W).

Gradients flow to the channels, the positions (through alpha and depth) and the radii (through
alpha). The depth order and the disk boundary are not differentiable (alpha is continuous but
has a kink at d = r, and an order swap is a jump), as in every rasterizer of this kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.camera import project, world_to_camera

__all__ = [
    "RasterOutput", "PointRasterizer", "rasterize_points", "rasterize_points_exportable", "rasterize_dense_reference",
]


@dataclass
class RasterOutput:
    """What the rasterizer returns.

    Attributes:
        image: (B, C, H, W) composited channels, background included.
        alpha: (B, 1, H, W) accumulated opacity 1 - prod_i (1 - alpha_i) in [0, 1].
        depth: (B, 1, H, W) alpha-composited camera z, sum_i alpha_i T_i z_i, i.e. composited
            over a background depth of 0: 0 where alpha = 0; divide by ``alpha`` for the mean
            depth of the covered part of a pixel.
    """

    image: Tensor
    alpha: Tensor
    depth: Tensor


@dataclass
class _Inputs:
    """Validated inputs, all in the compute dtype. B cameras, N points, C channels."""

    points: Tensor  # (N, 3) or (B, N, 3)
    features: Tensor  # (N, C) or (B, N, C)
    world_mat: Tensor  # (B, 3|4, 4)
    K: Tensor  # (B, 3, 3)
    radius: Tensor | float  # (B, N) tensor or a python float
    background: Tensor  # (C,)
    valid: Tensor | None  # (B, N) bool or None
    height: int
    width: int
    batch: int
    num_points: int


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be an int or (H, W) of positive ints, got {image_size!r}")
    return size  # type: ignore[return-value]


def _check_inputs(
    points: Tensor,
    features: Tensor,
    world_mat: Tensor,
    K: Tensor,
    image_size: int | Sequence[int],
    radius: float | Tensor,
    points_per_pixel: int,
    background: float | Sequence[float] | Tensor,
    near: float,
    valid: Tensor | None,
) -> _Inputs:
    """Check shapes and values at the public boundary; promote to one float dtype (>= float32)."""
    height, width = _image_size(image_size)
    if world_mat.dim() != 3 or world_mat.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"world_mat must be (B, 3, 4) or (B, 4, 4), got {tuple(world_mat.shape)}")
    batch = world_mat.shape[0]
    if K.shape != (batch, 3, 3):
        raise ValueError(f"K must be (B, 3, 3) with B = {batch} cameras as world_mat, got {tuple(K.shape)}")
    if points.dim() not in (2, 3) or points.shape[-1] != 3:
        raise ValueError(f"points must be (N, 3) or (B, N, 3), got {tuple(points.shape)}")
    if points.dim() == 3 and points.shape[0] != batch:
        raise ValueError(f"points (B, N, 3) has B = {points.shape[0]} but there are {batch} cameras")
    num_points = points.shape[-2]
    if features.dim() not in (2, 3) or features.shape[-2] != num_points:
        raise ValueError(
            f"features must be (N, C) or (B, N, C) with N = {num_points} as points, got {tuple(features.shape)}"
        )
    if features.dim() == 3 and features.shape[0] != batch:
        raise ValueError(f"features (B, N, C) has B = {features.shape[0]} but there are {batch} cameras")
    if not isinstance(points_per_pixel, int) or points_per_pixel < 1:
        raise ValueError(f"points_per_pixel must be a positive int, got {points_per_pixel!r}")
    if not near > 0:
        raise ValueError(f"near must be a small positive distance, got {near!r}")
    for name, t in (("points", points), ("features", features), ("world_mat", world_mat), ("K", K)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")

    dtype = torch.promote_types(torch.promote_types(points.dtype, features.dtype), torch.float32)
    dtype = torch.promote_types(dtype, world_mat.dtype)
    device = points.device

    if isinstance(radius, Tensor):
        if radius.dim() == 0:
            radius = radius.reshape(1, 1).expand(batch, num_points)
        elif radius.dim() == 1 and radius.shape[0] == num_points:
            radius = radius.unsqueeze(0).expand(batch, num_points)  # (B, N)
        elif radius.shape != (batch, num_points):
            raise ValueError(
                f"radius must be a float, (N,) or (B, N) = ({batch}, {num_points}), got {tuple(radius.shape)}"
            )
        radius = radius.to(dtype)
        if bool((radius.detach() < 0).any()) or not bool(torch.isfinite(radius.detach()).all()):
            raise ValueError("radius must be finite and >= 0 pixels (0 hides a point)")
    else:
        radius = float(radius)
        if not (radius > 0 and math.isfinite(radius)):
            raise ValueError(f"radius must be a positive number of pixels, got {radius!r}")

    channels = features.shape[-1]
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.dim() == 0:
        bg = bg.expand(channels)
    if bg.shape != (channels,):
        raise ValueError(
            f"background must be a scalar or one value per channel ({channels}), got shape {tuple(bg.shape)}"
        )

    if valid is not None:
        if valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool mask, got {valid.dtype}")
        if valid.shape == (num_points,):
            valid = valid.unsqueeze(0).expand(batch, num_points)
        elif valid.shape != (batch, num_points):
            raise ValueError(
                f"valid must be (N,) or (B, N) = ({batch}, {num_points}), got {tuple(valid.shape)}"
            )

    return _Inputs(
        points=points.to(dtype),
        features=features.to(dtype),
        world_mat=world_mat.to(dtype),
        K=K.to(dtype),
        radius=radius,
        background=bg,
        valid=valid,
        height=height,
        width=width,
        batch=batch,
        num_points=num_points,
    )


def _project(inp: _Inputs, near: float) -> tuple[Tensor, Tensor, Tensor]:
    """Camera z (B, N), pixel coordinates (B, N, 2) and the mask (B, N) of points that can show."""
    cam = world_to_camera(inp.points, inp.world_mat)  # (B, N, 3)
    z = cam[..., 2]  # (B, N)
    uv = project(cam, inp.K)  # (B, N, 2)
    with torch.no_grad():
        r = inp.radius.detach() if isinstance(inp.radius, Tensor) else inp.radius
        u, v = uv[..., 0].detach(), uv[..., 1].detach()
        keep = (z.detach() > near) & torch.isfinite(u) & torch.isfinite(v)
        keep = keep & ((u + r > 0) & (u - r < inp.width) & (v + r > 0) & (v - r < inp.height))
        if isinstance(inp.radius, Tensor):
            keep = keep & (r > 0)
        if inp.valid is not None:
            keep = keep & inp.valid
    return z, uv, keep


def rasterize_points(
    points: Tensor,
    features: Tensor,
    world_mat: Tensor,
    K: Tensor,
    image_size: int | Sequence[int],
    radius: float | Tensor,
    points_per_pixel: int = 10,
    background: float | Sequence[float] | Tensor = 1.0,
    near: float = 1e-3,
    valid: Tensor | None = None,
    *,
    exportable: bool = False,
) -> RasterOutput:
    """Alpha-composite point disks into B camera images (functional form of :class:`PointRasterizer`).

    Implements the PointAvatar / PyTorch3D point compositing rule (module docstring): alpha =
    1 - d^2/r^2 inside the disk of radius r pixels, the ``points_per_pixel`` nearest points in
    camera z per pixel composited front to back, C = sum_i alpha_i T_i c_i + T_K * background.
    Pure torch (no torch_scatter / compiled code), so it runs on both ``models/ops.py`` backends
    and on any device, and inference traces with ``torch.jit.trace``; autocast is disabled inside
    (geometry in >= float32). Cost: O(N log N + F log F) time for F (point, pixel) fragments,
    O(N * ceil(2 r_max)^2 + points_per_pixel * B * H * W) memory, so one huge radius makes every
    point's search window large; a float radius also avoids a host sync for the window size.

    ``exportable=True`` (also :func:`rasterize_points_exportable`) selects the ONNX-friendly
    variant of the same core, for ``torch.onnx.export(..., dynamo=False)``; the normal path reads
    the largest radius on the host and uses operators ONNX lacks (``unique_consecutive``,
    ``cumprod``, a stable sort). Only these parts are switched:

    * the window side ``ceil(2 * max radius)`` stays a tensor (a dynamic ``arange`` in the graph);
    * before the sort by pixel, fragments that cannot be among the ``points_per_pixel`` nearest
      of their pixel are dropped: a histogram per (pixel, one of 64 bins of depth rank) finds the
      bin where each pixel's count reaches ``points_per_pixel``, and later bins go (exact, since
      the bins follow depth order; it leaves the sort about ``points_per_pixel`` fragments per
      pixel instead of every covering one, which matters where ONNX sorts slowly);
    * each fragment's slot in its pixel comes from per-pixel counts and their cumulative sum
      (``scatter_add``, ``cumsum``) instead of ``unique_consecutive``;
    * compositing runs in the padded (points_per_pixel, pixels) layout: the transmittance is an
      unrolled product over the slots, accumulated in float64 as CPU ``cumprod`` does, and every
      slot's (channels, depth) are summed front to back, the order in which ``index_add_`` sums;
    * under ``torch.onnx.export`` the stable sorts are written as ``topk`` of the whole tensor
      (ONNX TopK, whose ties keep the lower index first: a stable sort);
    * no custom autograd function: gradients flow by plain autograd (slower; meant for inference).

    In eager mode on CPU both settings give bit-equal results (tested); exported, equal to float
    round-off. The exporter records the sizes that depend on the data (points in view,
    fragments) as dynamic ONNX shapes and the input checks that read tensor values with their
    outcome. Extra cost of ``exportable``: O(points_per_pixel * B * H * W * (C + 1)) memory for
    the padded compositing and O(64 * B * H * W) for the histogram.

    Args:
        points: (N, 3) shared or (B, N, 3) per-camera (deformed) float points, world space.
        features: (N, C) shared or (B, N, C) per-camera float channels (RGB, normals, latents).
        world_mat: (B, 3, 4) or (B, 4, 4) world->camera, OpenCV (x right, y down, z forward).
        K: (B, 3, 3) pixel intrinsics, pixel centres at +0.5.
        image_size: H = W as an int, or (H, W).
        radius: disk radius in pixels: a float (global), or a tensor (), (N,) or (B, N)
            (differentiable). A radius of 0 hides a point.
        points_per_pixel: how many depth-nearest points are composited per pixel (default 10).
        background: a scalar or (C,) values composited behind the points (1.0: white RGB; use 0
            for features).
        near: points with camera z <= near are dropped (default 1e-3, same units as world_mat).
        valid: optional (N,) or (B, N) bool mask; False points are skipped (they contribute
            nothing and receive zero gradient), e.g. the inactive slots of the teacher's buffer.
        exportable: use the ONNX-exportable variant (above); default False (training).

    Returns:
        :class:`RasterOutput` with image (B, C, H, W), alpha (B, 1, H, W), depth (B, 1, H, W), in
        the promoted dtype of the inputs (float32 at least, float64 if any input is).

    Raises:
        ValueError: on wrong shapes, a non-positive float radius or a negative / non-finite radius
            tensor, a non-positive near or points_per_pixel, a background of the wrong length,
            or a non-bool ``valid``.
    """
    with torch.autocast(device_type=points.device.type, enabled=False):
        inp = _check_inputs(
            points, features, world_mat, K, image_size, radius, points_per_pixel, background, near, valid
        )
        return _rasterize(inp, points_per_pixel, near, exportable)


def rasterize_points_exportable(
    points: Tensor,
    features: Tensor,
    world_mat: Tensor,
    K: Tensor,
    image_size: int | Sequence[int],
    radius: float | Tensor,
    points_per_pixel: int = 10,
    background: float | Sequence[float] | Tensor = 1.0,
    near: float = 1e-3,
    valid: Tensor | None = None,
) -> RasterOutput:
    """:func:`rasterize_points` with ``exportable=True`` (ONNX export): same arguments, result and errors."""
    return rasterize_points(
        points, features, world_mat, K, image_size, radius, points_per_pixel, background, near, valid,
        exportable=True,
    )


_DEPTH_BINS = 64  # depth-rank bins of the exportable path's fragment pre-selection


def _stable_sort(x: Tensor, exportable: bool) -> tuple[Tensor, Tensor]:
    """Values and indices of a stable ascending sort of a 1-D tensor; ONNX TopK (stable by its spec)
    in the exportable path's ONNX export."""
    if exportable and torch.onnx.is_in_onnx_export():
        return torch.topk(x, x.shape[0], largest=False, sorted=True)
    return torch.sort(x, stable=True)


def _rasterize(inp: _Inputs, kpp: int, near: float, exportable: bool) -> RasterOutput:
    """Steps 1-5 of the module docstring; ``exportable`` switches to the ONNX-friendly parts
    listed in :func:`rasterize_points` (bit-equal in eager mode on CPU)."""
    B, N, H, W = inp.batch, inp.num_points, inp.height, inp.width
    P = B * H * W  # pixels of all cameras
    dtype, device = inp.features.dtype, inp.features.device
    C = inp.features.shape[-1]
    z, uv, keep = _project(inp, near)  # (B, N), (B, N, 2), (B, N)

    # ---- 1-3: fragment selection (integer work, no gradient) -------------------------------
    with torch.no_grad():
        flat_m = keep.view(-1).nonzero().squeeze(1)  # (M,) kept points, index into (B * N)
        z_key = z.detach().reshape(B * N).index_select(0, flat_m)  # (M,) all > near > 0
        if not exportable and z_key.device.type == "cpu" and not (
            torch.jit.is_tracing() or torch.compiler.is_compiling()
        ):
            # positive floats sort like their bit patterns read as integers, and integer sorts
            # are several times faster than float sorts on CPU (graph capture and the exportable
            # path keep the float sort)
            z_key = z_key.view(torch.int32 if z_key.dtype == torch.float32 else torch.int64)
        # order by camera, then depth (ties by index): two stable 1-D sorts (a 1-D sort is
        # several times faster than a row-wise sort of a (B, N) tensor on CPU)
        flat_m = flat_m.index_select(0, _stable_sort(z_key, exportable)[1])
        cam_idx = torch.div(flat_m, N, rounding_mode="floor")  # (M,)
        if B > 1:
            by_cam = _stable_sort(cam_idx, exportable)[1]
            flat_m, cam_idx = flat_m.index_select(0, by_cam), cam_idx.index_select(0, by_cam)
        uv_m = uv.detach().reshape(B * N, 2).index_select(0, flat_m)  # (M, 2)
        side: int | Tensor  # bounding square of every disk, in pixels
        if not isinstance(inp.radius, Tensor):
            r_m = torch.full_like(uv_m[:, 0], inp.radius)
            side = max(1, math.ceil(2 * inp.radius))
        else:
            r_m = inp.radius.detach().reshape(B * N).index_select(0, flat_m)  # (M,)
            if exportable:  # a () tensor, no host read; 0 without points
                side = torch.ceil(2 * torch.cat([r_m, r_m.new_zeros(1)]).max()).long().clamp_min(1)
            else:
                side = max(1, math.ceil(2 * (float(r_m.max()) if r_m.numel() else 0.0)))
        # first pixel whose centre can be inside the disk: smallest x with x + 0.5 > u - r
        start = torch.floor(uv_m - r_m[:, None] - 0.5).long() + 1  # (M, 2)
        offs = torch.arange(side, device=device)  # (S,)
        px = start[:, 0, None] + offs  # (M, S) column indices of the window
        py = start[:, 1, None] + offs  # (M, S) row indices
        dx = (px.to(dtype) + 0.5 - uv_m[:, 0, None]).masked_fill_((px < 0) | (px >= W), math.inf)
        dy = (py.to(dtype) + 0.5 - uv_m[:, 1, None]).masked_fill_((py < 0) | (py >= H), math.inf)
        d2_win = dx.square()[:, None, :] + dy.square()[:, :, None]  # (M, S, S) rows, columns
        inside = d2_win < r_m.square()[:, None, None]  # (M, S, S)
        cand = inside.view(-1).nonzero().squeeze(1)  # (F,) candidate ids, in (camera, depth) order
        # sorting int32 is about twice as fast; the exportable path keeps int64 (scatter indices)
        key_dtype = torch.int32 if not exportable and P < 2**31 else torch.int64
        base = ((cam_idx * H + start[:, 1]) * W + start[:, 0]).to(key_dtype)  # (M,) window corner
        win = (offs[:, None] * W + offs).to(key_dtype)  # (S, S) pixel offsets inside the window
        pix = (base[:, None, None] + win).view(-1).index_select(0, cand)  # (F,) global pixel id
        if exportable:
            # Drop, before sorting, fragments that cannot be among the first kpp of their pixel:
            # count the fragments per (pixel, bin of depth ranks); those in bins after the one
            # where a pixel's count reaches kpp go. Bins follow depth order, so the nearer
            # fragments of every survivor survive too and the slots below are unchanged.
            bin_size = side * side * max(1, math.ceil(B * N / _DEPTH_BINS))  # candidate ids per bin
            bins = torch.div(cand, bin_size, rounding_mode="floor")  # (F,)
            hist = _zeros(pix, P * _DEPTH_BINS)
            hist = hist.scatter_add(0, pix * _DEPTH_BINS + bins, torch.ones_like(pix)).view(P, _DEPTH_BINS)
            last_bin = (hist.cumsum(1) < kpp).sum(1)  # (P,) first bin where the count reaches kpp
            sure = (bins <= last_bin.index_select(0, pix)).nonzero().squeeze(1)
            cand, pix = cand.index_select(0, sure), pix.index_select(0, sure)
        pix, perm = _stable_sort(pix, exportable)  # group per pixel, depth order kept inside
        if exportable:
            # slot = position in the sorted list - first position of the fragment's pixel
            count = _zeros(pix, P).scatter_add(0, pix, torch.ones_like(pix))
            first = torch.cumsum(count, 0) - count  # (P,)
            slot = torch.ones_like(pix).cumsum(0) - 1 - first.index_select(0, pix)  # (F,)
            kept = (slot < kpp).nonzero().squeeze(1)  # (F',) position in the sorted fragments
            slot, pix = slot.index_select(0, kept), pix.index_select(0, kept)
        else:
            # runs of equal pixel ids; the first points_per_pixel fragments of each run are kept
            run_pix, run_len = torch.unique_consecutive(pix, return_counts=True)  # (R,) each
            run_start = torch.cumsum(run_len, 0) - run_len  # (R,) position of each run in the sort
            slot_ids = torch.arange(kpp, device=device)
            run, slot = (slot_ids < run_len[:, None]).nonzero(as_tuple=True)  # (F',) sorted order
            kept = run_start.index_select(0, run) + slot  # (F',) position in the sorted fragments
            pix = run_pix.index_select(0, run).long()
        # from here on: kept fragments only, (F',) each
        frag_m = torch.div(
            cand.index_select(0, perm.index_select(0, kept)), side * side, rounding_mode="floor"
        )
        g = flat_m.index_select(0, frag_m)  # index of each fragment's point in (B * N)
        hw = pix % (H * W)
        row = torch.div(hw, W, rounding_mode="floor")
        cx = (hw - row * W).to(dtype) + 0.5  # pixel centre
        cy = row.to(dtype) + 0.5

    # ---- 4-5: alpha of the kept fragments (differentiable), compositing ---------------------
    uv_t = uv.reshape(B * N, 2).t().contiguous()  # (2, B * N)
    d2 = (uv_t[0].index_select(0, g) - cx).square() + (uv_t[1].index_select(0, g) - cy).square()  # (F',)
    if isinstance(inp.radius, Tensor):
        alpha = 1 - d2 / inp.radius.reshape(B * N).index_select(0, g).square()
    else:
        alpha = 1 - d2 / inp.radius**2
    alpha = alpha.clamp(0, 1)  # (F',) already in (0, 1] by selection; guards round-off
    if inp.features.dim() == 2:
        feat = inp.features.t()[:, None, :].expand(C, B, N).reshape(C, B * N)  # (C, B * N)
    else:
        feat = inp.features.reshape(B * N, C).t()  # (C, B * N)
    table = torch.cat([feat, z.reshape(1, B * N)], dim=0)  # (C + 1, B * N) channels and depth
    vals = table.index_select(1, g)  # (C + 1, F')
    lin = slot * P + pix  # (F',) index into the padded (points_per_pixel, P) buffer
    if exportable:
        acc, rest = _composite_unrolled(alpha, vals, lin, pix, P, kpp)
    elif torch.is_grad_enabled() and (alpha.requires_grad or vals.requires_grad):
        acc, rest = _Composite.apply(alpha, vals, lin, pix, P, kpp)
    else:
        acc, rest = _composite(alpha, vals, lin, pix, P, kpp)[:2]
    image = acc[:C] + inp.background[:, None] * rest  # (C, P)
    return RasterOutput(
        image=image.view(C, B, H, W).transpose(0, 1).contiguous(),  # (B, C, H, W)
        alpha=(1 - rest).view(B, 1, H, W),
        depth=acc[C].view(B, 1, H, W),
    )


def _composite(
    alpha: Tensor, vals: Tensor, lin: Tensor, pix: Tensor, num_pixels: int, kpp: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Front-to-back compositing of packed fragments (sorted by pixel, then depth).

    Args:
        alpha: (F,) opacities in [0, 1].
        vals: (D, F) values to composite (channels and depth).
        lin: (F,) slot * P + pixel, the fragment's place in the padded (kpp, P) buffer.
        pix: (F,) pixel id in [0, P).

    Returns:
        acc (D, P) = sum_i alpha_i T_i vals_i, rest (P,) = T after the last slot, and, for the
        backward pass, trans_before (F,) = T_i of each fragment and the (kpp, P) alpha buffer.
    """
    a_buf = alpha.new_zeros(kpp * num_pixels).scatter_(0, lin, alpha).view(kpp, num_pixels)
    trans = torch.cumprod(1 - a_buf, dim=0)  # (kpp, P) transmittance after each slot
    # T_i = transmittance after the previous slot of the same pixel, 1 for the first slot
    prev = (lin - num_pixels).clamp_min(0)
    trans_before = torch.where(lin >= num_pixels, trans.view(-1).index_select(0, prev), 1.0)  # (F,)
    weight = alpha * trans_before  # (F,) alpha_i T_i
    acc = vals.new_zeros(vals.shape[0], num_pixels).index_add_(1, pix, vals * weight)  # (D, P)
    return acc, trans[-1], trans_before, a_buf, weight


class _Composite(torch.autograd.Function):
    """Autograd of :func:`_composite` with a hand-written backward (its backward takes about 2/3
    of the time of autograd through cumprod and the scatters). For a pixel with loss
    L = sum_i alpha_i T_i s_i + T_K g_rest (s_i = <dL/dacc, vals_i>), dL/dalpha_k = T_k (s_k - R_k),
    where R_k, the value of what lies behind slot k, follows R_{K-1} = g_rest,
    R_k = alpha_{k+1} s_{k+1} + (1 - alpha_{k+1}) R_{k+1} (a recursion, so alpha = 1 needs no division)."""

    @staticmethod
    def forward(ctx, alpha, vals, lin, pix, num_pixels, kpp):  # noqa: D102
        acc, rest, trans_before, a_buf, weight = _composite(alpha, vals, lin, pix, num_pixels, kpp)
        ctx.save_for_backward(alpha, vals, lin, pix, trans_before, a_buf, weight)
        ctx.shape = (num_pixels, kpp)
        return acc, rest

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_acc, grad_rest):  # noqa: D102
        alpha, vals, lin, pix, trans_before, a_buf, weight = ctx.saved_tensors
        num_pixels, kpp = ctx.shape
        grad_pix = grad_acc.contiguous().index_select(1, pix)  # (D, F) upstream gradient per fragment
        grad_vals = grad_pix * weight if ctx.needs_input_grad[1] else None
        grad_alpha = None
        if ctx.needs_input_grad[0]:
            s = (grad_pix * vals).sum(0)  # (F,)
            a_s = alpha.new_zeros(kpp * num_pixels).scatter_(0, lin, alpha * s).view(kpp, num_pixels)
            one_minus = 1 - a_buf  # (kpp, P)
            behind = torch.empty_like(a_buf)  # (kpp, P) R_k
            behind[-1] = grad_rest
            for k in range(kpp - 2, -1, -1):
                torch.addcmul(a_s[k + 1], one_minus[k + 1], behind[k + 1], out=behind[k])
            grad_alpha = trans_before * (s - behind.view(-1).index_select(0, lin))
        return grad_alpha, grad_vals, None, None, None, None


def _zeros(like: Tensor, *size: int) -> Tensor:
    """Zeros of ``like``'s dtype and device: in an ONNX graph an Expand of a scalar, never a constant
    tensor of that size (``torch.zeros`` of a static size is written into the file, megabytes at 256²)."""
    return like.new_zeros(()).expand(*size).contiguous()


def _composite_unrolled(
    alpha: Tensor, vals: Tensor, lin: Tensor, pix: Tensor, num_pixels: int, kpp: int
) -> tuple[Tensor, Tensor]:
    """:func:`_composite` (acc (D, P), rest (P,)) in ONNX operators, bit-equal in eager mode on CPU.

    The alphas are scattered into a padded (kpp, P) buffer (zeros on empty slots) and the
    transmittance is the cumulative product written out, accumulated in float64 as CPU ``cumprod``
    does; each fragment's weight alpha_i T_i is read back at its slot, and the weighted values are
    summed into their pixels by ``scatter_add`` (ONNX ScatterElements, reduction add) in fragment
    order, front to back as ``index_add_`` sums them. Only the kept fragments' values are touched
    (no padded (D, kpp, P) value buffer).
    """
    D = vals.shape[0]
    a_buf = _zeros(alpha, kpp * num_pixels).scatter(0, lin, alpha).view(kpp, num_pixels)
    one_minus = (1 - a_buf).double()  # (kpp, P)
    rows = [_zeros(one_minus, num_pixels) + 1.0, one_minus[0]]  # T before slot 0 is 1
    for k in range(1, kpp):
        rows.append(rows[-1] * one_minus[k])
    trans = torch.stack(rows).to(alpha.dtype)  # (kpp + 1, P): T before each slot, then after the last
    weight = alpha * trans[:-1].reshape(-1).gather(0, lin)  # (F,) alpha_i T_i
    acc = _zeros(vals, D, num_pixels).scatter_add(1, pix.expand(D, -1), vals * weight)  # (D, P)
    return acc, trans[-1]


def rasterize_dense_reference(
    points: Tensor,
    features: Tensor,
    world_mat: Tensor,
    K: Tensor,
    image_size: int | Sequence[int],
    radius: float | Tensor,
    points_per_pixel: int = 10,
    background: float | Sequence[float] | Tensor = 1.0,
    near: float = 1e-3,
    valid: Tensor | None = None,
    chunk_pixels: int | None = None,
) -> RasterOutput:
    """Brute-force reference of :func:`rasterize_points`: every point against every pixel.

    For tests and benchmarks only; written for clarity, independently of the fragment pipeline
    (it shares only the input checks and ``models/camera.py``). Per pixel, the distances to all N
    projected points are evaluated without gradient (in chunks of ``chunk_pixels`` pixels, by
    default about 4 M pixel-point pairs a chunk) and the ``points_per_pixel`` covering points of
    smallest depth are picked with ``topk`` (ties broken by point index, as in
    :func:`rasterize_points`); their alphas are then recomputed with gradient and composited by
    an explicit front-to-back loop under plain autograd. Cost O(B * H * W * N) time,
    O(chunk_pixels * N) memory. Same arguments, returns and errors as :func:`rasterize_points`,
    plus ``chunk_pixels``.
    """
    with torch.autocast(device_type=points.device.type, enabled=False):
        inp = _check_inputs(
            points, features, world_mat, K, image_size, radius, points_per_pixel, background, near, valid
        )
        B, N, H, W = inp.batch, inp.num_points, inp.height, inp.width
        C, kpp, dtype = inp.features.shape[-1], points_per_pixel, inp.features.dtype
        cam = world_to_camera(inp.points, inp.world_mat)  # (B, N, 3)
        z, uv = cam[..., 2], project(cam, inp.K)  # (B, N), (B, N, 2)
        keep = z.detach() > near  # no culling at the image border: every pixel is tested below
        if inp.valid is not None:
            keep &= inp.valid
        r = inp.radius if isinstance(inp.radius, Tensor) else torch.full_like(z, inp.radius)  # (B, N)
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        centres = torch.stack([xs, ys], dim=-1).reshape(H * W, 2).to(dtype=dtype, device=z.device) + 0.5
        features = inp.features if inp.features.dim() == 3 else inp.features.expand(B, N, C)
        chunk = chunk_pixels if chunk_pixels is not None else max(1, 2**22 // max(N, 1))

        images, alphas, depths = [], [], []
        for b in range(B):
            with torch.no_grad():
                # rank in depth, ties by index (as rasterize_points), so topk has no ties
                depth_rank = torch.empty_like(z[b]).scatter_(
                    0,
                    torch.argsort(z[b].detach(), stable=True),
                    torch.arange(N, dtype=dtype, device=z.device),
                )
                sel_idx, sel_ok = [], []
                for c0 in range(0, H * W, chunk):
                    cen = centres[c0 : c0 + chunk]  # (Pc, 2)
                    d2 = (cen[:, None, :] - uv[b].detach()[None]).square().sum(-1)  # (Pc, N)
                    covers = (d2 < r[b].detach().square()[None]) & keep[b][None]  # (Pc, N)
                    key = torch.where(covers, depth_rank[None].expand_as(d2), math.inf)
                    k = min(kpp, N)
                    val, idx = torch.topk(key, k, dim=1, largest=False)  # (Pc, k) nearest first
                    sel_idx.append(idx)
                    sel_ok.append(torch.isfinite(val))
                idx = torch.cat(sel_idx)  # (H*W, k)
                ok = torch.cat(sel_ok)  # (H*W, k)
            d2 = (centres[:, None, :] - uv[b][idx]).square().sum(-1)  # (H*W, k)
            r_sel = torch.where(ok, r[b][idx], torch.ones_like(d2))  # (H*W, k), no 0/0 off the disks
            alpha = torch.where(ok, (1 - d2 / r_sel.square()).clamp(0, 1), torch.zeros_like(d2))
            trans = torch.ones(H * W, dtype=dtype, device=z.device)
            image = torch.zeros(H * W, C, dtype=dtype, device=z.device)
            depth = torch.zeros(H * W, dtype=dtype, device=z.device)
            for i in range(idx.shape[1]):  # front to back
                w = alpha[:, i] * trans
                image = image + w[:, None] * features[b][idx[:, i]]
                depth = depth + w * z[b][idx[:, i]]
                trans = trans * (1 - alpha[:, i])
            image = image + trans[:, None] * inp.background
            images.append(image.T.reshape(C, H, W))
            alphas.append((1 - trans).reshape(1, H, W))
            depths.append(depth.reshape(1, H, W))
        return RasterOutput(torch.stack(images), torch.stack(alphas), torch.stack(depths))


class PointRasterizer(nn.Module):
    """Module form of :func:`rasterize_points` holding the render settings; no parameters.

    Args:
        image_size: H = W as an int, or (H, W).
        radius: default disk radius in pixels (global), overridable per call (float or tensor).
        points_per_pixel: depth-nearest points composited per pixel (PointAvatar: 10).
        background: default scalar or per-channel background (1.0 = white, PointAvatar's RGB).
        near: near plane in camera z; points with z <= near are dropped.

    Raises:
        ValueError: on a bad image size, radius, points_per_pixel or near.

    Example:
        >>> raster = PointRasterizer(128, radius=1.5)
        >>> out = raster(points, colours, batch.world_mat, batch.K)  # out.image (B, 3, 128, 128)
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        radius: float = 1.5,
        points_per_pixel: int = 10,
        background: float | Sequence[float] = 1.0,
        near: float = 1e-3,
    ) -> None:
        super().__init__()
        self.image_size = _image_size(image_size)
        if not (float(radius) > 0 and math.isfinite(float(radius))):
            raise ValueError(f"radius must be a positive number of pixels, got {radius!r}")
        if not isinstance(points_per_pixel, int) or points_per_pixel < 1:
            raise ValueError(f"points_per_pixel must be a positive int, got {points_per_pixel!r}")
        if not near > 0:
            raise ValueError(f"near must be a small positive distance, got {near!r}")
        self.radius = float(radius)
        self.points_per_pixel = points_per_pixel
        self.background = background if isinstance(background, (int, float)) else tuple(background)
        self.near = float(near)

    def forward(
        self,
        points: Tensor,
        features: Tensor,
        world_mat: Tensor,
        K: Tensor,
        radius: float | Tensor | None = None,
        background: float | Sequence[float] | Tensor | None = None,
        valid: Tensor | None = None,
    ) -> RasterOutput:
        """Render; see :func:`rasterize_points` for shapes. ``radius``/``background`` override
        the module's defaults for this call; ``valid`` (N,) or (B, N) bool skips inactive points."""
        return rasterize_points(
            points,
            features,
            world_mat,
            K,
            self.image_size,
            self.radius if radius is None else radius,
            self.points_per_pixel,
            self.background if background is None else background,
            self.near,
            valid,
        )

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, radius={self.radius}, points_per_pixel={self.points_per_pixel}, "
            f"background={self.background}, near={self.near}"
        )
