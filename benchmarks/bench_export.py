"""Frames per second of the exported GAR per-frame path (ONNX Runtime) against the teacher's (PyTorch).

Run ``python -m benchmarks.bench_export [--points 10000] [--image-size 128] [--threads 2] [--frames 8]
[--repeats 3] [--run-dir RUN]``. In one run it times, per frame (B = 1), on the same cameras and
the same number of points:

- ``export_ort``: the ONNX graph of :mod:`lightning_modules.export` (deformation, rasterization
  at the generator's input scales with the tile rasterizer planned as the export plans it (on the
  run's frames; with random weights, on the timed frames), EMA generator; student outputs baked in)
  in ONNX Runtime on the CPU with
  ``intra_op_num_threads = --threads`` (and one inter-op thread);
- ``teacher_torch``: the teacher's per-frame path in PyTorch with ``--threads`` threads:
  deformation, shading of the camera-space normals and rasterization of the colours from its
  cached canonical outputs (what ``ms_per_frame/teacher`` of the distillation run times);
- ``gar_torch``: the whole frame of ``export_ort`` (same cached student outputs, same EMA
  generator), generator included, in eager PyTorch with ``--threads`` threads and the GAR stage's
  own rasterizer (:func:`models.rasterizer.rasterize_points`): how fast our own PyTorch code runs
  the frame the graph exports;
- ``generator_ort``: the generator alone in ONNX Runtime (its rasterized inputs precomputed),
  the part of ``export_ort`` that no rasterizer work can remove.

and prints frames per second, the ratio export_ort / teacher_torch and, last, a JSON line.

Models: with ``--run-dir`` the GAR run's own student outputs and EMA generator (its cloud, image
size and cameras); by default, where no real run exists, models at the default sizes of
experiments/distill.yaml (student) and experiments/gar.yaml (generator) with random weights, on
``--points`` points of a sphere of radius 0.5 (the teacher's canonical head size) splatted with
the teacher's radius rule for that many points (0.3 * 0.75^log2(N / 100), what its growth
schedule reaches), seen by ``--frames`` ring cameras at 2.2 units, 30 degree field of view (the
generated datasets' cameras; the head fills about the frame as in a tracked crop). Speed does
not depend on training, only on the sizes, the number of points and the disk radius in pixels.
The teacher is the default PointAvatar-sized teacher on the same points, with the same radius.

Timing: median over ``--repeats`` passes over the frames of the mean seconds per frame, after
one warm-up pass. The development machine is shared by other jobs, so absolute figures vary
with its load; the ratio, measured in one run, is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from datamodules.mesh_views import ring_cameras
from lightning_modules.export import (
    OPSET,
    export_graph,
    frame_graph,
    load_datamodule,
    load_gar_module,
    planning_frames,
)
from models.rasterizer import rasterize_points
from models.renderer import GARFrame, GARGenerator, PointFrame
from models.student import Student
from models.teacher import PointAvatarTeacher, fibonacci_sphere

#: Goal of the issue: frames per second of the exported path on 2 threads at 128 x 128.
GOAL_FPS = 30.0


def teacher_radius(num_points: int) -> float:
    """The teacher's splat radius (canonical units) once its cloud has ``num_points`` points."""
    return 0.3 * 0.75 ** math.log2(num_points / 100.0)


def _gar_sizes() -> dict:
    """Generator sizes of experiments/gar.yaml (those it leaves to the GARModule defaults included)."""
    return {"z_dim": 16, "num_scales": 3, "base_channels": 32, "mapping_layers": 2, "residual": True}


def _student_sizes() -> dict:
    """Student sizes of experiments/distill.yaml."""
    return {
        "k": 16, "decimation": 4, "randla_channels": (8, 16), "gcn_channels": (16, 16),
        "gcn_global_channels": 32, "fusion_channels": (32,), "latent_dim": 32,
    }


def random_setup(num_points: int, image_size: int, num_frames: int, expression_dim: int = 16, seed: int = 0):
    """Default-size models with random weights on ``num_points`` sphere points, and ring cameras.

    Returns:
        (GARFrame with the export-friendly rasterizer, z (z_dim,), teacher frame callable (expression, world_mat, K) -> image,
        frames: list of (expression (1, E), world_mat (1, 3, 4), K (1, 3, 3))).
    """
    torch.manual_seed(seed)
    points = fibonacci_sphere(num_points, 0.5)  # (N, 3)
    radius = teacher_radius(num_points)
    student = Student(expression_dim=expression_dim, **_student_sizes()).eval()
    student.set_canonical(points, radius=radius)
    sizes = _gar_sizes()
    generator = GARGenerator(student.latent_dim, **sizes).eval()
    if generator.residual:  # a trained residual generator: to_rgb off zero (the speed is the same)
        with torch.no_grad():
            generator.to_rgb.weight.normal_(0.0, 0.1)
    world_mats, Ks = ring_cameras(num_frames, 2.2, 10.0, 30.0, image_size)
    expressions = 0.5 * torch.randn(num_frames, expression_dim)
    frames = [(expressions[i : i + 1], world_mats[i : i + 1], Ks[i : i + 1]) for i in range(num_frames)]
    with torch.no_grad():
        canonical = student.canonical()
    graph = GARFrame.from_canonical(canonical, student.radius, student.shading, generator, image_size,
                                    exportable=True).eval()
    graph.plan_tiles(expressions, world_mats, Ks)  # the tile plan, on the timed frames
    teacher = _teacher_frame(points, radius, expression_dim, image_size)
    return graph, torch.zeros(sizes["z_dim"]), teacher, frames


