"""The per-frame budget: what one frame costs a device, for every form of the avatar, in one run.

Run ``python -m benchmarks.bench_budget [--run-dir GAR_RUN] [--device-run-dir GAR_RUN] [--sizes 64,128,256]
[--points 10000] [--threads 2] [--frames 4] [--repeats 3] [--rasterizer tiles|fragments|both]
[--device-pyramid rasterized|pooled] [--out runs/bench/budget.json] [--markdown TABLE.md]``.

Rows (B = 1; canonical outputs cached, as a device holds them):

- ``teacher``: the teacher's per-frame path (deform, shade, rasterize the colours);
- ``student``: the same for the student (:class:`models.renderer.PointFrame`);
- ``student+gar``: deform, shade (the residual G's base), rasterize at G's scales, the EMA generator
  (:class:`models.renderer.GARFrame`, what the export writes);
- ``student+gar_device``: the same with the device-size generator (``experiments/overrides/gar_device.yaml``).

Each at every ``--sizes`` (S x S) in eager PyTorch (``rasterize_points``) and in ONNX Runtime (the
graph exported with ``exportable=True``, ``intra_op_num_threads = --threads``; ``--rasterizer``: the
tile rasterizer (default) planned as the export plans it, on every frame of the run (the random cloud:
on the timed frames), the fragment rasterizer's exportable form, or both side by side), on two clouds: the
demo avatar (``--run-dir``, default ``runs/demo/gar/latest`` when ``make demo`` made it: a GAR run,
its student, its teacher through the run's pinned upstreams, and ``--device-run-dir``'s generator,
default the run's ``-device`` twin where it exists; the test frames' cameras, K scaled to S) and ``--points``
points on a sphere with models of the default sizes and random weights (speed does not depend on
training). ms/frame: the median over ``--repeats`` passes of the mean over ``--frames`` frames,
after a warm-up pass; ONNX Runtime's time split by stage (deform+rasterize, shading, generator) from
its profile (:func:`stage_shares`); bytes: the ONNX file (canonical outputs and weights included). The machine
is shared: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from benchmarks.bench_export import (
    _gar_sizes,
    _student_sizes,
    seconds_per_frame,
    teacher_radius,
)
from datamodules.mesh_views import ring_cameras
from lightning_modules.export import TILE_MARGIN, planning_frames
from models.renderer import GARFrame, GARGenerator, PointFrame
from models.student import Student
from models.teacher import PointAvatarTeacher, fibonacci_sphere

ROWS = ("teacher", "student", "student+gar", "student+gar_device")
#: The demo's GAR run (its device-size twin is the same folder name with ``-device``).
DEMO_RUN = Path("runs") / "demo" / "gar" / "latest"
DEVICE_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "overrides" / "gar_device.yaml"


def device_generator_args() -> dict:
    """The device-size generator's init args, as ``experiments/overrides/gar_device.yaml`` sets them."""
    import yaml

    return dict(yaml.safe_load(DEVICE_CONFIG.read_text())["model"]["init_args"]["generator"]["init_args"])


