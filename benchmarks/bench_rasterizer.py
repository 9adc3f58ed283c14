"""Speed and memory of the point rasterizer (``models/rasterizer.py``).

Run ``python -m benchmarks.bench_rasterizer`` (``--help`` for options). For each configuration
(number of points, image size) it times forward + backward of

- ``ours``: :func:`models.rasterizer.rasterize_points`;
- ``naive``: the straightforward pure-torch version DESIGN.md measures against (below: sort the
  fragments by pixel then depth, exclusive log-cumsum of log(1 - alpha) per pixel, index_add);
- ``dense``: :func:`models.rasterizer.rasterize_dense_reference` (every point against every
  pixel), only where B * H * W * N is small enough (``--dense-max-pairs``).

Scene: one camera 0.5 m in front of N points spread over an ellipsoid the size of a head (both
sides visible in projection, so pixels hold many layers), RGB channels, points_per_pixel 10.

Time: median wall-clock of forward + backward (loss = sum of the three outputs) after warm-up,
with ``--threads`` torch threads (2 by default, the size of the development machine).
Memory: the growth of the process's peak resident set size (``resource.getrusage`` ru_maxrss)
over one forward + backward, measured in a fresh subprocess per (method, configuration), so the
figure is the extra host memory the call needed at its peak (tensors, autograd graph and
allocator), not counting inputs already allocated. Linux reports ru_maxrss in KiB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from models.camera import project, world_to_camera
from models.rasterizer import RasterOutput, rasterize_dense_reference, rasterize_points

CONFIGS = [  # (points, image side, radius in pixels): radius chosen for a closed surface look
    (10_000, 128, 2.0),
    (10_000, 256, 4.0),
    (100_000, 128, 1.0),
    (100_000, 256, 2.0),
]


def rasterize_naive(
    points: torch.Tensor,
    features: torch.Tensor,
    world_mat: torch.Tensor,
    K: torch.Tensor,
    image_size: int | tuple[int, int],
    radius: float,
    points_per_pixel: int = 10,
    background: float = 1.0,
    near: float = 1e-3,
) -> RasterOutput:
    """The straightforward pure-torch rasterizer, as the comparison of DESIGN.md describes it.

    Same rule and outputs as :func:`rasterize_points` (global float radius only): all window
    candidates carry autograd, fragments are ordered by one sort on a combined (pixel, depth)
    key, transmittance is exp of an exclusive cumulative sum of log(1 - alpha) per pixel, and
    channels are accumulated with index_add on a (pixels, C) buffer.
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    cam = world_to_camera(points, world_mat)  # (B, N, 3)
    uv, z = project(cam, K), cam[..., 2]  # (B, N, 2), (B, N)
    B, N = z.shape
    C = features.shape[-1]
    feats = features.expand(B, N, C) if features.dim() == 2 else features  # (B, N, C)
    side = math.ceil(2 * radius)
    start = torch.floor(uv.detach() - radius - 0.5).long() + 1  # (B, N, 2)
    offs = torch.arange(side)
    px = start[..., 0, None, None] + offs  # (B, N, 1, S)
    py = start[..., 1, None, None] + offs[:, None]  # (B, N, S, 1)
    d2 = (px + 0.5 - uv[..., 0, None, None]) ** 2 + (py + 0.5 - uv[..., 1, None, None]) ** 2
    alpha = 1 - d2 / radius**2  # (B, N, S, S)
    ok = (alpha > 0) & (px >= 0) & (px < W) & (py >= 0) & (py < H) & (z > near)[..., None, None]
    b, n, iy, ix = ok.nonzero(as_tuple=True)  # (F,) fragments
    a, zf = alpha[b, n, iy, ix], z[b, n]
    pix = (b * H + start[b, n, 1] + iy) * W + start[b, n, 0] + ix  # (F,) global pixel id
    depth_rank = torch.argsort(torch.argsort(zf.detach()))  # (F,) global depth rank
    order = torch.argsort(pix * pix.shape[0] + depth_rank)  # pixel first, depth second
    pix, a, zf, b, n = pix[order], a[order], zf[order], b[order], n[order]
    P = B * H * W
    counts = torch.bincount(pix, minlength=P)
    rank = torch.arange(pix.shape[0]) - (counts.cumsum(0) - counts)[pix]
    keep = rank < points_per_pixel
    pix, a, zf, b, n = pix[keep], a[keep], zf[keep], b[keep], n[keep]
    log_t = torch.log1p(-a.clamp(max=1 - 1e-6))  # (F,) log(1 - alpha)
    csum = torch.cumsum(log_t, 0)
    counts = torch.bincount(pix, minlength=P)
    first = (counts.cumsum(0) - counts)[pix]  # (F,) index of the pixel's first fragment
    excl = csum - log_t - (csum[first] - log_t[first])  # exclusive per-pixel log-cumsum
    w = a * torch.exp(excl)  # (F,) alpha_i T_i
    image = torch.zeros(P, C).index_add(0, pix, w[:, None] * feats[b, n])  # (P, C)
    acc_alpha = 1 - torch.exp(torch.zeros(P).index_add(0, pix, log_t))  # (P,)
    image = image + (1 - acc_alpha)[:, None] * background
    depth = torch.zeros(P).index_add(0, pix, w * zf)
    return RasterOutput(
        image=image.view(B, H, W, C).permute(0, 3, 1, 2),
        alpha=acc_alpha.view(B, 1, H, W),
        depth=depth.view(B, 1, H, W),
    )