def run_setup(run_dir: str, num_frames: int):
    """The GAR run's graph and mean z, a default teacher on the run's student points, and the run's test frames."""
    module = load_gar_module(run_dir)
    datamodule = load_datamodule(run_dir)
    graph = frame_graph(module, planning_frames(datamodule))  # the tile rasterizer, planned as the export does
    frames = []
    for batch in datamodule.test_dataloader():
        for i in range(len(batch)):
            frames.append((batch.expression[i : i + 1], batch.world_mat[i : i + 1], batch.K[i : i + 1]))
    frames = frames[:num_frames]
    teacher = _teacher_frame(module.student.points, float(module.student.radius), graph.expression_dim,
                             module.hparams.image_size)
    return graph, module.z_mean.clone(), teacher, frames


def _teacher_frame(points: torch.Tensor, radius: float, expression_dim: int, image_size: int) -> PointFrame:
    """The teacher's per-frame path (deform, shade, rasterize; :class:`models.renderer.PointFrame`) from its
    cached canonical outputs: a callable (expression, world_mat, K) -> image."""
    teacher = PointAvatarTeacher(expression_dim=expression_dim).eval()
    with torch.no_grad():
        canonical = teacher.canonical(points, compute_normals=True, method="explicit")
    return PointFrame.from_canonical(canonical, torch.tensor(radius), teacher.shading, image_size).eval()


class _Generator(torch.nn.Module):
    """The generator with its maps as separate arguments (for export)."""

    def __init__(self, generator: GARGenerator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, *maps_z_base: torch.Tensor) -> torch.Tensor:
        """maps (one per rasterized scale: ``input_scales``), z, then the base image when the generator is residual."""
        n = self.generator.input_scales
        base = maps_z_base[n + 1] if self.generator.residual else None
        return self.generator(list(maps_z_base[:n]), maps_z_base[n], base)


def seconds_per_frame(fn, frames, repeats: int) -> float:
    """Median over ``repeats`` passes of the mean seconds per frame of ``fn(*frame)`` (after a warm-up pass)."""
    for frame in frames:
        fn(*frame)
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for frame in frames:
            fn(*frame)
        passes.append((time.perf_counter() - start) / len(frames))
    return statistics.median(passes)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-dir", default=None, help="a GAR run folder (default: random weights, default sizes)")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    if args.run_dir is not None:
        graph, z, teacher, frames = run_setup(args.run_dir, args.frames)
        source = f"run {args.run_dir}"
    else:
        graph, z, teacher, frames = random_setup(args.points, args.image_size, args.frames)
        source = "random weights, default sizes"
    num_points = graph.points.shape[0]
    z_b = z.reshape(1, -1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the default-z initializer warning
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the generator's shape checks
        session = ort.InferenceSession(str(export_graph(graph, z, Path(tmp) / "gar_frame.onnx")), options)
        out = graph.raster_inputs(*frames[0])
        maps, base = out.inputs, out.base
        extra = (base,) if base is not None else ()
        torch.onnx.export(_Generator(graph.generator), (*maps, z_b, *extra), str(Path(tmp) / "g.onnx"), dynamo=False,
                          opset_version=OPSET,
                          input_names=[f"map{s}" for s in range(len(maps))] + ["z"] + ["base"] * len(extra))
        gen_session = ort.InferenceSession(str(Path(tmp) / "g.onnx"), options)
    gen_feed = {**{f"map{s}": m.numpy() for s, m in enumerate(maps)}, "z": z_b.numpy(),
                **({"base": base.numpy()} if base is not None else {})}

    def run_ort(expression, world_mat, K):
        return session.run(None, {"expression": expression.numpy(), "world_mat": world_mat.numpy(), "K": K.numpy()})

    def run_generator(*_frame):
        return gen_session.run(None, gen_feed)

    def run_torch(expression, world_mat, K):
        out = graph.raster_inputs(expression, world_mat, K, rasterize=rasterize_points)
        maps, base = out.inputs, out.base
        return graph.generator(maps, z_b, base)

    results = {
        "source": source,
        "num_points": num_points,
        "image_size": graph.image_size,
        "threads": args.threads,
        "frames": len(frames),
    }
    timed = (("export_ort", run_ort), ("teacher_torch", teacher), ("gar_torch", run_torch),
             ("generator_ort", run_generator))
    for name, fn in timed:
        with torch.no_grad():
            seconds = seconds_per_frame(fn, frames, args.repeats)
        results[f"{name}_fps"] = 1.0 / seconds
        print(f"{name:>14}: {1000 * seconds:8.1f} ms/frame  {1.0 / seconds:7.1f} frames/s", flush=True)
    results["ratio_export_ort_to_teacher"] = results["export_ort_fps"] / results["teacher_torch_fps"]
    results["goal_fps"] = GOAL_FPS
    print(
        f"N = {num_points}, {graph.image_size}x{graph.image_size}, {args.threads} threads ({source}); "
        f"exported / teacher fps ratio {results['ratio_export_ort_to_teacher']:.2f}; goal {GOAL_FPS:.0f} frames/s: "
        f"{'met' if results['export_ort_fps'] >= GOAL_FPS else 'not met'}"
    )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