def random_cloud(num_points: int, num_frames: int = 4, expression_dim: int = 16, seed: int = 0,
                 device_pyramid: str | None = None) -> dict:
    """Default-size teacher, student and both generators with random weights on ``num_points`` sphere points
    (the device G's ``input_pyramid``: ``device_pyramid``, default its config's)."""
    torch.manual_seed(seed)
    points = fibonacci_sphere(num_points, 0.5)
    radius = torch.tensor(teacher_radius(num_points))
    teacher = PointAvatarTeacher(expression_dim=expression_dim).eval()
    student = Student(expression_dim=expression_dim, **_student_sizes()).eval()
    student.set_canonical(points, radius=radius)
    sizes = _gar_sizes()
    pyramid = {"input_pyramid": device_pyramid} if device_pyramid else {}
    generators = {"student+gar": GARGenerator(student.latent_dim, **sizes),
                  "student+gar_device": GARGenerator(student.latent_dim, **{**sizes, **device_generator_args(),
                                                                             **pyramid})}
    for g in generators.values():
        with torch.no_grad():  # a trained residual generator: to_rgb off zero (the speed is the same)
            g.to_rgb.weight.normal_(0.0, 0.1)
    with torch.no_grad():
        t_canonical = teacher.canonical(points, compute_normals=True, method="explicit")
        s_canonical = student.canonical()
    world_mats, Ks = ring_cameras(num_frames, 2.2, 10.0, 30.0, 128)
    return {"name": f"{num_points} points (random weights)", "teacher": (teacher, t_canonical, radius),
            "student": (student, s_canonical, student.radius), "generators": generators,
            "z": {k: torch.zeros(1, g.z_dim) for k, g in generators.items()},
            "expression": 0.5 * torch.randn(num_frames, expression_dim), "world_mat": world_mats, "K_size": 128,
            "K": Ks}


def run_cloud(run_dir: str, device_run_dir: str | None, num_frames: int) -> dict:
    """The demo avatar: a GAR run's student and EMA generator, its teacher (through the pinned
    upstreams) and the device run's generator; the run's test frames."""
    from lightning_modules.export import load_datamodule, load_gar_module
    from lightning_modules.handoff import load_teacher, read_checkpoint

    module = load_gar_module(run_dir, "best.ckpt" if (Path(run_dir) / "checkpoints" / "best.ckpt").is_file()
                             else "last.ckpt")
    teacher_ckpt = read_checkpoint(module.hparams.student_ckpt)["hyper_parameters"]["teacher_ckpt"]
    teacher, _ = load_teacher(teacher_ckpt)
    with torch.no_grad():
        t_canonical = teacher.canonical(method="explicit")
    generators = {"student+gar": module.generator_ema}
    z = {"student+gar": module.z_mean.reshape(1, -1)}
    if device_run_dir is not None:
        device = load_gar_module(device_run_dir, "best.ckpt" if (Path(device_run_dir) / "checkpoints" / "best.ckpt")
                                 .is_file() else "last.ckpt")
        generators["student+gar_device"] = device.generator_ema
        z["student+gar_device"] = device.z_mean.reshape(1, -1)
    datamodule = load_datamodule(run_dir)
    batch = next(iter(datamodule.test_dataloader()))
    n = min(num_frames, len(batch))
    return {"name": f"demo avatar ({module.student.num_points} points; {run_dir})",
            "teacher": (teacher, t_canonical, teacher.radius), "student": (module.student, module.student_canonical(),
                                                                        module.student.radius),
            "generators": generators, "z": z, "expression": batch.expression[:n].float(),
            "world_mat": batch.world_mat[:n, :3].float(), "K": batch.K[:n].float(), "K_size": batch.image.shape[-1],
            "plan": planning_frames(datamodule)}


def _resized(K: torch.Tensor, cloud: dict, size: int) -> torch.Tensor:
    """The cloud's intrinsics for the same view at ``size`` pixels."""
    K = K.clone()
    K[:, :2] *= size / cloud["K_size"]
    return K


