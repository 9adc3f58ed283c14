"""Export the per-frame path of a GAR run to ONNX (``python -m lightning_modules.export RUN_DIR OUT.onnx``).

What a device runs per frame (DESIGN.md, "Models" and "GAR"), as one ONNX graph:

1. the student's canonical outputs (points, offset, blendshapes, normals, latent codes f_s),
   computed once in PyTorch and baked in as initializers: the student network itself is not
   exported;
2. deformation by the expression code, x' = x + o + sum_e psi_e B_e (:func:`models.frame.deform_points`),
   and the canonical normals turned into the camera (:func:`models.camera.rotate_normals`);
3. rasterization of [f_s, camera-space normal] at the generator's input scales (all ``num_scales``, or
   the full size only for a generator with ``input_pyramid="pooled"``) with the tile rasterizer
   (:func:`models.tile_rasterizer.rasterize_points_tiled`: the GAR stage's rule with fixed-shape work,
   several times faster in ONNX Runtime). Its capacity per tile is planned on the frames the run's
   datamodule serves (train, val and test; the player adds its drivers'): the smallest that renders
   every one of them exactly (:meth:`models.renderer.GARFrame.required_capacity`), times
   :data:`TILE_MARGIN` for poses it has not seen, and is written into the file's metadata
   (``tile_capacity``, ``tile_required``, ``tile_planned_frames``). ``--rasterizer fragments`` exports
   :func:`models.rasterizer.rasterize_points_exportable` instead, bit-equal to the stage's rasterizer
   on every frame but about 2x slower;
4. the EMA generator of the GAR run (:class:`models.renderer.GARGenerator`, the copy used for
   evaluation).

The graph is the GAR stage's own frame path, :class:`models.renderer.GARFrame` (what every
evaluated row renders through), exported as it is with ``exportable=True`` and the planned tiles.

Graph inputs (float32): ``expression`` (1, E), ``world_mat`` (1, 3, 4) world->camera (OpenCV) and
``K`` (1, 3, 3) pixel intrinsics, all exactly as the run's datamodule serves them, and ``z``
(1, z_dim), the global code; ``z`` has a default, the mean training z the GAR module keeps
(``z_mean``, the ``gar/tracked`` row's), stored as an initializer of the same name, so a runtime
may leave it out. Output: ``rgb`` (1, 3, S, S) in (0, 1), S the run's image size.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``, opset 18. The graph has
data-dependent sizes (points in view, fragments per pixel, the rasterizer's window side, which
follows the largest disk of the frame as in PyTorch); the tracer records them as dynamic ONNX
shapes, and it took seconds where ``torch.export`` (``dynamo=True``) took minutes and stops at
the rasterizer's input checks that read tensor values.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_modules.gar import GARModule
from lightning_modules.handoff import UpstreamChangedError, class_from_path
from lightning_modules.run_folder import UpstreamMissingError
from models.renderer import TILE_MARGIN, GARFrame

__all__ = [
    "ExportError",
    "OPSET",
    "export_graph",
    "export_run",
    "frame_graph",
    "load_datamodule",
    "planning_frames",
    "load_gar_module",
    "main",
    "ort_inputs",
    "run_checkpoint",
]

#: ONNX opset of the export (ScatterElements with reduction needs >= 16; TopK, NonZero, CumSum older).
OPSET = 18
GAR_CLASS_PATH = "lightning_modules.gar.GARModule"
INPUT_NAMES = ("expression", "world_mat", "K", "z")
OUTPUT_NAME = "rgb"
#: Rasterizers of the export (``--rasterizer``).
RASTERIZERS = ("tiles", "fragments")


class ExportError(ValueError):
    """A run folder that cannot be exported (no checkpoint, not a GAR run); one line for the CLI."""


# -- the run -----------------------------------------------------------------------------------


def run_checkpoint(run_dir: str | Path, name: str = "last.ckpt") -> Path:
    """``RUN_DIR/checkpoints/<name>`` of a GAR run (``last.ckpt``; ``best.ckpt``: the best on val).

    Raises:
        ExportError: when the folder or the checkpoint is missing (naming the run's checkpoints, if any).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a folder: pass a GAR run folder such as runs/gar/latest")
    ckpt = run_dir / "checkpoints" / name
    if not ckpt.is_file():
        others = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
        if others:  # a run, another checkpoint name
            raise ExportError(f"{run_dir} has no checkpoints/{name}; it has {', '.join(others)}")
        raise ExportError(
            f"{run_dir} has no checkpoints/{name}: pass a GAR run folder made by "
            "`lightning fit --config experiments/gar.yaml` (e.g. runs/gar/latest)"
        )
    return ckpt


def _read_checkpoint(run_dir: str | Path, name: str = "last.ckpt") -> dict[str, Any]:
    ckpt = run_checkpoint(run_dir, name)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path") if isinstance(checkpoint, dict) else None
    if class_path != GAR_CLASS_PATH:
        raise ExportError(
            f"{run_dir} is not a GAR run: its checkpoint holds {class_path or 'no LightningCLI model'}, "
            f"not {GAR_CLASS_PATH} (make one with `lightning fit --config experiments/gar.yaml`)"
        )
    return checkpoint


def _init_args(hparams: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def load_gar_module(run_dir: str | Path, name: str = "last.ckpt") -> GARModule:
    """The GAR module of a run, with its checkpoint's weights (``checkpoints/<name>``), in eval mode on the CPU.

    The frozen student's sizes come from the distillation checkpoint the run points to
    (``student_ckpt``); its weights and the generator's come from the GAR checkpoint.

    Raises:
        ExportError: no ``checkpoints/last.ckpt``, not a GAR run, or weights that do not fit the
            student checkpoint the run points to (it was replaced).
        UpstreamMissingError: the run's student checkpoint is gone (one line naming it).
    """
    checkpoint = _read_checkpoint(run_dir, name)
    init_args = _init_args(GARModule.upgrade_hparams(checkpoint["hyper_parameters"]))  # the earlier layout too
    module = GARModule(**init_args)
    module.on_load_checkpoint(checkpoint)  # what Lightning does on load (the collapse monitor's state)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:  # a run from before pinning whose runs/distill/latest now points elsewhere
        first = str(err).strip().splitlines()[-1].strip()
        raise ExportError(
            f"{run_dir}'s weights do not fit the student checkpoint it points to "
            f"({init_args.get('student_ckpt') or 'runs/distill/latest'}): {first}"
        ) from None
    return module.eval()


def load_datamodule(run_dir: str | Path):
    """The run's datamodule, built from its checkpoint's hyper-parameters, prepared and set up
    (to feed a run's own frames to an exported graph).

    Relative paths in its arguments (``data_root``) are read from the current directory, as by
    the ``lightning`` command.

    Raises:
        ExportError: no ``checkpoints/last.ckpt``, not a GAR run, or no datamodule recorded.
    """
    checkpoint = _read_checkpoint(run_dir)
    hparams = checkpoint.get("datamodule_hyper_parameters")
    if not hparams or "_class_path" not in hparams:
        raise ExportError(f"{run_dir}'s checkpoint records no datamodule")
    datamodule = class_from_path(hparams["_class_path"])(**_init_args(hparams))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def planning_frames(datamodule, *extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every frame the run's datamodule serves (train, val and test), and ``extra`` ones: the codes a
    tile plan is made on.

    Returns:
        expression (F, E), world_mat (F, 3, 4), K (F, 3, 3), float32.
    """
    parts = [(b.expression, b.world_mat[:, :3], b.K) for loader in
             (datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader())
             for b in loader]
    parts += [tuple(torch.as_tensor(t) for t in codes) for codes in extra]
    return tuple(torch.cat([p[i] for p in parts]).float() for i in range(3))  # type: ignore[return-value]


def frame_graph(module, frames: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                margin: float = TILE_MARGIN) -> GARFrame:
    """The graph to export: the GAR module's own frame path (:meth:`~lightning_modules.gar.GARModule.frame`,
    the EMA generator), a copy in eval mode.

    Args:
        module: the GAR module.
        frames: (expression, world_mat, K) to plan the tile rasterizer on (:func:`planning_frames`); the
            graph then rasterizes with tiles (:meth:`models.renderer.GARFrame.plan_tiles`; ``graph.tile_required``
            keeps the required capacities). None: the fragment rasterizer's exportable
            form, bit-equal to the stage's rasterizer in PyTorch.
        margin: the capacity's margin over the required one (>= 1).
    """
    graph = copy.deepcopy(module.frame(exportable=True)).eval()
    if frames is not None:
        graph.plan_tiles(*frames, margin=margin)
    return graph


def _example_inputs(graph: GARFrame, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A frame in front of the camera (the shapes and dtypes matter; the values only must render)."""
    world_mat = torch.eye(3, 4)[None].clone()
    world_mat[0, 2, 3] = 2.5
    s = float(graph.image_size)
    K = torch.tensor([[[s, 0.0, s / 2], [0.0, s, s / 2], [0.0, 0.0, 1.0]]])
    return torch.zeros(1, graph.expression_dim), world_mat, K, z.reshape(1, -1).float()


def export_graph(graph: GARFrame, z_default: torch.Tensor, out: str | Path, opset: int = OPSET) -> Path:
    """Write ``graph`` as ONNX to ``out`` with ``z`` defaulting to ``z_default`` (z_dim,), and how its
    rasterizer was planned as metadata (``rasterizer``, and for tiles ``tile_capacity``, ``tile_required``,
    ``tile_planned_frames``).

    Returns:
        the path written.
    """
    import onnx
    from onnx import numpy_helper

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # the input checks read tensor values: the tracer records their (passing) outcome as constants
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        torch.onnx.export(
            graph, _example_inputs(graph, z_default), str(out), dynamo=False, opset_version=opset,
            input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], do_constant_folding=True,
        )
    model = onnx.load(str(out))
    # an initializer named like a graph input is that input's default (ONNX IR >= 4)
    model.graph.initializer.append(
        numpy_helper.from_array(z_default.detach().reshape(1, -1).float().numpy(), name="z")
    )
    if graph.tile_required is not None:  # how the tile rasterizer was planned
        onnx.helper.set_model_props(model, {
            "rasterizer": "tiles", "tile_capacity": ",".join(map(str, graph.tile_capacity)),
            "tile_required": ",".join(map(str, graph.tile_required)),
            "tile_planned_frames": str(graph.tile_planned_frames)})
    else:
        onnx.helper.set_model_props(model, {"rasterizer": "fragments"})
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def export_run(run_dir: str | Path, out: str | Path, opset: int = OPSET, rasterizer: str = "tiles",
               margin: float = TILE_MARGIN, checkpoint: str = "last.ckpt") -> Path:
    """Export the per-frame path of the GAR run in ``run_dir`` to the ONNX file ``out``.

    Args:
        run_dir: a GAR run folder (``runs/gar/latest``, or any ``--run_dir``) with checkpoints/last.ckpt.
        out: the .onnx file to write (its folder is created).
        opset: ONNX opset (>= 17).
        rasterizer: ``"tiles"`` (planned on the run's frames, module docstring) or ``"fragments"``.
        margin: the tile capacity's margin over the required one (>= 1).
        checkpoint: ``checkpoints/<checkpoint>`` of the run (``best.ckpt``: the one chosen on val, which the
            player and the budget show).

    Returns:
        the path written.

    Raises:
        ExportError: no checkpoint, not a GAR run, an opset below 17, an unknown rasterizer or a margin < 1.
        UpstreamMissingError: the run's student checkpoint is gone.
    """
    if opset < 17:
        raise ExportError(f"opset must be >= 17, got {opset}")
    if rasterizer not in RASTERIZERS:
        raise ExportError(f"rasterizer must be one of {RASTERIZERS}, got {rasterizer!r}")
    if not (math.isfinite(margin) and margin >= 1):
        raise ExportError(f"margin must be a finite number >= 1 (below 1 the capacity drops layers), got {margin}")
    module = load_gar_module(run_dir, checkpoint)
    frames = planning_frames(load_datamodule(run_dir)) if rasterizer == "tiles" else None
    graph = frame_graph(module, frames, margin)
    if frames is not None:
        print(f"tile rasterizer: capacity {graph.tile_capacity} per scale (exact on the {graph.tile_planned_frames} "
              f"frames of the run: {graph.tile_required}, x {margin} margin)", file=sys.stderr)
    return export_graph(graph, module.z_mean, out, opset)


def ort_inputs(batch, index: int = 0, z: torch.Tensor | None = None) -> dict[str, Any]:
    """ONNX Runtime feed for frame ``index`` of an :class:`~datamodules.batch.AvatarBatch` (numpy float32).

    ``z`` (z_dim,) is fed only when given (otherwise the graph's default, the mean training z).
    """
    feed = {
        "expression": batch.expression[index : index + 1].float().numpy(),
        "world_mat": batch.world_mat[index : index + 1, :3].float().numpy(),
        "K": batch.K[index : index + 1].float().numpy(),
    }
    if z is not None:
        feed["z"] = z.reshape(1, -1).float().numpy()
    return feed


def main(argv: list[str] | None = None) -> Path:
    """CLI: ``python -m lightning_modules.export RUN_DIR OUT.onnx [--opset 18] [--rasterizer tiles|fragments]
    [--margin 1.25] [--checkpoint last.ckpt]``.

    Errors (no checkpoint, not a GAR run, a missing or changed student checkpoint) exit with one line.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.export",
        description="Export the per-frame path (deform, rasterize, EMA generator) of a GAR run to ONNX.",
    )
    parser.add_argument("run_dir", help="GAR run folder with checkpoints/last.ckpt (e.g. runs/gar/latest)")
    parser.add_argument("out", help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (>= 17, default {OPSET})")
    parser.add_argument("--rasterizer", choices=RASTERIZERS, default="tiles",
                        help="tiles (default: fast, planned on the run's frames) or fragments (exact everywhere)")
    parser.add_argument("--margin", type=float, default=TILE_MARGIN,
                        help=f"tile capacity = required on the run's frames x this (default {TILE_MARGIN})")
    parser.add_argument("--checkpoint", default="last.ckpt",
                        help="checkpoints/<NAME> of the run (default last.ckpt; best.ckpt: chosen on val)")
    args = parser.parse_args(argv)
    try:
        path = export_run(args.run_dir, args.out, args.opset, args.rasterizer, args.margin, args.checkpoint)
    except (ExportError, UpstreamMissingError, UpstreamChangedError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
