"""ONNX export of a GAR run's per-frame path (lightning_modules/export.py) and the export-friendly rasterizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.rasterizer import rasterize_points, rasterize_points_exportable


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # the warning about z's default (an initializer that is also an input)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _scene(batch: int = 2, num_points: int = 3000, seed: int = 0):
    """Points in front of B cameras, many layers per pixel, duplicated points (depth ties)."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(batch, num_points, 3, generator=g) * 0.4
    points[:, :200] = points[:, 200:400]  # exact duplicates: equal depths, same pixels
    features = torch.rand(batch, num_points, 5, generator=g)
    world_mat = torch.eye(3, 4).repeat(batch, 1, 1)
    world_mat[:, 2, 3] = 3.0
    world_mat[-1, 0, 3] = 0.2  # the last camera looks from elsewhere
    K = torch.tensor([[60.0, 0.0, 24.0], [0.0, 60.0, 20.0], [0.0, 0.0, 1.0]]).repeat(batch, 1, 1)
    radius = torch.rand(batch, num_points, generator=g) * 3 + 0.3
    return points, features, world_mat, K, radius


@pytest.mark.parametrize("radius_kind", ["per_point", "float", "shared_points_valid"])
def test_exportable_rasterizer_equals_rasterize_points(radius_kind):
    points, features, world_mat, K, radius = _scene()
    kwargs = {}
    if radius_kind == "float":
        radius = 1.7
    elif radius_kind == "shared_points_valid":
        points, features, radius = points[0], features[0], radius[0]  # (N, 3) shared by both cameras
        kwargs["valid"] = torch.arange(points.shape[0]) % 3 != 0
    ref = rasterize_points(points, features, world_mat, K, (40, 48), radius, 10, background=0.3, **kwargs)
    out = rasterize_points_exportable(points, features, world_mat, K, (40, 48), radius, 10, background=0.3, **kwargs)
    assert ref.alpha.max() > 0.99 and ref.alpha.min() == 0  # covered and empty pixels both present
    for name in ("image", "alpha", "depth"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


def test_exportable_rasterizer_gradients_match():
    points, features, world_mat, K, radius = _scene(batch=1, num_points=500)
    grads = []
    for fn in (rasterize_points, rasterize_points_exportable):
        p, f, r = (t.clone().requires_grad_(True) for t in (points, features, radius))
        out = fn(p, f, world_mat, K, (40, 48), r, 4, background=0.0)
        (out.image.square().sum() + out.alpha.sum() + out.depth.sum()).backward()
        grads.append((p.grad, f.grad, r.grad))
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_exportable_rasterizer_in_onnx_runtime(tmp_path):
    """Exported with a per-point radius: ONNX Runtime on another scene (other sizes, ties) matches PyTorch."""

    class Raster(torch.nn.Module):
        def forward(self, points, features, world_mat, K, radius):
            out = rasterize_points_exportable(points, features, world_mat, K, (40, 48), radius, 10, background=0.3)
            return out.image, out.alpha, out.depth

    path = tmp_path / "raster.onnx"
    with torch.no_grad():
        torch.onnx.export(Raster(), _scene(seed=0), str(path), dynamo=False, opset_version=18)
    session = _session(path)
    names = [i.name for i in session.get_inputs()]
    for seed, scale in ((1, 1.0), (2, 2.5)):  # scale: larger disks than at export (a wider window)
        points, features, world_mat, K, radius = _scene(seed=seed)
        radius = radius * scale
        got = session.run(None, dict(zip(names, (t.numpy() for t in (points, features, world_mat, K, radius)))))
        ref = rasterize_points(points, features, world_mat, K, (40, 48), radius, 10, background=0.3)
        for g, r in zip(got, (ref.image, ref.alpha, ref.depth)):
            assert np.abs(g - r.numpy()).max() < 1e-5


# -- the GAR run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(gar_run, tmp_path_factory):
    from lightning_modules.export import main

    out = tmp_path_factory.mktemp("export") / "gar.onnx"
    assert main([str(gar_run), str(out)]) == out
    return out


def test_export_matches_pytorch_on_test_frames(gar_run, exported):
    from lightning_modules.export import frame_graph, load_datamodule, load_gar_module, ort_inputs

    module = load_gar_module(gar_run)
    datamodule = load_datamodule(gar_run)
    session = _session(exported)
    assert [i.name for i in session.get_inputs()] == ["expression", "world_mat", "K"]  # z has a default
    assert [i.name for i in session.get_overridable_initializers()] == ["z"]
    size = module.hparams.image_size
    batches = [*datamodule.test_dataloader(), *datamodule.val_dataloader()]
    renders = []
    z_other = torch.randn(module.hparams.z_dim, generator=torch.Generator().manual_seed(0))
    for batch in batches:
        with torch.no_grad():  # the GAR stage's own per-frame path (normal rasterizer, EMA generator)
            inputs = module.raster_inputs(batch, batch.expression)
            ref_meanz = module.generate(module.generator_ema, inputs, module.z_mean.expand(len(batch), -1))
            ref_other = module.generate(module.generator_ema, inputs, z_other.expand(len(batch), -1))
            eager = frame_graph(module)(batch.expression, batch.world_mat, batch.K, module.z_mean.expand(len(batch), -1))
        assert torch.equal(eager, ref_meanz)  # the export-friendly path in PyTorch is bit-equal
        for i in range(len(batch)):
            got = session.run(None, ort_inputs(batch, i))[0]  # z left out: the mean training z
            assert got.shape == (1, 3, size, size)
            assert np.abs(got - ref_meanz[i : i + 1].numpy()).max() < 1e-4
            got_other = session.run(None, ort_inputs(batch, i, z_other))[0]
            assert np.abs(got_other - ref_other[i : i + 1].numpy()).max() < 1e-4
            renders.append(got)
    assert len(renders) >= 2
    assert np.abs(renders[0] - renders[1]).max() > 1e-3  # the camera reaches the image


def test_graph_with_the_stage_rasterizer_is_the_stage_path(gar_run):
    """raster_inputs(..., rasterize=rasterize_points), the benchmark's gar_torch path, gives the GAR
    stage's own generator inputs, bit for bit (and so does the default export-friendly rasterizer):
    the exported graph is the stage's frame path (models.renderer.GARFrame) with its rasterizer switched."""
    from lightning_modules.export import frame_graph, load_datamodule, load_gar_module
    from models.rasterizer import rasterize_points

    module = load_gar_module(gar_run)
    batch = next(iter(load_datamodule(gar_run).test_dataloader()))
    graph = frame_graph(module)
    with torch.no_grad():
        ref = module.raster_inputs(batch, batch.expression)
        for rasterize in (rasterize_points, None):
            kwargs = {} if rasterize is None else {"rasterize": rasterize}
            out = graph.raster_inputs(batch.expression, batch.world_mat, batch.K, **kwargs)
            maps, base = out.inputs, out.base
            assert len(maps) == len(ref.inputs) == module.generator_ema.num_scales
            assert all(torch.equal(a, b) for a, b in zip(maps, ref.inputs))
            assert torch.equal(base, ref.base)


def test_exported_z_reaches_the_image(gar_run, tmp_path):
    """After one step the residual generator's to_rgb is still ~0, so z hardly matters; with it moved
    off zero (as training does) the exported z input changes the image as PyTorch says it does."""
    from lightning_modules.export import (
        export_graph,
        frame_graph,
        load_datamodule,
        load_gar_module,
        ort_inputs,
    )

    module = load_gar_module(gar_run)
    graph = frame_graph(module)
    with torch.no_grad():
        graph.generator.to_rgb.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    session = _session(export_graph(graph, module.z_mean, tmp_path / "g.onnx"))
    batch = next(iter(load_datamodule(gar_run).test_dataloader()))
    z_other = torch.randn(module.hparams.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = graph(batch.expression[:1], batch.world_mat[:1], batch.K[:1], z_other[None])
    got_default = session.run(None, ort_inputs(batch, 0))[0]
    got_other = session.run(None, ort_inputs(batch, 0, z_other))[0]
    assert np.abs(got_other - ref.numpy()).max() < 1e-4
    assert np.abs(got_other - got_default).max() > 1e-3  # 10x the match tolerance (the head is small)


def test_export_errors_are_one_line(tmp_path, distill_run, capsys):
    from lightning_modules.export import ExportError, export_run, main

    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ExportError, match="has no checkpoints/last.ckpt"):
        export_run(empty, tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="is not a GAR run: its checkpoint holds lightning_modules.distill.DistillModule"):
        export_run(distill_run, tmp_path / "x.onnx")
    for run in (empty, distill_run, tmp_path / "missing"):
        with pytest.raises(SystemExit) as info:
            main([str(run), str(tmp_path / "x.onnx")])
        message = str(info.value.code)
        assert message.startswith("error: ") and "\n" not in message
    assert not (tmp_path / "x.onnx").exists()


def test_device_size_generator_exports_and_matches_pytorch(distill_run, tmp_path):
    """The device-size G (experiments/overrides/gar_device.yaml: 12 base channels) exports like the
    large one and ONNX Runtime gives the GAR stage's render within 1e-4."""
    from lightning_modules.export import load_datamodule, load_gar_module, main, ort_inputs
    from tests.conftest import EXPERIMENTS, TINY_MESH, run_stage

    run_dir = tmp_path / "gar_device"
    run_stage(
        "fit", "--config", str(EXPERIMENTS / "gar.yaml"), "--config", str(TINY_MESH),
        "--config", str(EXPERIMENTS / "overrides" / "gar_device.yaml"),
        "--model.init_args.student_ckpt", str(distill_run / "checkpoints" / "last.ckpt"),
        "--trainer.max_steps=3", "--trainer.callbacks=[]", "--run_dir", str(run_dir),
    )
    module = load_gar_module(run_dir)
    assert module.generator.channels == [12, 24, 24]
    session = _session(main([str(run_dir), str(tmp_path / "device.onnx")]))
    batch = next(iter(load_datamodule(run_dir).test_dataloader()))
    with torch.no_grad():
        inputs = module.raster_inputs(batch, batch.expression)
        reference = module.generate(module.generator_ema, inputs, module.z_mean.expand(len(batch), -1))
    for i in range(len(batch)):
        got = session.run(None, ort_inputs(batch, i))[0]
        assert np.abs(got - reference[i : i + 1].numpy()).max() < 1e-4


def test_budget_table_times_every_form_and_sizes_the_files(tmp_path):
    """benchmarks/bench_budget.py on a small random cloud: one row per form and exported rasterizer, and
    with the same rasterizing (fragments, every scale) the two GAR graphs differ on disk by the float32
    bytes of their generators' parameters (everything else is shared)."""
    import json

    from benchmarks.bench_budget import device_generator_args, main
    from benchmarks.bench_export import _gar_sizes
    from models.renderer import GARGenerator

    rows = main(["--sizes", "32", "--points", "200", "--frames", "1", "--repeats", "1", "--rasterizer", "both",
                 "--out", str(tmp_path / "budget.json")])
    assert [(r["model"], r["rasterizer"]) for r in rows] == [
        (m, x) for m in ("teacher", "student", "student+gar", "student+gar_device") for x in ("fragments", "tiles")]
    assert all(r["ort_ms"] > 0 and r["torch_ms"] > 0 and r["size"] == 32 for r in rows)
    assert device_generator_args()["input_pyramid"] == "pooled"  # the device G rasterizes once: one capacity
    assert [len(r["tile_capacity"]) for r in rows if r["rasterizer"] == "tiles"] == [1, 1, 3, 1]
    assert json.loads((tmp_path / "budget.json").read_text())["rows"] == rows
    for r in rows:  # the profile's split adds up to the frame; only the GAR rows run a generator
        assert sum(r["ort_ms_by_stage"].values()) == pytest.approx(r["ort_ms"])
        assert (r["ort_ms_by_stage"]["generator"] > 0) == r["model"].startswith("student+")
        assert r["ort_ms_by_stage"]["shading"] > 0 and r["ort_ms_by_stage"]["deform+rasterize"] > 0
    large = sum(p.numel() for p in GARGenerator(32, **_gar_sizes()).parameters())
    small = sum(p.numel() for p in GARGenerator(32, **{**_gar_sizes(), **device_generator_args(),
                                                        "input_pyramid": "rasterized"}).parameters())
    assert small < large / 3  # the pyramid setting adds no parameter; 12 base channels instead of 32
    rows = main(["--sizes", "32", "--points", "200", "--frames", "1", "--repeats", "1", "--rasterizer", "fragments",
                 "--device-pyramid", "rasterized", "--out", str(tmp_path / "same.json")])
    by_model = {r["model"]: r["bytes"] for r in rows}
    assert by_model["student+gar"] - by_model["student+gar_device"] == pytest.approx(4 * (large - small), rel=0.01)


def test_export_plans_the_tile_rasterizer_on_the_runs_frames(gar_run, exported, tmp_path):
    """The default export rasterizes with tiles of the planned capacity, records the plan in the file,
    and --rasterizer fragments writes the exact exportable rasterizer instead."""
    import onnx

    from lightning_modules.export import (
        TILE_MARGIN,
        frame_graph,
        load_datamodule,
        load_gar_module,
        main,
        planning_frames,
    )
    from models.renderer import plan_capacity

    module = load_gar_module(gar_run)
    frames = planning_frames(load_datamodule(gar_run))
    assert frames[0].shape[0] == sum(load_datamodule(gar_run).split_sizes().values())  # train, val and test
    graph = frame_graph(module, frames)
    props = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    assert props == {"rasterizer": "tiles", "tile_capacity": ",".join(map(str, graph.tile_capacity)),
                     "tile_required": ",".join(map(str, graph.tile_required)),
                     "tile_planned_frames": str(frames[0].shape[0])}
    assert graph.tile_capacity == [plan_capacity(n, TILE_MARGIN) for n in graph.tile_required]
    out = tmp_path / "fragments.onnx"
    main([str(gar_run), str(out), "--rasterizer", "fragments"])
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props} == {"rasterizer": "fragments"}
    best = tmp_path / "best.onnx"  # --checkpoint: the one chosen on val, as the player shows
    main([str(gar_run), str(best), "--checkpoint", "best.ckpt"])
    assert best.is_file()
    with pytest.raises(SystemExit, match=r"^error: .* has no checkpoints/nope.ckpt; it has best.ckpt, .*last.ckpt"):
        main([str(gar_run), str(tmp_path / "x.onnx"), "--checkpoint", "nope.ckpt"])
    for margin in ("0.5", "nan", "inf"):
        with pytest.raises(SystemExit, match=rf"^error: margin must be a finite number >= 1 .*got {margin}$"):
            main([str(gar_run), str(tmp_path / "x.onnx"), "--margin", margin])
    assert not (tmp_path / "x.onnx").exists()