METHODS = {"ours": rasterize_points, "naive": rasterize_naive, "dense": rasterize_dense_reference}


def make_scene(num_points: int, image_side: int, seed: int = 0):
    """Points on a head-sized ellipsoid 0.5 m in front of one camera; RGB features.

    Returns:
        points (N, 3), features (N, 3), world_mat (1, 3, 4), K (1, 3, 3), all float32.
    """
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(num_points, 3, generator=gen)
    points = dirs / dirs.norm(dim=1, keepdim=True) * torch.tensor([0.09, 0.12, 0.10])  # metres
    features = torch.rand(num_points, 3, generator=gen)
    world_mat = torch.eye(4)[:3].unsqueeze(0).clone()
    world_mat[0, 2, 3] = 0.5
    f = 1.6 * image_side  # the head fills about 3/4 of the image height
    K = torch.tensor([[f, 0.0, image_side / 2], [0.0, f, image_side / 2], [0.0, 0.0, 1.0]]).unsqueeze(0)
    return points, features, world_mat, K


def _step(method: str, scene, image_side: int, radius: float) -> None:
    points, features, world_mat, K = scene
    points = points.detach().requires_grad_()
    features = features.detach().requires_grad_()
    out = METHODS[method](points, features, world_mat, K, image_side, radius, 10, 1.0)
    (out.image.sum() + out.alpha.sum() + out.depth.sum()).backward()


def measure_one(method: str, num_points: int, image_side: int, radius: float, repeats: int) -> dict:
    """Peak-RSS growth of the first forward + backward, then the median time of ``repeats``."""
    _step(method, make_scene(100, 16), 16, radius)  # lazy initialisation outside the measurement
    scene = make_scene(num_points, image_side)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _step(method, scene, image_side, radius)
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    _step(method, scene, image_side, radius)  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        _step(method, scene, image_side, radius)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "ms": 1e3 * statistics.median(wall),
        "ms_min": 1e3 * min(wall),
        "cpu_ms": 1e3 * statistics.median(cpu),
        "peak_mib": peak_mib,
    }


def _run_subprocess(method: str, n: int, side: int, radius: float, repeats: int, threads: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_rasterizer",
        "--one",
        method,
        str(n),
        str(side),
        str(radius),
    ]
    cmd += ["--repeats", str(repeats), "--threads", str(threads)]
    root = Path(__file__).resolve().parents[1]  # the repository root, where `-m benchmarks...` resolves
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=root)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per configuration")
    parser.add_argument(
        "--dense-max-pairs", type=float, default=2e8, help="run the dense reference up to B*H*W*N pairs"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[f"{n}:{side}:{r:g}" for n, side, r in CONFIGS],
        help="configurations POINTS:SIDE:RADIUS (default: the four of the issue)",
    )
    parser.add_argument("--one", nargs=4, metavar=("METHOD", "N", "SIDE", "RADIUS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        method, n, side, radius = args.one
        print(json.dumps(measure_one(method, int(n), int(side), float(radius), args.repeats)))
        return

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load average {load}")
    print("points_per_pixel 10, RGB channels, forward + backward of image + alpha + depth")
    print("wall: median (min) wall-clock ms; cpu: median process CPU ms (all threads);")
    print("MiB: peak RSS growth over one forward + backward; '-': dense reference skipped\n")
    columns = [("ours wall", 15), ("cpu", 7), ("naive wall", 15), ("cpu", 7), ("dense wall", 13)]
    columns += [("ours MiB", 9), ("naive MiB", 10), ("dense MiB", 10)]
    header = f"{'config':<22}" + "".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for spec in args.configs:
        n, side, radius = (float(x) for x in spec.split(":"))
        n, side = int(n), int(side)
        row = {}
        for method in METHODS:
            if method == "dense" and n * side * side > args.dense_max_pairs:
                row[method] = None
                continue
            repeats = 3 if method == "dense" else args.repeats
            row[method] = _run_subprocess(method, n, side, radius, repeats, args.threads)
        cells = []
        for method, key in [("ours", "ms"), ("ours", "cpu_ms"), ("naive", "ms"), ("naive", "cpu_ms")]:
            cells.append(_cell(row[method], key))
        cells += [_cell(row["dense"], "ms", "{:.0f}")]
        cells += [_cell(row[method], "peak_mib", "{:.0f}") for method in METHODS]
        line = f"{f'{n // 1000}k pts {side}^2 r={radius:g}':<22}"
        print(line + "".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns)))
        for method, r in row.items():
            if r is not None and "error" in r:
                print(f"  {method}: {r['error']}")


def _cell(result: dict | None, key: str, fmt: str = "{:.1f}") -> str:
    if result is None:
        return "-"
    if "error" in result:
        return "error"
    if key == "ms":
        return f"{fmt.format(result['ms'])} ({fmt.format(result['ms_min'])})"
    return fmt.format(result[key])


if __name__ == "__main__":
    main()
