"""Export the per-frame path of a GAR run to ONNX (``python -m lightning_modules.export RUN_DIR OUT.onnx``).

What a device runs per frame (DESIGN.md, "Models" and "GAR"), as one ONNX graph:

1. the student's canonical outputs (points, offset, blendshapes, normals, latent codes f_s),
   computed once in PyTorch and baked in as initializers: the student network itself is not
   exported;
2. deformation by the expression code, x' = x + o + sum_e psi_e B_e (:func:`models.frame.deform_points`),
   and the canonical normals turned into the camera (:func:`models.camera.rotate_normals`);
3. rasterization of [f_s, camera-space normal] at ``num_scales`` resolutions with
   :func:`models.rasterizer.rasterize_points_exportable`, the export-friendly form of the
   rasterizer the GAR stage uses (bit-equal to it in PyTorch);
4. the EMA generator of the GAR run (:class:`models.renderer.GARGenerator`, the copy used for
   evaluation).

The graph is the GAR stage's own frame path, :class:`models.renderer.GARFrame` (what every
evaluated row renders through), exported as it is with ``exportable=True``.

Graph inputs (float32): ``expression`` (1, E), ``world_mat`` (1, 3, 4) world->camera (OpenCV) and
``K`` (1, 3, 3) pixel intrinsics, all exactly as the run's datamodule serves them, and ``z``
(1, z_dim), the global code; ``z`` has a default, the mean training z the GAR module keeps
(``z_mean``, the ``gar_meanz`` render), stored as an initializer of the same name, so a runtime
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
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_modules.gar import GARModule
from lightning_modules.handoff import UpstreamChangedError, class_from_path
from lightning_modules.run_folder import UpstreamMissingError
from models.renderer import GARFrame

__all__ = [
    "ExportError",
    "OPSET",
    "export_graph",
    "export_run",
    "frame_graph",
    "load_datamodule",
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


class ExportError(ValueError):
    """A run folder that cannot be exported (no checkpoint, not a GAR run); one line for the CLI."""


# -- the run -----------------------------------------------------------------------------------


def run_checkpoint(run_dir: str | Path, name: str = "last.ckpt") -> Path:
    """``RUN_DIR/checkpoints/<name>`` of a GAR run (``last.ckpt``; ``best.ckpt``: the best on val).

    Raises:
        ExportError: when the folder or its last.ckpt is missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a folder: pass a GAR run folder such as runs/gar/latest")
    ckpt = run_dir / "checkpoints" / name
    if not ckpt.is_file():
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


def frame_graph(module) -> GARFrame:
    """The graph to export: the GAR module's own frame path (:meth:`~lightning_modules.gar.GARModule.frame`,
    the EMA generator) with the export-friendly rasterizer, a copy in eval mode."""
    return copy.deepcopy(module.frame(exportable=True)).eval()


def _example_inputs(graph: GARFrame, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A frame in front of the camera (the shapes and dtypes matter; the values only must render)."""
    world_mat = torch.eye(3, 4)[None].clone()
    world_mat[0, 2, 3] = 2.5
    s = float(graph.image_size)
    K = torch.tensor([[[s, 0.0, s / 2], [0.0, s, s / 2], [0.0, 0.0, 1.0]]])
    return torch.zeros(1, graph.expression_dim), world_mat, K, z.reshape(1, -1).float()


def export_graph(graph: GARFrame, z_default: torch.Tensor, out: str | Path, opset: int = OPSET) -> Path:
    """Write ``graph`` as ONNX to ``out`` with ``z`` defaulting to ``z_default`` (z_dim,).

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
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def export_run(run_dir: str | Path, out: str | Path, opset: int = OPSET) -> Path:
    """Export the per-frame path of the GAR run in ``run_dir`` to the ONNX file ``out``.

    Args:
        run_dir: a GAR run folder (``runs/gar/latest``, or any ``--run_dir``) with checkpoints/last.ckpt.
        out: the .onnx file to write (its folder is created).
        opset: ONNX opset (>= 17).

    Returns:
        the path written.

    Raises:
        ExportError: no checkpoint, not a GAR run, or an opset below 17.
        UpstreamMissingError: the run's student checkpoint is gone.
    """
    if opset < 17:
        raise ExportError(f"opset must be >= 17, got {opset}")
    module = load_gar_module(run_dir)
    return export_graph(frame_graph(module), module.z_mean, out, opset)


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
    """CLI: ``python -m lightning_modules.export RUN_DIR OUT.onnx [--opset 18]``.

    Errors (no checkpoint, not a GAR run, a missing or changed student checkpoint) exit with one line.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.export",
        description="Export the per-frame path (deform, rasterize, EMA generator) of a GAR run to ONNX.",
    )
    parser.add_argument("run_dir", help="GAR run folder with checkpoints/last.ckpt (e.g. runs/gar/latest)")
    parser.add_argument("out", help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (>= 17, default {OPSET})")
    args = parser.parse_args(argv)
    try:
        path = export_run(args.run_dir, args.out, args.opset)
    except (ExportError, UpstreamMissingError, UpstreamChangedError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
