"""Speed of the kNN of ``models/ops.py`` per backend.

Run ``python -m benchmarks.bench_ops`` (``--help`` for options). For each cloud size (10k and
100k points by default: the canonical cloud of a grown teacher) and each available backend it
times ``knn(x, x, k)`` on one cloud of uniform random points in the unit cube (k = 16, the
student's neighbourhood), i.e. the per-subject preprocessing the student relies on.

Time: median wall-clock seconds over ``--repeats`` runs after one warm-up call on a small cloud,
with ``--threads`` torch threads (2 by default, the size of the development machine). By default
clouds up to 20k points are timed 3 times and larger ones once (the torch backend's brute-force
kNN at 100k points took 1-2 minutes on 2 busy CPU cores here, against 2.5 s for the KD-tree).
A last line prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from models import ops


def time_knn(num_points: int, k: int, backend: str, repeats: int, device: torch.device) -> float:
    """Median seconds of ``ops.knn(x, x, k)`` on ``num_points`` random points."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(num_points, 3, generator=gen).to(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        index, _ = ops.knn(x, x, k, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        assert index.shape == (num_points, k)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the kNN time per backend and cloud size; returns the rows it printed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="points per cloud")
    parser.add_argument("--k", type=int, default=16, help="neighbours per point")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per case (default 3, or 1 above 20k points)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (the cluster backend needs a CUDA build of it)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = args.backends or ops.available_backends()
    for name in backends:
        ops.get_backend(name)  # one-line error for an unknown or unavailable backend
    rows = []
    print(f"knn(x, x, k={args.k}) on {device} with {args.threads} threads; median seconds")
    print(f"{'points':>8}  {'backend':<8}  {'seconds':>9}")
    for name in backends:
        ops.knn(
            torch.rand(1000, 3, device=device), torch.rand(1000, 3, device=device), args.k, backend=name
        )  # warm-up
        for n in args.sizes:
            repeats = args.repeats or (3 if n <= 20_000 else 1)
            seconds = time_knn(n, args.k, name, repeats, device)
            rows.append({"points": n, "k": args.k, "backend": name, "seconds": seconds, "repeats": repeats})
            print(f"{n:>8}  {name:<8}  {seconds:>9.3f}", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
