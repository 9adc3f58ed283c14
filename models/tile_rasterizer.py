"""The tile rasterizer: the point compositing rule of :mod:`models.rasterizer` with static-shape work.

Same rule as :func:`models.rasterizer.rasterize_points` (PointAvatar / PyTorch3D): a point is a disk
of radius ``r`` pixels with opacity alpha = 1 - d^2 / r^2, and per pixel the ``points_per_pixel``
covering points nearest in camera z are composited front to back. What changes is how the
candidates of a pixel are found, so that the work is dense tensors of fixed shape: one TopK over a
fixed-size row per pixel and one batched matrix product, instead of the fragment pipeline's
data-dependent NonZero, sorts of 10^5-10^6 fragments and scatters over every channel (which ONNX
Runtime runs single-threaded, several times slower than eager PyTorch).

Algorithm (``tile_size`` T, ``tile_capacity`` L, ``points_per_pixel`` K):

1. project (``models/camera.py``) and order the points by depth (ties by index), as the fragment
   rasterizer;
2. every point lists the T x T tiles its disk can touch (the tiles whose pixel-centre rectangle
   is nearer than r to the disk's centre); one sort of these (tile, depth rank) entries gives
   every tile its overlapping points nearest first, of which the first L are its *candidates*,
   a fixed (tiles, L) table;
3. per pixel, the candidates of its tile that cover it (d^2 < r^2) are keyed by their place in
   the list; TopK picks the first K: the K depth-nearest covering points;
4. their alphas (recomputed with gradient) and the unrolled front-to-back product give each one's
   weight alpha_i T_i, written into a dense (pixels, L) weight row per tile;
5. one batched matrix product (tiles, T^2, L) x (tiles, L, C + 1) composites channels and depth.

**Exactness.** The result equals :func:`~models.rasterizer.rasterize_points` (to float round-off:
the sums run in another order; 1e-6 in float32 in tests) whenever, for every pixel, its K nearest
covering points are among its tile's first L overlapping points. A tile overlapped by more than L
points drops the deepest ones: a pixel whose K-th covering point lies deeper renders fewer layers
(more background shows through), and a pixel whose covering points all lie deeper than the first
L of its tile (a crowded tile, a sparse pixel) loses them all: a hole. :func:`required_tile_capacity`
returns the smallest L that keeps a given set of frames exact; the export picks L from the frames it
is planned on (a margin for unseen poses) and reports it.

Everything here is pure torch and exports to ONNX (``torch.onnx.export(..., dynamo=False)``,
opset >= 16: ScatterElements must sum repeated indices) with the number of points dynamic: the only sorts are one of the N depths per camera
and one of the tile entries (TopK under export; ONNX TopK keeps the lower index first on ties),
and TopK per pixel over L values. Gradients reach channels, positions and radii through the alphas
of the kept candidates by plain autograd, as in the fragment rasterizer.

Cost: O(N log N + E log E) for E tile entries (about N (2r / T + 2)^2), O(H W L) for the coverage
test and the per-pixel TopK, and O(H W L (C + 1)) multiply-adds for the compositing product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from models.rasterizer import RasterOutput, _check_inputs, _Inputs, _project, _zeros

__all__ = ["default_tile_size", "rasterize_points_tiled", "required_tile_capacity"]


def default_tile_size(height: int, width: int) -> int:
    """The tile side (pixels) used when none is given: 8 for images of 128 pixels a side and more, else 4.

    Smaller tiles need fewer candidates per pixel (the dense work is pixels x capacity) but have more
    entries to sort and more rows to pick from; of 1, 2, 4, 8 and 16, these were the fastest in ONNX
    Runtime (2 threads) on the demo avatar and on 10k points at 64 to 256 pixels (docs/device.md).
    """
    return 8 if min(height, width) >= 128 else 4


def _sort_last(x: Tensor) -> tuple[Tensor, Tensor]:
    """Stable ascending sort along the last dimension; ONNX TopK (stable by its spec) under export."""
    if torch.onnx.is_in_onnx_export():
        return torch.topk(x, x.shape[-1], dim=-1, largest=False, sorted=True)
    return torch.sort(x, dim=-1, stable=True)


def _check_tiles(tile_size: int, tile_capacity: int) -> None:
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int (pixels), got {tile_size!r}")
    if not isinstance(tile_capacity, int) or tile_capacity < 1:
        raise ValueError(f"tile_capacity must be a positive int (candidates per tile), got {tile_capacity!r}")


def _tile_candidates(inp: _Inputs, near: float, tile: int, capacity: int):
    """Steps 1-2: each tile's ``capacity`` depth-nearest overlapping points.

    Returns (z (B, N), uv (B, N, 2) with the points that cannot show (culled, ``valid`` False) at 0,
    cand (B * tiles, L) flat point ids into B * N, cvalid (B * tiles, L) bool, count (B * tiles,)
    overlapping points per tile, (TY, TX) tiles a side, keep (B, N) the points that can show).
    """
    B, N, H, W = inp.batch, inp.num_points, inp.height, inp.width
    TY, TX = -(-H // tile), -(-W // tile)
    NT = TY * TX
    z, uv, keep = _project(inp, near)
    device = z.device
    with torch.no_grad():
        r = inp.radius.detach() if isinstance(inp.radius, Tensor) else torch.full_like(z, inp.radius)
        order = _sort_last(torch.where(keep, z.detach(), math.inf))[1]  # (B, N) point ids, nearest first
        u, v, r, kp = (t.gather(1, order) for t in (uv[..., 0].detach(), uv[..., 1].detach(), r, keep))
        # pixels whose centre can be inside the disk: x + 0.5 in (u - r, u + r), likewise y
        first_x = (torch.floor(u - r - 0.5) + 1).clamp(0, W - 1)
        last_x = (torch.ceil(u + r - 0.5) - 1).clamp(0, W - 1)
        first_y = (torch.floor(v - r - 0.5) + 1).clamp(0, H - 1)
        last_y = (torch.ceil(v + r - 0.5) - 1).clamp(0, H - 1)
        tx0, tx1 = (torch.div(t, tile, rounding_mode="floor").long() for t in (first_x, last_x))
        ty0, ty1 = (torch.div(t, tile, rounding_mode="floor").long() for t in (first_y, last_y))
        span = (torch.maximum(tx1 - tx0, ty1 - ty0) + 1).masked_fill(~kp, 1)
        side = torch.cat([span.reshape(-1), span.new_ones(1)]).max()  # () tiles a side of every window
        offs = torch.arange(side, device=device)  # dynamic under export, no host read of the radius
        etx, ety = tx0[..., None] + offs, ty0[..., None] + offs  # (B, N, S) window tiles
        # the disk against each tile's pixel-centre rectangle: nearest point of the rectangle
        x0, y0 = etx.to(u.dtype) * tile + 0.5, ety.to(u.dtype) * tile + 0.5
        gx = torch.minimum(torch.maximum(u[..., None], x0), x0 + (tile - 1)) - u[..., None]
        gy = torch.minimum(torch.maximum(v[..., None], y0), y0 + (tile - 1)) - v[..., None]
        near_enough = gy.square()[..., :, None] + gx.square()[..., None, :] < r.square()[..., None, None]
        inside = (ety <= ty1[..., None])[..., :, None] & (etx <= tx1[..., None])[..., None, :]
        ok = near_enough & inside & kp[..., None, None]  # (B, N, S, S)
        cams = torch.arange(B, device=device).view(B, 1, 1, 1)
        tile_id = torch.where(ok, (cams * TY + ety[..., :, None]) * TX + etx[..., None, :], B * NT)  # spare last
        rank = torch.arange(N, device=device).view(1, N, 1, 1)
        key = _sort_last((tile_id * N + rank).reshape(-1))[0]  # by tile, then depth
        count = _zeros(key, B * NT + 1).scatter_add(0, tile_id.reshape(-1), torch.ones_like(key))[: B * NT]  # (B * NT,)
        start = torch.cumsum(count, 0) - count
        slots = torch.arange(capacity, device=device)
        cvalid = slots < count[:, None]  # (B * NT, L)
        pos = (start[:, None] + slots).clamp_max(key.shape[0] - 1)
        entry = key.index_select(0, pos.reshape(-1))  # (B * NT * L,)
        tile_of = torch.div(entry, N, rounding_mode="floor")
        cam_of = torch.div(tile_of, NT, rounding_mode="floor").clamp_max(B - 1)
        flat_rank = cam_of * N + (entry - tile_of * N)
        cand = cam_of * N + order.reshape(-1).index_select(0, flat_rank)  # flat point ids into B * N
    # an empty slot points at some entry, possibly a culled point's: never let its values (NaN, inf
    # behind the camera) reach the sums or their gradients
    uv = torch.where(keep[..., None], uv, 0.0)
    return z, uv, cand.view(B * NT, capacity), cvalid, count, (TY, TX), keep


def _select(inp: _Inputs, near: float, tile: int, capacity: int, kpp: int):
    """Steps 1-3. Returns z, uv, cand, cvalid, count, the tile grid, the candidates' pixel centres
    and d^2 / r^2 (B * tiles, T, T, L), and the per-pixel TopK (positions ``ki`` (B * tiles, T^2, k),
    ``kval`` valid)."""
    B, N = inp.batch, inp.num_points
    z, uv, cand, cvalid, count, (TY, TX), keep = _tile_candidates(inp, near, tile, capacity)
    NT, dtype, device = TY * TX, uv.dtype, uv.device
    flat = cand.reshape(-1)
    with torch.no_grad():
        u = uv[..., 0].detach().reshape(B * N).index_select(0, flat)
        v = uv[..., 1].detach().reshape(B * N).index_select(0, flat)
        # r^2 as the fragment rasterizer squares it for its coverage test (a float radius: in the tensor dtype)
        r = inp.radius.detach().reshape(B * N).index_select(0, flat) if isinstance(inp.radius, Tensor) else \
            torch.full_like(v, inp.radius)
        r2 = torch.where(cvalid.reshape(-1), r.square(), -1.0)  # an empty slot covers nothing
        u, v, r2 = (t.view(B * NT, 1, 1, capacity) for t in (u, v, r2))
        t_idx = torch.arange(NT, device=device)
        t_row = torch.div(t_idx, TX, rounding_mode="floor")
        offs = torch.arange(tile, device=device)
        cx = ((t_idx - t_row * TX)[:, None] * tile + offs).to(dtype).repeat(B, 1) + 0.5  # (B * NT, T)
        cy = (t_row[:, None] * tile + offs).to(dtype).repeat(B, 1) + 0.5
        d2 = (u - cx[:, None, :, None]).square() + (v - cy[:, :, None, None]).square()  # (B * NT, T, T, L)
        # covering: d^2 < r^2 (False for NaN); TopK then takes the first K covering candidates, nearest first
        key = (~(d2 < r2)).to(dtype) * capacity + torch.arange(capacity, device=device).to(dtype)
        k = min(kpp, capacity)
        kv, ki = torch.topk(key.view(B * NT, tile * tile, capacity), k, dim=-1, largest=False, sorted=True)
        kval = kv < capacity  # (B * NT, T^2, k) a covering candidate in this slot
    # d^2 / r^2 as the fragment rasterizer divides for alpha (a float radius: by the Python float r^2)
    ratio = d2 / (r2 if isinstance(inp.radius, Tensor) else inp.radius**2)
    return z, uv, cand, cvalid, count, (TY, TX), (cx, cy), ratio, ki, kval, keep


def rasterize_points_tiled(
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
    tile_size: int | None = None,
    tile_capacity: int = 64,
) -> RasterOutput:
    """Alpha-composite point disks with fixed-shape tile work (module docstring); the rule of
    :func:`models.rasterizer.rasterize_points`, exact while no tile needs more than
    ``tile_capacity`` candidates (:func:`required_tile_capacity`).

    Args:
        points, features, world_mat, K, image_size, radius, points_per_pixel, background, near,
            valid: as :func:`models.rasterizer.rasterize_points`.
        tile_size: tile side in pixels (default :func:`default_tile_size`); H and W need not be multiples.
        tile_capacity: L, the depth-nearest overlapping points kept per tile (default 64).

    Returns:
        :class:`~models.rasterizer.RasterOutput` (image (B, C, H, W), alpha and depth (B, 1, H, W)),
        in the promoted dtype of the inputs (float32 at least).

    Raises:
        ValueError: as :func:`~models.rasterizer.rasterize_points`, and for a tile size or capacity
            that is not a positive int.
    """
    with torch.autocast(device_type=points.device.type, enabled=False):
        inp = _check_inputs(
            points, features, world_mat, K, image_size, radius, points_per_pixel, background, near, valid
        )
        tile_size = default_tile_size(inp.height, inp.width) if tile_size is None else tile_size
        _check_tiles(tile_size, tile_capacity)
        return _rasterize_tiled(inp, points_per_pixel, near, tile_size, tile_capacity)


def _rasterize_tiled(inp: _Inputs, kpp: int, near: float, tile: int, capacity: int) -> RasterOutput:
    """Steps 1-5 of the module docstring."""
    B, N, H, W, C = inp.batch, inp.num_points, inp.height, inp.width, inp.features.shape[-1]
    if N == 0:  # nothing to draw (a graph is never exported without points)
        empty = inp.features.new_zeros(B, 1, H, W)
        return RasterOutput(inp.background.view(1, C, 1, 1).expand(B, C, H, W).contiguous(), empty, empty.clone())
    z, uv, cand, _, _, (TY, TX), (cx, cy), ratio, ki, kval, keep = _select(inp, near, tile, capacity, kpp)
    NT, TT, k = TY * TX, tile * tile, ki.shape[-1]
    rows = torch.arange(B * NT * TT, device=ki.device)[:, None] * capacity  # (a constant of the graph)
    at = (rows + ki.reshape(B * NT * TT, k)).reshape(-1)  # (B * NT * T^2 * k,) into the (pixel, candidate) grid

    # ---- 4: alphas of the kept candidates, front-to-back weights -------------------------------
    kept = kval.reshape(-1)
    if torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (inp.points, inp.radius, inp.world_mat, inp.K)
    ):
        # recompute d^2 and r^2 with gradient (the same float operations as the selection's)
        point = cand.reshape(B * NT, 1, capacity).expand(B * NT, TT, capacity).reshape(-1).index_select(0, at)
        u_k = uv[..., 0].reshape(B * N).index_select(0, point)
        v_k = uv[..., 1].reshape(B * N).index_select(0, point)
        cx_k = cx[:, None, :].expand(B * NT, tile, tile).reshape(B * NT * TT, 1).expand(-1, k).reshape(-1)
        cy_k = cy[:, :, None].expand(B * NT, tile, tile).reshape(B * NT * TT, 1).expand(-1, k).reshape(-1)
        d2_k = (u_k - cx_k).square() + (v_k - cy_k).square()
        if isinstance(inp.radius, Tensor):  # no 0/0 in the unused slots (nor in their gradient)
            ratio_k = d2_k / torch.where(kept, inp.radius.reshape(B * N).index_select(0, point).square(), 1.0)
        else:
            ratio_k = d2_k / inp.radius**2
    else:
        ratio_k = ratio.reshape(-1).index_select(0, at)  # the same division, done for every candidate
    alpha = torch.where(kept, (1 - ratio_k).clamp(0, 1), 0.0).view(B * NT * TT, k)
    # T after each slot, the product in float64 as the fragment rasterizer's cumprod; T before slot 0 is 1,
    # so its weight is its alpha (no constant of ones in the graph)
    one_minus = (1 - alpha).double().unbind(1)  # k columns (one Split in the graph)
    trans = [one_minus[0]]
    for i in range(1, k):
        trans.append(trans[-1] * one_minus[i])
    if k > 1:
        w = torch.cat([alpha[:, :1], alpha[:, 1:] * torch.stack(trans[:-1], 1).to(alpha.dtype)], 1)  # alpha_i T_i
    else:
        w = alpha
    weight = _zeros(alpha, B * NT * TT * capacity).scatter(0, at, w.reshape(-1)).view(B * NT, TT, capacity)
    rest = trans[-1].to(alpha.dtype)  # (pixels,) T after the last slot

    # ---- 5: composite channels and depth by one batched product -------------------------------
    feat = inp.features if inp.features.dim() == 3 else inp.features.expand(B, N, C)
    table = torch.where(keep[..., None], torch.cat([feat, z[..., None]], -1), 0.0).reshape(B * N, C + 1)
    acc = torch.bmm(weight, table.index_select(0, cand.reshape(-1)).view(B * NT, capacity, C + 1))
    hp, wp = TY * tile, TX * tile  # the tile grid's padded size
    acc = acc.view(B, TY, TX, tile, tile * (C + 1)).transpose(2, 3).reshape(B, hp * wp, C + 1).transpose(1, 2)
    acc = acc.reshape(B, C + 1, hp, wp)[:, :, :H, :W]
    rest = rest.view(B, TY, TX, tile, tile).transpose(2, 3).reshape(B, 1, hp, wp)[:, :, :H, :W]
    image = acc[:, :C] + inp.background.view(1, C, 1, 1) * rest
    return RasterOutput(image=image.contiguous(), alpha=1 - rest, depth=acc[:, C:].contiguous())


@torch.no_grad()
def required_tile_capacity(
    points: Tensor,
    world_mat: Tensor,
    K: Tensor,
    image_size: int | Sequence[int],
    radius: float | Tensor,
    points_per_pixel: int = 10,
    near: float = 1e-3,
    valid: Tensor | None = None,
    *,
    tile_size: int | None = None,
) -> tuple[int, int]:
    """The smallest ``tile_capacity`` with which :func:`rasterize_points_tiled` renders these frames
    exactly, and the largest number of points overlapping one tile.

    Exact means every pixel's ``points_per_pixel`` nearest covering points are among its tile's
    first L candidates; the first value is 1 + the deepest such list position over all pixels of
    all B cameras (1 when nothing covers any pixel). Arguments as :func:`rasterize_points_tiled`
    (no channels needed).

    Returns:
        (required capacity, largest tile overlap count), Python ints.

    Raises:
        ValueError: as :func:`rasterize_points_tiled`.
    """
    features = points.new_zeros(*points.shape[:-1], 1)
    inp = _check_inputs(points, features, world_mat, K, image_size, radius, points_per_pixel, 0.0, near, valid)
    tile_size = default_tile_size(inp.height, inp.width) if tile_size is None else tile_size
    _check_tiles(tile_size, 1)
    if inp.num_points == 0:
        return 1, 0
    count = _tile_candidates(inp, near, tile_size, 1)[4]
    most = int(count.max()) if count.numel() else 0
    if most == 0:
        return 1, 0
    _, _, _, _, _, _, (cx, cy), _, ki, kval, _ = _select(inp, near, tile_size, most, points_per_pixel)
    inside = (cy[:, :, None] < inp.height) & (cx[:, None, :] < inp.width)  # not the padding of edge tiles
    kval = kval & inside.reshape(kval.shape[0], -1, 1)
    deepest = int(torch.where(kval, ki, -1).max())
    return max(1, deepest + 1), most
