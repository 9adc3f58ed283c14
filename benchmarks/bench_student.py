"""Student versus teacher: canonical forward time on CPU (issue "The student and the distillation stage").

Run ``python -m benchmarks.bench_student [--points 10000 100000] [--threads 2] [--repeats 3]``.
For each cloud size it times, in one run, the canonical forward of the default teacher (geometry
MLP with its SDF-gradient normals, explicit path, + deformer) and of the default student (both
branches, fusion, heads) on the same points of a sphere, under ``torch.no_grad``, and prints the
ratio. The student's kNN/sampling graph is per-subject preprocessing: built once, timed apart.
Median wall-clock seconds after one warm-up call. A last line prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from models.student import Student
from models.teacher import PointAvatarTeacher, fibonacci_sphere


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = PointAvatarTeacher().eval()
    student = Student().eval()
    results = []
    print(f"{'N':>8} {'teacher s':>10} {'student s':>10} {'ratio':>7} {'graph s':>8}  (threads={args.threads})")
    for n in args.points:
        points = fibonacci_sphere(n, 0.5)
        start = time.perf_counter()
        graph = student.build_graph(points)
        graph_s = time.perf_counter() - start
        with torch.no_grad():
            t = median_seconds(lambda p=points: teacher.canonical(p, method="explicit"), args.repeats)
            s = median_seconds(lambda p=points, g=graph: student.canonical(p, g), args.repeats)
        results.append({"num_points": n, "teacher_s": t, "student_s": s, "ratio": s / t, "graph_s": graph_s})
        print(f"{n:>8} {t:>10.3f} {s:>10.3f} {s / t:>7.3f} {graph_s:>8.2f}", flush=True)
    print(json.dumps(results))
    return {"results": results}


if __name__ == "__main__":
    main()