def _frames(cloud: dict, size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    K = _resized(cloud["K"], cloud, size)
    return [(cloud["expression"][i : i + 1], cloud["world_mat"][i : i + 1], K[i : i + 1])
            for i in range(len(cloud["expression"]))]


def _plan_frames(cloud: dict, size: int, frames: list) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The frames the tile plan is made on: a run's every frame (as its export plans), else the timed ones."""
    if "plan" not in cloud:
        return frames
    expression, world_mat, K = cloud["plan"]
    return [(expression, world_mat, _resized(K, cloud, size))]


def exported_frame(make, frames: list, rasterizer: str, margin: float = TILE_MARGIN):
    """``make(exportable=True)`` in eval mode; for ``rasterizer="tiles"`` with the tile rasterizer planned on
    ``frames`` (the required capacity per scale times ``margin``, as the export plans on a run's frames)."""
    graph = make(exportable=True).eval()
    if rasterizer == "tiles":
        graph.plan_tiles(*(torch.cat([f[i] for f in frames]) for i in range(3)), margin=margin)
    return graph


def _time_row(make, z: torch.Tensor | None, frames: list, repeats: int, path: Path, options,
              rasterizer: str, plan: list | None = None) -> tuple[float, float, list[int] | None]:
    """Seconds per frame of ``make(exportable=False)`` in PyTorch and of the exported frame
    (:func:`exported_frame`, tiles planned on ``plan``, default ``frames``) written to ``path``, in ONNX
    Runtime; and the graph's tile capacities."""
    import onnxruntime as ort

    from lightning_modules.export import export_graph

    eager, extra = make(exportable=False).eval(), ((z,) if z is not None else ())
    with torch.no_grad():
        torch_s = seconds_per_frame(lambda e, w, k: eager(e, w, k, *extra), frames, repeats)
    graph = exported_frame(make, plan or frames, rasterizer)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on the input checks
        if z is not None:
            export_graph(graph, z.reshape(-1), path)
        else:
            torch.onnx.export(graph, frames[0], str(path), dynamo=False, opset_version=18,
                              input_names=["expression", "world_mat", "K"], output_names=["rgb"])
    session = ort.InferenceSession(str(path), options)

    def run(e, w, k):
        return session.run(None, {"expression": e.numpy(), "world_mat": w.numpy(), "K": k.numpy()})

    return torch_s, seconds_per_frame(run, frames, repeats), graph.tile_capacity


def stage_shares(path: Path, frames: list, options) -> dict[str, float]:
    """Shares of ONNX Runtime's node time per stage of the graph at ``path``, from its profile over
    ``frames``: ``generator`` (nodes under ``/generator/``), ``shading`` (under ``/shading/``) and
    ``deform+rasterize`` (the rest: deformation, normals, rasterization at every scale)."""
    import onnxruntime as ort

    profiled = ort.SessionOptions()
    profiled.intra_op_num_threads, profiled.inter_op_num_threads = options.intra_op_num_threads, 1
    profiled.log_severity_level, profiled.enable_profiling = 3, True
    profiled.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), profiled)
    for e, w, k in frames:
        session.run(None, {"expression": e.numpy(), "world_mat": w.numpy(), "K": k.numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    totals = {"deform+rasterize": 0.0, "shading": 0.0, "generator": 0.0}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"]
            stage = "generator" if "/generator/" in name else "shading" if "/shading/" in name else "deform+rasterize"
            totals[stage] += event["dur"]
    total = sum(totals.values()) or 1.0
    return {stage: value / total for stage, value in totals.items()}


def measure(cloud: dict, sizes: list[int], threads: int, repeats: int, tmp: Path,
            rasterizers: tuple[str, ...] = ("tiles",)) -> list[dict]:
    """Rows of the budget table for one cloud, one per exported ``rasterizers`` (printed as they come)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    rows = []
    for size in sizes:
        frames = _frames(cloud, size)
        for row in ROWS:
            if row.startswith("student+"):
                generator = cloud["generators"].get(row)
                if generator is None or size % 2 ** (generator.num_scales - 1):
                    continue
                student, canonical, radius = cloud["student"]
                make = functools.partial(GARFrame.from_canonical, canonical, radius, student.shading, generator, size)
                z = cloud["z"][row]
            else:
                model, canonical, radius = cloud[row]
                make, z = functools.partial(PointFrame.from_canonical, canonical, radius, model.shading, size), None
            for rasterizer in rasterizers:
                path = tmp / f"{row}_{size}_{rasterizer}.onnx"
                torch_s, ort_s, capacity = _time_row(make, z, frames, repeats, path, options, rasterizer,
                                                     _plan_frames(cloud, size, frames))
                r = {"cloud": cloud["name"], "model": row, "size": size, "rasterizer": rasterizer,
                     "tile_capacity": capacity, "torch_ms": 1000 * torch_s, "torch_fps": 1 / torch_s,
                     "ort_ms": 1000 * ort_s, "ort_fps": 1 / ort_s, "bytes": path.stat().st_size,
                     "ort_ms_by_stage": {k: 1000 * ort_s * v for k, v in stage_shares(path, frames, options).items()}}
                rows.append(r)
                print(f"{cloud['name'][:34]:34s} {row:>19s} {size:4d}² {rasterizer:9s} torch {r['torch_ms']:7.1f} ms "
                      f"({r['torch_fps']:5.1f}/s)  ort {r['ort_ms']:7.1f} ms ({r['ort_fps']:5.1f}/s)  "
                      f"{r['bytes'] / 1e6:6.2f} MB  "
                      + ", ".join(f"{k} {v:.1f}" for k, v in r["ort_ms_by_stage"].items() if v), flush=True)
    return rows


def format_budget(rows: list[dict]) -> str:
    """The budget table as Markdown."""
    lines = ["| cloud | model | S | PyTorch ms | PyTorch frames/s | exported rasterizer (tile capacity) "
             "| ONNX Runtime ms | ONNX Runtime frames/s | of which deform+rasterize / shading / generator ms "
             "| MB on disk |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        stages = " / ".join(f"{v:.1f}" for v in r["ort_ms_by_stage"].values())
        rasterizer = r.get("rasterizer", "fragments")
        if r.get("tile_capacity"):
            rasterizer += f" ({'/'.join(map(str, r['tile_capacity']))})"
        lines.append(f"| {r['cloud']} | {r['model']} | {r['size']} | {r['torch_ms']:.1f} | {r['torch_fps']:.1f} | "
                     f"{rasterizer} | {r['ort_ms']:.1f} | {r['ort_fps']:.1f} | {stages} | {r['bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive image sizes like 64,128,256, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=None, help="a GAR run (the demo avatar); default: runs/demo/gar/latest")
    parser.add_argument("--device-run-dir", default=None, help="the device-size GAR run on the same student")
    parser.add_argument("--sizes", default="64,128,256", type=_sizes, help="image sizes, comma-separated")
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rasterizer", choices=("tiles", "fragments", "both"), default="tiles",
                        help="the exported rasterizer (both: side by side)")
    parser.add_argument("--device-pyramid", choices=("rasterized", "pooled"), default=None,
                        help="the random cloud's device G input pyramid (default: experiments/overrides/gar_device.yaml)")
    parser.add_argument("--out", default="runs/bench/budget.json")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    rasterizers = ("fragments", "tiles") if args.rasterizer == "both" else (args.rasterizer,)
    torch.set_num_threads(args.threads)
    sizes = args.sizes
    clouds = []
    run_dir, device_run_dir = args.run_dir, args.device_run_dir
    if run_dir is None and DEMO_RUN.is_dir():  # the demo avatar, when `make demo` made one
        run_dir = os.path.relpath(DEMO_RUN.resolve())  # the run's own folder, not the moving link
    if run_dir is not None and device_run_dir is None:  # the run's device-size twin, where it has one
        device = Path(f"{run_dir}-device")
        device_run_dir = str(device) if device.is_dir() else None
    if run_dir is not None:
        from lightning_modules.export import ExportError
        from lightning_modules.run_folder import UpstreamMissingError

        try:
            clouds.append(run_cloud(run_dir, device_run_dir, args.frames))
        except (ExportError, UpstreamMissingError) as err:
            raise SystemExit(f"error: {err}") from None
    clouds.append(random_cloud(args.points, args.frames, device_pyramid=args.device_pyramid))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cloud in clouds:
            rows += measure(cloud, sizes, args.threads, args.repeats, Path(tmp), rasterizers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n")
    table = format_budget(rows)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
